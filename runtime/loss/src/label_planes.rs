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

use crate::kernels::parallel::run_parts;
use crate::kernels::scratch::{give_back, take};
use crate::kernels::{pool, threads};
use compiler::analysis;
use compiler::ir::{Handle, Node, Shape};
use compiler::RelaxedModule;

/// One node's value: a number, or `[N, width, H, W]` bytes.
#[derive(Debug)]
pub enum Value {
    Scalar(i8),
    Plane { data: Vec<i8>, width: usize },
}

/// Per-class sums of a `[N, width, H, W]` byte plane (over images and pixels).
pub(crate) fn class_sums(data: &[i8], width: usize, pixels: usize) -> Vec<f64> {
    let planes: Vec<&[i8]> = data.chunks(pixels.max(1)).collect();
    let per_part = planes.len().div_ceil(threads()).max(1);
    let parts: Vec<Vec<(usize, &[i8])>> =
        planes.into_iter().enumerate().collect::<Vec<_>>().chunks(per_part).map(<[_]>::to_vec).collect();
    let mut sums = vec![0i64; width];
    for part in run_parts(parts, |part| {
        // Blocks small enough that their sum fits an i32 (the loop then vectorizes).
        part.iter()
            .map(|(index, row)| {
                (
                    index % width,
                    row.chunks(1 << 20)
                        .map(|block| i64::from(block.iter().map(|&x| i32::from(x)).sum::<i32>()))
                        .sum::<i64>(),
                )
            })
            .collect::<Vec<_>>()
    }) {
        for (class, sum) in part {
            sums[class] += sum;
        }
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

/// Whether `handle` is a label-only node at pixel level, i.e. one this module may evaluate.
pub(crate) fn pixel_label_node(module: &RelaxedModule, handle: Handle) -> bool {
    !module.prediction_dependent()[handle.index()]
        && matches!(module.shape(handle), Shape::Pixels | Shape::ClassPixels(_))
}

/// The width (classes) of a pixel-level shape.
fn shape_width(shape: Shape, classes: usize) -> Option<usize> {
    match shape {
        Shape::Pixels => Some(1),
        Shape::ClassPixels(range) => range.len(classes),
        Shape::Scalar | Shape::Classes(_) => None,
    }
}

/// Whether pixel (`y`, `x`) of an `h × w` image is closer than `r` to the border.
fn border_pixel(y: usize, x: usize, (h, w): (usize, usize), r: usize) -> bool {
    y < r || x < r || y + r >= h || x + r >= w
}

/// Value interval of every node `wanted` depends on, or `None` when some node is not an
/// integer operation this evaluator has or may leave `i8`.
fn intervals(module: &RelaxedModule, wanted: &[Handle]) -> Option<Vec<Option<(i32, i32)>>> {
    let need = analysis::needed(module, wanted, |_| false);
    let mut range: Vec<Option<(i32, i32)>> = vec![None; module.len()];
    for handle in module.handles() {
        if !need[handle.index()] {
            continue;
        }
        let r = |h: &Handle| range[h.index()].expect("operands come first");
        let interval = match module.node(handle) {
            Node::Labels | Node::Valid | Node::Border { .. } => (0, 1),
            Node::Const(value) => {
                let v = value.get();
                if v.fract() != 0.0 || v.abs() > 127.0 {
                    return None;
                }
                (v as i32, v as i32)
            }
            Node::Erode { input, .. }
            | Node::Dilate { input, .. }
            | Node::AnyClass(input)
            | Node::Slice { input, .. } => r(input),
            Node::Add(a, b) => (r(a).0 + r(b).0, r(a).1 + r(b).1),
            Node::Sub(a, b) => (r(a).0 - r(b).1, r(a).1 - r(b).0),
            Node::Neg(a) => (-r(a).1, -r(a).0),
            Node::Mul(a, b) => {
                let (a, b) = (r(a), r(b));
                let products = [a.0 * b.0, a.0 * b.1, a.1 * b.0, a.1 * b.1];
                (*products.iter().min().expect("four"), *products.iter().max().expect("four"))
            }
            // Anything else (predictions, curves, numbers, exact operators) is not a
            // label-only integer plane: the float path computes the module.
            Node::Pred
            | Node::Softmax
            | Node::CurveTag { .. }
            | Node::Scope { .. }
            | Node::And(..)
            | Node::Or(..)
            | Node::Xor(..)
            | Node::Not(..)
            | Node::Curve { .. }
            | Node::Count(_)
            | Node::NllSum
            | Node::Weights { .. }
            | Node::Div { .. }
            | Node::Compare { .. }
            | Node::Mean { .. }
            | Node::Sum { .. }
            | Node::Term { .. } => return None,
        };
        if interval.0 < -128 || interval.1 > 127 {
            return None;
        }
        range[handle.index()] = Some(interval);
    }
    Some(range)
}

/// The dilation that `any` over (a slice of) a dilated set can skip: `any(dilate(x, r)[s])`
/// equals `dilate(any(x[s]), r)` (a maximum over classes of maxima over a window is the
/// maximum over the window of the maxima over classes), so BIoU's band dilates one plane
/// instead of one per class. Returns `(x, slice start, radius)`.
fn dilated_any(module: &RelaxedModule, any: Handle) -> Option<(Handle, Option<usize>, u32)> {
    let Node::AnyClass(input) = module.node(any) else { return None };
    let (inner, start) = match module.node(*input) {
        Node::Slice { input, start, .. } => (*input, Some(*start)),
        _ => (*input, None),
    };
    match module.node(inner) {
        Node::Dilate { input, radius } => Some((*input, start, *radius)),
        _ => None,
    }
}

/// The operands `(a, b)` of a relaxed `^` of label sets, `((a + b) − a·b) − a·b`, which is
/// evaluated as `a + b − 2ab` in one pass instead of four (label boundaries are `L ^ erode(L)`).
fn relaxed_xor(module: &RelaxedModule, handle: Handle) -> Option<(Handle, Handle)> {
    let Node::Sub(x, product) = module.node(handle) else { return None };
    let Node::Sub(sum, inner) = module.node(*x) else { return None };
    let (Node::Add(a, b), Node::Mul(c, d)) = (module.node(*sum), module.node(*product)) else { return None };
    (inner == product && ((a, b) == (c, d) || (a, b) == (d, c))).then_some((*a, *b))
}

/// The radius `r` when `handle` is the label boundary `L ^ erode(L, r)` (relaxed) of at most
/// 127 classes, which [`boundary_planes`] computes from the class indices.
fn label_boundary(module: &RelaxedModule, handle: Handle, classes: usize) -> Option<u32> {
    let (a, b) = relaxed_xor(module, handle)?;
    let is_labels = |h: Handle| matches!(module.node(h), Node::Labels);
    let eroded = |h: Handle| match module.node(h) {
        Node::Erode { input, radius } if is_labels(*input) => Some(*radius),
        _ => None,
    };
    let radius = if is_labels(a) {
        eroded(b)
    } else if is_labels(b) {
        eroded(a)
    } else {
        None
    }?;
    (classes <= i8::MAX as usize).then_some(radius)
}

/// The label boundary `L ^ erode(L, radius)` as `[N, C, H, W]` bytes, from the class indices:
/// a pixel is on its own class's boundary when some pixel of its clipped window has another
/// label or is ignored (where `erode` of its class's one-hot plane is 0), that is where the
/// window's smallest and largest label differ. Two poolings of one byte plane of labels
/// instead of an erosion of every class's plane and a `^` of them all.
fn boundary_planes(labels: &[i64], dims: Dims, ignore: i64, radius: usize) -> Vec<i8> {
    let (hw, c) = (dims.pixels(), dims.classes);
    // Checked labels are in 0..C or the ignore label; C ≤ 127, and −1 is no class.
    let mut map = buffer(labels.len());
    for (m, &label) in map.iter_mut().zip(labels) {
        *m = if label != ignore && (0..c as i64).contains(&label) { label as i8 } else { -1 };
    }
    let (mut low, mut high) = (buffer(map.len()), buffer(map.len()));
    pool::pool_bytes(&map, &mut low, (dims.height, dims.width), radius, true);
    pool::pool_bytes(&map, &mut high, (dims.height, dims.width), radius, false);
    let mut out = buffer(dims.images * c * hw);
    let parts: Vec<_> = out.chunks_mut(c * hw).enumerate().collect();
    run_parts(parts, |(image, planes)| {
        planes.fill(0);
        let pixels = image * hw..(image + 1) * hw;
        for (p, ((&label, &low), &high)) in
            map[pixels.clone()].iter().zip(&low[pixels.clone()]).zip(&high[pixels]).enumerate()
        {
            if label >= 0 && low != high {
                planes[label as usize * hw + p] = 1;
            }
        }
    });
    give_back(map);
    give_back(low);
    give_back(high);
    out
}

/// Give the planes of evaluated values back to the scratch pool.
pub(crate) fn give_back_values(values: Vec<Option<Value>>) {
    for value in values.into_iter().flatten() {
        if let Value::Plane { data, .. } = value {
            give_back(data);
        }
    }
}

/// A byte buffer of `len` values from the scratch pool, contents unspecified.
fn buffer(len: usize) -> Vec<i8> {
    take::<i8>(len)
}

/// Evaluate the label-only nodes `wanted` (and what they depend on) on bytes; `None` when the
/// module needs something outside this evaluator (see the module notes). `labels` is the
/// flat `[N, H, W]` label map, already checked. Planes come from the scratch pool; give them
/// back with [`give_back_values`].
pub(crate) fn evaluate(
    module: &RelaxedModule,
    labels: &[i64],
    dims: Dims,
    ignore_label: Option<i64>,
    wanted: &[Handle],
) -> Option<Vec<Option<Value>>> {
    // A value no checked label has stands for "no ignore label".
    let ignore = ignore_label.unwrap_or(i64::MIN);
    let range = intervals(module, wanted)?;
    // What to evaluate: what `wanted` depends on, where a dilated `any` reads the undilated
    // set (see `dilated_any`).
    let mut need = vec![false; module.len()];
    for handle in wanted {
        need[handle.index()] = true;
    }
    for handle in module.handles().rev() {
        if need[handle.index()] {
            if label_boundary(module, handle, dims.classes).is_some() {
                // Computed from the class indices.
                continue;
            }
            match (dilated_any(module, handle), relaxed_xor(module, handle)) {
                (Some((x, _, _)), _) => need[x.index()] = true,
                (None, Some((a, b))) => {
                    need[a.index()] = true;
                    need[b.index()] = true;
                }
                (None, None) => module.node(handle).operands().iter().for_each(|o| need[o.index()] = true),
            }
        }
    }
    let hw = dims.pixels();
    let mut values: Vec<Option<Value>> = (0..module.len()).map(|_| None).collect();
    for handle in module.handles() {
        if !need[handle.index()] || range[handle.index()].is_none() {
            continue;
        }
        let out_width = shape_width(module.shape(handle), dims.classes);
        let v = |h: &Handle| values[h.index()].as_ref().expect("operands come first");
        let value = match module.node(handle) {
            Node::Sub(..) if label_boundary(module, handle, dims.classes).is_some() => {
                let radius = label_boundary(module, handle, dims.classes).expect("checked");
                Value::Plane { data: boundary_planes(labels, dims, ignore, radius as usize), width: dims.classes }
            }
            // In 32 bits: the interval analysis bounds the result, not `2ab` on the way.
            Node::Sub(..) if relaxed_xor(module, handle).is_some() => {
                let (a, b) = relaxed_xor(module, handle).expect("checked");
                binary(v(&a), v(&b), dims, |x, y| {
                    (i32::from(x) + i32::from(y) - 2 * i32::from(x) * i32::from(y)) as i8
                })?
            }
            Node::Const(value) => Value::Scalar(value.get() as i8),
            Node::AnyClass(_) if dilated_any(module, handle).is_some() => {
                let (x, start, radius) = dilated_any(module, handle).expect("checked");
                let Value::Plane { data, width } = v(&x) else { return None };
                let (start, keep) = match start {
                    Some(start) => (start, shape_width(module.shape(module.node(handle).operands()[0]), dims.classes)?),
                    None => (0, *width),
                };
                if start + keep > *width {
                    return None;
                }
                let any = any_of(data, *width, start..start + keep, dims);
                let mut out = buffer(any.len());
                pool::pool_bytes(&any, &mut out, (dims.height, dims.width), radius as usize, false);
                give_back(any);
                Value::Plane { data: out, width: 1 }
            }
            Node::Labels => {
                let c = dims.classes;
                let mut data = buffer(dims.images * c * hw);
                data.fill(0);
                for (image, map) in labels.chunks(hw).enumerate() {
                    let planes = &mut data[image * c * hw..(image + 1) * c * hw];
                    for (pixel, &label) in map.iter().enumerate() {
                        if label != ignore && (0..c as i64).contains(&label) {
                            planes[label as usize * hw + pixel] = 1;
                        }
                    }
                }
                Value::Plane { data, width: c }
            }
            Node::Valid => {
                let mut data = buffer(labels.len());
                for (d, &l) in data.iter_mut().zip(labels) {
                    *d = i8::from(l != ignore);
                }
                Value::Plane { data, width: 1 }
            }
            Node::Border { radius } => {
                let (h, w, r) = (dims.height, dims.width, *radius as usize);
                let image: Vec<i8> = (0..h * w).map(|p| i8::from(border_pixel(p / w, p % w, (h, w), r))).collect();
                Value::Plane { data: image.repeat(dims.images), width: 1 }
            }
            Node::Erode { input, radius } | Node::Dilate { input, radius } => {
                let erode = matches!(module.node(handle), Node::Erode { .. });
                let Value::Plane { data, width } = v(input) else { return None };
                let mut out = buffer(data.len());
                pool::pool_bytes(data, &mut out, (dims.height, dims.width), *radius as usize, erode);
                Value::Plane { data: out, width: *width }
            }
            Node::AnyClass(input) => {
                let Value::Plane { data, width } = v(input) else { return None };
                Value::Plane { data: any_of(data, *width, 0..*width, dims), width: 1 }
            }
            Node::Slice { input, start, .. } => {
                let Value::Plane { data, width } = v(input) else { return None };
                let keep = out_width?;
                if start + keep > *width {
                    return None;
                }
                let mut out = buffer(dims.images * keep * hw);
                for (image, target) in out.chunks_mut(keep * hw).enumerate() {
                    target.copy_from_slice(&data[(image * width + start) * hw..(image * width + start + keep) * hw]);
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
            // Outside the interval analysis's set (it returned no range for these).
            Node::Pred
            | Node::Softmax
            | Node::CurveTag { .. }
            | Node::Scope { .. }
            | Node::And(..)
            | Node::Or(..)
            | Node::Xor(..)
            | Node::Not(..)
            | Node::Curve { .. }
            | Node::Count(_)
            | Node::NllSum
            | Node::Weights { .. }
            | Node::Div { .. }
            | Node::Compare { .. }
            | Node::Mean { .. }
            | Node::Sum { .. }
            | Node::Term { .. } => return None,
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

/// The maximum over classes `classes` of `[N, width, H, W]` planes: one `[N, 1, H, W]` plane.
fn any_of(data: &[i8], width: usize, classes: std::ops::Range<usize>, dims: Dims) -> Vec<i8> {
    let hw = dims.pixels();
    let mut out = buffer(dims.images * hw);
    for (image, target) in out.chunks_mut(hw).enumerate() {
        target.fill(i8::MIN);
        for k in classes.clone() {
            let row = &data[(image * width + k) * hw..(image * width + k + 1) * hw];
            for (t, &x) in target.iter_mut().zip(row) {
                *t = (*t).max(x);
            }
        }
    }
    out
}

/// `a op b` with broadcasting of scalars and one-wide planes (as libtorch broadcasts),
/// plane by plane over the cores.
fn binary(a: &Value, b: &Value, dims: Dims, f: impl Fn(i8, i8) -> i8 + Copy + Sync) -> Option<Value> {
    let hw = dims.pixels();
    let map = |data: &[i8], g: &(dyn Fn(i8) -> i8 + Sync)| {
        let mut out = buffer(data.len());
        let chunk = data.len().div_ceil(threads()).max(1 << 16);
        run_parts(out.chunks_mut(chunk).zip(data.chunks(chunk)).collect(), |(target, source)| {
            for (t, &x) in target.iter_mut().zip(source) {
                *t = g(x);
            }
        });
        out
    };
    Some(match (a, b) {
        (Value::Scalar(x), Value::Scalar(y)) => Value::Scalar(f(*x, *y)),
        (Value::Plane { data, width }, Value::Scalar(y)) => {
            Value::Plane { data: map(data, &|x| f(x, *y)), width: *width }
        }
        (Value::Scalar(x), Value::Plane { data, width }) => {
            Value::Plane { data: map(data, &|y| f(*x, y)), width: *width }
        }
        (Value::Plane { data: da, width: wa }, Value::Plane { data: db, width: wb }) => {
            let width = (*wa).max(*wb);
            if (*wa != width && *wa != 1) || (*wb != width && *wb != 1) {
                return None;
            }
            let mut out = buffer(dims.images * width * hw);
            let planes: Vec<(usize, &mut [i8])> = out.chunks_mut(hw).enumerate().collect();
            let per_part = planes.len().div_ceil(threads()).max(1);
            let mut parts: Vec<Vec<(usize, &mut [i8])>> = Vec::new();
            for plane in planes {
                match parts.last_mut() {
                    Some(part) if part.len() < per_part => part.push(plane),
                    _ => parts.push(vec![plane]),
                }
            }
            run_parts(parts, |part| {
                for (index, target) in part {
                    let (image, k) = (index / width, index % width);
                    let ra = &da[(image * wa + if *wa == 1 { 0 } else { k }) * hw..][..hw];
                    let rb = &db[(image * wb + if *wb == 1 { 0 } else { k }) * hw..][..hw];
                    for ((t, &x), &y) in target.iter_mut().zip(ra).zip(rb) {
                        *t = f(x, y);
                    }
                }
            });
            Value::Plane { data: out, width }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inputs;
    use crate::reference;
    use crate::{test_data, Loss, Overrides};
    use tch::Tensor;

    /// A metric whose label-only part nests `^` deeply enough that the interval analysis
    /// cannot prove it fits bytes: the byte evaluator must decline.
    pub(crate) const DEEP_XOR: &str = "metric deep {
    let a = (L ^ dilate(L, 1)) ^ (erode(L, 1) ^ dilate(L, 2));
    let b = a ^ dilate(a, 2);
    mean(count(P & b & V) / count((P | b) & V))
}";

    fn as_floats(value: &Value, images: usize, height: usize, width: usize) -> Tensor {
        match value {
            Value::Scalar(value) => Tensor::from(*value as f32),
            Value::Plane { data, width: classes } => {
                let floats: Vec<f32> = data.iter().map(|&x| x as f32).collect();
                Tensor::from_slice(&floats).reshape([images as i64, *classes as i64, height as i64, width as i64])
            }
        }
    }

    /// The label-only pixel nodes of every example (and of `DEEP_XOR`), evaluated on bytes,
    /// equal libtorch's float values exactly, with the default ignore label, another one
    /// inside `0..C`, and none; where the byte evaluator declines, it is the deep case.
    #[test]
    fn label_planes_on_bytes_equal_libtorch() {
        let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut files: Vec<_> = std::fs::read_dir(&examples)
            .expect("examples")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "metric"))
            .collect();
        files.sort();
        let mut modules: Vec<(String, Loss)> = files
            .iter()
            .map(|p| (p.display().to_string(), Loss::from_file(p, &Overrides::new()).expect("compiles")))
            .collect();
        modules.push(("deep".into(), Loss::from_source("deep.metric", DEEP_XOR, &Overrides::new()).expect("compiles")));
        let (images, classes, height, width) = (2usize, 5usize, 19usize, 23usize);
        let mut compared = 0;
        for (seed, ignore) in [(1, Some(255)), (2, Some(2)), (3, None)] {
            let labels = test_data::classes(seed, &[2, 19, 23], classes as i64);
            let labels = match ignore {
                Some(value) => {
                    let drop = test_data::tensor(seed + 10, &[2, 19, 23], 0.0, 1.0).lt(0.1);
                    labels.where_scalarother(&drop.logical_not(), value)
                }
                None => labels,
            };
            let logits = test_data::tensor(seed + 20, &[2, 5, 19, 23], -3.0, 3.0);
            let flat = Vec::<i64>::try_from(labels.reshape([-1])).expect("int64 labels");
            let dims = Dims { images, classes, height, width };
            for (name, loss) in &modules {
                let module = &loss.compiled().relaxed;
                let wanted: Vec<_> = module.handles().filter(|&h| pixel_label_node(module, h)).collect();
                let Some(values) = evaluate(module, &flat, dims, ignore, &wanted) else {
                    assert_eq!(name, "deep", "{name}: the byte evaluator declined");
                    continue;
                };
                assert_ne!(name, "deep", "nested xors exceed the i8 interval and must be declined");
                let checked = inputs::check(&logits, &labels, module, ignore).expect("valid inputs");
                let provided = (0..module.len()).map(|_| None).collect();
                let reference =
                    reference::run_nodes(module, &loss.params().curves, &checked.batch(), provided, &wanted);
                for handle in &wanted {
                    let ours = as_floats(values[handle.index()].as_ref().expect("evaluated"), images, height, width);
                    let theirs = reference.values[handle.index()].as_ref().expect("computed");
                    let difference = (&ours - theirs).abs().max().double_value(&[]);
                    assert_eq!(difference, 0.0, "{name} (ignore {ignore:?}): node %{} differs", handle.index());
                    compared += 1;
                }
            }
        }
        assert!(compared >= 30, "label-only nodes compared: {compared}");
    }
}
