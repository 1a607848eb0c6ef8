//! Square-window pooling on `[H, W]` planes: the window minimum (erosion) or maximum
//! (dilation), clipped at the border as `max_pool2d`'s −∞ padding clips it, and each
//! output's *winner* (the pixel whose value it took), which the backward pass of a pooling
//! scatters its gradient to.
//!
//! Guarantees: values equal libtorch's separable `max_pool2d` pair (`[k, 1]` then `[1, k]`)
//! exactly, and on ties the winner is the one that pair picks (the first in the column pass,
//! then in the row pass), so gradients equal too. Every loop is written to vectorize and is
//! compiled for the best SIMD level; planes are split over the cores.

use super::parallel::run_parts;
use super::plane_chunk;
use super::simd::with_best_simd;

/// The window minimum (`erode`) or maximum of every `[h, w]` plane of `input` into `output`.
pub(crate) fn pool(input: &[f32], output: &mut [f32], (h, w): (usize, usize), radius: usize, erode: bool) {
    let plane = h * w;
    if plane == 0 || input.is_empty() {
        return;
    }
    let chunk = plane_chunk(input.len(), plane);
    run_parts(input.chunks(chunk).zip(output.chunks_mut(chunk)).collect(), |(inputs, outputs)| {
        pool_planes(inputs, outputs, h, w, radius, erode)
    });
}

/// [`pool`] for byte planes (the label planes).
pub(crate) fn pool_bytes(input: &[i8], output: &mut [i8], (h, w): (usize, usize), radius: usize, erode: bool) {
    let plane = h * w;
    if plane == 0 || input.is_empty() {
        return;
    }
    let chunk = plane_chunk(input.len(), plane);
    run_parts(input.chunks(chunk).zip(output.chunks_mut(chunk)).collect(), |(inputs, outputs)| {
        byte_planes(inputs, outputs, h, w, radius, erode)
    });
}

with_best_simd!(
    byte_planes,
    (inputs: &[i8], outputs: &mut [i8], h: usize, w: usize, radius: usize, erode: bool),
    {
        if erode {
            pool_planes_of(inputs, outputs, h, w, radius, i8::MAX, Ord::min)
        } else {
            pool_planes_of(inputs, outputs, h, w, radius, i8::MIN, Ord::max)
        }
    }
);

/// For every pixel of every `[H, W]` plane, the flat index (`y·W + x`) of the maximum
/// (minimum for erosion) of its clipped square window: the first one met in the column
/// pass, then in the row pass, like the separable `max_pool2d` pair. Each pass sweeps the
/// window's offsets over whole rows with compare-and-select, so it vectorizes. The winners go to
/// `winners` (one per input value, an index within its plane).
pub(crate) fn winners(input: &[f32], winners: &mut [i64], (h, w): (usize, usize), radius: usize, erode: bool) {
    let plane = h * w;
    if plane == 0 || input.is_empty() {
        return;
    }
    let chunk = plane_chunk(input.len(), plane);
    run_parts(input.chunks(chunk).zip(winners.chunks_mut(chunk)).collect(), |(inputs, outputs)| {
        winner_planes(inputs, outputs, h, w, radius, erode)
    });
}

with_best_simd!(
    pool_planes,
    (inputs: &[f32], outputs: &mut [f32], h: usize, w: usize, radius: usize, erode: bool),
    {
        if erode {
            pool_planes_of(inputs, outputs, h, w, radius, f32::INFINITY, f32::min)
        } else {
            pool_planes_of(inputs, outputs, h, w, radius, f32::NEG_INFINITY, f32::max)
        }
    }
);

/// Square-window `combine` (min or max) of every `[H, W]` plane of `inputs`, the window clipped
/// at the border (`neutral`, the identity of `combine`, pads it): a row pass, then a column
/// pass, each by doubling (a window of 2^k values combined from two of 2^(k−1), then the
/// last span from two overlapping ones), so a window of `2r + 1` costs about `log2(2r + 1)`
/// passes instead of `2r`. Every pass is a contiguous sweep over whole padded rows (or whole
/// planes, for the column pass), so it vectorizes with no remainder per shift. Inlined into
/// each SIMD version; shared by the float and byte planes.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pool_planes_of<T: Copy + Default>(
    inputs: &[T],
    outputs: &mut [T],
    h: usize,
    w: usize,
    radius: usize,
    neutral: T,
    combine: impl Fn(T, T) -> T + Copy,
) {
    let plane = h * w;
    let span = 2 * radius + 1;
    // Padded rows (the row pass), then padded planes (the column pass), with a second
    // buffer for the doubling passes.
    // `SLACK` past the end lets every pass run a whole number of vectors (see
    // `window_by_doubling`).
    let longest = (w + 2 * radius).max((h + 2 * radius) * w) + SLACK;
    let (mut a, mut b) = (vec![neutral; longest], vec![neutral; longest]);
    let mut columns = vec![neutral; (h + 2 * radius) * w + SLACK];
    for (source, target) in inputs.chunks(plane).zip(outputs.chunks_mut(plane)) {
        // Row pass: each row into the padded plane of the column pass, between `radius`
        // neutral rows on either side (the doubling used the plane as scratch before).
        columns[..radius * w].fill(neutral);
        columns[(radius + h) * w..].fill(neutral);
        for (y, line) in source.chunks(w).enumerate() {
            a[..radius].fill(neutral);
            a[radius..radius + w].copy_from_slice(line);
            a[radius + w..w + 2 * radius].fill(neutral);
            let result = window_by_doubling(&mut a, &mut b, w, span, 1, combine);
            columns[(radius + y) * w..(radius + y + 1) * w].copy_from_slice(&result[..w]);
        }
        // Column pass over the whole padded plane, one row of `w` values per element.
        let result = window_by_doubling(&mut columns, &mut b, h, span, w, combine);
        target.copy_from_slice(&result[..plane]);
    }
}

/// Values past a pooling buffer's end so that each pass can run in whole blocks of this many.
const SLACK: usize = 64;

/// Sliding-window `combine` of `span` consecutive elements (each `stride` values) of `a`,
/// which holds `elements + span − 1` of them: the window starting at each of the first
/// `elements` elements, returned as a prefix of `a` or `b` (the other is scratch). Doubling:
/// after step k an element holds the combination of 2^k consecutive ones; the last step
/// combines two overlapping windows (exact for min and max).
#[inline(always)]
fn window_by_doubling<'b, T: Copy>(
    a: &'b mut [T],
    b: &'b mut [T],
    elements: usize,
    span: usize,
    stride: usize,
    combine: impl Fn(T, T) -> T + Copy,
) -> &'b [T] {
    let (mut from, mut to) = (a, b);
    let mut covered = 1;
    let shift = |from: &[T], to: &mut [T], count: usize, by: usize| {
        // Rounded up to whole blocks where the buffers' slack allows: the values past
        // `count` elements are scratch nobody reads, and the loop needs no scalar remainder.
        let exact = count * stride;
        let rounded = exact.next_multiple_of(SLACK);
        let n = if by * stride + rounded <= from.len() && rounded <= to.len() { rounded } else { exact };
        for ((o, &x), &y) in to[..n].iter_mut().zip(&from[..n]).zip(&from[by * stride..by * stride + n]) {
            *o = combine(x, y);
        }
    };
    while covered * 2 <= span {
        // Elements still whole after this step: those whose 2·covered window fits.
        let count = elements + span - 2 * covered;
        shift(from, to, count, covered);
        std::mem::swap(&mut from, &mut to);
        covered *= 2;
    }
    if covered < span {
        shift(from, to, elements, span - covered);
        std::mem::swap(&mut from, &mut to);
    }
    from
}

/// `if take { a } else { b }` on bit patterns, so loops using it vectorize.
#[inline(always)]
fn select_bits(take: bool, a: u32, b: u32) -> u32 {
    let mask = 0u32.wrapping_sub(u32::from(take));
    (a & mask) | (b & !mask)
}

with_best_simd!(
    winner_planes,
    (inputs: &[f32], outputs: &mut [i64], h: usize, w: usize, radius: usize, erode: bool),
    {
        if erode {
            winners_of_planes::<true, i64>(inputs, outputs, None, None, h, w, radius)
        } else {
            winners_of_planes::<false, i64>(inputs, outputs, None, None, h, w, radius)
        }
    }
);

with_best_simd!(
    winner_planes_u32,
    (
        inputs: &[f32],
        outputs: &mut [u32],
        values: &mut [f32],
        mask: Option<PlaneMask<'_>>,
        h: usize,
        w: usize,
        radius: usize,
        erode: bool
    ),
    {
        if erode {
            winners_of_planes::<true, u32>(inputs, outputs, Some(values), mask, h, w, radius)
        } else {
            winners_of_planes::<false, u32>(inputs, outputs, Some(values), mask, h, w, radius)
        }
    }
);

/// Where a pooled frame's values matter: a label plane `[N, width, H, W]` (bytes, one
/// plane for every class when `width` is 1) that is 0 where the pooled value is only ever
/// multiplied by 0 (a dilated prediction boundary counted on label boundaries).
#[derive(Clone, Copy)]
pub(crate) struct Mask<'a> {
    pub(crate) data: &'a [i8],
    pub(crate) width: usize,
}

/// A [`Mask`] as the planes of one part of a frame see it: planes from `first` on, of a
/// frame `frame_width` planes per image.
#[derive(Clone, Copy)]
struct PlaneMask<'a> {
    mask: Mask<'a>,
    first: usize,
    frame_width: usize,
}

impl<'a> PlaneMask<'a> {
    /// The mask of the part's plane `index`.
    fn plane(&self, index: usize, plane: usize) -> &'a [i8] {
        let global = self.first + index;
        let (image, class) = (global / self.frame_width, global % self.frame_width);
        let row = image * self.mask.width + if self.mask.width == 1 { 0 } else { class };
        &self.mask.data[row * plane..(row + 1) * plane]
    }
}

/// Window winners (as [`winners`] finds them, index within the plane) of every
/// `[H, W]` plane of `input` (`[N, frame_width, H, W]`) into `winners`, and their values (the
/// pooled planes) into `values`, split over the cores (the fused kernel's pooling stage;
/// inputs are finite). With a `mask`, blocks of pixels where it is 0 are not searched: their
/// value is 0 and their winner themselves.
pub(crate) fn window_winners(
    input: &[f32],
    winners: &mut [u32],
    values: &mut [f32],
    (h, w): (usize, usize),
    radius: usize,
    erode: bool,
    mask: Option<(Mask<'_>, usize)>,
) {
    let plane = h * w;
    if plane == 0 || input.is_empty() {
        return;
    }
    let chunk = plane_chunk(input.len(), plane);
    let parts: Vec<_> =
        input.chunks(chunk).zip(winners.chunks_mut(chunk)).zip(values.chunks_mut(chunk)).enumerate().collect();
    run_parts(parts, |(part, ((inputs, outputs), values))| {
        let mask = mask.map(|(mask, frame_width)| PlaneMask { mask, first: part * chunk / plane, frame_width });
        winner_planes_u32(inputs, outputs, values, mask, h, w, radius, erode)
    });
}

/// Per `[H, W]` plane of `input` (`[N, frame_width, H, W]`), the sum over the pixels where
/// `mask` is set of the mask's value times the window's maximum (minimum for erosion), with
/// those pixels' winners in `winners` (other pixels' winners are not written): a masked
/// pooling's counts, without writing the pooled planes. The search is sparse: rows without
/// a masked pixel are skipped a word at a time, and a row's column pass runs only for the
/// columns some masked pixel's window reads (BF1's label boundaries mark about 1% of a
/// class's plane). Values, winners and ties equal [`window_winners`]'.
pub(crate) fn masked_pooled_sums(
    input: &[f32],
    winners: &mut [u32],
    (h, w): (usize, usize),
    radius: usize,
    erode: bool,
    mask: Mask<'_>,
    frame_width: usize,
) -> Vec<f64> {
    let plane = h * w;
    if plane == 0 || input.is_empty() {
        return Vec::new();
    }
    let mut sums = vec![0.0f64; input.len() / plane];
    let chunk = plane_chunk(input.len(), plane);
    let parts: Vec<_> =
        input.chunks(chunk).zip(winners.chunks_mut(chunk)).zip(sums.chunks_mut(chunk / plane)).enumerate().collect();
    run_parts(parts, |(part, ((inputs, outputs), sums))| {
        let mask = PlaneMask { mask, first: part * chunk / plane, frame_width };
        let mut columns = SparseColumns::new(w);
        for (index, ((source, out), sum)) in inputs.chunks(plane).zip(outputs.chunks_mut(plane)).zip(sums).enumerate() {
            *sum = if erode {
                columns.masked_plane::<true>(source, mask.plane(index, plane), out, h, radius)
            } else {
                columns.masked_plane::<false>(source, mask.plane(index, plane), out, h, radius)
            };
        }
    });
    sums
}

/// The nonzero positions of a byte row, skipping zero words (masks are mostly zero).
fn set_positions(row: &[i8]) -> impl Iterator<Item = usize> + '_ {
    const WORD: usize = 8;
    let words = row.len() / WORD;
    (0..words)
        .filter(move |&word| {
            let bytes: [i8; WORD] = row[word * WORD..][..WORD].try_into().expect("a word");
            u64::from_ne_bytes(bytes.map(|b| b as u8)) != 0
        })
        .flat_map(move |word| word * WORD..(word + 1) * WORD)
        .chain(words * WORD..row.len())
        .filter(move |&x| row[x] != 0)
}

/// One row's column-pass results, computed on demand for a sparse search.
struct SparseColumns {
    value: Vec<f32>,
    index: Vec<u32>,
    /// The row each column's entry was computed for (`usize::MAX`: none yet).
    row: Vec<usize>,
}

impl SparseColumns {
    fn new(w: usize) -> SparseColumns {
        SparseColumns { value: vec![0.0; w], index: vec![0; w], row: vec![usize::MAX; w] }
    }

    /// The masked sum and winners of one plane (see [`masked_pooled_sums`]).
    fn masked_plane<const ERODE: bool>(
        &mut self,
        source: &[f32],
        mask: &[i8],
        winners: &mut [u32],
        h: usize,
        radius: usize,
    ) -> f64 {
        let w = self.value.len();
        let sentinel = if ERODE { f32::INFINITY } else { f32::NEG_INFINITY };
        let better = |c: f32, best: f32| if ERODE { c < best } else { c > best };
        self.row.fill(usize::MAX);
        let mut sum = 0.0f64;
        for y in 0..h {
            let rows = y.saturating_sub(radius)..(y + radius + 1).min(h);
            for x in set_positions(&mask[y * w..(y + 1) * w]) {
                let columns = x.saturating_sub(radius)..(x + radius + 1).min(w);
                // The column pass first (as the separable reference): rows in order, the
                // first strictly better wins.
                for c in columns.clone() {
                    if self.row[c] != y {
                        let (mut v, mut i) = (sentinel, (y * w + c) as u32);
                        for r in rows.clone() {
                            if better(source[r * w + c], v) {
                                (v, i) = (source[r * w + c], (r * w + c) as u32);
                            }
                        }
                        (self.value[c], self.index[c], self.row[c]) = (v, i, y);
                    }
                }
                // Then the row pass over the window's columns, in order.
                let (mut v, mut i) = (sentinel, self.index[x]);
                for c in columns {
                    if better(self.value[c], v) {
                        (v, i) = (self.value[c], self.index[c]);
                    }
                }
                winners[y * w + x] = i;
                sum += f64::from(mask[y * w + x]) * f64::from(v);
            }
        }
        sum
    }
}

/// The backward of [`masked_pooled_sums`]: `target[winner] += upstream[class] · mask` for
/// every pixel where the mask is set, plane by plane (`upstream` per class of the frame).
///
/// With `touched` (one byte per segment of `segment` values of each plane, all 0 on entry),
/// `target` need not be zeroed first: a segment is zeroed when the scatter first writes into
/// it, and marked; the unmarked segments are zero for whoever reads the gradient next (the
/// fused kernel's sweep, which then skips reading them). The winners of a masked pooling are
/// few, so most of a frame's gradient is then neither zeroed nor read.
pub(crate) fn masked_scatter(
    upstream: &[f32],
    winners: &[u32],
    mask: Mask<'_>,
    frame_width: usize,
    target: &mut [f32],
    plane: usize,
    touched: Option<(&mut [u8], usize)>,
) {
    let chunk = plane_chunk(target.len(), plane);
    let segment = touched.as_ref().map_or(1, |(_, segment)| (*segment).max(1));
    let segments = plane.div_ceil(segment);
    let marks: Vec<Option<&mut [u8]>> = match touched {
        Some((touched, _)) => touched.chunks_mut(chunk / plane * segments).map(Some).collect(),
        None => (0..target.len().div_ceil(chunk)).map(|_| None).collect(),
    };
    let parts: Vec<_> = winners.chunks(chunk).zip(target.chunks_mut(chunk)).zip(marks).enumerate().collect();
    run_parts(parts, |(part, ((winners, target), mut marks))| {
        let planes = PlaneMask { mask, first: part * chunk / plane, frame_width };
        for (index, (winners, target)) in winners.chunks(plane).zip(target.chunks_mut(plane)).enumerate() {
            let g = upstream[(planes.first + index) % frame_width];
            if g == 0.0 {
                continue;
            }
            let mask = planes.plane(index, plane);
            let mut marks = marks.as_deref_mut().map(|marks| &mut marks[index * segments..(index + 1) * segments]);
            for p in set_positions(mask) {
                let winner = winners[p] as usize;
                if let Some(marks) = marks.as_deref_mut() {
                    let at = winner / segment;
                    if marks[at] == 0 {
                        marks[at] = 1;
                        target[at * segment..((at + 1) * segment).min(plane)].fill(0.0);
                    }
                }
                target[winner] += g * f32::from(mask[p]);
            }
        }
    });
}

/// The body of [`winners`] for some planes (inlined into each SIMD version).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn winners_of_planes<const ERODE: bool, T: From<u32> + Copy>(
    inputs: &[f32],
    outputs: &mut [T],
    mut values: Option<&mut [f32]>,
    mask: Option<PlaneMask<'_>>,
    h: usize,
    w: usize,
    radius: usize,
) {
    const L: usize = WINNER_LANES;
    let plane = h * w;
    // Strictly better, so the first of equal values wins; the sentinel never does.
    let sentinel = if ERODE { f32::INFINITY } else { f32::NEG_INFINITY };
    let better = |c: f32, best: f32| if ERODE { c < best } else { c > best };
    // The column pass comes first, as in the reference (`[k, 1]` then `[1, k]`), so ties
    // pick the same winner.
    let mut column_value = vec![0.0f32; plane];
    let mut column_index = vec![0u32; plane];
    let mut padded_value = vec![sentinel; w + 2 * radius];
    let mut padded_index = vec![0u32; w + 2 * radius];
    let blocks = w / L * L;
    // With a mask: per row, which blocks hold a masked pixel, and which blocks' column pass
    // a marked block's row pass reads (those within `reach` blocks).
    let reach = radius.div_ceil(L);
    let nblocks = blocks / L;
    // Per row of the plane: which blocks hold a masked pixel, and which blocks' column pass
    // a marked block's row pass reads (those within `reach` blocks, and those within reach of
    // the pixels past the last whole block, which are always searched).
    let mut marks = vec![true; h * nblocks];
    let mut needs = vec![true; h * nblocks];
    let (mut marked, mut columns_needed) = (vec![true; nblocks], vec![true; nblocks]);
    for (index, (source, target)) in inputs.chunks(plane).zip(outputs.chunks_mut(plane)).enumerate() {
        let mask_plane = mask.map(|mask| mask.plane(index, plane));
        if let Some(m) = mask_plane {
            for y in 0..h {
                let row = &m[y * w..(y + 1) * w];
                let (marks, needs) =
                    (&mut marks[y * nblocks..(y + 1) * nblocks], &mut needs[y * nblocks..(y + 1) * nblocks]);
                for (b, mark) in marks.iter_mut().enumerate() {
                    let block: &[i8; L] = row[b * L..][..L].try_into().expect("a block");
                    *mark = *block != [0i8; L];
                }
                let tail_marked = row[blocks..].iter().any(|&x| x != 0);
                for b in 0..nblocks {
                    let (low, high) = (b.saturating_sub(reach), (b + reach + 1).min(nblocks));
                    needs[b] = marks[low..high].iter().any(|&x| x) || (tail_marked && b + reach >= nblocks);
                }
            }
        }
        let mark_row = |y: usize, marked: &mut [bool], columns_needed: &mut [bool]| {
            if mask_plane.is_some() {
                marked.copy_from_slice(&marks[y * nblocks..(y + 1) * nblocks]);
                columns_needed.copy_from_slice(&needs[y * nblocks..(y + 1) * nblocks]);
            }
        };
        for y in 0..h {
            mark_row(y, &mut marked, &mut columns_needed);
            let rows = y.saturating_sub(radius)..(y + radius + 1).min(h);
            for start in (0..blocks).step_by(L) {
                if !columns_needed[start / L] {
                    continue;
                }
                // The pixel itself always qualifies, so no stale index survives (even for
                // NaN or infinite values).
                let mut v = [sentinel; L];
                let mut i: [u32; L] = std::array::from_fn(|lane| (y * w + start + lane) as u32);
                for row in rows.clone() {
                    let c: &[f32; L] = source[row * w + start..][..L].try_into().expect("a block");
                    let ci: [u32; L] = std::array::from_fn(|lane| (row * w + start + lane) as u32);
                    take_better::<ERODE, L>(&mut v, &mut i, c, &ci);
                }
                column_value[y * w + start..][..L].copy_from_slice(&v);
                column_index[y * w + start..][..L].copy_from_slice(&i);
            }
            for x in blocks..w {
                let (mut v, mut i) = (sentinel, (y * w + x) as u32);
                for row in rows.clone() {
                    if better(source[row * w + x], v) {
                        (v, i) = (source[row * w + x], (row * w + x) as u32);
                    }
                }
                column_value[y * w + x] = v;
                column_index[y * w + x] = i;
            }
        }
        for y in 0..h {
            mark_row(y, &mut marked, &mut columns_needed);
            padded_value[radius..radius + w].copy_from_slice(&column_value[y * w..(y + 1) * w]);
            padded_index[radius..radius + w].copy_from_slice(&column_index[y * w..(y + 1) * w]);
            let own = &column_index[y * w..(y + 1) * w];
            let out = &mut target[y * w..(y + 1) * w];
            // The winners' values too, when asked for (the fused kernel's pooled frame).
            let mut out_values =
                values.as_deref_mut().map(|v| &mut v[index * plane + y * w..index * plane + (y + 1) * w]);
            for start in (0..blocks).step_by(L) {
                if !marked[start / L] {
                    // Nothing reads these values but through a 0: any finite value will do,
                    // and each pixel its own winner (its gradient, 0, is not scattered).
                    for (lane, t) in out[start..][..L].iter_mut().enumerate() {
                        *t = T::from((y * w + start + lane) as u32);
                    }
                    if let Some(out_values) = out_values.as_deref_mut() {
                        out_values[start..][..L].fill(0.0);
                    }
                    continue;
                }
                let mut v = [sentinel; L];
                let mut i: [u32; L] = own[start..][..L].try_into().expect("a block");
                for offset in 0..=2 * radius {
                    let c: &[f32; L] = padded_value[offset + start..][..L].try_into().expect("a block");
                    let ci: &[u32; L] = padded_index[offset + start..][..L].try_into().expect("a block");
                    take_better::<ERODE, L>(&mut v, &mut i, c, ci);
                }
                for (t, &index) in out[start..][..L].iter_mut().zip(&i) {
                    *t = T::from(index);
                }
                if let Some(out_values) = out_values.as_deref_mut() {
                    out_values[start..][..L].copy_from_slice(&v);
                }
            }
            for x in blocks..w {
                let (mut v, mut i) = (sentinel, own[x]);
                for offset in 0..=2 * radius {
                    if better(padded_value[offset + x], v) {
                        (v, i) = (padded_value[offset + x], padded_index[offset + x]);
                    }
                }
                out[x] = T::from(i);
                if let Some(out_values) = out_values.as_deref_mut() {
                    out_values[x] = v;
                }
            }
        }
    }
}

/// Lanes kept in registers while a block of pixels runs through its window.
const WINNER_LANES: usize = 16;

/// One window step for a block of lanes: where the candidate is strictly better (first wins
/// ties), take its value and index. A compare and two bit selects per lane, on arrays the
/// compiler keeps in registers, so it vectorizes without masked stores.
#[inline(always)]
fn take_better<const ERODE: bool, const L: usize>(v: &mut [f32; L], i: &mut [u32; L], c: &[f32; L], ci: &[u32; L]) {
    for lane in 0..L {
        let take = if ERODE { c[lane] < v[lane] } else { c[lane] > v[lane] };
        v[lane] = f32::from_bits(select_bits(take, c[lane].to_bits(), v[lane].to_bits()));
        i[lane] = select_bits(take, ci[lane], i[lane]);
    }
}

/// A radius-1 pooling (3×3 window) of every `[H, W]` plane of `input` into `values`, with
/// each output's winner as a byte code `3·dy + dx` (the winner is at row `y + dy − 1`,
/// column `x + dx − 1`) instead of an index: a quarter of the memory of [`window_winners`]'s
/// winners, which BF1's erosion of the softmax writes and its backward reads. Values,
/// winners and ties equal [`window_winners`] (column pass first, the first strictly better
/// candidate wins). Split over the cores by planes.
pub(crate) fn window3_codes(input: &[f32], values: &mut [f32], codes: &mut [i8], (h, w): (usize, usize), erode: bool) {
    let plane = h * w;
    if plane == 0 || input.is_empty() {
        return;
    }
    let chunk = plane_chunk(input.len(), plane);
    let parts: Vec<_> = input.chunks(chunk).zip(values.chunks_mut(chunk)).zip(codes.chunks_mut(chunk)).collect();
    run_parts(parts, |((inputs, values), codes)| window3_planes(inputs, values, codes, h, w, erode));
}

with_best_simd!(
    window3_planes,
    (inputs: &[f32], values: &mut [f32], codes: &mut [i8], h: usize, w: usize, erode: bool),
    {
        if erode {
            window3_of_planes::<true>(inputs, values, codes, h, w)
        } else {
            window3_of_planes::<false>(inputs, values, codes, h, w)
        }
    }
);

/// The body of [`window3_codes`] for some planes (inlined into each SIMD version).
#[inline(always)]
fn window3_of_planes<const ERODE: bool>(inputs: &[f32], values: &mut [f32], codes: &mut [i8], h: usize, w: usize) {
    let plane = h * w;
    let sentinel = if ERODE { f32::INFINITY } else { f32::NEG_INFINITY };
    // One row's column pass, padded by a sentinel column on each side for the row pass; a
    // row of sentinels stands for the rows outside the plane.
    let mut column_value = vec![sentinel; w + 2];
    let mut column_code = vec![1u32; w + 2];
    let outside = vec![sentinel; w];
    for ((source, out), out_codes) in inputs.chunks(plane).zip(values.chunks_mut(plane)).zip(codes.chunks_mut(plane)) {
        for y in 0..h {
            let line = |row: Option<usize>| match row.filter(|&row| row < h) {
                Some(row) => &source[row * w..(row + 1) * w],
                None => &outside[..],
            };
            let (up, middle, down) = (line(y.checked_sub(1)), line(Some(y)), line(Some(y + 1)));
            // Rows y − 1, y, y + 1 in order: the first strictly better wins. Each output is
            // computed in registers and stored once (a select per candidate, not a masked
            // store).
            for (x, (v, c)) in column_value[1..=w].iter_mut().zip(column_code[1..=w].iter_mut()).enumerate() {
                let (mut best, mut code) = (sentinel, 1u32);
                for (dy, candidate) in [up[x], middle[x], down[x]].into_iter().enumerate() {
                    let take = if ERODE { candidate < best } else { candidate > best };
                    best = f32::from_bits(select_bits(take, candidate.to_bits(), best.to_bits()));
                    code = select_bits(take, dy as u32, code);
                }
                *v = best;
                *c = code;
            }
            // The row pass over columns x − 1, x, x + 1 (the sentinels never win).
            let out = &mut out[y * w..(y + 1) * w];
            let out_codes = &mut out_codes[y * w..(y + 1) * w];
            let (left, middle, right) = (&column_value[..w], &column_value[1..=w], &column_value[2..]);
            let (left_code, middle_code, right_code) = (&column_code[..w], &column_code[1..=w], &column_code[2..]);
            for x in 0..w {
                let mut best = sentinel;
                let mut code = 3 * middle_code[x] + 1;
                for (dx, (value, dy)) in
                    [(left[x], left_code[x]), (middle[x], middle_code[x]), (right[x], right_code[x])]
                        .into_iter()
                        .enumerate()
                {
                    let take = if ERODE { value < best } else { value > best };
                    best = f32::from_bits(select_bits(take, value.to_bits(), best.to_bits()));
                    code = select_bits(take, 3 * dy + dx as u32, code);
                }
                out[x] = best;
                out_codes[x] = code as i8;
            }
        }
    }
}

/// The backward of [`window3_codes`]: `target[winner] += source[i]` within each `[H, W]`
/// plane, the winner given by its code; zero gradients are skipped. Split over the cores
/// by planes.
pub(crate) fn scatter3(source: &[f32], codes: &[i8], target: &mut [f32], (h, w): (usize, usize)) {
    let plane = h * w;
    if plane == 0 || source.is_empty() {
        return;
    }
    let chunk = plane_chunk(source.len(), plane);
    let parts = source.chunks(chunk).zip(codes.chunks(chunk)).zip(target.chunks_mut(chunk)).collect();
    run_parts(parts, |((source, codes), target): ((&[f32], &[i8]), &mut [f32])| {
        // Each code's winner relative to the output's own position (always inside the plane:
        // the search never picks a position outside it).
        let offsets: [isize; 9] =
            std::array::from_fn(|code| ((code / 3) as isize - 1) * w as isize + (code % 3) as isize - 1);
        for ((source, codes), target) in source.chunks(plane).zip(codes.chunks(plane)).zip(target.chunks_mut(plane)) {
            for (p, (&g, &code)) in source.iter().zip(codes).enumerate() {
                if g != 0.0 {
                    let winner = p as isize + offsets[code as usize];
                    target[winner as usize] += g;
                }
            }
        }
    });
}

/// `target[winner[i]] += source[i]` within each `[H, W]` plane (a pooling's backward: each
/// output's gradient goes to its window's winner), split over the cores by planes.
pub(crate) fn scatter_planes(source: &[f32], winners: &[u32], target: &mut [f32], plane: usize) {
    let per_worker = plane_chunk(source.len(), plane);
    let parts = source.chunks(per_worker).zip(winners.chunks(per_worker)).zip(target.chunks_mut(per_worker)).collect();
    run_parts(parts, |((source, winners), target): ((&[f32], &[u32]), &mut [f32])| {
        for ((source, winners), target) in source.chunks(plane).zip(winners.chunks(plane)).zip(target.chunks_mut(plane))
        {
            for (&g, &i) in source.iter().zip(winners) {
                // Pooled values are often read only where a label mask is set (a dilated
                // boundary counted on label boundaries): most gradients are then 0, and
                // skipping them saves the random-access writes.
                if g != 0.0 {
                    target[i as usize] += g;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in `[0, 1)` (xorshift), with many ties when `levels` is small.
    fn values(len: usize, seed: u64, levels: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % levels) as f32 / levels as f32
            })
            .collect()
    }

    /// The sparse masked sums equal the sums over the full search's values where the mask is
    /// set (times the mask), with the same winners there, and the masked scatter sends each
    /// class's gradient to those winners.
    #[test]
    fn masked_pooled_sums_equal_the_full_search() {
        let (images, classes) = (2, 3);
        for (h, w) in [(19, 23), (9, 40), (17, 16), (6, 5), (1, 9)] {
            for radius in [1, 2, 5, 17] {
                for (mask_width, erode) in [(1, false), (classes, false), (classes, true)] {
                    let plane = h * w;
                    let len = images * classes * plane;
                    let input = values(len, (h * w * radius) as u64 + 3, 7);
                    let (mut all_winners, mut all_values) = (vec![0u32; len], vec![0.0f32; len]);
                    window_winners(&input, &mut all_winners, &mut all_values, (h, w), radius, erode, None);
                    let mask: Vec<i8> = values(images * mask_width * plane, radius as u64 + 1, 40)
                        .iter()
                        .map(|&v| if v < 0.03 { 2 } else { i8::from(v < 0.08) })
                        .collect();
                    let masked = Mask { data: &mask, width: mask_width };
                    let mut winners = vec![u32::MAX; len];
                    let sums = masked_pooled_sums(&input, &mut winners, (h, w), radius, erode, masked, classes);
                    let mask_at = |index: usize| {
                        let (image, class, pixel) = (index / (classes * plane), index / plane % classes, index % plane);
                        mask[(image * mask_width + if mask_width == 1 { 0 } else { class }) * plane + pixel]
                    };
                    let mut expected = vec![0.0f64; images * classes];
                    for index in 0..len {
                        let m = mask_at(index);
                        if m != 0 {
                            expected[index / plane] += f64::from(m) * f64::from(all_values[index]);
                            assert_eq!(winners[index], all_winners[index], "{h}x{w} r={radius}: winner {index}");
                        }
                    }
                    assert_eq!(sums, expected, "{h}x{w} r={radius} erode={erode} mask width {mask_width}");
                    let upstream: Vec<f32> = (0..classes).map(|k| 0.5 + k as f32).collect();
                    let mut target = vec![0.0f32; len];
                    masked_scatter(&upstream, &winners, masked, classes, &mut target, plane, None);
                    // With segments marked instead of a zeroed target: the same gradient.
                    let mut unzeroed = vec![f32::NAN; len];
                    let mut touched = vec![0u8; images * classes * plane.div_ceil(4)];
                    masked_scatter(&upstream, &winners, masked, classes, &mut unzeroed, plane, Some((&mut touched, 4)));
                    for index in 0..len {
                        let segment = index / plane * plane.div_ceil(4) + index % plane / 4;
                        let value = if touched[segment] == 0 { 0.0 } else { unzeroed[index] };
                        assert_eq!(value, target[index], "{h}x{w} r={radius}: marked scatter {index}");
                    }
                    let mut expected_target = vec![0.0f32; len];
                    for index in 0..len {
                        let m = mask_at(index);
                        if m != 0 {
                            let base = index / plane * plane;
                            expected_target[base + all_winners[index] as usize] +=
                                upstream[index / plane % classes] * f32::from(m);
                        }
                    }
                    assert_eq!(target, expected_target, "{h}x{w} r={radius}: scatter");
                }
            }
        }
    }

    /// Pooling by doubling equals the clipped window's minimum or maximum computed directly,
    /// on floats and bytes, for windows smaller and larger than the plane.
    #[test]
    fn pooling_by_doubling_equals_the_direct_window() {
        for (h, w) in [(19, 23), (1, 7), (6, 1), (1, 1), (16, 64), (5, 40)] {
            for radius in [0, 1, 2, 3, 5, 8, 30] {
                for erode in [true, false] {
                    let (images, plane) = (2, h * w);
                    let input = values(images * plane, (h * w + radius) as u64, 9);
                    let bytes: Vec<i8> = input.iter().map(|&v| (v * 9.0) as i8 - 4).collect();
                    let (mut floats_out, mut bytes_out) = (vec![f32::NAN; input.len()], vec![0i8; input.len()]);
                    pool(&input, &mut floats_out, (h, w), radius, erode);
                    pool_bytes(&bytes, &mut bytes_out, (h, w), radius, erode);
                    for index in 0..input.len() {
                        let (base, y, x) = (index / plane * plane, index % plane / w, index % w);
                        let window = (y.saturating_sub(radius)..(y + radius + 1).min(h)).flat_map(|row| {
                            (x.saturating_sub(radius)..(x + radius + 1).min(w)).map(move |col| base + row * w + col)
                        });
                        let (mut f, mut b) = (input[index], bytes[index]);
                        for at in window {
                            (f, b) = if erode {
                                (f.min(input[at]), b.min(bytes[at]))
                            } else {
                                (f.max(input[at]), b.max(bytes[at]))
                            };
                        }
                        assert_eq!(
                            (floats_out[index], bytes_out[index]),
                            (f, b),
                            "{h}x{w} r={radius} erode={erode}: {index}"
                        );
                    }
                }
            }
        }
    }

    /// The radius-1 search with byte codes finds the values and winners of the general one
    /// (ties included), and its scatter sends gradients where the general scatter does.
    #[test]
    fn window3_codes_equal_window_winners() {
        for (h, w) in [(19, 23), (1, 7), (6, 1), (1, 1), (2, 2), (16, 64)] {
            for erode in [true, false] {
                let (images, plane) = (3, h * w);
                let len = images * plane;
                let input = values(len, (h * w) as u64 + u64::from(erode), 3);
                let (mut winners, mut expected) = (vec![0u32; len], vec![0.0f32; len]);
                window_winners(&input, &mut winners, &mut expected, (h, w), 1, erode, None);
                let (mut codes, mut found) = (vec![i8::MIN; len], vec![f32::NAN; len]);
                window3_codes(&input, &mut found, &mut codes, (h, w), erode);
                for index in 0..len {
                    let (pixel, code) = (index % plane, codes[index] as usize);
                    let (y, x) = ((pixel / w) as isize, (pixel % w) as isize);
                    let winner = (y + code as isize / 3 - 1) * w as isize + x + code as isize % 3 - 1;
                    assert_eq!(
                        (winner, found[index]),
                        (winners[index] as isize, expected[index]),
                        "{h}x{w} erode={erode}: output {index}"
                    );
                }
                let gradient = values(len, 7, 5);
                let (mut by_codes, mut by_winners) = (vec![0.5f32; len], vec![0.5f32; len]);
                scatter3(&gradient, &codes, &mut by_codes, (h, w));
                scatter_planes(&gradient, &winners, &mut by_winners, plane);
                assert_eq!(by_codes, by_winners, "{h}x{w} erode={erode}: scatter");
            }
        }
    }

    /// Where a mask is set, the masked search finds the unmasked one's winners and values,
    /// for widths with and without a partial block, radii below and above a block, one mask
    /// for every class and one per class; elsewhere its values are finite.
    #[test]
    fn masked_window_winners_equal_unmasked_ones_where_the_mask_is_set() {
        let (images, classes) = (2, 3);
        for (h, w) in [(19, 23), (9, 40), (17, 16), (6, 5), (12, 70)] {
            for radius in [1, 2, 5, 17] {
                for (mask_width, erode) in [(1, false), (classes, false), (classes, true)] {
                    let plane = h * w;
                    let len = images * classes * plane;
                    let input = values(len, (h * w * radius) as u64, 7);
                    let (mut expected_winners, mut expected_values) = (vec![0u32; len], vec![0.0f32; len]);
                    window_winners(&input, &mut expected_winners, &mut expected_values, (h, w), radius, erode, None);
                    let mask: Vec<i8> = values(images * mask_width * plane, radius as u64, 40)
                        .iter()
                        .map(|&v| i8::from(v < 0.04))
                        .collect();
                    let (mut winners, mut found) = (vec![u32::MAX; len], vec![f32::NAN; len]);
                    let masked = Some((Mask { data: &mask, width: mask_width }, classes));
                    window_winners(&input, &mut winners, &mut found, (h, w), radius, erode, masked);
                    let mut checked = 0;
                    for index in 0..len {
                        let (image, class, pixel) = (index / (classes * plane), index / plane % classes, index % plane);
                        let row = image * mask_width + if mask_width == 1 { 0 } else { class };
                        assert!(
                            found[index].is_finite() && (winners[index] as usize) < plane,
                            "every output is written"
                        );
                        if mask[row * plane + pixel] != 0 {
                            assert_eq!(
                                (winners[index], found[index]),
                                (expected_winners[index], expected_values[index]),
                                "{h}x{w} r={radius} erode={erode} mask width {mask_width}: output {index}"
                            );
                            checked += 1;
                        }
                    }
                    assert!(checked > 0, "{h}x{w}: some pixels are masked");
                }
            }
        }
    }
}
