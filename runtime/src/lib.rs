//! The losscc runtime: compiled metrics on libtorch (tch) as differentiable losses and exact
//! evaluators, `.npy` I/O, the proxy task (data, network, trainer), the PPO search, and the
//! `losscc` command (in `main.rs`).
//!
//! Architecture invariant: the runtime interprets the compiler's IR; it never parses metric
//! source itself and never decides relaxation rules. Inputs are validated once, at the API
//! boundary ([`tch_backend::check_inputs`]), before any tensor work.

pub mod bench;
pub mod data;
pub mod fused;
pub mod label_planes;
pub mod loss;
pub mod network;
pub mod npy;
pub mod onnx_runtime;
pub mod progress;
pub mod report;
pub mod search;
pub mod tch_backend;
pub mod trainer;

pub use loss::{Evaluator, Loss, LossError};
