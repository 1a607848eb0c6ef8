//! `losscc eval FILE --logits X.npy --labels Y.npy`: the surrogate loss and the exact metric
//! of one batch, as one JSON object; `--grad G.npy` also writes `∂loss/∂logits`.

use super::{json_number, load_loss};
use crate::args::{parse_sets, LabelArgs};
use crate::npy;
use anyhow::Result;
use compiler::accumulate::Value as Evaluated;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    file: PathBuf,
    /// Logits, float32 `[N,C,H,W]` in .npy.
    #[arg(long)]
    logits: PathBuf,
    /// Labels in .npy: class indices `[N,H,W]` (255 = ignored), float soft labels of the logits' shape, or for a sigmoid metric multi-hot labels of the logits' shape.
    #[arg(long)]
    labels: PathBuf,
    /// Curve parameters (losscc format or the published `control_points` layout).
    #[arg(long)]
    params: Option<PathBuf>,
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
    #[command(flatten)]
    label_values: LabelArgs,
    /// Also write d loss / d logits (float32 .npy, same shape as the logits) here.
    #[arg(long)]
    grad: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let value = evaluate(&args)?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(ExitCode::SUCCESS)
}

fn evaluate(args: &Args) -> Result<Value> {
    let overrides = parse_sets(&args.set)?;
    let mut loss = load_loss(&args.file, &overrides, args.params.as_deref())?;
    loss.set_ignore_label(args.label_values.ignore_label.0);
    let logits = npy::read_logits(&args.logits)?;
    let labels = npy::read_labels(&args.labels)?;
    let logits = if args.grad.is_some() { logits.set_requires_grad(true) } else { logits };
    let surrogate = loss.forward_detailed(&logits, &labels)?;
    if let Some(grad_path) = &args.grad {
        // A loss that does not depend on the logits (e.g. a label-only formula) has zero
        // gradient; libtorch would refuse to differentiate it.
        let gradient = if surrogate.loss.requires_grad() {
            surrogate.loss.backward();
            logits.grad().to_kind(tch::Kind::Float).contiguous()
        } else {
            logits.zeros_like().to_kind(tch::Kind::Float)
        };
        let shape: Vec<usize> = gradient.size().iter().map(|&d| d as usize).collect();
        let values = Vec::<f32>::try_from(gradient.reshape([-1]))?;
        npy::write_f32(grad_path, &shape, values)?;
    }
    let logits = logits.detach();
    let mut evaluator = loss.evaluator();
    evaluator.add_batch(&logits, &labels)?;
    let exact = evaluator.finish()?;
    let compiled = loss.compiled();
    let mut out = json!({
        "name": compiled.exact.name,
        "loss": surrogate.loss.double_value(&[]),
        "metric": json_number(exact.value),
        "metric_defined": exact.value.is_finite(),
        "surrogate_defined": surrogate.defined,
        "params": compiled.params,
        "curves": compiled.manifest().curves.iter().zip(&loss.params().curves).map(|(spec, curve)| json!({
            "name": spec.name, "pieces": curve.pieces(), "control_points": curve.flat()
        })).collect::<Vec<_>>(),
    });
    let mut exact_reports = serde_json::Map::new();
    for (name, value) in &exact.reports {
        let value = match value {
            Evaluated::Scalar(v) => json_number(*v),
            Evaluated::Classes(v) => Value::Array(v.iter().map(|x| json_number(*x)).collect()),
        };
        exact_reports.insert(name.clone(), value);
    }
    out["exact"] = Value::Object(exact_reports);
    let mut surrogate_reports = serde_json::Map::new();
    for (name, tensor) in &surrogate.reports {
        let values = Vec::<f64>::try_from(tensor.to_kind(tch::Kind::Double).reshape([-1]))?;
        let value = match values.as_slice() {
            [single] if tensor.dim() == 0 => json_number(*single),
            _ => Value::Array(values.iter().map(|x| json_number(*x)).collect()),
        };
        surrogate_reports.insert(name.clone(), value);
    }
    out["surrogate"] = Value::Object(surrogate_reports);
    if !exact.value.is_finite() {
        eprintln!("warning: the exact metric is undefined for these inputs (no class has a defined value, e.g. every pixel is ignored)");
    }
    if !surrogate.defined {
        eprintln!(
            "warning: the surrogate is undefined for this batch (no class qualified); the loss is 0 with zero gradient"
        );
    }
    for term in &surrogate.undefined_terms {
        eprintln!("warning: metric term `{term}` is undefined for this batch and contributes nothing to the loss");
    }
    Ok(out)
}
