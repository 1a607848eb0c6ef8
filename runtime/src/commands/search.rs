//! `losscc search FILE`: search the loss's curves with PPO on the proxy task; writes
//! `OUT/best.params.json`, `OUT/mu.params.json` and a report.

use super::load_loss;
use crate::args::{parse_sets, ProxyArgs};
use crate::progress::SearchBars;
use anyhow::{Context, Result};
use clap::ValueEnum;
use compiler::ir::RootKind;
use losscc_loss::{Loss, Overrides};
use losscc_proxy::trainer;
use losscc_search::config::{Baseline, Preset, SearchConfig};
use losscc_search::journal::Paths;
use losscc_search::policy::Layout;
use losscc_search::report;
use losscc_search::run::{Search, Workers};
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
    /// Candidates trained at once per device [default: CPU cores on CPU, 4 per GPU].
    #[arg(long)]
    models_per_device: Option<usize>,
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
    let (rounds, samples, iters) =
        (args.rounds.unwrap_or(preset_rounds), args.samples.unwrap_or(preset_samples), args.iters.unwrap_or(preset_iters));
    let file = &args.file;
    let device = trainer::choose_device(proxy.gpu).map_err(anyhow::Error::msg)?;
    let overrides = parse_sets(&args.set)?;
    let loss = load_loss(file, &overrides, args.params.as_deref())?;
    let (target_name, target_loss) = match &args.target {
        Some(name) => match trainer::standard_metric(name) {
            Some(metric) => (name.to_string(), metric),
            None if Path::new(name).exists() => (name.to_string(), load_loss(Path::new(name), &Overrides::new(), None)?),
            None => anyhow::bail!(
                "--target `{name}` is neither a built-in metric (miou, fwiou, macc, gacc, biou, bf1) nor a metric file"
            ),
        },
        None => {
            if loss.compiled().exact.root_kind != RootKind::Metric {
                anyhow::bail!(
                    "`{}` is a loss, so the reward is not implied; pass --target with the metric to maximize (e.g. --target biou)",
                    file.display()
                );
            }
            (file.display().to_string(), load_loss(file, &overrides, None)?)
        }
    };
    if target_loss.compiled().exact.root_kind != RootKind::Metric {
        anyhow::bail!("--target `{target_name}` is a loss; the reward must be a metric (higher is better)");
    }
    let config_train = proxy.train_config(iters, 0);
    if let Some(problem) = config_train.problem() {
        anyhow::bail!("{problem}");
    }
    let dataset = proxy.dataset()?;
    for (what, needed) in [
        (file.display().to_string(), loss.compiled().relaxed.min_classes),
        (target_name.clone(), target_loss.compiled().exact.min_classes),
    ] {
        if needed > dataset.classes {
            anyhow::bail!("`{what}` needs at least {needed} classes but the data has {}", dataset.classes);
        }
    }
    let (devices, models_per_device, threads) = match device {
        tch::Device::Cpu => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let models = args.models_per_device.unwrap_or(cores).clamp(1, samples.max(1));
            (vec![tch::Device::Cpu], models, (cores / models).max(1))
        }
        _ => {
            let count = tch::Cuda::device_count().max(1) as usize;
            ((0..count).map(tch::Device::Cuda).collect(), args.models_per_device.unwrap_or(4).max(1), 1)
        }
    };
    tch::set_num_threads(threads as i32);
    let config = SearchConfig {
        file: file.display().to_string(),
        sources: loss.compiled().program.sources(),
        overrides: overrides.pairs().to_vec(),
        target: target_name,
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
        seed: args.seed,
        train: config_train,
        data: dataset.description.clone(),
        start: loss.params().curves.iter().map(|c| c.flat()).collect(),
        threads_per_model: threads,
        device: if device == tch::Device::Cpu { "cpu".into() } else { "cuda".into() },
        target_sources: match &args.target {
            Some(name) if trainer::standard_metric(name).is_none() => target_loss.compiled().program.sources(),
            _ => Vec::new(),
        },
    };
    let layout = Layout::new(loss.params().clone());
    eprintln!(
        "searching {} search variables of `{}` for `{}`: {} rounds × {} candidates, {} iterations each, {} model(s) at once on {:?}; data: {}",
        layout.dimensions,
        file.display(),
        config.target,
        config.rounds,
        config.samples,
        config.train.iters,
        devices.len() * models_per_device,
        device,
        dataset.description
    );
    let bars = SearchBars::new(std::io::stderr().is_terminal(), rounds, samples);
    let search = Search {
        config: config.clone(),
        file: file.to_path_buf(),
        layout,
        target: &target_loss,
        dataset: &dataset,
        workers: Workers { devices, models_per_device },
        progress: &bars,
    };
    let outcome = search.run(&args.out, args.resume)?;
    bars.finish();
    write_outputs(&args.out, &loss, &search, &config, &outcome, &dataset.description)?;
    println!("{}", report::rounds_table(&outcome));
    println!(
        "best: round {} sample {}, reward {:.4} ({} candidates trained now, {} reused from history)",
        outcome.best.round + 1,
        outcome.best.sample + 1,
        outcome.best.reward,
        outcome.trained,
        outcome.reused
    );
    let paths = Paths { dir: args.out.clone() };
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
    data: &str,
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
    report::write(out, config, outcome, &names, data).map_err(anyhow::Error::msg)?;
    Ok(())
}
