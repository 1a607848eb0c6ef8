//! `losscc search FILE`: search the loss's curves with PPO; writes `OUT/best.params.json`,
//! `OUT/mu.params.json` and a report. Candidates run as attempts on an executor (local child
//! processes, or Slurm job arrays) and are rewarded by the built-in proxy task or by the
//! user's `--trainer` command.

use super::load_loss;
use crate::args::{parse_sets, ProxyArgs};
use crate::progress::SearchBars;
use anyhow::{Context, Result};
use clap::ValueEnum;
use compiler::ir::RootKind;
use losscc_loss::Loss;
use losscc_proxy::trainer;
use losscc_search::config::{Baseline, DatasetSpec, EvaluatorSpec, Policy, Preset, SearchConfig};
use losscc_search::executor::local::Local;
use losscc_search::executor::slurm::Slurm;
use losscc_search::executor::Executor;
use losscc_search::journal::Paths;
use losscc_search::policy::Layout;
use losscc_search::report;
use losscc_search::run::Search;
use serde_json::json;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub enum PresetArg {
    /// 4 rounds × 6 samples, 120 proxy iterations at 64×64: minutes on a CPU.
    Quick,
    /// The published settings: 12 rounds × 32 samples, 1000 iterations at 128×128, batch 32.
    Paper,
}

#[derive(Copy, Clone, ValueEnum)]
pub enum BaselineArg {
    Mu,
    Mean,
}

#[derive(Copy, Clone, ValueEnum)]
pub enum PolicyArg {
    /// PPO2 updates of μ after every round (Auto Seg-Loss).
    Ppo,
    /// No updates: every round draws from the starting policy (random search, the baseline
    /// PPO must beat at an equal budget).
    Random,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub enum ExecutorArg {
    /// Child processes on this machine, up to --workers at once.
    Local,
    /// One Slurm job array per round; --out must be on a filesystem the nodes share.
    Slurm,
}

#[derive(clap::Args)]
pub struct Args {
    /// The metric or loss file whose curves are searched.
    file: PathBuf,
    #[arg(long, value_enum, default_value = "quick")]
    preset: PresetArg,
    /// The reward: exact metric on the hold-out split; a built-in name (miou, fwiou, macc,
    /// gacc, biou, bf1) or a metric file [default: FILE when it is a metric].
    #[arg(long)]
    target: Option<String>,
    #[arg(long)]
    rounds: Option<usize>,
    /// Candidates per round (the first is μ with `--baseline mu`).
    #[arg(long)]
    samples: Option<usize>,
    /// Proxy training iterations per candidate.
    #[arg(long)]
    iters: Option<usize>,
    /// Proxy trainings per candidate (seeds SEED, SEED+1, ...): the reward is their mean, a
    /// less noisy reward at K times the cost.
    #[arg(long, default_value_t = 1)]
    proxy_seeds: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder: config.json, history.jsonl, best.params.json, mu.params.json, report.md, plots.
    #[arg(long, default_value = "out/search")]
    out: PathBuf,
    /// Continue the search in --out, reusing every finished candidate.
    #[arg(long)]
    resume: bool,
    #[arg(long, value_enum, default_value = "mu")]
    baseline: BaselineArg,
    /// How μ moves between rounds: PPO, or not at all (random search at the same budget).
    #[arg(long, value_enum, default_value = "ppo")]
    policy: PolicyArg,
    /// Standard deviation of the policy (fixed).
    #[arg(long, default_value_t = 0.2)]
    sigma: f64,
    /// PPO clip ε.
    #[arg(long, default_value_t = 0.2)]
    clip: f64,
    /// Adam steps on μ per round.
    #[arg(long, default_value_t = 60)]
    ppo_steps: usize,
    /// Adam learning rate on μ.
    #[arg(long, default_value_t = 0.2)]
    ppo_lr: f64,
    /// Starting curves (fixed curves stay as they are) [default: identity].
    #[arg(long)]
    params: Option<PathBuf>,
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
    /// A parameter of a --target metric file (as --set is for FILE; a target that is FILE
    /// itself takes FILE's --set values).
    #[arg(long = "target-set", value_name = "NAME=VALUE", requires = "target")]
    target_set: Vec<String>,
    /// Where candidates run.
    #[arg(long, value_enum, default_value = "local")]
    executor: ExecutorArg,
    /// Candidates at once with the local executor [default: one per CPU core; with --gpu,
    /// GPUs × --models-per-device].
    #[arg(long)]
    workers: Option<usize>,
    /// Candidates at once per GPU with --gpu.
    #[arg(long, default_value_t = 4)]
    models_per_device: usize,
    /// CPU threads each candidate trains with [default: CPU cores / workers locally, 1 under
    /// Slurm]; part of the configuration, since results depend on it in the last bits.
    #[arg(long)]
    threads_per_model: Option<usize>,
    /// An argument for `sbatch` (repeatable): `--slurm-arg=--partition=gpu`, `--slurm-arg=--gres=gpu:1`.
    #[arg(long = "slurm-arg", value_name = "ARG", allow_hyphen_values = true)]
    slurm_args: Vec<String>,
    /// Times a failed attempt is retried before its candidate counts as failed.
    #[arg(long, default_value_t = 1)]
    retries: usize,
    /// Reward candidates with this command instead of the built-in proxy: it runs with
    /// `sh -c` in each candidate's folder with LOSSCC_ONNX, LOSSCC_PARAMS, LOSSCC_RESULT,
    /// LOSSCC_CANDIDATE and LOSSCC_SEED set, and writes `{"reward": number}` to LOSSCC_RESULT.
    #[arg(long, value_name = "COMMAND")]
    trainer: Option<String>,
    #[command(flatten)]
    proxy: ProxyArgs,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let preset = match args.preset {
        PresetArg::Quick => Preset::Quick,
        PresetArg::Paper => Preset::Paper,
    };
    let (preset_rounds, preset_samples, preset_iters, preset_batch, preset_crop) = preset.settings();
    let mut proxy = args.proxy.clone();
    proxy.batch = proxy.batch.or(Some(preset_batch));
    proxy.crop = proxy.crop.or(Some(preset_crop));
    if preset == Preset::Paper {
        proxy.image_size = proxy.image_size.or(Some(160));
    }
    let (rounds, samples, iters) = (
        args.rounds.unwrap_or(preset_rounds),
        args.samples.unwrap_or(preset_samples),
        args.iters.unwrap_or(preset_iters),
    );
    let file = &std::path::absolute(&args.file).with_context(|| format!("cannot find `{}`", args.file.display()))?;
    let device = trainer::choose_device(proxy.gpu).map_err(anyhow::Error::msg)?;
    let overrides = parse_sets(&args.set)?;
    let loss = load_loss(file, &overrides, args.params.as_deref())?;
    let evaluator = match &args.trainer {
        Some(command) if command.trim().is_empty() => {
            anyhow::bail!("--trainer needs a command, e.g. --trainer 'python3 train.py'")
        }
        Some(command) => EvaluatorSpec::Trainer { command: command.clone() },
        None => EvaluatorSpec::Proxy,
    };
    if args.proxy_seeds == 0 {
        anyhow::bail!("--proxy-seeds must be at least 1");
    }
    if args.proxy_seeds > 1 && matches!(evaluator, EvaluatorSpec::Trainer { .. }) {
        anyhow::bail!(
            "--proxy-seeds averages the built-in proxy's rewards; a --trainer command averages over seeds itself (it gets LOSSCC_SEED)"
        );
    }
    let target_overrides = parse_sets(&args.target_set)?;
    let (target_name, target_loss) = match (&args.target, &evaluator) {
        (_, EvaluatorSpec::Trainer { .. }) => ("the trainer command's reward".to_string(), None),
        (Some(name), EvaluatorSpec::Proxy) => match trainer::standard_metric(name) {
            Some(_) if !args.target_set.is_empty() => anyhow::bail!(
                "--target-set sets parameters of a metric file, but `{name}` is the built-in metric with its defaults; pass its file instead (--target examples/{name}.metric)"
            ),
            Some(metric) => (name.to_string(), Some(metric)),
            None if Path::new(name).exists() => {
                let path = std::path::absolute(name)?.display().to_string();
                (path.clone(), Some(load_loss(Path::new(&path), &target_overrides, None)?))
            }
            None => anyhow::bail!(
                "--target `{name}` is neither a built-in metric (miou, fwiou, macc, gacc, biou, bf1) nor a metric file"
            ),
        },
        (None, EvaluatorSpec::Proxy) => {
            if loss.compiled().exact.root_kind != RootKind::Metric {
                anyhow::bail!(
                    "`{}` is a loss, so the reward is not implied; pass --target with the metric to maximize (e.g. --target biou)",
                    args.file.display()
                );
            }
            (file.display().to_string(), Some(load_loss(file, &overrides, None)?))
        }
    };
    if let Some(target) = &target_loss {
        if target.compiled().exact.root_kind != RootKind::Metric {
            anyhow::bail!("--target `{target_name}` is a loss; the reward must be a metric (higher is better)");
        }
    }
    let config_train = proxy.train_config(iters, 0);
    if let Some(problem) = config_train.problem() {
        anyhow::bail!("{problem}");
    }
    let dataset_spec = DatasetSpec {
        folder: proxy.data.as_deref().map(std::path::absolute).transpose()?,
        classes: proxy.classes,
        ignore_label: proxy.labels.ignore_label.0,
        synthetic: proxy.synthetic(),
    };
    let data = match &evaluator {
        EvaluatorSpec::Proxy => {
            let dataset = proxy.dataset()?;
            let mut needs = vec![(file.display().to_string(), loss.compiled().relaxed.check_classes(dataset.classes))];
            needs.extend(
                target_loss.iter().map(|t| (target_name.clone(), t.compiled().exact.check_classes(dataset.classes))),
            );
            for (what, fits) in needs {
                if let Err(problem) = fits {
                    anyhow::bail!("`{what}` does not fit the data ({} classes): {problem}", dataset.classes);
                }
            }
            dataset.description
        }
        EvaluatorSpec::Trainer { command } => format!("the trainer command's own (`{command}`)"),
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let gpus: Vec<usize> = match device {
        tch::Device::Cpu => Vec::new(),
        _ => (0..tch::Cuda::device_count().max(1) as usize).collect(),
    };
    let workers = args
        .workers
        .unwrap_or(if gpus.is_empty() { cores } else { gpus.len() * args.models_per_device.max(1) })
        .clamp(1, samples.max(1));
    if args.workers == Some(0) {
        anyhow::bail!("--workers must be at least 1");
    }
    let threads = match (args.threads_per_model, args.executor, gpus.is_empty()) {
        (Some(0), _, _) => anyhow::bail!("--threads-per-model must be at least 1"),
        (Some(threads), _, _) => threads,
        (None, ExecutorArg::Local, true) => (cores / workers).max(1),
        (None, _, _) => 1,
    };
    let config = SearchConfig {
        file: file.display().to_string(),
        sources: loss.compiled().program.sources(),
        overrides: overrides.pairs().to_vec(),
        target: target_name.clone(),
        rounds,
        samples,
        sigma: args.sigma,
        clip: args.clip,
        adam_steps: args.ppo_steps,
        adam_lr: args.ppo_lr,
        baseline: match args.baseline {
            BaselineArg::Mu => Baseline::Mu,
            BaselineArg::Mean => Baseline::Mean,
        },
        policy: match args.policy {
            PolicyArg::Ppo => Policy::Ppo,
            PolicyArg::Random => Policy::Random,
        },
        seed: args.seed,
        train: config_train,
        proxy_seeds: args.proxy_seeds,
        data,
        start: loss.params().curves.iter().map(|c| c.flat()).collect(),
        threads_per_model: threads,
        device: if device == tch::Device::Cpu { "cpu".into() } else { "cuda".into() },
        target_sources: match &target_loss {
            Some(target) if trainer::standard_metric(&target_name).is_none() => target.compiled().program.sources(),
            _ => Vec::new(),
        },
        target_overrides: match (&args.target, &target_loss) {
            (None, Some(_)) => overrides.pairs().to_vec(),
            (Some(_), Some(_)) if trainer::standard_metric(&target_name).is_none() => target_overrides.pairs().to_vec(),
            _ => Vec::new(),
        },
        dataset: dataset_spec,
        evaluator,
    };
    let layout = Layout::new(loss.params().clone());
    let program = std::env::current_exe().context("cannot find the losscc binary's own path")?;
    let out = std::path::absolute(&args.out)?;
    let mut executor: Box<dyn Executor> = match args.executor {
        ExecutorArg::Local => Box::new(Local { program, workers, gpus: gpus.clone() }),
        ExecutorArg::Slurm => Box::new(Slurm::new(program, out.clone(), args.slurm_args.clone(), threads)?),
    };
    let at_once = match args.executor {
        ExecutorArg::Local => format!(
            "{workers} at once on {}",
            if gpus.is_empty() { "the CPU".to_string() } else { format!("{} GPU(s)", gpus.len()) }
        ),
        ExecutorArg::Slurm => "one Slurm job array per round".to_string(),
    };
    eprintln!(
        "searching {} search variables of `{}` for `{}`: {} rounds × {} candidates, {} iterations each{}, {at_once}, {} thread(s) each; data: {}",
        layout.dimensions,
        file.display(),
        config.target,
        config.rounds,
        config.samples,
        config.train.iters,
        if config.proxy_seeds > 1 { format!(" × {} proxy seeds", config.proxy_seeds) } else { String::new() },
        config.threads_per_model,
        config.data
    );
    let bars = SearchBars::new(std::io::stderr().is_terminal(), rounds, samples);
    let search = Search { config: config.clone(), layout, retries: args.retries, progress: &bars };
    let outcome = search.run(&out, args.resume, executor.as_mut());
    bars.finish();
    let outcome = outcome?;
    write_outputs(&out, &loss, &search, &config, &outcome)?;
    println!("{}", report::rounds_table(&outcome));
    if !outcome.failed.is_empty() {
        println!("{} candidate(s) failed every attempt:", outcome.failed.len());
        for failed in &outcome.failed {
            println!("  {}-{}: {}", failed.round, failed.sample, failed.reason);
        }
    }
    let recovered = match outcome.recovered {
        0 => String::new(),
        n => format!(", {n} recovered from their folders"),
    };
    println!(
        "best: candidate {}-{} (round {}, sample {}), reward {:.4} ({} candidates run now, {} reused from history{recovered})",
        outcome.best.round,
        outcome.best.sample,
        outcome.best.round + 1,
        outcome.best.sample + 1,
        outcome.best.reward,
        outcome.trained,
        outcome.reused
    );
    let paths = Paths { dir: out.clone() };
    println!("wrote {}, {} and {}", paths.best().display(), paths.mu().display(), paths.report().display());
    Ok(ExitCode::SUCCESS)
}

/// `best.params.json`, `mu.params.json` and the report.
fn write_outputs(
    out: &Path,
    loss: &Loss,
    search: &Search<'_>,
    config: &SearchConfig,
    outcome: &losscc_search::run::Outcome,
) -> Result<()> {
    let manifest = loss.compiled().manifest();
    let metric_name = &loss.compiled().exact.name;
    let layout = &search.layout;
    let best = layout.params(&outcome.best.u).to_file(
        metric_name,
        manifest,
        json!({"source": "losscc search", "target": config.target, "reward": outcome.best.reward,
               "round": outcome.best.round + 1, "sample": outcome.best.sample + 1, "seed": config.seed,
               "data": config.data}),
    );
    let mu = layout.params(&outcome.final_mu).to_file(
        metric_name,
        manifest,
        json!({"source": "losscc search (final μ)", "target": config.target, "rounds": config.rounds, "seed": config.seed}),
    );
    let paths = Paths { dir: out.to_path_buf() };
    for (path, value) in [(paths.best(), &best), (paths.mu(), &mu)] {
        std::fs::write(&path, serde_json::to_string_pretty(value)? + "\n")
            .with_context(|| format!("cannot write `{}`", path.display()))?;
    }
    let names: Vec<String> = manifest.curves.iter().map(|c| c.name.clone()).collect();
    report::write(out, config, outcome, &names, &config.data).map_err(anyhow::Error::msg)?;
    Ok(())
}
