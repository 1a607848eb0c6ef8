//! The gradient graph: the loss graph plus the gradient program of [`crate::grad`], outputs
//! `loss` and `dloss_dlogits`.
//!
//! Pooling is undone without scatter operators: a square window's maximum is the column pass
//! then the row pass (as `max_pool2d`'s separable pair), and each 1-D pass is undone offset by
//! offset (`Pad`, `Slice`, `Equal`): the first offset whose value equals the maximum is the
//! winner, and the output's gradient is shifted back to it. Only operators that ONNX Runtime
//! and tract both run.

use super::emitter::{attr_int, value_info, Emitter};
use super::loss::{forward, guarded_denominator, image_weights, input_pieces, zero_safe_division, Forward};
use super::{model, CurveSource, EmitOptions, OnnxError};
use crate::curve::math::{self, Piece, Strategy};
use crate::curve::Curve;
use crate::grad::{self, GradModule, GradNode};
use crate::ir::{Handle, RootKind, Shape};
use crate::Compiled;
use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::ModelProto;

/// The gradient graph: inputs as the loss graph's, outputs `loss` (a float32 scalar) and
/// `dloss_dlogits` (float32, the shape of `logits`).
pub fn emit_gradient(compiled: &Compiled, curves: &[Curve], options: &EmitOptions) -> Result<ModelProto, OnnxError> {
    let program = grad::differentiate(&compiled.relaxed)?;
    let mut emitter = Emitter::new(options.ignore_label, options.spatial_dims());
    emitter.soft_labels = options.soft_labels;
    emitter.predictions = compiled.exact.predictions;
    emitter.per_image = compiled.exact.per_image;
    let forward = forward(&mut emitter, compiled, curves, options.curves)?;
    let gradient = backward(&mut emitter, compiled, curves, options.curves, &program, &forward);
    emitter.output(&forward.loss, "loss", "the loss");
    emitter.output(&gradient, "dloss_dlogits", "the gradient of the loss with respect to the logits");
    let outputs = vec![
        value_info("loss", DataType::FLOAT, &[]),
        value_info("dloss_dlogits", DataType::FLOAT, options.logits_dims()),
    ];
    Ok(model(compiled, curves, emitter, outputs, "loss and gradient", options))
}

/// Emit every node of the gradient program; returns `∂loss/∂logits`.
fn backward(
    emitter: &mut Emitter,
    compiled: &Compiled,
    curves: &[Curve],
    source: CurveSource,
    program: &GradModule,
    forward: &Forward,
) -> String {
    let module = &compiled.relaxed;
    let v = |h: &Handle| forward.values[h.index()].clone().expect("the forward graph computes every node");
    let mut values: Vec<String> = Vec::with_capacity(program.nodes.len());
    for (index, node) in program.nodes.iter().enumerate() {
        let of = program.of[index].map_or("logits".to_string(), |h| h.to_string());
        emitter.at(format!("gradient @{index} of {of} from rule {}", program.rules[index]), format!("g{index}"));
        let g = |h: &grad::GradHandle| values[h.index()].clone();
        let out = match node {
            GradNode::Seed { root_kind, root } => {
                let sign = emitter.float(match root_kind {
                    RootKind::Metric => -1.0,
                    RootKind::Loss => 1.0,
                });
                if emitter.per_image {
                    // The loss is a mean over the (defined) images: each image's share.
                    let root_value = v(root);
                    let weights = image_weights(emitter, &root_value, forward.defined[root.index()].as_deref());
                    emitter.op("Mul", &[&weights, &sign], vec![])
                } else {
                    match &forward.defined[root.index()] {
                        Some(ok) => {
                            let zero = emitter.float(0.0);
                            emitter.op("Where", &[ok, &sign, &zero], vec![])
                        }
                        None => sign,
                    }
                }
            }
            GradNode::Add(a, b) => emitter.op("Add", &[&g(a), &g(b)], vec![]),
            GradNode::Neg(a) => emitter.op("Neg", &[&g(a)], vec![]),
            GradNode::Scale { grad, value } => emitter.op("Mul", &[&g(grad), &v(value)], vec![]),
            GradNode::DivNumerator { grad, den, guard } => {
                let den = guarded_denominator(emitter, &v(den), *guard);
                zero_safe_division(emitter, &g(grad), &den).0
            }
            GradNode::DivDenominator { grad, num, den, guard } => {
                let den = guarded_denominator(emitter, &v(den), *guard);
                let (_, safe, is_zero) = zero_safe_division(emitter, &v(num), &den);
                let scaled = emitter.op("Mul", &[&g(grad), &v(num)], vec![]);
                let squared = emitter.op("Mul", &[&safe, &safe], vec![]);
                let quotient = emitter.op("Div", &[&scaled, &squared], vec![]);
                let negated = emitter.op("Neg", &[&quotient], vec![]);
                let zero = emitter.float(0.0);
                emitter.op("Where", &[&is_zero, &zero, &negated], vec![])
            }
            GradNode::ReduceTo { grad, shape } => {
                let from = program.shapes[grad.index()];
                reduce_to(emitter, &g(grad), from, *shape)
            }
            GradNode::Spread { grad, input } => {
                let dims = emitter.op("Shape", &[&v(input)], vec![]);
                let grad = match module.shape(*input) {
                    Shape::ClassPixels(_) | Shape::Pixels if emitter.per_image => per_pixel(emitter, &g(grad)),
                    Shape::ClassPixels(_) => {
                        let target = class_column(emitter);
                        let target = emitter.ints(&target, false);
                        emitter.op("Reshape", &[&g(grad), &target], vec![])
                    }
                    Shape::Pixels | Shape::Classes(_) | Shape::Scalar => g(grad),
                };
                emitter.op("Expand", &[&grad, &dims], vec![])
            }
            GradNode::CurveSlope { grad, input, curve } => {
                let index = curve.0 as usize;
                let pieces: Vec<Piece<String, String>> = match source {
                    CurveSource::Baked => curves[index].segments().iter().map(|s| Piece::known(emitter, s)).collect(),
                    CurveSource::Input => {
                        let offset: usize = curves[..index].iter().map(|c| c.flat().len()).sum();
                        input_pieces(emitter, offset, curves[index].pieces())
                    }
                };
                let (_, slope) = math::eval(emitter, &v(input), &pieces, Strategy::EachPiece, true);
                let slope = slope.expect("a slope was asked for");
                emitter.op("Mul", &[&g(grad), &slope], vec![])
            }
            GradNode::Pool { grad, input, radius, erode } => {
                let z = if *erode { emitter.op("Neg", &[&v(input)], vec![]) } else { v(input) };
                unpool(emitter, &z, &g(grad), *radius as i64)
            }
            GradNode::AnyClass { grad, input, output } => {
                let equal = emitter.op("Equal", &[&v(input), &v(output)], vec![]);
                let hits = emitter.cast_float(&equal);
                let axes = emitter.ints(&[1], false);
                let ties = emitter.op("ReduceSum", &[&hits, &axes], vec![attr_int("keepdims", 1)]);
                let share = emitter.op("Div", &[&hits, &ties], vec![]);
                emitter.op("Mul", &[&g(grad), &share], vec![])
            }
            GradNode::Unslice { grad, input, start } => {
                unslice(emitter, &g(grad), &v(input), module.shape(*input), *start)
            }
            GradNode::Mean { grad, value, filter } => match filter {
                None => {
                    let zero = emitter.float(0.0);
                    let one = emitter.float(1.0);
                    let zeros = emitter.op("Mul", &[&v(value), &zero], vec![]);
                    let ones = emitter.op("Add", &[&zeros, &one], vec![]);
                    let total = emitter.over_classes("ReduceSum", &ones);
                    let spread = emitter.op("Mul", &[&ones, &g(grad)], vec![]);
                    emitter.op("Div", &[&spread, &total], vec![])
                }
                Some(mask) => {
                    let (_, denominator) = emitter.mask_count(&v(mask));
                    let masked = emitter.op("Mul", &[&g(grad), &v(mask)], vec![]);
                    emitter.op("Div", &[&masked, &denominator], vec![])
                }
            },
            GradNode::Sum { grad, value, filter } => match filter {
                None => {
                    let zero = emitter.float(0.0);
                    let zeros = emitter.op("Mul", &[&v(value), &zero], vec![]);
                    emitter.op("Add", &[&zeros, &g(grad)], vec![])
                }
                Some(mask) => emitter.op("Mul", &[&g(grad), &v(mask)], vec![]),
            },
            GradNode::Term { grad, value } => match &forward.defined[value.index()] {
                Some(ok) => {
                    let zero = emitter.float(0.0);
                    emitter.op("Where", &[ok, &g(grad), &zero], vec![])
                }
                None => g(grad),
            },
            GradNode::Softmax { grad, softmax } if emitter.predictions.is_sigmoid() => {
                // d sigmoid(x) = s (1 − s) dx, channel by channel.
                let s = v(softmax);
                let one = emitter.float(1.0);
                let complement = emitter.op("Sub", &[&one, &s], vec![]);
                let slope = emitter.op("Mul", &[&s, &complement], vec![]);
                emitter.op("Mul", &[&slope, &g(grad)], vec![])
            }
            GradNode::NllSum { grad } if emitter.predictions.is_sigmoid() => {
                // The channel mean of the binary cross-entropy: (sigmoid(x) − y) / C per channel.
                let s = emitter.op("Sigmoid", &["logits"], vec![]);
                let targets = emitter.one_hot_labels();
                let difference = emitter.op("Sub", &[&s, &targets], vec![]);
                let valid = emitter.valid();
                let masked = emitter.op("Mul", &[&difference, &valid], vec![]);
                let zero = emitter.float(0.0);
                let zeros = emitter.op("Mul", &["logits", &zero], vec![]);
                let one = emitter.float(1.0);
                let ones = emitter.op("Add", &[&zeros, &one], vec![]);
                let axes = emitter.ints(&[1], false);
                let channels = emitter.op("ReduceSum", &[&ones, &axes], vec![attr_int("keepdims", 1)]);
                let scaled = emitter.op("Div", &[&masked, &channels], vec![]);
                let grad = per_pixel(emitter, &g(grad));
                emitter.op("Mul", &[&scaled, &grad], vec![])
            }
            GradNode::Softmax { grad, softmax } => {
                let p = v(softmax);
                let product = emitter.op("Mul", &[&p, &g(grad)], vec![]);
                let axes = emitter.ints(&[1], false);
                let dot = emitter.op("ReduceSum", &[&product, &axes], vec![attr_int("keepdims", 1)]);
                let centred = emitter.op("Sub", &[&g(grad), &dot], vec![]);
                emitter.op("Mul", &[&p, &centred], vec![])
            }
            GradNode::NllSum { grad } => {
                let p = emitter.op("Softmax", &["logits"], vec![attr_int("axis", 1)]);
                let one_hot = emitter.one_hot_labels();
                let valid = emitter.valid();
                let difference = emitter.op("Sub", &[&p, &one_hot], vec![]);
                let masked = emitter.op("Mul", &[&difference, &valid], vec![]);
                let grad = per_pixel(emitter, &g(grad));
                emitter.op("Mul", &[&masked, &grad], vec![])
            }
            GradNode::Zeros => {
                let zero = emitter.float(0.0);
                emitter.op("Mul", &["logits", &zero], vec![])
            }
        };
        values.push(out);
    }
    values[program.output.index()].clone()
}

/// A broadcast undone: `grad` of shape `from` summed to `to`.
fn reduce_to(emitter: &mut Emitter, grad: &str, from: Shape, to: Shape) -> String {
    match (from, to) {
        (Shape::ClassPixels(_), Shape::Pixels) => {
            let axes = emitter.ints(&[1], false);
            emitter.op("ReduceSum", &[grad, &axes], vec![attr_int("keepdims", 1)])
        }
        (Shape::Classes(_), Shape::Scalar) => emitter.over_classes("ReduceSum", grad),
        _ => grad.to_string(),
    }
}

/// `x` shifted by `d` along `axis` (`out[i] = x[i + d]`), with `fill` where that is outside.
fn shift(emitter: &mut Emitter, x: &str, axis: usize, d: i64, r: i64, fill: f64) -> String {
    let rank = emitter.rank();
    let mut pads = vec![0i64; 2 * rank];
    pads[axis] = r;
    pads[rank + axis] = r;
    let pads = emitter.ints(&pads, false);
    let fill = emitter.float(fill);
    let padded = emitter.op("Pad", &[x, &pads, &fill], vec![]);
    // In the padded axis, x[i + d] sits at i + d + r; the window of H (or W) positions starting
    // at r + d ends r − d before the end.
    let starts = emitter.ints(&[r + d], false);
    let ends = emitter.ints(&[if r - d > 0 { -(r - d) } else { i64::MAX }], false);
    let axes = emitter.ints(&[axis as i64], false);
    emitter.op("Slice", &[&padded, &starts, &ends, &axes], vec![])
}

/// One 1-D max pass undone: `grad` (of `output`, the maximum of `input` over `[i − r, i + r]`
/// along `axis`) to each output's winner, the first offset whose value equals the maximum.
fn unpool_pass(emitter: &mut Emitter, input: &str, output: &str, grad: &str, axis: usize, r: i64) -> String {
    let mut taken: Option<String> = None;
    let mut total: Option<String> = None;
    for d in -r..=r {
        let shifted = shift(emitter, input, axis, d, r, f64::NEG_INFINITY);
        let equal = emitter.op("Equal", &[&shifted, output], vec![]);
        let hit = match &taken {
            None => equal.clone(),
            Some(taken) => {
                let free = emitter.op("Not", &[taken], vec![]);
                emitter.op("And", &[&equal, &free], vec![])
            }
        };
        taken = Some(match taken {
            None => equal,
            Some(taken) => emitter.op("Or", &[&taken, &hit], vec![]),
        });
        let hit = emitter.cast_float(&hit);
        let part = emitter.op("Mul", &[grad, &hit], vec![]);
        // Back to the winner: `out[j] = part[j − d]`.
        let placed = shift(emitter, &part, axis, -d, r, 0.0);
        total = Some(match total {
            None => placed,
            Some(total) => emitter.op("Add", &[&total, &placed], vec![]),
        });
    }
    total.expect("a window has at least one offset")
}

/// A square (cubic) window's dilation of `z` undone: one 1-D pass per spatial axis, in the
/// reverse of the forward order.
fn unpool(emitter: &mut Emitter, z: &str, grad: &str, r: i64) -> String {
    // The forward passes, one spatial axis at a time, then undone in reverse order.
    let axes = emitter.spatial_axes();
    let mut stages = vec![z.to_string()];
    for k in 0..axes.len() {
        let mut radii = vec![0i64; axes.len()];
        radii[k] = r;
        let next = emitter.max_pool(stages.last().expect("the input"), &radii);
        stages.push(next);
    }
    let mut grad = grad.to_string();
    for (k, axis) in axes.iter().enumerate().rev() {
        grad = unpool_pass(emitter, &stages[k], &stages[k + 1], &grad, *axis as usize, r);
    }
    grad
}

/// A per-image number `[N, 1]` or per-class numbers `[N, C]` as `[N, 1 or C, 1, 1]` (rank of
/// the logits), to scale pixel tensors image by image; a dataset-level number as it is.
fn per_pixel(emitter: &mut Emitter, grad: &str) -> String {
    if !emitter.per_image {
        return grad.to_string();
    }
    let mut dims = vec![1i64; emitter.rank()];
    dims[0] = 0;
    dims[1] = -1;
    let dims = emitter.ints(&dims, false);
    emitter.op("Reshape", &[grad, &dims], vec![])
}

/// `[1, -1, 1, 1]` (or `[1, -1, 1, 1, 1]` for volumes): per-class numbers as a class axis.
fn class_column(emitter: &Emitter) -> Vec<i64> {
    let mut dims = vec![1i64; emitter.rank()];
    dims[1] = -1;
    dims
}

/// A class slice undone: `grad` (classes `start..start + len` of `input`) spread back to all
/// of `input`'s classes, zero outside the slice. Written as a `Gather` of clamped indices
/// times a mask rather than a `Pad` with computed pads, which tract cannot type when C is
/// symbolic.
fn unslice(emitter: &mut Emitter, grad: &str, input: &str, shape: Shape, start: usize) -> String {
    let axis = emitter.class_axis(shape);
    let at = emitter.ints(&[axis], true);
    let input_dims = emitter.op("Shape", &[input], vec![]);
    let classes = emitter.op("Gather", &[&input_dims, &at], vec![attr_int("axis", 0)]);
    let grad_dims = emitter.op("Shape", &[grad], vec![]);
    let width = emitter.op("Gather", &[&grad_dims, &at], vec![attr_int("axis", 0)]);
    // For every class c of the input, its place in the slice: c − start.
    let (first, step) = (emitter.ints(&[-(start as i64)], true), emitter.ints(&[1], true));
    let offset = emitter.ints(&[start as i64], true);
    let end = emitter.op("Sub", &[&classes, &offset], vec![]);
    let place = emitter.op("Range", &[&first, &end, &step], vec![]);
    let zero_index = emitter.ints(&[0], true);
    let one = emitter.ints(&[1], true);
    let last = emitter.op("Sub", &[&width, &one], vec![]);
    let low = emitter.op("Max", &[&place, &zero_index], vec![]);
    let clamped = emitter.op("Min", &[&low, &last], vec![]);
    let gathered = emitter.op("Gather", &[grad, &clamped], vec![attr_int("axis", axis)]);
    let below = emitter.op("Less", &[&place, &zero_index], vec![]);
    let above = emitter.op("Less", &[&last, &place], vec![]);
    let outside = emitter.op("Or", &[&below, &above], vec![]);
    let inside = emitter.op("Not", &[&outside], vec![]);
    let mask = emitter.cast_float(&inside);
    let mask = if matches!(shape, Shape::ClassPixels(_)) {
        let dims = class_column(emitter);
        let dims = emitter.ints(&dims, false);
        emitter.op("Reshape", &[&mask, &dims], vec![])
    } else {
        mask
    };
    emitter.op("Mul", &[&gathered, &mask], vec![])
}
