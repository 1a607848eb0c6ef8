//! The curve math, written once for every back end.
//!
//! Each back end evaluates `g(x)` (and, where it differentiates by hand, `g'(x)`) with the
//! functions here, instantiated with its own values through [`CurveOps`]: `f64` numbers
//! ([`Curve::eval`](super::Curve::eval), tests), libtorch tensors (the reference path), `f32`
//! lanes (the fused kernel), and ONNX graph values (the loss and gradient graphs). The
//! clamping, the choice of piece at a joint, the square root's floor and the tolerances
//! therefore exist in one place, and every back end computes the same function:
//!
//! * `x` is clamped to `[0, 1]`; a piece covers `(x_start, x_end]` (the first also covers 0),
//!   so at a joint the earlier piece is used;
//! * in a piece, `x' = clamp((x − x_start) / width, 0, 1)`; on a straight piece
//!   (`|2m − 1| <` [`LINEAR_TOLERANCE`], `m` the middle point's normalized x) `t = x'`, else
//!   `t = clamp((m − sqrt(max(m² + (1 − 2m)·x', SQRT_FLOOR))) / (2m − 1), 0, 1)`;
//! * `y = (1−t)²·y0 + 2t(1−t)·y1 + t²·y2`; a piece of zero width is its end value `y2`;
//! * derivatives follow libtorch's conventions for `clamp` (1 on the closed interval, 0
//!   outside) and `clamp_min` (1 where `x ≥ floor`), so a hand-written derivative equals
//!   autograd's, joints and clamped ends included.

use super::Segment;

/// Below this, a piece's middle point is treated as exactly halfway (the straight case).
pub const LINEAR_TOLERANCE: f64 = 1e-6;
/// The square root's argument is clamped to at least this, so its derivative stays finite.
pub const SQRT_FLOOR: f64 = 1e-12;
/// Widths computed at run time (curves given as an input) are divided by at least this.
pub const MIN_WIDTH: f64 = 1e-12;

/// The operations the curve math needs, for one back end's values. `Mask` is a boolean of
/// the same shape as the values.
pub trait CurveOps {
    type Value: Clone;
    type Mask: Clone;
    fn constant(&mut self, value: f64) -> Self::Value;
    fn add(&mut self, a: &Self::Value, b: &Self::Value) -> Self::Value;
    fn sub(&mut self, a: &Self::Value, b: &Self::Value) -> Self::Value;
    fn mul(&mut self, a: &Self::Value, b: &Self::Value) -> Self::Value;
    fn div(&mut self, a: &Self::Value, b: &Self::Value) -> Self::Value;
    fn sqrt(&mut self, a: &Self::Value) -> Self::Value;
    fn abs(&mut self, a: &Self::Value) -> Self::Value;
    /// `a` clamped to `[low, high]`.
    fn clamp(&mut self, a: &Self::Value, low: f64, high: f64) -> Self::Value;
    /// `max(a, low)`.
    fn clamp_min(&mut self, a: &Self::Value, low: f64) -> Self::Value;
    /// `a ≤ b`.
    fn le(&mut self, a: &Self::Value, b: &Self::Value) -> Self::Mask;
    /// `a < b`.
    fn lt(&mut self, a: &Self::Value, b: &Self::Value) -> Self::Mask;
    fn not(&mut self, a: &Self::Mask) -> Self::Mask;
    fn and(&mut self, a: &Self::Mask, b: &Self::Mask) -> Self::Mask;
    /// `a` where `take`, else `b`.
    fn select(&mut self, take: &Self::Mask, a: &Self::Value, b: &Self::Value) -> Self::Value;
    /// `a` where `take`, else `b`, for masks.
    fn select_mask(&mut self, take: &Self::Mask, a: &Self::Mask, b: &Self::Mask) -> Self::Mask;
    /// 1 where `mask`, else 0.
    fn indicator(&mut self, mask: &Self::Mask) -> Self::Value;
    /// `a·b + c` (back ends with a fused multiply-add round once).
    fn mul_add(&mut self, a: &Self::Value, b: &Self::Value, c: &Self::Value) -> Self::Value {
        let product = self.mul(a, b);
        self.add(&product, c)
    }
}

/// A property of a piece: known when the curve is (baked curves), or computed per value
/// (curves read at run time, or pieces blended per element).
#[derive(Clone, Debug, PartialEq)]
pub enum Flag<M> {
    Known(bool),
    Dynamic(M),
}

/// One quadratic piece with its coefficients folded, as values of a back end.
#[derive(Clone, Debug)]
pub struct Piece<V, M> {
    pub start_x: V,
    pub end_x: V,
    /// `1 / width` (0 for a piece of zero width).
    pub inv_width: V,
    /// The middle point's x in piece-normalized coordinates.
    pub m: V,
    /// `1 − 2m`.
    pub slope: V,
    /// `m²`.
    pub m2: V,
    /// `1 / (2m − 1)` (0 for a straight piece).
    pub inv_2m1: V,
    pub y0: V,
    pub y1: V,
    pub y2: V,
    /// `t = x'` on this piece.
    pub linear: Flag<M>,
    /// The piece has zero width: its value is `y2`, its slope 0.
    pub degenerate: Flag<M>,
}

impl<V: Clone, M: Clone> Piece<V, M> {
    /// The piece of a known curve, its coefficients folded in float64 and turned into
    /// constants of the back end.
    pub fn known<O: CurveOps<Value = V, Mask = M>>(ops: &mut O, segment: &Segment) -> Piece<V, M> {
        let width = segment.width();
        let m = segment.m;
        let mut c = |value: f64| ops.constant(value);
        Piece {
            start_x: c(segment.start[0]),
            end_x: c(segment.end[0]),
            inv_width: c(if width > 0.0 { 1.0 / width } else { 0.0 }),
            m: c(m),
            slope: c(1.0 - 2.0 * m),
            m2: c(m * m),
            inv_2m1: c(if segment.linear { 0.0 } else { 1.0 / (2.0 * m - 1.0) }),
            y0: c(segment.start[1]),
            y1: c(segment.middle[1]),
            y2: c(segment.end[1]),
            linear: Flag::Known(segment.linear),
            degenerate: Flag::Known(width <= 0.0),
        }
    }

    /// The piece from start, middle and end control points that are values of the back end
    /// (curves read at run time): the same folding as [`Curve::segments`](super::Curve::segments),
    /// with the straight and zero-width cases decided per value.
    pub fn from_points<O: CurveOps<Value = V, Mask = M>>(
        ops: &mut O,
        start: [&V; 2],
        middle: [&V; 2],
        end: [&V; 2],
    ) -> Piece<V, M> {
        let (zero, one, two) = (ops.constant(0.0), ops.constant(1.0), ops.constant(2.0));
        let width = ops.sub(end[0], start[0]);
        let has_width = ops.lt(&zero, &width);
        let degenerate = ops.not(&has_width);
        let safe_width = ops.clamp_min(&width, MIN_WIDTH);
        let inv_width = ops.div(&one, &safe_width);
        let inv_width = ops.select(&has_width, &inv_width, &zero);
        let offset = ops.sub(middle[0], start[0]);
        let m = ops.mul(&offset, &inv_width);
        let two_m = ops.mul(&two, &m);
        let two_m_1 = ops.sub(&two_m, &one);
        let magnitude = ops.abs(&two_m_1);
        let tolerance = ops.constant(LINEAR_TOLERANCE);
        let linear = ops.lt(&magnitude, &tolerance);
        let safe_two_m_1 = ops.select(&linear, &one, &two_m_1);
        let inv_2m1 = ops.div(&one, &safe_two_m_1);
        let inv_2m1 = ops.select(&linear, &zero, &inv_2m1);
        let slope = ops.sub(&one, &two_m);
        let m2 = ops.mul(&m, &m);
        Piece {
            start_x: start[0].clone(),
            end_x: end[0].clone(),
            inv_width,
            m,
            slope,
            m2,
            inv_2m1,
            y0: start[1].clone(),
            y1: middle[1].clone(),
            y2: end[1].clone(),
            linear: Flag::Dynamic(linear),
            degenerate: Flag::Dynamic(degenerate),
        }
    }

    /// Whether evaluating the piece may need the square root.
    #[inline(always)]
    pub fn may_be_quadratic(&self) -> bool {
        !matches!(self.linear, Flag::Known(true)) && !matches!(self.degenerate, Flag::Known(true))
    }
}

/// How the pieces of a curve are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Evaluate every piece and select the result by `x` (tensor and graph back ends: the
    /// coefficients stay scalars).
    EachPiece,
    /// Select each value's piece first, then evaluate it once (the fused kernel's lanes:
    /// a few selects instead of a whole evaluation per piece).
    BlendPieces,
}

#[inline(always)]
fn select_flag<O: CurveOps>(ops: &mut O, take: &O::Mask, a: &Flag<O::Mask>, b: &Flag<O::Mask>) -> Flag<O::Mask> {
    match (a, b) {
        (Flag::Known(x), Flag::Known(y)) if x == y => Flag::Known(*x),
        (Flag::Known(true), Flag::Known(false)) => Flag::Dynamic(take.clone()),
        (Flag::Known(false), Flag::Known(true)) => Flag::Dynamic(ops.not(take)),
        _ => {
            let as_mask = |flag: &Flag<O::Mask>, ops: &mut O| match flag {
                Flag::Dynamic(mask) => mask.clone(),
                Flag::Known(value) => {
                    let (zero, one) = (ops.constant(0.0), ops.constant(1.0));
                    if *value {
                        ops.le(&zero, &one)
                    } else {
                        ops.lt(&one, &zero)
                    }
                }
            };
            let (a, b) = (as_mask(a, ops), as_mask(b, ops));
            Flag::Dynamic(ops.select_mask(take, &a, &b))
        }
    }
}

/// `a` where `take`, else `b`, coefficient by coefficient.
#[inline(always)]
pub fn select_piece<O: CurveOps>(
    ops: &mut O,
    take: &O::Mask,
    a: &Piece<O::Value, O::Mask>,
    b: &Piece<O::Value, O::Mask>,
) -> Piece<O::Value, O::Mask> {
    Piece {
        start_x: ops.select(take, &a.start_x, &b.start_x),
        end_x: ops.select(take, &a.end_x, &b.end_x),
        inv_width: ops.select(take, &a.inv_width, &b.inv_width),
        m: ops.select(take, &a.m, &b.m),
        slope: ops.select(take, &a.slope, &b.slope),
        m2: ops.select(take, &a.m2, &b.m2),
        inv_2m1: ops.select(take, &a.inv_2m1, &b.inv_2m1),
        y0: ops.select(take, &a.y0, &b.y0),
        y1: ops.select(take, &a.y1, &b.y1),
        y2: ops.select(take, &a.y2, &b.y2),
        linear: select_flag(ops, take, &a.linear, &b.linear),
        degenerate: select_flag(ops, take, &a.degenerate, &b.degenerate),
    }
}

/// `g(x)` and, with `want_slope`, `dg/dx`, for values `x` of any real number (clamped to
/// `[0, 1]` first). `pieces` are in x order; `may_be_quadratic` says whether any piece can
/// need the square root (pass [`Piece::may_be_quadratic`] of the curve's own pieces when
/// blending, so a straight curve skips it).
#[inline(always)]
pub fn eval<O: CurveOps>(
    ops: &mut O,
    x: &O::Value,
    pieces: &[Piece<O::Value, O::Mask>],
    strategy: Strategy,
    want_slope: bool,
) -> (O::Value, Option<O::Value>) {
    let quadratic = pieces.iter().any(Piece::may_be_quadratic);
    let clamped = ops.clamp(x, 0.0, 1.0);
    let in_range = if want_slope {
        let (zero, one) = (ops.constant(0.0), ops.constant(1.0));
        let above = ops.le(&zero, x);
        let below = ops.le(x, &one);
        Some(ops.and(&above, &below))
    } else {
        None
    };
    let last = pieces.len() - 1;
    let (value, slope) = match strategy {
        Strategy::BlendPieces => {
            let mut piece = pieces[last].clone();
            for earlier in pieces[..last].iter().rev() {
                let inside = ops.le(&clamped, &earlier.end_x);
                piece = select_piece(ops, &inside, earlier, &piece);
            }
            eval_piece(ops, &clamped, &piece, quadratic, want_slope)
        }
        Strategy::EachPiece => {
            let (mut value, mut slope) = eval_piece(ops, &clamped, &pieces[last], quadratic, want_slope);
            for earlier in pieces[..last].iter().rev() {
                let (v, s) = eval_piece(ops, &clamped, earlier, quadratic, want_slope);
                let inside = ops.le(&clamped, &earlier.end_x);
                value = ops.select(&inside, &v, &value);
                slope = match (s, slope) {
                    (Some(s), Some(later)) => Some(ops.select(&inside, &s, &later)),
                    _ => None,
                };
            }
            (value, slope)
        }
    };
    let slope = match (slope, in_range) {
        (Some(slope), Some(in_range)) => {
            let passes = ops.indicator(&in_range);
            Some(ops.mul(&passes, &slope))
        }
        _ => None,
    };
    (value, slope)
}

/// One piece at `x` (already clamped to `[0, 1]`): `y` and, with `want_slope`, `dy/dx`.
#[inline(always)]
fn eval_piece<O: CurveOps>(
    ops: &mut O,
    x: &O::Value,
    piece: &Piece<O::Value, O::Mask>,
    quadratic: bool,
    want_slope: bool,
) -> (O::Value, Option<O::Value>) {
    if let Flag::Known(true) = piece.degenerate {
        let slope = want_slope.then(|| ops.constant(0.0));
        return (piece.y2.clone(), slope);
    }
    let shifted = ops.sub(x, &piece.start_x);
    let raw = ops.mul(&shifted, &piece.inv_width);
    let normalized = ops.clamp(&raw, 0.0, 1.0);
    let one = ops.constant(1.0);
    let straight = |ops: &mut O| (normalized.clone(), want_slope.then(|| ops.constant(1.0)));
    let curved = |ops: &mut O| {
        let scaled = ops.mul(&normalized, &piece.slope);
        let disc_raw = ops.add(&scaled, &piece.m2);
        let disc = ops.clamp_min(&disc_raw, SQRT_FLOOR);
        let root = ops.sqrt(&disc);
        let numerator = ops.sub(&piece.m, &root);
        let t_raw = ops.mul(&numerator, &piece.inv_2m1);
        let t = ops.clamp(&t_raw, 0.0, 1.0);
        let dt = want_slope.then(|| {
            // dt/dx' = −(1 − 2m) / (2·sqrt(disc)·(2m − 1)), where neither clamp holds.
            let floor = ops.constant(SQRT_FLOOR);
            let above_floor = ops.le(&floor, &disc_raw);
            let (zero, one) = (ops.constant(0.0), ops.constant(1.0));
            let t_low = ops.le(&zero, &t_raw);
            let t_high = ops.le(&t_raw, &one);
            let t_inside = ops.and(&t_low, &t_high);
            let passes = ops.and(&above_floor, &t_inside);
            let passes = ops.indicator(&passes);
            let half = ops.constant(-0.5);
            let inverse_root = ops.div(&half, &root);
            let d = ops.mul(&inverse_root, &piece.slope);
            let d = ops.mul(&d, &piece.inv_2m1);
            ops.mul(&d, &passes)
        });
        (t, dt)
    };
    let (t, dt_dx_norm) = match (&piece.linear, quadratic) {
        (Flag::Known(true), _) | (_, false) => straight(ops),
        (Flag::Known(false), true) => curved(ops),
        (Flag::Dynamic(linear), true) => {
            let (t_straight, d_straight) = straight(ops);
            let (t_curved, d_curved) = curved(ops);
            let t = ops.select(linear, &t_straight, &t_curved);
            let d = match (d_straight, d_curved) {
                (Some(a), Some(b)) => Some(ops.select(linear, &a, &b)),
                _ => None,
            };
            (t, d)
        }
    };
    let s = ops.sub(&one, &t);
    let ss = ops.mul(&s, &s);
    let ts = ops.mul(&t, &s);
    let tt = ops.mul(&t, &t);
    let a = ops.mul(&ss, &piece.y0);
    let two = ops.constant(2.0);
    let two_y1 = ops.mul(&two, &piece.y1);
    let b = ops.mul(&ts, &two_y1);
    let c = ops.mul(&tt, &piece.y2);
    let ab = ops.add(&a, &b);
    let mut y = ops.add(&ab, &c);
    let mut slope = dt_dx_norm.map(|dt| {
        // dy/dt = −2s·y0 + 2(1 − 2t)·y1 + 2t·y2, then the chain rule through t and x'.
        let minus_two = ops.constant(-2.0);
        let p = ops.mul(&minus_two, &s);
        let p = ops.mul(&p, &piece.y0);
        let two_t = ops.mul(&two, &t);
        let q = ops.sub(&one, &two_t);
        let q = ops.mul(&q, &two_y1);
        let r = ops.mul(&two_t, &piece.y2);
        let pq = ops.add(&p, &q);
        let dy_dt = ops.add(&pq, &r);
        let (zero, one) = (ops.constant(0.0), ops.constant(1.0));
        let low = ops.le(&zero, &raw);
        let high = ops.le(&raw, &one);
        let inside = ops.and(&low, &high);
        let passes = ops.indicator(&inside);
        let d = ops.mul(&dy_dt, &dt);
        let d = ops.mul(&d, &piece.inv_width);
        ops.mul(&d, &passes)
    });
    if let Flag::Dynamic(degenerate) = &piece.degenerate {
        y = ops.select(degenerate, &piece.y2, &y);
        slope = slope.map(|s| {
            let zero = ops.constant(0.0);
            ops.select(degenerate, &zero, &s)
        });
    }
    (y, slope)
}

/// A piece folded further, for back ends that evaluate value by value (the fused kernel's
/// lanes): the same function as [`eval`], with more of the arithmetic done once per curve in
/// float64 so that a value needs no division, and on a straight piece no square root. With
/// `x` clamped to `[0, 1]` and `d = x − x_start`:
///
/// * `root = sqrt(max(A + B·d, SQRT_FLOOR))`, `t_raw = T0 + T1·root + R·d`,
///   `t = clamp(t_raw, 0, 1)`, `y = U + t·(V + Q·t)`;
/// * `dy/dx = (V + 2Q·t)·(R + K/root)` where `A + B·d ≥ SQRT_FLOOR`, `0 ≤ t_raw ≤ 1` and
///   `0 ≤ x ≤ 1` (before clamping), else 0.
///
/// A straight piece has `A = 1`, `B = T0 = T1 = K = 0`, `R = 1/width`, so that on a curve of
/// straight pieces only `y = U + d·(W1 + W2·d)` and `dy/dx = W1 + 2·W2·d` (gated by
/// `0 ≤ x ≤ 1`). A piece of zero width has `U = y2` and every other coefficient 0. Pieces are
/// chosen as [`eval`] chooses them (the earlier piece at a joint). The results equal
/// [`eval`]'s up to rounding; the one difference is that [`eval`] also zeroes the slope
/// where rounding puts `(x − x_start)/width` a hair outside `[0, 1]`, which this form does
/// not test (the chosen piece holds `x`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Folded<V> {
    pub start_x: V,
    pub end_x: V,
    pub a: V,
    pub b: V,
    pub t0: V,
    pub t1: V,
    pub r: V,
    pub k: V,
    pub u: V,
    pub v: V,
    pub q: V,
    pub w1: V,
    pub w2: V,
}

impl Folded<f64> {
    /// The folded coefficients of a known segment.
    pub fn new(segment: &Segment) -> Folded<f64> {
        let width = segment.width();
        let (y0, y1, y2) = (segment.start[1], segment.middle[1], segment.end[1]);
        let mut folded = Folded {
            start_x: segment.start[0],
            end_x: segment.end[0],
            a: 1.0,
            b: 0.0,
            t0: 0.0,
            t1: 0.0,
            r: 0.0,
            k: 0.0,
            u: y2,
            v: 0.0,
            q: 0.0,
            w1: 0.0,
            w2: 0.0,
        };
        if width <= 0.0 {
            return folded;
        }
        let inv_width = 1.0 / width;
        let (v, q) = (2.0 * (y1 - y0), y0 - 2.0 * y1 + y2);
        folded.u = y0;
        folded.v = v;
        folded.q = q;
        if segment.linear {
            folded.r = inv_width;
            folded.w1 = v * inv_width;
            folded.w2 = q * inv_width * inv_width;
        } else {
            // x' = d/width; disc = m² + (1 − 2m)·x'; t = (m − root)/(2m − 1);
            // dt/dx = −(1 − 2m)/(2·root·(2m − 1)·width).
            let m = segment.m;
            let inv_2m1 = 1.0 / (2.0 * m - 1.0);
            folded.a = m * m;
            folded.b = (1.0 - 2.0 * m) * inv_width;
            folded.t0 = m * inv_2m1;
            folded.t1 = -inv_2m1;
            folded.k = -0.5 * (1.0 - 2.0 * m) * inv_2m1 * inv_width;
        }
        folded
    }

    /// The coefficients as constants of a back end.
    pub fn constants<O: CurveOps>(&self, ops: &mut O) -> Folded<O::Value> {
        let mut c = |value: f64| ops.constant(value);
        Folded {
            start_x: c(self.start_x),
            end_x: c(self.end_x),
            a: c(self.a),
            b: c(self.b),
            t0: c(self.t0),
            t1: c(self.t1),
            r: c(self.r),
            k: c(self.k),
            u: c(self.u),
            v: c(self.v),
            q: c(self.q),
            w1: c(self.w1),
            w2: c(self.w2),
        }
    }
}

/// `g(x)` and, with `want_slope`, `g'(x)` from folded pieces (see [`Folded`]); `straight`
/// when every piece is straight (or of zero width), which skips the square root.
#[inline(always)]
pub fn eval_folded<O: CurveOps>(
    ops: &mut O,
    x: &O::Value,
    pieces: &[Folded<O::Value>],
    straight: bool,
    want_slope: bool,
) -> (O::Value, Option<O::Value>) {
    let clamped = ops.clamp(x, 0.0, 1.0);
    let last = pieces.len() - 1;
    // The piece holding x: the last one unless an earlier one ends at or after x.
    let mut piece = pieces[last].clone();
    for earlier in pieces[..last].iter().rev() {
        let inside = ops.le(&clamped, &earlier.end_x);
        let mut pick = |a: &O::Value, b: &O::Value| ops.select(&inside, a, b);
        piece = if straight {
            Folded {
                start_x: pick(&earlier.start_x, &piece.start_x),
                u: pick(&earlier.u, &piece.u),
                w1: pick(&earlier.w1, &piece.w1),
                w2: pick(&earlier.w2, &piece.w2),
                ..piece
            }
        } else {
            Folded {
                start_x: pick(&earlier.start_x, &piece.start_x),
                end_x: piece.end_x.clone(),
                a: pick(&earlier.a, &piece.a),
                b: pick(&earlier.b, &piece.b),
                t0: pick(&earlier.t0, &piece.t0),
                t1: pick(&earlier.t1, &piece.t1),
                r: pick(&earlier.r, &piece.r),
                k: pick(&earlier.k, &piece.k),
                u: pick(&earlier.u, &piece.u),
                v: pick(&earlier.v, &piece.v),
                q: pick(&earlier.q, &piece.q),
                w1: piece.w1.clone(),
                w2: piece.w2.clone(),
            }
        };
    }
    let d = ops.sub(&clamped, &piece.start_x);
    let in_range = want_slope.then(|| {
        let (zero, one) = (ops.constant(0.0), ops.constant(1.0));
        let above = ops.le(&zero, x);
        let below = ops.le(x, &one);
        ops.and(&above, &below)
    });
    if straight {
        let inner = ops.mul_add(&piece.w2, &d, &piece.w1);
        let y = ops.mul_add(&inner, &d, &piece.u);
        let slope = in_range.map(|in_range| {
            let two_w2 = ops.add(&piece.w2, &piece.w2);
            let slope = ops.mul_add(&two_w2, &d, &piece.w1);
            let passes = ops.indicator(&in_range);
            ops.mul(&slope, &passes)
        });
        return (y, slope);
    }
    let disc_raw = ops.mul_add(&piece.b, &d, &piece.a);
    let disc = ops.clamp_min(&disc_raw, SQRT_FLOOR);
    let root = ops.sqrt(&disc);
    let linear_part = ops.mul_add(&piece.r, &d, &piece.t0);
    let t_raw = ops.mul_add(&piece.t1, &root, &linear_part);
    let t = ops.clamp(&t_raw, 0.0, 1.0);
    let inner = ops.mul_add(&piece.q, &t, &piece.v);
    let y = ops.mul_add(&inner, &t, &piece.u);
    let slope = in_range.map(|in_range| {
        let two_q = ops.add(&piece.q, &piece.q);
        let dy_dt = ops.mul_add(&two_q, &t, &piece.v);
        let k_over_root = ops.div(&piece.k, &root);
        let dt_dx = ops.add(&piece.r, &k_over_root);
        let (zero, one) = (ops.constant(0.0), ops.constant(1.0));
        let floor = ops.constant(SQRT_FLOOR);
        let above_floor = ops.le(&floor, &disc_raw);
        let t_low = ops.le(&zero, &t_raw);
        let t_high = ops.le(&t_raw, &one);
        let t_inside = ops.and(&t_low, &t_high);
        let passes = ops.and(&above_floor, &t_inside);
        let passes = ops.and(&passes, &in_range);
        let passes = ops.indicator(&passes);
        let slope = ops.mul(&dy_dt, &dt_dx);
        ops.mul(&slope, &passes)
    });
    (y, slope)
}

/// The back end for plain `f64` numbers.
pub struct Numbers;

impl CurveOps for Numbers {
    type Value = f64;
    type Mask = bool;
    fn constant(&mut self, value: f64) -> f64 {
        value
    }
    fn add(&mut self, a: &f64, b: &f64) -> f64 {
        a + b
    }
    fn sub(&mut self, a: &f64, b: &f64) -> f64 {
        a - b
    }
    fn mul(&mut self, a: &f64, b: &f64) -> f64 {
        a * b
    }
    fn div(&mut self, a: &f64, b: &f64) -> f64 {
        a / b
    }
    fn sqrt(&mut self, a: &f64) -> f64 {
        a.sqrt()
    }
    fn abs(&mut self, a: &f64) -> f64 {
        a.abs()
    }
    fn clamp(&mut self, a: &f64, low: f64, high: f64) -> f64 {
        a.max(low).min(high)
    }
    fn clamp_min(&mut self, a: &f64, low: f64) -> f64 {
        a.max(low)
    }
    fn le(&mut self, a: &f64, b: &f64) -> bool {
        a <= b
    }
    fn lt(&mut self, a: &f64, b: &f64) -> bool {
        a < b
    }
    fn not(&mut self, a: &bool) -> bool {
        !a
    }
    fn and(&mut self, a: &bool, b: &bool) -> bool {
        *a && *b
    }
    fn select(&mut self, take: &bool, a: &f64, b: &f64) -> f64 {
        if *take {
            *a
        } else {
            *b
        }
    }
    fn select_mask(&mut self, take: &bool, a: &bool, b: &bool) -> bool {
        if *take {
            *a
        } else {
            *b
        }
    }
    fn indicator(&mut self, mask: &bool) -> f64 {
        f64::from(u8::from(*mask))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curve::Curve;

    fn curves() -> Vec<Curve> {
        vec![
            Curve::identity(1),
            Curve::identity(2),
            Curve::from_search(&[0.9, 0.1, 0.3, 0.7, 0.5, 0.2], 2).unwrap(),
            Curve::from_search(&[0.2, 0.8, 0.6, 0.1, 0.4, 0.9, 0.3, 0.3, 0.7, 0.5], 3).unwrap(),
            // A joint at x = 1: the second piece has zero width.
            Curve::from_flat(&[0.3, 0.6, 1.0, 0.8, 1.0, 0.9]).unwrap(),
            Curve::from_flat(&[0.0, 1.0]).unwrap(),
        ]
    }

    /// Both strategies give the same values and slopes, and the slope is the derivative of
    /// the value (central differences away from joints).
    #[test]
    fn strategies_agree_and_slopes_are_derivatives() {
        for curve in curves() {
            let pieces: Vec<_> = curve.segments().iter().map(|s| Piece::known(&mut Numbers, s)).collect();
            let joints: Vec<f64> = curve.segments().iter().map(|s| s.end[0]).collect();
            for i in 0..=400 {
                let x = -0.1 + 1.2 * i as f64 / 400.0;
                let (v1, s1) = eval(&mut Numbers, &x, &pieces, Strategy::EachPiece, true);
                let (v2, s2) = eval(&mut Numbers, &x, &pieces, Strategy::BlendPieces, true);
                assert!((v1 - v2).abs() < 1e-12 && (s1.unwrap() - s2.unwrap()).abs() < 1e-9, "{curve:?} {x}");
                let h = 1e-6;
                if joints.iter().chain([0.0, 1.0].iter()).all(|j| (x - j).abs() > 1e-3) {
                    let (up, _) = eval(&mut Numbers, &(x + h), &pieces, Strategy::EachPiece, false);
                    let (down, _) = eval(&mut Numbers, &(x - h), &pieces, Strategy::EachPiece, false);
                    let numeric = (up - down) / (2.0 * h);
                    let slope = s1.unwrap();
                    assert!(
                        (numeric - slope).abs() <= 1e-4 * (1.0 + slope.abs()),
                        "{curve:?} x={x}: {numeric} vs {slope}"
                    );
                }
            }
        }
    }

    /// The folded form gives [`eval`]'s values and slopes (away from joints, where only the
    /// rounding of the piece's normalized x may differ), straight curves with and without the
    /// square root.
    #[test]
    fn folded_pieces_equal_the_curve_math() {
        for curve in curves() {
            let segments = curve.segments();
            let pieces: Vec<_> = segments.iter().map(|s| Piece::known(&mut Numbers, s)).collect();
            let folded: Vec<_> = segments.iter().map(|s| Folded::new(s).constants(&mut Numbers)).collect();
            let straight = segments.iter().all(|s| s.linear || s.width() <= 0.0);
            let joints: Vec<f64> = segments.iter().map(|s| s.end[0]).collect();
            for i in 0..=1200 {
                let x = -0.1 + 1.2 * i as f64 / 1200.0;
                let (value, slope) = eval(&mut Numbers, &x, &pieces, Strategy::EachPiece, true);
                for general in [false, true].into_iter().filter(|&g| g || straight) {
                    let (v, s) = eval_folded(&mut Numbers, &x, &folded, straight && !general, true);
                    assert!((v - value).abs() < 1e-12, "{curve:?} x={x}: value {v} vs {value}");
                    if joints.iter().all(|j| (x - j).abs() > 1e-9) {
                        let (s, slope) = (s.unwrap(), slope.unwrap());
                        assert!(
                            (s - slope).abs() < 1e-9 * (1.0 + slope.abs()),
                            "{curve:?} x={x}: slope {s} vs {slope}"
                        );
                    }
                    let (v, s) = eval_folded(&mut Numbers, &x, &folded, straight && !general, false);
                    assert!((v - value).abs() < 1e-12 && s.is_none());
                }
            }
        }
    }

    /// Coefficients computed from points at run time give the baked curve's values.
    #[test]
    fn run_time_coefficients_equal_baked_ones() {
        for curve in curves() {
            let baked: Vec<_> = curve.segments().iter().map(|s| Piece::known(&mut Numbers, s)).collect();
            let dynamic: Vec<_> = curve
                .segments()
                .iter()
                .map(|s| {
                    Piece::from_points(
                        &mut Numbers,
                        [&s.start[0], &s.start[1]],
                        [&s.middle[0], &s.middle[1]],
                        [&s.end[0], &s.end[1]],
                    )
                })
                .collect();
            for i in 0..=200 {
                let x = i as f64 / 200.0;
                let (a, da) = eval(&mut Numbers, &x, &baked, Strategy::EachPiece, true);
                let (b, db) = eval(&mut Numbers, &x, &dynamic, Strategy::EachPiece, true);
                assert!((a - b).abs() < 1e-9 && (da.unwrap() - db.unwrap()).abs() < 1e-6, "{curve:?} {x}: {a} {b}");
            }
        }
    }
}
