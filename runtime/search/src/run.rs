//! The search driver: rounds of candidates drawn from the policy, trained on the proxy task,
//! journaled, and used to update the policy (Auto Seg-Loss's PPO2).
//!
//! Policy: independent truncated normals on [0,1], one per search variable of every curve
//! that is not fixed, with μ = sigmoid(μ_x) and σ fixed. Each round draws `samples`
//! candidates (the first is μ itself when the baseline is `mu`), trains a fresh proxy network
//! with each candidate loss, and rewards it with the exact target metric on the hold-out split.
//! Advantage = reward − reward(μ) (or − the round's mean); then `adam_steps` Adam steps on
//! μ_x maximize the clipped objective with per-dimension ratios, summed over dimensions and
//! averaged over samples.
//!
//! Guarantees:
//! * Every finished candidate is appended to `OUT/history.jsonl` and flushed before the next
//!   result is taken, so a kill loses at most the candidates still training.
//! * A run is a pure function of its [`SearchConfig`] and the rewards: draws come from
//!   per-round ChaCha streams, the μ update is deterministic float64 on the CPU, and all
//!   candidates train from the same seed (common random numbers: rewards differ by the curves
//!   alone, which sharpens the advantages and keeps rounds comparable). So `--resume` replays the history, trains only what is missing, and ends
//!   with the result an uninterrupted run has. Resuming with more `--rounds` extends a search.
//! * `best.params.json` is the candidate with the highest reward (earliest on ties), in the
//!   own params format, with its provenance; `mu.params.json` is the policy's final μ.


use crate::config::{config_difference, Baseline, SearchConfig};
use crate::journal::{io_error, read_history, Candidate, Paths};
use crate::policy::{logit, ppo_update, sigmoid, truncated_normal, Layout};
use crate::progress::Progress;
use losscc_loss::{Loss, LossError, Overrides};
use losscc_proxy::data::Dataset;
use losscc_proxy::trainer::{self, Objective, TrainConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;
use tch::Device;

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
    pub seconds: f64,
}

/// The result of a search.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub rounds: Vec<RoundSummary>,
    pub best: Candidate,
    pub final_mu: Vec<f64>,
    pub final_curves: Vec<Vec<f64>>,
    /// Every candidate, in round and sample order.
    pub candidates: Vec<Candidate>,
    /// Candidates taken from an earlier run's history, and candidates trained now.
    pub reused: usize,
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
    #[error("`{path}` line {line} does not match this search (candidate {round}.{sample} drew different values); the history belongs to another run: choose another --out")]
    HistoryMismatch { path: String, line: usize, round: usize, sample: usize },
    #[error("`{0}` has no curves to search (every curve is fixed or the loss has none)")]
    NothingToSearch(String),
    #[error("{0}")]
    Settings(String),
}


/// How candidates are trained: the devices and how many models each holds at once.
pub struct Workers {
    pub devices: Vec<Device>,
    pub models_per_device: usize,
}

/// The search and its inputs.
pub struct Search<'a> {
    pub config: SearchConfig,
    pub file: PathBuf,
    pub layout: Layout,
    pub target: &'a Loss,
    pub dataset: &'a Dataset,
    pub workers: Workers,
    /// Where progress goes (bars on a terminal, lines otherwise: the caller decides).
    pub progress: &'a dyn Progress,
}

impl Search<'_> {
    /// Run (or resume) the search in `dir`.
    pub fn run(&self, dir: &Path, resume: bool) -> Result<Outcome, SearchError> {
        let paths = Paths { dir: dir.to_path_buf() };
        if self.layout.dimensions == 0 {
            return Err(SearchError::NothingToSearch(self.config.file.clone()));
        }
        if self.config.samples < 2 {
            return Err(SearchError::Settings("--samples must be at least 2 (μ and one draw)".into()));
        }
        if self.config.rounds == 0 {
            return Err(SearchError::Settings("--rounds must be at least 1".into()));
        }
        let config = &self.config;
        if !(config.sigma.is_finite() && config.sigma > 0.0 && config.sigma <= 10.0) {
            return Err(SearchError::Settings("--sigma must be a number in (0, 10]".into()));
        }
        if !(config.clip.is_finite() && config.clip > 0.0) {
            return Err(SearchError::Settings("--clip must be a positive number".into()));
        }
        if !(config.adam_lr.is_finite() && config.adam_lr >= 0.0) {
            return Err(SearchError::Settings("--ppo-lr must be a number ≥ 0".into()));
        }
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
            let text = serde_json::to_string_pretty(&self.config).expect("config serializes");
            std::fs::write(&config_path, text + "\n").map_err(io_error(&config_path))?;
        } else {
            if config_path.exists() || paths.history().exists() {
                return Err(SearchError::Exists(dir.display().to_string()));
            }
            let text = serde_json::to_string_pretty(&self.config).expect("config serializes");
            std::fs::write(&config_path, text + "\n").map_err(io_error(&config_path))?;
        }
        let previous = read_history(&paths.history())?;
        let history_path = paths.history();
        let mut history = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&history_path)
            .map_err(io_error(&history_path))?;
        let mut known: BTreeMap<(usize, usize), (usize, Candidate)> =
            previous.into_iter().map(|(line, c)| ((c.round, c.sample), (line, c))).collect();

        let bars = self.progress;
        let mut mu_x: Vec<f64> = self.layout.start_u().iter().map(|&u| logit(u)).collect();
        let mut rounds = Vec::new();
        let mut best: Option<Candidate> = None;
        let mut all = Vec::new();
        let (mut reused, mut trained) = (0, 0);
        for round in 0..self.config.rounds {
            let started = Instant::now();
            let mu: Vec<f64> = mu_x.iter().map(|&x| sigmoid(x)).collect();
            let draws = self.draw(round, &mu);
            let mut results: Vec<Option<Candidate>> = vec![None; draws.len()];
            for (sample, u) in draws.iter().enumerate() {
                if let Some((line, candidate)) = known.remove(&(round, sample)) {
                    let same = candidate.u.len() == u.len()
                        && candidate.u.iter().zip(u).all(|(a, b)| (a - b).abs() <= 1e-12 * (1.0 + b.abs()));
                    if !same {
                        return Err(SearchError::HistoryMismatch {
                            path: history_path.display().to_string(),
                            line,
                            round,
                            sample,
                        });
                    }
                    // Continue from the replay's own draw, bit for bit.
                    results[sample] = Some(Candidate { u: u.clone(), ..candidate });
                    reused += 1;
                }
            }
            let pending: Vec<(usize, Vec<f64>)> = draws
                .iter()
                .enumerate()
                .filter(|(sample, _)| results[*sample].is_none())
                .map(|(sample, u)| (sample, u.clone()))
                .collect();
            bars.round_started(round, draws.len() - pending.len());
            trained += pending.len();
            let mut write_error = None;
            self.train_candidates(round, pending, &mut |candidate: Candidate| {
                let line = serde_json::to_string(&candidate).expect("a candidate serializes");
                if let Err(error) = writeln!(history, "{line}").and_then(|_| history.flush()) {
                    write_error.get_or_insert(error);
                }
                let sample = candidate.sample;
                results[sample] = Some(candidate);
                bars.candidate_finished();
            })?;
            if let Some(error) = write_error {
                return Err(io_error(&history_path)(error));
            }
            let candidates: Vec<Candidate> =
                results.into_iter().map(|c| c.expect("every candidate finished")).collect();
            let rewards: Vec<f64> = candidates.iter().map(|c| c.reward).collect();
            let mean = rewards.iter().sum::<f64>() / rewards.len() as f64;
            let mu_reward = (self.config.baseline == Baseline::Mu).then(|| rewards[0]);
            let reference = mu_reward.unwrap_or(mean);
            let advantages: Vec<f64> = rewards.iter().map(|r| r - reference).collect();
            for candidate in &candidates {
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
                seconds: started.elapsed().as_secs_f64(),
            };
            bars.round_finished(&format!(
                "round {}/{}: μ reward {}, mean {:.4}, best {:.4} ({:.0} s)",
                round + 1,
                self.config.rounds,
                mu_reward.map_or("-".into(), |r| format!("{r:.4}")),
                summary.mean_reward,
                summary.best_reward,
                summary.seconds
            ));
            rounds.push(summary);
            let draws: Vec<Vec<f64>> = candidates.iter().map(|c| c.u.clone()).collect();
            mu_x = ppo_update(&mu_x, &draws, &advantages, &self.config);
            all.extend(candidates);
        }
        let final_mu: Vec<f64> = mu_x.iter().map(|&x| sigmoid(x)).collect();
        Ok(Outcome {
            rounds,
            best: best.expect("at least one round"),
            final_curves: self.layout.flat(&final_mu),
            final_mu,
            candidates: all,
            reused,
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

    /// The training seed of every candidate: the search's seed. All candidates start from the
    /// same weights and see the same batches, so rewards differ by the curves alone and stay
    /// comparable across rounds (common random numbers).
    pub fn training_seed(&self) -> u64 {
        self.config.seed
    }

    /// Train the pending candidates on the workers; `done` sees each as it finishes.
    fn train_candidates(
        &self,
        round: usize,
        pending: Vec<(usize, Vec<f64>)>,
        done: &mut dyn FnMut(Candidate),
    ) -> Result<(), SearchError> {
        if pending.is_empty() {
            return Ok(());
        }
        let queue = Mutex::new(VecDeque::from(pending));
        let slots: Vec<Device> = self
            .workers
            .devices
            .iter()
            .flat_map(|&device| std::iter::repeat(device).take(self.workers.models_per_device.max(1)))
            .collect();
        let (sender, receiver) = std::sync::mpsc::channel::<Result<Candidate, SearchError>>();
        let mut first_error = None;
        std::thread::scope(|scope| {
            for (slot, &device) in slots.iter().enumerate() {
                let sender = sender.clone();
                let queue = &queue;
                scope.spawn(move || {
                    let overrides = Overrides::from(self.config.overrides.as_slice());
                    let mut loss = match Loss::from_file(&self.file, &overrides) {
                        Ok(loss) => loss,
                        Err(error) => {
                            let _ = sender.send(Err(error.into()));
                            return;
                        }
                    };
                    loop {
                        let job = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                        let Some((sample, u)) = job else { break };
                        let result = self.train_one(&mut loss, round, sample, u, device, slot);
                        let failed = result.is_err();
                        if sender.send(result).is_err() || failed {
                            break;
                        }
                    }
                });
            }
            drop(sender);
            for result in receiver {
                match result {
                    Ok(candidate) => done(candidate),
                    Err(error) => {
                        queue.lock().unwrap_or_else(|p| p.into_inner()).clear();
                        first_error.get_or_insert(error);
                    }
                }
            }
        });
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    fn train_one(
        &self,
        loss: &mut Loss,
        round: usize,
        sample: usize,
        u: Vec<f64>,
        device: Device,
        slot: usize,
    ) -> Result<Candidate, SearchError> {
        let started = Instant::now();
        loss.set_params(self.layout.params(&u))?;
        let objective = Objective::Compiled(loss);
        let config = TrainConfig { seed: self.training_seed(), ..self.config.train.clone() };
        let progress = self.progress;
        progress.candidate_started(slot, &format!("candidate {}.{}", round + 1, sample + 1), config.iters);
        let outcome = trainer::train(self.dataset, &objective, &config, device, &mut |step| progress.candidate_step(slot, step));
        progress.worker_idle(slot);
        let trained = outcome?;
        let value = trained.evaluate(&self.dataset.holdout, &[self.target])?[0];
        // An undefined metric (no boundary in the hold-out, say) earns nothing.
        let reward = if value.is_finite() { value } else { 0.0 };
        Ok(Candidate {
            round,
            sample,
            control_points: self.layout.flat(&u),
            u,
            reward,
            seconds: (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
        })
    }
}

