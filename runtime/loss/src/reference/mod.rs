//! The reference back end: interprets IR modules op by op on libtorch tensors, on CPU or
//! CUDA, in float32 or float64.
//!
//! * [`surrogate`] runs a relaxed module end to end with autograd: the surrogate loss, and the
//!   path every faster one is tested against. [`run_nodes`] runs part of it (the fused kernel
//!   runs the few per-class numbers above its counts this way).
//! * [`exact::exact_counts`] runs an exact module up to its accumulators (counts, summed
//!   cross-entropy), returned as float64 numbers for [`compiler::accumulate`] to finish.
//!
//! Guarantees: on a [`Batch`] (inputs that passed [`crate::inputs::check`]) every value is
//! finite: curve square roots are clamped, divisions are zero-safe after their guard, and a
//! reduction over no class yields an undefined marker instead of NaN.

pub(crate) mod exact;
pub(crate) mod tensors;

use crate::error::LossError;
use crate::inputs::Batch;
use compiler::analysis;
use compiler::curve::Curve;
use compiler::ir::{DivGuard, Handle, Node, RootKind, Shape, SURROGATE_EPS};
use compiler::RelaxedModule;
use tch::{Reduction, Tensor};
use tensors::{apply_curve, compare, count_dims, one_hot, pool_tensor, slice, valid, zero_safe_div};

/// The result of running a relaxed module.
pub struct Surrogate {
    /// The loss: `1 − metric` for metrics, the expression for losses; 0 when undefined.
    pub loss: Tensor,
    /// The root value (surrogate metric or loss expression).
    pub value: Tensor,
    /// False when no class qualified for a filtered mean: the loss is 0 with zero gradient.
    pub defined: bool,
    /// Metric terms of a loss that were undefined for this batch (they contribute 0).
    pub undefined_terms: Vec<String>,
    /// Reported values (per-class values, terms), detached.
    pub reports: Vec<(String, Tensor)>,
}

/// Values of a relaxed module's nodes, as far as they were needed.
pub(crate) struct NodeValues {
    pub values: Vec<Option<Tensor>>,
    pub undefined: Vec<bool>,
    pub undefined_terms: Vec<String>,
}

/// Run the nodes of a relaxed module that `wanted` depends on, with autograd. Nodes with a
/// `provided` value take it instead of being computed (the fused kernel provides counts).
pub(crate) fn run_nodes(
    module: &RelaxedModule,
    curves: &[Curve],
    batch: &Batch<'_>,
    mut provided: Vec<Option<Tensor>>,
    wanted: &[Handle],
) -> NodeValues {
    let need = analysis::needed(module, wanted, |h| provided[h.index()].is_some());
    let (logits, labels) = (batch.logits, batch.labels);
    let classes = logits.size()[1];
    let kind = logits.kind();
    let ignore = batch.ignore_label;
    let sigmoid = module.predictions.is_sigmoid();
    let mut values: Vec<Option<Tensor>> = Vec::with_capacity(module.len());
    let mut undefined: Vec<bool> = Vec::with_capacity(module.len());
    let mut undefined_terms = Vec::new();
    for handle in module.handles() {
        let node = module.node(handle);
        let mut is_undefined = node.operands().iter().any(|o| undefined[o.index()]);
        if let Some(value) = provided[handle.index()].take() {
            values.push(Some(value));
            undefined.push(is_undefined);
            continue;
        }
        if !need[handle.index()] {
            values.push(None);
            undefined.push(is_undefined);
            continue;
        }
        let v = |h: &Handle| values[h.index()].as_ref().expect("operands come first");
        let value = match node {
            Node::Softmax if sigmoid => logits.sigmoid(),
            Node::Softmax => logits.softmax(1, kind),
            Node::Labels => match batch.soft_labels {
                Some(soft) => soft.to_kind(kind),
                None => one_hot(labels, classes, kind, ignore),
            },
            Node::Valid => valid(labels, kind, ignore),
            Node::Border { radius } => tensors::border(labels, kind, *radius),
            Node::Const(c) => Tensor::from(c.get()).to_kind(kind).to_device(logits.device()),
            Node::Weights { values, .. } => {
                let values: Vec<f64> = values.iter().map(|v| v.get()).collect();
                Tensor::from_slice(&values).to_kind(kind).to_device(logits.device())
            }
            Node::Curve { input, curve } => apply_curve(v(input), &curves[curve.0 as usize]),
            Node::Erode { input, radius } => pool_tensor(v(input), *radius, true),
            Node::Dilate { input, radius } => pool_tensor(v(input), *radius, false),
            Node::AnyClass(input) => v(input).amax([1].as_slice(), true),
            Node::Slice { input, start, end } => slice(v(input), module.shape(*input), *start, *end),
            Node::Count(input) => match module.shape(*input) {
                Shape::ClassPixels(_) => v(input).sum_dim_intlist(count_dims(v(input)).as_slice(), false, kind),
                Shape::Pixels | Shape::Classes(_) | Shape::Scalar => v(input).sum(kind),
            },
            Node::NllSum if sigmoid => {
                let targets = batch.soft_labels.expect("sigmoid inputs carry per-channel targets");
                bce_sum(logits, &targets.to_kind(kind), &valid(labels, kind, ignore))
            }
            Node::NllSum => match batch.soft_labels {
                // Soft labels: −Σ p·log softmax, summed over pixels (an ignored pixel's p is 0).
                Some(soft) => -(logits.log_softmax(1, kind) * soft.to_kind(kind)).sum(kind),
                None => logits.cross_entropy_loss::<Tensor>(labels, None, Reduction::Sum, ignore_index(ignore), 0.0),
            },
            Node::Add(a, b) => v(a) + v(b),
            Node::Sub(a, b) => v(a) - v(b),
            Node::Mul(a, b) => v(a) * v(b),
            Node::Div { num, den, guard } => match guard {
                DivGuard::Auto => zero_safe_div(v(num), &(v(den) + SURROGATE_EPS)),
                DivGuard::Explicit => zero_safe_div(v(num), v(den)),
            },
            Node::Neg(a) => v(a).neg(),
            Node::Compare { op, lhs, rhs } => compare(*op, &v(lhs).detach(), &v(rhs).detach()).to_kind(kind),
            Node::Mean { value, filter } => match filter {
                None => v(value).mean(kind),
                Some(mask) => {
                    let mask = v(mask);
                    let selected = mask.sum(kind);
                    if selected.double_value(&[]) <= 0.0 {
                        is_undefined = true;
                        (v(value) * mask).sum(kind)
                    } else {
                        (v(value) * mask).sum(kind) / selected
                    }
                }
            },
            Node::Sum { value, filter } => match filter {
                None => v(value).sum(kind),
                Some(mask) => (v(value) * v(mask)).sum(kind),
            },
            Node::Term { value, name } => {
                if is_undefined {
                    // An undefined term counts as a perfect score: `1 - term` adds nothing.
                    is_undefined = false;
                    undefined_terms.push(name.clone());
                    v(value).detach().zeros_like() + 1.0
                } else {
                    v(value).shallow_clone()
                }
            }
            Node::Pred
            | Node::CurveTag { .. }
            | Node::Scope { .. }
            | Node::And(..)
            | Node::Or(..)
            | Node::Xor(..)
            | Node::Not(..) => unreachable!("a validated relaxed module holds no exact node"),
        };
        values.push(Some(value));
        undefined.push(is_undefined);
    }
    NodeValues { values, undefined, undefined_terms }
}

/// The binary cross-entropy of a sigmoid model, averaged over channels and summed over the
/// `valid` pixels (`[N, 1, ...]`): what `ce` means for sigmoid predictions.
pub(crate) fn bce_sum(logits: &Tensor, targets: &Tensor, valid: &Tensor) -> Tensor {
    let elementwise = logits.binary_cross_entropy_with_logits::<Tensor>(targets, None, None, Reduction::None);
    (elementwise.mean_dim([1i64].as_slice(), true, logits.kind()) * valid).sum(logits.kind())
}

/// The `ignore_index` for libtorch's cross-entropy: the ignore label (libtorch skips it even
/// inside `0..C`, as ignored pixels belong to no class), or libtorch's own `-100`, which no
/// checked label has.
pub(crate) fn ignore_index(ignore: Option<i64>) -> i64 {
    ignore.unwrap_or(-100)
}

/// Run a relaxed module with autograd, op by op (the reference path).
pub(crate) fn surrogate(module: &RelaxedModule, curves: &[Curve], batch: &Batch<'_>) -> Surrogate {
    let provided = (0..module.len()).map(|_| None).collect();
    let mut wanted = vec![module.root];
    wanted.extend(module.reports.iter().map(|r| r.value));
    finish_surrogate(module, run_nodes(module, curves, batch, provided, &wanted))
}

/// Assemble the loss from node values: `1 − metric` or the loss expression, 0 if undefined.
pub(crate) fn finish_surrogate(module: &RelaxedModule, node_values: NodeValues) -> Surrogate {
    let NodeValues { mut values, undefined, undefined_terms } = node_values;
    let root = values[module.root.index()].take().expect("the root is always wanted");
    let defined = !undefined[module.root.index()];
    let loss = if !defined {
        root.detach().zeros_like() + &root * 0.0
    } else {
        match module.root_kind {
            RootKind::Metric => root.ones_like() - &root,
            RootKind::Loss => root.shallow_clone(),
        }
    };
    let reports = module
        .reports
        .iter()
        .filter_map(|r| values[r.value.index()].as_ref().map(|t| (r.name.clone(), t.detach())))
        .collect();
    Surrogate { loss, value: root, defined, undefined_terms, reports }
}

/// A libtorch failure as a [`LossError`] (for conversions that return one).
impl From<tch::TchError> for LossError {
    fn from(error: tch::TchError) -> LossError {
        LossError::Backend(error.to_string())
    }
}
