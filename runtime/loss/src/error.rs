//! The loss library's errors: each is a sentence a user can act on.

use crate::inputs::InputError;
use compiler::params;
use compiler::Failure;

#[derive(Debug, thiserror::Error)]
pub enum LossError {
    #[error(transparent)]
    Compile(#[from] Failure),
    #[error(transparent)]
    Input(#[from] InputError),
    #[error("cannot read parameters `{path}`: {error}")]
    ParamsIo { path: String, error: std::io::Error },
    #[error("parameters `{path}`: {error}")]
    Params { path: String, error: params::ParamsError },
    #[error("the curves do not fit `{metric}`: {problem}")]
    Curves { metric: String, problem: String },
    #[error("no batch was evaluated, so there is no metric; call add_batch first")]
    NoBatch,
    #[error("{0}")]
    Accumulate(#[from] compiler::accumulate::AccumulateError),
    #[error("this batch's logits have {got} classes but earlier batches had {expected}; an evaluator accumulates one dataset, with one number of classes (call reset to start another)")]
    ClassCount { expected: i64, got: i64 },
    #[error("these evaluators belong to different metrics (`{0}` and `{1}`); merge evaluators of the same Loss")]
    Mismatch(String, String),
    #[error("libtorch failed: {0}")]
    Backend(String),
}
