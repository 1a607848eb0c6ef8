//! `losscc train [FILE --params P | --loss ce|dice|lovasz]`: train the proxy network from
//! scratch with a loss and print the seven exact metrics (the six published ones and Boundary IoU) on the test split as JSON.

use super::{json_number, load_loss};
use crate::args::{parse_sets, ProxyArgs};
use crate::progress::steps_bar;
use anyhow::Result;
use clap::ValueEnum;
use losscc_loss::Loss;
use losscc_proxy::trainer::{self, Objective};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Copy, Clone, ValueEnum)]
pub enum BaselineLoss {
    /// libtorch cross-entropy.
    Ce,
    /// Soft Dice (examples/dice.metric with identity curves).
    Dice,
    /// Lovász-softmax.
    Lovasz,
}

#[derive(clap::Args)]
pub struct Args {
    /// A metric or loss file to train with (its surrogate); or use --loss.
    #[arg(required_unless_present = "loss")]
    file: Option<PathBuf>,
    /// Curve parameters for FILE (e.g. OUT/best.params.json from `losscc search`).
    #[arg(long, requires = "file")]
    params: Option<PathBuf>,
    #[arg(long = "set", value_name = "NAME=VALUE", requires = "file")]
    set: Vec<String>,
    /// A baseline loss instead of FILE.
    #[arg(long, value_enum, conflicts_with = "file")]
    loss: Option<BaselineLoss>,
    /// Training iterations.
    #[arg(long, default_value_t = 300)]
    iters: usize,
    /// Seed of the network's initial weights and of the batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also report this metric file's exact value, with parameters after a colon
    /// (`examples/bf1.metric:tol=2`, several as `:a=1,b=2`); the JSON key is the text given
    /// after the file's stem (`bf1:tol=2`). Repeatable.
    #[arg(long = "metric", value_name = "FILE[:NAME=VALUE,...]")]
    metric: Vec<String>,
    #[command(flatten)]
    proxy: ProxyArgs,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let proxy = &args.proxy;
    let device = trainer::choose_device(proxy.gpu).map_err(anyhow::Error::msg)?;
    let config = proxy.train_config(args.iters, args.seed);
    if let Some(problem) = config.problem() {
        anyhow::bail!("{problem}");
    }
    let compiled: Loss;
    let (objective, name) = match (&args.file, args.loss) {
        (Some(file), _) => {
            compiled = load_loss(file, &parse_sets(&args.set)?, args.params.as_deref())?;
            (Objective::Compiled(&compiled), file.display().to_string())
        }
        (None, Some(BaselineLoss::Ce)) => (Objective::CrossEntropy, "ce".to_string()),
        (None, Some(BaselineLoss::Lovasz)) => (Objective::Lovasz, "lovasz".to_string()),
        (None, Some(BaselineLoss::Dice)) => {
            compiled = trainer::dice();
            (Objective::Compiled(&compiled), "dice".to_string())
        }
        (None, None) => anyhow::bail!("give a metric file to train with, or --loss ce|dice|lovasz"),
    };
    let dataset = proxy.dataset()?;
    let mut metrics: Vec<Loss> =
        trainer::STANDARD_METRICS.iter().map(|(name, _)| trainer::standard_metric(name).expect("built in")).collect();
    let mut names: Vec<String> = trainer::STANDARD_METRICS.iter().map(|(name, _)| name.to_string()).collect();
    for spec in &args.metric {
        let (file, sets) = spec.split_once(':').unwrap_or((spec.as_str(), ""));
        let sets: Vec<String> = sets.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect();
        let metric = load_loss(std::path::Path::new(file), &parse_sets(&sets)?, None)?;
        if metric.compiled().exact.root_kind != compiler::ir::RootKind::Metric {
            anyhow::bail!("--metric `{file}` is a loss; report metrics (higher is better)");
        }
        if let Err(problem) = metric.compiled().exact.check_classes(dataset.classes) {
            anyhow::bail!("--metric `{file}` does not fit the data ({} classes): {problem}", dataset.classes);
        }
        let stem = std::path::Path::new(file).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        names.push(if sets.is_empty() { stem } else { format!("{stem}:{}", sets.join(",")) });
        metrics.push(metric);
    }
    if let Objective::Compiled(loss) = &objective {
        if let Err(problem) = loss.compiled().relaxed.check_classes(dataset.classes) {
            anyhow::bail!("`{name}` does not fit the data ({} classes): {problem}", dataset.classes);
        }
    }
    let bar = steps_bar(args.iters as u64, &format!("train {name}"));
    let started = std::time::Instant::now();
    let trained = trainer::train(&dataset, &objective, &config, device, &mut |step| bar.set_position(step as u64))?;
    bar.finish_and_clear();
    let training_seconds = started.elapsed().as_secs_f64();
    let values = trained.evaluate(&dataset.test, &metrics.iter().collect::<Vec<_>>())?;
    let mut out = serde_json::Map::new();
    for (metric, value) in names.iter().zip(&values) {
        out.insert(metric.clone(), json_number(*value));
    }
    out.insert("loss".into(), json!(name));
    if let Some(params) = &args.params {
        out.insert("params".into(), json!(params.display().to_string()));
    }
    out.insert("data".into(), json!(dataset.description));
    out.insert("split".into(), json!("test"));
    out.insert("iters".into(), json!(args.iters));
    out.insert("seed".into(), json!(args.seed));
    out.insert("device".into(), json!(format!("{device:?}")));
    out.insert("final_training_loss".into(), json_number(trained.final_loss));
    out.insert("training_seconds".into(), json!((training_seconds * 100.0).round() / 100.0));
    println!("{}", serde_json::to_string_pretty(&Value::Object(out))?);
    Ok(ExitCode::SUCCESS)
}
