//! The loss graph: a relaxed module as ONNX nodes, output `loss`.

use super::emitter::{attr_int, attr_ints, value_info, Emitter};
use super::{compare, count, model, nll_sum, slice, CurveSource, EmitOptions, OnnxError};
use crate::curve::math::{self, Piece, Strategy};
use crate::curve::Curve;
use crate::ir::{DivGuard, Handle, Node, RootKind, SURROGATE_EPS};
use crate::Compiled;
use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::ModelProto;

/// What the loss graph computed: every IR node's value, and the flags that say whether a
/// filtered mean selected any class (the gradient graph reads both).
pub(crate) struct Forward {
    pub values: Vec<Option<String>>,
    /// A boolean scalar per node: whether its value is defined (absent when it always is).
    pub defined: Vec<Option<String>>,
    /// The loss: `1 − root` for a metric, the root for a loss; 0 when undefined.
    pub loss: String,
}

/// Emit every node of the relaxed module, then the loss.
pub(crate) fn forward(
    emitter: &mut Emitter,
    compiled: &Compiled,
    curves: &[Curve],
    source: CurveSource,
) -> Result<Forward, OnnxError> {
    let module = &compiled.relaxed;
    if curves.len() != compiled.manifest().curves.len() {
        return Err(OnnxError::Curves { expected: compiled.manifest().curves.len(), got: curves.len() });
    }
    let mut values: Vec<Option<String>> = vec![None; module.len()];
    let mut defined: Vec<Option<String>> = vec![None; module.len()];
    for handle in module.handles() {
        let node = module.node(handle);
        emitter.at(
            format!("IR {handle} `{}` from rule {}", node.mnemonic(), module.rules[handle.index()]),
            format!("n{}_{}", handle.index(), node.mnemonic()),
        );
        let v = |h: &Handle| values[h.index()].clone().expect("operands come first");
        // Definedness (a bool scalar) flows from operands unless a node resets it.
        let operand_flags: Vec<String> = node.operands().iter().filter_map(|o| defined[o.index()].clone()).collect();
        let mut flag = operand_flags.first().cloned();
        for other in operand_flags.iter().skip(1) {
            let previous = flag.take().expect("set above");
            flag = Some(emitter.op("And", &[&previous, other], vec![]));
        }
        let out = match node {
            Node::Softmax if emitter.predictions.is_sigmoid() => emitter.op("Sigmoid", &["logits"], vec![]),
            Node::Softmax => emitter.op("Softmax", &["logits"], vec![attr_int("axis", 1)]),
            Node::Labels => emitter.one_hot_labels(),
            Node::Valid => emitter.valid(),
            Node::Border { radius } => emitter.border(*radius),
            Node::Const(c) => emitter.float(c.get()),
            Node::Weights { values, .. } => {
                let values: Vec<f64> = values.iter().map(|v| v.get()).collect();
                emitter.floats(&values)
            }
            Node::Curve { input, curve } => {
                let index = curve.0 as usize;
                let pieces = match source {
                    CurveSource::Baked => curves[index].segments().iter().map(|s| Piece::known(emitter, s)).collect(),
                    CurveSource::Input => {
                        let offset: usize = curves[..index].iter().map(|c| c.flat().len()).sum();
                        input_pieces(emitter, offset, curves[index].pieces())
                    }
                };
                math::eval(emitter, &v(input), &pieces, Strategy::EachPiece, false).0
            }
            Node::Erode { input, radius } => emitter.pool(&v(input), *radius, true),
            Node::Dilate { input, radius } => emitter.pool(&v(input), *radius, false),
            Node::AnyClass(input) => {
                emitter.op("ReduceMax", &[&v(input)], vec![attr_ints("axes", &[1]), attr_int("keepdims", 1)])
            }
            Node::Slice { input, start, end } => slice(emitter, &v(input), module.shape(*input), *start, *end),
            Node::Count(input) => count(emitter, &v(input), module.shape(*input)),
            Node::NllSum => nll_sum(emitter),
            Node::Add(a, b) => emitter.op("Add", &[&v(a), &v(b)], vec![]),
            Node::Sub(a, b) => emitter.op("Sub", &[&v(a), &v(b)], vec![]),
            Node::Mul(a, b) => emitter.op("Mul", &[&v(a), &v(b)], vec![]),
            Node::Div { num, den, guard } => {
                let den = guarded_denominator(emitter, &v(den), *guard);
                zero_safe_division(emitter, &v(num), &den).0
            }
            Node::Neg(a) => emitter.op("Neg", &[&v(a)], vec![]),
            Node::Compare { op, lhs, rhs } => compare(emitter, *op, &v(lhs), &v(rhs)),
            Node::Mean { value, filter } => match filter {
                None => emitter.over_classes("ReduceMean", &v(value)),
                Some(mask) => {
                    let mask = v(mask);
                    let product = emitter.op("Mul", &[&v(value), &mask], vec![]);
                    let total = emitter.over_classes("ReduceSum", &product);
                    let (selected, denominator) = emitter.mask_count(&mask);
                    let zero = emitter.float(0.0);
                    let any = emitter.shared(&format!("any:{mask}"), |e| e.op("Greater", &[&selected, &zero], vec![]));
                    flag = Some(match flag {
                        None => any,
                        Some(previous) => emitter.op("And", &[&previous, &any], vec![]),
                    });
                    emitter.op("Div", &[&total, &denominator], vec![])
                }
            },
            Node::Sum { value, filter } => {
                let product = match filter {
                    None => v(value),
                    Some(mask) => emitter.op("Mul", &[&v(value), &v(mask)], vec![]),
                };
                emitter.over_classes("ReduceSum", &product)
            }
            Node::Term { value, .. } => match flag.take() {
                None => emitter.op("Identity", &[&v(value)], vec![]),
                Some(ok) => {
                    // An undefined term counts as a perfect score, like the tch loss.
                    let one = emitter.float(1.0);
                    emitter.op("Where", &[&ok, &v(value), &one], vec![])
                }
            },
            Node::Pred
            | Node::CurveTag { .. }
            | Node::Scope { .. }
            | Node::And(..)
            | Node::Or(..)
            | Node::Xor(..)
            | Node::Not(..) => unreachable!("a validated relaxed module holds no exact node"),
        };
        values[handle.index()] = Some(out);
        defined[handle.index()] = flag;
    }
    emitter.at("loss from the root".into(), "loss".into());
    let root = values[module.root.index()].clone().expect("root emitted");
    let loss = match module.root_kind {
        RootKind::Metric => {
            let one = emitter.float(1.0);
            emitter.op("Sub", &[&one, &root], vec![])
        }
        RootKind::Loss => root.clone(),
    };
    let root_defined = defined[module.root.index()].clone();
    let loss = match &root_defined {
        None => loss,
        Some(ok) => {
            let zero = emitter.float(0.0);
            let nothing = emitter.op("Mul", &[&root, &zero], vec![]);
            emitter.op("Where", &[ok, &loss, &nothing], vec![])
        }
    };
    // Per image: the mean of the images' losses, over the images where it is defined.
    let loss = if emitter.per_image { image_mean(emitter, &loss, root_defined.as_deref()) } else { loss };
    Ok(Forward { values, defined, loss })
}

/// The mean of per-image values `[N, 1]` over the images where `defined` (`[N, 1]` bool)
/// holds, 0 when it holds nowhere; over every image without it.
fn image_mean(emitter: &mut Emitter, values: &str, defined: Option<&str>) -> String {
    let weights = image_weights(emitter, values, defined);
    let weighted = emitter.op("Mul", &[values, &weights], vec![]);
    emitter.op("ReduceSum", &[&weighted], vec![attr_int("keepdims", 0)])
}

/// Each image's share of a per-image mean (`[N, 1]`): `1 / images` for the images where
/// `defined` holds (all of them without it), 0 elsewhere. It is also the gradient's seed.
pub(crate) fn image_weights(emitter: &mut Emitter, values: &str, defined: Option<&str>) -> String {
    let zero = emitter.float(0.0);
    let one = emitter.float(1.0);
    let zeros = emitter.op("Mul", &[values, &zero], vec![]);
    let ones = emitter.op("Add", &[&zeros, &one], vec![]);
    let counted = match defined {
        Some(ok) => emitter.op("Where", &[ok, &ones, &zeros], vec![]),
        None => ones,
    };
    let images = emitter.op("ReduceSum", &[&counted], vec![attr_int("keepdims", 0)]);
    let divisor = emitter.op("Max", &[&images, &one], vec![]);
    emitter.op("Div", &[&counted, &divisor], vec![])
}

/// The curve pieces read from the `curves` input at `offset` (flat control points).
pub(crate) fn input_pieces(emitter: &mut Emitter, offset: usize, pieces: usize) -> Vec<Piece<String, String>> {
    let coordinate = |emitter: &mut Emitter, index: usize| {
        let at = emitter.ints(&[(offset + index) as i64], true);
        emitter.op("Gather", &["curves", &at], vec![attr_int("axis", 0)])
    };
    // Points: (0,0), the 2k-1 free points, (1,1).
    let mut points: Vec<[String; 2]> = Vec::with_capacity(2 * pieces + 1);
    for point in 0..2 * pieces - 1 {
        points.push([coordinate(emitter, 2 * point), coordinate(emitter, 2 * point + 1)]);
    }
    let (zero, one) = (emitter.float(0.0), emitter.float(1.0));
    points.insert(0, [zero.clone(), zero]);
    points.push([one.clone(), one]);
    (0..pieces)
        .map(|piece| {
            let [sx, sy] = &points[2 * piece];
            let [mx, my] = &points[2 * piece + 1];
            let [ex, ey] = &points[2 * piece + 2];
            Piece::from_points(emitter, [sx, sy], [mx, my], [ex, ey])
        })
        .collect()
}

/// The denominator after its guard: `+1e-8` for [`DivGuard::Auto`].
pub(crate) fn guarded_denominator(emitter: &mut Emitter, den: &str, guard: DivGuard) -> String {
    match guard {
        DivGuard::Auto => {
            let eps = emitter.float(SURROGATE_EPS);
            emitter.op("Add", &[den, &eps], vec![])
        }
        DivGuard::Explicit => den.to_string(),
    }
}

/// `num / den`, or 0 where `den` is exactly 0 (zero-safe, with finite gradients: the
/// division itself only ever sees a non-zero denominator). Returns the quotient, the safe
/// denominator and the zero mask.
pub(crate) fn zero_safe_division(emitter: &mut Emitter, num: &str, den: &str) -> (String, String, String) {
    let (zero, one) = (emitter.float(0.0), emitter.float(1.0));
    let is_zero = emitter.op("Equal", &[den, &zero], vec![]);
    let safe = emitter.op("Where", &[&is_zero, &one, den], vec![]);
    let quotient = emitter.op("Div", &[num, &safe], vec![]);
    let result = emitter.op("Where", &[&is_zero, &zero, &quotient], vec![]);
    (result, safe, is_zero)
}

/// The loss graph: inputs `logits`, `labels` (and `curves` with [`CurveSource::Input`]),
/// output `loss`.
pub fn emit_loss(compiled: &Compiled, curves: &[Curve], options: &EmitOptions) -> Result<ModelProto, OnnxError> {
    let mut emitter = Emitter::new(options.ignore_label, options.spatial_dims());
    emitter.soft_labels = options.soft_labels;
    emitter.predictions = compiled.exact.predictions;
    emitter.per_image = compiled.exact.per_image;
    let forward = forward(&mut emitter, compiled, curves, options.curves)?;
    emitter.output(&forward.loss, "loss", "the loss");
    let outputs = vec![value_info("loss", DataType::FLOAT, &[])];
    Ok(model(compiled, curves, emitter, outputs, "loss", options))
}
