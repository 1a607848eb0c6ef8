//! The ONNX node writer shared by every graph losscc emits: named outputs, constants as
//! initializers, the label and pooling primitives, and the curve math's [`CurveOps`] for
//! graph values (so curves are emitted by the one definition in [`crate::curve::math`]).

use crate::curve::math::CurveOps;
use crate::ir::Predictions;
use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::tensor_shape_proto::Dimension;
use onnx_protobuf::type_proto;
use onnx_protobuf::{AttributeProto, NodeProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto};
use protobuf::{EnumOrUnknown, MessageField};
use std::collections::HashMap;

/// ONNX's `i` field of `AttributeProto` (field number 3).
const ATTRIBUTE_I_FIELD: u32 = 3;

pub(crate) fn attr_int(name: &str, value: i64) -> AttributeProto {
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

pub(crate) fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        type_: EnumOrUnknown::new(AttributeType::INTS),
        ints: values.to_vec(),
        ..Default::default()
    }
}

/// A graph input or output: element type and symbolic dimensions (none for a scalar).
pub(crate) fn value_info(name: &str, elem: DataType, dims: &[&str]) -> ValueInfoProto {
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

/// Give dimension `axis` of a graph input or output the fixed size `size`.
pub(crate) fn fix_dim(info: &mut ValueInfoProto, axis: usize, size: usize) {
    if let Some(type_proto::Value::TensorType(tensor)) = info.type_.as_mut().and_then(|t| t.value.as_mut()) {
        if let Some(dim) = tensor.shape.as_mut().and_then(|s| s.dim.get_mut(axis)) {
            dim.set_dim_value(size as i64);
        }
    }
}

/// Builds a node list, naming every output after the IR node it implements.
pub(crate) struct Emitter {
    pub nodes: Vec<NodeProto>,
    pub initializers: Vec<TensorProto>,
    float_constants: HashMap<u32, String>,
    /// The value of every float constant by name, so arithmetic on constants folds.
    constant_values: HashMap<String, f64>,
    int_constants: HashMap<Vec<i64>, String>,
    counter: usize,
    /// The IR node and rule being emitted, for names and doc strings.
    pub origin: String,
    pub origin_id: String,
    shared: HashMap<String, String>,
    /// The label value of ignored pixels, if any.
    ignore_label: Option<i64>,
    /// Spatial axes of the inputs: 2 for images `[N, C, H, W]`, 3 for volumes.
    spatial: usize,
    /// The `labels` input holds soft labels (probabilities of the logits' shape).
    pub soft_labels: bool,
    /// Labels are class sets of the argmax even for soft labels (the exact-count graph).
    pub hard_labels: bool,
    /// Softmax over classes, or a sigmoid per channel: how `P`, `L`, `V` and `ce` read the
    /// inputs. With a sigmoid, `labels` is either class indices (one-hot; `{0, 1}` for a
    /// one-channel, binary model), or (with `soft_labels`) per-channel targets of the logits'
    /// shape, where the ignore value in any channel marks the pixel ignored.
    pub predictions: Predictions,
    /// A per-image module: per-class numbers are `[N, C]` and numbers `[N, 1]` (one row per
    /// image) instead of `[C]` and `[]`; counts sum over each image's pixels only.
    pub per_image: bool,
}

impl Emitter {
    pub fn new(ignore_label: Option<i64>, spatial: usize) -> Emitter {
        Emitter {
            nodes: Vec::new(),
            initializers: Vec::new(),
            float_constants: HashMap::new(),
            constant_values: HashMap::new(),
            int_constants: HashMap::new(),
            counter: 0,
            origin: String::from("graph inputs"),
            origin_id: String::from("input"),
            shared: HashMap::new(),
            ignore_label,
            spatial,
            soft_labels: false,
            hard_labels: false,
            predictions: Predictions::Softmax,
            per_image: false,
        }
    }

    /// The axis of a value's classes: 1 for pixel sets `[N, C, ...]` and for a per-image
    /// module's per-class numbers `[N, C]`, else 0.
    pub fn class_axis(&self, shape: crate::ir::Shape) -> i64 {
        use crate::ir::Shape;
        match shape {
            Shape::ClassPixels(_) => 1,
            Shape::Classes(_) | Shape::Scalar if self.per_image => 1,
            Shape::Pixels | Shape::Classes(_) | Shape::Scalar => 0,
        }
    }

    /// `op` (`ReduceSum`, `ReduceMean`) of per-class numbers over their classes: to a number
    /// (`[]`, or `[N, 1]` per image).
    pub fn over_classes(&mut self, op: &str, x: &str) -> String {
        if !self.per_image {
            return self.op(op, &[x], vec![attr_int("keepdims", 0)]);
        }
        if op == "ReduceSum" {
            // Opset 17: ReduceSum takes its axes as an input, the others as an attribute.
            let axes = self.ints(&[1], false);
            return self.op(op, &[x, &axes], vec![attr_int("keepdims", 1)]);
        }
        self.op(op, &[x], vec![attr_ints("axes", &[1]), attr_int("keepdims", 1)])
    }

    /// The sum of a pixel tensor `[N, C, ...]` to a number: `[]`, or `[N, 1]` per image.
    pub fn pixel_total(&mut self, x: &str) -> String {
        if !self.per_image {
            return self.op("ReduceSum", &[x], vec![attr_int("keepdims", 0)]);
        }
        let axes: Vec<i64> = (1..self.rank() as i64).collect();
        let axes = self.ints(&axes, false);
        let summed = self.op("ReduceSum", &[x, &axes], vec![attr_int("keepdims", 1)]);
        let rows = self.ints(&[0, -1], false);
        self.op("Reshape", &[&summed, &rows], vec![])
    }

    /// The axes a count sums over: the batch (not per image) and the spatial axes.
    pub fn count_axes_of_module(&self) -> Vec<i64> {
        if self.per_image {
            self.spatial_axes()
        } else {
            self.count_axes()
        }
    }

    /// Soft labels' total per pixel, `[N, 1, ...]`: 1 at a labelled pixel, 0 at an ignored one.
    fn label_mass(&mut self) -> String {
        self.shared("label_mass", |this| {
            let axes = this.ints(&[1], false);
            this.op("ReduceSum", &["labels", &axes], vec![attr_int("keepdims", 1)])
        })
    }

    /// The spatial axes of the logits: `[2, 3]` for images, `[2, 3, 4]` for volumes.
    pub fn spatial_axes(&self) -> Vec<i64> {
        (2..2 + self.spatial as i64).collect()
    }

    /// The axes a count sums over: the batch and the spatial axes.
    pub fn count_axes(&self) -> Vec<i64> {
        std::iter::once(0).chain(self.spatial_axes()).collect()
    }

    /// The rank of the logits.
    pub fn rank(&self) -> usize {
        2 + self.spatial
    }

    /// Say which IR node the following graph nodes implement.
    pub fn at(&mut self, origin: String, origin_id: String) {
        self.origin = origin;
        self.origin_id = origin_id;
    }

    pub fn op(&mut self, op_type: &str, inputs: &[&str], attributes: Vec<AttributeProto>) -> String {
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

    /// An `Identity` from `input` to the graph output `name`.
    pub fn output(&mut self, input: &str, name: &str, doc: &str) {
        self.nodes.push(NodeProto {
            input: vec![input.into()],
            output: vec![name.into()],
            name: format!("{name}_output"),
            op_type: "Identity".into(),
            doc_string: doc.into(),
            ..Default::default()
        });
    }

    pub fn float(&mut self, value: f64) -> String {
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
        self.constant_values.insert(name.clone(), value as f64);
        name
    }

    /// How many classes a `where:` mask selects, and that count but at least 1 (the divisor of
    /// a filtered mean): built once per mask, shared by every mean with that filter and by
    /// their gradients (tract fails to run a graph holding two copies).
    pub fn mask_count(&mut self, mask: &str) -> (String, String) {
        let selected = self.shared(&format!("selected:{mask}"), |e| e.over_classes("ReduceSum", mask));
        let one = self.float(1.0);
        let divisor = self.shared(&format!("max:{mask}"), |e| e.op("Max", &[&selected, &one], vec![]));
        (selected, divisor)
    }

    /// A float32 vector initializer: one number per class of a per-class value.
    pub fn floats(&mut self, values: &[f64]) -> String {
        let name = format!("const_v{}", self.initializers.len());
        self.initializers.push(TensorProto {
            name: name.clone(),
            data_type: DataType::FLOAT as i32,
            dims: vec![values.len() as i64],
            float_data: values.iter().map(|v| *v as f32).collect(),
            ..Default::default()
        });
        name
    }

    /// `f(a, b)` as a new constant when both are constants.
    fn fold(&mut self, a: &str, b: &str, f: impl Fn(f64, f64) -> f64) -> Option<String> {
        let (x, y) = (*self.constant_values.get(a)?, *self.constant_values.get(b)?);
        Some(self.float(f(x, y)))
    }

    /// An int64 constant: a scalar when `scalar`, else a 1-D tensor.
    pub fn ints(&mut self, values: &[i64], scalar: bool) -> String {
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

    pub fn clip(&mut self, x: &str, low: f64, high: f64) -> String {
        let (lo, hi) = (self.float(low), self.float(high));
        self.op("Clip", &[x, &lo, &hi], vec![])
    }

    pub fn cast_float(&mut self, x: &str) -> String {
        self.op("Cast", &[x], vec![attr_int("to", DataType::FLOAT as i64)])
    }

    /// A value computed once per graph: the first call emits it, later calls reuse it.
    pub(crate) fn shared(&mut self, key: &str, make: impl FnOnce(&mut Self) -> String) -> String {
        if let Some(name) = self.shared.get(key) {
            return name.clone();
        }
        let value = make(self);
        self.shared.insert(key.to_string(), value.clone());
        value
    }

    /// `[1, C, 1, 1]` class indices as floats, `0, 1, …, C − 1`, computed from the logits
    /// themselves (a cumulative sum of ones over the class axis) rather than from their shape,
    /// so that every runtime, tract included, knows the class axis has the logits' C.
    pub fn class_range(&mut self) -> String {
        self.shared("range", |this| {
            // Opset 17: ReduceMax takes its axes as an attribute (ReduceSum as an input).
            let axes = this.count_axes();
            let reduced = this.op("ReduceMax", &["logits"], vec![attr_ints("axes", &axes), attr_int("keepdims", 1)]);
            let zero = this.float(0.0);
            let zeros = this.op("Mul", &[&reduced, &zero], vec![]);
            let one = this.float(1.0);
            let ones = this.op("Add", &[&zeros, &one], vec![]);
            let axis = this.ints(&[1], true);
            // Both attributes spelled out: onnx2torch 1.5.15 reads a missing `reverse` as 1.
            let forward = vec![attr_int("exclusive", 0), attr_int("reverse", 0)];
            let counted = this.op("CumSum", &[&ones, &axis], forward);
            this.op("Sub", &[&counted, &one], vec![])
        })
    }

    /// The labels as floats `[N, 1, H, W]`, to compare with [`Emitter::class_range`] (for soft
    /// labels, their argmax; where they are all 0 the valid mask excludes the pixel).
    fn labels_float(&mut self) -> String {
        if self.soft_labels {
            return self.shared("labels1f", |this| {
                let argmax = this.op("ArgMax", &["labels"], vec![attr_int("axis", 1), attr_int("keepdims", 1)]);
                this.cast_float(&argmax)
            });
        }
        self.shared("labels1f", |this| {
            let labels = this.labels_unsqueezed();
            this.cast_float(&labels)
        })
    }

    fn labels_unsqueezed(&mut self) -> String {
        self.shared("labels1", |this| {
            let axes = this.ints(&[1], false);
            this.op("Unsqueeze", &["labels", &axes], vec![])
        })
    }

    /// Valid pixels as a boolean `[N, 1, H, W]` (every pixel without an ignore label).
    fn valid_mask(&mut self) -> Option<String> {
        if self.soft_labels && self.predictions.is_sigmoid() {
            // Per-channel targets: a pixel is ignored where any channel holds the ignore value.
            let ignore = self.ignore_label?;
            return Some(self.shared("valid_mask", |this| {
                let ignore = this.float(ignore as f64);
                let equal = this.op("Equal", &["labels", &ignore], vec![]);
                let equal = this.cast_float(&equal);
                let any = this.op("ReduceMax", &[&equal], vec![attr_ints("axes", &[1]), attr_int("keepdims", 1)]);
                let half = this.float(0.5);
                this.op("Less", &[&any, &half], vec![])
            }));
        }
        if self.soft_labels {
            return Some(self.shared("valid_mask", |this| {
                let mass = this.label_mass();
                let half = this.float(0.5);
                this.op("Greater", &[&mass, &half], vec![])
            }));
        }
        let ignore = self.ignore_label?;
        Some(self.shared("valid_mask", |this| {
            let labels = this.labels_unsqueezed();
            let ignore = this.ints(&[ignore], true);
            let equal = this.op("Equal", &[&labels, &ignore], vec![]);
            this.op("Not", &[&equal], vec![])
        }))
    }

    /// One-hot labels, float `[N, C, H, W]`; ignored pixels belong to no class.
    pub fn one_hot_labels(&mut self) -> String {
        if self.predictions.is_sigmoid() {
            return self.channel_labels();
        }
        if self.soft_labels && !self.hard_labels {
            return "labels".to_string();
        }
        self.shared("onehot", |this| {
            let (labels, range) = (this.labels_float(), this.class_range());
            let equal = this.op("Equal", &[&labels, &range], vec![]);
            let equal = match this.valid_mask() {
                Some(valid) => this.op("And", &[&equal, &valid], vec![]),
                None => equal,
            };
            this.cast_float(&equal)
        })
    }

    /// The labels of a sigmoid model's channels, float `[N, C, H, W]`, 0 at ignored pixels:
    /// per-channel targets as they are (above 0.5 for the exact-count graph), or class
    /// indices one-hot (for one channel, the foreground `labels == 1`).
    fn channel_labels(&mut self) -> String {
        let key = if self.soft_labels && self.hard_labels { "channel_labels_hard" } else { "channel_labels" };
        self.shared(key, |this| {
            let set = if this.soft_labels {
                if this.hard_labels {
                    let half = this.float(0.5);
                    this.op("Greater", &["labels", &half], vec![])
                } else {
                    let valid = this.valid();
                    return this.op("Mul", &["labels", &valid], vec![]);
                }
            } else {
                // Class indices: class `c` sets channel `c` (one-hot), except that with one
                // channel (binary) the foreground `1` sets it: the range shifts by one when
                // C = 1, which the graph learns from the logits' shape.
                let (labels, range) = (this.labels_float(), this.class_range());
                let highest = this.op("ReduceMax", &[&range], vec![attr_int("keepdims", 1)]);
                let zero = this.float(0.0);
                let single = this.op("Equal", &[&highest, &zero], vec![]);
                let shift = this.cast_float(&single);
                let channels = this.op("Add", &[&range, &shift], vec![]);
                this.op("Equal", &[&labels, &channels], vec![])
            };
            let set = match this.valid_mask() {
                Some(valid) => this.op("And", &[&set, &valid], vec![]),
                None => set,
            };
            this.cast_float(&set)
        })
    }

    /// Valid pixels, float `[N, 1, H, W]`.
    pub fn valid(&mut self) -> String {
        self.shared("valid", |this| match this.valid_mask() {
            Some(valid) => this.cast_float(&valid),
            None if this.soft_labels => {
                // Per-channel targets without an ignore value: every pixel, `[N, 1, ...]`.
                let zero = this.float(0.0);
                let zeros = this.op("Mul", &["logits", &zero], vec![]);
                let axes = this.ints(&[1], false);
                let plane = this.op("ReduceSum", &[&zeros, &axes], vec![attr_int("keepdims", 1)]);
                let one = this.float(1.0);
                this.op("Add", &[&plane, &one], vec![])
            }
            None => {
                let labels = this.labels_unsqueezed();
                let zero = this.ints(&[0], true);
                let times_zero = this.op("Mul", &[&labels, &zero], vec![]);
                let equal = this.op("Equal", &[&times_zero, &zero], vec![]);
                this.cast_float(&equal)
            }
        })
    }

    /// Pixels closer than `radius` to the image border, float `[N, 1, H, W]`: a pixel's
    /// distances to the four edges are cumulative sums of ones along H and W (forward and
    /// reversed), so H and W stay symbolic and every runtime knows the shape.
    pub fn border(&mut self, radius: u32) -> String {
        self.shared(&format!("border{radius}"), |this| {
            let labels = this.labels_float();
            let zero = this.float(0.0);
            let one = this.float(1.0);
            let zeros = this.op("Mul", &[&labels, &zero], vec![]);
            let ones = this.op("Add", &[&zeros, &one], vec![]);
            // A pixel `r` from an edge has a cumulative count of r + 1 from that edge.
            let limit = this.float(radius as f64 + 0.5);
            let mut near: Option<String> = None;
            for axis in this.spatial_axes() {
                for reverse in [0, 1] {
                    let axis = this.ints(&[axis], true);
                    let counted = this.op(
                        "CumSum",
                        &[&ones, &axis],
                        vec![attr_int("exclusive", 0), attr_int("reverse", reverse)],
                    );
                    let close = this.op("Less", &[&counted, &limit], vec![]);
                    near = Some(match near {
                        None => close,
                        Some(near) => this.op("Or", &[&near, &close], vec![]),
                    });
                }
            }
            let near = near.expect("four edges");
            this.cast_float(&near)
        })
    }

    /// Square-window maximum (minimum for erosion) of radius `radius`: the border counts as
    /// outside for dilation and inside for erosion (MaxPool pads with −∞).
    pub fn pool(&mut self, x: &str, radius: u32, erode: bool) -> String {
        let input = if erode { self.op("Neg", &[x], vec![]) } else { x.to_string() };
        let pooled = self.max_pool(&input, &vec![radius as i64; self.spatial]);
        if erode {
            self.op("Neg", &[&pooled], vec![])
        } else {
            pooled
        }
    }

    /// The maximum over a window of `2·radii + 1` (rows, columns) of every `[H, W]` plane of
    /// `[N, C, H, W]`, −∞ outside. The planes are pooled as `[N·C, 1, H, W]`, so the pooling's
    /// channel count is the constant 1 (tract pools only a known number of channels; C is
    /// symbolic here).
    pub fn max_pool(&mut self, x: &str, radii: &[i64]) -> String {
        let kernel: Vec<i64> = radii.iter().map(|r| 2 * r + 1).collect();
        let pads: Vec<i64> = radii.iter().chain(radii).copied().collect();
        let ones = vec![1i64; radii.len()];
        let attributes = vec![
            attr_ints("kernel_shape", &kernel),
            attr_ints("pads", &pads),
            attr_ints("strides", &ones),
            attr_ints("dilations", &ones),
            attr_int("ceil_mode", 0),
        ];
        let shape = self.op("Shape", &[x], vec![]);
        let axes = self.spatial_axes();
        let spatial = self.ints(&axes, false);
        let hw = self.op("Gather", &[&shape, &spatial], vec![attr_int("axis", 0)]);
        let planes = self.ints(&[-1, 1], false);
        let flat_shape = self.op("Concat", &[&planes, &hw], vec![attr_int("axis", 0)]);
        let flat = self.op("Reshape", &[x, &flat_shape], vec![]);
        let pooled = self.op("MaxPool", &[&flat], attributes);
        self.op("Reshape", &[&pooled, &shape], vec![])
    }
}

/// Curves as graph nodes: the curve math of [`crate::curve::math`] with ONNX values.
/// `x ≤ y` is written `Not(Greater(x, y))` (onnx2torch has no opset-16 `LessOrEqual`).
impl CurveOps for Emitter {
    type Value = String;
    type Mask = String;
    fn constant(&mut self, value: f64) -> String {
        self.float(value)
    }
    fn add(&mut self, a: &String, b: &String) -> String {
        self.fold(a, b, |x, y| x + y).unwrap_or_else(|| self.op("Add", &[a, b], vec![]))
    }
    fn sub(&mut self, a: &String, b: &String) -> String {
        self.fold(a, b, |x, y| x - y).unwrap_or_else(|| self.op("Sub", &[a, b], vec![]))
    }
    fn mul(&mut self, a: &String, b: &String) -> String {
        self.fold(a, b, |x, y| x * y).unwrap_or_else(|| self.op("Mul", &[a, b], vec![]))
    }
    fn div(&mut self, a: &String, b: &String) -> String {
        self.fold(a, b, |x, y| x / y).unwrap_or_else(|| self.op("Div", &[a, b], vec![]))
    }
    fn sqrt(&mut self, a: &String) -> String {
        self.op("Sqrt", &[a], vec![])
    }
    fn abs(&mut self, a: &String) -> String {
        self.op("Abs", &[a], vec![])
    }
    fn clamp(&mut self, a: &String, low: f64, high: f64) -> String {
        self.clip(a, low, high)
    }
    fn clamp_min(&mut self, a: &String, low: f64) -> String {
        self.clip(a, low, f32::MAX as f64)
    }
    fn le(&mut self, a: &String, b: &String) -> String {
        let greater = self.op("Greater", &[a, b], vec![]);
        self.op("Not", &[&greater], vec![])
    }
    fn lt(&mut self, a: &String, b: &String) -> String {
        self.op("Less", &[a, b], vec![])
    }
    fn not(&mut self, a: &String) -> String {
        self.op("Not", &[a], vec![])
    }
    fn and(&mut self, a: &String, b: &String) -> String {
        self.op("And", &[a, b], vec![])
    }
    fn select(&mut self, take: &String, a: &String, b: &String) -> String {
        self.op("Where", &[take, a, b], vec![])
    }
    fn select_mask(&mut self, take: &String, a: &String, b: &String) -> String {
        self.op("Where", &[take, a, b], vec![])
    }
    fn indicator(&mut self, mask: &String) -> String {
        self.cast_float(mask)
    }
}
