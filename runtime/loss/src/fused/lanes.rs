//! The per-pixel arithmetic of the fused kernel, on `f32` lanes written so that loops over
//! rows vectorize: the curve math of [`compiler::curve::math`] instantiated for lanes, a
//! polynomial `exp`, and float64 row sums.

use compiler::curve::math::{self, CurveOps, Flag, Piece, Strategy};
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
/// ([`Strategy::BlendPieces`]). The piece count and the kinds of pieces (all straight, none
/// straight, or mixed; with or without a zero-width piece) become constants before the loop,
/// so the per-lane work has no branch and the row loop vectorizes; a straight curve skips
/// the square root.
#[inline(always)]
pub(super) fn curve_row(xs: &[f32], ys: &mut [f32], slopes: &mut [f32], pieces: &[Piece<f32, bool>]) {
    let kind = |flags: &mut dyn Iterator<Item = &Flag<bool>>| {
        let known: Vec<bool> = flags.map(|flag| matches!(flag, Flag::Known(true))).collect();
        if known.iter().all(|&k| k) {
            ALL
        } else if known.iter().any(|&k| k) {
            MIXED
        } else {
            NONE
        }
    };
    let linear = kind(&mut pieces.iter().map(|p| &p.linear));
    let degenerate = kind(&mut pieces.iter().map(|p| &p.degenerate));
    match (pieces, linear, degenerate) {
        ([a], ALL, _) => row::<1, ALL, NONE>(xs, ys, slopes, &[a.clone()]),
        ([a], _, _) => row::<1, NONE, NONE>(xs, ys, slopes, &[a.clone()]),
        ([a, b], ALL, NONE) => row::<2, ALL, NONE>(xs, ys, slopes, &[a.clone(), b.clone()]),
        ([a, b], ALL, _) => row::<2, ALL, MIXED>(xs, ys, slopes, &[a.clone(), b.clone()]),
        ([a, b], NONE, NONE) => row::<2, NONE, NONE>(xs, ys, slopes, &[a.clone(), b.clone()]),
        ([a, b], _, NONE) => row::<2, MIXED, NONE>(xs, ys, slopes, &[a.clone(), b.clone()]),
        ([a, b], _, _) => row::<2, MIXED, MIXED>(xs, ys, slopes, &[a.clone(), b.clone()]),
        (_, ALL, NONE) => row_of_any::<ALL, NONE>(xs, ys, slopes, pieces),
        (_, ALL, _) => row_of_any::<ALL, MIXED>(xs, ys, slopes, pieces),
        (_, _, NONE) => row_of_any::<MIXED, NONE>(xs, ys, slopes, pieces),
        (_, _, _) => row_of_any::<MIXED, MIXED>(xs, ys, slopes, pieces),
    }
}

/// Kinds of a flag over a curve's pieces: false for every piece, true for every piece, or
/// mixed (then each piece's value is a lane mask).
const NONE: u8 = 0;
const ALL: u8 = 1;
const MIXED: u8 = 2;

/// The piece with its flags as the row's constants say.
#[inline(always)]
fn with_kinds<const LINEAR: u8, const DEGENERATE: u8>(piece: &Piece<f32, bool>) -> Piece<f32, bool> {
    let kind = |flag: &Flag<bool>, of: u8| match of {
        NONE => Flag::Known(false),
        ALL => Flag::Known(true),
        _ => Flag::Dynamic(matches!(flag, Flag::Known(true))),
    };
    Piece { linear: kind(&piece.linear, LINEAR), degenerate: kind(&piece.degenerate, DEGENERATE), ..piece.clone() }
}

#[inline(always)]
fn row<const N: usize, const LINEAR: u8, const DEGENERATE: u8>(
    xs: &[f32],
    ys: &mut [f32],
    slopes: &mut [f32],
    pieces: &[Piece<f32, bool>; N],
) {
    let pieces: [Piece<f32, bool>; N] = std::array::from_fn(|i| with_kinds::<LINEAR, DEGENERATE>(&pieces[i]));
    let len = xs.len();
    let (ys, slopes) = (&mut ys[..len], &mut slopes[..len]);
    for i in 0..len {
        let (y, slope) = math::eval(&mut Lanes, &xs[i], &pieces, Strategy::BlendPieces, true);
        ys[i] = y;
        slopes[i] = slope.unwrap_or(0.0);
    }
}

#[inline(always)]
fn row_of_any<const LINEAR: u8, const DEGENERATE: u8>(
    xs: &[f32],
    ys: &mut [f32],
    slopes: &mut [f32],
    pieces: &[Piece<f32, bool>],
) {
    let pieces: Vec<Piece<f32, bool>> = pieces.iter().map(with_kinds::<LINEAR, DEGENERATE>).collect();
    let len = xs.len();
    let (ys, slopes) = (&mut ys[..len], &mut slopes[..len]);
    for i in 0..len {
        let (y, slope) = math::eval(&mut Lanes, &xs[i], &pieces, Strategy::BlendPieces, true);
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
