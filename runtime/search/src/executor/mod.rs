//! Executors: where a round's attempts run. Each attempt is a folder with a `task.json`;
//! running it means running `losscc task FOLDER` somewhere and reading the `outcome.json` it
//! leaves. [`local::Local`] runs them as child processes of the driver (one crash takes only
//! its own attempt down); [`slurm::Slurm`] submits a round as one Slurm job array.

pub mod local;
pub mod slurm;

use crate::journal::Submitted;
use crate::run::SearchError;
use crate::task::TaskOutcome;
use std::path::PathBuf;

/// One attempt to run.
#[derive(Clone, Debug, PartialEq)]
pub struct Attempt {
    pub round: usize,
    pub sample: usize,
    /// 1 for the first attempt, 2 for the first retry, ...
    pub attempt: usize,
    /// The attempt's folder, holding its `task.json`.
    pub dir: PathBuf,
}

impl Attempt {
    /// `<round>-<sample>`, as the journal numbers candidates.
    pub fn label(&self) -> String {
        format!("{}-{}", self.round, self.sample)
    }
}

/// What an executor tells the driver while a round runs.
#[derive(Clone, Debug)]
pub enum Report {
    /// Worker `slot` started an attempt of `steps` training steps.
    Started { slot: usize, attempt: Attempt },
    /// Worker `slot` reached step `step` of `total`.
    Step { slot: usize, step: usize, total: usize },
    /// An attempt ended (successfully or not), on worker `slot` where there is one.
    Finished { slot: Option<usize>, attempt: Attempt, outcome: TaskOutcome },
    /// A job array was submitted (journaled, so that `--resume` can reattach to it).
    Submitted(Submitted),
    /// Counts of a job array's tasks.
    Counts { queued: usize, running: usize, done: usize, failed: usize },
}

/// Whether the executor should go on after a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Stop: kill or cancel what still runs, and return.
    Stop,
}

/// Runs attempts somewhere.
pub trait Executor {
    /// `local` or `slurm`, as recorded in the journal.
    fn name(&self) -> &'static str;
    /// Run the attempts (all of one round), reporting each as it finishes, and return when
    /// every attempt has ended (or a report asked to stop).
    fn run(
        &mut self,
        round: usize,
        attempts: Vec<Attempt>,
        report: &mut dyn FnMut(Report) -> Control,
    ) -> Result<(), SearchError>;
    /// Follow a job array an earlier driver submitted, if it still runs: report each of its
    /// attempts as it ends and return `true`; `false` when there is nothing to follow.
    fn reattach(
        &mut self,
        submitted: &Submitted,
        report: &mut dyn FnMut(Report) -> Control,
    ) -> Result<bool, SearchError>;
}
