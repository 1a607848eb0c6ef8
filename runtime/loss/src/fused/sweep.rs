//! The fused kernel's sweeps: a stage's steps run tile by tile, forward (values into the
//! counts) and backward (the values it needs recomputed, then reverse mode to the logits'
//! gradient), each tile owning its pixels of every plane it writes.
//!
//! A tile is [`TILE`] pixels of one image. Each step's values for a tile are rows of
//! [`TILE`] lanes, one row per class, in per-thread scratch small enough to stay in the
//! core's first-level cache; every row operation has a length known at compile time, so it
//! compiles to a few vector instructions with no remainder loop. Nothing logits-sized is
//! written but the gradient (and, for modules that pool predictions, the frames): the
//! backward sweep recomputes the softmax and the curves from the logits rather than reading
//! them back from stores, because those stores (a logits-sized plane each) do not fit in the
//! caches and cost more to write and read than the arithmetic.
//!
//! The last tile of an image may be partial (`n < TILE` pixels): its lanes past `n` hold
//! zeros, class index −1 (no class, not valid) and a zero lane mask, so they add nothing to
//! the counts, and nothing past `n` is ever written out.

use super::lanes::{curve_rows, exp_nonpositive, unit};
use super::plan::{FusedPlan, Op, Step};
use crate::kernels::simd::with_best_simd;
use std::ops::Range;

/// Pixels per tile: a row is one 512-bit or two 256-bit vectors.
pub(super) const TILE: usize = 16;

/// One class's values for the pixels of a tile.
pub(super) type Row = [f32; TILE];

const ZERO: Row = [0.0; TILE];

/// Tiles whose counts a thread sums in float32 lanes before adding them to its float64
/// totals: each lane adds at most this many values in float32.
const FOLD: usize = 32;

with_best_simd!(
    pub(super) forward_run,
    (sweep: &Sweep<'_>, tiles: Range<usize>, buffers: &mut TileBuffers),
    {
        for index in tiles {
            let tile = sweep.tile(index);
            sweep.prepare(tile, buffers);
            sweep.compute(tile, buffers, false);
            buffers.pending += 1;
            if buffers.pending == FOLD {
                buffers.fold();
            }
        }
        buffers.fold();
    }
);

with_best_simd!(
    pub(super) backward_run,
    (
        sweep: &Sweep<'_>,
        tiles: Range<usize>,
        buffers: &mut TileBuffers,
        count_grads: &[Vec<f32>],
        gradient: SharedPlanes
    ),
    {
        for index in tiles {
            let tile = sweep.tile(index);
            sweep.prepare(tile, buffers);
            sweep.compute(tile, buffers, true);
            sweep.backward_tile(tile, buffers, count_grads, gradient);
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
    /// Tiles per image (the last one may be partial).
    pub(super) tiles_per_image: usize,
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

/// A label-only plane `[N, width, H, W]`: small integers from [`label_planes`] when they
/// apply, else libtorch's float values.
///
/// [`label_planes`]: crate::label_planes
pub(super) enum PlaneData {
    Bytes(Vec<i8>),
    Floats(Vec<f32>),
}

/// Per-thread scratch: a tile's rows of every step, their gradients and curve slopes, and
/// the counts this thread has summed so far.
pub(super) struct TileBuffers {
    values: Vec<Row>,
    grads: Vec<Row>,
    slopes: Vec<Row>,
    /// The tile's gradient of the logits, one row per class.
    logit_grads: Vec<Row>,
    /// Counts of the tiles since the last fold, in float32 lanes, per count slot and class.
    lanes: Vec<Vec<Row>>,
    /// Tiles in `lanes`.
    pending: usize,
    /// This thread's counts, per count slot and class.
    pub(super) counts: Vec<Vec<f64>>,
    /// The tile's class index per pixel: −1 for an ignored pixel or a lane past the tile.
    classes_of: [i32; TILE],
    /// 1 for the tile's pixels, 0 past its end.
    live: Row,
    /// Per pixel, the softmax's log-normalizer `max + ln Σ exp(x − max)` (for the
    /// cross-entropy).
    log_norm: Row,
}

impl TileBuffers {
    pub(super) fn new(plan: &FusedPlan) -> TileBuffers {
        // Every row is written before it is read; tests poison the rows to prove it.
        let start = if crate::kernels::scratch::poisoning() { [f32::NAN; TILE] } else { ZERO };
        TileBuffers {
            values: vec![start; plan.scratch],
            grads: vec![start; plan.scratch],
            slopes: vec![start; plan.scratch],
            logit_grads: vec![ZERO; plan.classes],
            lanes: plan.count_widths.iter().map(|w| vec![ZERO; (*w).max(1)]).collect(),
            pending: 0,
            counts: plan.count_widths.iter().map(|w| vec![0.0; (*w).max(1)]).collect(),
            classes_of: [-1; TILE],
            live: ZERO,
            log_norm: ZERO,
        }
    }

    /// Add the float32 lanes to the float64 counts and clear them.
    #[inline(always)]
    fn fold(&mut self) {
        for (totals, lanes) in self.counts.iter_mut().zip(self.lanes.iter_mut()) {
            for (total, row) in totals.iter_mut().zip(lanes.iter_mut()) {
                *total += row.iter().map(|&x| f64::from(x)).sum::<f64>();
                *row = ZERO;
            }
        }
        self.pending = 0;
    }
}

/// `f` lane by lane over copies of the rows: computing on copies and storing the result
/// whole lets the compiler keep the lanes in vector registers (it cannot prove that rows
/// borrowed from different buffers do not overlap, and would otherwise leave the fully
/// unrolled lanes scalar).
#[inline(always)]
fn map1(a: &Row, f: impl Fn(f32) -> f32) -> Row {
    let a = *a;
    let mut out = ZERO;
    for j in 0..TILE {
        out[j] = f(a[j]);
    }
    out
}

/// As [`map1`], for two rows.
#[inline(always)]
fn map2(a: &Row, b: &Row, f: impl Fn(f32, f32) -> f32) -> Row {
    let (a, b) = (*a, *b);
    let mut out = ZERO;
    for j in 0..TILE {
        out[j] = f(a[j], b[j]);
    }
    out
}

/// As [`map1`], for three rows.
#[inline(always)]
fn map3(a: &Row, b: &Row, c: &Row, f: impl Fn(f32, f32, f32) -> f32) -> Row {
    let (a, b, c) = (*a, *b, *c);
    let mut out = ZERO;
    for j in 0..TILE {
        out[j] = f(a[j], b[j], c[j]);
    }
    out
}

/// `row` = the `n ≤ TILE` values of `source`, zeros after them.
#[inline(always)]
fn load(row: &mut Row, source: &[f32]) {
    if source.len() == TILE {
        row.copy_from_slice(source);
    } else {
        *row = ZERO;
        row[..source.len()].copy_from_slice(source);
    }
}

/// `target += row`, for the first `target.len()` lanes.
#[inline(always)]
fn add_into(target: &mut [f32], row: &Row) {
    if let Ok(full) = <&mut Row>::try_from(&mut *target) {
        *full = map2(full, row, |t, r| t + r);
    } else {
        for (t, &r) in target.iter_mut().zip(row) {
            *t += r;
        }
    }
}

/// `lanes += row`, masked by the lanes of a partial tile.
#[inline(always)]
fn accumulate(lanes: &mut Row, row: &Row, mask: Option<&Row>) {
    *lanes = match mask {
        None => map2(lanes, row, |t, x| t + x),
        Some(mask) => map3(lanes, row, mask, |t, x, m| t + x * m),
    };
}

/// `target = row`, for the first `target.len()` lanes.
#[inline(always)]
fn store(target: &mut [f32], row: &Row) {
    if let Ok(full) = <&mut Row>::try_from(&mut *target) {
        *full = *row;
    } else {
        let n = target.len();
        target.copy_from_slice(&row[..n]);
    }
}

impl Sweep<'_> {
    /// Tile `index` of the batch (tiles never cross an image boundary).
    #[inline(always)]
    pub(super) fn tile(&self, index: usize) -> Tile {
        let image = index / self.tiles_per_image;
        let within = (index % self.tiles_per_image) * TILE;
        Tile { image, within, n: TILE.min(self.pixels_per_image - within) }
    }

    /// The tile's rows `[0, n)` of class `k` in a `[N, width, H, W]` buffer.
    ///
    /// # Safety
    /// As [`SharedPlanes::row`]: the tile owns these rows.
    #[allow(clippy::mut_from_ref)]
    #[inline(always)]
    unsafe fn frame_row<'b>(&self, planes: &'b SharedPlanes, width: usize, tile: Tile, k: usize) -> &'b mut [f32] {
        planes.row(tile.image * width * self.pixels_per_image + k * self.pixels_per_image + tile.within, tile.n)
    }

    /// The tile's class indices and lane mask.
    #[inline(always)]
    fn prepare(&self, tile: Tile, b: &mut TileBuffers) {
        let first = tile.image * self.pixels_per_image + tile.within;
        let labels = &self.labels[first..first + tile.n];
        b.classes_of = [-1; TILE];
        b.live = ZERO;
        for ((class, live), &label) in b.classes_of.iter_mut().zip(b.live.iter_mut()).zip(labels) {
            // Checked labels are classes in `0..C` or the ignore label.
            *class = if label == self.ignore { -1 } else { label as i32 };
            *live = 1.0;
        }
    }

    /// Compute the stage's steps for the tile. Forward (`backward == false`): every step,
    /// counts into the lanes, exported values into their frames. Backward: only the values
    /// the backward sweep needs (curves with their slopes).
    #[inline(always)]
    fn compute(&self, tile: Tile, b: &mut TileBuffers, backward: bool) {
        let c = self.classes;
        let hw = self.pixels_per_image;
        let n = tile.n;
        let logit_base = tile.image * c * hw + tile.within;
        let TileBuffers { values, slopes, lanes, counts, classes_of, live, log_norm, .. } = b;
        for (index, step) in self.plan.steps.iter().enumerate() {
            if step.stage != self.stage || (backward && !self.plan.back_value[index]) {
                continue;
            }
            let (offset, w) = (step.offset, step.width);
            match &step.op {
                Op::Import(frame) => {
                    let frame = self.frames[*frame];
                    for k in 0..w {
                        // SAFETY: this tile owns these rows of the frame; only read here.
                        let stored = unsafe { self.frame_row(&frame.values, frame.width, tile, k) };
                        load(&mut values[offset + k], stored);
                    }
                }
                Op::Softmax => {
                    let rows = &mut values[offset..offset + c];
                    for (k, row) in rows.iter_mut().enumerate() {
                        load(row, &self.logits[logit_base + k * hw..logit_base + k * hw + n]);
                    }
                    let mut max = [f32::NEG_INFINITY; TILE];
                    for row in rows.iter() {
                        max = map2(&max, row, f32::max);
                    }
                    let mut sum = ZERO;
                    for row in rows.iter_mut() {
                        *row = map2(row, &max, |x, m| exp_nonpositive(x - m));
                        sum = map2(&sum, row, |s, e| s + e);
                    }
                    let inverse = map1(&sum, |s| 1.0 / s);
                    for row in rows.iter_mut() {
                        *row = map2(row, &inverse, |p, i| p * i);
                    }
                    if self.plan.cross_entropy && !backward {
                        *log_norm = map2(&max, &sum, |m, s| m + s.ln());
                    }
                }
                Op::Labels => {
                    let classes_of = *classes_of;
                    for (k, row) in values[offset..offset + w].iter_mut().enumerate() {
                        let mut out = ZERO;
                        for j in 0..TILE {
                            out[j] = unit(classes_of[j] == k as i32);
                        }
                        *row = out;
                    }
                }
                Op::Valid => {
                    let classes_of = *classes_of;
                    let mut out = ZERO;
                    for j in 0..TILE {
                        out[j] = unit(classes_of[j] >= 0);
                    }
                    values[offset] = out;
                }
                Op::Const(value) => values[offset] = [*value; TILE],
                Op::Plane(index) => {
                    let plane_w = self.plane_widths[*index];
                    let base = tile.image * plane_w * hw + tile.within;
                    for (k, row) in values[offset..offset + w].iter_mut().enumerate() {
                        let start = base + k * hw;
                        match &self.planes[*index] {
                            PlaneData::Bytes(data) => {
                                let bytes = &data[start..start + n];
                                if let Ok(full) = <&[i8; TILE]>::try_from(bytes) {
                                    let full = *full;
                                    let mut out = ZERO;
                                    for j in 0..TILE {
                                        out[j] = f32::from(full[j]);
                                    }
                                    *row = out;
                                } else {
                                    *row = ZERO;
                                    for (x, &byte) in row.iter_mut().zip(bytes) {
                                        *x = f32::from(byte);
                                    }
                                }
                            }
                            PlaneData::Floats(data) => load(row, &data[start..start + n]),
                        }
                    }
                }
                Op::Curve { input, curve } => {
                    let source = self.plan.steps[*input].offset;
                    let (head, tail) = values.split_at_mut(offset);
                    // The forward sweep needs no slopes; the backward sweep recomputes curves
                    // for them.
                    let slopes = backward.then(|| &mut slopes[offset..offset + w]);
                    curve_rows(&head[source..source + w], &mut tail[..w], slopes, curve);
                }
                Op::Add(a, b) => binary(values, &self.plan.steps[*a], &self.plan.steps[*b], offset, w, |x, y| x + y),
                Op::Sub(a, b) => binary(values, &self.plan.steps[*a], &self.plan.steps[*b], offset, w, |x, y| x - y),
                Op::Mul(a, b) => binary(values, &self.plan.steps[*a], &self.plan.steps[*b], offset, w, |x, y| x * y),
                Op::Neg(a) => {
                    let source = self.plan.steps[*a].offset;
                    let (head, tail) = values.split_at_mut(offset);
                    for (target, x) in tail[..w].iter_mut().zip(&head[source..source + w]) {
                        *target = map1(x, |x| -x);
                    }
                }
                Op::AnyClass(a) => {
                    let sa = &self.plan.steps[*a];
                    let (head, tail) = values.split_at_mut(offset);
                    let mut max = [f32::NEG_INFINITY; TILE];
                    for row in &head[sa.offset..sa.offset + sa.width] {
                        max = map2(&max, row, f32::max);
                    }
                    tail[0] = max;
                }
                Op::Slice { input, start } => {
                    let source = self.plan.steps[*input].offset + start;
                    values.copy_within(source..source + w, offset);
                }
                Op::Count { input, count } => {
                    let si = &self.plan.steps[*input];
                    let rows = &values[si.offset..si.offset + si.width];
                    let target = &mut lanes[*count];
                    let mask = (n < TILE).then_some(&*live);
                    if target.len() == 1 {
                        // A scalar count sums every row.
                        for row in rows {
                            accumulate(&mut target[0], row, mask);
                        }
                    } else {
                        // Per class; a one-wide set is counted for every class.
                        for (k, into) in target.iter_mut().enumerate() {
                            accumulate(into, &rows[if si.width == 1 { 0 } else { k }], mask);
                        }
                    }
                }
                Op::NllSum { count, .. } => {
                    let mut total = 0.0f64;
                    for (j, &class) in classes_of.iter().enumerate() {
                        if class >= 0 {
                            let logit = self.logits[logit_base + class as usize * hw + j];
                            total += f64::from(log_norm[j] - logit);
                        }
                    }
                    counts[*count][0] += total;
                }
            }
            if let (Some(frame), false) = (step.export, backward) {
                let frame = self.frames[frame];
                for k in 0..w {
                    // SAFETY: this tile owns these rows of the frame.
                    let stored = unsafe { self.frame_row(&frame.values, frame.width, tile, k) };
                    store(stored, &values[offset + k]);
                }
            }
        }
    }

    /// Reverse mode through the stage's steps for the tile, from `∂loss/∂count` and the
    /// gradients later stages left in the frames; the first stage writes the tile's rows of
    /// `∂loss/∂logits` (`[N, C, H, W]`). [`Sweep::compute`] has recomputed the values it reads.
    /// A step's first contribution to an operand's gradient assigns it, later ones add (see
    /// [`FusedPlan::first_write`]), so no gradient row is zeroed first.
    #[inline(always)]
    fn backward_tile(&self, tile: Tile, b: &mut TileBuffers, count_grads: &[Vec<f32>], logit_grads: SharedPlanes) {
        let TileBuffers { values, grads, slopes, logit_grads: dlogits, classes_of, .. } = b;
        let plan = self.plan;
        let c = self.classes;
        let hw = self.pixels_per_image;
        let n = tile.n;
        dlogits.fill(ZERO);
        // Values that later stages read start from the gradient those left in the frame.
        for step in plan.steps.iter().filter(|s| s.stage == self.stage) {
            if let Some(frame) = step.export {
                let frame = self.frames[frame];
                for k in 0..step.width {
                    // SAFETY: this tile owns these rows of the frame; only read here.
                    let later = unsafe { self.frame_row(&frame.grads, frame.width, tile, k) };
                    load(&mut grads[step.offset + k], later);
                }
            }
        }
        for (index, step) in plan.steps.iter().enumerate().rev() {
            if step.stage != self.stage
                || !(plan.grad_written[index] || matches!(step.op, Op::Count { .. } | Op::NllSum { .. }))
            {
                continue;
            }
            let (offset, w) = (step.offset, step.width);
            let [first_a, first_b] = plan.first_write[index];
            match &step.op {
                Op::Import(frame) => {
                    let frame = self.frames[*frame];
                    for k in 0..w {
                        // SAFETY: this tile owns these rows of the frame.
                        let target = unsafe { self.frame_row(&frame.grads, frame.width, tile, k) };
                        add_into(target, &grads[offset + k]);
                    }
                }
                Op::Count { input, count } => {
                    let si = &plan.steps[*input];
                    let upstream = &count_grads[*count];
                    for (k, row) in grads[si.offset..si.offset + si.width].iter_mut().enumerate() {
                        let g = if upstream.len() == 1 {
                            upstream[0]
                        } else if si.width == 1 {
                            upstream.iter().sum()
                        } else {
                            upstream[k]
                        };
                        put(row, [g; TILE], first_a);
                    }
                }
                Op::NllSum { count, softmax } => {
                    let g = count_grads[*count][0];
                    let probabilities = &values[plan.steps[*softmax].offset..][..c];
                    let classes_of = *classes_of;
                    for (k, (out, p)) in dlogits.iter_mut().zip(probabilities).enumerate() {
                        let (o, p) = (*out, *p);
                        let mut sum = ZERO;
                        for j in 0..TILE {
                            let valid = unit(classes_of[j] >= 0);
                            let target = unit(classes_of[j] == k as i32);
                            sum[j] = o[j] + valid * g * (p[j] - target);
                        }
                        *out = sum;
                    }
                }
                // Operands come before their users, so their rows lie below `offset`:
                // splitting there lets each loop read the user's rows and update the
                // operand's.
                Op::Curve { input, .. } => {
                    let source = plan.steps[*input].offset;
                    let (head, tail) = grads.split_at_mut(offset);
                    for ((target, g), d) in
                        head[source..source + w].iter_mut().zip(&tail[..w]).zip(&slopes[offset..offset + w])
                    {
                        put(target, map2(g, d, |g, d| g * d), first_a);
                    }
                }
                Op::Add(a, b) | Op::Sub(a, b) | Op::Mul(a, b) => {
                    let (sa, sb) = (&plan.steps[*a], &plan.steps[*b]);
                    // Only prediction-dependent operands take gradients.
                    let (to_a, to_b) = (plan.pred[*a], plan.pred[*b]);
                    let (head, tail) = grads.split_at_mut(offset);
                    for (k, g) in tail[..w].iter().enumerate() {
                        // A one-wide operand takes every row's contribution: the first assigns.
                        let ra = sa.offset + if sa.width == 1 { 0 } else { k };
                        let rb = sb.offset + if sb.width == 1 { 0 } else { k };
                        let assign_a = first_a && (sa.width > 1 || k == 0);
                        let assign_b = first_b && (sb.width > 1 || k == 0);
                        match step.op {
                            Op::Add(..) => {
                                if to_a {
                                    put(&mut head[ra], *g, assign_a);
                                }
                                if to_b {
                                    put(&mut head[rb], *g, assign_b);
                                }
                            }
                            Op::Sub(..) => {
                                if to_a {
                                    put(&mut head[ra], *g, assign_a);
                                }
                                if to_b {
                                    put(&mut head[rb], map1(g, |g| -g), assign_b);
                                }
                            }
                            _ => {
                                if to_a {
                                    put(&mut head[ra], map2(g, &values[rb], |g, other| g * other), assign_a);
                                }
                                if to_b {
                                    put(&mut head[rb], map2(g, &values[ra], |g, other| g * other), assign_b);
                                }
                            }
                        }
                    }
                }
                Op::Neg(a) => {
                    let source = plan.steps[*a].offset;
                    let (head, tail) = grads.split_at_mut(offset);
                    for (target, g) in head[source..source + w].iter_mut().zip(&tail[..w]) {
                        put(target, map1(g, |g| -g), first_a);
                    }
                }
                Op::AnyClass(a) => {
                    // Like torch.amax: the gradient is shared evenly by the maxima.
                    let sa = &plan.steps[*a];
                    let max = values[offset];
                    let mut ties = ZERO;
                    for row in &values[sa.offset..sa.offset + sa.width] {
                        ties = map3(&ties, row, &max, |t, x, m| t + unit(x == m));
                    }
                    let (head, tail) = grads.split_at_mut(offset);
                    let share = map2(&tail[0], &ties, |g, t| g / t.max(1.0));
                    for (target, row) in head[sa.offset..sa.offset + sa.width].iter_mut().zip(&values[sa.offset..]) {
                        put(target, map3(row, &max, &share, |x, m, s| unit(x == m) * s), first_a);
                    }
                }
                Op::Slice { input, start } => {
                    let si = &plan.steps[*input];
                    let (head, tail) = grads.split_at_mut(offset);
                    let rows = &mut head[si.offset..si.offset + si.width];
                    if first_a {
                        // The first contribution: the rows outside the slice take none.
                        rows.fill(ZERO);
                    }
                    for (target, g) in rows[*start..*start + w].iter_mut().zip(&tail[..w]) {
                        put(target, *g, false);
                    }
                }
                Op::Softmax => {
                    let (g, p) = (&grads[offset..offset + c], &values[offset..offset + c]);
                    let mut dot = ZERO;
                    for (g, p) in g.iter().zip(p) {
                        dot = map3(&dot, g, p, |d, g, p| d + g * p);
                    }
                    for ((out, g), p) in dlogits.iter_mut().zip(g).zip(p) {
                        let step = map3(g, p, &dot, |g, p, d| p * (g - d));
                        *out = map2(out, &step, |o, s| o + s);
                    }
                }
                Op::Labels | Op::Valid | Op::Const(_) | Op::Plane(_) => {}
            }
        }
        // The softmax lives in the first stage only (later ones import its frame), so the
        // first stage's sweep, which runs last, writes the logits' gradient.
        if self.stage == 0 {
            let base = tile.image * c * hw + tile.within;
            for (k, row) in dlogits.iter().enumerate() {
                // SAFETY: this tile owns these rows of the gradient.
                let out = unsafe { logit_grads.row(base + k * hw, n) };
                store(out, row);
            }
        }
    }
}

/// `target = value` (`assign`, the first contribution to a gradient row) or `target += value`.
#[inline(always)]
fn put(target: &mut Row, value: Row, assign: bool) {
    *target = if assign { value } else { map2(target, &value, |t, v| t + v) };
}

/// `out = a op b` over the tile's rows (`width` of them), broadcasting one-wide operands.
#[inline(always)]
fn binary(values: &mut [Row], a: &Step, b: &Step, offset: usize, width: usize, f: impl Fn(f32, f32) -> f32) {
    // Operands lie below `offset` (they come before their user).
    let (head, tail) = values.split_at_mut(offset);
    for (k, out) in tail[..width].iter_mut().enumerate() {
        let x = &head[a.offset + if a.width == 1 { 0 } else { k }];
        let y = &head[b.offset + if b.width == 1 { 0 } else { k }];
        *out = map2(x, y, &f);
    }
}
