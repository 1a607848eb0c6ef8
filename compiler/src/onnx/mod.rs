//! ONNX emission: a relaxed module becomes a portable loss graph; an exact module becomes a
//! graph of per-batch counts. Written with onnx-protobuf.
//!
//! Contract (what external trainers rely on):
//! * opset 17, IR version 8; inputs `logits` float32 `[N,C,H,W]` and `labels` int64
//!   `[N,H,W]` with symbolic N, C, H, W; output `loss`, a float32 scalar;
//! * curves are baked in as initializers (their folded per-piece coefficients), or read from
//!   an input `curves`; either way they are emitted by the one curve definition,
//!   [`crate::curve::math`];
//! * divisions are zero-safe, as in every back end: a zero denominator gives 0;
//! * only operators that ONNX Runtime, onnx2torch and tract all load: one-hot as
//!   `Cast(Equal(Unsqueeze(labels), Range))`, explicit `axis`/`pads`/`keepdims`, constants as
//!   initializers, both `Clip` bounds given, `Sqrt` of a clamped argument (never a
//!   `Where`-guarded one, whose gradient is NaN in PyTorch);
//! * every node's name and `doc_string` say which IR node and rewrite rule it came from;
//!   `metadata_props` carry the metric source and the source of every file it `use`s, the
//!   parameters, the curve manifest, the ignore label and losscc's version.
//!
//! Files: [`emitter`] (the node writer and its primitives), [`loss`] (the loss graph),
//! [`exact`] (the exact-count graph); this file has the shared pieces, the model's metadata
//! and the text listing.
//!
//! The exact graph (`--exact`) outputs one tensor per accumulator node (`count_<id>`), float32,
//! per class or scalar; they add across batches, and the manifest in `metadata_props`
//! (`losscc.accumulators`) says which is which. For a per-image module
//! (`losscc.per_image`) they are one row per image (`[N, C]` or `[N]`), finished image by
//! image (`Accumulator::add_image`), not summed.
//!
//! A sigmoid module (`losscc.predictions`) reads the logits per channel: `Sigmoid` for `P`,
//! `logits > ln(t / (1 − t))` for exact predictions, per-channel labels and the binary
//! cross-entropy for `ce`.

mod emitter;
mod exact;
mod grad;
mod loss;

pub use exact::emit_exact;
pub use grad::emit_gradient;
pub use loss::emit_loss;

use crate::curve::Curve;
use crate::ir::{CmpOp, Shape, DEFAULT_IGNORE_LABEL};
use crate::Compiled;
use emitter::{attr_int, attr_ints, fix_dim, value_info, Emitter};
use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::{GraphProto, Message, ModelProto, OperatorSetIdProto, StringStringEntryProto, ValueInfoProto};
use protobuf::MessageField;
use std::fmt::Write;

pub const OPSET: i64 = 17;
pub const IR_VERSION: i64 = 8;

/// Why a module cannot be emitted.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("the loss needs {expected} curves but {got} were given")]
    Curves { expected: usize, got: usize },
    #[error(transparent)]
    Gradient(#[from] crate::grad::GradError),
}

/// Where the loss graph gets its curves from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CurveSource {
    /// Folded into initializers (the default: the graph is the loss).
    Baked,
    /// A graph input `curves`: float32, every curve's flat control points concatenated in
    /// manifest order (`losscc.curves` in the metadata gives pieces per curve), so an
    /// external search can vary them without recompiling.
    Input,
}

/// How a graph is emitted.
#[derive(Clone, Debug, PartialEq)]
pub struct EmitOptions {
    pub curves: CurveSource,
    /// The label of ignored pixels (`None`: every pixel is valid).
    pub ignore_label: Option<i64>,
    /// Volumes: logits `[N, C, D, H, W]` and labels `[N, D, H, W]`, windows are cubes.
    /// Otherwise images, `[N, C, H, W]` and `[N, H, W]`.
    pub volumes: bool,
    /// Soft labels: the `labels` input is float32 probabilities of the logits' shape (all 0
    /// at an ignored pixel), used as they are by the surrogate and the cross-entropy; the
    /// exact-count graph takes their argmax. Otherwise int64 class indices.
    pub soft_labels: bool,
}

impl EmitOptions {
    /// The number of spatial axes: 3 for volumes, 2 for images.
    pub fn spatial_dims(&self) -> usize {
        if self.volumes {
            3
        } else {
            2
        }
    }

    /// The logits' symbolic dimensions.
    pub fn logits_dims(&self) -> &'static [&'static str] {
        if self.volumes {
            &["N", "C", "D", "H", "W"]
        } else {
            &["N", "C", "H", "W"]
        }
    }

    /// The labels' symbolic dimensions.
    pub fn labels_dims(&self) -> &'static [&'static str] {
        if self.soft_labels {
            return self.logits_dims();
        }
        if self.volumes {
            &["N", "D", "H", "W"]
        } else {
            &["N", "H", "W"]
        }
    }
}

impl Default for EmitOptions {
    fn default() -> Self {
        EmitOptions {
            curves: CurveSource::Baked,
            ignore_label: Some(DEFAULT_IGNORE_LABEL),
            volumes: false,
            soft_labels: false,
        }
    }
}

/// Classes `start..end` of a per-class value, as a `Gather` of those indices (a `Slice` would
/// make onnx2torch index with a list, which PyTorch deprecates). Indices up to C come from the
/// value's own shape, so C stays symbolic.
fn slice(emitter: &mut Emitter, x: &str, shape: Shape, start: usize, end: Option<usize>) -> String {
    let axis = emitter.class_axis(shape);
    let indices = match end {
        Some(end) => emitter.ints(&(start as i64..end as i64).collect::<Vec<_>>(), false),
        None => {
            let dims = emitter.op("Shape", &[x], vec![]);
            let at = emitter.ints(&[axis], true);
            let classes = emitter.op("Gather", &[&dims, &at], vec![attr_int("axis", 0)]);
            let (first, step) = (emitter.ints(&[start as i64], true), emitter.ints(&[1], true));
            emitter.op("Range", &[&first, &classes, &step], vec![])
        }
    };
    emitter.op("Gather", &[x, &indices], vec![attr_int("axis", axis)])
}

fn count(emitter: &mut Emitter, x: &str, shape: Shape) -> String {
    match shape {
        Shape::ClassPixels(_) => {
            let axes = emitter.count_axes_of_module();
            let axes = emitter.ints(&axes, false);
            emitter.op("ReduceSum", &[x, &axes], vec![attr_int("keepdims", 0)])
        }
        _ => emitter.pixel_total(x),
    }
}

fn nll_sum(emitter: &mut Emitter) -> String {
    if emitter.predictions.is_sigmoid() {
        return bce_sum(emitter);
    }
    let log_probabilities = emitter.op("LogSoftmax", &["logits"], vec![attr_int("axis", 1)]);
    let one_hot = emitter.one_hot_labels();
    let picked = emitter.op("Mul", &[&log_probabilities, &one_hot], vec![]);
    let total = emitter.pixel_total(&picked);
    emitter.op("Neg", &[&total], vec![])
}

/// The binary cross-entropy of a sigmoid model, averaged over channels and summed over valid
/// pixels: `max(x, 0) − x·y + log(1 + exp(−|x|))` (stable for any logit `x`).
fn bce_sum(emitter: &mut Emitter) -> String {
    let targets = emitter.one_hot_labels();
    let zero = emitter.float(0.0);
    let positive = emitter.op("Max", &["logits", &zero], vec![]);
    let product = emitter.op("Mul", &["logits", &targets], vec![]);
    let linear = emitter.op("Sub", &[&positive, &product], vec![]);
    let magnitude = emitter.op("Abs", &["logits"], vec![]);
    let negated = emitter.op("Neg", &[&magnitude], vec![]);
    let exponential = emitter.op("Exp", &[&negated], vec![]);
    let one = emitter.float(1.0);
    let shifted = emitter.op("Add", &[&exponential, &one], vec![]);
    let logarithm = emitter.op("Log", &[&shifted], vec![]);
    let elementwise = emitter.op("Add", &[&linear, &logarithm], vec![]);
    let per_pixel = emitter.op("ReduceMean", &[&elementwise], vec![attr_ints("axes", &[1]), attr_int("keepdims", 1)]);
    let valid = emitter.valid();
    let masked = emitter.op("Mul", &[&per_pixel, &valid], vec![]);
    emitter.pixel_total(&masked)
}

fn compare(emitter: &mut Emitter, op: CmpOp, a: &str, b: &str) -> String {
    let result = match op {
        CmpOp::Lt => emitter.op("Less", &[a, b], vec![]),
        // onnx2torch converts no opset-16 LessOrEqual/GreaterOrEqual: negate the strict ones.
        CmpOp::Le => {
            let greater = emitter.op("Greater", &[a, b], vec![]);
            emitter.op("Not", &[&greater], vec![])
        }
        CmpOp::Gt => emitter.op("Greater", &[a, b], vec![]),
        CmpOp::Ge => {
            let less = emitter.op("Less", &[a, b], vec![]);
            emitter.op("Not", &[&less], vec![])
        }
        CmpOp::Eq => emitter.op("Equal", &[a, b], vec![]),
        CmpOp::Ne => {
            let equal = emitter.op("Equal", &[a, b], vec![]);
            emitter.op("Not", &[&equal], vec![])
        }
    };
    emitter.cast_float(&result)
}

fn model(
    compiled: &Compiled,
    curves: &[Curve],
    emitter: Emitter,
    outputs: Vec<ValueInfoProto>,
    what: &str,
    options: &EmitOptions,
) -> ModelProto {
    let mut logits = value_info("logits", DataType::FLOAT, options.logits_dims());
    if let Some((classes, _)) = compiled.exact.weights_classes() {
        // Per-class weights fix the number of classes: a runtime rejects other logits.
        fix_dim(&mut logits, 1, classes);
    }
    let label_type = if options.soft_labels { DataType::FLOAT } else { DataType::INT64 };
    let mut inputs = vec![logits, value_info("labels", label_type, options.labels_dims())];
    if options.curves == CurveSource::Input && what != "exact counts" {
        inputs.push(value_info("curves", DataType::FLOAT, &["curve_coordinates"]));
    }
    // Constants the curve math folded away, or coefficients a piece did not need, are left
    // out: every initializer is some node's input.
    let used: std::collections::HashSet<&str> =
        emitter.nodes.iter().flat_map(|node| node.input.iter().map(String::as_str)).collect();
    let initializers = emitter.initializers.iter().filter(|init| used.contains(init.name.as_str())).cloned().collect();
    let graph = GraphProto {
        name: format!("losscc_{}", compiled.exact.name),
        node: emitter.nodes,
        initializer: initializers,
        input: inputs,
        output: outputs,
        doc_string: format!("losscc {what} of `{}`", compiled.exact.name),
        ..Default::default()
    };
    let curves_json: Vec<serde_json::Value> = compiled
        .manifest()
        .curves
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            serde_json::json!({
                "name": spec.name, "op": spec.op, "operand": spec.operand, "pieces": spec.pieces,
                "control_points": curves.get(i).map(|c| c.flat()),
            })
        })
        .collect();
    let metadata = [
        ("losscc.version", env!("CARGO_PKG_VERSION").to_string()),
        ("losscc.metric", compiled.exact.name.clone()),
        ("losscc.source", compiled.program.main().text.clone()),
        ("losscc.sources", serde_json::to_string(&compiled.program.sources()).unwrap_or_default()),
        ("losscc.ignore_label", serde_json::to_string(&options.ignore_label).unwrap_or_default()),
        ("losscc.spatial_dims", options.spatial_dims().to_string()),
        ("losscc.soft_labels", options.soft_labels.to_string()),
        ("losscc.predictions", predictions_metadata(compiled.exact.predictions)),
        ("losscc.per_image", compiled.exact.per_image.to_string()),
        ("losscc.params", serde_json::to_string(&compiled.params).unwrap_or_default()),
        ("losscc.curves", serde_json::Value::Array(curves_json).to_string()),
    ];
    ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET, ..Default::default() }],
        producer_name: "losscc".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: MessageField::some(graph),
        metadata_props: metadata
            .into_iter()
            .map(|(key, value)| StringStringEntryProto { key: key.into(), value, ..Default::default() })
            .collect(),
        doc_string: format!("{what} compiled by losscc"),
        ..Default::default()
    }
}

/// `softmax`, or `sigmoid` with its threshold, as JSON.
fn predictions_metadata(predictions: crate::ir::Predictions) -> String {
    match predictions {
        crate::ir::Predictions::Softmax => serde_json::json!({ "kind": "softmax" }).to_string(),
        crate::ir::Predictions::Sigmoid { threshold } => {
            serde_json::json!({ "kind": "sigmoid", "threshold": threshold }).to_string()
        }
    }
}

/// Serialize a model.
pub fn to_bytes(model: &ModelProto) -> Vec<u8> {
    model.write_to_bytes().expect("in-memory protobuf serialization does not fail")
}

/// A readable listing of the graph (`--emit onnx-text`).
pub fn listing(model: &ModelProto) -> String {
    let mut out = String::new();
    let graph = model.graph.as_ref().cloned().unwrap_or_default();
    let _ = writeln!(out, "graph {} (opset {}, IR {})", graph.name, OPSET, model.ir_version);
    for input in &graph.input {
        let _ = writeln!(out, "  input {}", input.name);
    }
    for init in &graph.initializer {
        let values: Vec<String> = if init.data_type == DataType::FLOAT as i32 {
            init.float_data.iter().map(|v| format!("{v:?}")).collect()
        } else {
            init.int64_data.iter().map(|v| v.to_string()).collect()
        };
        let _ = writeln!(out, "  init {} = [{}]", init.name, values.join(", "));
    }
    for node in &graph.node {
        let attributes: Vec<String> = node
            .attribute
            .iter()
            .map(|a| if a.ints.is_empty() { format!("{}={}", a.name, a.i) } else { format!("{}={:?}", a.name, a.ints) })
            .collect();
        let attributes = if attributes.is_empty() { String::new() } else { format!(" {{{}}}", attributes.join(", ")) };
        let _ = writeln!(
            out,
            "  {} = {}({}){}  # {}",
            node.output.join(", "),
            node.op_type,
            node.input.join(", "),
            attributes,
            node.doc_string
        );
    }
    for output in &graph.output {
        let _ = writeln!(out, "  output {}", output.name);
    }
    out
}
