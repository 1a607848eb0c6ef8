//! `losscc bench FILE`: the compiled loss against libtorch cross-entropy on the same tensors.
//!
//! Both run forward plus backward on identical logits and labels, in blocks (cross-entropy,
//! the loss, cross-entropy again), each after a warm-up; the medians and their ratio are
//! reported. Cross-entropy runs as a user's own libtorch code would: the process
//! keeps libtorch's default threading and OpenMP settings (the fused kernel runs on
//! libtorch's OpenMP team rather than changing them). Peak extra memory is the growth of the process's resident-set high
//! water mark (CPU) while the loss runs.

use compiler::ir::DEFAULT_IGNORE_LABEL;
use losscc_loss::Loss;
use serde::Serialize;
use std::time::Instant;
use tch::{Device, Kind, Reduction, Tensor};

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub metric: String,
    pub shape: Vec<i64>,
    pub device: String,
    pub iterations: usize,
    pub loss_ms: f64,
    pub ce_ms: f64,
    pub ratio: f64,
    pub peak_extra_mb: f64,
    /// `fused` (the fused kernel), `op by op` (a module without curves, which libtorch's own
    /// kernels serve best) or `reference` (the op-by-op reference path, `--reference`).
    pub path: String,
    /// libtorch's intra-op threads (its default unless the user set `OMP_NUM_THREADS`), which
    /// cross-entropy and the fused kernel both use.
    pub threads: i64,
    /// Where the fused kernel's parts run: libtorch's OpenMP team, or own threads.
    pub kernel_threads: String,
}

/// Deterministic blocky labels with an ignored band, like segmentation ground truth, for
/// logits `[N, C, H, W]` or volumes `[N, C, D, H, W]`.
pub fn bench_inputs(shape: &[i64], device: Device) -> (Tensor, Tensor) {
    let (n, c) = (shape[0], shape[1]);
    tch::manual_seed(0);
    let logits = Tensor::randn(shape, (Kind::Float, device)) * 2.0;
    let mut label_shape: Vec<i64> = vec![n];
    label_shape.extend(&shape[2..]);
    let rank = label_shape.len();
    let axis = |axis: usize| {
        let mut view = vec![1i64; rank];
        view[axis] = label_shape[axis];
        Tensor::arange(label_shape[axis], (Kind::Int64, device)).view(view.as_slice())
    };
    // Blocks of 17 (rows), 23 (columns) and 11 (depth) pixels, one pixel of each block's
    // edge ignored.
    let periods: Vec<(i64, i64)> = if rank == 4 { vec![(11, 5), (17, 3), (23, 1)] } else { vec![(17, 3), (23, 1)] };
    let mut labels = axis(0);
    let mut band = axis(0).zeros_like().to_kind(Kind::Bool);
    for (k, (period, weight)) in periods.iter().enumerate() {
        let at = axis(k + 1);
        labels = labels + at.divide_scalar_mode(*period, "floor") * *weight;
        band = band.logical_or(&at.remainder(*period).eq(0));
    }
    let labels = labels.remainder(c);
    let labels = labels.where_self(&band.logical_not(), &labels.full_like(DEFAULT_IGNORE_LABEL));
    (logits, labels.expand(label_shape.as_slice(), false).contiguous())
}

fn high_water_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn sync(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// Time the loss and cross-entropy, forward and backward, `iterations` times each.
pub fn run(
    loss: &Loss,
    shape: &[i64],
    device: Device,
    warmup: usize,
    iterations: usize,
) -> anyhow::Result<BenchReport> {
    let (logits, labels) = bench_inputs(shape, device);
    // A fresh leaf each iteration, as a training step sees it after `zero_grad` (set to none,
    // PyTorch's default): backward writes the gradient instead of adding to an old one.
    let step_loss = || -> anyhow::Result<()> {
        let leaf = logits.detach().set_requires_grad(true);
        loss.forward(&leaf, &labels)?.backward();
        Ok(())
    };
    let step_ce = || {
        let leaf = logits.detach().set_requires_grad(true);
        leaf.cross_entropy_loss::<Tensor>(&labels, None, Reduction::Mean, DEFAULT_IGNORE_LABEL, 0.0).backward();
    };
    let leaf = logits.detach().set_requires_grad(true);
    // Validate once, outside the timing (forward checks its inputs every call, as users get).
    step_ce();
    let before = high_water_mb();
    step_loss()?;
    let peak_extra_mb = (high_water_mb() - before).max(0.0);
    // Blocks, not single alternations: cross-entropy right after our loss reads up to twice
    // its own time (its buffers re-faulted, caches cold), which is not how a training loop
    // that uses it runs. Cross-entropy, the loss, cross-entropy again, each block warmed up.
    let (mut loss_times, mut ce_times) = (Vec::new(), Vec::new());
    let time_ce = |times: &mut Vec<f64>| {
        for iteration in 0..warmup + iterations.div_ceil(2) {
            let start = Instant::now();
            step_ce();
            sync(device);
            if iteration >= warmup {
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
    };
    time_ce(&mut ce_times);
    for iteration in 0..warmup + iterations {
        let start = Instant::now();
        step_loss()?;
        sync(device);
        if iteration >= warmup {
            loss_times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    time_ce(&mut ce_times);
    let (loss_ms, ce_ms) = (median(loss_times), median(ce_times));
    Ok(BenchReport {
        metric: loss.compiled().exact.name.clone(),
        shape: shape.to_vec(),
        device: format!("{device:?}"),
        iterations,
        loss_ms,
        ce_ms,
        ratio: loss_ms / ce_ms,
        peak_extra_mb,
        path: if loss.uses_fused_kernel(&leaf) {
            "fused".into()
        } else if loss.fast_path() {
            // A module without curves: libtorch's fused operations, op by op.
            "op by op".into()
        } else {
            "reference".into()
        },
        threads: tch::get_num_threads() as i64,
        kernel_threads: losscc_loss::kernel_threading().into(),
    })
}

#[derive(Copy, Clone, clap::ValueEnum)]
pub enum BenchDevice {
    Cpu,
    Cuda,
}

#[derive(clap::Args)]
pub struct Args {
    file: std::path::PathBuf,
    /// Logits shape `N,C,H,W`, or `N,C,D,H,W` for volumes.
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
    params: Option<std::path::PathBuf>,
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
}

pub fn run_command(args: Args) -> anyhow::Result<std::process::ExitCode> {
    let overrides = crate::args::parse_sets(&args.set)?;
    let shape_text = &args.shape;
    let dims: Vec<i64> =
        shape_text.split(',').map(|d| d.trim().parse::<i64>()).collect::<Result<_, _>>().map_err(|_| {
            anyhow::anyhow!(
                "`--shape {shape_text}` must be four or five positive integers, N,C,H,W or N,C,D,H,W, e.g. 4,21,256,256."
            )
        })?;
    if !(dims.len() == 4 || dims.len() == 5) || dims.iter().any(|&d| d <= 0) {
        anyhow::bail!(
            "`--shape {shape_text}` must be four or five positive integers, N,C,H,W or N,C,D,H,W, e.g. 4,21,256,256."
        );
    }
    let shape = dims;
    let device = match args.device {
        BenchDevice::Cpu => Device::Cpu,
        BenchDevice::Cuda if tch::Cuda::is_available() => Device::Cuda(0),
        BenchDevice::Cuda => anyhow::bail!(
            "no CUDA GPU is available to libtorch on this machine; run with `--device cpu`, or on a machine with an NVIDIA GPU and its driver."
        ),
    };
    let mut loss = super::load_loss(&args.file, &overrides, args.params.as_deref())?;
    loss.set_fast_path(!args.reference);
    let report = run(&loss, &shape, device, args.warmup, args.iterations.max(1))?;
    if args.json {
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
    Ok(std::process::ExitCode::SUCCESS)
}
