//! The search driver: rounds of candidates drawn from the policy, each run as attempts by an
//! executor, journaled, and used to update the policy (Auto Seg-Loss's PPO2).
//!
//! Each round draws `samples` candidates (the first is μ itself with the `mu` baseline); an
//! executor runs one attempt per candidate that the journal does not already settle; a failed
//! attempt (non-zero exit, missing or malformed result, NaN reward, killed, node lost) is
//! retried up to `retries` times, then journaled as failed with its reason. The policy is
//! updated from the candidates that finished (a round where none did stops the search, as
//! does a trainer command that fails on every candidate of the first round, or one that does
//! not exist).
//!
//! Guarantees:
//! * every finished or failed candidate is appended to `OUT/history.jsonl` and flushed before
//!   the next report is taken, so a kill loses at most the attempts still running;
//! * a run is a pure function of its [`SearchConfig`] and the rewards: draws come from
//!   per-round ChaCha streams, the μ update is deterministic float64 on the CPU, and every
//!   candidate trains from the same seed (common random numbers), so `--resume` replays the
//!   journal, reattaches to a Slurm array still running, takes results attempts left in their
//!   folders, runs only what is missing, never runs a finished candidate again, and ends with
//!   the result an uninterrupted run has. Resuming with more `--rounds` extends a search;
//! * `best.params.json` is the candidate with the highest reward (earliest on ties).

use crate::config::{config_difference, Baseline, EvaluatorSpec, Policy, SearchConfig};
use crate::executor::{Attempt, Control, Executor, Report};
use crate::journal::{self, io_error, Candidate, Entry, Failed, Journal, Paths, Submitted};
use crate::policy::{logit, ppo_update, sigmoid, truncated_normal, Layout};
use crate::progress::Progress;
use crate::task::{self, TaskFile, TaskOutcome};
use losscc_loss::LossError;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// One round, for the table and the report.
#[derive(Clone, Debug, Serialize)]
pub struct RoundSummary {
    pub round: usize,
    /// μ at the start of the round (search variables).
    pub mu: Vec<f64>,
    /// μ's curves at the start of the round.
    pub mu_curves: Vec<Vec<f64>>,
    pub mu_reward: Option<f64>,
    pub mean_reward: f64,
    pub best_reward: f64,
    /// Candidates of the round that failed every attempt.
    pub failed: usize,
    pub seconds: f64,
}

/// The result of a search.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub rounds: Vec<RoundSummary>,
    pub best: Candidate,
    pub final_mu: Vec<f64>,
    pub final_curves: Vec<Vec<f64>>,
    /// Every finished candidate, in round and sample order.
    pub candidates: Vec<Candidate>,
    /// Every candidate that failed every attempt.
    pub failed: Vec<Failed>,
    /// Candidates taken from an earlier run's journal, results an earlier run's attempts left
    /// in their folders (finished after its driver was killed), and candidates run now.
    pub reused: usize,
    pub recovered: usize,
    pub trained: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error(transparent)]
    Loss(#[from] LossError),
    #[error("cannot write `{path}`: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("`{0}` already holds a search; pass --resume to continue it, or choose another --out")]
    Exists(String),
    #[error("`{0}` holds no search to resume (no config.json); run without --resume to start one")]
    NothingToResume(String),
    #[error("the search in `{dir}` was started with different settings ({what}); resume it with the same command, or choose another --out")]
    ConfigMismatch { dir: String, what: String },
    #[error("`{path}` line {line} does not match this search (candidate {round}-{sample} drew different values); the history belongs to another run: choose another --out")]
    HistoryMismatch { path: String, line: usize, round: usize, sample: usize },
    #[error("`{0}` has no curves to search (every curve is fixed or the loss has none)")]
    NothingToSearch(String),
    #[error("{0}")]
    Settings(String),
    #[error("{reason}; the search stops{}", stderr_note(.stderr_tail))]
    Stopped { reason: String, stderr_tail: String },
}

fn stderr_note(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!(". The end of its stderr:\n{}", tail.trim_end())
    }
}

/// The search and its inputs.
pub struct Search<'a> {
    pub config: SearchConfig,
    pub layout: Layout,
    /// Failed attempts of a candidate that are retried before it counts as failed.
    pub retries: usize,
    /// Where progress goes (bars on a terminal, lines otherwise: the caller decides).
    pub progress: &'a dyn Progress,
}

/// What the driver knows about one candidate of the current round.
#[derive(Default)]
struct Pending {
    /// Attempts that failed, and the last one's outcome.
    failures: usize,
    last_failure: Option<TaskOutcome>,
    /// The highest attempt number whose folder exists.
    attempts: usize,
}

impl Search<'_> {
    fn check_settings(&self) -> Result<(), SearchError> {
        let config = &self.config;
        if self.layout.dimensions == 0 {
            return Err(SearchError::NothingToSearch(config.file.clone()));
        }
        if config.samples < 2 {
            return Err(SearchError::Settings("--samples must be at least 2 (μ and one draw)".into()));
        }
        if config.rounds == 0 {
            return Err(SearchError::Settings("--rounds must be at least 1".into()));
        }
        if !(config.sigma.is_finite() && config.sigma > 0.0 && config.sigma <= 10.0) {
            return Err(SearchError::Settings("--sigma must be a number in (0, 10]".into()));
        }
        if !(config.clip.is_finite() && config.clip > 0.0) {
            return Err(SearchError::Settings("--clip must be a positive number".into()));
        }
        if !(config.adam_lr.is_finite() && config.adam_lr >= 0.0) {
            return Err(SearchError::Settings("--ppo-lr must be a number ≥ 0".into()));
        }
        Ok(())
    }

    /// Write `config.json` (checking it against the saved one on resume).
    fn open(&self, paths: &Paths, resume: bool) -> Result<(), SearchError> {
        let dir = &paths.dir;
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        let config_path = paths.config();
        if resume {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|_| SearchError::NothingToResume(dir.display().to_string()))?;
            let saved: SearchConfig = serde_json::from_str(&text).map_err(|e| SearchError::ConfigMismatch {
                dir: dir.display().to_string(),
                what: format!("its config.json is unreadable: {e}"),
            })?;
            // More (or fewer) rounds extend (or cut) the same search: rounds never change
            // what earlier rounds drew.
            let comparable = SearchConfig { rounds: self.config.rounds, ..saved };
            if let Some(what) = config_difference(&comparable, &self.config) {
                return Err(SearchError::ConfigMismatch { dir: dir.display().to_string(), what });
            }
        } else if config_path.exists() || paths.history().exists() {
            return Err(SearchError::Exists(dir.display().to_string()));
        }
        task::write_json(dir, "config.json", &self.config).map_err(io_error(&config_path))
    }

    /// Run (or resume) the search in `dir` with `executor`.
    pub fn run(&self, dir: &Path, resume: bool, executor: &mut dyn Executor) -> Result<Outcome, SearchError> {
        self.check_settings()?;
        let dir = std::path::absolute(dir).map_err(io_error(dir))?;
        let paths = Paths { dir: dir.clone() };
        self.open(&paths, resume)?;
        let history_path = paths.history();
        let previous = journal::read(&history_path)?;
        let mut journal = Journal::open(&history_path)?;
        let mut settled: BTreeMap<(usize, usize), (usize, Entry)> = BTreeMap::new();
        let mut submissions: BTreeMap<usize, Vec<Submitted>> = BTreeMap::new();
        for (line, entry) in previous {
            match &entry {
                Entry::Finished(c) => {
                    settled.insert((c.round, c.sample), (line, entry.clone()));
                }
                Entry::Failed(f) => {
                    settled.insert((f.round, f.sample), (line, entry.clone()));
                }
                Entry::Submitted(s) => submissions.entry(s.round).or_default().push(s.clone()),
            }
        }

        let bars = self.progress;
        let mut mu_x: Vec<f64> = self.layout.start_u().iter().map(|&u| logit(u)).collect();
        let mut rounds = Vec::new();
        let mut best: Option<Candidate> = None;
        let (mut all, mut all_failed) = (Vec::new(), Vec::new());
        let (mut reused, mut recovered, mut trained) = (0, 0, 0);
        for round in 0..self.config.rounds {
            let started = Instant::now();
            let mu: Vec<f64> = mu_x.iter().map(|&x| sigmoid(x)).collect();
            let draws = self.draw(round, &mu);
            let mut results: Vec<Option<Result<Candidate, Failed>>> = vec![None; draws.len()];
            for (sample, u) in draws.iter().enumerate() {
                let Some((line, entry)) = settled.remove(&(round, sample)) else { continue };
                let recorded = match &entry {
                    Entry::Finished(c) => &c.u,
                    Entry::Failed(f) => &f.u,
                    Entry::Submitted(_) => unreachable!("only candidates are settled"),
                };
                let same = recorded.len() == u.len()
                    && recorded.iter().zip(u).all(|(a, b)| (a - b).abs() <= 1e-12 * (1.0 + b.abs()));
                if !same {
                    return Err(SearchError::HistoryMismatch {
                        path: history_path.display().to_string(),
                        line,
                        round,
                        sample,
                    });
                }
                // Continue from the replay's own draw, bit for bit.
                results[sample] = Some(match entry {
                    Entry::Finished(c) => Ok(Candidate { u: u.clone(), ..c }),
                    Entry::Failed(f) => Err(Failed { u: u.clone(), ..f }),
                    Entry::Submitted(_) => unreachable!("only candidates are settled"),
                });
                reused += 1;
            }
            bars.round_started(round, results.iter().filter(|r| r.is_some()).count());
            let mut run_round = RoundRun {
                search: self,
                paths: &paths,
                journal: &mut journal,
                round,
                draws: &draws,
                results: &mut results,
                pending: BTreeMap::new(),
                executor_name: executor.name(),
                stop: None,
                trained: 0,
                recovered: 0,
            };
            run_round.run(executor, submissions.get(&round).map(Vec::as_slice).unwrap_or(&[]))?;
            trained += run_round.trained;
            recovered += run_round.recovered;

            let finished: Vec<Candidate> =
                results.iter().filter_map(|r| r.as_ref().and_then(|r| r.as_ref().ok()).cloned()).collect();
            let failed: Vec<Failed> =
                results.iter().filter_map(|r| r.as_ref().and_then(|r| r.as_ref().err()).cloned()).collect();
            if finished.is_empty() {
                let reasons: Vec<String> =
                    failed.iter().map(|f| format!("{}-{}: {}", f.round, f.sample, f.reason)).collect();
                return Err(SearchError::Stopped {
                    reason: format!("every candidate of round {} failed ({})", round + 1, reasons.join("; ")),
                    stderr_tail: failed.last().map(|f| f.stderr_tail.clone()).unwrap_or_default(),
                });
            }
            let rewards: Vec<f64> = finished.iter().map(|c| c.reward).collect();
            let mean = rewards.iter().sum::<f64>() / rewards.len() as f64;
            let mu_reward = (self.config.baseline == Baseline::Mu)
                .then(|| finished.iter().find(|c| c.sample == 0).map(|c| c.reward))
                .flatten();
            if self.config.baseline == Baseline::Mu && mu_reward.is_none() {
                bars.round_finished(&format!(
                    "round {}: μ itself failed; its advantages are measured against the mean reward instead",
                    round + 1
                ));
            }
            let reference = mu_reward.unwrap_or(mean);
            let advantages: Vec<f64> = rewards.iter().map(|r| r - reference).collect();
            for candidate in &finished {
                if best.as_ref().map_or(true, |b| candidate.reward > b.reward) {
                    best = Some(candidate.clone());
                }
            }
            let summary = RoundSummary {
                round,
                mu_curves: self.layout.flat(&mu),
                mu: mu.clone(),
                mu_reward,
                mean_reward: mean,
                best_reward: rewards.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                failed: failed.len(),
                seconds: started.elapsed().as_secs_f64(),
            };
            let failures = if failed.is_empty() { String::new() } else { format!(", {} failed", failed.len()) };
            bars.round_finished(&format!(
                "round {}/{}: μ reward {}, mean {:.4}, best {:.4} ({:.0} s{failures})",
                round + 1,
                self.config.rounds,
                mu_reward.map_or("-".into(), |r| format!("{r:.4}")),
                summary.mean_reward,
                summary.best_reward,
                summary.seconds
            ));
            rounds.push(summary);
            let samples: Vec<Vec<f64>> = finished.iter().map(|c| c.u.clone()).collect();
            if self.config.policy == Policy::Ppo {
                mu_x = ppo_update(&mu_x, &samples, &advantages, &self.config);
            }
            all.extend(finished);
            all_failed.extend(failed);
        }
        let final_mu: Vec<f64> = mu_x.iter().map(|&x| sigmoid(x)).collect();
        Ok(Outcome {
            rounds,
            best: best.expect("every round has a finished candidate"),
            final_curves: self.layout.flat(&final_mu),
            final_mu,
            candidates: all,
            failed: all_failed,
            reused,
            recovered,
            trained,
        })
    }

    /// The round's candidates: μ first (with the `mu` baseline), then truncated-normal draws.
    fn draw(&self, round: usize, mu: &[f64]) -> Vec<Vec<f64>> {
        let stream = self.config.seed.wrapping_mul(0xA24B_AED4_963E_E407).wrapping_add(round as u64 + 1);
        let mut rng = ChaCha8Rng::seed_from_u64(stream);
        (0..self.config.samples)
            .map(|sample| {
                if sample == 0 && self.config.baseline == Baseline::Mu {
                    mu.to_vec()
                } else {
                    mu.iter().map(|&m| truncated_normal(m, self.config.sigma, &mut rng)).collect()
                }
            })
            .collect()
    }
}

/// One round in progress: what is settled, what is pending, and the journal.
struct RoundRun<'s, 'j> {
    search: &'s Search<'s>,
    paths: &'s Paths,
    journal: &'j mut Journal,
    round: usize,
    draws: &'s [Vec<f64>],
    results: &'s mut Vec<Option<Result<Candidate, Failed>>>,
    pending: BTreeMap<usize, Pending>,
    executor_name: &'static str,
    /// A reason to stop the whole search (a fatal failure), with its stderr.
    stop: Option<(String, String)>,
    trained: usize,
    recovered: usize,
}

impl RoundRun<'_, '_> {
    fn run(&mut self, executor: &mut dyn Executor, submissions: &[Submitted]) -> Result<(), SearchError> {
        let unsettled: Vec<usize> = (0..self.draws.len()).filter(|&s| self.results[s].is_none()).collect();
        if unsettled.is_empty() {
            return Ok(());
        }
        // Attempts an earlier driver started: results left in attempt folders are taken, and
        // failed ones count toward the retries; then a Slurm array still running is followed.
        for sample in unsettled {
            if self.results[sample].is_some() {
                continue;
            }
            let mut state = Pending::default();
            let folder = self.paths.candidate(self.round, sample);
            for attempt in attempt_folders(&folder) {
                state.attempts = state.attempts.max(attempt.0);
                match task::read_outcome(&attempt.1) {
                    Some(outcome) if outcome.reward.is_some() && self.results[sample].is_none() => {
                        let candidate = self.finished(sample, attempt.0, &outcome);
                        self.journal.append(&Entry::Finished(candidate.clone()))?;
                        self.results[sample] = Some(Ok(candidate));
                        self.recovered += 1;
                        self.search.progress.candidate_finished();
                    }
                    Some(outcome) if outcome.reward.is_none() => {
                        state.failures += 1;
                        state.last_failure = Some(outcome);
                    }
                    Some(_) | None => {}
                }
            }
            if self.results[sample].is_none() {
                self.pending.insert(sample, state);
            }
        }
        for submitted in submissions {
            let mut report = |r: Report| self.on_report(r);
            executor.reattach(submitted, &mut report)?;
            self.check_stop()?;
        }
        let mut first_pass = true;
        loop {
            self.give_up_on_exhausted()?;
            let attempts = self.next_attempts()?;
            if attempts.is_empty() {
                break;
            }
            let round = self.round;
            let mut report = |r: Report| self.on_report(r);
            executor.run(round, attempts, &mut report)?;
            self.check_stop()?;
            // A trainer command that fails on every candidate of the first round is broken:
            // stop with its stderr rather than spend the budget on retries.
            let trainer = matches!(self.search.config.evaluator, EvaluatorSpec::Trainer { .. });
            let none_finished = self.results.iter().all(|r| !matches!(r, Some(Ok(_))));
            if first_pass && trainer && self.round == 0 && none_finished {
                let last = self.pending.values().filter_map(|p| p.last_failure.clone()).last();
                let (reason, stderr_tail) =
                    last.map_or((String::new(), String::new()), |o| (o.reason.unwrap_or_default(), o.stderr_tail));
                return Err(SearchError::Stopped {
                    reason: format!(
                        "the trainer command failed on every candidate of the first round (the last: {reason})"
                    ),
                    stderr_tail,
                });
            }
            first_pass = false;
        }
        Ok(())
    }

    fn check_stop(&mut self) -> Result<(), SearchError> {
        match self.stop.take() {
            Some((reason, stderr_tail)) => Err(SearchError::Stopped { reason, stderr_tail }),
            None => Ok(()),
        }
    }

    /// Journal as failed every pending candidate that used up its retries.
    fn give_up_on_exhausted(&mut self) -> Result<(), SearchError> {
        let exhausted: Vec<usize> =
            self.pending.iter().filter(|(_, p)| p.failures > self.search.retries).map(|(&s, _)| s).collect();
        for sample in exhausted {
            let state = self.pending.remove(&sample).expect("pending");
            let last =
                state.last_failure.unwrap_or_else(|| TaskOutcome::failure("no attempt ran".into(), String::new()));
            let failed = Failed {
                round: self.round,
                sample,
                u: self.draws[sample].clone(),
                control_points: self.search.layout.flat(&self.draws[sample]),
                failed: true,
                reason: last.reason.unwrap_or_default(),
                stderr_tail: last.stderr_tail,
                attempts: state.failures,
                host: last.host,
                executor: self.executor_name.into(),
            };
            self.journal.append(&Entry::Failed(failed.clone()))?;
            self.results[sample] = Some(Err(failed));
            self.search.progress.candidate_finished();
        }
        Ok(())
    }

    /// A fresh attempt folder (with its `task.json`) for every pending candidate.
    fn next_attempts(&mut self) -> Result<Vec<Attempt>, SearchError> {
        let mut attempts = Vec::new();
        for (&sample, state) in self.pending.iter_mut() {
            state.attempts += 1;
            let dir = self.paths.candidate(self.round, sample).join(format!("attempt-{}", state.attempts));
            std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
            let task = TaskFile {
                search: self.paths.dir.clone(),
                round: self.round,
                sample,
                attempt: state.attempts,
                control_points: self.search.layout.flat(&self.draws[sample]),
            };
            task::write_json(&dir, task::TASK_FILE, &task).map_err(io_error(&dir))?;
            attempts.push(Attempt { round: self.round, sample, attempt: state.attempts, dir });
        }
        Ok(attempts)
    }

    fn finished(&self, sample: usize, attempt: usize, outcome: &TaskOutcome) -> Candidate {
        Candidate {
            round: self.round,
            sample,
            u: self.draws[sample].clone(),
            control_points: self.search.layout.flat(&self.draws[sample]),
            reward: outcome.reward.expect("a finished attempt"),
            seconds: ((outcome.finished - outcome.started) * 1000.0).round() / 1000.0,
            host: outcome.host.clone(),
            device: outcome.device.clone(),
            executor: self.executor_name.into(),
            attempts: attempt,
            started: outcome.started,
            finished: outcome.finished,
        }
    }

    /// Handle what the executor reports: journal results, count failures, relay progress.
    fn on_report(&mut self, report: Report) -> Control {
        let progress = self.search.progress;
        match report {
            Report::Started { slot, attempt } => {
                progress.candidate_started(
                    slot,
                    &format!("candidate {}", attempt.label()),
                    self.search.config.train.iters,
                );
            }
            Report::Step { slot, step, .. } => progress.candidate_step(slot, step),
            Report::Counts { queued, running, done, failed } => progress.array(queued, running, done, failed),
            Report::Submitted(submitted) => {
                if let Err(error) = self.journal.append(&Entry::Submitted(submitted)) {
                    self.stop = Some((error.to_string(), String::new()));
                    return Control::Stop;
                }
            }
            Report::Finished { slot, attempt, outcome } => {
                if let Some(slot) = slot {
                    progress.worker_idle(slot);
                }
                if attempt.round != self.round || self.results[attempt.sample].is_some() {
                    return Control::Continue;
                }
                if outcome.reward.is_some() {
                    let candidate = self.finished(attempt.sample, attempt.attempt, &outcome);
                    if let Err(error) = self.journal.append(&Entry::Finished(candidate.clone())) {
                        self.stop = Some((error.to_string(), String::new()));
                        return Control::Stop;
                    }
                    self.results[attempt.sample] = Some(Ok(candidate));
                    self.pending.remove(&attempt.sample);
                    self.trained += 1;
                    progress.candidate_finished();
                } else {
                    if outcome.fatal {
                        self.stop = Some((outcome.reason.clone().unwrap_or_default(), outcome.stderr_tail.clone()));
                        return Control::Stop;
                    }
                    let state = self.pending.entry(attempt.sample).or_default();
                    state.failures += 1;
                    state.attempts = state.attempts.max(attempt.attempt);
                    state.last_failure = Some(outcome);
                }
            }
        }
        Control::Continue
    }
}

/// The attempt folders of a candidate, `(attempt number, folder)`, in order.
fn attempt_folders(folder: &Path) -> Vec<(usize, std::path::PathBuf)> {
    let mut found: Vec<(usize, std::path::PathBuf)> = std::fs::read_dir(folder)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_prefix("attempt-").and_then(|k| k.parse().ok()).map(|k| (k, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}
