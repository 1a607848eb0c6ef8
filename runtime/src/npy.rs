//! Reading `.npy` inputs (logits, labels) into tch tensors, and writing arrays back out.
//!
//! Logits may be float32 or float64; labels any integer type (converted to int64). Every
//! failure is one sentence naming the file and what is wrong with it.

use ndarray::ArrayD;
use ndarray_npy::{ReadNpyError, ReadNpyExt, WriteNpyExt};
use std::fs::File;
use std::path::Path;
use tch::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("cannot open `{path}`: {error}; check the path")]
    Open { path: String, error: std::io::Error },
    #[error("`{path}` is not a readable .npy file ({error}); save arrays with numpy.save")]
    Format { path: String, error: String },
    #[error("`{path}` holds {found} values, but {what} must be {expected}")]
    Dtype { path: String, found: String, what: &'static str, expected: &'static str },
    #[error("cannot write `{path}`: {error}")]
    Write { path: String, error: String },
}

fn open(path: &Path) -> Result<File, NpyError> {
    File::open(path).map_err(|error| NpyError::Open { path: path.display().to_string(), error })
}

fn format_error(path: &Path, error: ReadNpyError) -> NpyError {
    NpyError::Format { path: path.display().to_string(), error: error.to_string() }
}

fn to_tensor<T: tch::kind::Element + Clone>(array: ArrayD<T>) -> Tensor {
    let shape: Vec<i64> = array.shape().iter().map(|&d| d as i64).collect();
    let data: Vec<T> = array.iter().cloned().collect();
    Tensor::from_slice(&data).reshape(shape)
}

/// Read float32 or float64 logits.
pub fn read_logits(path: &Path) -> Result<Tensor, NpyError> {
    match ArrayD::<f32>::read_npy(open(path)?) {
        Ok(array) => return Ok(to_tensor(array)),
        Err(ReadNpyError::WrongDescriptor(_)) => {}
        Err(error) => return Err(format_error(path, error)),
    }
    match ArrayD::<f64>::read_npy(open(path)?) {
        Ok(array) => Ok(to_tensor(array)),
        Err(ReadNpyError::WrongDescriptor(found)) => Err(NpyError::Dtype {
            path: path.display().to_string(),
            found: found.to_string(),
            what: "logits",
            expected: "float32 or float64",
        }),
        Err(error) => Err(format_error(path, error)),
    }
}

/// Read labels: integer class indices as int64, or soft labels (float32 / float64
/// probabilities of the logits' shape) as float32.
pub fn read_labels(path: &Path) -> Result<Tensor, NpyError> {
    match ArrayD::<f32>::read_npy(open(path)?) {
        Ok(array) => return Ok(to_tensor(array)),
        Err(ReadNpyError::WrongDescriptor(_)) => {}
        Err(error) => return Err(format_error(path, error)),
    }
    match ArrayD::<f64>::read_npy(open(path)?) {
        Ok(array) => return Ok(to_tensor(array.mapv(|v| v as f32))),
        Err(ReadNpyError::WrongDescriptor(_)) => {}
        Err(error) => return Err(format_error(path, error)),
    }
    macro_rules! attempt {
        ($t:ty) => {
            match ArrayD::<$t>::read_npy(open(path)?) {
                Ok(array) => {
                    let converted: ArrayD<i64> = array.mapv(|v| v as i64);
                    return Ok(to_tensor(converted));
                }
                Err(ReadNpyError::WrongDescriptor(_)) => {}
                Err(error) => return Err(format_error(path, error)),
            }
        };
    }
    attempt!(i64);
    attempt!(i32);
    attempt!(u8);
    attempt!(i16);
    attempt!(u16);
    attempt!(u32);
    match ArrayD::<i8>::read_npy(open(path)?) {
        Ok(array) => Ok(to_tensor(array.mapv(|v| v as i64))),
        Err(ReadNpyError::WrongDescriptor(found)) => Err(NpyError::Dtype {
            path: path.display().to_string(),
            found: found.to_string(),
            what: "labels",
            expected: "integer class indices (int64 preferred; 255 = ignored) or float soft labels",
        }),
        Err(error) => Err(format_error(path, error)),
    }
}

/// Write an array (float32 logits and gradients, int64 labels) with the given shape.
pub fn write<T: ndarray_npy::WritableElement>(path: &Path, shape: &[usize], data: Vec<T>) -> Result<(), NpyError> {
    let error = |e: String| NpyError::Write { path: path.display().to_string(), error: e };
    let array = ArrayD::from_shape_vec(shape.to_vec(), data).map_err(|e| error(e.to_string()))?;
    let file = File::create(path).map_err(|e| error(e.to_string()))?;
    array.write_npy(file).map_err(|e| error(e.to_string()))
}

/// Write a float32 array.
pub fn write_f32(path: &Path, shape: &[usize], data: Vec<f32>) -> Result<(), NpyError> {
    write(path, shape, data)
}

/// Write an int64 array.
pub fn write_i64(path: &Path, shape: &[usize], data: Vec<i64>) -> Result<(), NpyError> {
    write(path, shape, data)
}
