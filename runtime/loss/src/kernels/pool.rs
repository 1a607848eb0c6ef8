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
            pool_planes_of(inputs, outputs, h, w, radius, Ord::min)
        } else {
            pool_planes_of(inputs, outputs, h, w, radius, Ord::max)
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
            pool_planes_of(inputs, outputs, h, w, radius, f32::min)
        } else {
            pool_planes_of(inputs, outputs, h, w, radius, f32::max)
        }
    }
);

/// Square-window `combine` (min or max) of every `[H, W]` plane of `inputs`, the window clipped
/// at the border: a row pass, then a column pass over whole rows, each a few contiguous
/// sweeps over shifted rows (inlined into each SIMD version; shared by the float and byte
/// planes).
#[inline(always)]
fn pool_planes_of<T: Copy + Default>(
    inputs: &[T],
    outputs: &mut [T],
    h: usize,
    w: usize,
    radius: usize,
    combine: impl Fn(T, T) -> T + Copy,
) {
    let plane = h * w;
    let mut rows = vec![T::default(); plane];
    for (source, target) in inputs.chunks(plane).zip(outputs.chunks_mut(plane)) {
        // Row pass into `rows`.
        for (line, out) in source.chunks(w).zip(rows.chunks_mut(w)) {
            out.copy_from_slice(line);
            for d in 1..=radius.min(w.saturating_sub(1)) {
                for (o, &v) in out[..w - d].iter_mut().zip(&line[d..]) {
                    *o = combine(*o, v);
                }
                for (o, &v) in out[d..].iter_mut().zip(&line[..w - d]) {
                    *o = combine(*o, v);
                }
            }
        }
        // Column pass: whole rows at a time.
        for y in 0..h {
            let out = &mut target[y * w..(y + 1) * w];
            out.copy_from_slice(&rows[y * w..(y + 1) * w]);
            for neighbour in y.saturating_sub(radius)..(y + radius + 1).min(h) {
                if neighbour != y {
                    for (o, &v) in out.iter_mut().zip(&rows[neighbour * w..(neighbour + 1) * w]) {
                        *o = combine(*o, v);
                    }
                }
            }
        }
    }
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
            winners_of_planes::<true, i64>(inputs, outputs, None, None, None, h, w, radius)
        } else {
            winners_of_planes::<false, i64>(inputs, outputs, None, None, None, h, w, radius)
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
            winners_of_planes::<true, u32>(inputs, outputs, Some(values), mask, None, h, w, radius)
        } else {
            winners_of_planes::<false, u32>(inputs, outputs, Some(values), mask, None, h, w, radius)
        }
    }
);

with_best_simd!(
    masked_sum_planes,
    (
        inputs: &[f32],
        outputs: &mut [u32],
        mask: PlaneMask<'_>,
        sums: &mut [f64],
        h: usize,
        w: usize,
        radius: usize,
        erode: bool
    ),
    {
        if erode {
            winners_of_planes::<true, u32>(inputs, outputs, None, Some(mask), Some(sums), h, w, radius)
        } else {
            winners_of_planes::<false, u32>(inputs, outputs, None, Some(mask), Some(sums), h, w, radius)
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
/// pooling's counts, without writing the pooled planes.
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
        masked_sum_planes(inputs, outputs, mask, sums, h, w, radius, erode)
    });
    sums
}

/// The backward of [`masked_pooled_sums`]: `target[winner] += upstream[class] · mask` for
/// every pixel where the mask is set, plane by plane (`upstream` per class of the frame).
pub(crate) fn masked_scatter(
    upstream: &[f32],
    winners: &[u32],
    mask: Mask<'_>,
    frame_width: usize,
    target: &mut [f32],
    plane: usize,
) {
    let chunk = plane_chunk(target.len(), plane);
    let parts: Vec<_> = winners.chunks(chunk).zip(target.chunks_mut(chunk)).enumerate().collect();
    run_parts(parts, |(part, (winners, target))| {
        let planes = PlaneMask { mask, first: part * chunk / plane, frame_width };
        for (index, (winners, target)) in winners.chunks(plane).zip(target.chunks_mut(plane)).enumerate() {
            let g = upstream[(planes.first + index) % frame_width];
            if g == 0.0 {
                continue;
            }
            for (&m, &winner) in planes.plane(index, plane).iter().zip(winners) {
                if m != 0 {
                    target[winner as usize] += g * f32::from(m);
                }
            }
        }
    });
}

/// The body of [`winners`] for some planes (inlined into each SIMD version). With `sums`, a
/// masked search adds `mask · value` per plane instead of writing the values, and leaves
/// unmasked blocks unwritten.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn winners_of_planes<const ERODE: bool, T: From<u32> + Copy>(
    inputs: &[f32],
    outputs: &mut [T],
    mut values: Option<&mut [f32]>,
    mask: Option<PlaneMask<'_>>,
    mut sums: Option<&mut [f64]>,
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
                    if sums.is_some() {
                        continue;
                    }
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
                if let (Some(sums), Some(m)) = (sums.as_deref_mut(), mask_plane) {
                    let m = &m[y * w + start..][..L];
                    sums[index] += m.iter().zip(&v).map(|(&m, &v)| f64::from(m) * f64::from(v)).sum::<f64>();
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
                if let (Some(sums), Some(m)) = (sums.as_deref_mut(), mask_plane) {
                    sums[index] += f64::from(m[y * w + x]) * f64::from(v);
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
