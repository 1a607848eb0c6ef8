//! The Slurm executor: a round's attempts as one job array, one task per attempt.
//!
//! The driver writes `OUT/rounds/<round>/array-<k>.txt` (one attempt folder per line) and
//! `array-<k>.sh` (`losscc task` on the line of `$SLURM_ARRAY_TASK_ID`), submits it with
//! `sbatch --parsable --array=0-(n-1) --cpus-per-task=T` plus the user's `--slurm-arg`s,
//! journals the job id at once, and follows the array with `squeue` (accounting need not be
//! on). A task that leaves the queue without an `outcome.json` (killed, node lost, or unable to
//! see the search folder) gets one saying so, with the tail of its Slurm output file.

use super::{Attempt, Control, Executor, Report};
use crate::journal::Submitted;
use crate::run::SearchError;
use crate::task::{self, TaskOutcome};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Submits rounds to Slurm.
pub struct Slurm {
    /// The `losscc` binary, as the nodes see it.
    pub program: PathBuf,
    /// The search's folder, on a filesystem the nodes share.
    pub out: PathBuf,
    /// Extra `sbatch` arguments (`--partition=...`, `--gres=gpu:1`, `--time=...`).
    pub args: Vec<String>,
    /// CPUs per task (the search's threads per model).
    pub cpus_per_task: usize,
    /// How often `squeue` is asked.
    pub poll: Duration,
}

fn slurm_error(what: &str, error: std::io::Error) -> SearchError {
    if error.kind() == std::io::ErrorKind::NotFound {
        SearchError::Settings(format!(
            "`{what}` was not found: --executor slurm needs Slurm's commands on PATH (on a machine without a cluster, \
             `scripts/slurm-local.sh start` starts a one-node one)"
        ))
    } else {
        SearchError::Settings(format!("cannot run `{what}`: {error}"))
    }
}

impl Slurm {
    /// A Slurm executor, once `sbatch` is known to run here.
    pub fn new(program: PathBuf, out: PathBuf, args: Vec<String>, cpus_per_task: usize) -> Result<Slurm, SearchError> {
        Command::new("sbatch").arg("--version").output().map_err(|e| slurm_error("sbatch", e))?;
        Ok(Slurm { program, out, args, cpus_per_task, poll: Duration::from_millis(500) })
    }

    /// The array tasks of `job` still in the queue, with their state (`PD`, `R`, `CG`, ...),
    /// or `None` when Slurm no longer knows the job.
    fn queued(&self, job: &str) -> Result<Option<BTreeMap<usize, String>>, SearchError> {
        let output = Command::new("squeue")
            .args(["-h", "-r", "-j", job, "-o", "%K %t"])
            .output()
            .map_err(|e| slurm_error("squeue", e))?;
        if !output.status.success() {
            // A job Slurm has already forgotten ("Invalid job id specified").
            return Ok(None);
        }
        let tasks: BTreeMap<usize, String> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                Some((words.next()?.parse().ok()?, words.next()?.to_string()))
            })
            .collect();
        Ok(if tasks.is_empty() { None } else { Some(tasks) })
    }

    /// Follow `job` until every task has left the queue, reporting each as it ends.
    fn follow(&self, submitted: &Submitted, report: &mut dyn FnMut(Report) -> Control) -> Result<(), SearchError> {
        let mut open: BTreeMap<usize, &PathBuf> =
            submitted.tasks.iter().enumerate().map(|(i, (_, dir))| (i, dir)).collect();
        let (mut done, mut failed) = (0, 0);
        let mut last_counts = None;
        // A task that left the queue without an outcome gets one more poll for its file to
        // appear (shared filesystems can show it late) before it counts as failed.
        let mut unseen: std::collections::BTreeSet<usize> = std::collections::BTreeSet::new();
        while !open.is_empty() {
            let queued = self.queued(&submitted.job)?.unwrap_or_default();
            let ended: Vec<usize> = open.keys().copied().filter(|index| !queued.contains_key(index)).collect();
            for index in ended {
                let dir = open[&index];
                if task::read_outcome(dir).is_none() && unseen.insert(index) {
                    continue;
                }
                open.remove(&index);
                let (sample, _) = submitted.tasks[index];
                let outcome = task::read_outcome(dir).unwrap_or_else(|| {
                    let log = self
                        .out
                        .join("rounds")
                        .join(submitted.round.to_string())
                        .join(format!("slurm-{}_{index}.out", submitted.job));
                    let outcome = TaskOutcome::failure(
                        format!(
                            "Slurm task {}_{index} ended without a result: it was killed or its node was lost, or it \
                             could not see the search folder `{}` (--out must be on a filesystem every node shares)",
                            submitted.job,
                            self.out.display()
                        ),
                        task::tail(&log, 20),
                    );
                    let _ = task::write_json(dir, task::OUTCOME_FILE, &outcome);
                    outcome
                });
                if outcome.reward.is_some() {
                    done += 1;
                } else {
                    failed += 1;
                }
                let attempt =
                    Attempt { round: submitted.round, sample, attempt: attempt_number(dir), dir: dir.clone() };
                if report(Report::Finished { slot: None, attempt, outcome }) == Control::Stop {
                    let _ = Command::new("scancel").arg(&submitted.job).status();
                    return Ok(());
                }
            }
            let running = queued.values().filter(|state| state.as_str() != "PD").count();
            let counts = (queued.len() - running, running, done, failed);
            if last_counts != Some(counts) {
                last_counts = Some(counts);
                let (queued, running, done, failed) = counts;
                if report(Report::Counts { queued, running, done, failed }) == Control::Stop {
                    let _ = Command::new("scancel").arg(&submitted.job).status();
                    return Ok(());
                }
            }
            if !open.is_empty() {
                std::thread::sleep(self.poll);
            }
        }
        Ok(())
    }
}

/// The attempt number of an attempt folder (`attempt-<k>`).
fn attempt_number(dir: &Path) -> usize {
    dir.file_name()
        .and_then(|name| name.to_str())
        .and_then(|name| name.strip_prefix("attempt-"))
        .and_then(|k| k.parse().ok())
        .unwrap_or(1)
}

/// `text` quoted for `sh`.
fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

impl Executor for Slurm {
    fn name(&self) -> &'static str {
        "slurm"
    }

    fn run(
        &mut self,
        round: usize,
        attempts: Vec<Attempt>,
        report: &mut dyn FnMut(Report) -> Control,
    ) -> Result<(), SearchError> {
        if attempts.is_empty() {
            return Ok(());
        }
        let folder = self.out.join("rounds").join(round.to_string());
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |error: std::io::Error| SearchError::Io { path, error }
        };
        std::fs::create_dir_all(&folder).map_err(io(&folder))?;
        let index = (0..).find(|k| !folder.join(format!("array-{k}.sh")).exists()).expect("a free name");
        let list = folder.join(format!("array-{index}.txt"));
        let lines: Vec<String> = attempts.iter().map(|a| a.dir.display().to_string()).collect();
        std::fs::write(&list, lines.join("\n") + "\n").map_err(io(&list))?;
        let script = folder.join(format!("array-{index}.sh"));
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n# losscc search, round {round}: one attempt per array task.\n\
                 dir=$(sed -n \"$((SLURM_ARRAY_TASK_ID + 1))p\" {})\n\
                 exec {} task \"$dir\"\n",
                quoted(&list.display().to_string()),
                quoted(&self.program.display().to_string())
            ),
        )
        .map_err(io(&script))?;
        let mut command = Command::new("sbatch");
        command
            .arg("--parsable")
            .arg(format!("--array=0-{}", attempts.len() - 1))
            .arg(format!("--job-name=losscc-r{round}"))
            .arg(format!("--cpus-per-task={}", self.cpus_per_task.max(1)))
            .arg(format!("--output={}", folder.join("slurm-%A_%a.out").display()))
            .args(&self.args)
            .arg(&script);
        let output = command.output().map_err(|e| slurm_error("sbatch", e))?;
        if !output.status.success() {
            return Err(SearchError::Settings(format!(
                "sbatch refused the round's job array: {}; check --slurm-arg (partition, account, time)",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let job = stdout.trim().split(';').next().unwrap_or_default().to_string();
        if job.is_empty() {
            return Err(SearchError::Settings(format!("sbatch printed no job id: {}", stdout.trim())));
        }
        let submitted = Submitted {
            event: "slurm_array".into(),
            round,
            job,
            tasks: attempts.iter().map(|a| (a.sample, a.dir.clone())).collect(),
            submitted: task::now(),
        };
        if report(Report::Submitted(submitted.clone())) == Control::Stop {
            let _ = Command::new("scancel").arg(&submitted.job).status();
            return Ok(());
        }
        self.follow(&submitted, report)
    }

    fn reattach(
        &mut self,
        submitted: &Submitted,
        report: &mut dyn FnMut(Report) -> Control,
    ) -> Result<bool, SearchError> {
        if self.queued(&submitted.job)?.is_none() {
            return Ok(false);
        }
        self.follow(submitted, report)?;
        Ok(true)
    }
}
