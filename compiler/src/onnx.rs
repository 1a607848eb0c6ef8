//! ONNX emission: a relaxed module becomes a portable loss graph; an exact module becomes a
//! graph of per-batch counts. Written with onnx-protobuf.
//!
//! Contract (what external trainers rely on):
//! * opset 17, IR version 8; inputs `logits` float32 `[N,C,H,W]` and `labels` int64
//!   `[N,H,W]` with symbolic N, C, H, W; output `loss`, a float32 scalar;
//! * curves are baked in as initializers (their folded per-piece coefficients);
//! * only operators that ONNX Runtime, onnx2torch and tract all load: one-hot as
//!   `Cast(Equal(Unsqueeze(labels), Range))`, explicit `axis`/`pads`/`keepdims`, constants as
//!   initializers, both `Clip` bounds given, `Sqrt` of a clamped argument (never a
//!   `Where`-guarded one, whose gradient is NaN in PyTorch);
//! * every node's name and `doc_string` say which IR node and rewrite rule it came from;
//!   `metadata_props` carry the metric source, parameters, curve manifest and losscc version.
//!
//! The exact graph (`--exact`) outputs one tensor per accumulator node (`count_<id>`), float32,
//! per class or scalar; they add across batches, and the manifest in `metadata_props`
//! (`losscc.accumulators`) says which is which.

use crate::curve::{Curve, SQRT_FLOOR};
use crate::ir::{CmpOp, DivGuard, Handle, Mode, Node, RootKind, Shape, SURROGATE_EPS};
use crate::Compiled;
use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::tensor_shape_proto::Dimension;
use onnx_protobuf::type_proto;
use onnx_protobuf::{
    AttributeProto, GraphProto, Message, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use protobuf::{EnumOrUnknown, MessageField};
use std::collections::HashMap;
use std::fmt::Write;

pub const OPSET: i64 = 17;
pub const IR_VERSION: i64 = 8;
const IGNORE_LABEL: i64 = 255;

/// Why a module cannot be emitted.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("{construct} at bytes {start}..{end} cannot be expressed in ONNX opset {OPSET}")]
    Unsupported { construct: String, start: usize, end: usize },
    #[error("the loss needs {expected} curves but {got} were given")]
    Curves { expected: usize, got: usize },
}

/// ONNX's `i` field of `AttributeProto` (field number 3).
const ATTRIBUTE_I_FIELD: u32 = 3;

fn attr_int(name: &str, value: i64) -> AttributeProto {
    let mut attribute = AttributeProto {
        name: name.into(),
        type_: EnumOrUnknown::new(AttributeType::INT),
        i: value,
        ..Default::default()
    };
    if value == 0 {
        // proto3 code never writes a zero scalar, but ONNX is proto2 and onnx2torch tests
        // `HasField('i')`: write the zero explicitly so every reader sees the attribute.
        attribute.special_fields.mut_unknown_fields().add_varint(ATTRIBUTE_I_FIELD, 0);
    }
    attribute
}

fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        type_: EnumOrUnknown::new(AttributeType::INTS),
        ints: values.to_vec(),
        ..Default::default()
    }
}

fn value_info(name: &str, elem: DataType, dims: &[&str]) -> ValueInfoProto {
    let mut shape = TensorShapeProto::new();
    for dim in dims {
        let mut d = Dimension::new();
        d.set_dim_param(dim.to_string());
        shape.dim.push(d);
    }
    let tensor = type_proto::Tensor { elem_type: elem as i32, shape: MessageField::some(shape), ..Default::default() };
    ValueInfoProto {
        name: name.into(),
        type_: MessageField::some(TypeProto {
            value: Some(type_proto::Value::TensorType(tensor)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Builds the node list, naming every output after the IR node it implements.
struct Emitter {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    float_constants: HashMap<u32, String>,
    int_constants: HashMap<Vec<i64>, String>,
    counter: usize,
    /// The IR node and rule being emitted, for names and doc strings.
    origin: String,
    origin_id: String,
    shared: HashMap<&'static str, String>,
}

impl Emitter {
    fn new() -> Emitter {
        Emitter {
            nodes: Vec::new(),
            initializers: Vec::new(),
            float_constants: HashMap::new(),
            int_constants: HashMap::new(),
            counter: 0,
            origin: String::from("graph inputs"),
            origin_id: String::from("input"),
            shared: HashMap::new(),
        }
    }

    fn op(&mut self, op_type: &str, inputs: &[&str], attributes: Vec<AttributeProto>) -> String {
        self.counter += 1;
        let output = format!("{}_{}", self.origin_id, self.counter);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.clone()],
            name: format!("{}_{}_{}", self.origin_id, op_type, self.counter),
            op_type: op_type.into(),
            attribute: attributes,
            doc_string: self.origin.clone(),
            ..Default::default()
        });
        output
    }

    fn float(&mut self, value: f64) -> String {
        let value = value as f32;
        if let Some(name) = self.float_constants.get(&value.to_bits()) {
            return name.clone();
        }
        let name = format!("const_f{}", self.float_constants.len());
        self.initializers.push(TensorProto {
            name: name.clone(),
            data_type: DataType::FLOAT as i32,
            float_data: vec![value],
            ..Default::default()
        });
        self.float_constants.insert(value.to_bits(), name.clone());
        name
    }

    /// An int64 constant: a scalar when `scalar`, else a 1-D tensor.
    fn ints(&mut self, values: &[i64], scalar: bool) -> String {
        let mut key = values.to_vec();
        key.push(if scalar { 1 } else { 0 });
        if let Some(name) = self.int_constants.get(&key) {
            return name.clone();
        }
        let name = format!("const_i{}", self.int_constants.len());
        self.initializers.push(TensorProto {
            name: name.clone(),
            data_type: DataType::INT64 as i32,
            dims: if scalar { vec![] } else { vec![values.len() as i64] },
            int64_data: values.to_vec(),
            ..Default::default()
        });
        self.int_constants.insert(key, name.clone());
        name
    }

    fn clip(&mut self, x: &str, low: f64, high: f64) -> String {
        let (lo, hi) = (self.float(low), self.float(high));
        self.op("Clip", &[x, &lo, &hi], vec![])
    }

    fn cast_float(&mut self, x: &str) -> String {
        self.op("Cast", &[x], vec![attr_int("to", DataType::FLOAT as i64)])
    }

    /// `[1, C, 1, 1]` class indices, built from the logits' shape (C is symbolic).
    fn class_range(&mut self) -> String {
        if let Some(name) = self.shared.get("range") {
            return name.clone();
        }
        let shape = self.op("Shape", &["logits"], vec![]);
        let one = self.ints(&[1], true);
        let classes = self.op("Gather", &[&shape, &one], vec![attr_int("axis", 0)]);
        let (zero, step) = (self.ints(&[0], true), self.ints(&[1], true));
        let range = self.op("Range", &[&zero, &classes, &step], vec![]);
        let target = self.ints(&[1, -1, 1, 1], false);
        let range = self.op("Reshape", &[&range, &target], vec![]);
        self.shared.insert("range", range.clone());
        range
    }

    fn labels_unsqueezed(&mut self) -> String {
        if let Some(name) = self.shared.get("labels1") {
            return name.clone();
        }
        let axes = self.ints(&[1], false);
        let labels = self.op("Unsqueeze", &["labels", &axes], vec![]);
        self.shared.insert("labels1", labels.clone());
        labels
    }

    fn one_hot_labels(&mut self) -> String {
        if let Some(name) = self.shared.get("onehot") {
            return name.clone();
        }
        let (labels, range) = (self.labels_unsqueezed(), self.class_range());
        let equal = self.op("Equal", &[&labels, &range], vec![]);
        let one_hot = self.cast_float(&equal);
        self.shared.insert("onehot", one_hot.clone());
        one_hot
    }

    fn valid(&mut self) -> String {
        let labels = self.labels_unsqueezed();
        let ignore = self.ints(&[IGNORE_LABEL], true);
        let equal = self.op("Equal", &[&labels, &ignore], vec![]);
        let valid = self.op("Not", &[&equal], vec![]);
        self.cast_float(&valid)
    }

    fn pool(&mut self, x: &str, radius: u32, erode: bool) -> String {
        let k = 2 * radius as i64 + 1;
        let r = radius as i64;
        let attributes = || {
            vec![
                attr_ints("kernel_shape", &[k, k]),
                attr_ints("pads", &[r, r, r, r]),
                attr_ints("strides", &[1, 1]),
                attr_ints("dilations", &[1, 1]),
                attr_int("ceil_mode", 0),
            ]
        };
        if erode {
            let negated = self.op("Neg", &[x], vec![]);
            let pooled = self.op("MaxPool", &[&negated], attributes());
            self.op("Neg", &[&pooled], vec![])
        } else {
            self.op("MaxPool", &[x], attributes())
        }
    }

    /// `y = (1-t)^2 y0 + 2 t (1-t) y1 + t^2 y2`, given `2 y1` (constants or graph values).
    fn bezier_y(&mut self, t: &str, y0: &str, two_y1: &str, y2: &str) -> String {
        let one = self.float(1.0);
        let s = self.op("Sub", &[&one, t], vec![]);
        let ss = self.op("Mul", &[&s, &s], vec![]);
        let ts = self.op("Mul", &[t, &s], vec![]);
        let tt = self.op("Mul", &[t, t], vec![]);
        let a = self.op("Mul", &[&ss, y0], vec![]);
        let b = self.op("Mul", &[&ts, two_y1], vec![]);
        let c = self.op("Mul", &[&tt, y2], vec![]);
        let ab = self.op("Add", &[&a, &b], vec![]);
        self.op("Add", &[&ab, &c], vec![])
    }

    /// `g(x)` with control points read from the `curves` input at run time: the same
    /// formula as [`Emitter::curve`], with the linear and degenerate cases chosen by `Where`
    /// (their unused branches stay finite, so gradients with respect to `x` stay finite).
    fn curve_from_input(&mut self, x: &str, offset: usize, pieces: usize) -> String {
        let x = self.clip(x, 0.0, 1.0);
        let coordinate = |this: &mut Self, index: usize| {
            let at = this.ints(&[(offset + index) as i64], true);
            this.op("Gather", &["curves", &at], vec![attr_int("axis", 0)])
        };
        // Points: (0,0), the 2k-1 free points, (1,1).
        let mut points: Vec<(String, String)> = vec![(self.float(0.0), self.float(0.0))];
        for point in 0..2 * pieces - 1 {
            points.push((coordinate(self, 2 * point), coordinate(self, 2 * point + 1)));
        }
        points.push((self.float(1.0), self.float(1.0)));
        let mut result: Option<String> = None;
        for piece in (0..pieces).rev() {
            let (sx, sy) = points[2 * piece].clone();
            let (mx, my) = points[2 * piece + 1].clone();
            let (ex, ey) = points[2 * piece + 2].clone();
            let (zero, one, two) = (self.float(0.0), self.float(1.0), self.float(2.0));
            let width = self.op("Sub", &[&ex, &sx], vec![]);
            let tiny = self.float(1e-12);
            let safe_width = self.op("Max", &[&width, &tiny], vec![]);
            let shifted = self.op("Sub", &[&x, &sx], vec![]);
            let normalised = self.op("Div", &[&shifted, &safe_width], vec![]);
            let x_norm = self.clip(&normalised, 0.0, 1.0);
            let middle_offset = self.op("Sub", &[&mx, &sx], vec![]);
            let m = self.op("Div", &[&middle_offset, &safe_width], vec![]);
            // t = (m - sqrt(max(m^2 + (1 - 2m) x', floor))) / (2m - 1), or x' when 2m - 1 ~ 0.
            let two_m = self.op("Mul", &[&two, &m], vec![]);
            let slope = self.op("Sub", &[&one, &two_m], vec![]);
            let m2 = self.op("Mul", &[&m, &m], vec![]);
            let scaled = self.op("Mul", &[&x_norm, &slope], vec![]);
            let disc = self.op("Add", &[&scaled, &m2], vec![]);
            let disc = self.clip(&disc, SQRT_FLOOR, f32::MAX as f64);
            let root = self.op("Sqrt", &[&disc], vec![]);
            let numerator = self.op("Sub", &[&m, &root], vec![]);
            let denominator = self.op("Sub", &[&two_m, &one], vec![]);
            let magnitude = self.op("Abs", &[&denominator], vec![]);
            let linear_tolerance = self.float(1e-6);
            let is_linear = self.op("Less", &[&magnitude, &linear_tolerance], vec![]);
            let safe_denominator = self.op("Where", &[&is_linear, &one, &denominator], vec![]);
            let quadratic_t = self.op("Div", &[&numerator, &safe_denominator], vec![]);
            let quadratic_t = self.clip(&quadratic_t, 0.0, 1.0);
            let t = self.op("Where", &[&is_linear, &x_norm, &quadratic_t], vec![]);
            let two_my = self.op("Mul", &[&two, &my], vec![]);
            let y = self.bezier_y(&t, &sy, &two_my, &ey);
            // A vertical piece covers one x; its value there is its end's y.
            let has_width = self.op("Greater", &[&width, &zero], vec![]);
            let y = self.op("Where", &[&has_width, &y, &ey], vec![]);
            result = Some(match result {
                None => y,
                Some(later) => {
                    let beyond = self.op("Greater", &[&x, &ex], vec![]);
                    let inside = self.op("Not", &[&beyond], vec![]);
                    self.op("Where", &[&inside, &y, &later], vec![])
                }
            });
        }
        result.expect("a curve has at least one piece")
    }

    /// `g(x)` with the curve's folded per-piece coefficients as initializers.
    fn curve(&mut self, x: &str, curve: &Curve) -> String {
        let x = self.clip(x, 0.0, 1.0);
        let mut result: Option<String> = None;
        for segment in curve.segments().iter().rev() {
            let width = segment.width();
            let y = if width <= 0.0 {
                let zero = self.float(0.0);
                let scaled = self.op("Mul", &[&x, &zero], vec![]);
                let end = self.float(segment.end[1]);
                self.op("Add", &[&scaled, &end], vec![])
            } else {
                let start = self.float(segment.start[0]);
                let shifted = self.op("Sub", &[&x, &start], vec![]);
                let inverse_width = self.float(1.0 / width);
                let normalised = self.op("Mul", &[&shifted, &inverse_width], vec![]);
                let x_norm = self.clip(&normalised, 0.0, 1.0);
                let t = if segment.linear {
                    x_norm
                } else {
                    let m = segment.m;
                    let slope = self.float(1.0 - 2.0 * m);
                    let m2 = self.float(m * m);
                    let scaled = self.op("Mul", &[&x_norm, &slope], vec![]);
                    let disc = self.op("Add", &[&scaled, &m2], vec![]);
                    let disc = self.clip(&disc, SQRT_FLOOR, f32::MAX as f64);
                    let root = self.op("Sqrt", &[&disc], vec![]);
                    let m_const = self.float(m);
                    let numerator = self.op("Sub", &[&m_const, &root], vec![]);
                    let inverse = self.float(1.0 / (2.0 * m - 1.0));
                    let t = self.op("Mul", &[&numerator, &inverse], vec![]);
                    self.clip(&t, 0.0, 1.0)
                };
                let (y0, two_y1, y2) =
                    (self.float(segment.start[1]), self.float(2.0 * segment.middle[1]), self.float(segment.end[1]));
                self.bezier_y(&t, &y0, &two_y1, &y2)
            };
            result = Some(match result {
                None => y,
                Some(later) => {
                    let end = self.float(segment.end[0]);
                    // `x <= end` as `not (x > end)`: onnx2torch has no opset-16 LessOrEqual.
                    let beyond = self.op("Greater", &[&x, &end], vec![]);
                    let inside = self.op("Not", &[&beyond], vec![]);
                    self.op("Where", &[&inside, &y, &later], vec![])
                }
            });
        }
        result.expect("a curve has at least one piece")
    }
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

/// Emit the surrogate loss graph with the given curves (manifest order), baked in.
pub fn emit_loss(compiled: &Compiled, curves: &[Curve]) -> Result<ModelProto, OnnxError> {
    emit_loss_with(compiled, curves, CurveSource::Baked)
}

/// Emit the surrogate loss graph; with [`CurveSource::Input`], `curves` only give the
/// layout and the values recorded in the metadata.
pub fn emit_loss_with(compiled: &Compiled, curves: &[Curve], source: CurveSource) -> Result<ModelProto, OnnxError> {
    let module = &compiled.relaxed;
    if curves.len() != compiled.manifest.curves.len() {
        return Err(OnnxError::Curves { expected: compiled.manifest.curves.len(), got: curves.len() });
    }
    let mut emitter = Emitter::new();
    let mut values: Vec<Option<String>> = vec![None; module.len()];
    let mut defined: Vec<Option<String>> = vec![None; module.len()];
    for handle in module.handles() {
        let node = module.node(handle);
        emitter.origin = format!("IR {handle} `{}` from rule {}", node.mnemonic(), module.rules[handle.index()]);
        emitter.origin_id = format!("n{}_{}", handle.index(), node.mnemonic());
        let v = |h: &Handle| values[h.index()].clone().expect("operands come first");
        // Definedness (a bool scalar) flows from operands unless a node resets it.
        let operand_flags: Vec<String> = node.operands().iter().filter_map(|o| defined[o.index()].clone()).collect();
        let mut flag = match operand_flags.len() {
            0 => None,
            _ => {
                let mut acc = operand_flags[0].clone();
                for other in &operand_flags[1..] {
                    acc = emitter.op("And", &[&acc, other], vec![]);
                }
                Some(acc)
            }
        };
        let out = match node {
            Node::Softmax => emitter.op("Softmax", &["logits"], vec![attr_int("axis", 1)]),
            Node::Labels => emitter.one_hot_labels(),
            Node::Valid => emitter.valid(),
            Node::Const(c) => emitter.float(c.get()),
            Node::Curve { input, curve } => match source {
                CurveSource::Baked => emitter.curve(&v(input), &curves[curve.0 as usize]),
                CurveSource::Input => {
                    let offset: usize = curves[..curve.0 as usize].iter().map(|c| c.flat().len()).sum();
                    emitter.curve_from_input(&v(input), offset, curves[curve.0 as usize].pieces())
                }
            },
            Node::Erode { input, radius } => emitter.pool(&v(input), *radius, true),
            Node::Dilate { input, radius } => emitter.pool(&v(input), *radius, false),
            Node::AnyClass(input) => {
                emitter.op("ReduceMax", &[&v(input)], vec![attr_ints("axes", &[1]), attr_int("keepdims", 1)])
            }
            Node::Slice { input, start, end } => slice(&mut emitter, &v(input), module.shape(*input), *start, *end),
            Node::Count(input) => count(&mut emitter, &v(input), module.shape(*input)),
            Node::NllSum => nll_sum(&mut emitter),
            Node::Add(a, b) => emitter.op("Add", &[&v(a), &v(b)], vec![]),
            Node::Sub(a, b) => emitter.op("Sub", &[&v(a), &v(b)], vec![]),
            Node::Mul(a, b) => emitter.op("Mul", &[&v(a), &v(b)], vec![]),
            Node::Div { num, den, guard } => {
                let den = match guard {
                    DivGuard::Auto => {
                        let eps = emitter.float(SURROGATE_EPS);
                        emitter.op("Add", &[&v(den), &eps], vec![])
                    }
                    DivGuard::Explicit => v(den),
                };
                emitter.op("Div", &[&v(num), &den], vec![])
            }
            Node::Neg(a) => emitter.op("Neg", &[&v(a)], vec![]),
            Node::Compare { op, lhs, rhs } => compare(&mut emitter, *op, &v(lhs), &v(rhs)),
            Node::Mean { value, filter } => match filter {
                None => emitter.op("ReduceMean", &[&v(value)], vec![attr_int("keepdims", 0)]),
                Some(mask) => {
                    let mask = v(mask);
                    let product = emitter.op("Mul", &[&v(value), &mask], vec![]);
                    let total = emitter.op("ReduceSum", &[&product], vec![attr_int("keepdims", 0)]);
                    let selected = emitter.op("ReduceSum", &[&mask], vec![attr_int("keepdims", 0)]);
                    let zero = emitter.float(0.0);
                    let any = emitter.op("Greater", &[&selected, &zero], vec![]);
                    flag = Some(match flag {
                        None => any,
                        Some(previous) => emitter.op("And", &[&previous, &any], vec![]),
                    });
                    let one = emitter.float(1.0);
                    let denominator = emitter.op("Max", &[&selected, &one], vec![]);
                    emitter.op("Div", &[&total, &denominator], vec![])
                }
            },
            Node::Sum { value, filter } => {
                let product = match filter {
                    None => v(value),
                    Some(mask) => emitter.op("Mul", &[&v(value), &v(mask)], vec![]),
                };
                emitter.op("ReduceSum", &[&product], vec![attr_int("keepdims", 0)])
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
            | Node::Not(..) => {
                let span = module.span(handle);
                return Err(OnnxError::Unsupported {
                    construct: format!("exact operator `{}` in a relaxed module", node.mnemonic()),
                    start: span.start,
                    end: span.end,
                });
            }
        };
        values[handle.index()] = Some(out);
        defined[handle.index()] = flag;
    }
    emitter.origin = "loss from the root".into();
    emitter.origin_id = "loss".into();
    let root = values[module.root.index()].clone().expect("root emitted");
    let loss = match module.root_kind {
        RootKind::Metric => {
            let one = emitter.float(1.0);
            emitter.op("Sub", &[&one, &root], vec![])
        }
        RootKind::Loss => root.clone(),
    };
    let loss = match &defined[module.root.index()] {
        None => loss,
        Some(ok) => {
            let zero = emitter.float(0.0);
            let nothing = emitter.op("Mul", &[&root, &zero], vec![]);
            emitter.op("Where", &[ok, &loss, &nothing], vec![])
        }
    };
    emitter.nodes.push(NodeProto {
        input: vec![loss],
        output: vec!["loss".into()],
        name: "loss_output".into(),
        op_type: "Identity".into(),
        doc_string: "the loss".into(),
        ..Default::default()
    });
    let outputs = vec![value_info("loss", DataType::FLOAT, &[])];
    let mut model = model(compiled, curves, emitter, outputs, "loss");
    if source == CurveSource::Input {
        if let Some(graph) = model.graph.as_mut() {
            graph.input.push(value_info("curves", DataType::FLOAT, &["curve_coordinates"]));
        }
    }
    Ok(model)
}

/// Emit the exact metric's accumulator graph: one output per count.
pub fn emit_exact(compiled: &Compiled) -> Result<ModelProto, OnnxError> {
    let module = &compiled.exact;
    assert_eq!(module.mode, Mode::Exact);
    let mut emitter = Emitter::new();
    let mut values: Vec<Option<String>> = vec![None; module.len()];
    let mut outputs = Vec::new();
    let mut accumulators = Vec::new();
    for handle in module.handles() {
        let node = module.node(handle);
        emitter.origin = format!("IR {handle} `{}` from rule {}", node.mnemonic(), module.rules[handle.index()]);
        emitter.origin_id = format!("n{}_{}", handle.index(), node.mnemonic());
        let pixel = matches!(module.shape(handle), Shape::Pixels | Shape::ClassPixels(_));
        let v = |h: &Handle| values[h.index()].clone().expect("pixel operands come first");
        let out = match node {
            Node::Pred => {
                let argmax = emitter.op("ArgMax", &["logits"], vec![attr_int("axis", 1), attr_int("keepdims", 1)]);
                let range = emitter.class_range();
                let equal = emitter.op("Equal", &[&argmax, &range], vec![]);
                Some(emitter.cast_float(&equal))
            }
            Node::Labels => Some(emitter.one_hot_labels()),
            Node::Valid => Some(emitter.valid()),
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
                    _ => nll_sum(&mut emitter),
                };
                let name = format!("count_{}", handle.index());
                emitter.nodes.push(NodeProto {
                    input: vec![summed],
                    output: vec![name.clone()],
                    name: format!("{name}_output"),
                    op_type: "Identity".into(),
                    doc_string: emitter.origin.clone(),
                    ..Default::default()
                });
                let per_class = matches!(module.shape(handle), Shape::Classes(_));
                outputs.push(value_info(&name, DataType::FLOAT, if per_class { &["C_out"] } else { &[] }));
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
            | Node::Add(..)
            | Node::Sub(..)
            | Node::Mul(..)
            | Node::Div { .. }
            | Node::Neg(_)
            | Node::Compare { .. }
            | Node::Mean { .. }
            | Node::Sum { .. }
            | Node::Term { .. } => None,
            Node::Softmax | Node::Curve { .. } => {
                let span = module.span(handle);
                return Err(OnnxError::Unsupported {
                    construct: format!("surrogate node `{}` in an exact module", node.mnemonic()),
                    start: span.start,
                    end: span.end,
                });
            }
        };
        values[handle.index()] = out;
    }
    let mut model = model(compiled, &[], emitter, outputs, "exact counts");
    model.metadata_props.push(StringStringEntryProto {
        key: "losscc.accumulators".into(),
        value: serde_json::Value::Array(accumulators).to_string(),
        ..Default::default()
    });
    Ok(model)
}

fn slice(emitter: &mut Emitter, x: &str, shape: Shape, start: usize, end: Option<usize>) -> String {
    let axis = match shape {
        Shape::ClassPixels(_) => 1,
        _ => 0,
    };
    let starts = emitter.ints(&[start as i64], false);
    let ends = emitter.ints(&[end.map(|e| e as i64).unwrap_or(i64::MAX)], false);
    let axes = emitter.ints(&[axis], false);
    emitter.op("Slice", &[x, &starts, &ends, &axes], vec![])
}

fn count(emitter: &mut Emitter, x: &str, shape: Shape) -> String {
    match shape {
        Shape::ClassPixels(_) => {
            let axes = emitter.ints(&[0, 2, 3], false);
            emitter.op("ReduceSum", &[x, &axes], vec![attr_int("keepdims", 0)])
        }
        _ => emitter.op("ReduceSum", &[x], vec![attr_int("keepdims", 0)]),
    }
}

fn nll_sum(emitter: &mut Emitter) -> String {
    let log_probabilities = emitter.op("LogSoftmax", &["logits"], vec![attr_int("axis", 1)]);
    let one_hot = emitter.one_hot_labels();
    let picked = emitter.op("Mul", &[&log_probabilities, &one_hot], vec![]);
    let total = emitter.op("ReduceSum", &[&picked], vec![attr_int("keepdims", 0)]);
    emitter.op("Neg", &[&total], vec![])
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
) -> ModelProto {
    let graph = GraphProto {
        name: format!("losscc_{}", compiled.exact.name),
        node: emitter.nodes,
        initializer: emitter.initializers,
        input: vec![
            value_info("logits", DataType::FLOAT, &["N", "C", "H", "W"]),
            value_info("labels", DataType::INT64, &["N", "H", "W"]),
        ],
        output: outputs,
        doc_string: format!("losscc {what} of `{}`", compiled.exact.name),
        ..Default::default()
    };
    let curves_json: Vec<serde_json::Value> = compiled
        .manifest
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
