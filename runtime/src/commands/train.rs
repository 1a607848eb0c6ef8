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
    let metrics: Vec<Loss> =
        trainer::STANDARD_METRICS.iter().map(|(name, _)| trainer::standard_metric(name).expect("built in")).collect();
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
    for ((metric, _), value) in trainer::STANDARD_METRICS.iter().zip(&values) {
        out.insert(metric.to_string(), json_number(*value));
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
