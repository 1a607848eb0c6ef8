//! The local executor: up to `workers` attempts at once, each a `losscc task` child process.
//!
//! A child that crashes, aborts or is killed takes only its own attempt down: its folder gets
//! an `outcome.json` saying so, with the tail of its stderr (`task.log`). Children die with the
//! driver (Linux `PR_SET_PDEATHSIG`), so a killed search leaves nothing running; `--resume`
//! runs their attempts again. With GPUs, worker `i` runs on GPU `i % gpus`
//! (`CUDA_VISIBLE_DEVICES`), `models-per-device` workers per GPU.

use super::{Attempt, Control, Executor, Report};
use crate::journal::Submitted;
use crate::run::SearchError;
use crate::task::{self, TaskOutcome, PROGRESS_PREFIX};
use std::collections::VecDeque;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

/// Runs attempts as child processes of the driver.
pub struct Local {
    /// The `losscc` binary.
    pub program: PathBuf,
    pub workers: usize,
    /// The GPU each worker slot uses (`None`: the CPU), cycled over the slots.
    pub gpus: Vec<usize>,
}

enum Event {
    Step { slot: usize, step: usize, total: usize },
    Exited { slot: usize, status: Option<i32> },
}

impl Local {
    fn spawn(&self, slot: usize, attempt: &Attempt, events: &mpsc::Sender<Event>) -> Result<Child, String> {
        let log =
            std::fs::File::create(attempt.dir.join("task.log")).map_err(|e| format!("cannot create task.log: {e}"))?;
        let mut command = Command::new(&self.program);
        command.arg("task").arg(&attempt.dir).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
        if !self.gpus.is_empty() {
            command.env("CUDA_VISIBLE_DEVICES", self.gpus[slot % self.gpus.len()].to_string());
        }
        die_with_parent(&mut command);
        let mut child = command.spawn().map_err(|e| format!("cannot start `{}`: {e}", self.program.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let sender = events.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut words = line.split_whitespace();
                if words.next() == Some(PROGRESS_PREFIX) {
                    if let (Some(Ok(step)), Some(Ok(total))) =
                        (words.next().map(str::parse), words.next().map(str::parse))
                    {
                        let _ = sender.send(Event::Step { slot, step, total });
                    }
                }
            }
        });
        Ok(child)
    }
}

/// The outcome of an attempt whose process ended: its own, or a failure saying how it ended.
fn outcome_of(attempt: &Attempt, status: Option<i32>) -> TaskOutcome {
    if let Some(outcome) = task::read_outcome(&attempt.dir) {
        return outcome;
    }
    let how = match status {
        Some(code) => format!("exited with status {code}"),
        None => "was killed by a signal (a crash, or out of memory)".into(),
    };
    let outcome = TaskOutcome::failure(
        format!("the task process {how} without writing a result"),
        task::tail(&attempt.dir.join("task.log"), 20),
    );
    let _ = task::write_json(&attempt.dir, task::OUTCOME_FILE, &outcome);
    outcome
}

impl Executor for Local {
    fn name(&self) -> &'static str {
        "local"
    }

    fn run(
        &mut self,
        _round: usize,
        attempts: Vec<Attempt>,
        report: &mut dyn FnMut(Report) -> Control,
    ) -> Result<(), SearchError> {
        let mut queue: VecDeque<Attempt> = attempts.into();
        let (sender, events) = mpsc::channel::<Event>();
        let mut running: Vec<Option<(Child, Attempt)>> = (0..self.workers.max(1)).map(|_| None).collect();
        let mut stop = false;
        loop {
            // Fill free slots.
            for slot in 0..running.len() {
                if stop || running[slot].is_some() {
                    continue;
                }
                let Some(attempt) = queue.pop_front() else { break };
                match self.spawn(slot, &attempt, &sender) {
                    Ok(child) => {
                        if report(Report::Started { slot, attempt: attempt.clone() }) == Control::Stop {
                            stop = true;
                        }
                        running[slot] = Some((child, attempt));
                    }
                    Err(reason) => {
                        let outcome = TaskOutcome::failure(reason, String::new());
                        let _ = task::write_json(&attempt.dir, task::OUTCOME_FILE, &outcome);
                        if report(Report::Finished { slot: Some(slot), attempt, outcome }) == Control::Stop {
                            stop = true;
                        }
                    }
                }
            }
            if running.iter().all(Option::is_none) {
                break;
            }
            // Reap children that ended; relay progress meanwhile.
            for (slot, entry) in running.iter_mut().enumerate() {
                if let Some((child, _)) = entry {
                    if let Ok(Some(status)) = child.try_wait() {
                        let _ = sender.send(Event::Exited { slot, status: status.code() });
                    }
                }
            }
            match events.recv_timeout(std::time::Duration::from_millis(50)) {
                Ok(Event::Step { slot, step, total }) => {
                    if report(Report::Step { slot, step, total }) == Control::Stop {
                        stop = true;
                    }
                }
                Ok(Event::Exited { slot, status }) => {
                    if let Some((_, attempt)) = running[slot].take() {
                        let outcome = outcome_of(&attempt, status);
                        if report(Report::Finished { slot: Some(slot), attempt, outcome }) == Control::Stop {
                            stop = true;
                        }
                    }
                }
                Err(_) => {}
            }
            if stop {
                for (mut child, _) in running.iter_mut().filter_map(Option::take) {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                break;
            }
        }
        Ok(())
    }

    fn reattach(
        &mut self,
        _submitted: &Submitted,
        _report: &mut dyn FnMut(Report) -> Control,
    ) -> Result<bool, SearchError> {
        Ok(false)
    }
}

/// Ask the kernel to kill the child when the driver dies (Linux), so that a killed search
/// leaves no orphan training in the background.
fn die_with_parent(command: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: `prctl` is async-signal-safe; nothing else runs between fork and exec here.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
}
