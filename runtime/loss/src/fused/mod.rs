//! The fused CPU kernel: a relaxed module's pixel-level work done in a few passes over the
//! pixels instead of one libtorch operation per node.
//!
//! The reference path (op by op in libtorch) materializes every intermediate `[N,C,H,W]`
//! tensor and records it for autograd. Here, the pixel-level nodes that feed the counts
//! become a small program over a pixel's classes, run on tiles of 16 pixels whose values
//! lie in rows of 16 lanes, one row per class, in scratch that stays in the core's cache:
//! 1. forward sweep: softmax, curves, products, ... accumulated straight into the counts
//!    (float32 lanes, folded into float64 every few tiles); nothing logits-sized is written;
//! 2. the few per-class numbers above the counts run in libtorch with autograd, giving
//!    `∂loss/∂count`;
//! 3. backward sweep: per tile, the values it needs recomputed from the logits (softmax,
//!    curves with their slopes), then reverse mode through the same program to
//!    `∂loss/∂logits`. Recomputing costs less than storing the softmax and the slopes in
//!    logits-sized planes and reading them back, which do not fit in the caches.
//!
//! **Stages.** Pooling of prediction-dependent sets (BF1's `boundary(P)` erodes `P`, then
//! dilates the soft boundary) needs neighbours, so such a module runs in several sweeps
//! (stages): a value a later stage reads goes to a *frame* (a full `[N, w, H, W]` plane),
//! and between stages the CPU winner search pools a frame into another, keeping each
//! output's winner (as `max_pool2d` picks it). The backward runs the stages in reverse: each
//! stage's sweep adds the gradients of what it read into the frames' gradient planes, each
//! pooling scatters its output's gradient to the winners, and the first stage's sweep ends in
//! the softmax backward. Only what a pooling reads, or what cannot be recomputed from
//! frames already kept, goes to a frame: a curve of the softmax in a later stage is
//! recomputed from the softmax's frame rather than written and read as a frame of its own.
//!
//! The result enters autograd through a small C++ autograd function ([`crate::autograd`]):
//! its value is the kernel's loss and its gradient the kernel's `G`, handed over without a
//! copy. The gradient is therefore computed during the forward call when the logits require
//! one and gradients are enabled; under `no_grad` (or for logits without `requires_grad`)
//! the backward sweep is skipped.
//!
//! What it covers: softmax, labels, valid, constants, curves, `+ − ×`, negation, `any`,
//! class slices, erosion and dilation, counts and the cross-entropy sum; label-only parts
//! (label boundaries, bands, their counts) are computed once, on bytes when
//! [`crate::label_planes`] proves they fit, and read as planes. Tests prove the fused and reference
//! paths equal in values and gradients.
//!
//! Every hot loop is written to vectorize (rows of a length known at compile time, computed
//! on copies and stored whole, no branches) and compiled twice by
//! [`with_best_simd!`](crate::kernels::simd::with_best_simd): for the baseline target and
//! for AVX2+FMA, chosen at run time.
//!
//! Files: [`plan`] (the program), [`sweep`] (the per-tile passes), [`lanes`] (per-pixel
//! arithmetic); this file runs them. The entry point takes a [`FusedBatch`], which only
//! exists for checked float32 CPU inputs, so the raw reads of tensor memory here are sound.

mod lanes;
pub(crate) mod plan;
mod sweep;

use crate::error::LossError;
use crate::inputs::Batch;
use crate::kernels::parallel::run_parts;
use crate::kernels::pool::{
    self, masked_pooled_sums, masked_scatter, scatter3, scatter_planes, window3_codes, window_winners,
};
use crate::kernels::scratch::{give_back, take};
use crate::kernels::{threads, zero};
use crate::label_planes;
use crate::reference::tensors::values;
use crate::reference::{self, Surrogate};
use compiler::curve::Curve;
use compiler::ir::{Handle, Node, Shape};
use compiler::RelaxedModule;
use plan::{width, FusedPlan};
use std::ops::Range;
use sweep::{backward_run, forward_run, Frame, PlaneData, SharedBytes, SharedPlanes, Sweep, TileBuffers, TILE};
use tch::{Kind, Tensor};

/// A checked batch whose logits are float32 on the CPU: what the fused kernel reads in place.
pub(crate) struct FusedBatch<'a> {
    batch: &'a Batch<'a>,
}

impl<'a> FusedBatch<'a> {
    /// The batch, when the fused kernel can read it (float32 logits on the CPU, class-index
    /// labels: soft labels take the reference path).
    pub(crate) fn new(batch: &'a Batch<'a>) -> Option<FusedBatch<'a>> {
        let logits = batch.logits;
        let readable = logits.device() == tch::Device::Cpu && logits.kind() == Kind::Float;
        (readable && batch.soft_labels.is_none()).then_some(FusedBatch { batch })
    }
}

/// Slack, in values, that a frame's buffer has for [`aligned`].
const ALIGN: usize = 16;

/// A frame's planes inside its buffer (`ALIGN` values longer than the planes), starting at a
/// 64-byte boundary, so that the tiles' rows of a plane whose size is a multiple of 16 are
/// aligned for streaming stores.
fn aligned(buffer: &mut [f32]) -> SharedPlanes {
    if buffer.is_empty() {
        return SharedPlanes { data: buffer.as_mut_ptr(), len: 0 };
    }
    let skip = buffer.as_ptr().align_offset(64).min(ALIGN);
    SharedPlanes { data: buffer[skip..].as_mut_ptr(), len: buffer.len() - ALIGN }
}

/// Whether libtorch records gradients on this thread now (`tch::no_grad` turns it off).
fn grad_mode_enabled() -> bool {
    // libtorch answers with the previous mode when the mode is set: set it to what it was.
    // SAFETY: a plain call into libtorch's thread-local grad mode; it is restored at once.
    let previous = unsafe { torch_sys::at_grad_set_enabled(1) } != 0;
    unsafe { torch_sys::at_grad_set_enabled(i32::from(previous)) };
    previous
}

/// Tiles `0..tiles` split into `workers` runs of about equal length (consecutive tiles, so
/// a run reads consecutive memory).
fn tile_runs(tiles: usize, workers: usize) -> Vec<Range<usize>> {
    let workers = workers.clamp(1, tiles.max(1));
    (0..workers).map(|part| part * tiles / workers..(part + 1) * tiles / workers).collect()
}

/// The label planes of one call, whose byte planes go back to the scratch pool when it ends.
struct Planes(Vec<PlaneData>);

impl std::ops::Deref for Planes {
    type Target = [PlaneData];
    fn deref(&self) -> &[PlaneData] {
        &self.0
    }
}

impl Drop for Planes {
    fn drop(&mut self) {
        for plane in std::mem::take(&mut self.0) {
            if let PlaneData::Bytes(data) = plane {
                give_back(data);
            }
        }
    }
}

/// The large buffers of one call (frames with their gradients, poolings' winners), given
/// back to the scratch pool when the call ends, however it ends.
#[derive(Default)]
struct Buffers {
    frames: Vec<(Vec<f32>, Vec<f32>)>,
    /// Per pooling: its winners as indices, or (3×3 windows) as byte codes.
    winners: Vec<(Vec<u32>, Vec<i8>)>,
}

impl Drop for Buffers {
    fn drop(&mut self) {
        for (values, grads) in std::mem::take(&mut self.frames) {
            give_back(values);
            give_back(grads);
        }
        for (winners, codes) in std::mem::take(&mut self.winners) {
            give_back(winners);
            give_back(codes);
        }
    }
}

/// Where the time of one fused call goes, printed to stderr when the environment variable
/// `LOSSCC_PHASES` is set (the phase table of docs/performance.md comes from it). Phases of
/// the same name add up; sweeps are named by their stage.
struct Phases {
    last: Option<std::time::Instant>,
    parts: Vec<(String, f64)>,
}

impl Phases {
    fn start() -> Phases {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let on = *ON.get_or_init(|| std::env::var_os("LOSSCC_PHASES").is_some());
        Phases { last: on.then(std::time::Instant::now), parts: Vec::new() }
    }

    fn mark(&mut self, phase: impl Into<String>) {
        if let Some(last) = self.last {
            let phase = phase.into();
            let now = std::time::Instant::now();
            let ms = (now - last).as_secs_f64() * 1e3;
            match self.parts.iter_mut().find(|(name, _)| *name == phase) {
                Some((_, total)) => *total += ms,
                None => self.parts.push((phase, ms)),
            }
            self.last = Some(now);
        }
    }

    fn report(&self, metric: &str) {
        if self.last.is_some() {
            let parts: Vec<String> = self.parts.iter().map(|(name, ms)| format!("{name} {ms:.2} ms")).collect();
            eprintln!("losscc fused {metric}: {}", parts.join(", "));
        }
    }
}

/// The surrogate through the fused kernel.
pub(crate) fn surrogate(
    module: &RelaxedModule,
    curves: &[Curve],
    plan: &FusedPlan,
    inputs: &FusedBatch<'_>,
) -> Result<Surrogate, LossError> {
    let mut phases = Phases::start();
    let batch = inputs.batch;
    let (logits, labels) = (batch.logits, batch.labels);
    let size = logits.size();
    let (n, c, h, w) = (size[0] as usize, size[1] as usize, size[2] as usize, size[3] as usize);
    let pixels_per_image = h * w;
    let elements = n * c * pixels_per_image;
    // The logits are read in place: a contiguous float32 view that outlives the sweeps.
    let logits_contiguous = logits.detach().contiguous();
    // SAFETY: a `FusedBatch` holds float32 CPU logits; `logits_contiguous` is a contiguous
    // view of them with `elements` values, alive and unmodified until the end of this function.
    let logit_values: &[f32] = if elements == 0 {
        &[]
    } else {
        unsafe { std::slice::from_raw_parts(logits_contiguous.data_ptr() as *const f32, elements) }
    };
    let label_values = values::<i64>(labels)?;
    // A label value no checked label has stands for "no ignore label".
    let ignore = batch.ignore_label.unwrap_or(i64::MIN);
    let needs_backward = logits.requires_grad() && grad_mode_enabled();
    // Label-only planes, computed once: on bytes where they are small integers, else by
    // libtorch.
    let dims = label_planes::Dims { images: n, classes: c, height: h, width: w };
    // Counts of label-only sets (BF1's label boundary pixels per class) come from the same
    // byte planes, so that libtorch does not rebuild the label part for them.
    let label_counts: Vec<(Handle, Handle)> = module
        .handles()
        .filter_map(|h| {
            if let Node::Count(input) = module.node(h) {
                label_planes::pixel_label_node(module, *input).then_some((h, *input))
            } else {
                None
            }
        })
        .collect();
    let mut wanted_planes = plan.planes.clone();
    wanted_planes.extend(label_counts.iter().map(|(_, input)| *input));
    let evaluated = if wanted_planes.is_empty() {
        None
    } else {
        label_planes::evaluate(module, &label_values, dims, batch.ignore_label, &wanted_planes)
    };
    let mut provided: Vec<Option<Tensor>> = (0..module.len()).map(|_| None).collect();
    if let Some(computed) = &evaluated {
        for (count, input) in &label_counts {
            if let Some(label_planes::Value::Plane { data, width }) = &computed[input.index()] {
                let sums = label_planes::class_sums(data, *width, pixels_per_image);
                let tensor = Tensor::from_slice(&sums).to_kind(logits.kind());
                let tensor =
                    if matches!(module.shape(*count), Shape::Scalar) { tensor.sum(logits.kind()) } else { tensor };
                provided[count.index()] = Some(tensor);
            }
        }
    }
    let plane_values = Planes(if let Some(mut computed) = evaluated {
        let planes = plan
            .planes
            .iter()
            .map(|p| match computed[p.index()].take() {
                Some(label_planes::Value::Plane { data, .. }) => PlaneData::Bytes(data),
                Some(label_planes::Value::Scalar(value)) => PlaneData::Floats(vec![value as f32; n * h * w]),
                None => unreachable!("every wanted plane is evaluated"),
            })
            .collect();
        label_planes::give_back_values(computed);
        planes
    } else if plan.planes.is_empty() {
        Vec::new()
    } else {
        let provided = (0..module.len()).map(|_| None).collect();
        let computed = reference::run_nodes(module, curves, batch, provided, &plan.planes);
        plan.planes
            .iter()
            .map(|p| {
                let plane = computed.values[p.index()].as_ref().expect("every wanted plane is computed");
                Ok(PlaneData::Floats(values::<f32>(&plane.to_kind(Kind::Float))?))
            })
            .collect::<Result<_, LossError>>()?
    });
    let plane_widths: Vec<usize> = plan.planes.iter().map(|p| width(module.shape(*p), c)).collect();
    // Frames carry values (and gradients) between stages; pools keep their winners.
    let frame_len = |width: usize| n * width * pixels_per_image;
    let mut buffers = Buffers::default();
    buffers.frames = plan
        .frames
        .iter()
        .zip(&plan.zeroed_frames)
        .enumerate()
        .map(|(frame, (&width, &zeroed))| {
            let len = if plan.frame_used(frame) { frame_len(width) + ALIGN } else { 0 };
            let mut grads = take(if needs_backward { len } else { 0 });
            if zeroed && !plan.sparse_grads(frame) {
                zero(&mut grads);
            }
            (take(len), grads)
        })
        .collect();
    let frames: Vec<Frame> = buffers
        .frames
        .iter_mut()
        .zip(&plan.frames)
        .map(|((values, grads), &width)| Frame { values: aligned(values), grads: aligned(grads), width })
        .collect();
    // Winners only matter for a backward sweep's scatter (and for the counts a pooling
    // computes itself); a 3×3 window's are byte codes.
    let coded = |pool: &plan::PoolStage| needs_backward && pool.radius == 1 && pool.counts.is_empty();
    buffers.winners = plan
        .pools
        .iter()
        .map(|pool| {
            let len = frame_len(plan.frames[pool.output]);
            if coded(pool) {
                (take(0), take(len))
            } else {
                (take(if needs_backward || !pool.counts.is_empty() { len } else { 0 }), take(0))
            }
        })
        .collect();
    let tiles_per_image = pixels_per_image.div_ceil(TILE);
    // Per frame whose gradient only masked scatters write: which tiles' rows they wrote.
    let mut touched: Vec<Vec<u8>> = (0..plan.frames.len())
        .map(|frame| {
            let used = needs_backward && plan.sparse_grads(frame);
            if used {
                vec![0u8; n * plan.frames[frame] * tiles_per_image]
            } else {
                Vec::new()
            }
        })
        .collect();
    let touched_rows: Vec<SharedBytes> =
        touched.iter_mut().map(|marks| SharedBytes { data: marks.as_mut_ptr(), len: marks.len() }).collect();
    // The mask of a pooling, when its label plane is on bytes.
    let mask_of = |pool: &plan::PoolStage| {
        pool.mask.and_then(|plane| match &plane_values[plane] {
            PlaneData::Bytes(data) => Some(pool::Mask { data, width: plane_widths[plane] }),
            PlaneData::Floats(_) => None,
        })
    };
    let sweep = Sweep {
        plan,
        logits: logit_values,
        labels: &label_values,
        planes: &plane_values,
        plane_widths: &plane_widths,
        classes: c,
        pixels_per_image,
        tiles_per_image,
        stage: 0,
        frames: &frames,
        touched: &touched_rows,
        ignore,
    };
    let runs = tile_runs(n * tiles_per_image, threads());
    phases.mark("label planes and scratch");
    let mut counts: Vec<Vec<f64>> = plan.count_widths.iter().map(|w| vec![0.0; (*w).max(1)]).collect();
    for stage in 0..plan.stages {
        // Poolings whose output this stage reads, from frames complete by now.
        for (pool, (winners, codes)) in
            plan.pools.iter().zip(buffers.winners.iter_mut()).filter(|(p, _)| p.stage == stage)
        {
            let (input, output) = (frames[pool.input].values, frames[pool.output].values);
            // SAFETY: between sweeps nothing else touches the frames; input and output are
            // distinct buffers (an output frame is always a buffer of its own).
            let (input, output) = unsafe { (&*input.row(0, input.len), output.row(0, output.len)) };
            let frame_width = plan.frames[pool.output];
            if let (false, Some(mask)) = (pool.counts.is_empty(), mask_of(pool)) {
                // The pooling computes its counts itself; the output is never written.
                let sums = masked_pooled_sums(input, winners, (h, w), pool.radius, pool.erode, mask, frame_width);
                for &slot in &pool.counts {
                    for (plane, sum) in sums.iter().enumerate() {
                        counts[slot][plane % frame_width] += sum;
                    }
                }
            } else if coded(pool) {
                window3_codes(input, output, codes, (h, w), pool.erode);
            } else if needs_backward {
                let mask = mask_of(pool).map(|mask| (mask, frame_width));
                window_winners(input, winners, output, (h, w), pool.radius, pool.erode, mask);
            } else {
                pool::pool(input, output, (h, w), pool.radius, pool.erode);
            }
            phases.mark(format!("pooling (winner search) {stage}"));
        }
        if !plan.sweeps(stage) {
            continue;
        }
        let sweep = Sweep { stage, ..sweep };
        let locals = run_parts(runs.clone(), |run| {
            let mut buffers = TileBuffers::new(plan);
            forward_run(&sweep, run, &mut buffers);
            (buffers.saw_non_finite(), buffers.counts)
        });
        // The first sweep's softmax read every logit: the input checks left their
        // finiteness to it.
        if locals.iter().any(|(non_finite, _)| *non_finite) {
            return Err(crate::inputs::non_finite(logits).into());
        }
        for (_, local) in locals {
            for (total, part) in counts.iter_mut().zip(local) {
                for (t, p) in total.iter_mut().zip(part) {
                    *t += p;
                }
            }
        }
        phases.mark(format!("forward sweep {stage}"));
    }
    // Counts become leaves; the small graph above them runs with autograd.
    let kind = logits.kind();
    let count_leaves: Vec<Tensor> = plan
        .counts
        .iter()
        .zip(&counts)
        .map(|(handle, values)| {
            let t = Tensor::from_slice(values).to_kind(kind);
            let t = if matches!(module.shape(*handle), Shape::Scalar) { t.reshape([]) } else { t };
            t.set_requires_grad(needs_backward)
        })
        .collect();
    for (handle, leaf) in plan.counts.iter().zip(&count_leaves) {
        provided[handle.index()] = Some(leaf.shallow_clone());
    }
    let mut wanted = vec![module.root];
    wanted.extend(module.reports.iter().map(|r| r.value));
    let result = reference::finish_surrogate(module, reference::run_nodes(module, curves, batch, provided, &wanted));
    if !needs_backward || !result.loss.requires_grad() {
        phases.mark("counts to loss (libtorch)");
        phases.report(&module.name);
        return Ok(Surrogate { loss: result.loss.detach(), ..result });
    }
    phases.mark("counts to loss (libtorch, with autograd)");
    // A count the loss does not use (a `let` left unused) gets no gradient at all: zeros.
    let count_grads: Vec<Vec<f32>> = Tensor::run_backward(&[&result.loss], &count_leaves, false, false)
        .iter()
        .zip(&counts)
        .map(|(g, sums)| if g.defined() { values::<f32>(&g.to_kind(Kind::Float)) } else { Ok(vec![0.0; sums.len()]) })
        .collect::<Result<_, LossError>>()?;
    // Every element is written by exactly one tile (zeroed, then accumulated).
    let gradient = Tensor::empty([n as i64, c as i64, h as i64, w as i64], (Kind::Float, tch::Device::Cpu));
    let gradient_planes = SharedPlanes { data: gradient.data_ptr() as *mut f32, len: elements };
    for stage in (0..plan.stages).rev() {
        if plan.sweeps(stage) {
            let sweep = Sweep { stage, ..sweep };
            run_parts(runs.clone(), |run| {
                let mut buffers = TileBuffers::new(plan);
                backward_run(&sweep, run, &mut buffers, &count_grads, gradient_planes);
            });
            phases.mark(format!("backward sweep {stage}"));
        }
        // Every reader of these poolings' outputs is done: send their gradients back to the
        // winners, in the input frames (read by an earlier stage, which runs next).
        for (pool, (winners, codes)) in plan.pools.iter().zip(&buffers.winners).filter(|(p, _)| p.stage == stage) {
            let (from, to) = (frames[pool.output].grads, frames[pool.input].grads);
            // SAFETY: two distinct frames' gradient buffers, not used by anything else now.
            let (from, to) = unsafe { (from.row(0, from.len), to.row(0, to.len)) };
            match (pool.counts.is_empty(), mask_of(pool)) {
                (false, Some(mask)) => {
                    // The counts' gradients, times the mask, go straight to the winners.
                    let frame_width = plan.frames[pool.output];
                    let upstream: Vec<f32> =
                        (0..frame_width).map(|k| pool.counts.iter().map(|&slot| count_grads[slot][k]).sum()).collect();
                    // SAFETY: the marks of the input frame, used by nothing else now.
                    let marks = touched_rows[pool.input];
                    let marks =
                        (marks.len > 0).then(|| unsafe { std::slice::from_raw_parts_mut(marks.data, marks.len) });
                    masked_scatter(
                        &upstream,
                        winners,
                        mask,
                        frame_width,
                        to,
                        pixels_per_image,
                        marks.map(|m| (m, TILE)),
                    );
                }
                _ if coded(pool) => scatter3(from, codes, to, (h, w)),
                _ => scatter_planes(from, winners, to, pixels_per_image),
            }
            phases.mark(format!("pooling gradient (scatter) {stage}"));
        }
    }
    drop(logits_contiguous);
    drop(buffers);
    // The loss with exactly the kernel's value and gradient, as a libtorch autograd function.
    let loss = crate::autograd::linearized(logits, &result.loss.detach(), &gradient.to_kind(kind))?;
    phases.mark("autograd node");
    phases.report(&module.name);
    Ok(Surrogate { loss, ..result })
}
