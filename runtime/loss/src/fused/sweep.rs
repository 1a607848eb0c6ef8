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

use super::lanes::{curve_rows, exp_nonpositive, unit, xor_gradients, xor_rows};
use super::plan::{FusedPlan, Op, Step};
use crate::kernels::scratch;
use crate::kernels::simd::with_best_simd;
use std::ops::Range;

/// Pixels per tile: a row is one 512-bit or two 256-bit vectors.
pub(super) const TILE: usize = 64;

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
        fence();
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
        fence();
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

/// Bytes that threads read, or write in disjoint pieces, through a raw pointer (the
/// masked scatters' marks of the tiles' rows they wrote).
#[derive(Clone, Copy)]
pub(super) struct SharedBytes {
    pub(super) data: *mut u8,
    pub(super) len: usize,
}

// SAFETY: writers touch disjoint pieces, and no sweep reads while one writes.
unsafe impl Send for SharedBytes {}
unsafe impl Sync for SharedBytes {}

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
    /// Per frame, when its gradient is sparse ([`FusedPlan::sparse_grads`]): one byte per
    /// tile row (`[N, width, tiles]`), set where a scatter wrote the row; empty otherwise.
    pub(super) touched: &'a [SharedBytes],
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
    /// `Σ 0·x` over the logits the forward softmax read: NaN once any is infinite or NaN.
    non_finite: Row,
}

impl TileBuffers {
    pub(super) fn new(plan: &FusedPlan) -> TileBuffers {
        // Every row is written before it is read; tests poison the rows to prove it.
        let start = if scratch::poisoning() { [f32::NAN; TILE] } else { ZERO };
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
            non_finite: ZERO,
        }
    }

    /// Whether a logit the forward softmax read was infinite or NaN.
    pub(super) fn saw_non_finite(&self) -> bool {
        self.non_finite.iter().any(|x| x.is_nan())
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

/// Lanes computed together: one 512-bit vector or two 256-bit ones. The row helpers below
/// work chunk by chunk on copies of the operands' chunks and store each result chunk
/// whole: the compiler then keeps the lanes in vector registers (it cannot prove that rows
/// borrowed from different buffers do not overlap, and would otherwise leave the unrolled
/// lanes scalar), and no row-sized temporary is copied.
const CHUNK: usize = 16;

/// Chunk `c` of a row, copied.
#[inline(always)]
fn chunk(row: &Row, c: usize) -> [f32; CHUNK] {
    let mut out = [0.0f32; CHUNK];
    out.copy_from_slice(&row[c * CHUNK..(c + 1) * CHUNK]);
    out
}

/// `out = f(a)`, lane by lane.
#[inline(always)]
fn set1(out: &mut Row, a: &Row, f: impl Fn(f32) -> f32) {
    for c in 0..TILE / CHUNK {
        let a = chunk(a, c);
        let mut r = [0.0f32; CHUNK];
        for j in 0..CHUNK {
            r[j] = f(a[j]);
        }
        out[c * CHUNK..(c + 1) * CHUNK].copy_from_slice(&r);
    }
}

/// `out = f(a, b)`, lane by lane.
#[inline(always)]
fn set2(out: &mut Row, a: &Row, b: &Row, f: impl Fn(f32, f32) -> f32) {
    for c in 0..TILE / CHUNK {
        let (a, b) = (chunk(a, c), chunk(b, c));
        let mut r = [0.0f32; CHUNK];
        for j in 0..CHUNK {
            r[j] = f(a[j], b[j]);
        }
        out[c * CHUNK..(c + 1) * CHUNK].copy_from_slice(&r);
    }
}

/// `out = f(a, b, c)`, lane by lane.
#[inline(always)]
fn set3(out: &mut Row, a: &Row, b: &Row, d: &Row, f: impl Fn(f32, f32, f32) -> f32) {
    for c in 0..TILE / CHUNK {
        let (a, b, d) = (chunk(a, c), chunk(b, c), chunk(d, c));
        let mut r = [0.0f32; CHUNK];
        for j in 0..CHUNK {
            r[j] = f(a[j], b[j], d[j]);
        }
        out[c * CHUNK..(c + 1) * CHUNK].copy_from_slice(&r);
    }
}

/// `target = f(target)`, lane by lane.
#[inline(always)]
fn update0(target: &mut Row, f: impl Fn(f32) -> f32) {
    for c in 0..TILE / CHUNK {
        let t = chunk(target, c);
        let mut r = [0.0f32; CHUNK];
        for j in 0..CHUNK {
            r[j] = f(t[j]);
        }
        target[c * CHUNK..(c + 1) * CHUNK].copy_from_slice(&r);
    }
}

/// `target = f(target, a)`, lane by lane.
#[inline(always)]
fn update1(target: &mut Row, a: &Row, f: impl Fn(f32, f32) -> f32) {
    for c in 0..TILE / CHUNK {
        let (t, a) = (chunk(target, c), chunk(a, c));
        let mut r = [0.0f32; CHUNK];
        for j in 0..CHUNK {
            r[j] = f(t[j], a[j]);
        }
        target[c * CHUNK..(c + 1) * CHUNK].copy_from_slice(&r);
    }
}

/// `target = f(target, a, b)`, lane by lane.
#[inline(always)]
fn update2(target: &mut Row, a: &Row, b: &Row, f: impl Fn(f32, f32, f32) -> f32) {
    for c in 0..TILE / CHUNK {
        let (t, a, b) = (chunk(target, c), chunk(a, c), chunk(b, c));
        let mut r = [0.0f32; CHUNK];
        for j in 0..CHUNK {
            r[j] = f(t[j], a[j], b[j]);
        }
        target[c * CHUNK..(c + 1) * CHUNK].copy_from_slice(&r);
    }
}

/// `out = f(class index)`, lane by lane (the tile's class indices).
#[inline(always)]
fn set_from_classes(out: &mut Row, classes: &[i32; TILE], f: impl Fn(i32) -> f32) {
    for c in 0..TILE / CHUNK {
        let mut k = [0i32; CHUNK];
        k.copy_from_slice(&classes[c * CHUNK..(c + 1) * CHUNK]);
        let mut r = [0.0f32; CHUNK];
        for j in 0..CHUNK {
            r[j] = f(k[j]);
        }
        out[c * CHUNK..(c + 1) * CHUNK].copy_from_slice(&r);
    }
}

/// `target = f(target, a, class index)`, lane by lane.
#[inline(always)]
fn update_with_classes(target: &mut Row, a: &Row, classes: &[i32; TILE], f: impl Fn(f32, f32, i32) -> f32) {
    for c in 0..TILE / CHUNK {
        let (t, a) = (chunk(target, c), chunk(a, c));
        let mut k = [0i32; CHUNK];
        k.copy_from_slice(&classes[c * CHUNK..(c + 1) * CHUNK]);
        let mut r = [0.0f32; CHUNK];
        for j in 0..CHUNK {
            r[j] = f(t[j], a[j], k[j]);
        }
        target[c * CHUNK..(c + 1) * CHUNK].copy_from_slice(&r);
    }
}

/// A gradient contribution `f(a)`: assigned when it is the row's first (`assign`), else added.
#[inline(always)]
fn put1(target: &mut Row, a: &Row, assign: bool, f: impl Fn(f32) -> f32) {
    if assign {
        set1(target, a, f);
    } else {
        update1(target, a, |t, a| t + f(a));
    }
}

/// A gradient contribution `f(a, b)`: assigned when it is the row's first, else added.
#[inline(always)]
fn put2(target: &mut Row, a: &Row, b: &Row, assign: bool, f: impl Fn(f32, f32) -> f32) {
    if assign {
        set2(target, a, b, f);
    } else {
        update2(target, a, b, |t, a, b| t + f(a, b));
    }
}

/// `target = source`, chunk by chunk (a whole-row copy would be a call to `memcpy`).
#[inline(always)]
fn copy_row(target: &mut Row, source: &Row) {
    for c in 0..TILE / CHUNK {
        target[c * CHUNK..(c + 1) * CHUNK].copy_from_slice(&source[c * CHUNK..(c + 1) * CHUNK]);
    }
}

/// `row` = the `n ≤ TILE` values of `source`, zeros after them.
#[inline(always)]
fn load(row: &mut Row, source: &[f32]) {
    if let Ok(full) = <&Row>::try_from(source) {
        copy_row(row, full);
    } else {
        *row = ZERO;
        row[..source.len()].copy_from_slice(source);
    }
}

/// `target += row`, for the first `target.len()` lanes.
#[inline(always)]
fn add_into(target: &mut [f32], row: &Row) {
    if let Ok(full) = <&mut Row>::try_from(&mut *target) {
        update1(full, row, |t, r| t + r);
    } else {
        for (t, &r) in target.iter_mut().zip(row) {
            *t += r;
        }
    }
}

/// `lanes += row`, masked by the lanes of a partial tile.
#[inline(always)]
fn accumulate(lanes: &mut Row, row: &Row, mask: Option<&Row>) {
    match mask {
        None => update1(lanes, row, |t, x| t + x),
        Some(mask) => update2(lanes, row, mask, |t, x, m| t + x * m),
    }
}

/// `target = row`, for the first `target.len()` lanes.
#[inline(always)]
fn store(target: &mut [f32], row: &Row) {
    if let Ok(full) = <&mut Row>::try_from(&mut *target) {
        copy_row(full, row);
    } else {
        let n = target.len();
        target.copy_from_slice(&row[..n]);
    }
}

/// `target = row` for a row that nothing reads again soon (a frame's values or gradients,
/// the logits' gradient): a whole row at a 16-byte boundary is written with streaming
/// stores, which skip reading the lines first (the frames do not fit in the caches).
/// Measured on BF1 (4×21×256×256): the sweeps 0.3 to 0.9 ms faster each, the poolings that
/// read the frames next unchanged.
#[inline(always)]
fn store_out(target: &mut [f32], row: &Row) {
    #[cfg(target_arch = "x86_64")]
    if target.len() == TILE && target.as_ptr().align_offset(16) == 0 {
        use std::arch::x86_64::{_mm_loadu_ps, _mm_stream_ps};
        for j in (0..TILE).step_by(4) {
            // SAFETY: `j + 4 ≤ TILE = target.len()`, and the address is 16-byte aligned.
            unsafe { _mm_stream_ps(target.as_mut_ptr().add(j), _mm_loadu_ps(row.as_ptr().add(j))) };
        }
        return;
    }
    store(target, row);
}

/// Make this thread's streaming stores visible before its part of a sweep ends.
#[inline(always)]
fn fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a store fence has no other effect.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
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
        // Checked labels are classes in `0..C` or the ignore label.
        let ignore = self.ignore;
        if let Ok(full) = <&[i64; TILE]>::try_from(labels) {
            let full = *full;
            let mut classes = [0i32; TILE];
            for j in 0..TILE {
                classes[j] = if full[j] == ignore { -1 } else { full[j] as i32 };
            }
            b.classes_of = classes;
            b.live = [1.0; TILE];
        } else {
            b.classes_of = [-1; TILE];
            b.live = ZERO;
            for ((class, live), &label) in b.classes_of.iter_mut().zip(b.live.iter_mut()).zip(labels) {
                *class = if label == ignore { -1 } else { label as i32 };
                *live = 1.0;
            }
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
        let TileBuffers { values, slopes, lanes, counts, classes_of, live, log_norm, non_finite, .. } = b;
        for (index, step) in self.plan.steps.iter().enumerate() {
            if step.stage != self.stage || (backward && !self.plan.back_value[index]) || self.plan.absorbed[index] {
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
                // The backward sweep reads an exported softmax back from its frame (a pooling
                // needed it there anyway) instead of computing it again.
                Op::Softmax if backward && step.export.is_some() => {
                    let frame = self.frames[step.export.expect("checked")];
                    for k in 0..c {
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
                        update1(&mut max, row, f32::max);
                    }
                    if !backward {
                        // The logits' finiteness check (the input checks leave it here).
                        for row in rows.iter() {
                            update1(non_finite, row, |acc, x| x.mul_add(0.0, acc));
                        }
                    }
                    let mut sum = ZERO;
                    for row in rows.iter_mut() {
                        update1(row, &max, |x, m| exp_nonpositive(x - m));
                        update1(&mut sum, row, |s, e| s + e);
                    }
                    update0(&mut sum, |s| 1.0 / s);
                    for row in rows.iter_mut() {
                        update1(row, &sum, |p, inverse| p * inverse);
                    }
                    if self.plan.cross_entropy && !backward {
                        // ln Σ = −ln(1/Σ).
                        set2(log_norm, &max, &sum, |m, inverse| m - inverse.ln());
                    }
                }
                Op::Labels => {
                    for (k, row) in values[offset..offset + w].iter_mut().enumerate() {
                        set_from_classes(row, classes_of, |class| unit(class == k as i32));
                    }
                }
                Op::Valid => {
                    set_from_classes(&mut values[offset], classes_of, |class| unit(class >= 0));
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
                Op::Or(a, b) => {
                    binary(values, &self.plan.steps[*a], &self.plan.steps[*b], offset, w, |x, y| x + y - x * y)
                }
                Op::Xor { a, b, curves } => {
                    let (a, b) = (self.plan.steps[*a].offset, self.plan.steps[*b].offset);
                    let (head, tail) = values.split_at_mut(offset);
                    xor_rows(&head[a..a + w], &head[b..b + w], &mut tail[..w], curves);
                }
                Op::Neg(a) => {
                    let source = self.plan.steps[*a].offset;
                    let (head, tail) = values.split_at_mut(offset);
                    for (target, x) in tail[..w].iter_mut().zip(&head[source..source + w]) {
                        set1(target, x, |x| -x);
                    }
                }
                Op::AnyClass(a) => {
                    let sa = &self.plan.steps[*a];
                    let (head, tail) = values.split_at_mut(offset);
                    let mut max = [f32::NEG_INFINITY; TILE];
                    for row in &head[sa.offset..sa.offset + sa.width] {
                        update1(&mut max, row, f32::max);
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
                Op::CountProduct { a, b, width, count } => {
                    let (sa, sb) = (&self.plan.steps[*a], &self.plan.steps[*b]);
                    let operands = |k: usize| {
                        let x = &values[sa.offset + if sa.width == 1 { 0 } else { k }];
                        let y = &values[sb.offset + if sb.width == 1 { 0 } else { k }];
                        (x, y)
                    };
                    let target = &mut lanes[*count];
                    let mask = (n < TILE).then_some(&*live);
                    let widths = (*width, target.len());
                    for k in 0..widths.0.max(widths.1) {
                        // A scalar count sums every row; a one-wide set counts for every class.
                        let (row, slot) = if widths.1 == 1 { (k, 0) } else { (if widths.0 == 1 { 0 } else { k }, k) };
                        let (x, y) = operands(row);
                        let into = &mut target[slot];
                        match mask {
                            None => update2(into, x, y, |t, x, y| t + x * y),
                            Some(mask) => {
                                let mut product = ZERO;
                                set2(&mut product, x, y, |x, y| x * y);
                                update2(into, &product, mask, |t, p, m| t + p * m);
                            }
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
                    store_out(stored, &values[offset + k]);
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
            if let Some(index) = step.export {
                let (frame, touched) = (self.frames[index], self.touched[index]);
                for k in 0..step.width {
                    if touched.len > 0 {
                        let mark = (tile.image * frame.width + k) * self.tiles_per_image + tile.within / TILE;
                        assert!(mark < touched.len, "a tile row's mark");
                        // SAFETY: inside the marks (checked); no scatter runs during a sweep.
                        if unsafe { *touched.data.add(mark) } == 0 {
                            // No scatter wrote this row: its gradient is zero (never zeroed).
                            grads[step.offset + k] = ZERO;
                            continue;
                        }
                    }
                    // SAFETY: this tile owns these rows of the frame; only read here.
                    let later = unsafe { self.frame_row(&frame.grads, frame.width, tile, k) };
                    load(&mut grads[step.offset + k], later);
                }
            }
        }
        for (index, step) in plan.steps.iter().enumerate().rev() {
            if step.stage != self.stage
                || plan.absorbed[index]
                || !(plan.grad_written[index]
                    || matches!(step.op, Op::Count { .. } | Op::CountProduct { .. } | Op::NllSum { .. }))
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
                        if plan.import_assigns[index] {
                            store_out(target, &grads[offset + k]);
                        } else {
                            add_into(target, &grads[offset + k]);
                        }
                    }
                }
                Op::Count { input, count } => {
                    let si = &plan.steps[*input];
                    let upstream = &count_grads[*count];
                    for (k, row) in grads[si.offset..si.offset + si.width].iter_mut().enumerate() {
                        let g = count_gradient(upstream, si.width, k);
                        if first_a {
                            *row = [g; TILE];
                        } else {
                            update0(row, |t| t + g);
                        }
                    }
                }
                Op::CountProduct { a, b, width, count } => {
                    let (sa, sb) = (&plan.steps[*a], &plan.steps[*b]);
                    let (to_a, to_b) = (plan.pred[*a], plan.pred[*b]);
                    let upstream = &count_grads[*count];
                    for k in 0..*width {
                        let g = count_gradient(upstream, *width, k);
                        let ra = sa.offset + if sa.width == 1 { 0 } else { k };
                        let rb = sb.offset + if sb.width == 1 { 0 } else { k };
                        if to_a {
                            let assign = first_a && (sa.width > 1 || k == 0);
                            put1(&mut grads[ra], &values[rb], assign, |y| g * y);
                        }
                        if to_b {
                            let assign = first_b && (sb.width > 1 || k == 0);
                            put1(&mut grads[rb], &values[ra], assign, |x| g * x);
                        }
                    }
                }
                Op::NllSum { count, softmax } => {
                    let g = count_grads[*count][0];
                    let probabilities = &values[plan.steps[*softmax].offset..][..c];
                    for (k, (out, p)) in dlogits.iter_mut().zip(probabilities).enumerate() {
                        update_with_classes(out, p, classes_of, |o, p, class| {
                            o + unit(class >= 0) * g * (p - unit(class == k as i32))
                        });
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
                        put2(target, g, d, first_a, |g, d| g * d);
                    }
                }
                Op::Add(a, b) | Op::Sub(a, b) | Op::Mul(a, b) | Op::Or(a, b) => {
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
                                    put1(&mut head[ra], g, assign_a, |g| g);
                                }
                                if to_b {
                                    put1(&mut head[rb], g, assign_b, |g| g);
                                }
                            }
                            Op::Sub(..) => {
                                if to_a {
                                    put1(&mut head[ra], g, assign_a, |g| g);
                                }
                                if to_b {
                                    put1(&mut head[rb], g, assign_b, |g| -g);
                                }
                            }
                            Op::Or(..) => {
                                // d(a + b − a·b) = (1 − b)·da + (1 − a)·db.
                                if to_a {
                                    put2(&mut head[ra], g, &values[rb], assign_a, |g, other| g * (1.0 - other));
                                }
                                if to_b {
                                    put2(&mut head[rb], g, &values[ra], assign_b, |g, other| g * (1.0 - other));
                                }
                            }
                            _ => {
                                if to_a {
                                    put2(&mut head[ra], g, &values[rb], assign_a, |g, other| g * other);
                                }
                                if to_b {
                                    put2(&mut head[rb], g, &values[ra], assign_b, |g, other| g * other);
                                }
                            }
                        }
                    }
                }
                Op::Xor { a, b, curves } => {
                    let (ra, rb) = (plan.steps[*a].offset, plan.steps[*b].offset);
                    let (to_a, to_b) = (plan.pred[*a], plan.pred[*b]);
                    let (head, tail) = grads.split_at_mut(offset);
                    for (k, g) in tail[..w].iter().enumerate() {
                        let (da, db) = xor_gradients(&values[ra + k], &values[rb + k], g, curves);
                        if to_a {
                            put1(&mut head[ra + k], &da, first_a, |d| d);
                        }
                        if to_b {
                            put1(&mut head[rb + k], &db, first_b, |d| d);
                        }
                    }
                }
                Op::Neg(a) => {
                    let source = plan.steps[*a].offset;
                    let (head, tail) = grads.split_at_mut(offset);
                    for (target, g) in head[source..source + w].iter_mut().zip(&tail[..w]) {
                        put1(target, g, first_a, |g| -g);
                    }
                }
                Op::AnyClass(a) => {
                    // Like torch.amax: the gradient is shared evenly by the maxima.
                    let sa = &plan.steps[*a];
                    let max = values[offset];
                    let mut ties = ZERO;
                    for row in &values[sa.offset..sa.offset + sa.width] {
                        update2(&mut ties, row, &max, |t, x, m| t + unit(x == m));
                    }
                    let (head, tail) = grads.split_at_mut(offset);
                    let mut share = ZERO;
                    set2(&mut share, &tail[0], &ties, |g, t| g / t.max(1.0));
                    for (target, row) in head[sa.offset..sa.offset + sa.width].iter_mut().zip(&values[sa.offset..]) {
                        let mut picked = ZERO;
                        set2(&mut picked, row, &max, |x, m| unit(x == m));
                        put2(target, &picked, &share, first_a, |p, s| p * s);
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
                        update1(target, g, |t, g| t + g);
                    }
                }
                Op::Softmax => {
                    let (g, p) = (&grads[offset..offset + c], &values[offset..offset + c]);
                    let mut dot = ZERO;
                    for (g, p) in g.iter().zip(p) {
                        update2(&mut dot, g, p, |d, g, p| d + g * p);
                    }
                    for ((out, g), p) in dlogits.iter_mut().zip(g).zip(p) {
                        let mut step = ZERO;
                        set3(&mut step, g, p, &dot, |g, p, d| p * (g - d));
                        update1(out, &step, |o, s| o + s);
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
                store_out(out, row);
            }
        }
    }
}

/// The gradient of row `k` of a counted set `width` rows wide, from `∂loss/∂count`: one
/// number for a scalar count (every row is summed), the row's class otherwise, and for a
/// one-wide set counted per class the sum over the classes.
#[inline(always)]
fn count_gradient(upstream: &[f32], width: usize, k: usize) -> f32 {
    if upstream.len() == 1 {
        upstream[0]
    } else if width == 1 {
        upstream.iter().sum()
    } else {
        upstream[k]
    }
}

/// `out = a op b` over the tile's rows (`width` of them), broadcasting one-wide operands.
#[inline(always)]
fn binary(values: &mut [Row], a: &Step, b: &Step, offset: usize, width: usize, f: impl Fn(f32, f32) -> f32) {
    // Operands lie below `offset` (they come before their user).
    let (head, tail) = values.split_at_mut(offset);
    for (k, out) in tail[..width].iter_mut().enumerate() {
        let x = &head[a.offset + if a.width == 1 { 0 } else { k }];
        let y = &head[b.offset + if b.width == 1 { 0 } else { k }];
        set2(out, x, y, &f);
    }
}
