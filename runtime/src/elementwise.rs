//! Elementwise clusters for the op-by-op fast path (modules the fused kernel does not cover,
//! such as BF1, whose predictions are pooled).
//!
//! Between two poolings, a relaxed module often applies several curves and `+ − ×` to the
//! same pixels (a soft `xor` of two curved sets is four curves and five operations). Op by op,
//! each of those is a libtorch operation over the whole batch, forward and backward. A
//! cluster runs them in one vectorized pass instead: per element, the values of every step
//! and, by reverse mode with seed 1, the partial derivative of the cluster's output with
//! respect to each of its inputs. The output enters autograd by linearization,
//! `Σᵢ xᵢ·∂out/∂xᵢ + (out − Σᵢ xᵢ·∂out/∂xᵢ)` with the bracket computed here (no gradient):
//! its value is `out` and its derivative the partials, exact because every step is
//! elementwise.
//!
//! A cluster is a maximal group of prediction-dependent elementwise nodes (curves, `+ − ×`,
//! negation) of one shape whose inner nodes are used only inside the group; its inputs are
//! prediction-dependent nodes of the same shape (softmax, a pooling) and constants.

use crate::fused::{curve_values_into, threads, with_best_simd, FastSegment};
use compiler::curve::Curve;
use compiler::ir::{Handle, Module, Node, Shape};
use tch::{Kind, Tensor};

#[derive(Clone, Debug)]
enum Op {
    Input(usize),
    Const(f32),
    Curve { input: usize, segments: Vec<FastSegment> },
    Add(usize, usize),
    Sub(usize, usize),
    Mul(usize, usize),
    Neg(usize),
}

/// A group of elementwise nodes computed in one pass.
#[derive(Debug)]
pub struct Cluster {
    /// The node the cluster computes.
    pub output: Handle,
    /// The nodes it reads, in input order.
    pub inputs: Vec<Handle>,
    steps: Vec<Op>,
}

fn elementwise(node: &Node) -> bool {
    matches!(node, Node::Curve { .. } | Node::Add(..) | Node::Sub(..) | Node::Mul(..) | Node::Neg(..))
}

/// The clusters of a relaxed module worth running (at least two nodes, at least one curve).
pub fn clusters(module: &Module, curves: &[Curve], on_pred: &[bool]) -> Vec<Cluster> {
    let n = module.len();
    let mut users: Vec<Vec<Handle>> = vec![Vec::new(); n];
    for handle in module.handles() {
        for operand in module.node(handle).operands() {
            users[operand.index()].push(handle);
        }
    }
    let pixel_shape = |h: Handle| matches!(module.shape(h), Shape::ClassPixels(_) | Shape::Pixels);
    // A member: a prediction-dependent elementwise node whose operands are of its own shape
    // (or constants) and themselves prediction-dependent.
    let member: Vec<bool> = module
        .handles()
        .map(|h| {
            let node = module.node(h);
            on_pred[h.index()]
                && elementwise(node)
                && pixel_shape(h)
                && node.operands().iter().all(|o| {
                    matches!(module.node(*o), Node::Const(_))
                        || (on_pred[o.index()] && module.shape(*o) == module.shape(h))
                })
        })
        .collect();
    let is_output = |h: Handle| {
        member[h.index()]
            && (users[h.index()].is_empty()
                || users[h.index()].iter().any(|u| !member[u.index()])
                || module.root == h
                || module.reports.iter().any(|r| r.value == h))
    };
    let mut found = Vec::new();
    for output in module.handles().filter(|&h| is_output(h)) {
        // The members reachable from the output through members.
        let mut inside = vec![false; n];
        let mut stack = vec![output];
        while let Some(h) = stack.pop() {
            if inside[h.index()] {
                continue;
            }
            inside[h.index()] = true;
            for operand in module.node(h).operands() {
                if member[operand.index()] {
                    stack.push(operand);
                }
            }
        }
        // Inner nodes must not be needed elsewhere (else they would be computed twice).
        let closed = module
            .handles()
            .filter(|h| inside[h.index()] && *h != output)
            .all(|h| !is_output(h) && users[h.index()].iter().all(|u| inside[u.index()]));
        let size = inside.iter().filter(|&&x| x).count();
        let has_curve = module.handles().any(|h| inside[h.index()] && matches!(module.node(h), Node::Curve { .. }));
        if !closed || size < 2 || !has_curve {
            continue;
        }
        let mut step_of: Vec<Option<usize>> = vec![None; n];
        let mut cluster = Cluster { output, inputs: Vec::new(), steps: Vec::new() };
        for h in module.handles() {
            let operands = module.node(h).operands();
            let uses = inside[h.index()] && h.index() <= output.index();
            if !uses {
                continue;
            }
            // Operands outside the cluster become inputs (or constants).
            for operand in operands {
                if step_of[operand.index()].is_none() {
                    let op = match module.node(operand) {
                        Node::Const(value) => Op::Const(value.get() as f32),
                        _ => {
                            cluster.inputs.push(operand);
                            Op::Input(cluster.inputs.len() - 1)
                        }
                    };
                    cluster.steps.push(op);
                    step_of[operand.index()] = Some(cluster.steps.len() - 1);
                }
            }
            let s = |o: &Handle| step_of[o.index()].expect("operands come first");
            let op = match module.node(h) {
                Node::Curve { input, curve } => Op::Curve {
                    input: s(input),
                    segments: curves[curve.0 as usize].segments().iter().map(FastSegment::new).collect(),
                },
                Node::Add(a, b) => Op::Add(s(a), s(b)),
                Node::Sub(a, b) => Op::Sub(s(a), s(b)),
                Node::Mul(a, b) => Op::Mul(s(a), s(b)),
                Node::Neg(a) => Op::Neg(s(a)),
                _ => unreachable!("members are elementwise"),
            };
            cluster.steps.push(op);
            step_of[h.index()] = Some(cluster.steps.len() - 1);
        }
        found.push(cluster);
    }
    found
}

/// Elements per block: each step's row of a block stays in the first cache levels.
const BLOCK: usize = 256;

impl Cluster {
    /// The output from the inputs' values (CPU float32 tensors of one shape), with autograd
    /// through the linearization when an input requires a gradient.
    pub fn apply(&self, inputs: &[&Tensor]) -> Tensor {
        let shape = inputs[0].size();
        let sources: Vec<Tensor> = inputs.iter().map(|t| t.detach().contiguous()).collect();
        let elements = sources[0].numel();
        let gradient = inputs.iter().any(|t| t.requires_grad());
        let options = (Kind::Float, tch::Device::Cpu);
        let value = Tensor::empty(shape.as_slice(), options);
        let partials: Vec<Tensor> =
            if gradient { inputs.iter().map(|_| Tensor::empty(shape.as_slice(), options)).collect() } else { Vec::new() };
        if elements > 0 {
            // SAFETY: the sources are contiguous float32 CPU tensors of `elements` values,
            // alive until the end of this function; `value` and `partials` are fresh tensors
            // of the same size that nothing else refers to.
            let xs: Vec<&[f32]> = sources
                .iter()
                .map(|t| unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, elements) })
                .collect();
            let out: &mut [f32] = unsafe { std::slice::from_raw_parts_mut(value.data_ptr() as *mut f32, elements) };
            let mut partial_slices: Vec<&mut [f32]> = partials
                .iter()
                .map(|t| unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, elements) })
                .collect();
            let chunk = elements.div_ceil(threads()).div_ceil(BLOCK).max(1) * BLOCK;
            std::thread::scope(|scope| {
                let mut partial_chunks: Vec<_> = partial_slices.iter_mut().map(|p| p.chunks_mut(chunk)).collect();
                for (index, out) in out.chunks_mut(chunk).enumerate() {
                    let start = index * chunk;
                    let xs: Vec<&[f32]> = xs.iter().map(|x| &x[start..start + out.len()]).collect();
                    let parts: Vec<&mut [f32]> = partial_chunks.iter_mut().map(|c| c.next().expect("same length")).collect();
                    scope.spawn(move || run_chunk(self, &xs, out, parts));
                }
            });
        }
        if !gradient {
            return value;
        }
        // `value` now holds the offset `out − Σ xᵢ·∂out/∂xᵢ` (see `run_chunk`).
        let mut result = value;
        for (x, partial) in inputs.iter().zip(&partials) {
            result = *x * partial + result;
        }
        result
    }
}

with_best_simd!(run_chunk, (cluster: &Cluster, xs: &[&[f32]], out: &mut [f32], partials: Vec<&mut [f32]>), {
    cluster.run(xs, out, partials)
});

impl Cluster {
    /// Values and reverse-mode partials over a chunk, block by block. With partials wanted,
    /// `out` receives the linearization offset instead of the value.
    #[inline(always)]
    fn run(&self, xs: &[&[f32]], out: &mut [f32], mut partials: Vec<&mut [f32]>) {
        let steps = self.steps.len();
        let mut values = vec![0.0f32; steps * BLOCK];
        let mut slopes = vec![0.0f32; steps * BLOCK];
        let mut grads = vec![0.0f32; steps * BLOCK];
        let total = out.len();
        let mut start = 0;
        while start < total {
            let len = BLOCK.min(total - start);
            let row = |s: usize| s * BLOCK..s * BLOCK + len;
            for (index, op) in self.steps.iter().enumerate() {
                let (head, tail) = values.split_at_mut(index * BLOCK);
                let target = &mut tail[..len];
                match op {
                    Op::Input(i) => target.copy_from_slice(&xs[*i][start..start + len]),
                    Op::Const(c) => target.fill(*c),
                    Op::Curve { input, segments } => {
                        curve_values_into(&head[row(*input)], target, &mut slopes[row(index)], segments)
                    }
                    Op::Add(a, b) => binary(target, &head[row(*a)], &head[row(*b)], Arith::Add),
                    Op::Sub(a, b) => binary(target, &head[row(*a)], &head[row(*b)], Arith::Sub),
                    Op::Mul(a, b) => binary(target, &head[row(*a)], &head[row(*b)], Arith::Mul),
                    Op::Neg(a) => binary(target, &head[row(*a)], &head[row(*a)], Arith::Neg),
                }
            }
            let last = steps - 1;
            if partials.is_empty() {
                out[start..start + len].copy_from_slice(&values[row(last)]);
                start += len;
                continue;
            }
            grads.fill(0.0);
            grads[row(last)].fill(1.0);
            for (index, op) in self.steps.iter().enumerate().rev() {
                // Operands come first, so their rows lie below this step's.
                let (head, tail) = grads.split_at_mut(index * BLOCK);
                let g = &tail[..len];
                match op {
                    Op::Input(_) | Op::Const(_) => {}
                    Op::Curve { input, .. } => add_product(&mut head[row(*input)], g, &slopes[row(index)]),
                    Op::Add(a, b) | Op::Sub(a, b) => {
                        let sign = if matches!(op, Op::Sub(..)) { -1.0 } else { 1.0 };
                        add_scaled(&mut head[row(*a)], g, 1.0);
                        add_scaled(&mut head[row(*b)], g, sign);
                    }
                    Op::Mul(a, b) => {
                        add_product(&mut head[row(*a)], g, &values[row(*b)]);
                        add_product(&mut head[row(*b)], g, &values[row(*a)]);
                    }
                    Op::Neg(a) => add_scaled(&mut head[row(*a)], g, -1.0),
                }
            }
            // Offset: out − Σ xᵢ·∂out/∂xᵢ; the partials go out as they are.
            let offset = &mut out[start..start + len];
            offset.copy_from_slice(&values[row(last)]);
            for (index, op) in self.steps.iter().enumerate() {
                if let Op::Input(i) = op {
                    let partial = &mut partials[*i][start..start + len];
                    partial.copy_from_slice(&grads[row(index)]);
                    subtract_product(offset, partial, &xs[*i][start..start + len]);
                }
            }
            start += len;
        }
    }
}

// The row loops live in their own functions: slice arguments do not alias, so they
// vectorize (inside one function, rows split from one buffer are not known to be apart).

#[derive(Clone, Copy)]
enum Arith {
    Add,
    Sub,
    Mul,
    Neg,
}

with_best_simd!(binary, (target: &mut [f32], a: &[f32], b: &[f32], op: Arith), {
    let rows = target.iter_mut().zip(a).zip(b);
    match op {
        Arith::Add => rows.for_each(|((t, &x), &y)| *t = x + y),
        Arith::Sub => rows.for_each(|((t, &x), &y)| *t = x - y),
        Arith::Mul => rows.for_each(|((t, &x), &y)| *t = x * y),
        Arith::Neg => rows.for_each(|((t, &x), _)| *t = -x),
    }
});

with_best_simd!(add_scaled, (target: &mut [f32], g: &[f32], scale: f32), {
    for (t, &g) in target.iter_mut().zip(g) {
        *t += scale * g;
    }
});

with_best_simd!(add_product, (target: &mut [f32], g: &[f32], y: &[f32]), {
    for ((t, &g), &y) in target.iter_mut().zip(g).zip(y) {
        *t += g * y;
    }
});

with_best_simd!(subtract_product, (target: &mut [f32], d: &[f32], x: &[f32]), {
    for ((t, &d), &x) in target.iter_mut().zip(d).zip(x) {
        *t -= x * d;
    }
});
