//! The one validation of logits and labels, before any tensor work.
//!
//! [`check`] accepts what users' training loops produce and turns it into a [`Batch`], the
//! only form the back ends take:
//! * logits `[N, C, H, W]` (images) or `[N, C, D, H, W]` (volumes) in float32 or float64, or float16 / bfloat16 (computed in
//!   float32; the gradient flows back to the half-precision tensor through the conversion);
//! * labels `[N, H, W]` (or `[N, D, H, W]`) of any integer type (`uint8` and `int64` are the usual), moved to the
//!   logits' device as int64;
//! * every logit finite, every label a class in `0..C` or the ignore label, enough classes
//!   for the module's slices (exactly as many as its per-class weights), non-empty images.
//!
//! Every problem is one [`InputError`] sentence that says what is wrong and what to do.

use compiler::ir::{Module, Node};
use tch::{Kind, Tensor};

/// Bad inputs, each a single sentence that says what to do.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InputError {
    #[error("logits must be images [N, C, H, W] or volumes [N, C, D, H, W], but they have shape {0:?}; add a batch dimension or check the layout")]
    LogitsRank(Vec<i64>),
    #[error("labels must have one dimension less than the logits ([N, H, W] for [N, C, H, W], [N, D, H, W] for [N, C, D, H, W]){}, but they have shape {labels:?} for logits {logits:?}", same_shape_text(*.same_shape))]
    LabelsRank { logits: Vec<i64>, labels: Vec<i64>, same_shape: SameShape },
    #[error("logits of shape {logits:?} and labels of shape {labels:?} disagree on N or the spatial sizes; labels must be the logits' shape without C")]
    ShapeMismatch { logits: Vec<i64>, labels: Vec<i64> },
    #[error("logits must be float32, float64, float16 or bfloat16, but they are {0:?}")]
    LogitsKind(Kind),
    #[error("labels must be integer class indices {labels_shape} (uint8, int32 or int64, say) or soft labels, float probabilities of the logits' shape {logits:?}, but they are {kind:?} of shape {labels:?}", labels_shape = without_classes(.logits))]
    LabelsKind { kind: Kind, labels: Vec<i64>, logits: Vec<i64> },
    #[error("soft labels must be probabilities in [0, 1] that sum to 1 over the classes at each pixel (all 0 marks an ignored pixel; an ignore value such as 255 has no place in soft labels), but {}; multi-hot labels (several classes at a pixel) need a sigmoid metric: declare it `with sigmoid = true`", soft_label_problems(*.values, *.value, *.pixels, *.sum))]
    SoftLabels {
        /// Values outside `[0, 1]` (or not finite), and one of them.
        values: i64,
        value: f64,
        /// Pixels whose labels sum to neither 1 nor 0, and one of their sums.
        pixels: i64,
        sum: f64,
    },
    #[error("a sigmoid metric's labels of the logits' shape hold one target per channel, in [0, 1] (0 and 1 for multi-hot labels) or the ignore label{} at ignored pixels, but {count} values are neither (one of them: {example})", ignore_text(.ignore))]
    ChannelLabels { count: i64, example: f64, ignore: Option<i64> },
    #[error("a sigmoid metric with one channel takes binary labels, 0 (background) and 1 (foreground){}, but {}; for several classes give the logits one channel per class", ignore_or(.ignore), counted(*.count, "pixel has another value", "pixels have other values", &.value.to_string()))]
    BinaryLabels { value: i64, count: i64, ignore: Option<i64> },
    #[error("integer labels of the logits' shape {0:?} are multi-hot (a 0/1 per class), which a softmax metric cannot read: declare the metric `with sigmoid = true` for multi-label predictions, or give class indices without C (or float soft labels)")]
    MultiHotForSoftmax(Vec<i64>),
    #[error("the logits contain {0} non-finite values (NaN or infinity); check the network's output")]
    NonFinite(i64),
    #[error("label value {value} is neither a class in 0..{classes} nor the ignore label{} ({count} {}){}", ignore_text(.ignore), pixels_with_value(.count), binary_hint(*.classes))]
    LabelValue { value: i64, classes: i64, count: i64, ignore: Option<i64> },
    /// Too few classes for the metric's slices, or not as many as its per-class weights.
    #[error("{0}")]
    Classes(String),
    #[error("an image must be at least 1x1 pixels, but the logits have shape {0:?}")]
    Empty(Vec<i64>),
}

/// Which labels of the logits' own shape the metric would take, named in
/// [`InputError::LabelsRank`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SameShape {
    /// None offered (integer labels for a softmax metric).
    None,
    /// A sigmoid metric's per-channel targets (multi-hot labels).
    Channels,
    /// Soft labels (float labels for a softmax metric).
    Soft,
}

fn same_shape_text(same_shape: SameShape) -> &'static str {
    match same_shape {
        SameShape::None => "",
        SameShape::Channels => " or, for a sigmoid metric, the logits' shape (one target per channel)",
        SameShape::Soft => " or, for soft labels, the logits' shape",
    }
}

/// `1 {one} ({example})` or `{count} {many} (one of them: {example})`.
fn counted(count: i64, one: &str, many: &str, example: &str) -> String {
    if count == 1 {
        format!("1 {one} ({example})")
    } else {
        format!("{count} {many} (one of them: {example})")
    }
}

/// The problems of soft labels, leaving out those with a count of 0.
fn soft_label_problems(values: i64, value: f64, pixels: i64, sum: f64) -> String {
    let mut problems = Vec::new();
    if values > 0 {
        problems.push(counted(values, "value is outside [0, 1]", "values are outside [0, 1]", &value.to_string()));
    }
    if pixels > 0 {
        problems.push(counted(
            pixels,
            "pixel sums to neither 1 nor 0",
            "pixels sum to neither 1 nor 0",
            &sum.to_string(),
        ));
    }
    problems.join(" and ")
}

/// One class for a softmax metric: a binary model is a sigmoid one.
fn binary_hint(classes: i64) -> &'static str {
    if classes == 1 {
        "; for a binary model with one output channel declare the metric `with sigmoid = true`"
    } else {
        ""
    }
}

/// The labels' shape for these logits: without the class axis.
fn without_classes(logits: &[i64]) -> String {
    let mut shape = logits.to_vec();
    if shape.len() > 1 {
        shape.remove(1);
    }
    format!("{shape:?}")
}

fn ignore_text(ignore: &Option<i64>) -> String {
    match ignore {
        Some(value) => format!(" {value}"),
        None => " (there is none: every label must be a class)".into(),
    }
}

fn ignore_or(ignore: &Option<i64>) -> String {
    match ignore {
        Some(value) => format!(" or the ignore label {value}"),
        None => String::new(),
    }
}

fn pixels_with_value(count: &i64) -> &'static str {
    if *count == 1 {
        "pixel has such a value"
    } else {
        "pixels have such values"
    }
}

/// Checked inputs: logits in float32 or float64, int64 labels on the logits' device, and the
/// ignore label they were checked against. Back ends take nothing else.
pub struct Batch<'a> {
    pub(crate) logits: &'a Tensor,
    /// Class indices; for soft labels their argmax, [`SOFT_IGNORED`] where they are all 0.
    pub(crate) labels: &'a Tensor,
    pub(crate) ignore_label: Option<i64>,
    /// Soft labels `[N, C, ...]` in the logits' kind, when the user gave probabilities: the
    /// surrogate's `L` (and the cross-entropy's target) as they are.
    pub(crate) soft_labels: Option<&'a Tensor>,
}

/// The class index that marks a pixel whose soft labels are all 0 (ignored), in the labels
/// derived from soft labels.
pub(crate) const SOFT_IGNORED: i64 = -1;

/// Inputs converted as [`check`] needs them, owned; [`Checked::batch`] borrows a [`Batch`].
pub(crate) struct Checked {
    logits: Tensor,
    labels: Tensor,
    ignore_label: Option<i64>,
    soft_labels: Option<Tensor>,
}

impl Checked {
    pub(crate) fn batch(&self) -> Batch<'_> {
        Batch {
            logits: &self.logits,
            labels: &self.labels,
            ignore_label: self.ignore_label,
            soft_labels: self.soft_labels.as_ref(),
        }
    }

    /// Image `index` of the batch alone (views of one image, `[1, ...]`): a per-image
    /// metric evaluates each image by itself.
    pub(crate) fn image(&self, index: i64) -> Checked {
        Checked {
            logits: self.logits.narrow(0, index, 1),
            labels: self.labels.narrow(0, index, 1),
            ignore_label: self.ignore_label,
            soft_labels: self.soft_labels.as_ref().map(|soft| soft.narrow(0, index, 1)),
        }
    }

    /// Volumes `[N, C, D, H, W]` as images `[N, C, D·H, W]` (views: the gradient flows back
    /// to the volume). Only for modules without windows or borders ([`has_windows`]), whose
    /// every other operation is per pixel, so the 2-D back ends compute them exactly.
    pub(crate) fn volumes_as_images(self) -> Checked {
        if self.logits.dim() != 5 {
            return self;
        }
        Checked {
            logits: self.logits.flatten(2, 3),
            labels: self.labels.flatten(1, 2),
            ignore_label: self.ignore_label,
            soft_labels: self.soft_labels.map(|soft| soft.flatten(2, 3)),
        }
    }
}

/// Whether a module looks at pixel neighbourhoods (`erode`, `dilate`, `boundary`, `border`),
/// which differ between a volume and its slices laid end to end.
pub(crate) fn has_windows(module: &Module) -> bool {
    module.nodes.iter().any(|node| matches!(node, Node::Erode { .. } | Node::Dilate { .. } | Node::Border { .. }))
}

fn is_integer(kind: Kind) -> bool {
    matches!(kind, Kind::Uint8 | Kind::Int8 | Kind::Int16 | Kind::Int | Kind::Int64)
}

/// Check logits and labels for `module` (its class needs: [`Module::check_classes`]).
pub(crate) fn check(
    logits: &Tensor,
    labels: &Tensor,
    module: &Module,
    ignore_label: Option<i64>,
) -> Result<Checked, InputError> {
    check_with(logits, labels, module, ignore_label, Finiteness::Here)
}

/// Where the logits' finiteness is checked.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finiteness {
    /// By [`check`], in a pass of its own.
    Here,
    /// By the fused kernel's softmax sweep, which reads every logit anyway (float32 CPU logits
    /// with class-index labels only): it returns [`InputError::NonFinite`] itself.
    InKernel,
}

/// [`check`], with the logits' finiteness checked where `finiteness` says.
pub(crate) fn check_with(
    logits: &Tensor,
    labels: &Tensor,
    module: &Module,
    ignore_label: Option<i64>,
    finiteness: Finiteness,
) -> Result<Checked, InputError> {
    let ls = logits.size();
    let ys = labels.size();
    if ls.len() != 4 && ls.len() != 5 {
        return Err(InputError::LogitsRank(ls));
    }
    if module.predictions.is_sigmoid() && ys == ls {
        return check_channel_labels(logits, labels, module, ignore_label);
    }
    if is_float(labels.kind()) && ys == ls {
        return check_soft(logits, labels, module);
    }
    if is_integer(labels.kind()) && ys == ls {
        return Err(InputError::MultiHotForSoftmax(ys));
    }
    if ys.len() + 1 != ls.len() {
        let same_shape = if module.predictions.is_sigmoid() {
            SameShape::Channels
        } else if is_float(labels.kind()) {
            SameShape::Soft
        } else {
            SameShape::None
        };
        return Err(InputError::LabelsRank { logits: ls, labels: ys, same_shape });
    }
    if ls[0] != ys[0] || ls[2..] != ys[1..] {
        return Err(InputError::ShapeMismatch { logits: ls, labels: ys });
    }
    if ls.iter().any(|&d| d == 0) {
        return Err(InputError::Empty(ls));
    }
    if !is_float(logits.kind()) {
        return Err(InputError::LogitsKind(logits.kind()));
    }
    if !is_integer(labels.kind()) {
        return Err(InputError::LabelsKind { kind: labels.kind(), labels: ys, logits: ls });
    }
    let classes = ls[1];
    module.check_classes(classes as usize).map_err(InputError::Classes)?;
    let logits = match finiteness {
        Finiteness::InKernel if logits.kind() == Kind::Float && logits.device() == tch::Device::Cpu => {
            logits.shallow_clone()
        }
        _ => checked_logits(logits)?,
    };
    let labels = labels.to_device(logits.device()).to_kind(Kind::Int64);
    let binary = module.predictions.is_sigmoid() && classes == 1;
    // Class indices on the CPU: one pass in place (the tensor operations below take about a
    // millisecond for 4×256×256 labels, a visible share of a fused loss's call).
    if !binary && labels.device() == tch::Device::Cpu {
        let labels = labels.contiguous();
        let len = labels.numel();
        // SAFETY: a contiguous int64 CPU tensor of `len` values, alive for this block.
        let values: &[i64] =
            if len == 0 { &[] } else { unsafe { std::slice::from_raw_parts(labels.data_ptr() as *const i64, len) } };
        let is_bad = |&l: &i64| (l < 0 || l >= classes) && Some(l) != ignore_label;
        let count = values.iter().filter(|l| is_bad(l)).count() as i64;
        if let Some(&value) = values.iter().find(|l| is_bad(l)) {
            return Err(InputError::LabelValue { value, classes, count, ignore: ignore_label });
        }
        if !module.predictions.is_sigmoid() {
            return Ok(Checked { logits, labels, ignore_label, soft_labels: None });
        }
    }
    let outside = labels.lt(0).logical_or(&labels.ge(classes));
    let bad = match ignore_label {
        Some(ignore) => outside.logical_and(&labels.ne(ignore)),
        None => outside,
    };
    let bad = if binary {
        // One sigmoid channel: labels 0 and 1, the foreground being 1.
        let outside = labels.lt(0).logical_or(&labels.gt(1));
        match ignore_label {
            Some(ignore) => outside.logical_and(&labels.ne(ignore)),
            None => outside,
        }
    } else {
        bad
    };
    let count = bad.sum(Kind::Int64).int64_value(&[]);
    if count > 0 {
        let value = labels.masked_select(&bad).get(0).int64_value(&[]);
        if binary {
            return Err(InputError::BinaryLabels { value, count, ignore: ignore_label });
        }
        return Err(InputError::LabelValue { value, classes, count, ignore: ignore_label });
    }
    if module.predictions.is_sigmoid() {
        // Per-channel targets: class `c` sets channel `c` (one-hot), or for one channel the
        // foreground `1` sets it. Ignored pixels set none.
        let targets = if binary {
            labels.eq(1).unsqueeze(1).to_kind(logits.kind())
        } else {
            one_hot(&labels, classes, logits.kind(), ignore_label)
        };
        return Ok(Checked { logits, labels, ignore_label, soft_labels: Some(targets) });
    }
    Ok(Checked { logits, labels, ignore_label, soft_labels: None })
}

/// Labels of the logits' shape for a sigmoid metric: one target per channel in `[0, 1]`
/// (multi-hot `{0, 1}`, or soft), or the ignore label, which marks the whole pixel ignored.
fn check_channel_labels(
    logits: &Tensor,
    labels: &Tensor,
    module: &Module,
    ignore_label: Option<i64>,
) -> Result<Checked, InputError> {
    let size = logits.size();
    if size.iter().any(|&d| d == 0) {
        return Err(InputError::Empty(size));
    }
    if !is_float(logits.kind()) {
        return Err(InputError::LogitsKind(logits.kind()));
    }
    if !is_float(labels.kind()) && !is_integer(labels.kind()) {
        return Err(InputError::LabelsKind { kind: labels.kind(), labels: labels.size(), logits: size });
    }
    module.check_classes(size[1] as usize).map_err(InputError::Classes)?;
    let logits = checked_logits(logits)?;
    let values = labels.to_device(logits.device()).to_kind(Kind::Double);
    let ignored_value = match ignore_label {
        Some(ignore) => values.eq(ignore as f64),
        None => values.zeros_like().to_kind(Kind::Bool),
    };
    let in_range = values.ge(0.0).logical_and(&values.le(1.0));
    let bad = in_range.logical_not().logical_and(&ignored_value.logical_not());
    let count = bad.sum(Kind::Int64).int64_value(&[]);
    if count > 0 {
        let example = values.masked_select(&bad).get(0).double_value(&[]);
        return Err(InputError::ChannelLabels { count, example, ignore: ignore_label });
    }
    let ignored = ignored_value.any_dim(1, false);
    let targets = values.where_self(&ignored.unsqueeze(1).logical_not(), &values.zeros_like()).to_kind(logits.kind());
    let marks = ignored.to_kind(Kind::Int64) * SOFT_IGNORED;
    Ok(Checked { logits, labels: marks, ignore_label: Some(SOFT_IGNORED), soft_labels: Some(targets) })
}

/// The error for logits that are not all finite, counting the bad values.
pub(crate) fn non_finite(logits: &Tensor) -> InputError {
    InputError::NonFinite(logits.isfinite().logical_not().sum(Kind::Int64).int64_value(&[]))
}

/// Logits in float32 or float64 (half precision computed in float32), every value finite.
fn checked_logits(logits: &Tensor) -> Result<Tensor, InputError> {
    let logits = match logits.kind() {
        Kind::Float | Kind::Double => logits.shallow_clone(),
        Kind::Half | Kind::BFloat16 => logits.to_kind(Kind::Float),
        other => return Err(InputError::LogitsKind(other)),
    };
    // One pass: a sum in the logits' own kind is finite when every logit is (a NaN or an
    // infinity makes it non-finite). Only when it is not (a bad value, or a sum that overflowed)
    // are the bad values counted. The sum stays in the logits' kind on purpose: libtorch's
    // float32-to-float64 sum converts as it goes and took 30 ms on 4×21×256×256, more than
    // the loss itself.
    let surely_finite = logits.sum(logits.kind()).double_value(&[]).is_finite();
    if !surely_finite {
        let error = non_finite(&logits);
        if !matches!(error, InputError::NonFinite(0)) {
            return Err(error);
        }
    }
    Ok(logits)
}

/// Soft labels: probabilities `[N, C, ...]` of the logits' shape, each pixel's summing to 1
/// (or all 0: an ignored pixel). The class indices the exact metric uses are their argmax.
fn check_soft(logits: &Tensor, labels: &Tensor, module: &Module) -> Result<Checked, InputError> {
    let size = logits.size();
    if size.iter().any(|&d| d == 0) {
        return Err(InputError::Empty(size));
    }
    if !is_float(logits.kind()) {
        return Err(InputError::LogitsKind(logits.kind()));
    }
    module.check_classes(size[1] as usize).map_err(InputError::Classes)?;
    let logits = checked_logits(logits)?;
    let soft = labels.to_device(logits.device()).to_kind(logits.kind());
    let sums = soft.sum_dim_intlist([1i64].as_slice(), false, Kind::Double);
    let out_of_range = soft.isfinite().logical_not().logical_or(&soft.lt(0.0)).logical_or(&soft.gt(1.0));
    let bad_values = out_of_range.sum(Kind::Int64).int64_value(&[]);
    let bad_sums = (&sums - 1.0).abs().gt(1e-3).logical_and(&sums.ne(0.0));
    let bad_pixels = bad_sums.sum(Kind::Int64).int64_value(&[]);
    if bad_values > 0 || bad_pixels > 0 {
        let first = |values: &Tensor, mask: &Tensor, count: i64| {
            if count > 0 {
                values.masked_select(mask).get(0).double_value(&[])
            } else {
                f64::NAN
            }
        };
        return Err(InputError::SoftLabels {
            values: bad_values,
            value: first(&soft, &out_of_range, bad_values),
            pixels: bad_pixels,
            sum: first(&sums, &bad_sums, bad_pixels),
        });
    }
    let hard = soft.argmax(1, false).where_self(&sums.ne(0.0), &Tensor::from(SOFT_IGNORED).to_device(logits.device()));
    Ok(Checked { logits, labels: hard, ignore_label: Some(SOFT_IGNORED), soft_labels: Some(soft) })
}

/// One-hot labels `[N, C, ...]` of `kind` (images or volumes); pixels with the ignore label
/// belong to no class.
pub(crate) fn one_hot(labels: &Tensor, classes: i64, kind: Kind, ignore: Option<i64>) -> Tensor {
    let mut shape = vec![1i64; labels.dim() + 1];
    shape[1] = classes;
    let range = Tensor::arange(classes, (Kind::Int64, labels.device())).view(shape.as_slice());
    let labels = labels.unsqueeze(1);
    let hot = labels.eq_tensor(&range);
    match ignore {
        // An ignore label inside `0..C` must still mark no class.
        Some(ignore) if (0..classes).contains(&ignore) => hot.logical_and(&labels.ne(ignore)).to_kind(kind),
        _ => hot.to_kind(kind),
    }
}

fn is_float(kind: Kind) -> bool {
    matches!(kind, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16)
}
