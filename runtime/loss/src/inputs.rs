//! The one validation of logits and labels, before any tensor work.
//!
//! [`check`] accepts what users' training loops produce and turns it into a [`Batch`], the
//! only form the back ends take:
//! * logits `[N, C, H, W]` in float32 or float64, or float16 / bfloat16 (computed in
//!   float32; the gradient flows back to the half-precision tensor through the conversion);
//! * labels `[N, H, W]` of any integer type (`uint8` and `int64` are the usual), moved to the
//!   logits' device as int64;
//! * every logit finite, every label a class in `0..C` or the ignore label, enough classes
//!   for the module's slices (exactly as many as its per-class weights), non-empty images.
//!
//! Every problem is one [`InputError`] sentence that says what is wrong and what to do.

use compiler::ir::Module;
use tch::{Kind, Tensor};

/// Bad inputs, each a single sentence that says what to do.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InputError {
    #[error("logits must have 4 dimensions [N, C, H, W], but they have shape {0:?}; add a batch dimension or check the layout")]
    LogitsRank(Vec<i64>),
    #[error("labels must have 3 dimensions [N, H, W], but they have shape {0:?}")]
    LabelsRank(Vec<i64>),
    #[error("logits of shape {logits:?} and labels of shape {labels:?} disagree on N, H or W; labels must be [N, H, W] for logits [N, C, H, W]")]
    ShapeMismatch { logits: Vec<i64>, labels: Vec<i64> },
    #[error("logits must be float32, float64, float16 or bfloat16, but they are {0:?}")]
    LogitsKind(Kind),
    #[error("labels must be integer class indices (uint8, int32 or int64, say), but they are {0:?}")]
    LabelsKind(Kind),
    #[error("the logits contain {0} non-finite values (NaN or infinity); check the network's output")]
    NonFinite(i64),
    #[error("label value {value} is neither a class in 0..{classes} nor the ignore label{} ({count} {})", ignore_text(.ignore), pixels_with_value(.count))]
    LabelValue { value: i64, classes: i64, count: i64, ignore: Option<i64> },
    /// Too few classes for the metric's slices, or not as many as its per-class weights.
    #[error("{0}")]
    Classes(String),
    #[error("an image must be at least 1x1 pixels, but the logits have shape {0:?}")]
    Empty(Vec<i64>),
}

fn ignore_text(ignore: &Option<i64>) -> String {
    match ignore {
        Some(value) => format!(" {value}"),
        None => " (there is none: every label must be a class)".into(),
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
    pub(crate) labels: &'a Tensor,
    pub(crate) ignore_label: Option<i64>,
}

/// Inputs converted as [`check`] needs them, owned; [`Checked::batch`] borrows a [`Batch`].
pub(crate) struct Checked {
    logits: Tensor,
    labels: Tensor,
    ignore_label: Option<i64>,
}

impl Checked {
    pub(crate) fn batch(&self) -> Batch<'_> {
        Batch { logits: &self.logits, labels: &self.labels, ignore_label: self.ignore_label }
    }
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
    let ls = logits.size();
    let ys = labels.size();
    if ls.len() != 4 {
        return Err(InputError::LogitsRank(ls));
    }
    if ys.len() != 3 {
        return Err(InputError::LabelsRank(ys));
    }
    if ls[0] != ys[0] || ls[2] != ys[1] || ls[3] != ys[2] {
        return Err(InputError::ShapeMismatch { logits: ls, labels: ys });
    }
    if ls.iter().any(|&d| d == 0) {
        return Err(InputError::Empty(ls));
    }
    let logits = match logits.kind() {
        Kind::Float | Kind::Double => logits.shallow_clone(),
        Kind::Half | Kind::BFloat16 => logits.to_kind(Kind::Float),
        other => return Err(InputError::LogitsKind(other)),
    };
    if !is_integer(labels.kind()) {
        return Err(InputError::LabelsKind(labels.kind()));
    }
    let classes = ls[1];
    module.check_classes(classes as usize).map_err(InputError::Classes)?;
    // One pass for float32: a float64 sum of finite float32 values cannot overflow, so it is
    // finite exactly when every logit is. Otherwise count the bad ones.
    let surely_finite = logits.kind() == Kind::Float && logits.sum(Kind::Double).double_value(&[]).is_finite();
    if !surely_finite {
        let non_finite = logits.isfinite().logical_not().sum(Kind::Int64).int64_value(&[]);
        if non_finite > 0 {
            return Err(InputError::NonFinite(non_finite));
        }
    }
    let labels = labels.to_device(logits.device()).to_kind(Kind::Int64);
    let outside = labels.lt(0).logical_or(&labels.ge(classes));
    let bad = match ignore_label {
        Some(ignore) => outside.logical_and(&labels.ne(ignore)),
        None => outside,
    };
    let count = bad.sum(Kind::Int64).int64_value(&[]);
    if count > 0 {
        let value = labels.masked_select(&bad).get(0).int64_value(&[]);
        return Err(InputError::LabelValue { value, classes, count, ignore: ignore_label });
    }
    Ok(Checked { logits, labels, ignore_label })
}
