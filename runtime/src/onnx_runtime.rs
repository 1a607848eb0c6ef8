//! Running losscc's ONNX graphs with ONNX Runtime (through `ort`, loaded dynamically).
//!
//! The library is found, in order: `ORT_DYLIB_PATH`; the project environment's
//! `onnxruntime` package (path recorded at build time). One ONNX Runtime environment exists
//! per process, created on first use.

use ort::session::Session;
use ort::value::Tensor as OrtTensor;
use std::path::PathBuf;
use std::sync::OnceLock;

#[derive(Debug, thiserror::Error)]
pub enum OnnxRunError {
    #[error("ONNX Runtime is not available: {0}; install onnxruntime==1.31.1 (make test does) or set ORT_DYLIB_PATH to its libonnxruntime.so")]
    Unavailable(String),
    #[error("ONNX Runtime rejected the model: {0}")]
    Model(String),
    #[error("ONNX Runtime failed to run the model: {0}")]
    Run(String),
}

/// Where ONNX Runtime's shared library is expected.
pub fn library_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        return Some(PathBuf::from(path));
    }
    option_env!("LOSSCC_ORT_DEFAULT").map(PathBuf::from)
}

static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

fn environment() -> Result<&'static ort::environment::Environment, OnnxRunError> {
    ENVIRONMENT
        .get_or_init(|| {
            let path = library_path().ok_or_else(|| "no library path is known".to_string())?;
            if !path.exists() {
                return Err(format!("`{}` does not exist", path.display()));
            }
            ort::init_from(&path).map_err(|e| e.to_string())?.with_name("losscc").build().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| OnnxRunError::Unavailable(e.clone()))
}

/// The `labels` input of a graph: int64 class indices (the logits' shape without C), or
/// float32 labels of the logits' shape (a `--soft-labels` graph: soft labels, or a sigmoid
/// metric's multi-hot labels).
#[derive(Clone, Debug, PartialEq)]
pub enum OnnxLabels {
    Classes(Vec<i64>),
    Channels(Vec<f32>),
}

impl From<Vec<i64>> for OnnxLabels {
    fn from(labels: Vec<i64>) -> OnnxLabels {
        OnnxLabels::Classes(labels)
    }
}

impl From<Vec<f32>> for OnnxLabels {
    fn from(labels: Vec<f32>) -> OnnxLabels {
        OnnxLabels::Channels(labels)
    }
}

/// A loaded ONNX model.
pub struct OnnxModel {
    session: Session,
}

impl OnnxModel {
    pub fn from_bytes(bytes: &[u8]) -> Result<OnnxModel, OnnxRunError> {
        let environment = environment()?;
        let session = Session::builder(environment)
            .and_then(|mut builder| builder.commit_from_memory(bytes))
            .map_err(|e| OnnxRunError::Model(e.to_string()))?;
        Ok(OnnxModel { session })
    }

    /// Run on float32 logits `[N,C,H,W]` (or `[N,C,D,H,W]`) and labels: int64 class indices
    /// of that shape without C, or float32 labels of that shape (see [`OnnxLabels`]); every
    /// output as `(name, values)` in float32.
    pub fn run(
        &mut self,
        logits: Vec<f32>,
        shape: &[i64],
        labels: impl Into<OnnxLabels>,
    ) -> Result<Vec<(String, Vec<f32>)>, OnnxRunError> {
        let run_error = |e: ort::Error| OnnxRunError::Run(e.to_string());
        let logits = OrtTensor::from_array((shape.to_vec(), logits)).map_err(run_error)?;
        let names: Vec<String> = self.session.outputs().iter().map(|o| o.name().to_string()).collect();
        let outputs = match labels.into() {
            OnnxLabels::Classes(labels) => {
                // Class indices are the logits' shape without the class axis.
                let shape: Vec<i64> = shape.iter().enumerate().filter(|(i, _)| *i != 1).map(|(_, d)| *d).collect();
                let labels = OrtTensor::from_array((shape, labels)).map_err(run_error)?;
                self.session.run(ort::inputs! { "logits" => logits, "labels" => labels })
            }
            OnnxLabels::Channels(labels) => {
                let labels = OrtTensor::from_array((shape.to_vec(), labels)).map_err(run_error)?;
                self.session.run(ort::inputs! { "logits" => logits, "labels" => labels })
            }
        }
        .map_err(run_error)?;
        let mut result = Vec::new();
        for name in names {
            let (_, values) = outputs[name.as_str()].try_extract_tensor::<f32>().map_err(run_error)?;
            result.push((name, values.to_vec()));
        }
        Ok(result)
    }
}
