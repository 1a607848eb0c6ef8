//! The fused kernel's sweeps: a stage's steps run tile by tile, forward (values into the
//! counts, the softmax and curve slopes kept) and backward (reverse mode to the logits'
//! gradient), each tile owning its rows of every plane it writes.

use super::lanes::{curve_row, exp_nonpositive, row_sum, unit};
use super::plan::{FusedPlan, Op, Step};
use crate::kernels::simd::with_best_simd;

with_best_simd!(
    pub(super) forward_run,
    (sweep: &Sweep<'_>, run: &[Tile], buffers: &mut TileBuffers, softmax: SharedPlanes, store: &CurveStore),
    {
        for &tile in run {
            let TileBuffers { values, slopes, counts, rows, .. } = &mut *buffers;
            sweep.forward_tile(tile, values, slopes, rows, softmax, store, false, counts);
        }
    }
);

with_best_simd!(
    pub(super) backward_run,
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
pub(super) struct Tile {
    pub(super) image: usize,
    pub(super) within: usize,
    pub(super) n: usize,
}

/// An `[N, C, H, W]` float32 buffer that tiles write to in disjoint pieces from several
/// threads (each tile owns rows `[image][k][within .. within + n]` for every class `k`).
#[derive(Clone, Copy)]
pub(super) struct SharedPlanes {
    pub(super) data: *mut f32,
    pub(super) len: usize,
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
    pub(super) unsafe fn row(&self, start: usize, n: usize) -> &mut [f32] {
        assert!(start + n <= self.len, "row inside the buffer");
        std::slice::from_raw_parts_mut(self.data.add(start), n)
    }
}

/// Inputs of one sweep, shared by the threads.
#[derive(Clone, Copy)]
pub(super) struct Sweep<'a> {
    pub(super) plan: &'a FusedPlan,
    pub(super) logits: &'a [f32],
    pub(super) labels: &'a [i64],
    pub(super) planes: &'a [PlaneData],
    pub(super) plane_widths: &'a [usize],
    pub(super) classes: usize,
    pub(super) pixels_per_image: usize,
    /// The stage this sweep runs (only its steps).
    pub(super) stage: usize,
    /// Every frame's values and gradients, `[N, width, H, W]`.
    pub(super) frames: &'a [Frame],
    /// The ignore label, or a value no checked label has.
    pub(super) ignore: i64,
}

/// A full plane that carries a value between stages, with its gradient.
#[derive(Clone, Copy)]
pub(super) struct Frame {
    pub(super) values: SharedPlanes,
    pub(super) grads: SharedPlanes,
    pub(super) width: usize,
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
pub(super) struct CurveStore {
    pub(super) slopes: Vec<SharedPlanes>,
    pub(super) values: Vec<Option<SharedPlanes>>,
}

/// A label-only plane `[N, width, H, W]`: small integers from [`label_planes`] when they
/// apply, else libtorch's float values.
pub(super) enum PlaneData {
    Bytes(Vec<i8>),
    Floats(Vec<f32>),
}

/// Pixels processed together: each step's values for a tile lie class-major
/// (`[class][pixel]`), so the loops over a step are long, contiguous and vectorizable.
pub(super) const TILE: usize = 64;

/// Per-pixel scratch rows of a tile (maxima, sums).
pub(super) struct PixelRows {
    pub(super) max: Vec<f32>,
    pub(super) sum: Vec<f32>,
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
                        if label != self.ignore && (0..w as i64).contains(&label) {
                            values[offset + label as usize * n + j] = 1.0;
                        }
                    }
                }
                Op::Valid => {
                    for (value, &label) in values[offset..offset + n].iter_mut().zip(&self.labels[first..first + n]) {
                        *value = unit(label != self.ignore);
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
                Op::Curve { input, pieces } => {
                    let source = self.plan.steps[*input].offset * n;
                    let (head, tail) = values.split_at_mut(offset);
                    curve_row(
                        &head[source..source + w * n],
                        &mut tail[..w * n],
                        &mut slopes[offset..offset + w * n],
                        pieces,
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
                        if label == self.ignore {
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
                            let valid = if label == self.ignore { 0.0 } else { 1.0 };
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
pub(super) struct TileBuffers {
    pub(super) values: Vec<f32>,
    pub(super) grads: Vec<f32>,
    pub(super) slopes: Vec<f32>,
    pub(super) counts: Vec<Vec<f64>>,
    pub(super) rows: PixelRows,
}

impl TileBuffers {
    pub(super) fn new(plan: &FusedPlan) -> TileBuffers {
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
