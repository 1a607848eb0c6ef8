//! losscc's loss library: a metric compiled by [`compiler`] as a differentiable loss on
//! libtorch tensors ([`Loss`]) and as an exact evaluator ([`Evaluator`]), for a user's own
//! tch training loop. It depends on tch and the compiler only (no plotting, progress bars,
//! image decoding or ONNX Runtime).
//!
//! Code map:
//! * [`loss`] — [`Loss`] and [`Overrides`]; [`evaluator`] — [`Evaluator`]; [`error`] —
//!   [`LossError`]; [`inputs`] — the one validation of logits and labels ([`InputError`]).
//! * `reference` — the reference interpreters on libtorch tensors (any device, float32 or
//!   float64, autograd): the surrogate op by op, and the exact counts.
//! * `fused` — the fast path on CPU float32: the pixel part of a relaxed module fused into
//!   a few vectorized sweeps; its gradient enters autograd through `autograd`, the crate's
//!   one C++ part (a libtorch autograd node, `cpp/linearized.cpp`, compiled by `build.rs`).
//! * `label_planes` — label-only parts on byte planes for the fused kernel.
//! * `kernels` — CPU kernels those share: pooling and winners, SIMD dispatch, thread
//!   splitting, scratch reuse.
//!
//! Import order (no circles): `loss`/`evaluator` → `fused` → `label_planes`, `reference`,
//! `autograd` → `kernels`; `inputs` and `error` are leaves.
//!
//! Architecture invariant: this crate interprets the compiler's IR; it never parses metric
//! source, never decides where curves go, and never changes a module. It reads
//! [`compiler::ExactModule`], [`compiler::RelaxedModule`] and [`Params`] only.

mod autograd;
pub mod error;
pub mod evaluator;
mod fused;
pub mod inputs;
mod kernels;
mod label_planes;
pub mod loss;
mod reference;

pub use compiler::accumulate::{Evaluation, Value};
pub use compiler::curve::Curve;
pub use compiler::lower::ParamValue;
pub use compiler::params::Params;
pub use error::LossError;
pub use evaluator::Evaluator;
pub use inputs::InputError;
pub use loss::{Loss, Overrides};
pub use reference::Surrogate;

/// How the CPU kernels run their parts: on "libtorch's OpenMP team" (the threads libtorch
/// already uses, found at run time), or on "own threads" where libtorch loaded no OpenMP
/// runtime (or `LOSSCC_OWN_THREADS` is set, for comparisons).
pub fn kernel_threading() -> &'static str {
    kernels::parallel::threading()
}

/// Deterministic data for this crate's unit tests, from a local generator (libtorch's is
/// global and shared by tests running in parallel, so a failure would not reproduce).
#[cfg(test)]
pub(crate) mod test_data {
    /// `count` numbers uniform in [0, 1) from `seed` (xorshift64).
    pub fn uniform(seed: u64, count: usize) -> Vec<f64> {
        let mut state = seed | 1;
        (0..count)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 11) as f64 / (1u64 << 53) as f64
            })
            .collect()
    }

    /// A float32 tensor of `shape`, uniform in `[low, high)`.
    pub fn tensor(seed: u64, shape: &[i64], low: f64, high: f64) -> tch::Tensor {
        let count = shape.iter().product::<i64>() as usize;
        let values: Vec<f32> = uniform(seed, count).iter().map(|u| (low + (high - low) * u) as f32).collect();
        tch::Tensor::from_slice(&values).reshape(shape)
    }

    /// An int64 tensor of `shape` with values in `0..classes`.
    pub fn classes(seed: u64, shape: &[i64], classes: i64) -> tch::Tensor {
        let count = shape.iter().product::<i64>() as usize;
        let values: Vec<i64> = uniform(seed, count).iter().map(|u| (u * classes as f64) as i64).collect();
        tch::Tensor::from_slice(&values).reshape(shape)
    }
}

/// Aids for tests of this crate's users (and its own integration tests).
pub mod testing {
    /// Fill reused scratch planes with NaN before each use, so that a value read but not
    /// written by the current call shows up as NaN instead of a stale right answer.
    pub fn set_scratch_poisoning(on: bool) {
        crate::kernels::scratch::set_scratch_poisoning(on);
    }
}
