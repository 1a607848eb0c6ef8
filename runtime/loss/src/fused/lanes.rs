//! The per-pixel arithmetic of the fused kernel, on `f32` lanes written so that loops over
//! rows vectorize: the curve math of [`compiler::curve::math`] instantiated for lanes, a
//! polynomial `exp`, and float64 row sums.

use compiler::curve::math::{self, CurveOps, Folded};
use compiler::curve::Curve;

/// The curve math's operations on one `f32` lane: branch-free (compares, bit selects,
/// min/max), so a loop over a row of lanes vectorizes.
pub(super) struct Lanes;

impl CurveOps for Lanes {
    type Value = f32;
    type Mask = bool;
    #[inline(always)]
    fn constant(&mut self, value: f64) -> f32 {
        value as f32
    }
    #[inline(always)]
    fn add(&mut self, a: &f32, b: &f32) -> f32 {
        a + b
    }
    #[inline(always)]
    fn sub(&mut self, a: &f32, b: &f32) -> f32 {
        a - b
    }
    #[inline(always)]
    fn mul(&mut self, a: &f32, b: &f32) -> f32 {
        a * b
    }
    #[inline(always)]
    fn div(&mut self, a: &f32, b: &f32) -> f32 {
        a / b
    }
    #[inline(always)]
    fn sqrt(&mut self, a: &f32) -> f32 {
        a.sqrt()
    }
    #[inline(always)]
    fn abs(&mut self, a: &f32) -> f32 {
        a.abs()
    }
    #[inline(always)]
    fn clamp(&mut self, a: &f32, low: f64, high: f64) -> f32 {
        a.max(low as f32).min(high as f32)
    }
    #[inline(always)]
    fn clamp_min(&mut self, a: &f32, low: f64) -> f32 {
        a.max(low as f32)
    }
    #[inline(always)]
    fn le(&mut self, a: &f32, b: &f32) -> bool {
        a <= b
    }
    #[inline(always)]
    fn lt(&mut self, a: &f32, b: &f32) -> bool {
        a < b
    }
    #[inline(always)]
    fn not(&mut self, a: &bool) -> bool {
        !a
    }
    #[inline(always)]
    fn and(&mut self, a: &bool, b: &bool) -> bool {
        a & b
    }
    #[inline(always)]
    fn select(&mut self, take: &bool, a: &f32, b: &f32) -> f32 {
        select(*take, *a, *b)
    }
    #[inline(always)]
    fn select_mask(&mut self, take: &bool, a: &bool, b: &bool) -> bool {
        (take & a) | (!take & b)
    }
    #[inline(always)]
    fn indicator(&mut self, mask: &bool) -> f32 {
        f32::from(u8::from(*mask))
    }
    #[inline(always)]
    fn mul_add(&mut self, a: &f32, b: &f32, c: &f32) -> f32 {
        a.mul_add(*b, *c)
    }
}

/// 1.0 where `condition` holds, else 0.0 (a compare and a mask once vectorized).
#[inline(always)]
pub(super) fn unit(condition: bool) -> f32 {
    f32::from(u8::from(condition))
}

/// `if take { a } else { b }` as bit operations, so that loops using it vectorize.
#[inline(always)]
pub(super) fn select(take: bool, a: f32, b: f32) -> f32 {
    let mask = 0u32.wrapping_sub(u32::from(take));
    f32::from_bits((a.to_bits() & mask) | (b.to_bits() & !mask))
}

/// A curve as the lanes evaluate it: its pieces folded ([`Folded`]) into `f32` constants,
/// and whether every piece is straight (no square root then).
#[derive(Clone, Debug)]
pub(crate) struct LaneCurve {
    pieces: Vec<Folded<f32>>,
    straight: bool,
}

impl LaneCurve {
    pub(crate) fn new(curve: &Curve) -> LaneCurve {
        let segments = curve.segments();
        LaneCurve {
            pieces: segments.iter().map(|segment| Folded::new(segment).constants(&mut Lanes)).collect(),
            straight: segments.iter().all(|segment| segment.linear || segment.width() <= 0.0),
        }
    }
}

/// Lanes computed together (see the sweep's row helpers); rows are whole chunks.
const CHUNK: usize = 16;

/// `g` over rows of values into `ys`, and `g'` into `slopes` when given. The piece count (up
/// to three) and straightness become constants of the loop, so each lane's work has no
/// branch and the loop over a row's lanes vectorizes; each row is computed on a copy and
/// stored whole (see the sweep's row helpers).
#[inline(always)]
pub(super) fn curve_rows<const L: usize>(
    xs: &[[f32; L]],
    ys: &mut [[f32; L]],
    slopes: Option<&mut [[f32; L]]>,
    curve: &LaneCurve,
) {
    let p = &curve.pieces;
    // A copy of the pieces in an array of known length, so that the piece loop unrolls.
    macro_rules! go {
        ($n:literal, $straight:literal) => {{
            let pieces: [Folded<f32>; $n] = std::array::from_fn(|i| p[i]);
            match slopes {
                Some(slopes) => rows::<L, true>(xs, ys, slopes, &pieces, $straight),
                None => rows::<L, false>(xs, ys, &mut [], &pieces, $straight),
            }
        }};
    }
    match (p.len(), curve.straight) {
        (1, true) => go!(1, true),
        (1, false) => go!(1, false),
        (2, true) => go!(2, true),
        (2, false) => go!(2, false),
        (3, true) => go!(3, true),
        (3, false) => go!(3, false),
        (_, straight) => match slopes {
            Some(slopes) => rows::<L, true>(xs, ys, slopes, p, straight),
            None => rows::<L, false>(xs, ys, &mut [], p, straight),
        },
    }
}

/// `g` (and with `SLOPE` `g'`) of every lane of `xs`, chunk by chunk.
#[inline(always)]
fn rows<const L: usize, const SLOPE: bool>(
    xs: &[[f32; L]],
    ys: &mut [[f32; L]],
    slopes: &mut [[f32; L]],
    pieces: &[Folded<f32>],
    straight: bool,
) {
    for (k, (x, y)) in xs.iter().zip(ys.iter_mut()).enumerate() {
        for c in 0..L / CHUNK {
            let mut lanes = [0.0f32; CHUNK];
            lanes.copy_from_slice(&x[c * CHUNK..(c + 1) * CHUNK]);
            let (mut values, mut derivatives) = ([0.0f32; CHUNK], [0.0f32; CHUNK]);
            for j in 0..CHUNK {
                let (value, slope) = math::eval_folded(&mut Lanes, &lanes[j], pieces, straight, SLOPE);
                values[j] = value;
                derivatives[j] = slope.unwrap_or(0.0);
            }
            y[c * CHUNK..(c + 1) * CHUNK].copy_from_slice(&values);
            if SLOPE {
                slopes[k][c * CHUNK..(c + 1) * CHUNK].copy_from_slice(&derivatives);
            }
        }
    }
}

/// The four curves of a relaxed `^` (`a ^ b` is `or_a(a) | or_b(b) − and_a(a)·and_b(b)`, the
/// `|` relaxed as `p + q − p·q`), evaluated as one step: the curves' values and slopes stay
/// in registers instead of going through a tile's rows. Every curve has the same number of
/// pieces (at most three), so each piece loop unrolls.
#[derive(Clone, Debug)]
pub(crate) struct XorCurves {
    /// `and_a`, `and_b`, `or_a`, `or_b`.
    curves: [LaneCurve; 4],
    straight: bool,
}

impl XorCurves {
    /// The fused form, when the four curves have the same number of pieces (at most three).
    pub(crate) fn new(curves: [&Curve; 4]) -> Option<XorCurves> {
        let curves = curves.map(LaneCurve::new);
        let pieces = curves[0].pieces.len();
        let same = curves.iter().all(|c| c.pieces.len() == pieces);
        let straight = curves.iter().all(|c| c.straight);
        (same && (1..=3).contains(&pieces)).then_some(XorCurves { curves, straight })
    }
}

/// The four curves' pieces as arrays of known length, then `$body` with them bound to
/// `$pieces` (a `[[Folded<f32>; N]; 4]`) and `$straight` a constant.
macro_rules! with_xor_pieces {
    ($xor:expr, |$pieces:ident, $straight:ident| $body:expr) => {{
        let xor: &XorCurves = $xor;
        macro_rules! go {
            ($n:literal, $s:literal) => {{
                let $pieces: [[Folded<f32>; $n]; 4] =
                    std::array::from_fn(|c| std::array::from_fn(|i| xor.curves[c].pieces[i]));
                let $straight = $s;
                $body
            }};
        }
        match (xor.curves[0].pieces.len(), xor.straight) {
            (1, true) => go!(1, true),
            (1, false) => go!(1, false),
            (2, true) => go!(2, true),
            (2, false) => go!(2, false),
            (3, true) => go!(3, true),
            _ => go!(3, false),
        }
    }};
}

/// `out = a ^ b` (relaxed, see [`XorCurves`]) for rows of lanes.
#[inline(always)]
pub(super) fn xor_rows<const L: usize>(a: &[[f32; L]], b: &[[f32; L]], out: &mut [[f32; L]], xor: &XorCurves) {
    with_xor_pieces!(xor, |pieces, straight| {
        for ((a, b), out) in a.iter().zip(b).zip(out.iter_mut()) {
            for c in 0..L / CHUNK {
                let (mut x, mut y) = ([0.0f32; CHUNK], [0.0f32; CHUNK]);
                x.copy_from_slice(&a[c * CHUNK..(c + 1) * CHUNK]);
                y.copy_from_slice(&b[c * CHUNK..(c + 1) * CHUNK]);
                let mut r = [0.0f32; CHUNK];
                for j in 0..CHUNK {
                    let value =
                        |curve: usize, v: &f32| math::eval_folded(&mut Lanes, v, &pieces[curve], straight, false).0;
                    let (and_a, and_b) = (value(0, &x[j]), value(1, &y[j]));
                    let (or_a, or_b) = (value(2, &x[j]), value(3, &y[j]));
                    r[j] = or_a + or_b - or_a * or_b - and_a * and_b;
                }
                out[c * CHUNK..(c + 1) * CHUNK].copy_from_slice(&r);
            }
        }
    })
}

/// The gradients of `a ^ b` (relaxed, see [`XorCurves`]) for one row of lanes, from the
/// result's gradient `g`: `∂/∂a = or_a'(a)·(1 − or_b(b)) − and_a'(a)·and_b(b)` and likewise
/// for `b`.
#[inline(always)]
pub(super) fn xor_gradients<const L: usize>(
    a: &[f32; L],
    b: &[f32; L],
    g: &[f32; L],
    xor: &XorCurves,
) -> ([f32; L], [f32; L]) {
    let (mut da, mut db) = ([0.0f32; L], [0.0f32; L]);
    with_xor_pieces!(xor, |pieces, straight| {
        for c in 0..L / CHUNK {
            let (mut x, mut y, mut d) = ([0.0f32; CHUNK], [0.0f32; CHUNK], [0.0f32; CHUNK]);
            x.copy_from_slice(&a[c * CHUNK..(c + 1) * CHUNK]);
            y.copy_from_slice(&b[c * CHUNK..(c + 1) * CHUNK]);
            d.copy_from_slice(&g[c * CHUNK..(c + 1) * CHUNK]);
            let (mut ra, mut rb) = ([0.0f32; CHUNK], [0.0f32; CHUNK]);
            for j in 0..CHUNK {
                let eval = |curve: usize, v: &f32| {
                    let (value, slope) = math::eval_folded(&mut Lanes, v, &pieces[curve], straight, true);
                    (value, slope.unwrap_or(0.0))
                };
                let ((and_a, and_a_d), (and_b, and_b_d)) = (eval(0, &x[j]), eval(1, &y[j]));
                let ((or_a, or_a_d), (or_b, or_b_d)) = (eval(2, &x[j]), eval(3, &y[j]));
                ra[j] = d[j] * (or_a_d * (1.0 - or_b) - and_a_d * and_b);
                rb[j] = d[j] * (or_b_d * (1.0 - or_a) - and_b_d * and_a);
            }
            da[c * CHUNK..(c + 1) * CHUNK].copy_from_slice(&ra);
            db[c * CHUNK..(c + 1) * CHUNK].copy_from_slice(&rb);
        }
    });
    (da, db)
}

/// `e^x` for `x ≤ 0` (a logit minus its pixel's maximum), written so that loops over it
/// vectorize (fused multiply-adds, which the SIMD versions have): round-to-nearest by the
/// 1.5·2²³ trick, a degree-6 polynomial on
/// [−ln2/2, ln2/2] (relative error below 2e-7), and the power of two built in the exponent
/// bits. Below −87 the result is clamped to e^−87 ≈ 1.6e-38 instead of a subnormal.
#[inline(always)]
pub(super) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const SHIFT: f32 = 12_582_912.0; // 1.5 · 2^23
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.max(-87.0);
    let shifted = x.mul_add(LOG2E, SHIFT);
    let n = shifted - SHIFT;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let mut p: f32 = 1.0 / 720.0;
    for coefficient in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p.mul_add(r, coefficient);
    }
    // The low mantissa bits of `shifted` hold n (as 0x4B40_0000 + n).
    let exponent = (shifted.to_bits() as i32 - 0x4B40_0000 + 127) << 23;
    f32::from_bits(exponent as u32) * p
}
