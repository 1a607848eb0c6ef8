//! Exact and relaxed modules as distinct types.
//!
//! A back end that computes the metric takes an [`ExactModule`]; one that computes the
//! surrogate takes a [`RelaxedModule`]. Both are made only here, and only from modules that
//! pass [`crate::validate`] for their mode, so holding one is proof that its invariants hold:
//! an exact module has no `softmax` or curve, a relaxed module has no exact set operator on
//! pixels, no `Pred`, `CurveTag` or `Scope`, and every curve is in its manifest. Each keeps
//! the analyses back ends share ([`crate::analysis`]), computed once.
//!
//! Both dereference to the underlying [`Module`] for reading.

use crate::analysis;
use crate::ir::{Handle, Mode, Module};
use crate::relax::Manifest;
use std::ops::Deref;

/// A validated exact module: the metric on argmax predictions.
#[derive(Clone, Debug)]
pub struct ExactModule {
    module: Module,
    on_pred: Vec<bool>,
    accumulators: Vec<Handle>,
}

/// A validated relaxed module (the differentiable surrogate) with its curve manifest.
#[derive(Clone, Debug)]
pub struct RelaxedModule {
    module: Module,
    manifest: Manifest,
    on_pred: Vec<bool>,
}

/// The invariant violations that kept a module from being made (sentences).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("the IR is invalid: {}", .0.join("; "))]
pub struct Invalid(pub Vec<String>);

impl ExactModule {
    /// Validate `module` as an exact module.
    pub fn new(module: Module) -> Result<ExactModule, Invalid> {
        let mut problems = crate::validate::validate(&module, None);
        if module.mode != Mode::Exact {
            problems.push("the module is not in exact mode".into());
        }
        if !problems.is_empty() {
            return Err(Invalid(problems));
        }
        let on_pred = analysis::prediction_dependent(&module);
        let accumulators = module.handles().filter(|h| module.node(*h).is_accumulator()).collect();
        Ok(ExactModule { module, on_pred, accumulators })
    }

    pub fn module(&self) -> &Module {
        &self.module
    }

    /// Whether each node depends on the predictions.
    pub fn prediction_dependent(&self) -> &[bool] {
        &self.on_pred
    }

    /// The accumulator nodes (`count`, `nll_sum`) in arena order: what a back end computes
    /// per batch, and what [`crate::accumulate`] sums and finishes.
    pub fn accumulators(&self) -> &[Handle] {
        &self.accumulators
    }
}

impl RelaxedModule {
    /// Validate `module` as a relaxed module whose curves are those of `manifest`.
    pub fn new(module: Module, manifest: Manifest) -> Result<RelaxedModule, Invalid> {
        let mut problems = crate::validate::validate(&module, Some(&manifest));
        if module.mode != Mode::Relaxed {
            problems.push("the module is not in relaxed mode".into());
        }
        if !problems.is_empty() {
            return Err(Invalid(problems));
        }
        let on_pred = analysis::prediction_dependent(&module);
        Ok(RelaxedModule { module, manifest, on_pred })
    }

    pub fn module(&self) -> &Module {
        &self.module
    }

    /// The curves the module's `curve` nodes refer to, in source order.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Whether each node depends on the predictions.
    pub fn prediction_dependent(&self) -> &[bool] {
        &self.on_pred
    }
}

impl Deref for ExactModule {
    type Target = Module;
    fn deref(&self) -> &Module {
        &self.module
    }
}

impl Deref for RelaxedModule {
    type Target = Module;
    fn deref(&self) -> &Module {
        &self.module
    }
}
