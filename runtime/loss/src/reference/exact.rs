//! The exact interpreter: an exact module up to its accumulators, on argmax predictions.

use super::ignore_index;
use super::tensors::{border, count_dims, one_hot, pool_tensor, slice, valid, values};
use crate::error::LossError;
use crate::inputs::Batch;
use compiler::ir::{Handle, Node, Shape};
use compiler::ExactModule;
use tch::{Kind, Reduction, Tensor};

/// Run an exact module up to its accumulators; returns `(node, values)` per accumulator, in
/// [`ExactModule::accumulators`] order.
pub(crate) fn exact_counts(module: &ExactModule, batch: &Batch<'_>) -> Result<Vec<(Handle, Vec<f64>)>, LossError> {
    let (logits, labels, ignore) = (batch.logits, batch.labels, batch.ignore_label);
    let classes = logits.size()[1];
    let set_kind = Kind::Float;
    let mut values_of: Vec<Option<Tensor>> = (0..module.len()).map(|_| None).collect();
    let mut out = Vec::new();
    let _guard = tch::no_grad_guard();
    let pixel = |handle: Handle| matches!(module.shape(handle), Shape::Pixels | Shape::ClassPixels(_));
    for handle in module.handles() {
        let node = module.node(handle);
        let v = |h: &Handle| values_of[h.index()].as_ref().expect("pixel operands come first");
        let value = match node {
            Node::Pred => Some(match module.predictions.logit_cut() {
                Some(cut) => logits.gt(cut).to_kind(set_kind),
                None => one_hot(&logits.argmax(1, false), classes, set_kind, None),
            }),
            Node::Labels => Some(match (module.predictions.is_sigmoid(), batch.soft_labels) {
                // Per-channel targets (0 at ignored pixels), above one half.
                (true, Some(targets)) => targets.gt(0.5).to_kind(set_kind),
                _ => one_hot(labels, classes, set_kind, ignore),
            }),
            Node::Valid => Some(valid(labels, set_kind, ignore)),
            Node::Border { radius } => Some(border(labels, set_kind, *radius)),
            Node::CurveTag { input, .. } | Node::Scope { input, .. } => Some(v(input).shallow_clone()),
            Node::And(a, b) if pixel(handle) => Some(v(a) * v(b)),
            Node::Or(a, b) if pixel(handle) => Some(v(a).maximum(v(b))),
            Node::Xor(a, b) if pixel(handle) => Some(v(a).ne_tensor(v(b)).to_kind(set_kind)),
            Node::Not(a) if pixel(handle) => Some(v(a).ones_like() - v(a)),
            Node::Slice { input, start, end } if pixel(handle) => {
                Some(slice(v(input), module.shape(*input), *start, *end))
            }
            Node::Erode { input, radius } => Some(pool_tensor(v(input), *radius, true)),
            Node::Dilate { input, radius } => Some(pool_tensor(v(input), *radius, false)),
            Node::AnyClass(input) => Some(v(input).amax([1].as_slice(), true)),
            Node::Count(input) => {
                let counted = match module.shape(*input) {
                    Shape::ClassPixels(_) => {
                        v(input).sum_dim_intlist(count_dims(v(input)).as_slice(), false, Kind::Double)
                    }
                    Shape::Pixels | Shape::Classes(_) | Shape::Scalar => v(input).sum(Kind::Double).reshape([1]),
                };
                out.push((handle, values::<f64>(&counted.to_device(tch::Device::Cpu))?));
                None
            }
            Node::NllSum if module.predictions.is_sigmoid() => {
                let targets = batch.soft_labels.expect("sigmoid inputs carry per-channel targets");
                let logits = logits.to_kind(Kind::Double);
                let hard = targets.gt(0.5).to_kind(Kind::Double);
                let nll = super::bce_sum(&logits, &hard, &valid(labels, Kind::Double, ignore));
                out.push((handle, values::<f64>(&nll.to_device(tch::Device::Cpu))?));
                None
            }
            Node::NllSum => {
                let nll = logits.to_kind(Kind::Double).cross_entropy_loss::<Tensor>(
                    labels,
                    None,
                    Reduction::Sum,
                    ignore_index(ignore),
                    0.0,
                );
                out.push((handle, values::<f64>(&nll.to_device(tch::Device::Cpu))?));
                None
            }
            // Logical operators and slices of class masks, and every number above the
            // accumulators, are finished in float64 by the compiler.
            Node::And(..)
            | Node::Or(..)
            | Node::Xor(..)
            | Node::Not(..)
            | Node::Slice { .. }
            | Node::Const(_)
            | Node::Weights { .. }
            | Node::Add(..)
            | Node::Sub(..)
            | Node::Mul(..)
            | Node::Div { .. }
            | Node::Neg(_)
            | Node::Compare { .. }
            | Node::Mean { .. }
            | Node::Sum { .. }
            | Node::Term { .. } => None,
            Node::Softmax | Node::Curve { .. } => unreachable!("a validated exact module holds no surrogate node"),
        };
        values_of[handle.index()] = value;
    }
    Ok(out)
}
