//! Curve parameter files: losscc's own format and the published Auto Seg-Loss layout.
//!
//! Own format (written by `search`, read everywhere):
//! ```json
//! {"format": "losscc-params", "version": 1, "metric": "bf1",
//!  "curves": [{"name": "and_P", "pieces": 1, "control_points": [0.5, 0.5], "fixed": false}],
//!  "provenance": {"source": "search", ...}}
//! ```
//! Curves are matched by name. Published layout: `{"control_points": [[x, y, ...], ...]}`,
//! one flat list per curve in manifest (source) order.
//!
//! Every file is checked against the manifest: the number of curves, each curve's
//! monotonicity and range. Errors are single sentences that say what to fix.

use crate::curve::{Curve, CurveError};
use crate::relax::Manifest;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub const FORMAT: &str = "losscc-params";

/// One curve in the own format.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CurveEntry {
    pub name: String,
    pub pieces: usize,
    pub control_points: Vec<f64>,
    /// A fixed curve keeps its control points during search.
    #[serde(default)]
    pub fixed: bool,
}

/// The own parameter file format.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ParamsFile {
    pub format: String,
    pub version: u32,
    pub metric: String,
    pub curves: Vec<CurveEntry>,
    #[serde(default)]
    pub provenance: serde_json::Value,
}

#[derive(Debug, Error)]
pub enum ParamsError {
    #[error("the parameters are not valid JSON: {0}")]
    Json(String),
    #[error("the parameters are neither losscc's format (`\"format\": \"losscc-params\"`) nor the published layout (`{{\"control_points\": [[...], ...]}}`)")]
    UnknownFormat,
    #[error("the parameters have {got} curve{} but `{metric}` has {expected} ({names}); give one control-point list per curve in that order", plural_s(.got))]
    CurveCount { metric: String, expected: usize, got: usize, names: String },
    #[error("curve {index} (`{name}`) is invalid: {error}")]
    Curve { index: usize, name: String, error: CurveError },
    #[error("the parameters have no curve named `{0}`; it is one of this metric's curves")]
    MissingCurve(String),
    #[error("the parameters name curve `{0}`, which this metric does not have (its curves: {1})")]
    UnknownCurve(String, String),
    #[error("these parameters were made for `{file}`, not `{expected}`; pass the file searched for this metric")]
    Metric { file: String, expected: String },
    #[error("curve `{name}` declares {declared} pieces but its control points make {actual}")]
    Pieces { name: String, declared: usize, actual: usize },
}

fn plural_s(count: &usize) -> &'static str {
    if *count == 1 {
        ""
    } else {
        "s"
    }
}

/// Curves resolved against a manifest, in manifest order.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    pub curves: Vec<Curve>,
    pub fixed: Vec<bool>,
}

impl Params {
    /// Identity curves with each curve's declared pieces: the published starting point.
    pub fn identity(manifest: &Manifest) -> Params {
        Params {
            curves: manifest.curves.iter().map(|c| Curve::identity(c.pieces)).collect(),
            fixed: vec![false; manifest.curves.len()],
        }
    }

    /// Parse either format and check it against the manifest.
    pub fn from_json(text: &str, manifest: &Manifest) -> Result<Params, ParamsError> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| ParamsError::Json(e.to_string()))?;
        let names = || manifest.curves.iter().map(|c| format!("`{}`", c.name)).collect::<Vec<_>>().join(", ");
        if value.get("format").and_then(|f| f.as_str()) == Some(FORMAT) {
            let file: ParamsFile = serde_json::from_value(value).map_err(|e| ParamsError::Json(e.to_string()))?;
            for entry in &file.curves {
                if manifest.find(&entry.name).is_none() {
                    return Err(ParamsError::UnknownCurve(entry.name.clone(), names()));
                }
            }
            let mut curves = Vec::new();
            let mut fixed = Vec::new();
            for (index, spec) in manifest.curves.iter().enumerate() {
                let entry = file
                    .curves
                    .iter()
                    .find(|e| e.name == spec.name)
                    .ok_or_else(|| ParamsError::MissingCurve(spec.name.clone()))?;
                let curve = Curve::from_flat(&entry.control_points).map_err(|error| ParamsError::Curve {
                    index: index + 1,
                    name: spec.name.clone(),
                    error,
                })?;
                if curve.pieces() != entry.pieces {
                    return Err(ParamsError::Pieces {
                        name: spec.name.clone(),
                        declared: entry.pieces,
                        actual: curve.pieces(),
                    });
                }
                curves.push(curve);
                fixed.push(entry.fixed);
            }
            return Ok(Params { curves, fixed });
        }
        let Some(lists) = value.get("control_points").and_then(|c| c.as_array()) else {
            return Err(ParamsError::UnknownFormat);
        };
        if lists.len() != manifest.curves.len() {
            return Err(ParamsError::CurveCount {
                metric: String::new(),
                expected: manifest.curves.len(),
                got: lists.len(),
                names: names(),
            });
        }
        let mut curves = Vec::new();
        for (index, (list, spec)) in lists.iter().zip(&manifest.curves).enumerate() {
            let flat: Option<Vec<f64>> = list.as_array().and_then(|a| a.iter().map(|v| v.as_f64()).collect());
            let Some(flat) = flat else {
                return Err(ParamsError::Json(format!("curve {} must be a list of numbers", index + 1)));
            };
            let curve = Curve::from_flat(&flat).map_err(|error| ParamsError::Curve {
                index: index + 1,
                name: spec.name.clone(),
                error,
            })?;
            curves.push(curve);
        }
        Ok(Params { fixed: vec![false; curves.len()], curves })
    }

    /// The own format for these curves.
    pub fn to_file(&self, metric: &str, manifest: &Manifest, provenance: serde_json::Value) -> ParamsFile {
        ParamsFile {
            format: FORMAT.into(),
            version: 1,
            metric: metric.into(),
            curves: manifest
                .curves
                .iter()
                .zip(&self.curves)
                .zip(&self.fixed)
                .map(|((spec, curve), fixed)| CurveEntry {
                    name: spec.name.clone(),
                    pieces: curve.pieces(),
                    control_points: curve.flat(),
                    fixed: *fixed,
                })
                .collect(),
            provenance,
        }
    }
}

/// The `metric` field of a file in losscc's own format, if it is one.
pub fn own_format_metric(text: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    if value.get("format")?.as_str()? != FORMAT {
        return None;
    }
    Some(value.get("metric")?.as_str()?.to_string())
}

/// Fill in the metric name in messages that need it.
pub fn with_metric(error: ParamsError, metric: &str) -> ParamsError {
    match error {
        ParamsError::CurveCount { expected, got, names, .. } => {
            ParamsError::CurveCount { metric: metric.into(), expected, got, names }
        }
        other => other,
    }
}
