//! The fused CPU kernel: a relaxed module's pixel-level work done in a few passes over the
//! pixels instead of one libtorch operation per node.
//!
//! The reference path (op by op in libtorch) materializes every intermediate `[N,C,H,W]`
//! tensor and records it for autograd. Here, the pixel-level nodes that feed the counts
//! become a small program over a pixel's classes, run on tiles of 64 pixels whose values lie
//! class-major (`[class][pixel]`) so each step is a long contiguous loop:
//! 1. forward sweep: softmax, curves, products, ... accumulated straight into the counts
//!    (float64); the softmax and each curve's slopes are kept for the backward sweep;
//! 2. the few per-class numbers above the counts run in libtorch with autograd, giving
//!    `∂loss/∂count`;
//! 3. backward sweep: per pixel, reverse mode through the same program to `∂loss/∂logits`.
//!
//! **Stages.** Pooling of prediction-dependent sets (BF1's `boundary(P)` erodes `P`, then
//! dilates the soft boundary) needs neighbours, so such a module runs in several sweeps
//! (stages): a value a later stage reads goes to a *frame* (a full `[N, w, H, W]` plane),
//! and between stages the CPU winner search pools a frame into another, keeping each
//! output's winner (as `max_pool2d` picks it). The backward runs the stages in reverse: each
//! stage's sweep adds the gradients of what it read into the frames' gradient planes, each
//! pooling scatters its output's gradient to the winners, and the first stage's sweep ends in
//! the softmax backward.
//!
//! The result enters autograd by linearization (tch has no custom autograd function):
//! `loss = Σ logits·G + (value − Σ logits·G).detach()` has value `value` and gradient `G`.
//!
//! What it covers: softmax, labels, valid, constants, curves, `+ − ×`, negation, `any`,
//! class slices, erosion and dilation, counts and the cross-entropy sum; label-only parts
//! (label boundaries, bands, their counts) are computed once, on bytes when
//! [`label_planes`] proves they fit, and read as planes. Tests prove the fused and reference
//! paths equal in values and gradients.
//!
//! Every hot loop is written to vectorize (contiguous rows, no branches, no aliasing between
//! the rows read and written) and compiled twice by [`with_best_simd!`]: for the baseline
//! target and for AVX2+FMA, chosen at run time.

use crate::label_planes;
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
    /// A value computed in an earlier stage or by a pooling between stages: read from a
    /// frame (a full plane), its gradient added back into the frame's gradient plane.
    Import(usize),
}

#[derive(Clone, Debug)]
struct Step {
    op: Op,
    width: usize,
    offset: usize,
    /// The sweep the step runs in (see [`FusedPlan`]'s stages).
    stage: usize,
    /// The frame this step's value is written to, when a later stage or a pooling reads it.
    export: Option<usize>,
}

/// A pooling between stages: the window minimum (`erode`) or maximum of an input frame into
/// an output frame, with each output's winner kept for the backward scatter.
#[derive(Clone, Copy, Debug)]
struct PoolStage {
    input: usize,
    output: usize,
    radius: usize,
    erode: bool,
    /// The stage whose sweep first reads the output.
    stage: usize,
}

/// The pixel program of a module for a given number of classes (run tile by tile).
pub struct FusedPlan {
    steps: Vec<Step>,
    /// Label-only nodes evaluated by libtorch and read per pixel.
    planes: Vec<Handle>,
    /// Accumulator nodes the program computes, in count-slot order.
    counts: Vec<Handle>,
    count_widths: Vec<usize>,
    /// Scratch rows of a tile: the largest stage's.
    scratch: usize,
    /// Scratch rows of each stage.
    stage_scratch: Vec<usize>,
    classes: usize,
    /// Per step: whether it depends on the predictions (gradients flow only into those).
    pred: Vec<bool>,
    /// Per step: whether the backward sweep needs its value (recomputed, or read back).
    back_value: Vec<bool>,
    /// Per curve step: its slot among the stored curves (slopes, and values when
    /// `back_value`), written by the forward sweep so the backward never re-evaluates curves.
    curve_slot: Vec<Option<usize>>,
    /// Sweeps: one for a module whose pixel part is per pixel; one more after each pooling of
    /// prediction-dependent sets (BF1's boundary of `P`, then its dilation).
    stages: usize,
    /// Width (classes) of each frame.
    frames: Vec<usize>,
    pools: Vec<PoolStage>,
}

/// Bookkeeping while a plan is built.
struct Lowering<'a> {
    module: &'a Module,
    curves: &'a [Curve],
    on_pred: Vec<bool>,
    /// Sweep of each prediction-dependent node (a pooling's is one more than its input's).
    node_stage: Vec<usize>,
    /// Step of `(node, stage)`.
    step_of: std::collections::HashMap<(usize, usize), usize>,
    /// Frame holding a node's value for later stages.
    frame_of: Vec<Option<usize>>,
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
        // Which nodes depend on the predictions, and in which sweep each is computed.
        let mut on_pred = vec![false; n];
        let mut node_stage = vec![0usize; n];
        for handle in module.handles() {
            let node = module.node(handle);
            let i = handle.index();
            on_pred[i] = matches!(node, Node::Softmax | Node::NllSum) || node.operands().iter().any(|o| on_pred[o.index()]);
            let operands_stage = node.operands().iter().filter(|o| on_pred[o.index()]).map(|o| node_stage[o.index()]).max();
            node_stage[i] = match node {
                Node::Erode { .. } | Node::Dilate { .. } if on_pred[i] => operands_stage.unwrap_or(0) + 1,
                _ => operands_stage.unwrap_or(0),
            };
        }
        let mut plan = FusedPlan {
            steps: Vec::new(),
            planes: Vec::new(),
            counts: Vec::new(),
            count_widths: Vec::new(),
            scratch: 0,
            stage_scratch: Vec::new(),
            classes,
            pred: Vec::new(),
            back_value: Vec::new(),
            curve_slot: Vec::new(),
            stages: 1,
            frames: Vec::new(),
            pools: Vec::new(),
        };
        let mut lowering = Lowering {
            module,
            curves,
            on_pred,
            node_stage,
            step_of: std::collections::HashMap::new(),
            frame_of: vec![None; n],
        };
        for handle in module.handles() {
            let node = module.node(handle);
            let accumulates_pred = match node {
                Node::Count(input) => lowering.on_pred[input.index()],
                Node::NllSum => true,
                _ => false,
            };
            if !accumulates_pred {
                continue;
            }
            let stage = lowering.node_stage[handle.index()];
            plan.lower(&mut lowering, handle, stage)?;
        }
        plan.stages = plan.steps.iter().map(|s| s.stage + 1).max().unwrap_or(1);
        plan.plan_backward();
        Some(plan)
    }

    /// Whether the program evaluates any curve. A module without curves (plain
    /// cross-entropy, say) is cheaper through libtorch's own fused kernels.
    pub fn has_curves(&self) -> bool {
        self.steps.iter().any(|step| matches!(step.op, Op::Curve { .. }))
    }

    /// Add a step; steps of one stage share a tile's scratch rows, stages reuse them.
    fn push(&mut self, op: Op, width: usize, stage: usize) -> usize {
        if self.stage_scratch.len() <= stage {
            self.stage_scratch.resize(stage + 1, 0);
        }
        self.steps.push(Step { op, width, offset: self.stage_scratch[stage], stage, export: None });
        self.stage_scratch[stage] += width;
        self.scratch = self.scratch.max(self.stage_scratch[stage]);
        self.steps.len() - 1
    }

    /// The frame that holds `handle`'s value for later stages: a pooling's output, or the
    /// export of the step that computes it in its own stage.
    fn frame(&mut self, lowering: &mut Lowering<'_>, handle: Handle) -> Option<usize> {
        if let Some(frame) = lowering.frame_of[handle.index()] {
            return Some(frame);
        }
        let module = lowering.module;
        let w = width(module.shape(handle), self.classes);
        let frame = match module.node(handle) {
            Node::Erode { input, radius } | Node::Dilate { input, radius } => {
                let input_frame = self.frame(lowering, *input)?;
                self.frames.push(w);
                let output = self.frames.len() - 1;
                self.pools.push(PoolStage {
                    input: input_frame,
                    output,
                    radius: *radius as usize,
                    erode: matches!(module.node(handle), Node::Erode { .. }),
                    stage: lowering.node_stage[handle.index()],
                });
                output
            }
            _ => {
                let step = self.lower(lowering, handle, lowering.node_stage[handle.index()])?;
                self.frames.push(w);
                let frame = self.frames.len() - 1;
                self.steps[step].export = Some(frame);
                frame
            }
        };
        lowering.frame_of[handle.index()] = Some(frame);
        Some(frame)
    }

    /// Add the step computing `handle` in sweep `stage` (and its operands) unless already there.
    fn lower(&mut self, lowering: &mut Lowering<'_>, handle: Handle, stage: usize) -> Option<usize> {
        if let Some(&step) = lowering.step_of.get(&(handle.index(), stage)) {
            return Some(step);
        }
        let module = lowering.module;
        let node = module.node(handle);
        let w = width(module.shape(handle), self.classes);
        let pooled = matches!(node, Node::Erode { .. } | Node::Dilate { .. });
        let step = if !lowering.on_pred[handle.index()] {
            match node {
                Node::Labels => self.push(Op::Labels, w, stage),
                Node::Valid => self.push(Op::Valid, 1, stage),
                Node::Const(value) => self.push(Op::Const(value.get() as f32), 1, stage),
                _ => {
                    let index = match self.planes.iter().position(|p| *p == handle) {
                        Some(index) => index,
                        None => {
                            self.planes.push(handle);
                            self.planes.len() - 1
                        }
                    };
                    self.push(Op::Plane(index), w, stage)
                }
            }
        } else if pooled || lowering.node_stage[handle.index()] < stage {
            // From an earlier sweep (or a pooling between sweeps): read from its frame.
            let frame = self.frame(lowering, handle)?;
            self.push(Op::Import(frame), w, stage)
        } else {
            let mut operand = |this: &mut Self, h: &Handle| this.lower(lowering, *h, stage);
            let op = match node {
                Node::Softmax => Op::Softmax,
                Node::Curve { input, curve } => Op::Curve {
                    input: operand(self, input)?,
                    segments: lowering.curves[curve.0 as usize].segments().iter().map(FastSegment::new).collect(),
                },
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
                    // The backward sweep's cross-entropy gradient reads the stored softmax.
                    if !self.steps.iter().any(|s| matches!(s.op, Op::Softmax)) {
                        self.push(Op::Softmax, self.classes, 0);
                    }
                    self.counts.push(handle);
                    self.count_widths.push(1);
                    Op::NllSum { count: self.counts.len() - 1 }
                }
                // Divisions and reductions do not occur at pixel level; exact nodes do not
                // occur in relaxed modules. Such modules use the reference path.
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
            let width = if matches!(node, Node::Count(_) | Node::NllSum) { 0 } else { w };
            self.push(op, width, stage)
        };
        lowering.step_of.insert((handle.index(), stage), step);
        Some(step)
    }

    /// Decide what the backward sweep reads: which steps' values it needs (operands of
    /// products, `any`, the softmax) and where curves keep their slopes.
    fn plan_backward(&mut self) {
        let len = self.steps.len();
        // One stage: curves keep their slopes (and values) for the backward sweep, which then
        // never re-evaluates a curve. Several stages already move several planes per pixel
        // between sweeps; there, re-evaluating curves costs less than storing and reading
        // back two more planes per curve.
        let store_curves = self.stages == 1;
        self.pred = self
            .steps
            .iter()
            .map(|step| !matches!(step.op, Op::Labels | Op::Valid | Op::Const(_) | Op::Plane(_)))
            .collect();
        let mut need = vec![false; len];
        for (index, step) in self.steps.iter().enumerate() {
            match step.op {
                Op::Mul(a, b) => {
                    need[b] |= self.pred[a];
                    need[a] |= self.pred[b];
                }
                Op::AnyClass(a) => {
                    need[a] = true;
                    need[index] = true;
                }
                Op::Softmax => need[index] = true,
                // Recomputed in the backward sweep when curves are not stored.
                Op::Curve { .. } if !store_curves => need[index] = true,
                _ => {}
            }
        }
        // A needed value needs its operands' values, except where it is read back.
        for index in (0..len).rev() {
            let read_back = matches!(self.steps[index].op, Op::Softmax)
                || (store_curves && matches!(self.steps[index].op, Op::Curve { .. }));
            if need[index] && !read_back {
                for operand in step_operands(&self.steps[index].op) {
                    need[operand] = true;
                }
            }
        }
        self.back_value = need;
        let mut slots = 0;
        self.curve_slot = self
            .steps
            .iter()
            .map(|step| {
                (store_curves && matches!(step.op, Op::Curve { .. })).then(|| {
                    slots += 1;
                    slots - 1
                })
            })
            .collect();
    }

    /// Stored curves: `(width, values too)` per slot.
    fn stored_curves(&self) -> Vec<(usize, bool)> {
        (0..self.steps.len())
            .filter(|&i| self.curve_slot[i].is_some())
            .map(|i| (self.steps[i].width, self.back_value[i]))
            .collect()
    }

}

/// The steps an operation reads.
fn step_operands(op: &Op) -> Vec<usize> {
    match *op {
        Op::Curve { input, .. } | Op::Neg(input) | Op::AnyClass(input) | Op::Slice { input, .. } => vec![input],
        Op::Count { input, .. } => vec![input],
        Op::Add(a, b) | Op::Sub(a, b) | Op::Mul(a, b) => vec![a, b],
        Op::Softmax | Op::Labels | Op::Valid | Op::Const(_) | Op::Plane(_) | Op::NllSum { .. } | Op::Import(_) => {
            Vec::new()
        }
    }
}

/// One curve piece with its coefficients folded to float32 for the per-pixel loop. The kind
/// of piece is a number too (1.0 or 0.0), so that lanes can blend whole pieces.
#[derive(Clone, Copy, Debug)]
struct FastSegment {
    start_x: f32,
    end_x: f32,
    inv_width: f32,
    m: f32,
    slope: f32,
    m2: f32,
    inv_2m1: f32,
    y0: f32,
    y1: f32,
    y2: f32,
    /// 1.0 for a straight piece (`t = x'`), else 0.0.
    linear: f32,
    /// 1.0 for a piece of zero width (the value `y2`, slope 0), else 0.0.
    degenerate: f32,
}

impl FastSegment {
    fn new(segment: &Segment) -> FastSegment {
        let width = segment.width();
        let m = segment.m;
        FastSegment {
            start_x: segment.start[0] as f32,
            end_x: segment.end[0] as f32,
            inv_width: if width > 0.0 { (1.0 / width) as f32 } else { 0.0 },
            m: m as f32,
            slope: (1.0 - 2.0 * m) as f32,
            m2: (m * m) as f32,
            inv_2m1: if segment.linear { 0.0 } else { (1.0 / (2.0 * m - 1.0)) as f32 },
            y0: segment.start[1] as f32,
            y1: segment.middle[1] as f32,
            y2: segment.end[1] as f32,
            linear: unit(segment.linear),
            degenerate: unit(width <= 0.0),
        }
    }

    /// Whether evaluating the piece needs the square root (a curved, non-degenerate piece).
    fn quadratic(&self) -> bool {
        self.linear == 0.0 && self.degenerate == 0.0
    }

    /// `a` where `take`, else `b`, field by field.
    #[inline(always)]
    fn select(take: bool, a: &FastSegment, b: &FastSegment) -> FastSegment {
        FastSegment {
            start_x: select(take, a.start_x, b.start_x),
            end_x: select(take, a.end_x, b.end_x),
            inv_width: select(take, a.inv_width, b.inv_width),
            m: select(take, a.m, b.m),
            slope: select(take, a.slope, b.slope),
            m2: select(take, a.m2, b.m2),
            inv_2m1: select(take, a.inv_2m1, b.inv_2m1),
            y0: select(take, a.y0, b.y0),
            y1: select(take, a.y1, b.y1),
            y2: select(take, a.y2, b.y2),
            linear: select(take, a.linear, b.linear),
            degenerate: select(take, a.degenerate, b.degenerate),
        }
    }

    /// `g(x)` and `dg/dx` of the piece with the reference path's clamping: `x` clamped to
    /// [0, 1] and normalised to the piece; `t = x'` on a straight piece, else the closed form
    /// with the square root's argument clamped; a degenerate piece is its end value with
    /// slope 0. Without `QUADRATIC` (every piece straight or degenerate) the square root is
    /// skipped. Branch-free, so loops over it vectorize.
    #[inline(always)]
    fn eval<const QUADRATIC: bool>(&self, x: f32) -> (f32, f32) {
        let x_in_range = unit((x >= 0.0) & (x <= 1.0));
        let raw = (clamp_unit(x) - self.start_x) * self.inv_width;
        let norm_in_range = unit((raw >= 0.0) & (raw <= 1.0));
        let (x_norm, passes) = (clamp_unit(raw), x_in_range * norm_in_range);
        let (t, dt) = if QUADRATIC {
            let disc_raw = x_norm * self.slope + self.m2;
            let floor = SQRT_FLOOR as f32;
            let disc_slope = self.slope * unit(disc_raw >= floor);
            let root = disc_raw.max(floor).sqrt();
            let t_raw = (self.m - root) * self.inv_2m1;
            let t_in_range = unit((t_raw >= 0.0) & (t_raw <= 1.0));
            let dt_dxn = t_in_range * (-0.5 / root * disc_slope * self.inv_2m1);
            let linear = self.linear > 0.5;
            (select(linear, x_norm, clamp_unit(t_raw)), select(linear, 1.0, dt_dxn))
        } else {
            (x_norm, 1.0)
        };
        let s = 1.0 - t;
        let y = s * s * self.y0 + 2.0 * t * s * self.y1 + t * t * self.y2;
        let dy_dt = -2.0 * s * self.y0 + 2.0 * (1.0 - 2.0 * t) * self.y1 + 2.0 * t * self.y2;
        let degenerate = self.degenerate > 0.5;
        (select(degenerate, self.y2, y), select(degenerate, 0.0, passes * dy_dt * dt * self.inv_width))
    }
}

/// 1.0 where `condition` holds, else 0.0 (a compare and a mask once vectorized).
#[inline(always)]
fn unit(condition: bool) -> f32 {
    f32::from(u8::from(condition))
}

/// `if take { a } else { b }` as bit operations, so that loops using it vectorize.
#[inline(always)]
fn select(take: bool, a: f32, b: f32) -> f32 {
    let mask = 0u32.wrapping_sub(u32::from(take));
    f32::from_bits((a.to_bits() & mask) | (b.to_bits() & !mask))
}

/// `x` clamped to [0, 1] for finite `x`, with min/max instructions.
#[inline(always)]
fn clamp_unit(x: f32) -> f32 {
    x.max(0.0).min(1.0)
}

/// `g` and `g'` over a row of values, piece by piece as the reference path's `where` chain
/// picks them: the first piece whose end is at least the clamped `x`. One or two pieces (the
/// usual counts) pick the piece per element and evaluate it once; more pieces evaluate each
/// and select. The square root is compiled in only when some piece needs it.
#[inline(always)]
fn curve_row(xs: &[f32], ys: &mut [f32], slopes: &mut [f32], segments: &[FastSegment]) {
    if segments.iter().any(FastSegment::quadratic) {
        curve_row_of::<true>(xs, ys, slopes, segments)
    } else {
        curve_row_of::<false>(xs, ys, slopes, segments)
    }
}

#[inline(always)]
fn curve_row_of<const QUADRATIC: bool>(xs: &[f32], ys: &mut [f32], slopes: &mut [f32], segments: &[FastSegment]) {
    let len = xs.len();
    let (ys, slopes) = (&mut ys[..len], &mut slopes[..len]);
    match segments {
        [only] => {
            for i in 0..len {
                (ys[i], slopes[i]) = only.eval::<QUADRATIC>(xs[i]);
            }
        }
        [first, second] => {
            for i in 0..len {
                let piece = FastSegment::select(clamp_unit(xs[i]) <= first.end_x, first, second);
                (ys[i], slopes[i]) = piece.eval::<QUADRATIC>(xs[i]);
            }
        }
        _ => {
            // The last piece everywhere, then each earlier piece where `x` is at most its end.
            let last = segments.len() - 1;
            for (index, segment) in segments.iter().enumerate().rev() {
                for i in 0..len {
                    let x = xs[i];
                    let (value, derivative) = segment.eval::<QUADRATIC>(x);
                    let take = index == last || clamp_unit(x) <= segment.end_x;
                    ys[i] = select(take, value, ys[i]);
                    slopes[i] = select(take, derivative, slopes[i]);
                }
            }
        }
    }
}

/// `e^x` for `x ≤ 0` (a logit minus its pixel's maximum), written so that loops over it
/// vectorize: round-to-nearest by the 1.5·2²³ trick, a degree-6 polynomial on
/// [−ln2/2, ln2/2] (relative error below 2e-7), and the power of two built in the exponent
/// bits. Below −87 the result is clamped to e^−87 ≈ 1.6e-38 instead of a subnormal.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const SHIFT: f32 = 12_582_912.0; // 1.5 · 2^23
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.max(-87.0);
    let shifted = x * LOG2E + SHIFT;
    let n = shifted - SHIFT;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // The low mantissa bits of `shifted` hold n (as 0x4B40_0000 + n).
    let exponent = (shifted.to_bits() as i32 - 0x4B40_0000 + 127) << 23;
    f32::from_bits(exponent as u32) * p
}

/// Sum of a row in float64, by eight float32 lanes (so the loop vectorizes).
#[inline(always)]
fn row_sum(values: &[f32]) -> f64 {
    let mut lanes = [0.0f32; 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, value) in lanes.iter_mut().zip(chunk) {
            *lane += value;
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    lanes.iter().map(|&l| l as f64).sum::<f64>() + tail as f64
}

/// Defines a function whose `body` is compiled for AVX2 and FMA when the CPU has them (the
/// kernels above are `inline(always)`, so they are compiled into each version), else for the
/// baseline target. The binary stays portable; the fast version is chosen at run time.
macro_rules! with_best_simd {
    ($name:ident, ($($arg:ident: $ty:ty),*), $body:block) => {
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $body
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `wide` was compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            $body
        }
    };
}

pub(crate) use with_best_simd;

with_best_simd!(
    forward_run,
    (sweep: &Sweep<'_>, run: &[Tile], buffers: &mut TileBuffers, softmax: SharedPlanes, store: &CurveStore),
    {
        for &tile in run {
            let TileBuffers { values, slopes, counts, rows, .. } = &mut *buffers;
            sweep.forward_tile(tile, values, slopes, rows, softmax, store, false, counts);
        }
    }
);

with_best_simd!(
    backward_run,
    (
        sweep: &Sweep<'_>,
        run: &[Tile],
        buffers: &mut TileBuffers,
        softmax: SharedPlanes,
        store: &CurveStore,
        count_grads: &[Vec<f32>],
        gradient: SharedPlanes
    ),
    {
        for &tile in run {
            sweep.backward_tile(tile, softmax, store, count_grads, buffers, gradient);
        }
    }
);

/// A tile: `n` consecutive pixels of one image, from position `within`.
#[derive(Clone, Copy, Debug)]
struct Tile {
    image: usize,
    within: usize,
    n: usize,
}

/// An `[N, C, H, W]` float32 buffer that tiles write to in disjoint pieces from several
/// threads (each tile owns rows `[image][k][within .. within + n]` for every class `k`).
#[derive(Clone, Copy)]
struct SharedPlanes {
    data: *mut f32,
    len: usize,
}

// SAFETY: tiles are disjoint, so no two threads touch the same element.
unsafe impl Send for SharedPlanes {}
unsafe impl Sync for SharedPlanes {}

impl SharedPlanes {
    /// The row `[start, start + n)`.
    ///
    /// # Safety
    /// No other live reference may overlap the row; tiles guarantee that.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, start: usize, n: usize) -> &mut [f32] {
        assert!(start + n <= self.len, "row inside the buffer");
        std::slice::from_raw_parts_mut(self.data.add(start), n)
    }
}

/// Inputs of one sweep, shared by the threads.
#[derive(Clone, Copy)]
struct Sweep<'a> {
    plan: &'a FusedPlan,
    logits: &'a [f32],
    labels: &'a [i64],
    planes: &'a [PlaneData],
    plane_widths: &'a [usize],
    classes: usize,
    pixels_per_image: usize,
    /// The stage this sweep runs (only its steps).
    stage: usize,
    /// Every frame's values and gradients, `[N, width, H, W]`.
    frames: &'a [Frame],
}

/// A full plane that carries a value between stages, with its gradient.
#[derive(Clone, Copy)]
struct Frame {
    values: SharedPlanes,
    grads: SharedPlanes,
    width: usize,
}

impl Sweep<'_> {
    /// The tile's rows of a `[N, width, H, W]` buffer, class `k`.
    ///
    /// # Safety
    /// As [`SharedPlanes::row`]: the tile owns these rows.
    #[allow(clippy::mut_from_ref)]
    #[inline(always)]
    unsafe fn frame_row<'b>(&self, planes: &'b SharedPlanes, width: usize, tile: Tile, k: usize) -> &'b mut [f32] {
        planes.row(tile.image * width * self.pixels_per_image + k * self.pixels_per_image + tile.within, tile.n)
    }
}

/// Where the forward sweep leaves each curve's slopes (and values, where the backward sweep
/// reads them), per slot, `[N, width, H, W]`.
struct CurveStore {
    slopes: Vec<SharedPlanes>,
    values: Vec<Option<SharedPlanes>>,
}

/// A label-only plane `[N, width, H, W]`: small integers from [`label_planes`] when they
/// apply, else libtorch's float values.
enum PlaneData {
    Bytes(Vec<i8>),
    Floats(Vec<f32>),
}

/// Pixels processed together: each step's values for a tile lie class-major
/// (`[class][pixel]`), so the loops over a step are long, contiguous and vectorizable.
const TILE: usize = 64;

/// Per-pixel scratch rows of a tile (maxima, sums).
struct PixelRows {
    max: Vec<f32>,
    sum: Vec<f32>,
}

impl Sweep<'_> {
    /// The softmax of the tile, class-major into `out` (`C` rows of `n`), computed with
    /// contiguous loops over each class's logits; `rows` is scratch.
    #[inline(always)]
    fn softmax_rows(&self, tile: Tile, out: &mut [f32], rows: &mut PixelRows) {
        let (c, hw, n) = (self.classes, self.pixels_per_image, tile.n);
        let base = tile.image * c * hw + tile.within;
        let (max, sum) = (&mut rows.max[..n], &mut rows.sum[..n]);
        max.fill(f32::NEG_INFINITY);
        for k in 0..c {
            for (m, &x) in max.iter_mut().zip(&self.logits[base + k * hw..base + k * hw + n]) {
                *m = m.max(x);
            }
        }
        sum.fill(0.0);
        for k in 0..c {
            let logits = &self.logits[base + k * hw..base + k * hw + n];
            let row = &mut out[k * n..(k + 1) * n];
            for (((e, &x), &m), s) in row.iter_mut().zip(logits).zip(max.iter()).zip(sum.iter_mut()) {
                *e = exp_nonpositive(x - m);
                *s += *e;
            }
        }
        for s in sum.iter_mut() {
            *s = 1.0 / *s;
        }
        for k in 0..c {
            for (p, &inverse) in out[k * n..(k + 1) * n].iter_mut().zip(sum.iter()) {
                *p *= inverse;
            }
        }
    }

    /// Compute the steps for the tile. Values of step `s` live at
    /// `values[s.offset * n ..][k * n + j]`, curve slopes at the same place in `slopes`.
    /// Forward (`backward == false`): every step, accumulated into the counts; the softmax
    /// and each curve's slopes (and values, where the backward needs them) are also written
    /// to the `[N, ·, H, W]` stores. Backward: only the values the backward sweep needs,
    /// with the softmax and curves read back from the stores instead of recomputed.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn forward_tile(
        &self,
        tile: Tile,
        values: &mut [f32],
        slopes: &mut [f32],
        rows: &mut PixelRows,
        softmax: SharedPlanes,
        store: &CurveStore,
        backward: bool,
        counts: &mut [Vec<f64>],
    ) {
        let recompute = !backward;
        let c = self.classes;
        let hw = self.pixels_per_image;
        let n = tile.n;
        let first = tile.image * hw + tile.within;
        let logit_base = tile.image * c * hw + tile.within;
        for (index, step) in self.plan.steps.iter().enumerate() {
            let (offset, w) = (step.offset * n, step.width);
            if step.stage != self.stage
                || (backward && !self.plan.back_value[index] && self.plan.curve_slot[index].is_none())
            {
                continue;
            }
            match &step.op {
                Op::Import(frame) => {
                    let frame = self.frames[*frame];
                    for k in 0..w {
                        // SAFETY: this tile owns these rows of the frame; only read here.
                        let stored = unsafe { self.frame_row(&frame.values, frame.width, tile, k) };
                        values[offset + k * n..offset + (k + 1) * n].copy_from_slice(stored);
                    }
                }
                Op::Curve { .. } if backward && self.plan.curve_slot[index].is_some() => {
                    let slot = self.plan.curve_slot[index].expect("checked");
                    let base = tile.image * w * hw + tile.within;
                    for k in 0..w {
                        // SAFETY: this tile owns these rows of the stores; only read here.
                        let stored = unsafe { store.slopes[slot].row(base + k * hw, n) };
                        slopes[offset + k * n..offset + (k + 1) * n].copy_from_slice(stored);
                        if let Some(stored_values) = store.values[slot] {
                            let stored = unsafe { stored_values.row(base + k * hw, n) };
                            values[offset + k * n..offset + (k + 1) * n].copy_from_slice(stored);
                        }
                    }
                }
                Op::Count { .. } | Op::NllSum { .. } if backward => {}
                Op::Softmax => {
                    let out = &mut values[offset..offset + c * n];
                    if recompute {
                        self.softmax_rows(tile, out, rows);
                        for k in 0..c {
                            // SAFETY: this tile owns these rows of the softmax buffer.
                            let stored = unsafe { softmax.row(logit_base + k * hw, n) };
                            stored.copy_from_slice(&out[k * n..(k + 1) * n]);
                        }
                    } else {
                        for k in 0..c {
                            // SAFETY: as above; only read here.
                            let stored = unsafe { softmax.row(logit_base + k * hw, n) };
                            out[k * n..(k + 1) * n].copy_from_slice(stored);
                        }
                    }
                }
                Op::Labels => {
                    values[offset..offset + w * n].fill(0.0);
                    for j in 0..n {
                        let label = self.labels[first + j];
                        if (0..w as i64).contains(&label) {
                            values[offset + label as usize * n + j] = 1.0;
                        }
                    }
                }
                Op::Valid => {
                    for (value, &label) in values[offset..offset + n].iter_mut().zip(&self.labels[first..first + n]) {
                        *value = unit(label != IGNORE_LABEL);
                    }
                }
                Op::Const(value) => values[offset..offset + n].fill(*value),
                Op::Plane(index) => {
                    let plane_w = self.plane_widths[*index];
                    let base = tile.image * plane_w * hw + tile.within;
                    for k in 0..w {
                        let out = &mut values[offset + k * n..offset + (k + 1) * n];
                        match &self.planes[*index] {
                            PlaneData::Bytes(data) => {
                                for (o, &x) in out.iter_mut().zip(&data[base + k * hw..base + k * hw + n]) {
                                    *o = x as f32;
                                }
                            }
                            PlaneData::Floats(data) => out.copy_from_slice(&data[base + k * hw..base + k * hw + n]),
                        }
                    }
                }
                Op::Curve { input, segments } => {
                    let source = self.plan.steps[*input].offset * n;
                    let (head, tail) = values.split_at_mut(offset);
                    curve_row(
                        &head[source..source + w * n],
                        &mut tail[..w * n],
                        &mut slopes[offset..offset + w * n],
                        segments,
                    );
                    let base = tile.image * w * hw + tile.within;
                    // Without a gradient to come (or without stored curves) nothing is kept.
                    let slot = self.plan.curve_slot[index].filter(|_| !store.slopes.is_empty() && !backward);
                    for (k, slot) in (0..w).filter_map(|k| slot.map(|slot| (k, slot))) {
                        // SAFETY: this tile owns these rows of the stores.
                        let stored = unsafe { store.slopes[slot].row(base + k * hw, n) };
                        stored.copy_from_slice(&slopes[offset + k * n..offset + (k + 1) * n]);
                        if let Some(stored_values) = store.values[slot] {
                            let stored = unsafe { stored_values.row(base + k * hw, n) };
                            stored.copy_from_slice(&tail[k * n..(k + 1) * n]);
                        }
                    }
                }
                Op::Add(a, b) => binary(values, &self.plan.steps[*a], &self.plan.steps[*b], offset, w, n, |x, y| x + y),
                Op::Sub(a, b) => binary(values, &self.plan.steps[*a], &self.plan.steps[*b], offset, w, n, |x, y| x - y),
                Op::Mul(a, b) => binary(values, &self.plan.steps[*a], &self.plan.steps[*b], offset, w, n, |x, y| x * y),
                Op::Neg(a) => {
                    let source = self.plan.steps[*a].offset * n;
                    let (head, tail) = values.split_at_mut(offset);
                    for (target, &x) in tail[..w * n].iter_mut().zip(&head[source..source + w * n]) {
                        *target = -x;
                    }
                }
                Op::AnyClass(a) => {
                    let sa = &self.plan.steps[*a];
                    let source = sa.offset * n;
                    for j in 0..n {
                        let mut max = f32::NEG_INFINITY;
                        for k in 0..sa.width {
                            max = max.max(values[source + k * n + j]);
                        }
                        values[offset + j] = max;
                    }
                }
                Op::Slice { input, start } => {
                    let source = (self.plan.steps[*input].offset + start) * n;
                    values.copy_within(source..source + w * n, offset);
                }
                Op::Count { input, count } => {
                    let si = &self.plan.steps[*input];
                    let source = si.offset * n;
                    let target = &mut counts[*count];
                    if target.len() == 1 {
                        target[0] += row_sum(&values[source..source + si.width * n]);
                    } else {
                        for (k, slot) in target.iter_mut().enumerate() {
                            let row = source + if si.width == 1 { 0 } else { k * n };
                            *slot += row_sum(&values[row..row + n]);
                        }
                    }
                }
                Op::NllSum { count } => {
                    let (max, sum) = (&mut rows.max[..n], &mut rows.sum[..n]);
                    max.fill(f32::NEG_INFINITY);
                    for k in 0..c {
                        let logits = &self.logits[logit_base + k * hw..logit_base + k * hw + n];
                        for (m, &x) in max.iter_mut().zip(logits) {
                            *m = m.max(x);
                        }
                    }
                    sum.fill(0.0);
                    for k in 0..c {
                        let logits = &self.logits[logit_base + k * hw..logit_base + k * hw + n];
                        for ((s, &x), &m) in sum.iter_mut().zip(logits).zip(max.iter()) {
                            *s += exp_nonpositive(x - m);
                        }
                    }
                    for j in 0..n {
                        let label = self.labels[first + j];
                        if label == IGNORE_LABEL {
                            continue;
                        }
                        let log_probability = self.logits[logit_base + label as usize * hw + j] - max[j] - sum[j].ln();
                        counts[*count][0] -= log_probability as f64;
                    }
                }
            }
            // The softmax's frame is the softmax store itself.
            if let (Some(frame), false, false) = (step.export, backward, matches!(step.op, Op::Softmax)) {
                let frame = self.frames[frame];
                for k in 0..w {
                    // SAFETY: this tile owns these rows of the frame.
                    let stored = unsafe { self.frame_row(&frame.values, frame.width, tile, k) };
                    stored.copy_from_slice(&values[offset + k * n..offset + (k + 1) * n]);
                }
            }
        }
    }

    /// Reverse mode through the tile's program: `∂loss/∂logits` into the tile's rows of
    /// `logit_grads` (`[N, C, H, W]`) from `∂loss/∂count`. Recomputes the forward values
    /// from the stored softmax first.
    #[inline(always)]
    fn backward_tile(
        &self,
        tile: Tile,
        softmax: SharedPlanes,
        store: &CurveStore,
        count_grads: &[Vec<f32>],
        buffers: &mut TileBuffers,
        logit_grads: SharedPlanes,
    ) {
        let TileBuffers { values, grads, slopes, counts, rows } = buffers;
        self.forward_tile(tile, values, slopes, rows, softmax, store, true, counts);
        let n = tile.n;
        grads[..self.plan.stage_scratch.get(self.stage).copied().unwrap_or(0) * n].fill(0.0);
        let c = self.classes;
        let hw = self.pixels_per_image;
        let first = tile.image * hw + tile.within;
        let logit_base = tile.image * c * hw + tile.within;
        // SAFETY: this tile owns these rows of the gradient buffer.
        let grad_row = |k: usize| unsafe { logit_grads.row(logit_base + k * hw, n) };
        // The logits' gradient is written by the first stage's sweep (which runs last).
        if self.stage == 0 {
            for k in 0..c {
                grad_row(k).fill(0.0);
            }
        }
        // Values that later stages read bring their gradient from there.
        for step in self.plan.steps.iter().filter(|s| s.stage == self.stage) {
            if let Some(frame) = step.export {
                let frame = self.frames[frame];
                for k in 0..step.width {
                    // SAFETY: this tile owns these rows of the frame; only read here.
                    let later = unsafe { self.frame_row(&frame.grads, frame.width, tile, k) };
                    let offset = step.offset * n;
                    for (g, &l) in grads[offset + k * n..offset + (k + 1) * n].iter_mut().zip(later.iter()) {
                        *g += l;
                    }
                }
            }
        }
        for step in self.plan.steps.iter().rev().filter(|s| s.stage == self.stage) {
            let (offset, w) = (step.offset * n, step.width);
            match &step.op {
                Op::Import(frame) => {
                    let frame = self.frames[*frame];
                    for k in 0..w {
                        // SAFETY: this tile owns these rows of the frame.
                        let target = unsafe { self.frame_row(&frame.grads, frame.width, tile, k) };
                        for (t, &g) in target.iter_mut().zip(&grads[offset + k * n..offset + (k + 1) * n]) {
                            *t += g;
                        }
                    }
                }
                Op::Count { input, count } => {
                    let si = &self.plan.steps[*input];
                    let source = si.offset * n;
                    let upstream = &count_grads[*count];
                    for k in 0..si.width {
                        let g = if upstream.len() == 1 { upstream[0] } else { upstream[k] };
                        for target in &mut grads[source + k * n..source + (k + 1) * n] {
                            *target += g;
                        }
                    }
                }
                Op::NllSum { count } => {
                    let g = count_grads[*count][0];
                    let labels = &self.labels[first..first + n];
                    for k in 0..c {
                        // SAFETY: as above; only read here.
                        let probabilities = unsafe { softmax.row(logit_base + k * hw, n) };
                        let out = grad_row(k);
                        for ((o, &p), &label) in out.iter_mut().zip(probabilities.iter()).zip(labels) {
                            let valid = if label == IGNORE_LABEL { 0.0 } else { 1.0 };
                            let target = if label == k as i64 { 1.0 } else { 0.0 };
                            *o += valid * g * (p - target);
                        }
                    }
                }
                // Operands come before their users, so their rows lie below `offset`:
                // splitting there lets each loop read the user's row and update the operand's
                // without aliasing, and vectorize.
                Op::Curve { input, .. } => {
                    let source = self.plan.steps[*input].offset * n;
                    let (head, tail) = grads.split_at_mut(offset);
                    let slope = &slopes[offset..offset + w * n];
                    for ((target, &g), &d) in head[source..source + w * n].iter_mut().zip(&tail[..w * n]).zip(slope) {
                        *target += g * d;
                    }
                }
                Op::Add(a, b) | Op::Sub(a, b) | Op::Mul(a, b) => {
                    let (sa, sb) = (&self.plan.steps[*a], &self.plan.steps[*b]);
                    let (oa, ob) = (sa.offset * n, sb.offset * n);
                    // Only prediction-dependent operands take gradients.
                    let (to_a, to_b) = (self.plan.pred[*a], self.plan.pred[*b]);
                    let (head, tail) = grads.split_at_mut(offset);
                    for k in 0..w {
                        let g = &tail[k * n..(k + 1) * n];
                        let ra = oa + if sa.width == 1 { 0 } else { k * n };
                        let rb = ob + if sb.width == 1 { 0 } else { k * n };
                        match step.op {
                            Op::Add(..) | Op::Sub(..) => {
                                let sign = if matches!(step.op, Op::Sub(..)) { -1.0 } else { 1.0 };
                                if to_a {
                                    for (target, &g) in head[ra..ra + n].iter_mut().zip(g) {
                                        *target += g;
                                    }
                                }
                                if to_b {
                                    for (target, &g) in head[rb..rb + n].iter_mut().zip(g) {
                                        *target += sign * g;
                                    }
                                }
                            }
                            _ => {
                                let (va, vb) = (&values[ra..ra + n], &values[rb..rb + n]);
                                if to_a {
                                    for ((target, &g), &other) in head[ra..ra + n].iter_mut().zip(g).zip(vb) {
                                        *target += g * other;
                                    }
                                }
                                if to_b {
                                    for ((target, &g), &other) in head[rb..rb + n].iter_mut().zip(g).zip(va) {
                                        *target += g * other;
                                    }
                                }
                            }
                        }
                    }
                }
                Op::Neg(a) => {
                    let source = self.plan.steps[*a].offset * n;
                    let (head, tail) = grads.split_at_mut(offset);
                    for (target, &g) in head[source..source + w * n].iter_mut().zip(&tail[..w * n]) {
                        *target -= g;
                    }
                }
                Op::AnyClass(a) => {
                    // Like torch.amax: the gradient is shared evenly by the maxima.
                    let sa = &self.plan.steps[*a];
                    let source = sa.offset * n;
                    for j in 0..n {
                        let max = values[offset + j];
                        let ties = (0..sa.width).filter(|k| values[source + k * n + j] == max).count().max(1);
                        let g = grads[offset + j] / ties as f32;
                        for k in 0..sa.width {
                            if values[source + k * n + j] == max {
                                grads[source + k * n + j] += g;
                            }
                        }
                    }
                }
                Op::Slice { input, start } => {
                    let source = (self.plan.steps[*input].offset + start) * n;
                    let (head, tail) = grads.split_at_mut(offset);
                    for (target, &g) in head[source..source + w * n].iter_mut().zip(&tail[..w * n]) {
                        *target += g;
                    }
                }
                Op::Softmax => {
                    let dot = &mut rows.sum[..n];
                    dot.fill(0.0);
                    for k in 0..c {
                        let (g, p) = (
                            &grads[offset + k * n..offset + (k + 1) * n],
                            &values[offset + k * n..offset + (k + 1) * n],
                        );
                        for ((d, &g), &p) in dot.iter_mut().zip(g).zip(p) {
                            *d += g * p;
                        }
                    }
                    for k in 0..c {
                        let (g, p) = (
                            &grads[offset + k * n..offset + (k + 1) * n],
                            &values[offset + k * n..offset + (k + 1) * n],
                        );
                        for (((o, &g), &p), &d) in grad_row(k).iter_mut().zip(g).zip(p).zip(dot.iter()) {
                            *o += p * (g - d);
                        }
                    }
                }
                Op::Labels | Op::Valid | Op::Const(_) | Op::Plane(_) => {}
            }
        }
    }
}

/// Per-thread scratch for one tile.
struct TileBuffers {
    values: Vec<f32>,
    grads: Vec<f32>,
    slopes: Vec<f32>,
    counts: Vec<Vec<f64>>,
    rows: PixelRows,
}

impl TileBuffers {
    fn new(plan: &FusedPlan) -> TileBuffers {
        TileBuffers {
            values: vec![0.0; plan.scratch * TILE],
            grads: vec![0.0; plan.scratch * TILE],
            slopes: vec![0.0; plan.scratch * TILE],
            counts: plan.count_widths.iter().map(|w| vec![0.0; (*w).max(1)]).collect(),
            rows: PixelRows { max: vec![0.0; TILE], sum: vec![0.0; TILE] },
        }
    }
}

/// `out = a op b` over a tile (`width` rows of `n`), broadcasting one-wide operands.
#[inline(always)]
fn binary(values: &mut [f32], a: &Step, b: &Step, offset: usize, width: usize, n: usize, f: impl Fn(f32, f32) -> f32) {
    let (oa, ob) = (a.offset * n, b.offset * n);
    // Operands lie below `offset` (they come before their user).
    let (head, tail) = values.split_at_mut(offset);
    for k in 0..width {
        let row_a = oa + if a.width == 1 { 0 } else { k * n };
        let row_b = ob + if b.width == 1 { 0 } else { k * n };
        let (xs, ys) = (&head[row_a..row_a + n], &head[row_b..row_b + n]);
        for ((out, &x), &y) in tail[k * n..(k + 1) * n].iter_mut().zip(xs).zip(ys) {
            *out = f(x, y);
        }
    }
}

fn to_vec_f32(tensor: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(tensor.to_kind(Kind::Float).contiguous().reshape([-1])).unwrap_or_default()
}

/// Threads for the CPU kernels: libtorch's intra-op thread count, so that a caller who
/// limits libtorch (as the search does, one thread per model) limits these too.
pub(crate) fn threads() -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (tch::get_num_threads().max(1) as usize).min(cores).min(16)
}

/// Elements per worker when `len` values, in `[H, W]` planes of `plane` values, are split
/// over [`threads`] by whole planes (the pooling kernels' split).
pub(crate) fn plane_chunk(len: usize, plane: usize) -> usize {
    let planes = len / plane.max(1);
    planes.div_ceil(threads().min(planes).max(1)).max(1) * plane.max(1)
}

/// The tiles of `images` images of `pixels_per_image` pixels, split into `workers` runs of
/// about equal length; tiles never cross an image boundary.
fn tile_runs(images: usize, pixels_per_image: usize, workers: usize) -> Vec<Vec<Tile>> {
    let tiles: Vec<Tile> = (0..images)
        .flat_map(|image| {
            (0..pixels_per_image).step_by(TILE).map(move |within| Tile {
                image,
                within,
                n: TILE.min(pixels_per_image - within),
            })
        })
        .collect();
    let per_worker = tiles.len().div_ceil(workers.max(1)).max(1);
    tiles.chunks(per_worker).map(|run| run.to_vec()).collect()
}

/// Scratch planes given back by earlier calls. The sweeps' large buffers (softmax, curve
/// stores) come from here, so that repeated calls reuse memory whose pages are already
/// mapped instead of faulting in fresh zeroed pages every time (a visible share of a call).
static SCRATCH: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());

/// Most buffers kept for reuse (several models may train in threads at once).
const SCRATCH_KEPT: usize = 16;

/// When on, reused scratch is filled with NaN first, so that a test reading a value the
/// current call did not write fails instead of finding the previous call's data.
static POISON_SCRATCH: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Testing aid: fill reused scratch planes with NaN (see [`take_buffer`]).
pub fn set_scratch_poisoning(on: bool) {
    POISON_SCRATCH.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// A buffer of `len` values with unspecified contents (every user overwrites all of it).
fn take_buffer(len: usize) -> Vec<f32> {
    let reused = {
        let mut pool = SCRATCH.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // The smallest buffer that is large enough.
        let best = (0..pool.len()).filter(|&i| pool[i].capacity() >= len).min_by_key(|&i| pool[i].capacity());
        best.map(|i| pool.swap_remove(i))
    };
    let mut buffer = reused.unwrap_or_default();
    buffer.resize(len, 0.0);
    buffer.truncate(len);
    if POISON_SCRATCH.load(std::sync::atomic::Ordering::Relaxed) {
        buffer.fill(f32::NAN);
    }
    buffer
}

fn give_back(buffer: Vec<f32>) {
    let mut pool = SCRATCH.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    pool.push(buffer);
    if pool.len() > SCRATCH_KEPT {
        // Keep the largest.
        let smallest = (0..pool.len()).min_by_key(|&i| pool[i].capacity()).expect("not empty");
        pool.swap_remove(smallest);
    }
}

/// The surrogate through the fused kernel. `logits` must be float32 on the CPU.
pub fn surrogate(module: &Module, curves: &[Curve], plan: &FusedPlan, logits: &Tensor, labels: &Tensor) -> Surrogate {
    let size = logits.size();
    let (n, c, h, w) = (size[0] as usize, size[1] as usize, size[2] as usize, size[3] as usize);
    let pixels_per_image = h * w;
    let elements = n * c * pixels_per_image;
    // The logits are read in place: a contiguous float32 view that outlives the sweeps.
    let logits_contiguous = logits.detach().contiguous();
    // SAFETY: `logits_contiguous` is a contiguous float32 CPU tensor of `elements` values,
    // alive and unmodified until the end of this function.
    let logit_values: &[f32] = if elements == 0 {
        &[]
    } else {
        unsafe { std::slice::from_raw_parts(logits_contiguous.data_ptr() as *const f32, elements) }
    };
    let label_values = Vec::<i64>::try_from(labels.contiguous().reshape([-1])).unwrap_or_default();
    // Label-only planes, computed once: on bytes where they are small integers, else by
    // libtorch.
    let dims = label_planes::Dims { images: n, classes: c, height: h, width: w };
    // Counts of label-only sets (BF1's label boundary pixels per class) come from the same
    // byte planes, so that libtorch does not rebuild the label part for them.
    let on_pred = label_planes::prediction_dependent(module);
    let label_counts: Vec<(Handle, Handle)> = module
        .handles()
        .filter_map(|h| match module.node(h) {
            Node::Count(input) if label_planes::pixel_label_node(module, *input, &on_pred) => Some((h, *input)),
            _ => None,
        })
        .collect();
    let mut wanted_planes = plan.planes.clone();
    wanted_planes.extend(label_counts.iter().map(|(_, input)| *input));
    let evaluated = if wanted_planes.is_empty() {
        None
    } else {
        label_planes::evaluate(module, &label_values, dims, &wanted_planes)
    };
    let mut provided: Vec<Option<Tensor>> = (0..module.len()).map(|_| None).collect();
    if let Some(computed) = &evaluated {
        for (count, input) in &label_counts {
            if let Some(label_planes::Value::Plane { data, width }) = &computed[input.index()] {
                let sums = label_planes::class_sums(data, *width, pixels_per_image);
                let tensor = Tensor::from_slice(&sums).to_kind(logits.kind());
                let tensor = if matches!(module.shape(*count), Shape::Scalar) { tensor.sum(logits.kind()) } else { tensor };
                provided[count.index()] = Some(tensor);
            }
        }
    }
    let plane_values: Vec<PlaneData> = if plan.planes.is_empty() {
        Vec::new()
    } else if let Some(mut computed) = evaluated {
        plan.planes
            .iter()
            .map(|p| match computed[p.index()].take() {
                Some(label_planes::Value::Plane { data, .. }) => PlaneData::Bytes(data),
                Some(label_planes::Value::Scalar(value)) => PlaneData::Floats(vec![value as f32; n * h * w]),
                None => unreachable!("every wanted plane is evaluated"),
            })
            .collect()
    } else {
        let provided = (0..module.len()).map(|_| None).collect();
        let computed = tch_backend::run_nodes(module, curves, logits, labels, provided, &plan.planes);
        plan.planes
            .iter()
            .map(|p| PlaneData::Floats(to_vec_f32(computed.values[p.index()].as_ref().expect("plane computed"))))
            .collect()
    };
    let plane_widths: Vec<usize> = plan.planes.iter().map(|p| width(module.shape(*p), c)).collect();
    // Frames carry values (and gradients) between stages; pools keep their winners.
    let frame_len = |width: usize| n * width * pixels_per_image;
    let mut frame_buffers: Vec<(Vec<f32>, Vec<f32>)> = plan
        .frames
        .iter()
        .map(|&width| {
            let mut grads = take_buffer(frame_len(width));
            zero(&mut grads);
            (take_buffer(frame_len(width)), grads)
        })
        .collect();
    let softmax_frame = plan.steps.iter().find(|s| matches!(s.op, Op::Softmax)).and_then(|s| s.export);
    let mut frames: Vec<Frame> = frame_buffers
        .iter_mut()
        .zip(&plan.frames)
        .map(|((values, grads), &width)| Frame {
            values: SharedPlanes { data: values.as_mut_ptr(), len: values.len() },
            grads: SharedPlanes { data: grads.as_mut_ptr(), len: grads.len() },
            width,
        })
        .collect();
    let mut softmax = take_buffer(elements);
    let softmax_planes = SharedPlanes { data: softmax.as_mut_ptr(), len: softmax.len() };
    if let Some(frame) = softmax_frame {
        frames[frame].values = softmax_planes;
    }
    let frames = frames;
    let mut winners: Vec<Vec<u32>> = plan.pools.iter().map(|pool| vec![0u32; frame_len(plan.frames[pool.output])]).collect();
    let sweep = Sweep {
        plan,
        logits: logit_values,
        labels: &label_values,
        planes: &plane_values,
        plane_widths: &plane_widths,
        classes: c,
        pixels_per_image,
        stage: 0,
        frames: &frames,
    };
    let runs = tile_runs(n, pixels_per_image, threads());
    // Curve stores only matter when there is a backward sweep.
    let stored_curves = if logits.requires_grad() { plan.stored_curves() } else { Vec::new() };
    let store_len = |width: usize| n * width * pixels_per_image;
    let mut store_buffers: Vec<(Vec<f32>, Option<Vec<f32>>)> = stored_curves
        .iter()
        .map(|&(width, values)| (take_buffer(store_len(width)), values.then(|| take_buffer(store_len(width)))))
        .collect();
    let planes_of = |buffer: &mut Vec<f32>| SharedPlanes { data: buffer.as_mut_ptr(), len: buffer.len() };
    let store = CurveStore {
        slopes: store_buffers.iter_mut().map(|(slopes, _)| planes_of(slopes)).collect(),
        values: store_buffers.iter_mut().map(|(_, values)| values.as_mut().map(planes_of)).collect(),
    };
    let mut counts: Vec<Vec<f64>> = plan.count_widths.iter().map(|w| vec![0.0; (*w).max(1)]).collect();
    for stage in 0..plan.stages {
        // Poolings whose output this stage reads, from frames complete by now.
        for (pool, winners) in plan.pools.iter().zip(winners.iter_mut()).filter(|(p, _)| p.stage == stage) {
            let (input, output) = (frames[pool.input].values, frames[pool.output].values);
            // SAFETY: between sweeps nothing else touches the frames; input and output are
            // distinct buffers (an output frame is always a buffer of its own).
            let (input, output) = unsafe { (&*input.row(0, input.len), output.row(0, output.len)) };
            tch_backend::window_winners(input, winners, output, (h, w), pool.radius, pool.erode);
        }
        let sweep = Sweep { stage, ..sweep };
        std::thread::scope(|scope| {
            let handles: Vec<_> = runs
                .iter()
                .map(|run| {
                    let (sweep, store) = (&sweep, &store);
                    scope.spawn(move || {
                        let mut buffers = TileBuffers::new(plan);
                        forward_run(sweep, run, &mut buffers, softmax_planes, store);
                        buffers.counts
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
            t.set_requires_grad(logits.requires_grad())
        })
        .collect();
    for (handle, leaf) in plan.counts.iter().zip(&count_leaves) {
        provided[handle.index()] = Some(leaf.shallow_clone());
    }
    let mut wanted = vec![module.root];
    wanted.extend(module.reports.iter().map(|r| r.value));
    let result = tch_backend::finish_surrogate(
        module,
        tch_backend::run_nodes(module, curves, logits, labels, provided, &wanted),
    );
    let release = move || {
        for (values, grads) in frame_buffers {
            give_back(values);
            give_back(grads);
        }
        give_back(softmax);
        for (slopes, values) in store_buffers {
            give_back(slopes);
            if let Some(values) = values {
                give_back(values);
            }
        }
    };
    if !logits.requires_grad() || !result.loss.requires_grad() {
        release();
        return Surrogate { loss: result.loss.detach(), ..result };
    }
    let count_grads: Vec<Vec<f32>> =
        Tensor::run_backward(&[&result.loss], &count_leaves, false, false).iter().map(to_vec_f32).collect();
    // Every element is written by exactly one tile (zeroed, then accumulated).
    let gradient = Tensor::empty([n as i64, c as i64, h as i64, w as i64], (Kind::Float, tch::Device::Cpu));
    let gradient_planes = SharedPlanes { data: gradient.data_ptr() as *mut f32, len: elements };
    for stage in (0..plan.stages).rev() {
        let sweep = Sweep { stage, ..sweep };
        std::thread::scope(|scope| {
            for run in &runs {
                let (sweep, count_grads, store) = (&sweep, &count_grads, &store);
                scope.spawn(move || {
                    let mut buffers = TileBuffers::new(plan);
                    backward_run(sweep, run, &mut buffers, softmax_planes, store, count_grads, gradient_planes);
                });
            }
        });
        // Every reader of these poolings' outputs is done: send their gradients back to the
        // winners, in the input frames (read by an earlier stage, which runs next).
        for (pool, winners) in plan.pools.iter().zip(&winners).filter(|(p, _)| p.stage == stage) {
            let (from, to) = (frames[pool.output].grads, frames[pool.input].grads);
            // SAFETY: two distinct frames' gradient buffers, not used by anything else now.
            let (from, to) = unsafe { (from.row(0, from.len), to.row(0, to.len)) };
            scatter_planes(from, winners, to, pixels_per_image);
        }
    }
    drop(logits_contiguous);
    release();
    let gradient = gradient.to_kind(kind);
    let linear = (logits * &gradient).sum(kind);
    let loss = &linear + (result.loss.detach() - linear.detach());
    Surrogate { loss, ..result }
}

/// Zero a buffer, split over the cores.
fn zero(buffer: &mut [f32]) {
    let chunk = buffer.len().div_ceil(threads()).max(1 << 16);
    std::thread::scope(|scope| {
        for part in buffer.chunks_mut(chunk) {
            scope.spawn(move || part.fill(0.0));
        }
    });
}

/// `target[winner[i]] += source[i]` within each `[H, W]` plane (a pooling's backward: each
/// output's gradient goes to its window's winner), split over the cores by planes.
fn scatter_planes(source: &[f32], winners: &[u32], target: &mut [f32], plane: usize) {
    let per_worker = plane_chunk(source.len(), plane);
    std::thread::scope(|scope| {
        for ((source, winners), target) in source.chunks(per_worker).zip(winners.chunks(per_worker)).zip(target.chunks_mut(per_worker)) {
            scope.spawn(move || {
                for ((source, winners), target) in source.chunks(plane).zip(winners.chunks(plane)).zip(target.chunks_mut(plane)) {
                    for (&g, &i) in source.iter().zip(winners) {
                        target[i as usize] += g;
                    }
                }
            });
        }
    });
}

/// Whether the fused kernel can run these inputs at all (CPU, float32).
pub fn applicable(logits: &Tensor) -> bool {
    logits.device() == tch::Device::Cpu && logits.kind() == Kind::Float
}
