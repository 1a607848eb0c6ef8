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

#[derive(Copy, Clone, ValueEnum)]
enum BaselineLoss {
    /// libtorch cross-entropy.
    Ce,
    /// Soft Dice (examples/dice.metric with identity curves).
    Dice,
    /// Lovász-softmax.
    Lovasz,
}

/// Where the proxy task's images come from, and how the proxy network trains.
#[derive(clap::Args, Clone)]
struct ProxyArgs {
    /// A VOC-layout folder (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/); the
    /// built-in scenes when absent.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Number of classes in --data (default: the largest label value plus one).
    #[arg(long)]
    classes: Option<usize>,
    /// Seed of the built-in scenes (the same scenes for every training seed).
    #[arg(long, default_value_t = 0)]
    data_seed: u64,
    /// Side of the built-in scenes in pixels [default: 80; 160 with `--preset paper`].
    #[arg(long)]
    image_size: Option<usize>,
    /// Number of built-in training scenes (hold-out gets a quarter, test a half of this).
    #[arg(long, default_value_t = 192)]
    train_images: usize,
    /// Leave the built-in scenes without the ignored (255) band around objects.
    #[arg(long)]
    no_ignore_band: bool,
    /// Batch size of the proxy training.
    #[arg(long)]
    batch: Option<usize>,
    /// Side of the square training crops (a multiple of 4).
    #[arg(long)]
    crop: Option<usize>,
    /// Initial SGD learning rate (poly schedule).
    #[arg(long)]
    lr: Option<f64>,
    /// Channels of the proxy network at stride 2.
    #[arg(long)]
    width: Option<i64>,
    /// Train on CUDA through libtorch; stops with an error when no GPU is available.
    #[arg(long)]
    gpu: bool,
}

impl ProxyArgs {
    fn synthetic(&self) -> runtime::data::SyntheticSpec {
        let train = self.train_images.max(1);
        runtime::data::SyntheticSpec {
            seed: self.data_seed,
            size: self.image_size.unwrap_or(80),
            train,
            holdout: (train / 4).max(1),
            test: (train / 2).max(1),
            ignore_band: !self.no_ignore_band,
        }
    }

    fn train_config(&self, iters: usize, seed: u64) -> runtime::trainer::TrainConfig {
        let defaults = runtime::trainer::TrainConfig::default();
        runtime::trainer::TrainConfig {
            iters,
            batch: self.batch.unwrap_or(defaults.batch),
            crop: self.crop.unwrap_or(defaults.crop),
            lr: self.lr.unwrap_or(defaults.lr),
            width: self.width.unwrap_or(defaults.width),
            seed,
            ..defaults
        }
    }

    fn dataset(&self) -> Result<runtime::data::Dataset> {
        let size = self.image_size.unwrap_or(80);
        if self.data.is_none() && (size < 8 || size % 4 != 0) {
            anyhow::bail!("--image-size must be a multiple of 4 and at least 8");
        }
        Ok(runtime::trainer::load_dataset(self.data.as_deref(), self.classes, &self.synthetic())?)
    }
}

#[derive(Copy, Clone, ValueEnum)]
enum PresetArg {
    /// 4 rounds × 6 samples, 120 proxy iterations at 64×64: minutes on a CPU.
    Quick,
    /// The published settings: 12 rounds × 32 samples, 1000 iterations at 128×128, batch 32.
    Paper,
}

#[derive(Copy, Clone, ValueEnum)]
enum BaselineArg {
    Mu,
    Mean,
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
        /// Time the op-by-op reference path instead of the fast path.
        #[arg(long)]
        reference: bool,
        #[arg(long)]
        params: Option<PathBuf>,
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
    },
    /// Train the proxy network with a loss; prints the six exact metrics on the test split as JSON.
    Train {
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
    },
    /// Search the loss's curves with PPO on the proxy task; writes OUT/best.params.json and a report.
    Search {
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

/// libtorch's OpenMP workers spin for a while after each parallel region; on a machine with
/// few cores they take time from losscc's own kernel threads (the fused loss, morphology,
/// curves), which run right after libtorch operations. Sleeping workers fix that, but
/// libgomp reads its policy once, when it loads, before `main`: so the command runs itself
/// again once with `OMP_WAIT_POLICY=PASSIVE`, unless the user chose a policy.
#[cfg(unix)]
fn passive_openmp_workers() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("OMP_WAIT_POLICY").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    // `exec` only returns on failure; then run as we are.
    let _ = std::process::Command::new(exe).arg0(argv0).args(args).env("OMP_WAIT_POLICY", "PASSIVE").exec();
}

fn main() -> ExitCode {
    #[cfg(unix)]
    passive_openmp_workers();
    // Like other command-line tools, stop quietly when the reader of our output goes away
    // (`losscc eval … | head`) instead of failing on the write.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
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
        Command::Bench { file, shape, device, iterations, warmup, json, reference, params, set } => {
            let overrides = parse_sets(&set).map_err(anyhow::Error::msg)?;
            let dims: Vec<i64> =
                shape.split(',').map(|d| d.trim().parse::<i64>()).collect::<Result<_, _>>().map_err(|_| {
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
            loss.set_fast_path(!reference);
            let report = runtime::bench::run(&loss, shape, device, warmup, iterations.max(1))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("| loss | shape | device | path | loss ms | cross-entropy ms | ratio | peak extra MB |");
                println!("|---|---|---|---|---|---|---|---|");
                println!(
                    "| {} | {:?} | {} | {} | {:.2} | {:.2} | {:.2}x | {:.0} |",
                    report.metric,
                    report.shape,
                    report.device,
                    report.path,
                    report.loss_ms,
                    report.ce_ms,
                    report.ratio,
                    report.peak_extra_mb
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Train { file, params, set, loss, iters, seed, proxy } => {
            train_command(file.as_deref(), params.as_deref(), &set, loss, iters, seed, &proxy)
        }
        Command::Search {
            file,
            preset,
            target,
            rounds,
            samples,
            iters,
            seed,
            out,
            resume,
            baseline,
            sigma,
            clip,
            ppo_steps,
            ppo_lr,
            params,
            set,
            models_per_device,
            proxy,
        } => {
            let preset = match preset {
                PresetArg::Quick => runtime::search::Preset::Quick,
                PresetArg::Paper => runtime::search::Preset::Paper,
            };
            let (preset_rounds, preset_samples, preset_iters, preset_batch, preset_crop) = preset.settings();
            let mut proxy = proxy;
            proxy.batch = proxy.batch.or(Some(preset_batch));
            proxy.crop = proxy.crop.or(Some(preset_crop));
            if preset == runtime::search::Preset::Paper {
                proxy.image_size = proxy.image_size.or(Some(160));
            }
            let baseline = match baseline {
                BaselineArg::Mu => runtime::search::Baseline::Mu,
                BaselineArg::Mean => runtime::search::Baseline::Mean,
            };
            let settings = SearchSettings {
                rounds: rounds.unwrap_or(preset_rounds),
                samples: samples.unwrap_or(preset_samples),
                iters: iters.unwrap_or(preset_iters),
                seed,
                baseline,
                sigma,
                clip,
                ppo_steps,
                ppo_lr,
                models_per_device,
            };
            search_command(&file, target.as_deref(), &out, resume, params.as_deref(), &set, &settings, &proxy)
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
        let values: Vec<f64> =
            Vec::<f64>::try_from(tensor.to_kind(tch::Kind::Double).reshape([-1])).unwrap_or_default();
        let value = if tensor.dim() == 0 { json_number(values[0]) } else { json!(values) };
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

fn train_command(
    file: Option<&Path>,
    params: Option<&Path>,
    set: &[String],
    baseline: Option<BaselineLoss>,
    iters: usize,
    seed: u64,
    proxy: &ProxyArgs,
) -> Result<ExitCode> {
    use runtime::trainer::{self, Objective};
    let device = runtime::trainer::choose_device(proxy.gpu).map_err(anyhow::Error::msg)?;
    let config = proxy.train_config(iters, seed);
    if let Some(problem) = config.problem() {
        anyhow::bail!("{problem}");
    }
    let compiled: Loss;
    let (objective, name) = match (file, baseline) {
        (Some(file), _) => {
            let overrides = parse_sets(set).map_err(anyhow::Error::msg)?;
            compiled = load_loss(file, &overrides, params)?;
            (Objective::Compiled(&compiled), file.display().to_string())
        }
        (None, Some(BaselineLoss::Ce)) => (Objective::CrossEntropy, "ce".to_string()),
        (None, Some(BaselineLoss::Lovasz)) => (Objective::Lovasz, "lovasz".to_string()),
        (None, Some(BaselineLoss::Dice)) => {
            compiled = Loss::from_source("dice.metric", include_str!("../../examples/dice.metric"), &[])?;
            (Objective::Compiled(&compiled), "dice".to_string())
        }
        (None, None) => anyhow::bail!("give a metric file to train with, or --loss ce|dice|lovasz"),
    };
    let dataset = proxy.dataset()?;
    let metrics: Vec<Loss> =
        trainer::STANDARD_METRICS.iter().map(|(name, _)| trainer::standard_metric(name).expect("built in")).collect();
    if let Objective::Compiled(loss) = &objective {
        if loss.compiled().relaxed.min_classes > dataset.classes {
            anyhow::bail!(
                "`{name}` needs at least {} classes but the data has {}",
                loss.compiled().relaxed.min_classes,
                dataset.classes
            );
        }
    }
    let bar = runtime::progress::steps_bar(iters as u64, &format!("train {name}"));
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
    if let Some(params) = params {
        out.insert("params".into(), json!(params.display().to_string()));
    }
    out.insert("data".into(), json!(dataset.description));
    out.insert("split".into(), json!("test"));
    out.insert("iters".into(), json!(iters));
    out.insert("seed".into(), json!(seed));
    out.insert("device".into(), json!(format!("{device:?}")));
    out.insert("final_training_loss".into(), json_number(trained.final_loss));
    out.insert("training_seconds".into(), json!((training_seconds * 100.0).round() / 100.0));
    println!("{}", serde_json::to_string_pretty(&Value::Object(out))?);
    Ok(ExitCode::SUCCESS)
}

struct SearchSettings {
    rounds: usize,
    samples: usize,
    iters: usize,
    seed: u64,
    baseline: runtime::search::Baseline,
    sigma: f64,
    clip: f64,
    ppo_steps: usize,
    ppo_lr: f64,
    models_per_device: Option<usize>,
}

#[allow(clippy::too_many_arguments)]
fn search_command(
    file: &Path,
    target: Option<&str>,
    out: &Path,
    resume: bool,
    params: Option<&Path>,
    set: &[String],
    settings: &SearchSettings,
    proxy: &ProxyArgs,
) -> Result<ExitCode> {
    use runtime::search::{Layout, Search, SearchConfig, Workers};
    use runtime::trainer;
    let device = trainer::choose_device(proxy.gpu).map_err(anyhow::Error::msg)?;
    let overrides = parse_sets(set).map_err(anyhow::Error::msg)?;
    let loss = load_loss(file, &overrides, params)?;
    let source = std::fs::read_to_string(file).with_context(|| format!("cannot read `{}`", file.display()))?;
    let (target_name, target_loss) = match target {
        Some(name) => match trainer::standard_metric(name) {
            Some(metric) => (name.to_string(), metric),
            None if Path::new(name).exists() => (name.to_string(), load_loss(Path::new(name), &[], None)?),
            None => anyhow::bail!(
                "--target `{name}` is neither a built-in metric (miou, fwiou, macc, gacc, biou, bf1) nor a metric file"
            ),
        },
        None => {
            if loss.compiled().exact.root_kind != compiler::ir::RootKind::Metric {
                anyhow::bail!(
                    "`{}` is a loss, so the reward is not implied; pass --target with the metric to maximize (e.g. --target biou)",
                    file.display()
                );
            }
            (file.display().to_string(), load_loss(file, &overrides, None)?)
        }
    };
    if target_loss.compiled().exact.root_kind != compiler::ir::RootKind::Metric {
        anyhow::bail!("--target `{target_name}` is a loss; the reward must be a metric (higher is better)");
    }
    let config_train = proxy.train_config(settings.iters, 0);
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
            let models = settings.models_per_device.unwrap_or(cores).clamp(1, settings.samples.max(1));
            (vec![tch::Device::Cpu], models, (cores / models).max(1))
        }
        _ => {
            let count = tch::Cuda::device_count().max(1) as usize;
            ((0..count).map(tch::Device::Cuda).collect(), settings.models_per_device.unwrap_or(4).max(1), 1)
        }
    };
    tch::set_num_threads(threads as i32);
    let config = SearchConfig {
        file: file.display().to_string(),
        source,
        overrides: overrides.clone(),
        target: target_name,
        rounds: settings.rounds,
        samples: settings.samples,
        sigma: settings.sigma,
        clip: settings.clip,
        adam_steps: settings.ppo_steps,
        adam_lr: settings.ppo_lr,
        baseline: settings.baseline,
        seed: settings.seed,
        train: config_train,
        data: dataset.description.clone(),
        start: loss.params().curves.iter().map(|c| c.flat()).collect(),
        threads_per_model: threads,
        device: if device == tch::Device::Cpu { "cpu".into() } else { "cuda".into() },
        target_source: match target {
            Some(name) if trainer::standard_metric(name).is_none() => std::fs::read_to_string(name).unwrap_or_default(),
            _ => String::new(),
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
    let search = Search {
        config: config.clone(),
        file: file.to_path_buf(),
        layout,
        target: &target_loss,
        dataset: &dataset,
        workers: Workers { devices, models_per_device },
        progress: std::io::stderr().is_terminal(),
    };
    let outcome = search.run(out, resume)?;
    let manifest = &loss.compiled().manifest;
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
    let paths = runtime::search::Paths { dir: out.to_path_buf() };
    for (path, value) in [(paths.best(), &best), (paths.mu(), &mu)] {
        std::fs::write(&path, serde_json::to_string_pretty(value)? + "\n")
            .with_context(|| format!("cannot write `{}`", path.display()))?;
    }
    let names: Vec<String> = manifest.curves.iter().map(|c| c.name.clone()).collect();
    runtime::report::write(out, &config, &outcome, &names, &dataset.description).map_err(anyhow::Error::msg)?;
    println!("{}", runtime::report::rounds_table(&outcome));
    println!(
        "best: round {} sample {}, reward {:.4} ({} candidates trained now, {} reused from history)",
        outcome.best.round + 1,
        outcome.best.sample + 1,
        outcome.best.reward,
        outcome.trained,
        outcome.reused
    );
    println!("wrote {}, {} and {}", paths.best().display(), paths.mu().display(), paths.report().display());
    Ok(ExitCode::SUCCESS)
}
