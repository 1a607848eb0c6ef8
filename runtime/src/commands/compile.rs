//! `losscc compile FILE [-o OUT.onnx]`: the ONNX loss graph (or the loss with its gradient,
//! or the exact-count graph) that other frameworks load. Without `-o` the graph goes beside
//! the source: `FILE.onnx`, `FILE.grad.onnx` or `FILE.exact.onnx`, so one never overwrites
//! another.

use super::load_loss;
use crate::args::{parse_sets, LabelArgs};
use anyhow::{Context, Result};
use clap::ValueEnum;
use compiler::onnx::{self, CurveSource, EmitOptions};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Copy, Clone, ValueEnum)]
pub enum OnnxEmit {
    /// One line per ONNX node, with the IR node and rule it came from.
    OnnxText,
}

#[derive(clap::Args)]
pub struct Args {
    file: PathBuf,
    /// Where to write the model [default: beside FILE, with the extension `.onnx`
    /// (`.grad.onnx` with `--grad`, `.exact.onnx` with `--exact`); with `--emit` alone,
    /// nowhere].
    #[arg(short = 'o', long = "output")]
    output: Option<PathBuf>,
    /// Curve parameters (losscc format or the published `control_points` layout).
    #[arg(long)]
    params: Option<PathBuf>,
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
    #[command(flatten)]
    label_values: LabelArgs,
    /// Emit the exact metric's per-class counts graph instead of the loss.
    #[arg(long, conflicts_with = "grad")]
    exact: bool,
    /// Emit the loss with its gradient: outputs `loss` and `dloss_dlogits`, derived by the
    /// compiler's reverse-mode pass (`losscc check --emit grad` prints it).
    #[arg(long)]
    grad: bool,
    /// Take the curves from an extra graph input `curves` (all control points, flat, in
    /// manifest order) instead of baking them in, so an external search can vary them.
    #[arg(long, conflicts_with = "exact")]
    curves_input: bool,
    /// Print a readable listing of the graph.
    #[arg(long, value_enum)]
    emit: Option<OnnxEmit>,
    /// A graph for volumes: logits `[N,C,D,H,W]` and labels `[N,D,H,W]`, with cubic windows
    /// for `erode`, `dilate` and `boundary` (the default graph takes images `[N,C,H,W]`).
    #[arg(long)]
    volumes: bool,
    /// Take soft labels: `labels` is float32 probabilities of the logits' shape (all 0 at an
    /// ignored pixel) instead of int64 class indices; for a sigmoid metric, per-channel
    /// targets (multi-hot 0/1, the ignore label in any channel ignoring the pixel).
    #[arg(long)]
    soft_labels: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let overrides = parse_sets(&args.set)?;
    let mut loss = load_loss(&args.file, &overrides, args.params.as_deref())?;
    loss.set_ignore_label(args.label_values.ignore_label.0);
    let compiled = loss.compiled();
    let options = EmitOptions {
        curves: if args.curves_input { CurveSource::Input } else { CurveSource::Baked },
        ignore_label: loss.ignore_label(),
        volumes: args.volumes,
        soft_labels: args.soft_labels,
    };
    let model = if args.exact {
        onnx::emit_exact(compiled, &options)?
    } else if args.grad {
        onnx::emit_gradient(compiled, &loss.params().curves, &options)?
    } else {
        onnx::emit_loss(compiled, &loss.params().curves, &options)?
    };
    if args.emit.is_some() {
        print!("{}", onnx::listing(&model));
    }
    let output = match (args.output, args.emit) {
        (Some(output), _) => Some(output),
        (None, None) => Some(args.file.with_extension(match (args.grad, args.exact) {
            (true, _) => "grad.onnx",
            (_, true) => "exact.onnx",
            _ => "onnx",
        })),
        (None, Some(_)) => None,
    };
    if let Some(output) = output {
        let bytes = onnx::to_bytes(&model);
        std::fs::write(&output, &bytes).with_context(|| format!("cannot write `{}`", output.display()))?;
        eprintln!(
            "wrote {} ({} bytes, {} nodes, {} curves)",
            output.display(),
            bytes.len(),
            model.graph.node.len(),
            compiled.manifest().curves.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
