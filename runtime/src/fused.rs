//! The fused CPU kernel: a relaxed module's pixel-level work done in one pass per pixel.
//!
//! The reference path (op by op in libtorch) materializes every intermediate `[N,C,H,W]`
//! tensor and records it for autograd. Here, the pixel-level nodes that feed the counts
//! become a small per-pixel program over the pixel's classes:
//! 1. forward sweep: softmax, curves, products, ... accumulated straight into the counts
//!    (float64), the softmax kept for the second sweep;
//! 2. the few per-class numbers above the counts run in libtorch with autograd, giving
//!    `∂loss/∂count`;
//! 3. backward sweep: per pixel, reverse mode through the same program to `∂loss/∂logits`.
//!
//! The result enters autograd by linearization (tch has no custom autograd function):
//! `loss = Σ logits·G + (value − Σ logits·G).detach()` has value `value` and gradient `G`.
//!
//! What it covers: softmax, labels, valid, constants, curves, `+ − ×`, negation, `any`,
//! class slices, counts and the cross-entropy sum; label-only parts (label boundaries,
//! bands) are computed once by libtorch and read as planes. A module with pooling on
//! predictions (erode/dilate of `P`, as in BF1) returns `None` from [`FusedPlan::new`] and
//! uses the reference path. Tests prove both paths equal in values and gradients.

use crate::tch_backend::{self, Surrogate, IGNORE_LABEL};
use compiler::curve::{Curve, Segment, SQRT_FLOOR};
use compiler::ir::{Handle, Module, Node, Shape};
use tch::{Kind, Tensor};

#[derive(Clone, Debug)]
enum Op {
    Softmax,
    Labels,
    Valid,
    Const(f32),
    Plane(usize),
    Curve { input: usize, segments: Vec<FastSegment> },
    Add(usize, usize),
    Sub(usize, usize),
    Mul(usize, usize),
    Neg(usize),
    AnyClass(usize),
    Slice { input: usize, start: usize },
    Count { input: usize, count: usize },
    NllSum { count: usize },
}

#[derive(Clone, Debug)]
struct Step {
    op: Op,
    width: usize,
    offset: usize,
}

/// The per-pixel program of a module for a given number of classes.
pub struct FusedPlan {
    steps: Vec<Step>,
    /// Label-only nodes evaluated by libtorch and read per pixel.
    planes: Vec<Handle>,
    /// Accumulator nodes the program computes, in count-slot order.
    counts: Vec<Handle>,
    count_widths: Vec<usize>,
    scratch: usize,
    classes: usize,
}

fn width(shape: Shape, classes: usize) -> usize {
    match shape {
        Shape::Pixels | Shape::Scalar => 1,
        Shape::ClassPixels(range) | Shape::Classes(range) => range.len(classes).unwrap_or(0),
    }
}

impl FusedPlan {
    /// Build the program, or `None` when the module needs an operation the kernel lacks.
    pub fn new(module: &Module, curves: &[Curve], classes: usize) -> Option<FusedPlan> {
        let n = module.len();
        // Which nodes depend on the predictions.
        let mut on_pred = vec![false; n];
        for handle in module.handles() {
            let node = module.node(handle);
            on_pred[handle.index()] =
                matches!(node, Node::Softmax | Node::NllSum) || node.operands().iter().any(|o| on_pred[o.index()]);
        }
        let mut plan = FusedPlan {
            steps: Vec::new(),
            planes: Vec::new(),
            counts: Vec::new(),
            count_widths: Vec::new(),
            scratch: 0,
            classes,
        };
        let mut step_of: Vec<Option<usize>> = vec![None; n];
        for handle in module.handles() {
            let node = module.node(handle);
            let accumulates_pred = match node {
                Node::Count(input) => on_pred[input.index()],
                Node::NllSum => true,
                _ => false,
            };
            if !accumulates_pred {
                continue;
            }
            plan.lower(module, curves, handle, &on_pred, &mut step_of)?;
        }
        Some(plan)
    }

    fn push(&mut self, op: Op, width: usize) -> usize {
        self.steps.push(Step { op, width, offset: self.scratch });
        self.scratch += width;
        self.steps.len() - 1
    }

    /// Add the step for `handle` (and its operands) unless already there.
    fn lower(
        &mut self,
        module: &Module,
        curves: &[Curve],
        handle: Handle,
        on_pred: &[bool],
        step_of: &mut Vec<Option<usize>>,
    ) -> Option<usize> {
        if let Some(step) = step_of[handle.index()] {
            return Some(step);
        }
        let node = module.node(handle);
        let w = width(module.shape(handle), self.classes);
        let step = if !on_pred[handle.index()] {
            match node {
                Node::Labels => self.push(Op::Labels, w),
                Node::Valid => self.push(Op::Valid, 1),
                Node::Const(value) => self.push(Op::Const(value.get() as f32), 1),
                _ => {
                    self.planes.push(handle);
                    self.push(Op::Plane(self.planes.len() - 1), w)
                }
            }
        } else {
            let mut operand = |this: &mut Self, h: &Handle| this.lower(module, curves, *h, on_pred, step_of);
            let op = match node {
                Node::Softmax => Op::Softmax,
                Node::Curve { input, curve } => {
                    Op::Curve {
                        input: operand(self, input)?,
                        segments: curves[curve.0 as usize].segments().iter().map(FastSegment::new).collect(),
                    }
                }
                Node::Add(a, b) => Op::Add(operand(self, a)?, operand(self, b)?),
                Node::Sub(a, b) => Op::Sub(operand(self, a)?, operand(self, b)?),
                Node::Mul(a, b) => Op::Mul(operand(self, a)?, operand(self, b)?),
                Node::Neg(a) => Op::Neg(operand(self, a)?),
                Node::AnyClass(a) => Op::AnyClass(operand(self, a)?),
                Node::Slice { input, start, .. } => Op::Slice { input: operand(self, input)?, start: *start },
                Node::Count(input) => {
                    let input = operand(self, input)?;
                    self.counts.push(handle);
                    self.count_widths.push(w);
                    Op::Count { input, count: self.counts.len() - 1 }
                }
                Node::NllSum => {
                    self.counts.push(handle);
                    self.count_widths.push(1);
                    Op::NllSum { count: self.counts.len() - 1 }
                }
                // Pooling on predictions needs neighbours; divisions and reductions do not
                // occur at pixel level. These modules use the reference path.
                Node::Erode { .. }
                | Node::Dilate { .. }
                | Node::Div { .. }
                | Node::Compare { .. }
                | Node::Mean { .. }
                | Node::Sum { .. }
                | Node::Term { .. }
                | Node::Labels
                | Node::Valid
                | Node::Const(_)
                | Node::Pred
                | Node::CurveTag { .. }
                | Node::Scope { .. }
                | Node::And(..)
                | Node::Or(..)
                | Node::Xor(..)
                | Node::Not(..) => return None,
            };
            self.push(op, if matches!(node, Node::Count(_) | Node::NllSum) { 0 } else { w })
        };
        step_of[handle.index()] = Some(step);
        Some(step)
    }
}

/// One curve piece with its coefficients folded to float32 for the per-pixel loop.
#[derive(Clone, Copy, Debug)]
struct FastSegment {
    start_x: f32,
    end_x: f32,
    inv_width: f32,
    degenerate: bool,
    linear: bool,
    m: f32,
    slope: f32,
    m2: f32,
    inv_2m1: f32,
    y0: f32,
    y1: f32,
    y2: f32,
}

impl FastSegment {
    fn new(segment: &Segment) -> FastSegment {
        let width = segment.width();
        let m = segment.m;
        FastSegment {
            start_x: segment.start[0] as f32,
            end_x: segment.end[0] as f32,
            inv_width: if width > 0.0 { (1.0 / width) as f32 } else { 0.0 },
            degenerate: width <= 0.0,
            linear: segment.linear,
            m: m as f32,
            slope: (1.0 - 2.0 * m) as f32,
            m2: (m * m) as f32,
            inv_2m1: if segment.linear { 0.0 } else { (1.0 / (2.0 * m - 1.0)) as f32 },
            y0: segment.start[1] as f32,
            y1: segment.middle[1] as f32,
            y2: segment.end[1] as f32,
        }
    }
}

/// `g(x)` and `dg/dx` with the reference path's clamping, so gradients agree.
#[inline]
fn curve_value(x: f32, segments: &[FastSegment]) -> (f32, f32) {
    let x_in_range = (0.0..=1.0).contains(&x);
    let x = x.clamp(0.0, 1.0);
    let mut segment = &segments[segments.len() - 1];
    for candidate in segments {
        if x <= candidate.end_x {
            segment = candidate;
            break;
        }
    }
    if segment.degenerate {
        return (segment.y2, 0.0);
    }
    let raw = (x - segment.start_x) * segment.inv_width;
    let x_norm = raw.clamp(0.0, 1.0);
    let mut dt_dxn = if (0.0..=1.0).contains(&raw) { 1.0 } else { 0.0 };
    let t = if segment.linear {
        x_norm
    } else {
        let disc_raw = x_norm * segment.slope + segment.m2;
        let floor = SQRT_FLOOR as f32;
        let (disc, ddisc) = if disc_raw >= floor { (disc_raw, segment.slope) } else { (floor, 0.0) };
        let root = disc.sqrt();
        let t_raw = (segment.m - root) * segment.inv_2m1;
        let dt = if (0.0..=1.0).contains(&t_raw) { -0.5 / root * ddisc * segment.inv_2m1 } else { 0.0 };
        dt_dxn *= dt;
        t_raw.clamp(0.0, 1.0)
    };
    let s = 1.0 - t;
    let y = s * s * segment.y0 + 2.0 * t * s * segment.y1 + t * t * segment.y2;
    let dy_dt = -2.0 * s * segment.y0 + 2.0 * (1.0 - 2.0 * t) * segment.y1 + 2.0 * t * segment.y2;
    let gradient = if x_in_range { dy_dt * dt_dxn * segment.inv_width } else { 0.0 };
    (y, gradient)
}

/// Inputs of one sweep, shared by the threads.
struct Sweep<'a> {
    plan: &'a FusedPlan,
    logits: &'a [f32],
    labels: &'a [i64],
    planes: &'a [Vec<f32>],
    plane_widths: &'a [usize],
    classes: usize,
    pixels_per_image: usize,
}

impl Sweep<'_> {
    /// Compute every step for one pixel. With `stored_softmax`, the softmax is copied rather
    /// than recomputed; with `derivatives`, curve slopes are recorded for the backward sweep.
    fn forward_pixel(
        &self,
        pixel: usize,
        values: &mut [f32],
        softmax_out: &mut [f32],
        counts: &mut [Vec<f64>],
        stored_softmax: Option<&[f32]>,
        mut derivatives: Option<&mut [f32]>,
    ) {
        let (image, within) = (pixel / self.pixels_per_image, pixel % self.pixels_per_image);
        let c = self.classes;
        let label = self.labels[pixel];
        for step in &self.plan.steps {
            let (offset, w) = (step.offset, step.width);
            match &step.op {
                Op::Softmax if stored_softmax.is_some() => {
                    values[offset..offset + c].copy_from_slice(stored_softmax.unwrap_or_default());
                }
                Op::Softmax => {
                    let base = image * c * self.pixels_per_image + within;
                    let mut max = f32::NEG_INFINITY;
                    for k in 0..c {
                        max = max.max(self.logits[base + k * self.pixels_per_image]);
                    }
                    let mut sum = 0.0f32;
                    for k in 0..c {
                        let e = (self.logits[base + k * self.pixels_per_image] - max).exp();
                        values[offset + k] = e;
                        sum += e;
                    }
                    for k in 0..c {
                        values[offset + k] /= sum;
                    }
                    softmax_out.copy_from_slice(&values[offset..offset + c]);
                }
                Op::Labels => {
                    values[offset..offset + w].fill(0.0);
                    if (0..w as i64).contains(&label) {
                        values[offset + label as usize] = 1.0;
                    }
                }
                Op::Valid => values[offset] = if label != IGNORE_LABEL { 1.0 } else { 0.0 },
                Op::Const(value) => values[offset] = *value,
                Op::Plane(index) => {
                    let plane_w = self.plane_widths[*index];
                    let base = image * plane_w * self.pixels_per_image + within;
                    for k in 0..w {
                        values[offset + k] = self.planes[*index][base + k * self.pixels_per_image];
                    }
                }
                Op::Curve { input, segments } => {
                    let source = self.plan.steps[*input].offset;
                    match derivatives.as_deref_mut() {
                        Some(slopes) => {
                            for k in 0..w {
                                let (y, dy) = curve_value(values[source + k], segments);
                                values[offset + k] = y;
                                slopes[offset + k] = dy;
                            }
                        }
                        None => {
                            for k in 0..w {
                                values[offset + k] = curve_value(values[source + k], segments).0;
                            }
                        }
                    }
                }
                Op::Add(a, b) => binary(values, &self.plan.steps[*a], &self.plan.steps[*b], offset, w, |x, y| x + y),
                Op::Sub(a, b) => binary(values, &self.plan.steps[*a], &self.plan.steps[*b], offset, w, |x, y| x - y),
                Op::Mul(a, b) => binary(values, &self.plan.steps[*a], &self.plan.steps[*b], offset, w, |x, y| x * y),
                Op::Neg(a) => {
                    let source = self.plan.steps[*a].offset;
                    for k in 0..w {
                        values[offset + k] = -values[source + k];
                    }
                }
                Op::AnyClass(a) => {
                    let sa = &self.plan.steps[*a];
                    values[offset] = values[sa.offset..sa.offset + sa.width].iter().copied().fold(f32::NEG_INFINITY, f32::max);
                }
                Op::Slice { input, start } => {
                    let source = self.plan.steps[*input].offset + start;
                    values.copy_within(source..source + w, offset);
                }
                Op::Count { input, count } => {
                    let si = &self.plan.steps[*input];
                    let target = &mut counts[*count];
                    if target.len() == 1 {
                        let total: f32 = values[si.offset..si.offset + si.width].iter().sum();
                        target[0] += total as f64;
                    } else {
                        for k in 0..target.len() {
                            target[k] += values[si.offset + if si.width == 1 { 0 } else { k }] as f64;
                        }
                    }
                }
                Op::NllSum { count } => {
                    if label != IGNORE_LABEL {
                        let base = image * c * self.pixels_per_image + within;
                        let mut max = f32::NEG_INFINITY;
                        for k in 0..c {
                            max = max.max(self.logits[base + k * self.pixels_per_image]);
                        }
                        let sum: f32 = (0..c).map(|k| (self.logits[base + k * self.pixels_per_image] - max).exp()).sum();
                        let log_probability = self.logits[base + label as usize * self.pixels_per_image] - max - sum.ln();
                        counts[*count][0] -= log_probability as f64;
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn backward_pixel(
        &self,
        pixel: usize,
        softmax: &[f32],
        count_grads: &[Vec<f32>],
        values: &mut [f32],
        grads: &mut [f32],
        slopes: &mut [f32],
        logit_grads: &mut [f32],
        scratch_counts: &mut [Vec<f64>],
        scratch_softmax: &mut [f32],
    ) {
        // Recompute this pixel's values from the stored softmax, recording curve slopes.
        self.forward_pixel(pixel, values, scratch_softmax, scratch_counts, Some(softmax), Some(slopes));
        grads.fill(0.0);
        let c = self.classes;
        let label = self.labels[pixel];
        for step in self.plan.steps.iter().rev() {
            let (offset, w) = (step.offset, step.width);
            match &step.op {
                Op::Count { input, count } => {
                    let si = &self.plan.steps[*input];
                    let upstream = &count_grads[*count];
                    for k in 0..si.width {
                        grads[si.offset + k] += if upstream.len() == 1 { upstream[0] } else { upstream[k] };
                    }
                }
                Op::NllSum { count } => {
                    if label != IGNORE_LABEL {
                        let g = count_grads[*count][0];
                        for k in 0..c {
                            logit_grads[k] += g * (softmax[k] - if k as i64 == label { 1.0 } else { 0.0 });
                        }
                    }
                }
                Op::Curve { input, .. } => {
                    let source = self.plan.steps[*input].offset;
                    for k in 0..w {
                        grads[source + k] += grads[offset + k] * slopes[offset + k];
                    }
                }
                Op::Add(a, b) | Op::Sub(a, b) | Op::Mul(a, b) => {
                    let (sa, sb) = (self.plan.steps[*a].clone(), self.plan.steps[*b].clone());
                    for k in 0..w {
                        let g = grads[offset + k];
                        let ia = sa.offset + if sa.width == 1 { 0 } else { k };
                        let ib = sb.offset + if sb.width == 1 { 0 } else { k };
                        let (ga, gb) = match step.op {
                            Op::Add(..) => (g, g),
                            Op::Sub(..) => (g, -g),
                            _ => (g * values[ib], g * values[ia]),
                        };
                        grads[ia] += ga;
                        grads[ib] += gb;
                    }
                }
                Op::Neg(a) => {
                    let source = self.plan.steps[*a].offset;
                    for k in 0..w {
                        grads[source + k] -= grads[offset + k];
                    }
                }
                Op::AnyClass(a) => {
                    // Like torch.amax: the gradient is shared evenly by the maxima.
                    let sa = &self.plan.steps[*a];
                    let max = values[offset];
                    let ties = values[sa.offset..sa.offset + sa.width].iter().filter(|v| **v == max).count().max(1);
                    let g = grads[offset] / ties as f32;
                    for k in 0..sa.width {
                        if values[sa.offset + k] == max {
                            grads[sa.offset + k] += g;
                        }
                    }
                }
                Op::Slice { input, start } => {
                    let source = self.plan.steps[*input].offset + start;
                    for k in 0..w {
                        grads[source + k] += grads[offset + k];
                    }
                }
                Op::Softmax => {
                    let dot: f32 = (0..c).map(|k| grads[offset + k] * softmax[k]).sum();
                    for k in 0..c {
                        logit_grads[k] += softmax[k] * (grads[offset + k] - dot);
                    }
                }
                Op::Labels | Op::Valid | Op::Const(_) | Op::Plane(_) => {}
            }
        }
    }
}

/// `out = a op b` with broadcasting of one-wide operands, as a tight loop per case.
#[inline]
fn binary(values: &mut [f32], a: &Step, b: &Step, offset: usize, width: usize, f: impl Fn(f32, f32) -> f32) {
    match (a.width == 1, b.width == 1) {
        (false, false) => {
            for k in 0..width {
                values[offset + k] = f(values[a.offset + k], values[b.offset + k]);
            }
        }
        (true, false) => {
            let x = values[a.offset];
            for k in 0..width {
                values[offset + k] = f(x, values[b.offset + k]);
            }
        }
        (false, true) => {
            let y = values[b.offset];
            for k in 0..width {
                values[offset + k] = f(values[a.offset + k], y);
            }
        }
        (true, true) => values[offset] = f(values[a.offset], values[b.offset]),
    }
}

fn to_vec_f32(tensor: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(tensor.to_kind(Kind::Float).contiguous().reshape([-1])).unwrap_or_default()
}

fn threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(16)
}

/// The surrogate through the fused kernel. `logits` must be float32 on the CPU.
pub fn surrogate(module: &Module, curves: &[Curve], plan: &FusedPlan, logits: &Tensor, labels: &Tensor) -> Surrogate {
    let size = logits.size();
    let (n, c, h, w) = (size[0] as usize, size[1] as usize, size[2] as usize, size[3] as usize);
    let pixels_per_image = h * w;
    let pixels = n * pixels_per_image;
    let logit_values = to_vec_f32(&logits.detach());
    let label_values = Vec::<i64>::try_from(labels.contiguous().reshape([-1])).unwrap_or_default();
    // Label-only planes, computed once by libtorch.
    let plane_values = if plan.planes.is_empty() {
        Vec::new()
    } else {
        let provided = (0..module.len()).map(|_| None).collect();
        let computed = tch_backend::run_nodes(module, curves, logits, labels, provided, &plan.planes);
        plan.planes.iter().map(|p| to_vec_f32(computed.values[p.index()].as_ref().expect("plane computed"))).collect()
    };
    let plane_widths: Vec<usize> = plan.planes.iter().map(|p| width(module.shape(*p), c)).collect();
    let sweep = Sweep {
        plan,
        logits: &logit_values,
        labels: &label_values,
        planes: &plane_values,
        plane_widths: &plane_widths,
        classes: c,
        pixels_per_image,
    };
    let workers = threads();
    let chunk = pixels.div_ceil(workers).max(1);
    let mut softmax = vec![0.0f32; pixels * c];
    let mut counts: Vec<Vec<f64>> = plan.count_widths.iter().map(|w| vec![0.0; (*w).max(1)]).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = softmax
            .chunks_mut(chunk * c)
            .enumerate()
            .map(|(i, softmax_chunk)| {
                let sweep = &sweep;
                scope.spawn(move || {
                    let mut values = vec![0.0f32; plan.scratch];
                    let mut local: Vec<Vec<f64>> = plan.count_widths.iter().map(|w| vec![0.0; (*w).max(1)]).collect();
                    let mut discard = vec![0.0f32; c];
                    for (j, pixel_softmax) in softmax_chunk.chunks_mut(c).enumerate() {
                        let pixel = i * chunk + j;
                        let uses_softmax = plan.steps.iter().any(|s| matches!(s.op, Op::Softmax));
                        let target = if uses_softmax { pixel_softmax } else { &mut discard[..] };
                        sweep.forward_pixel(pixel, &mut values, target, &mut local, None, None);
                    }
                    local
                })
            })
            .collect();
        for handle in handles {
            let local = handle.join().expect("fused forward worker");
            for (total, part) in counts.iter_mut().zip(local) {
                for (t, p) in total.iter_mut().zip(part) {
                    *t += p;
                }
            }
        }
    });
    // Counts become leaves; the small graph above them runs with autograd.
    let kind = logits.kind();
    let count_leaves: Vec<Tensor> = plan
        .counts
        .iter()
        .zip(&counts)
        .map(|(handle, values)| {
            let t = Tensor::from_slice(values).to_kind(kind);
            let t = if matches!(module.shape(*handle), Shape::Scalar) { t.reshape([]) } else { t };
            t.set_requires_grad(logits.requires_grad())
        })
        .collect();
    let mut provided: Vec<Option<Tensor>> = (0..module.len()).map(|_| None).collect();
    for (handle, leaf) in plan.counts.iter().zip(&count_leaves) {
        provided[handle.index()] = Some(leaf.shallow_clone());
    }
    let mut wanted = vec![module.root];
    wanted.extend(module.reports.iter().map(|r| r.value));
    let result = tch_backend::finish_surrogate(
        module,
        tch_backend::run_nodes(module, curves, logits, labels, provided, &wanted),
    );
    if !logits.requires_grad() || !result.loss.requires_grad() {
        return Surrogate { loss: result.loss.detach(), ..result };
    }
    let count_grads: Vec<Vec<f32>> = Tensor::run_backward(&[&result.loss], &count_leaves, false, false)
        .iter()
        .map(to_vec_f32)
        .collect();
    let mut logit_grads_pixel_major = vec![0.0f32; pixels * c];
    std::thread::scope(|scope| {
        for (i, grad_chunk) in logit_grads_pixel_major.chunks_mut(chunk * c).enumerate() {
            let (sweep, softmax, count_grads) = (&sweep, &softmax, &count_grads);
            scope.spawn(move || {
                let mut values = vec![0.0f32; plan.scratch];
                let mut grads = vec![0.0f32; plan.scratch];
                let mut slopes = vec![0.0f32; plan.scratch];
                let mut scratch_counts: Vec<Vec<f64>> = plan.count_widths.iter().map(|w| vec![0.0; (*w).max(1)]).collect();
                let mut scratch_softmax = vec![0.0f32; c];
                for (j, pixel_grads) in grad_chunk.chunks_mut(c).enumerate() {
                    let pixel = i * chunk + j;
                    sweep.backward_pixel(
                        pixel,
                        &softmax[pixel * c..(pixel + 1) * c],
                        count_grads,
                        &mut values,
                        &mut grads,
                        &mut slopes,
                        pixel_grads,
                        &mut scratch_counts,
                        &mut scratch_softmax,
                    );
                }
            });
        }
    });
    // Pixel-major [N*H*W, C] back to the logits' [N, C, H, W].
    let gradient = Tensor::from_slice(&logit_grads_pixel_major)
        .reshape([n as i64, (h * w) as i64, c as i64])
        .permute([0, 2, 1])
        .reshape([n as i64, c as i64, h as i64, w as i64])
        .to_kind(kind);
    let linear = (logits * &gradient).sum(kind);
    let loss = &linear + (result.loss.detach() - linear.detach());
    Surrogate { loss, ..result }
}

/// Whether the fused kernel can run these inputs at all (CPU, float32).
pub fn applicable(logits: &Tensor) -> bool {
    logits.device() == tch::Device::Cpu && logits.kind() == Kind::Float
}
