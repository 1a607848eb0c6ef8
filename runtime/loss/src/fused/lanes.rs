//! The per-pixel arithmetic of the fused kernel, on `f32` lanes written so that loops over
//! rows vectorize: the curve math of [`compiler::curve::math`] instantiated for lanes, a
//! polynomial `exp`, and float64 row sums.

use compiler::curve::math::{self, CurveOps, Piece, Strategy};
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

/// A curve's pieces as lane constants.
pub(super) fn pieces(curve: &Curve) -> Vec<Piece<f32, bool>> {
    curve.segments().iter().map(|segment| Piece::known(&mut Lanes, segment)).collect()
}

/// `g` and `g'` over a row of values. Each lane picks its piece and evaluates it once
/// ([`Strategy::BlendPieces`]); the piece count is made a constant for the usual one and two
/// pieces, so the per-lane work has no loop and the row loop vectorizes.
#[inline(always)]
pub(super) fn curve_row(xs: &[f32], ys: &mut [f32], slopes: &mut [f32], pieces: &[Piece<f32, bool>]) {
    match pieces {
        [only] => curve_row_of(xs, ys, slopes, std::slice::from_ref(only)),
        [first, second] => curve_row_of(xs, ys, slopes, &[first.clone(), second.clone()]),
        _ => curve_row_of(xs, ys, slopes, pieces),
    }
}

#[inline(always)]
fn curve_row_of(xs: &[f32], ys: &mut [f32], slopes: &mut [f32], pieces: &[Piece<f32, bool>]) {
    let len = xs.len();
    let (ys, slopes) = (&mut ys[..len], &mut slopes[..len]);
    for i in 0..len {
        let (y, slope) = math::eval(&mut Lanes, &xs[i], pieces, Strategy::BlendPieces, true);
        ys[i] = y;
        slopes[i] = slope.unwrap_or(0.0);
    }
}

/// `e^x` for `x ≤ 0` (a logit minus its pixel's maximum), written so that loops over it
/// vectorize: round-to-nearest by the 1.5·2²³ trick, a degree-6 polynomial on
/// [−ln2/2, ln2/2] (relative error below 2e-7), and the power of two built in the exponent
/// bits. Below −87 the result is clamped to e^−87 ≈ 1.6e-38 instead of a subnormal.
#[inline(always)]
pub(super) fn exp_nonpositive(x: f32) -> f32 {
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
pub(super) fn row_sum(values: &[f32]) -> f64 {
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

