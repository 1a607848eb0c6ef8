//! The losscc intermediate representation: a flat arena of nodes addressed by `Copy` handles.
//!
//! Invariants (checked by [`crate::validate`]):
//! * operands come before users: every handle a node refers to is smaller than its own;
//! * every node has a [`Shape`] and a source [`Span`] in side tables of the same length;
//! * exact set operators (`And`, `Or`, `Xor`, `Not`, `Pred`) appear only in an exact
//!   module; `Curve` and `Softmax` appear only in a relaxed one;
//! * accumulator nodes (`Count`, `NllSum`) are the only bridge from pixel tensors to
//!   per-class numbers, so everything above them can be evaluated from accumulated counts.
//!
//! The node enum is closed and matched exhaustively everywhere it is interpreted, so adding a
//! node breaks the build wherever it must be handled.

use grammar::ast::Span;
use serde::Serialize;
use std::fmt;

/// An index into a [`Module`]'s node arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Handle(u32);

impl Handle {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

/// Which classes of the logits a class-indexed value covers: `start..end`, where `end`
/// counts from the back (`end_from_back = 0` means "up to C").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ClassRange {
    pub start: usize,
    /// Absolute end if `Some`, otherwise C.
    pub end: Option<usize>,
}

impl ClassRange {
    pub const ALL: ClassRange = ClassRange { start: 0, end: None };

    /// The number of classes covered when the logits have `classes` channels, or `None`
    /// when the range does not fit.
    pub fn len(self, classes: usize) -> Option<usize> {
        let end = self.end.unwrap_or(classes);
        if end > classes || self.start >= end {
            None
        } else {
            Some(end - self.start)
        }
    }

    /// Restrict this range by a slice `start..end` given relative to it.
    pub fn slice(self, start: usize, end: Option<usize>) -> ClassRange {
        let new_end = match (end, self.end) {
            (Some(e), _) => Some(self.start + e),
            (None, outer) => outer,
        };
        ClassRange { start: self.start + start, end: new_end }
    }
}

impl fmt::Display for ClassRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.end {
            Some(end) => write!(f, "{}:{}", self.start, end),
            None => write!(f, "{}:", self.start),
        }
    }
}

/// The shape class of a value; sizes come from the input tensors at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Shape {
    /// `[N,1,H,W]`: one pixel set.
    Pixels,
    /// `[N,C',H,W]`: one pixel set per class in the range.
    ClassPixels(ClassRange),
    /// `[C']`: one number per class.
    Classes(ClassRange),
    /// `[]`: one number.
    Scalar,
}

/// Comparison operators that produce class masks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum CmpOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl CmpOp {
    pub fn apply(self, a: f64, b: f64) -> bool {
        match self {
            CmpOp::Lt => a < b,
            CmpOp::Le => a <= b,
            CmpOp::Gt => a > b,
            CmpOp::Ge => a >= b,
            CmpOp::Eq => a == b,
            CmpOp::Ne => a != b,
        }
    }

    pub fn symbol(self) -> &'static str {
        match self {
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
        }
    }
}

/// How a division guards against a zero denominator.
///
/// In exact mode `x / 0` is undefined (NaN, skipped by `mean`) under either guard. In
/// surrogate mode every back end divides *zero-safely*: after the guard, a denominator that
/// is exactly 0 gives 0 with zero gradient, so no value is ever NaN or infinite, even for a
/// denominator that can cancel (a soft `xor` can be negative).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum DivGuard {
    /// Surrogate mode: the denominator gets `+1e-8`, as in the published losses.
    Auto,
    /// The user wrote `/ (d + eps)` with a positive literal `eps`; nothing more is added.
    Explicit,
}

/// The label that marks ignored pixels unless the user chooses another value (or none).
/// Ignored pixels belong to no class of `L` and are outside `V`.
pub const DEFAULT_IGNORE_LABEL: i64 = 255;

/// The epsilon the surrogate adds to [`DivGuard::Auto`] denominators.
pub const SURROGATE_EPS: f64 = 1e-8;

/// A constant stored by its bits so that nodes can be hashed for CSE.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Float(u64);

impl Float {
    pub fn new(value: f64) -> Float {
        // Normalise -0.0 so that CSE merges it with 0.0.
        Float(if value == 0.0 { 0.0f64.to_bits() } else { value.to_bits() })
    }
    pub fn get(self) -> f64 {
        f64::from_bits(self.0)
    }
}

impl fmt::Debug for Float {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.get())
    }
}

/// An index into a relaxed module's curve manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct CurveId(pub u32);

/// One IR node. Operands are handles to earlier nodes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Node {
    // ---- inputs ----
    /// Exact predicted class sets: one-hot of `argmax(logits)` over classes, or for
    /// [`Predictions::Sigmoid`] the channels whose sigmoid exceeds the threshold.
    Pred,
    /// Surrogate predicted class sets: `softmax(logits)` over classes, or for
    /// [`Predictions::Sigmoid`] `sigmoid(logits)` per channel.
    Softmax,
    /// Label class sets: one-hot of the labels (soft labels as they are; for
    /// [`Predictions::Sigmoid`], the labels of each channel); ignored pixels belong to no class.
    Labels,
    /// Valid (not ignored) pixels.
    Valid,
    /// Pixels closer than `radius` to the image border (row or column within `radius` of an
    /// edge): where a square window of that radius reaches outside the image. Depends on
    /// neither predictions nor labels.
    Border {
        radius: u32,
    },
    /// A number known at compile time.
    Const(Float),
    /// Per-class numbers known at compile time: the weights of a weighted `mean` or `sum`,
    /// one per class of `range` (the node's shape), from the `floats` parameter `param`.
    /// The inputs must have exactly as many classes in `range` as there are values
    /// ([`Module::weights_classes`]).
    Weights {
        values: Vec<Float>,
        range: ClassRange,
        param: String,
    },
    /// A transparent marker naming the curve that a logical operator applies to this operand
    /// (`x @ name`); `None` asks for no curve.
    CurveTag {
        input: Handle,
        name: Option<String>,
    },
    /// A transparent marker on `P` inside one metric term of a loss: it keeps the term's
    /// predictions apart from other terms' (so each term gets its own curves) and gives
    /// the term's curves their name prefix and piece count.
    Scope {
        input: Handle,
        name: String,
        pieces: usize,
    },

    // ---- exact set operators ----
    And(Handle, Handle),
    Or(Handle, Handle),
    Xor(Handle, Handle),
    Not(Handle),

    // ---- surrogate curve ----
    /// `g_θ(input)`: a monotone piecewise quadratic Bézier curve from the manifest.
    Curve {
        input: Handle,
        curve: CurveId,
    },

    // ---- pixel-set structure ----
    /// Minimum over a `(2r+1)²` window; the image border counts as inside.
    Erode {
        input: Handle,
        radius: u32,
    },
    /// Maximum over a `(2r+1)²` window; the image border counts as outside.
    Dilate {
        input: Handle,
        radius: u32,
    },
    /// Union over classes: one pixel set.
    AnyClass(Handle),
    /// Keep classes `start..end` (relative to the operand's own range).
    Slice {
        input: Handle,
        start: usize,
        end: Option<usize>,
    },

    // ---- accumulators ----
    /// Sum over batch and pixels: per class for class sets, one number for pixel sets.
    Count(Handle),
    /// Sum over valid pixels of the cross-entropy `-log softmax(logits)[label]`; for
    /// [`Predictions::Sigmoid`], of the binary cross-entropy averaged over channels.
    NllSum,

    // ---- arithmetic on numbers (also on pixel tensors in relaxed modules) ----
    Add(Handle, Handle),
    Sub(Handle, Handle),
    Mul(Handle, Handle),
    Div {
        num: Handle,
        den: Handle,
        guard: DivGuard,
    },
    Neg(Handle),
    /// A 0/1 mask from comparing numbers.
    Compare {
        op: CmpOp,
        lhs: Handle,
        rhs: Handle,
    },
    /// Mean over classes, optionally only where `filter` is 1. Exact mode skips undefined
    /// entries; the surrogate averages every selected class.
    Mean {
        value: Handle,
        filter: Option<Handle>,
    },
    /// Sum over classes, optionally only where `filter` is 1.
    Sum {
        value: Handle,
        filter: Option<Handle>,
    },
    /// A metric term inside a loss: evaluates to `value`, but when `value` is undefined the
    /// surrogate uses 1 (so `1 - metric` contributes nothing) and reports it.
    Term {
        value: Handle,
        name: String,
    },
}

impl Node {
    /// The operands of this node in a fixed order.
    pub fn operands(&self) -> Vec<Handle> {
        match self {
            Node::Pred
            | Node::Softmax
            | Node::Labels
            | Node::Valid
            | Node::Border { .. }
            | Node::Const(_)
            | Node::Weights { .. }
            | Node::NllSum => {
                vec![]
            }
            Node::CurveTag { input, .. }
            | Node::Scope { input, .. }
            | Node::Not(input)
            | Node::Curve { input, .. }
            | Node::Erode { input, .. }
            | Node::Dilate { input, .. }
            | Node::AnyClass(input)
            | Node::Slice { input, .. }
            | Node::Count(input)
            | Node::Neg(input)
            | Node::Term { value: input, .. } => vec![*input],
            Node::And(a, b)
            | Node::Or(a, b)
            | Node::Xor(a, b)
            | Node::Add(a, b)
            | Node::Sub(a, b)
            | Node::Mul(a, b) => {
                vec![*a, *b]
            }
            Node::Div { num, den, .. } => vec![*num, *den],
            Node::Compare { lhs, rhs, .. } => vec![*lhs, *rhs],
            Node::Mean { value, filter } | Node::Sum { value, filter } => {
                let mut operands = vec![*value];
                operands.extend(filter.iter().copied());
                operands
            }
        }
    }

    /// The node's mnemonic in dumps.
    pub fn mnemonic(&self) -> &'static str {
        match self {
            Node::Pred => "pred",
            Node::Softmax => "softmax",
            Node::Labels => "labels",
            Node::Valid => "valid",
            Node::Border { .. } => "border",
            Node::Const(_) => "const",
            Node::Weights { .. } => "weights",
            Node::CurveTag { .. } => "curve_tag",
            Node::Scope { .. } => "scope",
            Node::And(..) => "and",
            Node::Or(..) => "or",
            Node::Xor(..) => "xor",
            Node::Not(..) => "not",
            Node::Curve { .. } => "curve",
            Node::Erode { .. } => "erode",
            Node::Dilate { .. } => "dilate",
            Node::AnyClass(..) => "any",
            Node::Slice { .. } => "slice",
            Node::Count(..) => "count",
            Node::NllSum => "nll_sum",
            Node::Add(..) => "add",
            Node::Sub(..) => "sub",
            Node::Mul(..) => "mul",
            Node::Div { .. } => "div",
            Node::Neg(..) => "neg",
            Node::Compare { .. } => "cmp",
            Node::Mean { .. } => "mean",
            Node::Sum { .. } => "sum",
            Node::Term { .. } => "term",
        }
    }

    /// Whether this node sums pixel tensors into numbers (additive across batches).
    pub fn is_accumulator(&self) -> bool {
        matches!(self, Node::Count(_) | Node::NllSum)
    }
}

/// Which semantics a module's set operators carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Mode {
    /// The metric itself, on argmax predictions.
    Exact,
    /// The differentiable surrogate with curves.
    Relaxed,
}

/// How predictions are made from the logits (`with sigmoid = true` in a definition).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum Predictions {
    /// Classes exclude each other: `P` is `softmax(logits)` over classes, exactly the
    /// one-hot of the argmax; labels are class indices (or soft labels). The default.
    Softmax,
    /// Channels are independent (binary or multi-label): `P` is `sigmoid(logits)` per
    /// channel, exactly `sigmoid(logits) > threshold`; labels are `{0, 1}` per channel.
    Sigmoid { threshold: f64 },
}

impl Predictions {
    pub fn is_sigmoid(self) -> bool {
        matches!(self, Predictions::Sigmoid { .. })
    }

    /// The logit above which exact sigmoid predictions hold: `ln(t / (1 − t))`, so that
    /// `logit > cut` exactly when `sigmoid(logit) > t` (0 for the default 0.5).
    pub fn logit_cut(self) -> Option<f64> {
        match self {
            Predictions::Softmax => None,
            Predictions::Sigmoid { threshold } => Some((threshold / (1.0 - threshold)).ln()),
        }
    }
}

impl fmt::Display for Predictions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Predictions::Softmax => write!(f, "softmax"),
            Predictions::Sigmoid { threshold } => write!(f, "sigmoid (threshold {threshold})"),
        }
    }
}

/// What the root value means for the loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum RootKind {
    /// A metric (higher is better): the surrogate loss is `1 - root`.
    Metric,
    /// A loss expression (lower is better): the surrogate loss is the root itself.
    Loss,
}

/// A named per-class or scalar value a module reports besides its root.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub name: String,
    pub value: Handle,
}

/// A compiled metric or loss: the arena plus side tables.
#[derive(Clone, Debug, Serialize)]
pub struct Module {
    pub name: String,
    pub mode: Mode,
    pub root_kind: RootKind,
    pub nodes: Vec<Node>,
    pub shapes: Vec<Shape>,
    pub spans: Vec<Span>,
    /// The rewrite rule that produced each node (`"lower"` for nodes straight from source).
    pub rules: Vec<&'static str>,
    pub root: Handle,
    /// Values worth showing users: per-class values of the top-level reduction, metric terms.
    pub reports: Vec<Report>,
    /// The smallest number of classes the module's slices need.
    pub min_classes: usize,
    /// Bézier pieces per curve for curves outside any [`Node::Scope`].
    pub pieces: usize,
    /// How `P` (and `L`, `V` and `ce`) read the inputs.
    pub predictions: Predictions,
    /// The metric of each image, averaged over images (`with per_image = true`): counts sum
    /// over one image's pixels, everything above them is per image, and the root is the mean
    /// over images (exact mode: over images where it is defined).
    pub per_image: bool,
}

impl Module {
    pub fn node(&self, handle: Handle) -> &Node {
        &self.nodes[handle.index()]
    }

    pub fn shape(&self, handle: Handle) -> Shape {
        self.shapes[handle.index()]
    }

    pub fn span(&self, handle: Handle) -> Span {
        self.spans[handle.index()]
    }

    pub fn handles(&self) -> impl DoubleEndedIterator<Item = Handle> + ExactSizeIterator {
        (0..self.nodes.len() as u32).map(Handle)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Checks the number of classes `classes` of the inputs against the module's needs: enough
    /// for its slices ([`Module::min_classes`]) and exactly as many as its per-class weights
    /// cover. The error is one sentence that says what to change.
    pub fn check_classes(&self, classes: usize) -> Result<(), String> {
        if classes < self.min_classes {
            return Err(format!(
                "this metric needs at least {} classes (it slices classes), but the logits have {classes}",
                self.min_classes
            ));
        }
        for node in &self.nodes {
            if let Node::Weights { values, range, param } = node {
                if range.len(classes) != Some(values.len()) {
                    let covered = match range.len(classes) {
                        Some(n) => format!("{n} classes ({}..{})", range.start, range.start + n),
                        None => "no class".to_string(),
                    };
                    return Err(format!(
                        "parameter `{param}` gives {} weights, but the reduction it weights covers {covered} of the logits' {classes}; give one weight per class, for example `--set {param}={}`",
                        values.len(),
                        vec!["1"; range.len(classes).unwrap_or(1)].join(",")
                    ));
                }
            }
        }
        Ok(())
    }

    /// The number of classes the inputs must have because of per-class weights on a reduction
    /// over classes `start..` (to the last class), and the parameter that fixes it.
    pub fn weights_classes(&self) -> Option<(usize, &str)> {
        self.nodes.iter().find_map(|node| match node {
            Node::Weights { values, range, param } if range.end.is_none() => {
                Some((range.start + values.len(), param.as_str()))
            }
            _ => None,
        })
    }
}

/// Appends nodes to an arena, merging structurally equal nodes (common-subexpression
/// elimination by hash-consing: a node is only ever built once).
#[derive(Default)]
pub struct Builder {
    pub nodes: Vec<Node>,
    pub shapes: Vec<Shape>,
    pub spans: Vec<Span>,
    pub rules: Vec<&'static str>,
    interned: std::collections::HashMap<Node, Handle>,
}

impl Builder {
    /// Add `node` (or find the equal node already added). The first span and rule win.
    pub fn add(&mut self, node: Node, shape: Shape, span: Span, rule: &'static str) -> Handle {
        if let Some(existing) = self.interned.get(&node) {
            return *existing;
        }
        let handle = Handle(self.nodes.len() as u32);
        self.interned.insert(node.clone(), handle);
        self.nodes.push(node);
        self.shapes.push(shape);
        self.spans.push(span);
        self.rules.push(rule);
        handle
    }

    pub fn shape(&self, handle: Handle) -> Shape {
        self.shapes[handle.index()]
    }

    pub fn node(&self, handle: Handle) -> &Node {
        &self.nodes[handle.index()]
    }

    pub fn constant(&mut self, value: f64, span: Span, rule: &'static str) -> Handle {
        self.add(Node::Const(Float::new(value)), Shape::Scalar, span, rule)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn finish(
        self,
        name: String,
        mode: Mode,
        root_kind: RootKind,
        root: Handle,
        reports: Vec<Report>,
        min_classes: usize,
        pieces: usize,
        predictions: Predictions,
        per_image: bool,
    ) -> Module {
        Module {
            name,
            mode,
            root_kind,
            nodes: self.nodes,
            shapes: self.shapes,
            spans: self.spans,
            rules: self.rules,
            root,
            reports,
            min_classes,
            pieces,
            predictions,
            per_image,
        }
    }
}

/// The handle of the node at `index`. Only for code that walks an arena densely.
pub fn handle_from_index(index: usize) -> Handle {
    Handle(index as u32)
}
