//! The fused kernel's program: the pixel-level part of a relaxed module lowered to steps
//! over a pixel's classes, grouped into stages (sweeps) with poolings between them, and what
//! the backward sweep needs of each step.
//!
//! Invariants: within a stage, a step's operands come before it, so rows split at a step's
//! offset never alias; a value a later stage reads either comes from a frame (a pooling's
//! output, or a step's export) or is recomputed there from values it can read; the softmax
//! is computed in the first stage only (later stages import its frame), so only the first
//! stage's backward sweep writes the logits' gradient.

use super::lanes::{LaneCurve, XorCurves};
use compiler::curve::Curve;
use compiler::ir::{Handle, Node, Shape};
use compiler::RelaxedModule;

#[derive(Clone, Debug)]
pub(super) enum Op {
    Softmax,
    Labels,
    Valid,
    Const(f32),
    Plane(usize),
    Curve {
        input: usize,
        curve: LaneCurve,
    },
    Add(usize, usize),
    Sub(usize, usize),
    Mul(usize, usize),
    /// `a + b − a·b` (the relaxed `|`): one step where the IR has three.
    Or(usize, usize),
    /// The relaxed `a ^ b` with its four curves (see [`XorCurves`]): one step where the IR
    /// has nine (four curves, the relaxed `|` of two, a product and a difference), whose
    /// parts nothing else reads.
    Xor {
        a: usize,
        b: usize,
        curves: XorCurves,
    },
    Neg(usize),
    AnyClass(usize),
    Slice {
        input: usize,
        start: usize,
    },
    Count {
        input: usize,
        count: usize,
    },
    /// The count of `a·b` (a relaxed `&`, counted): the product is never a step of its own.
    /// `width` is the product's (operands of width 1 broadcast).
    CountProduct {
        a: usize,
        b: usize,
        width: usize,
        count: usize,
    },
    /// The cross-entropy summed over the tile's valid pixels, from the sweep's softmax step.
    NllSum {
        count: usize,
        softmax: usize,
    },
    /// A value computed in an earlier stage or by a pooling between stages: read from a
    /// frame (a full plane), its gradient added back into the frame's gradient plane.
    Import(usize),
}

#[derive(Clone, Debug)]
pub(super) struct Step {
    pub op: Op,
    pub width: usize,
    pub offset: usize,
    /// The sweep the step runs in (see [`FusedPlan`]'s stages).
    pub stage: usize,
    /// The frame this step's value is written to, when a later stage or a pooling reads it.
    pub export: Option<usize>,
}

/// A pooling between stages: the window minimum (`erode`) or maximum of an input frame into
/// an output frame, with each output's winner kept for the backward scatter.
#[derive(Clone, Debug)]
pub(super) struct PoolStage {
    pub input: usize,
    pub output: usize,
    pub radius: usize,
    pub erode: bool,
    /// The stage whose sweep first reads the output.
    pub stage: usize,
    /// A label plane (index into the plan's planes) that every read of the output is
    /// multiplied by, when there is one: the output then matters only where it is non-zero
    /// (BF1's dilated prediction boundary, counted on label boundaries).
    pub mask: Option<usize>,
    /// The count slots this pooling computes itself (see [`FusedPlan::absorbed`]): when every
    /// read of its output is a per-class count of the output times its mask, the pooling
    /// sums `mask · pooled value` where the mask is set and never writes the output, and its
    /// backward sends each count's gradient, times the mask, straight to the winners.
    pub counts: Vec<usize>,
}

/// The pixel program of a module for a given number of classes (run tile by tile).
pub(crate) struct FusedPlan {
    pub(super) steps: Vec<Step>,
    /// Label-only nodes evaluated by libtorch and read per pixel.
    pub(super) planes: Vec<Handle>,
    /// Accumulator nodes the program computes, in count-slot order.
    pub(super) counts: Vec<Handle>,
    pub(super) count_widths: Vec<usize>,
    /// Scratch rows of a tile: the largest stage's.
    pub(super) scratch: usize,
    /// Scratch rows of each stage.
    pub(super) stage_scratch: Vec<usize>,
    pub(super) classes: usize,
    /// Per step: whether it depends on the predictions (gradients flow only into those).
    pub(super) pred: Vec<bool>,
    /// Per step: whether the backward sweep needs its value (it recomputes these).
    pub(super) back_value: Vec<bool>,
    /// Per step: whether a pooling computes it instead of the sweeps (an import of a pooled
    /// output and the masked counts that read it: see [`PoolStage::counts`]).
    pub(super) absorbed: Vec<bool>,
    /// Per step: whether the backward sweep gives its gradient rows any value (a step
    /// whose gradient receives nothing propagates nothing; counts take theirs from above).
    pub(super) grad_written: Vec<bool>,
    /// Per step and operand slot (`a`, `b`): whether the step's contribution is the first
    /// its operand's gradient receives in the backward sweep (it assigns instead of adding).
    pub(super) first_write: Vec<[bool; 2]>,
    /// Per frame: whether its gradient plane is zeroed before the backward sweeps (else its
    /// first writer, an import, assigns it: see `import_assigns`).
    pub(super) zeroed_frames: Vec<bool>,
    /// Per step: for an import, whether it assigns its frame's gradient instead of adding.
    pub(super) import_assigns: Vec<bool>,
    /// Whether the program has the cross-entropy sum (the softmax then keeps its log-normalizer).
    pub(super) cross_entropy: bool,
    /// Sweeps: one for a module whose pixel part is per pixel; one more after each pooling of
    /// prediction-dependent sets (BF1's boundary of `P`, then its dilation).
    pub(super) stages: usize,
    /// Width (classes) of each frame.
    pub(super) frames: Vec<usize>,
    pub(super) pools: Vec<PoolStage>,
}

/// Bookkeeping while a plan is built.
struct Lowering<'a> {
    module: &'a RelaxedModule,
    curves: &'a [Curve],
    on_pred: &'a [bool],
    /// Sweep of each prediction-dependent node (a pooling's is one more than its input's).
    node_stage: Vec<usize>,
    /// Step of `(node, stage)`.
    step_of: std::collections::HashMap<(usize, usize), usize>,
    /// Frame holding a node's value for later stages.
    frame_of: Vec<Option<usize>>,
    /// How many nodes (and the root and reports) read each node.
    uses: Vec<usize>,
}

pub(super) fn width(shape: Shape, classes: usize) -> usize {
    match shape {
        Shape::Pixels | Shape::Scalar => 1,
        Shape::ClassPixels(range) | Shape::Classes(range) => range.len(classes).unwrap_or(0),
    }
}

impl FusedPlan {
    /// Build the program, or `None` when the module needs an operation the kernel lacks.
    pub(crate) fn new(module: &RelaxedModule, curves: &[Curve], classes: usize) -> Option<FusedPlan> {
        let n = module.len();
        // In which sweep each prediction-dependent node is computed.
        let on_pred = module.prediction_dependent();
        let mut node_stage = vec![0usize; n];
        for handle in module.handles() {
            let node = module.node(handle);
            let i = handle.index();
            let operands_stage =
                node.operands().iter().filter(|o| on_pred[o.index()]).map(|o| node_stage[o.index()]).max();
            let pooled = matches!(node, Node::Erode { .. } | Node::Dilate { .. });
            node_stage[i] = operands_stage.unwrap_or(0) + usize::from(pooled && on_pred[i]);
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
            absorbed: Vec::new(),
            grad_written: Vec::new(),
            first_write: Vec::new(),
            zeroed_frames: Vec::new(),
            import_assigns: Vec::new(),
            cross_entropy: false,
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
            uses: use_counts(module),
        };
        for handle in module.handles() {
            let node = module.node(handle);
            let accumulates_pred = node.is_accumulator() && lowering.on_pred[handle.index()];
            if !accumulates_pred {
                continue;
            }
            let stage = lowering.node_stage[handle.index()];
            plan.lower(&mut lowering, handle, stage)?;
        }
        plan.stages = plan.steps.iter().map(|s| s.stage + 1).max().unwrap_or(1);
        plan.absorbed = vec![false; plan.steps.len()];
        plan.find_pool_masks();
        plan.plan_backward();
        Some(plan)
    }

    /// A pooling's mask: the one label plane that every step reading its output (through
    /// imports) multiplies it by in a count, when the output is not pooled again.
    fn find_pool_masks(&mut self) {
        for p in 0..self.pools.len() {
            let output = self.pools[p].output;
            if self.pools.iter().any(|other| other.input == output) {
                continue;
            }
            let imports: Vec<usize> =
                (0..self.steps.len()).filter(|&i| matches!(self.steps[i].op, Op::Import(f) if f == output)).collect();
            let readers: Vec<usize> = (0..self.steps.len())
                .filter(|&i| step_operands(&self.steps[i].op).iter().any(|o| imports.contains(o)))
                .collect();
            // The label plane a reader multiplies the output by, when it counts that product.
            let plane_of = |r: usize| match self.steps[r].op {
                Op::CountProduct { a, b, .. } => {
                    let other = if imports.contains(&a) { b } else { a };
                    match self.steps[other].op {
                        Op::Plane(index) if !imports.contains(&other) => Some(index),
                        _ => None,
                    }
                }
                _ => None,
            };
            let mask = readers.first().and_then(|&r| plane_of(r));
            let maskable = mask.is_some() && readers.iter().all(|&r| plane_of(r) == mask);
            if !maskable {
                continue;
            }
            self.pools[p].mask = mask;
            // Absorb the counts: every reader is a per-class count of the whole output (as
            // wide as the frame) times a mask one plane wide or as wide.
            let width = self.frames[output];
            let absorbable = imports.iter().all(|&i| self.steps[i].width == width)
                && readers.iter().all(|&r| match self.steps[r].op {
                    Op::CountProduct { a, b, width: product, count } => {
                        let other = if imports.contains(&a) { b } else { a };
                        product == width
                            && self.count_widths[count] == width
                            && (self.steps[other].width == 1 || self.steps[other].width == width)
                    }
                    _ => false,
                });
            if absorbable {
                for &r in &readers {
                    if let Op::CountProduct { count, .. } = self.steps[r].op {
                        self.pools[p].counts.push(count);
                    }
                    self.absorbed[r] = true;
                }
                for &i in &imports {
                    self.absorbed[i] = true;
                }
            }
        }
    }

    /// Whether a stage's sweep has anything to do: a count to add or a value to export (a
    /// stage whose counts a pooling absorbed has not).
    pub(super) fn sweeps(&self, stage: usize) -> bool {
        self.steps.iter().zip(&self.absorbed).any(|(step, &absorbed)| {
            step.stage == stage
                && !absorbed
                && (step.export.is_some()
                    || matches!(step.op, Op::Count { .. } | Op::CountProduct { .. } | Op::NllSum { .. }))
        })
    }

    /// Whether a frame holds values (the output of a pooling that computes its own counts
    /// holds none).
    pub(super) fn frame_used(&self, frame: usize) -> bool {
        !self.pools.iter().any(|pool| pool.output == frame && !pool.counts.is_empty())
    }

    /// Whether a frame's gradient plane is written only by masked scatters (of poolings that
    /// compute their own counts) and read only by the export of its values: it then needs no
    /// zeroing, the scatters mark the tiles' rows they write (see
    /// [`crate::kernels::pool::masked_scatter`]) and the backward sweep reads only those.
    pub(super) fn sparse_grads(&self, frame: usize) -> bool {
        let scattered = self.pools.iter().filter(|pool| pool.input == frame).collect::<Vec<_>>();
        self.zeroed_frames[frame]
            && !scattered.is_empty()
            && scattered.iter().all(|pool| !pool.counts.is_empty() && pool.mask.is_some())
            && !self.pools.iter().any(|pool| pool.output == frame)
            && !self.steps.iter().any(|step| matches!(step.op, Op::Import(f) if f == frame))
            && self.steps.iter().any(|step| step.export == Some(frame))
    }

    /// Whether the program evaluates any curve. A module without curves (plain
    /// cross-entropy, say) is cheaper through libtorch's own fused kernels.
    pub(crate) fn has_curves(&self) -> bool {
        self.steps.iter().any(|step| matches!(step.op, Op::Curve { .. } | Op::Xor { .. }))
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

    /// The sweep's softmax step (one per sweep, shared by the softmax node and the
    /// cross-entropy).
    fn softmax_step(&mut self, stage: usize) -> usize {
        match self.steps.iter().position(|s| matches!(s.op, Op::Softmax) && s.stage == stage) {
            Some(step) => step,
            None => self.push(Op::Softmax, self.classes, stage),
        }
    }

    /// The frame that holds `handle`'s value for later stages: a pooling's output, or the
    /// export of the step that computes it in its own stage.
    fn frame(&mut self, lowering: &mut Lowering<'_>, handle: Handle) -> Option<usize> {
        if let Some(frame) = lowering.frame_of[handle.index()] {
            return Some(frame);
        }
        let module = lowering.module;
        let w = width(module.shape(handle), self.classes);
        let pooling = match module.node(handle) {
            Node::Erode { input, radius } => Some((*input, *radius, true)),
            Node::Dilate { input, radius } => Some((*input, *radius, false)),
            // Every other node's value is computed by a step of its own stage and exported.
            Node::Pred
            | Node::Softmax
            | Node::Labels
            | Node::Valid
            | Node::Border { .. }
            | Node::Const(_)
            | Node::Weights { .. }
            | Node::CurveTag { .. }
            | Node::Scope { .. }
            | Node::And(..)
            | Node::Or(..)
            | Node::Xor(..)
            | Node::Not(..)
            | Node::Curve { .. }
            | Node::AnyClass(_)
            | Node::Slice { .. }
            | Node::Count(_)
            | Node::NllSum
            | Node::Add(..)
            | Node::Sub(..)
            | Node::Mul(..)
            | Node::Div { .. }
            | Node::Neg(_)
            | Node::Compare { .. }
            | Node::Mean { .. }
            | Node::Sum { .. }
            | Node::Term { .. } => None,
        };
        let frame = match pooling {
            Some((input, radius, erode)) => {
                let input_frame = self.frame(lowering, input)?;
                self.frames.push(w);
                let output = self.frames.len() - 1;
                self.pools.push(PoolStage {
                    input: input_frame,
                    output,
                    radius: radius as usize,
                    erode,
                    stage: lowering.node_stage[handle.index()],
                    mask: None,
                    counts: Vec::new(),
                });
                output
            }
            None => {
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
                // Label-only pixel sets built from the labels (and the border band):
                // computed once, outside the sweeps, and read per pixel.
                Node::Border { .. }
                | Node::Erode { .. }
                | Node::Dilate { .. }
                | Node::AnyClass(_)
                | Node::Slice { .. }
                | Node::Add(..)
                | Node::Sub(..)
                | Node::Mul(..)
                | Node::Neg(_)
                | Node::Curve { .. } => {
                    let index = match self.planes.iter().position(|p| *p == handle) {
                        Some(index) => index,
                        None => {
                            self.planes.push(handle);
                            self.planes.len() - 1
                        }
                    };
                    self.push(Op::Plane(index), w, stage)
                }
                // Numbers are never operands of pixel steps (the validator guarantees it),
                // and a relaxed module has no exact node; decline rather than guess.
                Node::Softmax
                | Node::Weights { .. }
                | Node::NllSum
                | Node::Count(_)
                | Node::Div { .. }
                | Node::Compare { .. }
                | Node::Mean { .. }
                | Node::Sum { .. }
                | Node::Term { .. }
                | Node::Pred
                | Node::CurveTag { .. }
                | Node::Scope { .. }
                | Node::And(..)
                | Node::Or(..)
                | Node::Xor(..)
                | Node::Not(..) => return None,
            }
        } else if pooled
            || (lowering.node_stage[handle.index()] < stage
                && (matches!(node, Node::Softmax) || lowering.frame_of[handle.index()].is_some()))
        {
            // A pooling's output, or a value an earlier sweep keeps in a frame anyway (the
            // softmax, which a pooling reads, or any value exported already): read from the
            // frame. Any other value of an earlier sweep is recomputed here from its operands
            // (a curve of the softmax, say): cheaper than writing and reading back a frame.
            let frame = self.frame(lowering, handle)?;
            self.push(Op::Import(frame), w, stage)
        } else {
            // A relaxed `^` whose parts nothing else reads becomes one step.
            let xor = match node {
                Node::Sub(x, y) => xor_parts(module, &lowering.uses, *x, *y),
                _ => None,
            };
            let all_curves = lowering.curves;
            let mut operand = |this: &mut Self, h: &Handle| this.lower(lowering, *h, stage);
            let op = match node {
                // One softmax step per sweep, shared with the cross-entropy.
                Node::Softmax => return Some(self.softmax_step(stage)),
                Node::Curve { input, curve } => Op::Curve {
                    input: operand(self, input)?,
                    curve: LaneCurve::new(&lowering.curves[curve.0 as usize]),
                },
                Node::Add(a, b) => Op::Add(operand(self, a)?, operand(self, b)?),
                Node::Sub(x, y) => match (xor, or_operands(module, *x, *y)) {
                    (Some((a, b, ids)), _) => {
                        let curves = XorCurves::new(ids.map(|id| &all_curves[id as usize]));
                        let widths = [a, b].map(|h| width(module.shape(h), self.classes));
                        match curves {
                            Some(curves) if widths == [w, w] => {
                                Op::Xor { a: operand(self, &a)?, b: operand(self, &b)?, curves }
                            }
                            // Curves of different piece counts or broadcast operands: step by step.
                            _ => Op::Sub(operand(self, x)?, operand(self, y)?),
                        }
                    }
                    (None, Some((a, b))) => Op::Or(operand(self, &a)?, operand(self, &b)?),
                    (None, None) => Op::Sub(operand(self, x)?, operand(self, y)?),
                },
                Node::Mul(a, b) => Op::Mul(operand(self, a)?, operand(self, b)?),
                Node::Neg(a) => Op::Neg(operand(self, a)?),
                Node::AnyClass(a) => Op::AnyClass(operand(self, a)?),
                Node::Slice { input, start, .. } => Op::Slice { input: operand(self, input)?, start: *start },
                Node::Count(input) => match module.node(*input) {
                    Node::Mul(a, b) => {
                        let (a, b) = (operand(self, a)?, operand(self, b)?);
                        self.counts.push(handle);
                        self.count_widths.push(w);
                        let width = width(module.shape(*input), self.classes);
                        Op::CountProduct { a, b, width, count: self.counts.len() - 1 }
                    }
                    _ => {
                        let input = operand(self, input)?;
                        self.counts.push(handle);
                        self.count_widths.push(w);
                        Op::Count { input, count: self.counts.len() - 1 }
                    }
                },
                Node::NllSum => {
                    // The cross-entropy reads the softmax's log-normalizer, and its gradient the
                    // softmax, of the tile: one softmax step of the same sweep comes first.
                    let softmax = self.softmax_step(stage);
                    self.counts.push(handle);
                    self.count_widths.push(1);
                    Op::NllSum { count: self.counts.len() - 1, softmax }
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
                | Node::Border { .. }
                | Node::Const(_)
                | Node::Weights { .. }
                | Node::Pred
                | Node::CurveTag { .. }
                | Node::Scope { .. }
                | Node::And(..)
                | Node::Or(..)
                | Node::Xor(..)
                | Node::Not(..) => return None,
            };
            // Accumulators keep no rows.
            let width = if matches!(node, Node::Count(_) | Node::NllSum) { 0 } else { w };
            self.push(op, width, stage)
        };
        lowering.step_of.insert((handle.index(), stage), step);
        Some(step)
    }

    /// Decide what the backward sweep recomputes: the steps whose values it needs (operands
    /// of products, `any`, the softmax, every curve for its slope) and what they are computed
    /// from. The backward sweep recomputes them from the logits, the label planes and the
    /// frames instead of reading them back from stores: a logits-sized plane per value, written
    /// and read again, cost more than the arithmetic (they do not fit in the caches).
    fn plan_backward(&mut self) {
        let len = self.steps.len();
        self.pred = self
            .steps
            .iter()
            .map(|step| !matches!(step.op, Op::Labels | Op::Valid | Op::Const(_) | Op::Plane(_)))
            .collect();
        let mut need = vec![false; len];
        for (index, step) in self.steps.iter().enumerate().filter(|(i, _)| !self.absorbed[*i]) {
            match step.op {
                Op::Mul(a, b) | Op::Or(a, b) | Op::CountProduct { a, b, .. } => {
                    need[b] |= self.pred[a];
                    need[a] |= self.pred[b];
                }
                Op::AnyClass(a) => {
                    need[a] = true;
                    need[index] = true;
                }
                Op::Softmax | Op::Curve { .. } => need[index] = true,
                // Its curves' slopes need both operands.
                Op::Xor { a, b, .. } => {
                    need[a] = true;
                    need[b] = true;
                }
                _ => {}
            }
        }
        // A needed value needs its operands' values.
        for index in (0..len).rev() {
            if need[index] {
                for operand in step_operands(&self.steps[index].op) {
                    need[operand] = true;
                }
            }
        }
        self.back_value = need;
        // Which contributions to a step's gradient come first in the backward sweep (steps
        // run in reverse): the first assigns, later ones add, so no gradient row is zeroed.
        // A step whose gradient receives nothing propagates nothing.
        self.grad_written = vec![false; len];
        self.first_write = vec![[false; 2]; len];
        for stage in 0..self.stages {
            let in_stage = |s: &Step| s.stage == stage;
            let mut written = vec![false; len];
            // Values exported to later stages start from the gradients those left in frames.
            for (index, step) in self.steps.iter().enumerate().filter(|(_, s)| in_stage(s)) {
                written[index] = step.export.is_some();
            }
            for index in (0..len).rev().filter(|&i| in_stage(&self.steps[i]) && !self.absorbed[i]) {
                let receives = written[index]
                    || matches!(self.steps[index].op, Op::Count { .. } | Op::CountProduct { .. } | Op::NllSum { .. });
                self.grad_written[index] = written[index];
                if !receives {
                    continue;
                }
                let targets: [Option<usize>; 2] = match self.steps[index].op {
                    Op::Count { input, .. }
                    | Op::Curve { input, .. }
                    | Op::Neg(input)
                    | Op::AnyClass(input)
                    | Op::Slice { input, .. } => [Some(input), None],
                    Op::Add(a, b)
                    | Op::Sub(a, b)
                    | Op::Mul(a, b)
                    | Op::Or(a, b)
                    | Op::Xor { a, b, .. }
                    | Op::CountProduct { a, b, .. } => [self.pred[a].then_some(a), self.pred[b].then_some(b)],
                    Op::NllSum { .. }
                    | Op::Softmax
                    | Op::Import(_)
                    | Op::Labels
                    | Op::Valid
                    | Op::Const(_)
                    | Op::Plane(_) => [None, None],
                };
                for (slot, target) in targets.iter().enumerate() {
                    if let Some(target) = *target {
                        self.first_write[index][slot] = !written[target];
                        written[target] = true;
                    }
                }
            }
        }
        self.cross_entropy = self.steps.iter().any(|s| matches!(s.op, Op::NllSum { .. }));
        // A frame's gradient plane is written, in the backward sweeps' order (stages in
        // reverse; within a stage its sweep, then the scatters of the poolings it read), by
        // the imports of its value and the scatters of poolings that read it. When the first
        // of these is an import (whose every tile writes all its rows), that import assigns
        // and the plane needs no zeroing; otherwise it is zeroed first.
        self.import_assigns = vec![false; len];
        self.zeroed_frames = (0..self.frames.len())
            .map(|frame| {
                let import = (0..len)
                    .filter(|&i| {
                        matches!(self.steps[i].op, Op::Import(f) if f == frame)
                            && self.grad_written[i]
                            && !self.absorbed[i]
                    })
                    .max_by_key(|&i| self.steps[i].stage);
                // The output of a pooling that computes its own counts is never written.
                if self.pools.iter().any(|pool| pool.output == frame && !pool.counts.is_empty()) {
                    return false;
                }
                let scatter = self.pools.iter().filter(|pool| pool.input == frame).map(|pool| pool.stage).max();
                match (import, scatter) {
                    (Some(step), scatter) if scatter.map_or(true, |stage| self.steps[step].stage >= stage) => {
                        self.import_assigns[step] = true;
                        false
                    }
                    _ => true,
                }
            })
            .collect();
    }
}

/// `(a, b)` when `x − y` is `(a + b) − a·b`, the relaxed `|` (either order of the product).
fn or_operands(module: &RelaxedModule, x: Handle, y: Handle) -> Option<(Handle, Handle)> {
    match (module.node(x), module.node(y)) {
        (Node::Add(a, b), Node::Mul(c, d)) if (a, b) == (c, d) || (a, b) == (d, c) => Some((*a, *b)),
        _ => None,
    }
}

/// How many nodes read each node (the root and the reports count as readers).
fn use_counts(module: &RelaxedModule) -> Vec<usize> {
    let mut uses = vec![0usize; module.len()];
    for handle in module.handles() {
        for operand in module.node(handle).operands() {
            uses[operand.index()] += 1;
        }
    }
    uses[module.root.index()] += 1;
    for report in &module.reports {
        uses[report.value.index()] += 1;
    }
    uses
}

/// `(a, b, [and_a, and_b, or_a, or_b])` (the curves' indices) when `x − y` is the relaxed
/// `a ^ b`: `x` the relaxed `|` of `or_a(a)` and `or_b(b)`, `y` the product
/// `and_a(a) · and_b(b)`, with no other reader of any part (the fused step computes them
/// inside).
fn xor_parts(module: &RelaxedModule, uses: &[usize], x: Handle, y: Handle) -> Option<(Handle, Handle, [u32; 4])> {
    let Node::Sub(sum, product) = module.node(x) else { return None };
    let (p, q) = or_operands(module, *sum, *product)?;
    let Node::Mul(r, t) = module.node(y) else { return None };
    let curve = |h: Handle| match module.node(h) {
        Node::Curve { input, curve } => Some((*input, curve.0)),
        _ => None,
    };
    let ((a, or_a), (b, or_b)) = (curve(p)?, curve(q)?);
    let ((ra, and_r), (tb, and_t)) = (curve(*r)?, curve(*t)?);
    let (and_a, and_b) = if (ra, tb) == (a, b) {
        (and_r, and_t)
    } else if (ra, tb) == (b, a) {
        (and_t, and_r)
    } else {
        return None;
    };
    let single = [x, *sum, *product, y, *r, *t].iter().all(|h| uses[h.index()] == 1);
    let shared = [p, q].iter().all(|h| uses[h.index()] == 2);
    (p != q && r != t && single && shared).then_some((a, b, [and_a, and_b, or_a, or_b]))
}

/// The steps an operation reads.
pub(super) fn step_operands(op: &Op) -> Vec<usize> {
    match *op {
        Op::Curve { input, .. } | Op::Neg(input) | Op::AnyClass(input) | Op::Slice { input, .. } => vec![input],
        Op::Count { input, .. } | Op::NllSum { softmax: input, .. } => vec![input],
        Op::Add(a, b)
        | Op::Sub(a, b)
        | Op::Mul(a, b)
        | Op::Or(a, b)
        | Op::Xor { a, b, .. }
        | Op::CountProduct { a, b, .. } => vec![a, b],
        Op::Softmax | Op::Labels | Op::Valid | Op::Const(_) | Op::Plane(_) | Op::Import(_) => Vec::new(),
    }
}
