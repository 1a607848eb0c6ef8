//! Reverse mode over a relaxed module: the gradient program, `∂loss/∂logits` as a flat arena
//! of [`GradNode`]s that refer to the forward module's values. A printable stage
//! (`losscc check --emit grad`), emitted as ONNX by [`crate::onnx::emit_gradient`].
//!
//! One rewrite rule per forward node kind, each named in the dump (`grad.<kind>`); the
//! adjoint of a node is the sum of what its users contribute. Gradients flow only into nodes
//! that depend on the predictions ([`crate::analysis::prediction_dependent`]) and that the
//! root needs. The rules follow the conventions every back end uses, so the program equals
//! libtorch's autograd of the reference interpreter:
//! * curves: the hand-derived slope of [`crate::curve::math`] (libtorch's `clamp` and
//!   `clamp_min` conventions at the clamped ends, the earlier piece at a joint);
//! * pooling: the gradient goes to each output's winner, the first maximum of the separable
//!   column-then-row passes, as `max_pool2d` picks it (erosion: the first minimum);
//! * `any`: shared evenly by the classes that tie for the maximum, as `amax`'s is;
//! * division: zero-safe, as the forward (a zero denominator passes no gradient);
//! * comparisons are constant (their operands are detached); a filtered `mean` divides by
//!   `max(selected, 1)`; an undefined metric term, and an undefined root, pass none.

use crate::analysis;
use crate::ir::{CurveId, DivGuard, Handle, Node, RootKind, Shape};
use crate::modules::RelaxedModule;
use std::fmt::Write;

/// An index into a [`GradModule`]'s arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GradHandle(u32);

impl GradHandle {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl std::fmt::Display for GradHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "@{}", self.0)
    }
}

/// One node of the gradient program. `grad` operands are adjoints (earlier gradient nodes);
/// `Handle`s are forward values.
#[derive(Clone, Debug, PartialEq)]
pub enum GradNode {
    /// `∂loss/∂root`: −1 for a metric (`loss = 1 − root`), +1 for a loss; 0 where the root is
    /// undefined.
    Seed {
        root_kind: RootKind,
        root: Handle,
    },
    Add(GradHandle, GradHandle),
    Neg(GradHandle),
    /// `grad ⊙ value` (broadcasting).
    Scale {
        grad: GradHandle,
        value: Handle,
    },
    /// `grad / den'` where `den' = den (+ ε)` is not 0, else 0: the numerator's part of a
    /// zero-safe division.
    DivNumerator {
        grad: GradHandle,
        den: Handle,
        guard: DivGuard,
    },
    /// `−grad · num / den'²` where `den'` is not 0, else 0: the denominator's part.
    DivDenominator {
        grad: GradHandle,
        num: Handle,
        den: Handle,
        guard: DivGuard,
    },
    /// A broadcast undone: `grad` summed down to `shape` (over classes, or to one number).
    ReduceTo {
        grad: GradHandle,
        shape: Shape,
    },
    /// A count's adjoint spread over the pixels of the set it counted (`input`).
    Spread {
        grad: GradHandle,
        input: Handle,
    },
    /// `grad ⊙ g'(input)` for a curve.
    CurveSlope {
        grad: GradHandle,
        input: Handle,
        curve: CurveId,
    },
    /// Square-window pooling of `input` undone: each output's adjoint to its winner.
    Pool {
        grad: GradHandle,
        input: Handle,
        radius: u32,
        erode: bool,
    },
    /// `any` undone: the adjoint shared by the classes equal to the maximum.
    AnyClass {
        grad: GradHandle,
        input: Handle,
        output: Handle,
    },
    /// A class slice undone: zeros around `grad` to the width of `input`.
    Unslice {
        grad: GradHandle,
        input: Handle,
        start: usize,
    },
    /// A mean undone: `grad / C'` to every class, or `grad ⊙ mask / max(Σ mask, 1)`.
    Mean {
        grad: GradHandle,
        value: Handle,
        filter: Option<Handle>,
    },
    /// A sum undone: `grad` to every class, or `grad ⊙ mask`.
    Sum {
        grad: GradHandle,
        value: Handle,
        filter: Option<Handle>,
    },
    /// A metric term undone: `grad` where the term's value is defined, else 0.
    Term {
        grad: GradHandle,
        value: Handle,
    },
    /// The softmax undone: `p ⊙ (grad − Σ_c p ⊙ grad)`, into the logits.
    Softmax {
        grad: GradHandle,
        softmax: Handle,
    },
    /// The summed cross-entropy undone: `grad ⊙ (softmax(logits) − one-hot) ⊙ valid`.
    NllSum {
        grad: GradHandle,
    },
    /// No gradient reaches the logits.
    Zeros,
}

impl GradNode {
    fn mnemonic(&self) -> &'static str {
        match self {
            GradNode::Seed { .. } => "seed",
            GradNode::Add(..) => "add",
            GradNode::Neg(..) => "neg",
            GradNode::Scale { .. } => "scale",
            GradNode::DivNumerator { .. } => "div_num",
            GradNode::DivDenominator { .. } => "div_den",
            GradNode::ReduceTo { .. } => "reduce_to",
            GradNode::Spread { .. } => "spread",
            GradNode::CurveSlope { .. } => "curve_slope",
            GradNode::Pool { .. } => "unpool",
            GradNode::AnyClass { .. } => "unany",
            GradNode::Unslice { .. } => "unslice",
            GradNode::Mean { .. } => "unmean",
            GradNode::Sum { .. } => "unsum",
            GradNode::Term { .. } => "unterm",
            GradNode::Softmax { .. } => "softmax_backward",
            GradNode::NllSum { .. } => "nll_backward",
            GradNode::Zeros => "zeros",
        }
    }
}

/// The gradient program of a relaxed module.
#[derive(Clone, Debug)]
pub struct GradModule {
    pub nodes: Vec<GradNode>,
    /// The shape of each gradient node's value.
    pub shapes: Vec<Shape>,
    /// The rule that built each node, and the forward node whose adjoint it belongs to.
    pub rules: Vec<&'static str>,
    pub of: Vec<Option<Handle>>,
    /// `∂loss/∂logits`, `[N, C, H, W]`.
    pub output: GradHandle,
}

/// Why a module has no gradient program.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GradError {
    #[error("`{0}` does not depend on the predictions `P` (nor on the cross-entropy `ce`), so its gradient with respect to the logits is zero everywhere; a gradient graph would say nothing")]
    NoPredictions(String),
}

struct Builder {
    module: GradModule,
}

impl Builder {
    fn add(&mut self, node: GradNode, shape: Shape, rule: &'static str, of: Option<Handle>) -> GradHandle {
        let handle = GradHandle(self.module.nodes.len() as u32);
        self.module.nodes.push(node);
        self.module.shapes.push(shape);
        self.module.rules.push(rule);
        self.module.of.push(of);
        handle
    }
}

/// Differentiate `module`'s loss with respect to the logits.
pub fn differentiate(module: &RelaxedModule) -> Result<GradModule, GradError> {
    let on_pred = module.prediction_dependent();
    if !on_pred[module.root.index()] {
        return Err(GradError::NoPredictions(module.name.clone()));
    }
    let reaches_root = analysis::needed(module, &[module.root], |_| false);
    let flows = |h: Handle| on_pred[h.index()] && reaches_root[h.index()];
    let mut builder = Builder {
        module: GradModule {
            nodes: Vec::new(),
            shapes: Vec::new(),
            rules: Vec::new(),
            of: Vec::new(),
            output: GradHandle(0),
        },
    };
    let mut adjoint: Vec<Option<GradHandle>> = vec![None; module.len()];
    let logits_shape = Shape::ClassPixels(crate::ir::ClassRange::ALL);
    let mut logits: Option<GradHandle> = None;
    adjoint[module.root.index()] = Some(builder.add(
        GradNode::Seed { root_kind: module.root_kind, root: module.root },
        Shape::Scalar,
        "grad.root",
        Some(module.root),
    ));
    // Add `contribution` to the adjoint of `target` (when gradients flow there).
    let contribute =
        |builder: &mut Builder, adjoint: &mut Vec<Option<GradHandle>>, target: Handle, contribution: GradHandle| {
            if !flows(target) {
                return;
            }
            let shape = module.shape(target);
            adjoint[target.index()] = Some(match adjoint[target.index()] {
                None => contribution,
                Some(previous) => builder.add(GradNode::Add(previous, contribution), shape, "grad.sum", Some(target)),
            });
        };
    // The adjoint of `h`, brought to the shape of its operand `operand` (a broadcast undone).
    let reduce = |builder: &mut Builder, grad: GradHandle, from: Handle, operand: Handle| {
        let (from_shape, to_shape) = (module.shape(from), module.shape(operand));
        if from_shape == to_shape {
            grad
        } else {
            builder.add(GradNode::ReduceTo { grad, shape: to_shape }, to_shape, "grad.broadcast", Some(operand))
        }
    };
    for handle in module.handles().rev() {
        let Some(grad) = adjoint[handle.index()] else { continue };
        let node = module.node(handle);
        let shape = |h: Handle| module.shape(h);
        match node {
            Node::Softmax => {
                let g = builder.add(GradNode::Softmax { grad, softmax: handle }, logits_shape, "grad.softmax", None);
                logits = Some(match logits {
                    None => g,
                    Some(previous) => builder.add(GradNode::Add(previous, g), logits_shape, "grad.sum", None),
                });
            }
            Node::NllSum => {
                let g = builder.add(GradNode::NllSum { grad }, logits_shape, "grad.nll_sum", None);
                logits = Some(match logits {
                    None => g,
                    Some(previous) => builder.add(GradNode::Add(previous, g), logits_shape, "grad.sum", None),
                });
            }
            Node::Curve { input, curve } => {
                let g = builder.add(
                    GradNode::CurveSlope { grad, input: *input, curve: *curve },
                    shape(*input),
                    "grad.curve",
                    Some(*input),
                );
                contribute(&mut builder, &mut adjoint, *input, g);
            }
            Node::Erode { input, radius } | Node::Dilate { input, radius } => {
                let erode = matches!(node, Node::Erode { .. });
                let g = builder.add(
                    GradNode::Pool { grad, input: *input, radius: *radius, erode },
                    shape(*input),
                    "grad.pool",
                    Some(*input),
                );
                contribute(&mut builder, &mut adjoint, *input, g);
            }
            Node::AnyClass(input) => {
                let g = builder.add(
                    GradNode::AnyClass { grad, input: *input, output: handle },
                    shape(*input),
                    "grad.any",
                    Some(*input),
                );
                contribute(&mut builder, &mut adjoint, *input, g);
            }
            Node::Slice { input, start, .. } => {
                let g = builder.add(
                    GradNode::Unslice { grad, input: *input, start: *start },
                    shape(*input),
                    "grad.slice",
                    Some(*input),
                );
                contribute(&mut builder, &mut adjoint, *input, g);
            }
            Node::Count(input) => {
                let g =
                    builder.add(GradNode::Spread { grad, input: *input }, shape(*input), "grad.count", Some(*input));
                contribute(&mut builder, &mut adjoint, *input, g);
            }
            Node::Add(a, b) => {
                for operand in [*a, *b] {
                    if flows(operand) {
                        let g = reduce(&mut builder, grad, handle, operand);
                        contribute(&mut builder, &mut adjoint, operand, g);
                    }
                }
            }
            Node::Sub(a, b) => {
                if flows(*a) {
                    let g = reduce(&mut builder, grad, handle, *a);
                    contribute(&mut builder, &mut adjoint, *a, g);
                }
                if flows(*b) {
                    let negated = builder.add(GradNode::Neg(grad), shape(handle), "grad.sub", Some(*b));
                    let g = reduce(&mut builder, negated, handle, *b);
                    contribute(&mut builder, &mut adjoint, *b, g);
                }
            }
            Node::Mul(a, b) => {
                for (operand, other) in [(*a, *b), (*b, *a)] {
                    if flows(operand) {
                        let scaled = builder.add(
                            GradNode::Scale { grad, value: other },
                            shape(handle),
                            "grad.mul",
                            Some(operand),
                        );
                        let g = reduce(&mut builder, scaled, handle, operand);
                        contribute(&mut builder, &mut adjoint, operand, g);
                    }
                }
            }
            Node::Div { num, den, guard } => {
                if flows(*num) {
                    let part = builder.add(
                        GradNode::DivNumerator { grad, den: *den, guard: *guard },
                        shape(handle),
                        "grad.div",
                        Some(*num),
                    );
                    let g = reduce(&mut builder, part, handle, *num);
                    contribute(&mut builder, &mut adjoint, *num, g);
                }
                if flows(*den) {
                    let part = builder.add(
                        GradNode::DivDenominator { grad, num: *num, den: *den, guard: *guard },
                        shape(handle),
                        "grad.div",
                        Some(*den),
                    );
                    let g = reduce(&mut builder, part, handle, *den);
                    contribute(&mut builder, &mut adjoint, *den, g);
                }
            }
            Node::Neg(a) => {
                let g = builder.add(GradNode::Neg(grad), shape(*a), "grad.neg", Some(*a));
                contribute(&mut builder, &mut adjoint, *a, g);
            }
            Node::Mean { value, filter } => {
                let g = builder.add(
                    GradNode::Mean { grad, value: *value, filter: *filter },
                    shape(*value),
                    "grad.mean",
                    Some(*value),
                );
                contribute(&mut builder, &mut adjoint, *value, g);
            }
            Node::Sum { value, filter } => {
                let g = builder.add(
                    GradNode::Sum { grad, value: *value, filter: *filter },
                    shape(*value),
                    "grad.sum_classes",
                    Some(*value),
                );
                contribute(&mut builder, &mut adjoint, *value, g);
            }
            Node::Term { value, .. } => {
                let g = builder.add(GradNode::Term { grad, value: *value }, shape(*value), "grad.term", Some(*value));
                contribute(&mut builder, &mut adjoint, *value, g);
            }
            // Comparisons are constant (detached); inputs without predictions get nothing.
            Node::Compare { .. }
            | Node::Labels
            | Node::Valid
            | Node::Border { .. }
            | Node::Const(_)
            | Node::Weights { .. } => {}
            Node::Pred
            | Node::CurveTag { .. }
            | Node::Scope { .. }
            | Node::And(..)
            | Node::Or(..)
            | Node::Xor(..)
            | Node::Not(..) => unreachable!("a validated relaxed module holds no exact node"),
        }
    }
    builder.module.output = match logits {
        Some(output) => output,
        None => builder.add(GradNode::Zeros, logits_shape, "grad.zeros", None),
    };
    Ok(builder.module)
}

/// The gradient program as text: one line per node with its shape, operands and rule.
pub fn dump(grad: &GradModule, module: &RelaxedModule) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "gradient of {} ({} nodes)", module.name, grad.nodes.len());
    for (index, node) in grad.nodes.iter().enumerate() {
        let operands = match node {
            GradNode::Seed { root_kind, root } => format!("{root_kind:?} root {root}"),
            GradNode::Add(a, b) => format!("{a}, {b}"),
            GradNode::Neg(a) => a.to_string(),
            GradNode::Scale { grad, value } => format!("{grad} × {value}"),
            GradNode::DivNumerator { grad, den, guard } => format!("{grad} / {den} guard={guard:?}"),
            GradNode::DivDenominator { grad, num, den, guard } => format!("{grad} num={num} den={den} guard={guard:?}"),
            GradNode::ReduceTo { grad, .. } => grad.to_string(),
            GradNode::Spread { grad, input } => format!("{grad} over {input}"),
            GradNode::CurveSlope { grad, input, curve } => format!("{grad} × g'#{}({input})", curve.0),
            GradNode::Pool { grad, input, radius, erode } => {
                format!("{grad} to the winners of {} {input} r={radius}", if *erode { "erode" } else { "dilate" })
            }
            GradNode::AnyClass { grad, input, output } => format!("{grad} to the maxima of {input} (= {output})"),
            GradNode::Unslice { grad, input, start } => format!("{grad} into {input} from class {start}"),
            GradNode::Mean { grad, value, filter } | GradNode::Sum { grad, value, filter } => match filter {
                Some(filter) => format!("{grad} over {value} where {filter}"),
                None => format!("{grad} over {value}"),
            },
            GradNode::Term { grad, value } => format!("{grad} if {value} is defined"),
            GradNode::Softmax { grad, softmax } => format!("{grad} through {softmax}"),
            GradNode::NllSum { grad } => grad.to_string(),
            GradNode::Zeros => String::new(),
        };
        let of = grad.of[index].map_or("logits".to_string(), |h| format!("∂{h}"));
        let shape = crate::print::shape_text(grad.shapes[index]);
        let _ = writeln!(out, "  @{index}: {shape} = {} {operands}  [{}] → {of}", node.mnemonic(), grad.rules[index]);
    }
    let _ = writeln!(out, "  output ∂loss/∂logits = {}", grad.output);
    out
}
