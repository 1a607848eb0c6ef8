//! The API a user's own tch training loop calls: a compiled metric as a loss and as an exact
//! evaluator.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use runtime::Loss;
//! let loss = Loss::from_file("examples/biou.metric".as_ref(), &[("tol".into(), "3".into())])?;
//! # let (logits, labels) = (tch::Tensor::zeros([1, 2, 4, 4], (tch::Kind::Float, tch::Device::Cpu)), tch::Tensor::zeros([1, 4, 4], (tch::Kind::Int64, tch::Device::Cpu)));
//! let value = loss.forward(&logits, &labels)?; // differentiable, on the logits' device
//! value.backward();
//! let mut exact = loss.evaluator();
//! exact.add_batch(&logits, &labels)?;        // counts add across batches
//! let metric = exact.finish()?.value;        // NaN when undefined
//! # Ok(()) }
//! ```

use crate::fused;
use crate::tch_backend::{self, InputError};
use compiler::accumulate::{self, Accumulator, Evaluation};
use compiler::params::{self, Params};
use compiler::{Compiled, Failure};
use std::path::Path;
use tch::Tensor;

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
    #[error("no batch was evaluated, so there is no metric; call add_batch first")]
    NoBatch,
}

/// A compiled metric or loss with its current curves.
#[derive(Debug)]
pub struct Loss {
    compiled: Compiled,
    params: Params,
    /// The fast path (on by default): on CPU float32 logits, the fused kernel (see
    /// [`crate::fused`]) for every module with a curve. Off, or for a module without curves
    /// (plain cross-entropy, which libtorch's own fused kernels do best), every loss runs op
    /// by op in libtorch: the reference the fast path is tested against.
    fast_path: bool,
}

impl Loss {
    /// Compile `path` with `--set` style overrides; curves start at the identity.
    pub fn from_file(path: &Path, overrides: &[(String, String)]) -> Result<Loss, LossError> {
        Ok(Loss::new(compiler::compile_file(path, overrides)?))
    }

    /// Compile source text.
    pub fn from_source(name: &str, text: &str, overrides: &[(String, String)]) -> Result<Loss, LossError> {
        Ok(Loss::new(compiler::compile_source(name, text, overrides)?))
    }

    pub fn new(compiled: Compiled) -> Loss {
        let params = Params::identity(&compiled.manifest);
        Loss { compiled, params, fast_path: true }
    }

    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Replace the curves (must match the manifest; see [`Params::from_json`]).
    pub fn set_params(&mut self, params: Params) {
        self.params = params;
    }

    /// Load curves from a parameter file in either supported format.
    pub fn load_params(&mut self, path: &Path) -> Result<(), LossError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| LossError::ParamsIo { path: path.display().to_string(), error })?;
        let name = &self.compiled.exact.name;
        if let Some(file_metric) = params::own_format_metric(&text) {
            if &file_metric != name {
                return Err(LossError::Params {
                    path: path.display().to_string(),
                    error: params::ParamsError::Metric { file: file_metric, expected: name.clone() },
                });
            }
        }
        let params = Params::from_json(&text, &self.compiled.manifest).map_err(|error| LossError::Params {
            path: path.display().to_string(),
            error: params::with_metric(error, &self.compiled.exact.name),
        })?;
        self.params = params;
        Ok(())
    }

    /// The differentiable surrogate loss for a batch.
    pub fn forward(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor, LossError> {
        Ok(self.forward_detailed(logits, labels)?.loss)
    }

    /// Turn the fast path on (the default) or off (the op-by-op reference path); see
    /// docs/performance.md for what each costs.
    pub fn set_fast_path(&mut self, on: bool) {
        self.fast_path = on;
    }

    /// Whether the fast path is on.
    pub fn fast_path(&self) -> bool {
        self.fast_path
    }

    /// Whether `forward` on these logits takes the fused kernel.
    pub fn uses_fused_kernel(&self, logits: &Tensor) -> bool {
        self.fast_path && fused::applicable(logits) && self.plan(logits).is_some()
    }

    /// The fused kernel's program, when the module has one worth running (some curve).
    fn plan(&self, logits: &Tensor) -> Option<fused::FusedPlan> {
        let classes = logits.size().get(1).copied().unwrap_or(0) as usize;
        fused::FusedPlan::new(&self.compiled.relaxed, &self.params.curves, classes).filter(|plan| plan.has_curves())
    }

    /// The surrogate with its undefined flags and reported values.
    pub fn forward_detailed(&self, logits: &Tensor, labels: &Tensor) -> Result<tch_backend::Surrogate, LossError> {
        tch_backend::check_inputs(logits, labels, self.compiled.relaxed.min_classes)?;
        let labels = labels.to_device(logits.device());
        let module = &self.compiled.relaxed;
        if self.fast_path && fused::applicable(logits) {
            if let Some(plan) = self.plan(logits) {
                return Ok(fused::surrogate(module, &self.params.curves, &plan, logits, &labels));
            }
        }
        Ok(tch_backend::surrogate(module, &self.params.curves, logits, &labels))
    }

    /// A fresh exact evaluator (counts accumulate over batches).
    pub fn evaluator(&self) -> Evaluator<'_> {
        Evaluator { loss: self, accumulated: Accumulator::default() }
    }
}

/// Accumulates exact counts over batches; the metric is computed once at the end.
pub struct Evaluator<'a> {
    loss: &'a Loss,
    accumulated: Accumulator,
}

impl Evaluator<'_> {
    pub fn add_batch(&mut self, logits: &Tensor, labels: &Tensor) -> Result<(), LossError> {
        let module = &self.loss.compiled.exact;
        tch_backend::check_inputs(logits, labels, module.min_classes)?;
        let labels = labels.to_device(logits.device());
        for (node, values) in tch_backend::exact_counts(module, logits, &labels) {
            self.accumulated.add(node, &values);
        }
        self.accumulated.batches += 1;
        Ok(())
    }

    pub fn finish(&self) -> Result<Evaluation, LossError> {
        if self.accumulated.batches == 0 {
            return Err(LossError::NoBatch);
        }
        accumulate::finish(&self.loss.compiled.exact, &self.accumulated).map_err(|_| LossError::NoBatch)
    }
}
