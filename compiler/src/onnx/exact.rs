//! The exact-count graph: an exact module up to its accumulators, one output per
//! accumulator (`count_<id>`), which add across batches.

use super::emitter::{attr_int, attr_ints, value_info, Emitter};
use super::{count, model, nll_sum, slice, EmitOptions, OnnxError};
use crate::ir::{Handle, Node, Shape};
use crate::Compiled;
use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::{ModelProto, StringStringEntryProto};

/// Emit the exact metric's accumulator graph: one output per count.
pub fn emit_exact(compiled: &Compiled, options: &EmitOptions) -> Result<ModelProto, OnnxError> {
    let module = &compiled.exact;
    let mut emitter = Emitter::new(options.ignore_label, options.spatial_dims());
    emitter.soft_labels = options.soft_labels;
    emitter.predictions = compiled.exact.predictions;
    emitter.per_image = compiled.exact.per_image;
    emitter.hard_labels = true;
    let mut values: Vec<Option<String>> = vec![None; module.len()];
    let mut outputs = Vec::new();
    let mut accumulators = Vec::new();
    for handle in module.handles() {
        let node = module.node(handle);
        emitter.at(
            format!("IR {handle} `{}` from rule {}", node.mnemonic(), module.rules[handle.index()]),
            format!("n{}_{}", handle.index(), node.mnemonic()),
        );
        let pixel = matches!(module.shape(handle), Shape::Pixels | Shape::ClassPixels(_));
        let v = |h: &Handle| values[h.index()].clone().expect("pixel operands come first");
        let out = match node {
            Node::Pred if module.predictions.is_sigmoid() => {
                let cut = emitter.float(module.predictions.logit_cut().unwrap_or(0.0));
                let above = emitter.op("Greater", &["logits", &cut], vec![]);
                Some(emitter.cast_float(&above))
            }
            Node::Pred => {
                let argmax = emitter.op("ArgMax", &["logits"], vec![attr_int("axis", 1), attr_int("keepdims", 1)]);
                let argmax = emitter.cast_float(&argmax);
                let range = emitter.class_range();
                let equal = emitter.op("Equal", &[&argmax, &range], vec![]);
                Some(emitter.cast_float(&equal))
            }
            Node::Labels => Some(emitter.one_hot_labels()),
            Node::Valid => Some(emitter.valid()),
            Node::Border { radius } => Some(emitter.border(*radius)),
            Node::CurveTag { input, .. } | Node::Scope { input, .. } => values[input.index()].clone(),
            Node::And(a, b) if pixel => Some(emitter.op("Mul", &[&v(a), &v(b)], vec![])),
            Node::Or(a, b) if pixel => Some(emitter.op("Max", &[&v(a), &v(b)], vec![])),
            Node::Xor(a, b) if pixel => {
                let equal = emitter.op("Equal", &[&v(a), &v(b)], vec![]);
                let differ = emitter.op("Not", &[&equal], vec![]);
                Some(emitter.cast_float(&differ))
            }
            Node::Not(a) if pixel => {
                let one = emitter.float(1.0);
                Some(emitter.op("Sub", &[&one, &v(a)], vec![]))
            }
            Node::Erode { input, radius } => Some(emitter.pool(&v(input), *radius, true)),
            Node::Dilate { input, radius } => Some(emitter.pool(&v(input), *radius, false)),
            Node::AnyClass(input) => {
                Some(emitter.op("ReduceMax", &[&v(input)], vec![attr_ints("axes", &[1]), attr_int("keepdims", 1)]))
            }
            Node::Slice { input, start, end } if pixel => {
                Some(slice(&mut emitter, &v(input), module.shape(*input), *start, *end))
            }
            Node::Count(_) | Node::NllSum => {
                let summed = match node {
                    Node::Count(input) => count(&mut emitter, &v(input), module.shape(*input)),
                    // The other accumulator.
                    Node::NllSum => nll_sum(&mut emitter),
                    other => unreachable!("`{}` is not an accumulator", other.mnemonic()),
                };
                let name = format!("count_{}", handle.index());
                let doc = emitter.origin.clone();
                let per_class = matches!(module.shape(handle), Shape::Classes(_));
                // Per image, one row per image: `[N, C]`, or `[N]` for a number.
                let summed = if module.per_image && !per_class {
                    let flat = emitter.ints(&[-1], false);
                    emitter.op("Reshape", &[&summed, &flat], vec![])
                } else {
                    summed
                };
                emitter.output(&summed, &name, &doc);
                let dims: &[&str] = match (module.per_image, per_class) {
                    (false, true) => &["C_out"],
                    (false, false) => &[],
                    (true, true) => &["N", "C_out"],
                    (true, false) => &["N"],
                };
                outputs.push(value_info(&name, DataType::FLOAT, dims));
                accumulators.push(serde_json::json!({"output": name, "node": handle.index(), "per_class": per_class}));
                None
            }
            // Numbers above the accumulators are finished by the consumer from summed counts.
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
        values[handle.index()] = out;
    }
    let mut model = model(compiled, &[], emitter, outputs, "exact counts", options);
    model.metadata_props.push(StringStringEntryProto {
        key: "losscc.accumulators".into(),
        value: serde_json::Value::Array(accumulators).to_string(),
        ..Default::default()
    });
    Ok(model)
}
