//! PPO search over a loss's curve parameters on the proxy task (Auto Seg-Loss's PPO2).
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

use crate::data::Dataset;
use crate::progress;
use crate::trainer::{self, Objective, TrainConfig};
use crate::{Loss, LossError};
use compiler::curve::Curve;
use compiler::params::Params;
use indicatif::{MultiProgress, ProgressBar};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor};

/// What the advantage is measured against.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Baseline {
    /// The reward of μ itself (sample 0 of each round).
    Mu,
    /// The mean reward of the round.
    Mean,
}

/// Everything that determines a search's result; saved as `OUT/config.json` and compared on
/// `--resume`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchConfig {
    /// The loss being searched, as given on the command line, its source and `--set`s.
    pub file: String,
    pub source: String,
    pub overrides: Vec<(String, String)>,
    /// The reward: an exact metric on the hold-out split (a built-in name or a metric file).
    pub target: String,
    pub rounds: usize,
    pub samples: usize,
    pub sigma: f64,
    pub clip: f64,
    pub adam_steps: usize,
    pub adam_lr: f64,
    pub baseline: Baseline,
    pub seed: u64,
    /// Proxy training of every candidate (its `seed` is the search's seed).
    pub train: TrainConfig,
    /// The data, described (built-in spec or folder).
    pub data: String,
    /// Starting curves, flat control points per curve.
    pub start: Vec<Vec<f64>>,
    /// CPU threads per candidate (results depend on it at the last bits).
    pub threads_per_model: usize,
    /// `cpu` or `cuda`: rewards from different devices are not mixed in one search.
    pub device: String,
    /// The target metric's source text (empty for a built-in metric).
    pub target_source: String,
}

/// The published settings and a CPU-sized one.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Preset {
    /// M = 32 samples, 12 rounds, 1000 proxy iterations at 128×128, batch 32 (GPU hours).
    Paper,
    /// 6 samples, 4 rounds, 120 iterations at 64×64, batch 8: minutes on two CPU cores.
    Quick,
}

impl Preset {
    /// (rounds, samples, iters, batch, crop)
    pub fn settings(self) -> (usize, usize, usize, usize, usize) {
        match self {
            Preset::Paper => (12, 32, 1000, 32, 128),
            Preset::Quick => (4, 6, 120, 8, 64),
        }
    }
}

/// One finished candidate: one line of `history.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub round: usize,
    pub sample: usize,
    /// The search variables in [0,1].
    pub u: Vec<f64>,
    /// The candidate's curves, flat control points per curve (manifest order).
    pub control_points: Vec<Vec<f64>>,
    pub reward: f64,
    pub seconds: f64,
}

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

/// The search variables' layout over the loss's curves.
#[derive(Clone, Debug)]
pub struct Layout {
    start: Params,
    /// For each searched curve: (curve index, pieces, offset into u).
    searched: Vec<(usize, usize, usize)>,
    pub dimensions: usize,
}

impl Layout {
    pub fn new(start: Params) -> Layout {
        let mut searched = Vec::new();
        let mut offset = 0;
        for (index, (curve, fixed)) in start.curves.iter().zip(&start.fixed).enumerate() {
            if !fixed {
                searched.push((index, curve.pieces(), offset));
                offset += Curve::search_len(curve.pieces());
            }
        }
        Layout { start, searched, dimensions: offset }
    }

    /// The starting point in search variables.
    pub fn start_u(&self) -> Vec<f64> {
        let mut u = Vec::with_capacity(self.dimensions);
        for &(index, _, _) in &self.searched {
            u.extend(self.start.curves[index].to_search());
        }
        u
    }

    /// The curves for search variables `u` (fixed curves keep their start values).
    pub fn params(&self, u: &[f64]) -> Params {
        let mut params = self.start.clone();
        for &(index, pieces, offset) in &self.searched {
            let length = Curve::search_len(pieces);
            params.curves[index] = Curve::from_search(&u[offset..offset + length], pieces)
                .expect("search variables in [0,1] make a curve");
        }
        params
    }

    pub fn flat(&self, u: &[f64]) -> Vec<Vec<f64>> {
        self.params(u).curves.iter().map(Curve::flat).collect()
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn logit(u: f64) -> f64 {
    let u = u.clamp(1e-6, 1.0 - 1e-6);
    (u / (1.0 - u)).ln()
}

/// A draw from the normal(μ, σ) truncated to (0, 1), by rejection.
pub fn truncated_normal(mu: f64, sigma: f64, rng: &mut ChaCha8Rng) -> f64 {
    loop {
        let z: f64 = StandardNormal.sample(rng);
        let x = mu + sigma * z;
        if x > 0.0 && x < 1.0 {
            return x;
        }
    }
}

/// log density of the truncated normal on [0,1], elementwise (`x` `[S,D]`, `mu` `[D]`).
pub fn truncated_normal_log_prob(x: &Tensor, mu: &Tensor, sigma: f64) -> Tensor {
    let cdf = |a: Tensor| (a / std::f64::consts::SQRT_2).erf().g_add_scalar(1.0).g_mul_scalar(0.5);
    let z = (x - mu) / sigma;
    let log_density = z.square().g_mul_scalar(-0.5) - (sigma.ln() + 0.5 * (2.0 * std::f64::consts::PI).ln());
    let mass = cdf(mu.ones_like().g_sub(mu) / sigma) - cdf(mu.g_mul_scalar(-1.0) / sigma);
    log_density - mass.log()
}

/// The PPO step: `adam_steps` Adam steps on μ_x maximizing the clipped surrogate objective.
pub fn ppo_update(mu_x: &[f64], samples: &[Vec<f64>], advantages: &[f64], config: &SearchConfig) -> Vec<f64> {
    let _guard = tch::no_grad_guard();
    let store = tch::nn::VarStore::new(Device::Cpu);
    let start = Tensor::from_slice(mu_x).to_kind(Kind::Double);
    let variable = store.root().var_copy("mu_x", &start);
    let dimensions = mu_x.len() as i64;
    let flat: Vec<f64> = samples.iter().flatten().copied().collect();
    let x = Tensor::from_slice(&flat).view([samples.len() as i64, dimensions]);
    let advantage = Tensor::from_slice(advantages).view([samples.len() as i64, 1]);
    let old = truncated_normal_log_prob(&x, &start.sigmoid(), config.sigma);
    let mut adam = tch::nn::Adam::default().build(&store, config.adam_lr).expect("Adam over one variable");
    drop(_guard);
    for _ in 0..config.adam_steps {
        let new = truncated_normal_log_prob(&x, &variable.sigmoid(), config.sigma);
        let ratio = (new - &old).exp();
        let unclipped = &ratio * &advantage;
        let clipped = ratio.clamp(1.0 - config.clip, 1.0 + config.clip) * &advantage;
        let objective = unclipped.minimum(&clipped).sum_dim_intlist(1, false, Kind::Double).mean(Kind::Double);
        adam.backward_step(&objective.g_mul_scalar(-1.0));
    }
    Vec::<f64>::try_from(variable.detach()).expect("a float64 vector")
}

/// Where a search writes.
pub struct Paths {
    pub dir: PathBuf,
}

impl Paths {
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    pub fn history(&self) -> PathBuf {
        self.dir.join("history.jsonl")
    }
    pub fn best(&self) -> PathBuf {
        self.dir.join("best.params.json")
    }
    pub fn mu(&self) -> PathBuf {
        self.dir.join("mu.params.json")
    }
    pub fn report(&self) -> PathBuf {
        self.dir.join("report.md")
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SearchError + '_ {
    move |error| SearchError::Io { path: path.display().to_string(), error }
}

/// Read the finished candidates of an earlier run. A torn last line (a kill mid-write) is
/// cut off the file, so that new lines start clean.
fn read_history(path: &Path) -> Result<Vec<(usize, Candidate)>, SearchError> {
    let mut text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(io_error(path)(error)),
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.truncate(text.rfind('\n').map_or(0, |end| end + 1));
        std::fs::write(path, &text).map_err(io_error(path))?;
    }
    Ok(text
        .lines()
        .enumerate()
        .filter_map(|(index, line)| serde_json::from_str::<Candidate>(line).ok().map(|c| (index + 1, c)))
        .collect())
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
    /// Draw progress bars (the caller decides; they go to stderr).
    pub progress: bool,
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

        let bars = Bars::new(self.progress, self.config.rounds, self.config.samples);
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
            bars.start_round(round, draws.len() - pending.len());
            trained += pending.len();
            let mut write_error = None;
            self.train_candidates(round, pending, &bars, &mut |candidate: Candidate| {
                let line = serde_json::to_string(&candidate).expect("a candidate serializes");
                if let Err(error) = writeln!(history, "{line}").and_then(|_| history.flush()) {
                    write_error.get_or_insert(error);
                }
                let sample = candidate.sample;
                results[sample] = Some(candidate);
                bars.candidate_done();
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
            bars.println(&format!(
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
        bars.finish();
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
        bars: &Bars,
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
                let bar = bars.worker(slot);
                scope.spawn(move || {
                    let mut loss = match Loss::from_file(&self.file, &self.config.overrides) {
                        Ok(loss) => loss,
                        Err(error) => {
                            let _ = sender.send(Err(error.into()));
                            return;
                        }
                    };
                    loop {
                        let job = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                        let Some((sample, u)) = job else { break };
                        let result = self.train_one(&mut loss, round, sample, u, device, &bar);
                        let failed = result.is_err();
                        if sender.send(result).is_err() || failed {
                            break;
                        }
                    }
                    bar.finish_and_clear();
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
        bar: &ProgressBar,
    ) -> Result<Candidate, SearchError> {
        let started = Instant::now();
        loss.set_params(self.layout.params(&u));
        let objective = Objective::Compiled(loss);
        let config = TrainConfig { seed: self.training_seed(), ..self.config.train.clone() };
        bar.reset();
        bar.set_length(config.iters as u64);
        bar.set_message(format!("candidate {}.{}", round + 1, sample + 1));
        let outcome =
            trainer::train(self.dataset, &objective, &config, device, &mut |step| bar.set_position(step as u64));
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

/// Names the first setting that differs, in words.
fn config_difference(saved: &SearchConfig, now: &SearchConfig) -> Option<String> {
    let saved = serde_json::to_value(saved).expect("serializes");
    let now = serde_json::to_value(now).expect("serializes");
    let (serde_json::Value::Object(saved), serde_json::Value::Object(now)) = (saved, now) else { return None };
    for (key, value) in &now {
        if saved.get(key) != Some(value) {
            let was = saved.get(key).map_or("nothing".to_string(), |v| short(v));
            return Some(format!("`{key}` was {was}, now {}", short(value)));
        }
    }
    None
}

fn short(value: &serde_json::Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 60 {
        format!("{}…", text.chars().take(60).collect::<String>())
    } else {
        text
    }
}

/// The search's progress bars: rounds, candidates of the round, and one bar of training
/// steps per worker. Hidden when stderr is not a terminal; round lines are printed anyway.
struct Bars {
    multi: Option<MultiProgress>,
    rounds: ProgressBar,
    candidates: ProgressBar,
    workers: Mutex<Vec<ProgressBar>>,
}

impl Bars {
    fn new(visible: bool, rounds: usize, samples: usize) -> Bars {
        let multi = visible.then(MultiProgress::new);
        let make = |length: usize, what: &str, prefix: &str| {
            let bar = ProgressBar::new(length as u64).with_style(progress::style(what)).with_prefix(prefix.to_string());
            match &multi {
                Some(multi) => multi.add(bar),
                None => {
                    bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
                    bar
                }
            }
        };
        Bars {
            rounds: make(rounds, "rounds", "search"),
            candidates: make(samples, "candidates", "this round"),
            workers: Mutex::new(Vec::new()),
            multi,
        }
    }

    fn worker(&self, slot: usize) -> ProgressBar {
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        while workers.len() <= slot {
            let bar = ProgressBar::new(0)
                .with_style(progress::style("steps"))
                .with_prefix(format!("model {}", workers.len() + 1));
            let bar = match &self.multi {
                Some(multi) => multi.add(bar),
                None => {
                    bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
                    bar
                }
            };
            workers.push(bar);
        }
        workers[slot].clone()
    }

    fn start_round(&self, round: usize, already: usize) {
        self.rounds.set_position(round as u64);
        self.candidates.set_position(already as u64);
    }

    fn candidate_done(&self) {
        self.candidates.inc(1);
    }

    fn println(&self, line: &str) {
        match &self.multi {
            Some(multi) => {
                let _ = multi.println(line);
            }
            None => eprintln!("{line}"),
        }
        self.rounds.inc(1);
    }

    fn finish(&self) {
        self.candidates.finish_and_clear();
        self.rounds.finish_and_clear();
    }
}
