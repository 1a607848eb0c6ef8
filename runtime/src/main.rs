//! The `losscc` command line.
//!
//! Exit codes: 0 success; 1 the input is wrong (diagnostics, bad tensors, bad parameters,
//! unreadable files) or `fmt --check` found a difference; 2 the command line itself is
//! wrong (clap's usage errors).

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use runtime::{Loss, LossError};
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "losscc", version, about = "Compile segmentation metrics into differentiable losses")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, ValueEnum)]
enum Emit {
    /// The syntax tree, with spans.
    Ast,
    /// The exact IR (the metric on argmax predictions).
    Ir,
    /// The relaxed IR (the surrogate) and its curve manifest.
    Relaxed,
}

#[derive(Copy, Clone, ValueEnum)]
enum OnnxEmit {
    /// One line per ONNX node, with the IR node and rule it came from.
    OnnxText,
}

#[derive(Copy, Clone, ValueEnum)]
enum BenchDevice {
    Cpu,
    Cuda,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and type-check metric files; print diagnostics with source positions.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print a stage's output for each file.
        #[arg(long, value_enum)]
        emit: Option<Emit>,
        /// Parameter overrides, `NAME=VALUE`.
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
    },
    /// Print a file in canonical formatting.
    Fmt {
        file: PathBuf,
        /// Exit with 1 if the file is not formatted, printing nothing.
        #[arg(long)]
        check: bool,
        /// Rewrite the file in place.
        #[arg(long, conflicts_with = "check")]
        write: bool,
    },
    /// Compile to an ONNX loss graph (opset 17) that other frameworks load.
    Compile {
        file: PathBuf,
        /// Where to write the model.
        #[arg(short = 'o', long = "output", required_unless_present = "emit")]
        output: Option<PathBuf>,
        /// Curve parameters (losscc format or the published `control_points` layout).
        #[arg(long)]
        params: Option<PathBuf>,
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
        /// Emit the exact metric's per-class counts graph instead of the loss.
        #[arg(long)]
        exact: bool,
        /// Take the curves from an extra graph input `curves` (all control points, flat, in
        /// manifest order) instead of baking them in, so an external search can vary them.
        #[arg(long, conflicts_with = "exact")]
        curves_input: bool,
        /// Print a readable listing of the graph.
        #[arg(long, value_enum)]
        emit: Option<OnnxEmit>,
    },
    /// Median forward+backward time of the loss against libtorch cross-entropy.
    Bench {
        file: PathBuf,
        /// Logits shape `N,C,H,W`.
        #[arg(long, default_value = "4,21,256,256")]
        shape: String,
        #[arg(long, value_enum, default_value = "cpu")]
        device: BenchDevice,
        #[arg(long, default_value_t = 10)]
        iterations: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Time the fused CPU kernel instead of the op-by-op path.
        #[arg(long)]
        fused: bool,
        #[arg(long)]
        params: Option<PathBuf>,
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
    },
    /// Evaluate the surrogate loss and the exact metric on saved tensors; prints JSON.
    Eval {
        file: PathBuf,
        /// Logits, float32 `[N,C,H,W]` in .npy.
        #[arg(long)]
        logits: PathBuf,
        /// Labels, int64 `[N,H,W]` in .npy (255 = ignored).
        #[arg(long)]
        labels: PathBuf,
        /// Curve parameters (losscc format or the published `control_points` layout).
        #[arg(long)]
        params: Option<PathBuf>,
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
        /// Also write d loss / d logits (float32 .npy, same shape as the logits) here.
        #[arg(long)]
        grad: Option<PathBuf>,
    },
}

fn parse_sets(sets: &[String]) -> Result<Vec<(String, String)>, String> {
    sets.iter()
        .map(|s| match s.split_once('=') {
            Some((name, value)) if !name.trim().is_empty() => Ok((name.trim().to_string(), value.to_string())),
            _ => Err(format!("`--set {s}` must have the form NAME=VALUE, e.g. `--set tol=3`.")),
        })
        .collect()
}

fn color() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}


fn main() -> ExitCode {
    // Deeply nested metric files are bounded by the parser, but the checker and lowering
    // recurse too: give them a generous stack.
    let child = std::thread::Builder::new().stack_size(256 << 20).spawn(run);
    match child.map(|handle| handle.join()) {
        Ok(Ok(code)) => code,
        _ => {
            eprintln!("error: losscc stopped unexpectedly; please report this with the input that caused it.");
            ExitCode::from(1)
        }
    }
}

fn run() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(error) => {
            if error.downcast_ref::<Reported>().is_none() {
                eprintln!("error: {error:#}");
            }
            ExitCode::from(1)
        }
    }
}

/// A failure whose diagnostics were already printed: exit code 1, nothing more to say.
#[derive(Debug)]
struct Reported;
impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reported")
    }
}
impl std::error::Error for Reported {}

fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Check { files, emit, set } => {
            let overrides = parse_sets(&set).map_err(anyhow::Error::msg)?;
            let mut failed = 0;
            for file in &files {
                if check_one(file, emit, &overrides).is_err() {
                    failed += 1;
                }
            }
            if failed > 0 {
                eprintln!("{failed} of {} files failed to check", files.len());
                return Ok(ExitCode::from(1));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Fmt { file, check, write } => {
            let program = compiler::program::Program::load(&file);
            let program = match program {
                Ok(p) => p,
                Err(error) => {
                    let failure = load_failure(error);
                    eprint!("{}", failure.render(color()));
                    return Ok(ExitCode::from(1));
                }
            };
            let formatted = grammar::format_file(&program.main().ast);
            if check {
                return Ok(if formatted == program.main().text { ExitCode::SUCCESS } else { ExitCode::from(1) });
            }
            if write {
                std::fs::write(&file, &formatted).with_context(|| format!("cannot write `{}`", file.display()))?;
            } else {
                print!("{formatted}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Compile { file, output, params, set, exact, curves_input, emit } => {
            let overrides = parse_sets(&set).map_err(anyhow::Error::msg)?;
            let loss = load_loss(&file, &overrides, params.as_deref())?;
            let compiled = loss.compiled();
            let emitted = if exact {
                compiler::onnx::emit_exact(compiled)
            } else {
                let source =
                    if curves_input { compiler::onnx::CurveSource::Input } else { compiler::onnx::CurveSource::Baked };
                compiler::onnx::emit_loss_with(compiled, &loss.params().curves, source)
            };
            let model = match emitted {
                Ok(model) => model,
                Err(compiler::onnx::OnnxError::Unsupported { construct, start, end }) => {
                    // Point at the construct in the source, like any other diagnostic.
                    let main = compiled.program.main();
                    let diagnostic = grammar::Diagnostic::error(
                        "E0401",
                        format!("{construct} cannot be expressed in ONNX opset {}", compiler::onnx::OPSET),
                        grammar::ast::Span::new(start, end),
                        "not expressible in ONNX",
                    );
                    eprint!("{}", grammar::render(&[diagnostic], &main.name, &main.text, color()));
                    return Err(Reported.into());
                }
                Err(other) => return Err(other.into()),
            };
            if emit.is_some() {
                print!("{}", compiler::onnx::listing(&model));
            }
            if let Some(output) = output {
                let bytes = compiler::onnx::to_bytes(&model);
                std::fs::write(&output, &bytes).with_context(|| format!("cannot write `{}`", output.display()))?;
                eprintln!(
                    "wrote {} ({} bytes, {} nodes, {} curves)",
                    output.display(),
                    bytes.len(),
                    model.graph.node.len(),
                    compiled.manifest.curves.len()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { file, shape, device, iterations, warmup, json, fused, params, set } => {
            let overrides = parse_sets(&set).map_err(anyhow::Error::msg)?;
            let dims: Vec<i64> = shape.split(',').map(|d| d.trim().parse::<i64>()).collect::<Result<_, _>>().map_err(|_| {
                anyhow::anyhow!("`--shape {shape}` must be four positive integers N,C,H,W, e.g. 4,21,256,256.")
            })?;
            let shape: [i64; 4] = match dims.as_slice() {
                [n, c, h, w] if dims.iter().all(|&d| d > 0) => [*n, *c, *h, *w],
                _ => anyhow::bail!("`--shape {shape}` must be four positive integers N,C,H,W, e.g. 4,21,256,256."),
            };
            let device = match device {
                BenchDevice::Cpu => tch::Device::Cpu,
                BenchDevice::Cuda if tch::Cuda::is_available() => tch::Device::Cuda(0),
                BenchDevice::Cuda => anyhow::bail!(
                    "no CUDA GPU is available to libtorch on this machine; run with `--device cpu`, or on a machine with an NVIDIA GPU and its driver."
                ),
            };
            let mut loss = load_loss(&file, &overrides, params.as_deref())?;
            loss.set_fused_kernel(fused);
            let report = runtime::bench::run(&loss, shape, device, warmup, iterations.max(1))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("| loss | shape | device | loss ms | cross-entropy ms | ratio | peak extra MB |");
                println!("|---|---|---|---|---|---|---|");
                println!(
                    "| {} | {:?} | {} | {:.2} | {:.2} | {:.2}x | {:.0} |",
                    report.metric, report.shape, report.device, report.loss_ms, report.ce_ms, report.ratio, report.peak_extra_mb
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval { file, logits, labels, params, set, grad } => {
            let overrides = parse_sets(&set).map_err(anyhow::Error::msg)?;
            let value = eval(&file, &logits, &labels, params.as_deref(), &overrides, grad.as_deref())?;
            println!("{}", serde_json::to_string_pretty(&value)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load_failure(error: compiler::program::LoadError) -> compiler::Failure {
    match error {
        compiler::program::LoadError::Io { path, error } => compiler::Failure::Io(format!(
            "cannot read `{}`: {error}; check the path and that the file is readable.",
            path.display()
        )),
        compiler::program::LoadError::Syntax(files) => compiler::Failure::Diagnostics(files),
    }
}

fn check_one(file: &Path, emit: Option<Emit>, overrides: &[(String, String)]) -> Result<(), Reported> {
    if let Some(Emit::Ast) = emit {
        match compiler::program::Program::load(file) {
            Ok(program) => print!("{}", grammar::dump::dump_file(&program.main().ast)),
            Err(error) => {
                eprint!("{}", load_failure(error).render(color()));
                return Err(Reported);
            }
        }
    }
    let checked = compiler::load_checked(file).and_then(|program| {
        compiler::check_other_definitions(&program)?;
        compiler::compile_program(program, overrides)
    });
    match checked {
        Ok(compiled) => {
            match emit {
                Some(Emit::Ir) => print!("{}", compiler::print::dump(&compiled.exact, None)),
                Some(Emit::Relaxed) => print!("{}", compiler::print::dump(&compiled.relaxed, Some(&compiled.manifest))),
                _ => {}
            }
            let curves: Vec<&str> = compiled.manifest.curves.iter().map(|c| c.name.as_str()).collect();
            eprintln!(
                "ok: {} ({} `{}`, {} curve{}: {})",
                file.display(),
                match compiled.exact.root_kind {
                    compiler::ir::RootKind::Metric => "metric",
                    compiler::ir::RootKind::Loss => "loss",
                },
                compiled.exact.name,
                curves.len(),
                if curves.len() == 1 { "" } else { "s" },
                if curves.is_empty() { "none".to_string() } else { curves.join(", ") }
            );
            Ok(())
        }
        Err(failure) => {
            eprint!("{}", failure.render(color()));
            Err(Reported)
        }
    }
}

fn json_number(value: f64) -> Value {
    if value.is_finite() {
        json!(value)
    } else {
        Value::Null
    }
}

/// Compile a metric and load its curves, rendering diagnostics for the user.
fn load_loss(file: &Path, overrides: &[(String, String)], params: Option<&Path>) -> Result<Loss> {
    let mut loss = match Loss::from_file(file, overrides) {
        Ok(loss) => loss,
        Err(LossError::Compile(failure)) => {
            eprint!("{}", failure.render(color()));
            return Err(Reported.into());
        }
        Err(other) => return Err(other.into()),
    };
    if let Some(params) = params {
        loss.load_params(params)?;
    }
    Ok(loss)
}

fn eval(
    file: &Path,
    logits: &Path,
    labels: &Path,
    params: Option<&Path>,
    overrides: &[(String, String)],
    grad: Option<&Path>,
) -> Result<Value> {
    let loss = load_loss(file, overrides, params)?;
    let logits = runtime::npy::read_logits(logits)?;
    let labels = runtime::npy::read_labels(labels)?;
    let logits = if grad.is_some() { logits.set_requires_grad(true) } else { logits };
    let surrogate = loss.forward_detailed(&logits, &labels)?;
    if let Some(grad_path) = grad {
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
        runtime::npy::write_f32(grad_path, &shape, values)?;
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
        "curves": compiled.manifest.curves.iter().zip(&loss.params().curves).map(|(spec, curve)| json!({
            "name": spec.name, "pieces": curve.pieces(), "control_points": curve.flat()
        })).collect::<Vec<_>>(),
    });
    let mut exact_reports = serde_json::Map::new();
    for (name, value) in &exact.reports {
        let value = match value {
            compiler::accumulate::Value::Scalar(v) => json_number(*v),
            compiler::accumulate::Value::Classes(v) => Value::Array(v.iter().map(|x| json_number(*x)).collect()),
        };
        exact_reports.insert(name.clone(), value);
    }
    out["exact"] = Value::Object(exact_reports);
    let mut surrogate_reports = serde_json::Map::new();
    for (name, tensor) in &surrogate.reports {
        let values: Vec<f64> = Vec::<f64>::try_from(tensor.to_kind(tch::Kind::Double).reshape([-1])).unwrap_or_default();
        let value = if tensor.dim() == 0 { json_number(values[0]) } else { json!(values) };
        surrogate_reports.insert(name.clone(), value);
    }
    out["surrogate"] = Value::Object(surrogate_reports);
    if !exact.value.is_finite() {
        eprintln!("warning: the exact metric is undefined for these inputs (no class has a defined value, e.g. every pixel is ignored)");
    }
    if !surrogate.defined {
        eprintln!("warning: the surrogate is undefined for this batch (no class qualified); the loss is 0 with zero gradient");
    }
    for term in &surrogate.undefined_terms {
        eprintln!("warning: metric term `{term}` is undefined for this batch and contributes nothing to the loss");
    }
    Ok(out)
}
