//! What determines a search: [`SearchConfig`] (saved as `OUT/config.json` and compared on
//! `--resume`), the presets, and the advantage baseline.

use compiler::program::SourceRecord;
use losscc_proxy::data::SyntheticSpec;
use losscc_proxy::trainer::TrainConfig;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where the proxy task's images come from: a VOC-layout folder, or the built-in scenes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatasetSpec {
    pub folder: Option<PathBuf>,
    /// The folder's class count (default: the largest label plus one).
    pub classes: Option<usize>,
    /// The label value of ignored pixels in the folder's files, or in the labels the user's
    /// trainer feeds the ONNX loss (`None`: every pixel counts).
    #[serde(default = "default_ignore_label")]
    pub ignore_label: Option<i64>,
    pub synthetic: SyntheticSpec,
}

fn default_ignore_label() -> Option<i64> {
    Some(compiler::ir::DEFAULT_IGNORE_LABEL)
}

/// How a candidate is rewarded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvaluatorSpec {
    /// losscc trains its proxy network with the candidate loss and rewards the exact target
    /// metric on the hold-out split.
    Proxy,
    /// The user's command trains with the candidate's ONNX loss and writes the reward:
    /// `sh -c COMMAND` in the candidate's folder, with `LOSSCC_ONNX`, `LOSSCC_PARAMS`,
    /// `LOSSCC_RESULT`, `LOSSCC_CANDIDATE` and `LOSSCC_SEED` set.
    Trainer { command: String },
}

/// What the advantage is measured against.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Baseline {
    /// The reward of μ itself (sample 0 of each round).
    Mu,
    /// The mean reward of the round.
    Mean,
}

/// How μ moves between rounds.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Auto Seg-Loss's PPO2 update of μ from each round's advantages.
    #[default]
    Ppo,
    /// No update: every round draws from the starting policy (random search around the
    /// start curves with the same σ), the baseline PPO must beat at an equal budget.
    Random,
}

fn one() -> usize {
    1
}

/// Everything that determines a search's result; saved as `OUT/config.json` and compared on
/// `--resume`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchConfig {
    /// The loss being searched, as given on the command line, the source of it and of every
    /// file it `use`s (so a changed file is noticed on `--resume`), and its `--set`s.
    pub file: String,
    pub sources: Vec<SourceRecord>,
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
    /// PPO, or random search at the same budget (configs from before the option are PPO).
    #[serde(default)]
    pub policy: Policy,
    pub seed: u64,
    /// Proxy training of every candidate (its `seed` is the search's seed).
    pub train: TrainConfig,
    /// Proxy trainings per candidate, from seeds `seed`, `seed + 1`, …; the reward is the
    /// mean of their hold-out metrics (configs from before the option train one).
    #[serde(default = "one")]
    pub proxy_seeds: usize,
    /// The data, described (built-in spec or folder).
    pub data: String,
    /// Starting curves, flat control points per curve.
    pub start: Vec<Vec<f64>>,
    /// CPU threads per candidate (results depend on it at the last bits, so it is part of
    /// the configuration; the executor and the number of workers are not).
    pub threads_per_model: usize,
    /// `cpu` or `cuda`: rewards from different devices are not mixed in one search.
    pub device: String,
    /// The target metric's files, as for the loss (empty for a built-in metric).
    pub target_sources: Vec<SourceRecord>,
    /// Parameter values of a target metric file: the loss's `--set`s when the target is the
    /// searched file itself, else `--target-set`.
    #[serde(default)]
    pub target_overrides: Vec<(String, String)>,
    /// How to load the proxy task's data (with the proxy evaluator).
    pub dataset: DatasetSpec,
    /// How candidates are rewarded.
    pub evaluator: EvaluatorSpec,
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

/// Names the first setting that differs between a saved configuration and this run's, in
/// words.
pub fn config_difference(saved: &SearchConfig, now: &SearchConfig) -> Option<String> {
    // A changed source file is named, as a file: it is the likeliest difference.
    for (was, is) in [(&saved.sources, &now.sources), (&saved.target_sources, &now.target_sources)] {
        for file in is {
            match was.iter().find(|old| old.name == file.name) {
                Some(old) if old.text != file.text => {
                    return Some(format!("the file `{}` changed since the search started", file.name))
                }
                None => {
                    return Some(format!("the file `{}` is used now but was not when the search started", file.name))
                }
                Some(_) => {}
            }
        }
        if let Some(gone) = was.iter().find(|old| !is.iter().any(|file| file.name == old.name)) {
            return Some(format!("the file `{}` was used when the search started but is not now", gone.name));
        }
    }
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
