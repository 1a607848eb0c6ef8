//! One attempt at one candidate, as a unit of work that an executor runs somewhere: the
//! driver writes `task.json` into the attempt's folder, `losscc task FOLDER` (this module's
//! [`run`]) does the work and writes `outcome.json`, and the driver reads it back. Local
//! workers and Slurm array tasks run the same code, so a candidate's reward does not depend
//! on where it ran.
//!
//! The folder is `OUT/candidates/<round>-<sample>/attempt-<k>/`. With the proxy evaluator the
//! task trains losscc's proxy network; with a trainer command it writes the candidate's ONNX
//! loss (`loss.onnx`, curves baked in) and parameters (`params.json`, losscc's format) there,
//! runs `sh -c COMMAND` in the folder with the `LOSSCC_*` variables set (and `LOSSCC_BIN`, the
//! `losscc` binary, for trainers that ask it for metrics), keeps the command's
//! `trainer.stdout`, `trainer.stderr` and `trainer.status`, and reads `result.json`.

use crate::config::{config_difference, EvaluatorSpec, SearchConfig};
use compiler::curve::Curve;
use compiler::onnx::{self, EmitOptions};
use compiler::params::Params;
use losscc_loss::{Loss, Overrides};
use losscc_proxy::data::Dataset;
use losscc_proxy::trainer::{self, Objective};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const TASK_FILE: &str = "task.json";
pub const OUTCOME_FILE: &str = "outcome.json";
/// Where a trainer command writes `{"reward": number}` (`LOSSCC_RESULT`).
pub const RESULT_FILE: &str = "result.json";
/// Lines a task prints on stdout to report training progress: `losscc-progress STEP TOTAL`.
pub const PROGRESS_PREFIX: &str = "losscc-progress";

/// What an attempt is: written by the driver, read by the task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskFile {
    /// The search's folder (holding `config.json`), absolute.
    pub search: PathBuf,
    pub round: usize,
    pub sample: usize,
    /// 1 for the first attempt, 2 for the first retry, ...
    pub attempt: usize,
    /// The candidate's curves, flat control points per curve (manifest order).
    pub control_points: Vec<Vec<f64>>,
}

/// How an attempt ended: written by the task (or, when the task could not, by the executor).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskOutcome {
    /// The reward, when the attempt succeeded.
    pub reward: Option<f64>,
    /// Why it failed, in a sentence.
    pub reason: Option<String>,
    /// The end of the stderr that explains the failure.
    #[serde(default)]
    pub stderr_tail: String,
    /// A failure that will not go away by retrying (a trainer command that does not exist):
    /// the search stops at once.
    #[serde(default)]
    pub fatal: bool,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub device: String,
    /// Start and end, in seconds since the Unix epoch.
    #[serde(default)]
    pub started: f64,
    #[serde(default)]
    pub finished: f64,
}

impl TaskOutcome {
    /// A failed attempt.
    pub fn failure(reason: String, stderr_tail: String) -> TaskOutcome {
        TaskOutcome {
            reward: None,
            reason: Some(reason),
            stderr_tail,
            fatal: false,
            host: host_name(),
            device: String::new(),
            started: now(),
            finished: now(),
        }
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// This machine's name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// The last `lines` lines of a text file (empty when it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Write `value` as JSON to `dir/name` atomically (a reader never sees half a file).
pub fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> std::io::Result<()> {
    let temporary = dir.join(format!(".{name}.tmp"));
    std::fs::write(&temporary, serde_json::to_string_pretty(value).expect("serializes") + "\n")?;
    std::fs::rename(temporary, dir.join(name))
}

/// The outcome recorded in an attempt's folder, if any.
pub fn read_outcome(dir: &Path) -> Option<TaskOutcome> {
    serde_json::from_str(&std::fs::read_to_string(dir.join(OUTCOME_FILE)).ok()?).ok()
}

/// Why a task could not even start; the CLI prints it and exits 1.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("cannot read `{path}`: {error}; the task's folder must exist and be readable on the host that runs it (with Slurm, --out must be on a filesystem every node shares)")]
    Unreadable { path: String, error: String },
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, TaskError> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| TaskError::Unreadable { path: path.display().to_string(), error: error.to_string() })?;
    serde_json::from_str(&text)
        .map_err(|error| TaskError::Unreadable { path: path.display().to_string(), error: error.to_string() })
}

/// Run the attempt in `dir` and write its outcome there. `on_step(step, total)` reports the
/// proxy training's progress.
pub fn run(dir: &Path, on_step: &mut dyn FnMut(usize, usize)) -> Result<TaskOutcome, TaskError> {
    let task: TaskFile = read_json(&dir.join(TASK_FILE))?;
    let config: SearchConfig = read_json(&task.search.join("config.json"))?;
    let started = now();
    let result = match &config.evaluator {
        EvaluatorSpec::Proxy => proxy_reward(&config, &task, on_step),
        EvaluatorSpec::Trainer { command } => trainer_reward(&config, &task, dir, command),
    };
    let outcome = match result {
        Ok((reward, device)) => TaskOutcome {
            reward: Some(reward),
            reason: None,
            stderr_tail: String::new(),
            fatal: false,
            host: host_name(),
            device,
            started,
            finished: now(),
        },
        Err(failure) => TaskOutcome {
            reward: None,
            reason: Some(failure.reason),
            stderr_tail: failure.stderr_tail,
            fatal: failure.fatal,
            host: host_name(),
            device: failure.device,
            started,
            finished: now(),
        },
    };
    write_json(dir, OUTCOME_FILE, &outcome)
        .map_err(|error| TaskError::Unreadable { path: dir.display().to_string(), error: error.to_string() })?;
    Ok(outcome)
}

/// Why an attempt failed.
struct Failure {
    reason: String,
    stderr_tail: String,
    fatal: bool,
    device: String,
}

impl Failure {
    fn new(reason: impl Into<String>) -> Failure {
        Failure { reason: reason.into(), stderr_tail: String::new(), fatal: false, device: String::new() }
    }
}

/// The searched loss with the candidate's curves, checked against the sources the search
/// recorded.
fn candidate_loss(config: &SearchConfig, task: &TaskFile) -> Result<Loss, Failure> {
    let overrides = Overrides::from(config.overrides.as_slice());
    let mut loss = Loss::from_file(Path::new(&config.file), &overrides).map_err(|e| Failure::new(e.to_string()))?;
    let now = SearchConfig { sources: loss.compiled().program.sources(), ..config.clone() };
    if let Some(what) = config_difference(config, &now) {
        return Err(Failure::new(format!("{what}; resume with the files the search started with")));
    }
    let curves = task
        .control_points
        .iter()
        .map(|flat| Curve::from_flat(flat))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure::new(format!("the task's curves are invalid: {e}")))?;
    loss.set_curves(curves).map_err(|e| Failure::new(e.to_string()))?;
    Ok(loss)
}

/// Train the proxy network with the candidate loss, once per proxy seed; reward the mean of
/// its exact target metric on the hold-out split (an undefined metric earns 0).
fn proxy_reward(
    config: &SearchConfig,
    task: &TaskFile,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<(f64, String), Failure> {
    tch::set_num_threads(config.threads_per_model.max(1) as i32);
    let device = trainer::choose_device(config.device == "cuda").map_err(Failure::new)?;
    let device_name = format!("{device:?}");
    let loss = candidate_loss(config, task)?;
    let target = target_metric(config)?;
    let dataset: Dataset = trainer::load_dataset(
        config.dataset.folder.as_deref(),
        config.dataset.classes,
        config.dataset.ignore_label,
        &config.dataset.synthetic,
    )
    .map_err(|e| Failure::new(e.to_string()))?;
    let seeds = config.proxy_seeds.max(1);
    let total = config.train.iters * seeds;
    let mut sum = 0.0;
    for k in 0..seeds {
        let train = trainer::TrainConfig { seed: config.seed.wrapping_add(k as u64), ..config.train.clone() };
        let done = k * config.train.iters;
        let trained = trainer::train(&dataset, &Objective::Compiled(&loss), &train, device, &mut |step| {
            on_step(done + step, total)
        })
        .map_err(|e| Failure { device: device_name.clone(), ..Failure::new(e.to_string()) })?;
        let value = trained
            .evaluate(&dataset.holdout, &[&target])
            .map_err(|e| Failure { device: device_name.clone(), ..Failure::new(e.to_string()) })?[0];
        sum += if value.is_finite() { value } else { 0.0 };
    }
    Ok((sum / seeds as f64, device_name))
}

/// The reward's metric: a built-in name, or a metric file checked against its recorded source.
fn target_metric(config: &SearchConfig) -> Result<Loss, Failure> {
    if let Some(metric) = trainer::standard_metric(&config.target) {
        return Ok(metric);
    }
    let overrides = Overrides::from(config.target_overrides.as_slice());
    let loss = Loss::from_file(Path::new(&config.target), &overrides).map_err(|e| Failure::new(e.to_string()))?;
    let now = SearchConfig { target_sources: loss.compiled().program.sources(), ..config.clone() };
    if let Some(what) = config_difference(config, &now) {
        return Err(Failure::new(format!("{what}; resume with the files the search started with")));
    }
    Ok(loss)
}

/// Write the candidate's ONNX loss and parameters, run the user's trainer command, and read
/// the reward it wrote.
fn trainer_reward(config: &SearchConfig, task: &TaskFile, dir: &Path, command: &str) -> Result<(f64, String), Failure> {
    let loss = candidate_loss(config, task)?;
    let compiled = loss.compiled();
    let write_error = |what: &str, error: std::io::Error| {
        Failure::new(format!("cannot write {what} in `{}`: {error}", dir.display()))
    };
    let model = onnx::emit_loss(
        compiled,
        &loss.params().curves,
        // The user's trainer feeds its own labels: the ignore label is the one the search
        // was given.
        &EmitOptions { ignore_label: config.dataset.ignore_label, ..Default::default() },
    )
    .map_err(|e| Failure::new(e.to_string()))?;
    let onnx_path = dir.join("loss.onnx");
    std::fs::write(&onnx_path, onnx::to_bytes(&model)).map_err(|e| write_error("loss.onnx", e))?;
    let params = loss.params().to_file(
        &compiled.exact.name,
        compiled.manifest(),
        serde_json::json!({"source": "losscc search", "round": task.round, "sample": task.sample}),
    );
    let params_path = dir.join("params.json");
    write_json(dir, "params.json", &params).map_err(|e| write_error("params.json", e))?;
    let result_path = dir.join(RESULT_FILE);
    let _ = std::fs::remove_file(&result_path);
    let (stdout_path, stderr_path) = (dir.join("trainer.stdout"), dir.join("trainer.stderr"));
    let stdout = std::fs::File::create(&stdout_path).map_err(|e| write_error("trainer.stdout", e))?;
    let stderr = std::fs::File::create(&stderr_path).map_err(|e| write_error("trainer.stderr", e))?;
    let status = Command::new("sh")
        .arg("-c")
        .arg(command)
        .current_dir(dir)
        .env("LOSSCC_ONNX", &onnx_path)
        .env("LOSSCC_PARAMS", &params_path)
        .env("LOSSCC_RESULT", &result_path)
        .env("LOSSCC_CANDIDATE", format!("{}-{}", task.round, task.sample))
        .env("LOSSCC_SEED", config.seed.to_string())
        .env("LOSSCC_BIN", std::env::current_exe().unwrap_or_else(|_| PathBuf::from("losscc")))
        .stdout(stdout)
        .stderr(stderr)
        .status()
        .map_err(|e| Failure::new(format!("cannot run `sh -c`: {e}")))?;
    let code = status.code();
    let _ = std::fs::write(
        dir.join("trainer.status"),
        format!("{}\n", code.map_or("killed by a signal".into(), |c| c.to_string())),
    );
    let stderr_tail = tail(&stderr_path, 20);
    let fail = |reason: String, fatal: bool| Failure {
        reason,
        stderr_tail: stderr_tail.clone(),
        fatal,
        device: String::new(),
    };
    match code {
        Some(127) => {
            return Err(fail(
                format!(
                    "the trainer command `{command}` was not found (sh exit status 127); check the command and PATH"
                ),
                true,
            ))
        }
        Some(0) => {}
        Some(code) => return Err(fail(format!("the trainer command exited with status {code}"), false)),
        None => return Err(fail("the trainer command was killed by a signal".into(), false)),
    }
    let text = std::fs::read_to_string(&result_path).map_err(|_| {
        fail(
            format!("the trainer command wrote no result: `{}` (LOSSCC_RESULT) does not exist", result_path.display()),
            false,
        )
    })?;
    let reward = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|value| value.get("reward").and_then(|r| r.as_f64()))
        .ok_or_else(|| {
            fail(
                format!(
                    "the result `{}` is not JSON with a numeric \"reward\": {}",
                    result_path.display(),
                    text.trim()
                ),
                false,
            )
        })?;
    if !reward.is_finite() {
        return Err(fail(format!("the trainer command's reward is {reward}, not a finite number"), false));
    }
    Ok((reward, "trainer".into()))
}

/// The curves of `params` as flat control points per curve.
pub fn control_points(params: &Params) -> Vec<Vec<f64>> {
    params.curves.iter().map(Curve::flat).collect()
}
