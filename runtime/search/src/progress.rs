//! What a running search reports, as a trait the caller implements: the command line draws
//! progress bars on a terminal; [`Lines`] prints only the round summaries.

/// Receives a search's progress. Calls come from the driver and from worker threads.
pub trait Progress: Sync {
    /// A round starts; `done` of its candidates are already known (resumed from history).
    fn round_started(&self, round: usize, done: usize);
    /// Worker `slot` starts training a candidate for `steps` steps.
    fn candidate_started(&self, slot: usize, label: &str, steps: usize);
    /// Worker `slot` reached training step `step`.
    fn candidate_step(&self, slot: usize, step: usize);
    /// Worker `slot` finished its candidate (or gave up on it).
    fn worker_idle(&self, slot: usize);
    /// A candidate's result was journaled.
    fn candidate_finished(&self);
    /// A Slurm job array's tasks: waiting, running, finished and failed.
    fn array(&self, queued: usize, running: usize, done: usize, failed: usize);
    /// A round is over; `summary` is its one-line report.
    fn round_finished(&self, summary: &str);
}

/// Progress as plain lines on stderr: one summary per round, nothing else.
pub struct Lines;

impl Progress for Lines {
    fn round_started(&self, _round: usize, _done: usize) {}
    fn candidate_started(&self, _slot: usize, _label: &str, _steps: usize) {}
    fn candidate_step(&self, _slot: usize, _step: usize) {}
    fn worker_idle(&self, _slot: usize) {}
    fn candidate_finished(&self) {}
    fn array(&self, queued: usize, running: usize, done: usize, failed: usize) {
        eprintln!("job array: {queued} queued, {running} running, {done} done, {failed} failed");
    }
    fn round_finished(&self, summary: &str) {
        eprintln!("{summary}");
    }
}
