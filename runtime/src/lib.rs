//! The losscc runtime: compiled metrics on libtorch (tch) as differentiable losses and exact
//! evaluators, `.npy` I/O, and the `losscc` command (in `main.rs`).
//!
//! Architecture invariant: the runtime interprets the compiler's IR; it never parses metric
//! source itself and never decides relaxation rules. Inputs are validated once, at the API
//! boundary ([`tch_backend::check_inputs`]), before any tensor work.

pub mod bench;
pub mod fused;
pub mod loss;
pub mod npy;
pub mod onnx_runtime;
pub mod tch_backend;

pub use loss::{Evaluator, Loss, LossError};
