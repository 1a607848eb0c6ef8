//! Label-only pixel nodes (one-hot labels, their boundaries, bands around them) evaluated on
//! small-integer planes instead of float tensors.
//!
//! These nodes do not depend on the predictions, so they need no gradient, and over one-hot
//! labels they only ever hold small integers (0/1 sets, and sums such as `a + b − 2ab` on the
//! way to a boolean result). A static interval analysis proves every node's values fit an
//! `i8`; then the whole label-only part runs on bytes, a quarter of the memory traffic of
//! float32, with loops that vectorize 32 lanes wide. A module with a node outside that
//! (a fractional constant, a range beyond `i8`, an operation not listed here) returns `None`
//! and keeps libtorch's float path. Values equal libtorch's float ones exactly (integers).

use crate::fused::threads;
use crate::tch_backend::IGNORE_LABEL;
use compiler::ir::{Handle, Module, Node, Shape};
use tch::{Kind, Tensor};

/// One node's value: a number, or `[N, width, H, W]` bytes.
#[derive(Debug)]
pub enum Value {
    Scalar(i8),
    Plane { data: Vec<i8>, width: usize },
}

impl Value {
    /// The plane as a float32 tensor `[N, width, H, W]` (a scalar as a 0-d tensor).
    pub fn to_tensor(&self, images: usize, height: usize, width: usize) -> Tensor {
        match self {
            Value::Scalar(value) => Tensor::from(*value as f32),
            Value::Plane { data, width: classes } => {
                let out = Tensor::empty(
                    [images as i64, *classes as i64, height as i64, width as i64],
                    (Kind::Float, tch::Device::Cpu),
                );
                if !data.is_empty() {
                    // SAFETY: `out` is a fresh contiguous float32 CPU tensor of `data.len()`
                    // elements that nothing else refers to.
                    let target = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, data.len()) };
                    widen(data, target);
                }
                out
            }
        }
    }
}

crate::fused::with_best_simd!(widen_chunk, (source: &[i8], target: &mut [f32]), {
    for (t, &s) in target.iter_mut().zip(source) {
        *t = s as f32;
    }
});

/// `target[i] = source[i] as f32`, split over the cores.
pub fn widen(source: &[i8], target: &mut [f32]) {
    let chunk = source.len().div_ceil(threads()).max(1 << 16);
    std::thread::scope(|scope| {
        for (s, t) in source.chunks(chunk).zip(target.chunks_mut(chunk)) {
            scope.spawn(move || widen_chunk(s, t));
        }
    });
}

/// Per-class sums of a `[N, width, H, W]` byte plane (over images and pixels).
pub fn class_sums(data: &[i8], width: usize, pixels: usize) -> Vec<f64> {
    let mut sums = vec![0i64; width];
    for (index, row) in data.chunks(pixels.max(1)).enumerate() {
        sums[index % width] += row.iter().map(|&x| x as i64).sum::<i64>();
    }
    sums.into_iter().map(|s| s as f64).collect()
}

/// The geometry of a batch.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub images: usize,
    pub classes: usize,
    pub height: usize,
    pub width: usize,
}

impl Dims {
    fn pixels(&self) -> usize {
        self.height * self.width
    }
}

/// Whether `handle` is a label-only node at pixel level, i.e. one this module may evaluate,
/// given which nodes depend on the predictions.
pub fn pixel_label_node(module: &Module, handle: Handle, on_pred: &[bool]) -> bool {
    !on_pred[handle.index()] && matches!(module.shape(handle), Shape::Pixels | Shape::ClassPixels(_))
}

/// Which nodes depend on the predictions (directly or through an operand).
pub fn prediction_dependent(module: &Module) -> Vec<bool> {
    let mut on_pred = vec![false; module.len()];
    for handle in module.handles() {
        let node = module.node(handle);
        on_pred[handle.index()] = matches!(node, Node::Softmax | Node::NllSum | Node::Pred)
            || node.operands().iter().any(|o| on_pred[o.index()]);
    }
    on_pred
}

/// The width (classes) of a pixel-level shape.
fn shape_width(shape: Shape, classes: usize) -> Option<usize> {
    match shape {
        Shape::Pixels => Some(1),
        Shape::ClassPixels(range) => range.len(classes),
        Shape::Scalar | Shape::Classes(_) => None,
    }
}

/// Value interval of every node `wanted` depends on, or `None` when some node is not an
/// integer operation this evaluator has or may leave `i8`.
fn intervals(module: &Module, wanted: &[Handle]) -> Option<Vec<Option<(i32, i32)>>> {
    let mut need = vec![false; module.len()];
    for handle in wanted {
        need[handle.index()] = true;
    }
    for index in (0..module.len()).rev() {
        if need[index] {
            for operand in module.nodes[index].operands() {
                need[operand.index()] = true;
            }
        }
    }
    let mut range: Vec<Option<(i32, i32)>> = vec![None; module.len()];
    for handle in module.handles() {
        if !need[handle.index()] {
            continue;
        }
        let r = |h: &Handle| range[h.index()].expect("operands come first");
        let interval = match module.node(handle) {
            Node::Labels | Node::Valid => (0, 1),
            Node::Const(value) => {
                let v = value.get();
                if v.fract() != 0.0 || v.abs() > 127.0 {
                    return None;
                }
                (v as i32, v as i32)
            }
            Node::Erode { input, .. } | Node::Dilate { input, .. } | Node::AnyClass(input) | Node::Slice { input, .. } => {
                r(input)
            }
            Node::Add(a, b) => (r(a).0 + r(b).0, r(a).1 + r(b).1),
            Node::Sub(a, b) => (r(a).0 - r(b).1, r(a).1 - r(b).0),
            Node::Neg(a) => (-r(a).1, -r(a).0),
            Node::Mul(a, b) => {
                let (a, b) = (r(a), r(b));
                let products = [a.0 * b.0, a.0 * b.1, a.1 * b.0, a.1 * b.1];
                (*products.iter().min().expect("four"), *products.iter().max().expect("four"))
            }
            _ => return None,
        };
        if interval.0 < -128 || interval.1 > 127 {
            return None;
        }
        range[handle.index()] = Some(interval);
    }
    Some(range)
}

/// Evaluate the label-only nodes `wanted` (and what they depend on) on bytes; `None` when the
/// module needs something outside this evaluator (see the module notes). `labels` is the
/// flat `[N, H, W]` label map, already checked.
pub fn evaluate(module: &Module, labels: &[i64], dims: Dims, wanted: &[Handle]) -> Option<Vec<Option<Value>>> {
    let range = intervals(module, wanted)?;
    let hw = dims.pixels();
    let mut values: Vec<Option<Value>> = (0..module.len()).map(|_| None).collect();
    for handle in module.handles() {
        if range[handle.index()].is_none() {
            continue;
        }
        let out_width = shape_width(module.shape(handle), dims.classes);
        let v = |h: &Handle| values[h.index()].as_ref().expect("operands come first");
        let value = match module.node(handle) {
            Node::Const(value) => Value::Scalar(value.get() as i8),
            Node::Labels => {
                let c = dims.classes;
                let mut data = vec![0i8; dims.images * c * hw];
                for (image, map) in labels.chunks(hw).enumerate() {
                    let planes = &mut data[image * c * hw..(image + 1) * c * hw];
                    for (pixel, &label) in map.iter().enumerate() {
                        if label != IGNORE_LABEL && (0..c as i64).contains(&label) {
                            planes[label as usize * hw + pixel] = 1;
                        }
                    }
                }
                Value::Plane { data, width: c }
            }
            Node::Valid => Value::Plane { data: labels.iter().map(|&l| i8::from(l != IGNORE_LABEL)).collect(), width: 1 },
            Node::Erode { input, radius } | Node::Dilate { input, radius } => {
                let erode = matches!(module.node(handle), Node::Erode { .. });
                let Value::Plane { data, width } = v(input) else { return None };
                Value::Plane { data: pool(data, dims, *radius as usize, erode), width: *width }
            }
            Node::AnyClass(input) => {
                let Value::Plane { data, width } = v(input) else { return None };
                let mut out = vec![i8::MIN; dims.images * hw];
                for (image, target) in out.chunks_mut(hw).enumerate() {
                    for k in 0..*width {
                        let row = &data[(image * width + k) * hw..(image * width + k + 1) * hw];
                        for (t, &x) in target.iter_mut().zip(row) {
                            *t = (*t).max(x);
                        }
                    }
                }
                Value::Plane { data: out, width: 1 }
            }
            Node::Slice { input, start, .. } => {
                let Value::Plane { data, width } = v(input) else { return None };
                let keep = out_width?;
                if start + keep > *width {
                    return None;
                }
                let mut out = Vec::with_capacity(dims.images * keep * hw);
                for image in 0..dims.images {
                    out.extend_from_slice(&data[(image * width + start) * hw..(image * width + start + keep) * hw]);
                }
                Value::Plane { data: out, width: keep }
            }
            Node::Neg(a) => match v(a) {
                Value::Scalar(x) => Value::Scalar(-x),
                Value::Plane { data, width } => Value::Plane { data: data.iter().map(|x| -x).collect(), width: *width },
            },
            Node::Add(a, b) => binary(v(a), v(b), dims, |x, y| x + y)?,
            Node::Sub(a, b) => binary(v(a), v(b), dims, |x, y| x - y)?,
            Node::Mul(a, b) => binary(v(a), v(b), dims, |x, y| x * y)?,
            _ => return None,
        };
        if let (Value::Plane { width, .. }, Some(expected)) = (&value, out_width) {
            if *width != expected {
                return None;
            }
        }
        values[handle.index()] = Some(value);
    }
    Some(values)
}

/// `a op b` with broadcasting of scalars and one-wide planes (as libtorch broadcasts).
fn binary(a: &Value, b: &Value, dims: Dims, f: impl Fn(i8, i8) -> i8 + Copy) -> Option<Value> {
    let hw = dims.pixels();
    Some(match (a, b) {
        (Value::Scalar(x), Value::Scalar(y)) => Value::Scalar(f(*x, *y)),
        (Value::Plane { data, width }, Value::Scalar(y)) => {
            Value::Plane { data: data.iter().map(|&x| f(x, *y)).collect(), width: *width }
        }
        (Value::Scalar(x), Value::Plane { data, width }) => {
            Value::Plane { data: data.iter().map(|&y| f(*x, y)).collect(), width: *width }
        }
        (Value::Plane { data: da, width: wa }, Value::Plane { data: db, width: wb }) => {
            let width = (*wa).max(*wb);
            if (*wa != width && *wa != 1) || (*wb != width && *wb != 1) {
                return None;
            }
            let mut out = vec![0i8; dims.images * width * hw];
            for image in 0..dims.images {
                for k in 0..width {
                    let ra = &da[(image * wa + if *wa == 1 { 0 } else { k }) * hw..][..hw];
                    let rb = &db[(image * wb + if *wb == 1 { 0 } else { k }) * hw..][..hw];
                    let target = &mut out[(image * width + k) * hw..][..hw];
                    for ((t, &x), &y) in target.iter_mut().zip(ra).zip(rb) {
                        *t = f(x, y);
                    }
                }
            }
            Value::Plane { data: out, width }
        }
    })
}

/// Square-window minimum (erosion) or maximum (dilation) of every `[H, W]` plane, the window
/// clipped at the border, as the float path computes it.
fn pool(data: &[i8], dims: Dims, radius: usize, erode: bool) -> Vec<i8> {
    let plane = dims.pixels();
    let mut out = vec![0i8; data.len()];
    if plane == 0 || data.is_empty() {
        return out;
    }
    let chunk = crate::fused::plane_chunk(data.len(), plane);
    std::thread::scope(|scope| {
        for (inputs, outputs) in data.chunks(chunk).zip(out.chunks_mut(chunk)) {
            scope.spawn(move || pool_planes(inputs, outputs, dims.height, dims.width, radius, erode));
        }
    });
    out
}

crate::fused::with_best_simd!(
    pool_planes,
    (inputs: &[i8], outputs: &mut [i8], h: usize, w: usize, radius: usize, erode: bool),
    {
        if erode {
            crate::tch_backend::pool_planes_of(inputs, outputs, h, w, radius, Ord::min)
        } else {
            crate::tch_backend::pool_planes_of(inputs, outputs, h, w, radius, Ord::max)
        }
    }
);
