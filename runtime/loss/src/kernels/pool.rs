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
            winners_of_planes::<true, i64>(inputs, outputs, None, h, w, radius)
        } else {
            winners_of_planes::<false, i64>(inputs, outputs, None, h, w, radius)
        }
    }
);

with_best_simd!(
    winner_planes_u32,
    (inputs: &[f32], outputs: &mut [u32], values: &mut [f32], h: usize, w: usize, radius: usize, erode: bool),
    {
        if erode {
            winners_of_planes::<true, u32>(inputs, outputs, Some(values), h, w, radius)
        } else {
            winners_of_planes::<false, u32>(inputs, outputs, Some(values), h, w, radius)
        }
    }
);

/// Window winners (as [`winners`] finds them, index within the plane) of every
/// `[H, W]` plane of `input` into `winners`, and their values (the pooled planes) into
/// `values`, split over the cores (the fused kernel's pooling stage; inputs are finite).
pub(crate) fn window_winners(
    input: &[f32],
    winners: &mut [u32],
    values: &mut [f32],
    (h, w): (usize, usize),
    radius: usize,
    erode: bool,
) {
    let plane = h * w;
    if plane == 0 || input.is_empty() {
        return;
    }
    let chunk = plane_chunk(input.len(), plane);
    let parts = input.chunks(chunk).zip(winners.chunks_mut(chunk)).zip(values.chunks_mut(chunk)).collect();
    run_parts(parts, |((inputs, outputs), values)| winner_planes_u32(inputs, outputs, values, h, w, radius, erode));
}

/// The body of [`winners`] for some planes (inlined into each SIMD version).
#[inline(always)]
fn winners_of_planes<const ERODE: bool, T: From<u32> + Copy>(
    inputs: &[f32],
    outputs: &mut [T],
    mut values: Option<&mut [f32]>,
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
    for (index, (source, target)) in inputs.chunks(plane).zip(outputs.chunks_mut(plane)).enumerate() {
        for y in 0..h {
            let rows = y.saturating_sub(radius)..(y + radius + 1).min(h);
            for start in (0..blocks).step_by(L) {
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
            padded_value[radius..radius + w].copy_from_slice(&column_value[y * w..(y + 1) * w]);
            padded_index[radius..radius + w].copy_from_slice(&column_index[y * w..(y + 1) * w]);
            let own = &column_index[y * w..(y + 1) * w];
            let out = &mut target[y * w..(y + 1) * w];
            // The winners' values too, when asked for (the fused kernel's pooled frame).
            let mut out_values =
                values.as_deref_mut().map(|v| &mut v[index * plane + y * w..index * plane + (y + 1) * w]);
            for start in (0..blocks).step_by(L) {
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

/// `target[winner[i]] += source[i]` within each `[H, W]` plane (a pooling's backward: each
/// output's gradient goes to its window's winner), split over the cores by planes.
pub(crate) fn scatter_planes(source: &[f32], winners: &[u32], target: &mut [f32], plane: usize) {
    let per_worker = plane_chunk(source.len(), plane);
    let parts = source.chunks(per_worker).zip(winners.chunks(per_worker)).zip(target.chunks_mut(per_worker)).collect();
    run_parts(parts, |((source, winners), target): ((&[f32], &[u32]), &mut [f32])| {
        for ((source, winners), target) in source.chunks(plane).zip(winners.chunks(plane)).zip(target.chunks_mut(plane))
        {
            for (&g, &i) in source.iter().zip(winners) {
                target[i as usize] += g;
            }
        }
    });
}
