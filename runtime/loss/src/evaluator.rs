//! [`Evaluator`]: the exact metric accumulated over a dataset, confusion-matrix style.

use crate::error::LossError;
use crate::inputs;
use crate::reference::exact::exact_counts;
use compiler::accumulate::{self, Accumulator, Evaluation, FinishError};
use compiler::Compiled;
use std::sync::Arc;
use tch::Tensor;

/// Accumulates exact counts over batches; the metric is computed once, at [`Evaluator::finish`].
/// For a per-image metric (`with per_image = true`) it accumulates each image's metric
/// instead, and the result is their mean over the images where it is defined.
///
/// An evaluator owns what it needs (it does not borrow the [`crate::Loss`] it came from), so
/// it can be kept per epoch, reset, or sent to another thread. For a multi-process trainer,
/// [`Evaluator::counts`] gives every accumulated number as one vector that adds element-wise
/// across processes: all-reduce it, then [`Evaluator::set_counts`] on one process and
/// [`Evaluator::finish`] gives the metric of the whole dataset.
#[derive(Clone, Debug)]
pub struct Evaluator {
    compiled: Arc<Compiled>,
    ignore_label: Option<i64>,
    accumulated: Accumulator,
    /// The class count of the batches so far (all must agree).
    classes: Option<i64>,
}

impl Evaluator {
    pub(crate) fn new(compiled: Arc<Compiled>, ignore_label: Option<i64>) -> Evaluator {
        Evaluator { compiled, ignore_label, accumulated: Accumulator::default(), classes: None }
    }

    /// Add one batch's counts: logits `[N, C, H, W]` (the prediction is their argmax) and
    /// labels `[N, H, W]`, checked as `Loss::forward` checks them. Every batch must have the
    /// same number of classes.
    pub fn add_batch(&mut self, logits: &Tensor, labels: &Tensor) -> Result<(), LossError> {
        let module = &self.compiled.exact;
        let checked = inputs::check(logits, labels, module, self.ignore_label)?;
        let classes = logits.size()[1];
        if let Some(expected) = self.classes {
            if expected != classes {
                return Err(LossError::ClassCount { expected, got: classes });
            }
        }
        // Add into a copy, so a failure leaves the evaluator as it was.
        let mut accumulated = self.accumulated.clone();
        if module.per_image {
            // Each image's metric from its own counts; the sums of those are accumulated.
            for image in 0..logits.size()[0] {
                let mut counts = Accumulator::default();
                for (node, values) in exact_counts(module, &checked.image(image).batch())? {
                    counts.add(node, &values)?;
                }
                accumulated.add_image(module, &counts).map_err(|error| match error {
                    FinishError::Accumulate(error) => LossError::Accumulate(error),
                    FinishError::Missing(_) => {
                        LossError::Backend(format!("an image's counts were incomplete: {error}"))
                    }
                })?;
            }
        } else {
            for (node, values) in exact_counts(module, &checked.batch())? {
                accumulated.add(node, &values)?;
            }
        }
        accumulated.batches += 1;
        self.accumulated = accumulated;
        self.classes = Some(classes);
        Ok(())
    }

    /// The metric (NaN when undefined) and its reported values, from everything added.
    pub fn finish(&self) -> Result<Evaluation, LossError> {
        if self.accumulated.batches == 0 {
            return Err(LossError::NoBatch);
        }
        accumulate::finish(&self.compiled.exact, &self.accumulated).map_err(|_| LossError::NoBatch)
    }

    /// Forget every batch (the next one may have another number of classes).
    pub fn reset(&mut self) {
        self.accumulated = Accumulator::default();
        self.classes = None;
    }

    /// Add the batches another evaluator of the same metric has seen.
    pub fn merge(&mut self, other: &Evaluator) -> Result<(), LossError> {
        if !Arc::ptr_eq(&self.compiled, &other.compiled) && self.compiled.exact.name != other.compiled.exact.name {
            return Err(LossError::Mismatch(self.compiled.exact.name.clone(), other.compiled.exact.name.clone()));
        }
        if let (Some(expected), Some(got)) = (self.classes, other.classes) {
            if expected != got {
                return Err(LossError::ClassCount { expected, got });
            }
        }
        self.accumulated.merge(&other.accumulated)?;
        self.classes = self.classes.or(other.classes);
        Ok(())
    }

    /// Number of batches added.
    pub fn batches(&self) -> usize {
        self.accumulated.batches
    }

    /// Every accumulated number, then the batch count, as one vector that adds element-wise
    /// across processes that evaluated the same metric on batches with the same class count.
    pub fn counts(&self) -> Vec<f64> {
        self.accumulated.to_flat()
    }

    /// Replace the accumulated numbers with `counts` (a vector from [`Evaluator::counts`],
    /// summed over processes). The evaluator must have seen a batch, so that it knows the
    /// layout.
    pub fn set_counts(&mut self, counts: &[f64]) -> Result<(), LossError> {
        if self.accumulated.batches == 0 {
            return Err(LossError::NoBatch);
        }
        self.accumulated = Accumulator::from_flat(&self.accumulated.layout(), counts)?;
        Ok(())
    }
}
