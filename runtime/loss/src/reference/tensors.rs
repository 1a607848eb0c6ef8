//! The tensor operations the reference interpreters share: one-hot labels, valid pixels,
//! pooling, class slices, comparisons, zero-safe division, and the curve math of
//! [`compiler::curve::math`] on libtorch tensors.

use crate::error::LossError;
pub(crate) use crate::inputs::one_hot;
use crate::kernels::pool;
use compiler::curve::math::{self, CurveOps, Piece, Strategy};
use compiler::curve::Curve;
use compiler::ir::{CmpOp, Shape};
use tch::{Kind, Tensor};

/// The dimensions a count sums over: every one but the classes' (`[0, 2, 3]` for images,
/// `[0, 2, 3, 4]` for volumes).
pub(crate) fn count_dims(x: &Tensor) -> Vec<i64> {
    std::iter::once(0).chain(2..x.dim() as i64).collect()
}

/// Valid pixels `[N, 1, ...]` of `kind`.
pub(crate) fn valid(labels: &Tensor, kind: Kind, ignore: Option<i64>) -> Tensor {
    match ignore {
        Some(ignore) => labels.ne(ignore).unsqueeze(1).to_kind(kind),
        None => labels.unsqueeze(1).ones_like().to_kind(kind),
    }
}

/// Pixels closer than `radius` to the image (or volume) border, `[N, 1, ...]` of `kind`:
/// within `radius` of an edge along any spatial axis.
pub(crate) fn border(labels: &Tensor, kind: Kind, radius: u32) -> Tensor {
    let size = labels.size();
    let r = radius as i64;
    let device = labels.device();
    let rank = size.len() + 1;
    let mut near = Tensor::zeros([1i64; 1].repeat(rank).as_slice(), (Kind::Bool, device));
    for (axis, &extent) in size.iter().enumerate().skip(1) {
        let mut shape = vec![1i64; rank];
        shape[axis + 1] = extent;
        let at = Tensor::arange(extent, (Kind::Int64, device)).view(shape.as_slice());
        near = near.logical_or(&at.lt(r).logical_or(&at.ge(extent - r)));
    }
    let mut out = size.clone();
    out.insert(1, 1);
    near.expand(out.as_slice(), false).to_kind(kind)
}

/// The values of a tensor as a flat vector, or the libtorch error as a [`LossError`].
pub(crate) fn values<T: tch::kind::Element + Copy>(tensor: &Tensor) -> Result<Vec<T>, LossError> {
    let flat = tensor.f_contiguous().and_then(|t| t.f_reshape([-1]))?;
    Ok(Vec::<T>::try_from(&flat)?)
}

/// Square-window erosion (`erode`) or dilation of every `[H, W]` plane (cubic windows of
/// every `[D, H, W]` volume for 5-D values), the border counting as inside for erosion and
/// outside for dilation. On the CPU in float32 the pooling kernels
/// of [`crate::kernels::pool`] compute it (with a gradient: each output's winner, then a
/// differentiable gather, whose backward is one scatter-add as `max_pool2d`'s is); elsewhere
/// two separable `max_pool2d` passes.
pub(crate) fn pool_tensor(x: &Tensor, radius: u32, erode: bool) -> Tensor {
    let size = x.size();
    if x.device() == tch::Device::Cpu && x.kind() == Kind::Float && x.dim() == 4 {
        let (planes, h, w) = ((size[0] * size[1]) as usize, size[2] as usize, size[3] as usize);
        let elements = planes * h * w;
        if elements > 0 {
            let source = x.detach().contiguous();
            // SAFETY: `source` is a contiguous float32 CPU tensor of `elements` values that
            // lives to the end of this block and is not written meanwhile.
            let input: &[f32] = unsafe { std::slice::from_raw_parts(source.data_ptr() as *const f32, elements) };
            if !x.requires_grad() {
                let result = Tensor::empty(size.as_slice(), (Kind::Float, tch::Device::Cpu));
                // SAFETY: `result` is fresh, contiguous, float32, of `elements` values, and
                // referred to nowhere else.
                let output = unsafe { std::slice::from_raw_parts_mut(result.data_ptr() as *mut f32, elements) };
                pool::pool(input, output, (h, w), radius as usize, erode);
                return result;
            }
            let winners = Tensor::empty([planes as i64, (h * w) as i64], (Kind::Int64, tch::Device::Cpu));
            // SAFETY: as above, for a fresh contiguous int64 tensor.
            let indices = unsafe { std::slice::from_raw_parts_mut(winners.data_ptr() as *mut i64, elements) };
            pool::winners(input, indices, (h, w), radius as usize, erode);
            return x.reshape([size[0] * size[1], size[2] * size[3]]).gather(1, &winners, false).reshape(size);
        }
    }
    let k = 2 * radius as i64 + 1;
    let r = radius as i64;
    if x.dim() == 5 {
        // A cubic window: three 1-D passes, one per spatial axis.
        let dilate = |t: &Tensor| {
            t.max_pool3d([k, 1, 1], [1, 1, 1], [r, 0, 0], [1, 1, 1], false)
                .max_pool3d([1, k, 1], [1, 1, 1], [0, r, 0], [1, 1, 1], false)
                .max_pool3d([1, 1, k], [1, 1, 1], [0, 0, r], [1, 1, 1], false)
        };
        return if erode { dilate(&x.neg()).neg() } else { dilate(x) };
    }
    // A square window's maximum is the maximum of row maxima: two 1-D passes (2k reads per
    // pixel) instead of one 2-D pass (k² reads). max_pool2d pads with −∞: for dilation the
    // border is outside; erosion is the negated dilation of the negation, so there the
    // border counts as inside.
    let dilate = |t: &Tensor| {
        t.max_pool2d([k, 1], [1, 1], [r, 0], [1, 1], false).max_pool2d([1, k], [1, 1], [0, r], [1, 1], false)
    };
    if erode {
        dilate(&x.neg()).neg()
    } else {
        dilate(x)
    }
}

/// Classes `start..end` of a per-class value.
pub(crate) fn slice(x: &Tensor, shape: Shape, start: usize, end: Option<usize>) -> Tensor {
    let dim = match shape {
        Shape::ClassPixels(_) => 1,
        Shape::Pixels | Shape::Classes(_) | Shape::Scalar => 0,
    };
    let size = x.size()[dim] as usize;
    let end = end.unwrap_or(size).min(size);
    x.narrow(dim as i64, start as i64, (end - start.min(end)) as i64)
}

pub(crate) fn compare(op: CmpOp, a: &Tensor, b: &Tensor) -> Tensor {
    match op {
        CmpOp::Lt => a.lt_tensor(b),
        CmpOp::Le => a.le_tensor(b),
        CmpOp::Gt => a.gt_tensor(b),
        CmpOp::Ge => a.ge_tensor(b),
        CmpOp::Eq => a.eq_tensor(b),
        CmpOp::Ne => a.ne_tensor(b),
    }
}

/// `num / den`, or 0 where `den` is exactly 0, with finite gradients (the quotient only ever
/// sees non-zero denominators): the surrogate's division in every back end.
pub(crate) fn zero_safe_div(num: &Tensor, den: &Tensor) -> Tensor {
    let is_zero = den.eq(0.0);
    let safe = den.where_scalarother(&is_zero.logical_not(), 1.0);
    (num / safe).where_scalarother(&is_zero.logical_not(), 0.0)
}

/// `g(x)` for a whole tensor: the curve math with tensors (autograd differentiates it).
pub(crate) fn apply_curve(x: &Tensor, curve: &Curve) -> Tensor {
    let pieces: Vec<_> = curve.segments().iter().map(|segment| Piece::known(&mut Tensors, segment)).collect();
    match math::eval(&mut Tensors, &Value::Tensor(x.shallow_clone()), &pieces, Strategy::EachPiece, false).0 {
        Value::Tensor(y) => y,
        Value::Number(y) => x.zeros_like() + y,
    }
}

/// A value of the curve math on tensors: a constant stays a number, so that operations with
/// it are libtorch's tensor–scalar operations.
#[derive(Debug)]
pub(crate) enum Value {
    Number(f64),
    Tensor(Tensor),
}

impl Clone for Value {
    fn clone(&self) -> Self {
        match self {
            Value::Number(x) => Value::Number(*x),
            Value::Tensor(t) => Value::Tensor(t.shallow_clone()),
        }
    }
}

/// A mask of the curve math on tensors.
#[derive(Debug)]
pub(crate) enum Mask {
    Bool(bool),
    Tensor(Tensor),
}

impl Clone for Mask {
    fn clone(&self) -> Self {
        match self {
            Mask::Bool(x) => Mask::Bool(*x),
            Mask::Tensor(t) => Mask::Tensor(t.shallow_clone()),
        }
    }
}

/// The curve math's operations on libtorch tensors.
pub(crate) struct Tensors;

impl Tensors {
    fn arithmetic(
        a: &Value,
        b: &Value,
        numbers: fn(f64, f64) -> f64,
        tensors: fn(&Tensor, &Tensor) -> Tensor,
    ) -> Value {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => Value::Number(numbers(*x, *y)),
            (Value::Tensor(x), Value::Tensor(y)) => Value::Tensor(tensors(x, y)),
            (Value::Tensor(x), Value::Number(y)) => Value::Tensor(tensors(x, &Tensor::from(*y).to_kind(x.kind()))),
            (Value::Number(x), Value::Tensor(y)) => Value::Tensor(tensors(&Tensor::from(*x).to_kind(y.kind()), y)),
        }
    }

    fn comparison(
        a: &Value,
        b: &Value,
        numbers: fn(f64, f64) -> bool,
        tensors: fn(&Tensor, &Tensor) -> Tensor,
    ) -> Mask {
        match (a, b) {
            (Value::Number(x), Value::Number(y)) => Mask::Bool(numbers(*x, *y)),
            (Value::Tensor(x), Value::Tensor(y)) => Mask::Tensor(tensors(x, y)),
            (Value::Tensor(x), Value::Number(y)) => Mask::Tensor(tensors(x, &Tensor::from(*y).to_kind(x.kind()))),
            (Value::Number(x), Value::Tensor(y)) => Mask::Tensor(tensors(&Tensor::from(*x).to_kind(y.kind()), y)),
        }
    }
}

impl CurveOps for Tensors {
    type Value = Value;
    type Mask = Mask;
    fn constant(&mut self, value: f64) -> Value {
        Value::Number(value)
    }
    fn add(&mut self, a: &Value, b: &Value) -> Value {
        match (a, b) {
            (Value::Tensor(x), Value::Number(y)) | (Value::Number(y), Value::Tensor(x)) => Value::Tensor(x + *y),
            _ => Tensors::arithmetic(a, b, |x, y| x + y, |x, y| x + y),
        }
    }
    fn sub(&mut self, a: &Value, b: &Value) -> Value {
        match (a, b) {
            (Value::Tensor(x), Value::Number(y)) => Value::Tensor(x - *y),
            (Value::Number(x), Value::Tensor(y)) => Value::Tensor(y.rsub_scalar(*x)),
            _ => Tensors::arithmetic(a, b, |x, y| x - y, |x, y| x - y),
        }
    }
    fn mul(&mut self, a: &Value, b: &Value) -> Value {
        match (a, b) {
            (Value::Tensor(x), Value::Number(y)) | (Value::Number(y), Value::Tensor(x)) => Value::Tensor(x * *y),
            _ => Tensors::arithmetic(a, b, |x, y| x * y, |x, y| x * y),
        }
    }
    fn div(&mut self, a: &Value, b: &Value) -> Value {
        match (a, b) {
            (Value::Tensor(x), Value::Number(y)) => Value::Tensor(x / *y),
            _ => Tensors::arithmetic(a, b, |x, y| x / y, |x, y| x / y),
        }
    }
    fn sqrt(&mut self, a: &Value) -> Value {
        match a {
            Value::Number(x) => Value::Number(x.sqrt()),
            Value::Tensor(x) => Value::Tensor(x.sqrt()),
        }
    }
    fn abs(&mut self, a: &Value) -> Value {
        match a {
            Value::Number(x) => Value::Number(x.abs()),
            Value::Tensor(x) => Value::Tensor(x.abs()),
        }
    }
    fn clamp(&mut self, a: &Value, low: f64, high: f64) -> Value {
        match a {
            Value::Number(x) => Value::Number(x.max(low).min(high)),
            Value::Tensor(x) => Value::Tensor(x.clamp(low, high)),
        }
    }
    fn clamp_min(&mut self, a: &Value, low: f64) -> Value {
        match a {
            Value::Number(x) => Value::Number(x.max(low)),
            Value::Tensor(x) => Value::Tensor(x.clamp_min(low)),
        }
    }
    fn le(&mut self, a: &Value, b: &Value) -> Mask {
        match (a, b) {
            (Value::Tensor(x), Value::Number(y)) => Mask::Tensor(x.le(*y)),
            (Value::Number(x), Value::Tensor(y)) => Mask::Tensor(y.ge(*x)),
            _ => Tensors::comparison(a, b, |x, y| x <= y, |x, y| x.le_tensor(y)),
        }
    }
    fn lt(&mut self, a: &Value, b: &Value) -> Mask {
        match (a, b) {
            (Value::Tensor(x), Value::Number(y)) => Mask::Tensor(x.lt(*y)),
            (Value::Number(x), Value::Tensor(y)) => Mask::Tensor(y.gt(*x)),
            _ => Tensors::comparison(a, b, |x, y| x < y, |x, y| x.lt_tensor(y)),
        }
    }
    fn not(&mut self, a: &Mask) -> Mask {
        match a {
            Mask::Bool(x) => Mask::Bool(!x),
            Mask::Tensor(x) => Mask::Tensor(x.logical_not()),
        }
    }
    fn and(&mut self, a: &Mask, b: &Mask) -> Mask {
        match (a, b) {
            (Mask::Bool(x), Mask::Bool(y)) => Mask::Bool(*x && *y),
            (Mask::Bool(true), m) | (m, Mask::Bool(true)) => m.clone(),
            (Mask::Bool(false), _) | (_, Mask::Bool(false)) => Mask::Bool(false),
            (Mask::Tensor(x), Mask::Tensor(y)) => Mask::Tensor(x.logical_and(y)),
        }
    }
    fn select(&mut self, take: &Mask, a: &Value, b: &Value) -> Value {
        match (take, a, b) {
            (Mask::Bool(true), a, _) => a.clone(),
            (Mask::Bool(false), _, b) => b.clone(),
            (Mask::Tensor(m), Value::Tensor(x), Value::Tensor(y)) => Value::Tensor(x.where_self(m, y)),
            (Mask::Tensor(m), Value::Tensor(x), Value::Number(y)) => Value::Tensor(x.where_scalarother(m, *y)),
            (Mask::Tensor(m), Value::Number(x), Value::Tensor(y)) => Value::Tensor(Tensor::where_scalarself(m, *x, y)),
            (Mask::Tensor(m), Value::Number(x), Value::Number(y)) => Value::Tensor(Tensor::where_scalar(m, *x, *y)),
        }
    }
    fn select_mask(&mut self, take: &Mask, a: &Mask, b: &Mask) -> Mask {
        match (take, a, b) {
            (Mask::Bool(true), a, _) => a.clone(),
            (Mask::Bool(false), _, b) => b.clone(),
            (Mask::Tensor(m), a, b) => {
                let as_tensor = |mask: &Mask| match mask {
                    Mask::Tensor(t) => t.shallow_clone(),
                    Mask::Bool(value) => m.full_like(i64::from(*value)).to_kind(Kind::Bool),
                };
                Mask::Tensor(as_tensor(a).where_self(m, &as_tensor(b)))
            }
        }
    }
    fn indicator(&mut self, mask: &Mask) -> Value {
        match mask {
            Mask::Bool(x) => Value::Number(f64::from(u8::from(*x))),
            Mask::Tensor(x) => Value::Tensor(x.to_kind(Kind::Float)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU pooling kernels equal libtorch's separable `max_pool2d` pair in values and,
    /// on inputs full of ties, in which pixel receives the gradient; widths below and above
    /// the winner search's block of lanes (with a remainder) are both covered.
    #[test]
    fn pooling_kernel_matches_max_pool2d_including_ties() {
        for (x, radius) in [[2, 3, 9, 11], [2, 2, 13, 37]]
            .into_iter()
            .enumerate()
            .map(|(seed, shape)| crate::test_data::classes(seed as u64 + 3, &shape, 3).to_kind(Kind::Float))
            .flat_map(|x| [1u32, 2, 5].map(|radius| (x.copy(), radius)))
        {
            for erode in [false, true] {
                let k = 2 * radius as i64 + 1;
                let r = radius as i64;
                let dilate = |t: &Tensor| {
                    t.max_pool2d([k, 1], [1, 1], [r, 0], [1, 1], false).max_pool2d(
                        [1, k],
                        [1, 1],
                        [0, r],
                        [1, 1],
                        false,
                    )
                };
                let reference_input = x.copy().set_requires_grad(true);
                let reference = if erode { dilate(&reference_input.neg()).neg() } else { dilate(&reference_input) };
                let weights = crate::test_data::tensor(radius as u64, &reference.size(), 0.0, 1.0);
                (&reference * &weights).sum(Kind::Float).backward();
                let fast_input = x.copy().set_requires_grad(true);
                let fast = pool_tensor(&fast_input, radius, erode);
                (&fast * &weights).sum(Kind::Float).backward();
                assert_eq!(f64::try_from((&fast - &reference).abs().max()).unwrap(), 0.0, "values r={radius}");
                let no_grad = pool_tensor(&x, radius, erode);
                assert_eq!(f64::try_from((&no_grad - &reference).abs().max()).unwrap(), 0.0, "values r={radius}");
                // A different winner would move a whole weight (0..1); only the order in which
                // one pixel's contributions are summed may differ.
                let difference = f64::try_from((fast_input.grad() - reference_input.grad()).abs().max()).unwrap();
                assert!(difference < 1e-5, "gradients r={radius} erode={erode}: {difference}");
            }
        }
    }
}
