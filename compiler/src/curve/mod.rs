//! Monotone piecewise quadratic Bézier curves from (0,0) to (1,1), the surrogates' knobs.
//!
//! A curve of `k` pieces has `2k − 1` free control points: for each piece a middle point,
//! and between pieces a joint. Guarantees, by construction:
//! * `g(0) = 0` and `g(1) = 1` (the truth table of the logical operator is kept);
//! * control point coordinates never decrease, so `g` is monotone non-decreasing;
//! * evaluation is closed-form (the quadratic for `t` is solved directly) and finite on
//!   all of `[0, 1]`, including piece joints, degenerate pieces and the linear case.
//!
//! Search variables `u ∈ [0,1]^(2(2k−1))` map to control points cumulatively and
//! coordinate-wise: `p_i = p_{i−1} + u_i (1 − p_{i−1})` with `p_0 = (0, 0)`.
//!
//! This module holds the curve as data ([`Curve`], its folded [`Segment`]s); [`math`] holds
//! its evaluation, written once and instantiated by every back end.

pub mod math;

pub use math::{LINEAR_TOLERANCE, SQRT_FLOOR};
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum CurveError {
    #[error("a curve needs an even number of coordinates (x,y pairs), got {0}")]
    OddCoordinates(usize),
    #[error("a curve of k pieces has 2k-1 control points (1, 3, 5, ...), got {0} points")]
    EvenPoints(usize),
    #[error("control point {index} coordinate {value} is outside [0, 1] or not finite")]
    OutOfRange { index: usize, value: f64 },
    #[error("control point {index} ({x}, {y}) goes back from the previous point ({px}, {py}); control points must not decrease in x or y, so that the curve is monotone")]
    NotMonotone { index: usize, x: f64, y: f64, px: f64, py: f64 },
    #[error("a curve needs {expected} search variables for {pieces} pieces, got {got}")]
    SearchVariables { expected: usize, pieces: usize, got: usize },
    #[error("a curve needs at least one piece")]
    NoPieces,
}

/// The free control points of one curve.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Curve {
    points: Vec<[f64; 2]>,
}

/// One quadratic piece with its coefficients folded: evaluation needs only these numbers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Segment {
    /// Start, middle and end control points.
    pub start: [f64; 2],
    pub middle: [f64; 2],
    pub end: [f64; 2],
    /// The middle point's x in piece-normalised coordinates.
    pub m: f64,
    /// Whether the piece's x(t) is linear (`m = 1/2`), so `t = x'`.
    pub linear: bool,
}

impl Segment {
    /// Width of the piece along x; zero for a degenerate (vertical) piece.
    pub fn width(&self) -> f64 {
        self.end[0] - self.start[0]
    }
}

impl Curve {
    /// Build from control points, checking range and monotonicity.
    pub fn from_points(points: Vec<[f64; 2]>) -> Result<Curve, CurveError> {
        if points.is_empty() {
            return Err(CurveError::NoPieces);
        }
        if points.len() % 2 == 0 {
            return Err(CurveError::EvenPoints(points.len()));
        }
        let mut previous = [0.0, 0.0];
        for (index, point) in points.iter().enumerate() {
            for &value in point {
                if !value.is_finite() || !(0.0..=1.0).contains(&value) {
                    return Err(CurveError::OutOfRange { index: index + 1, value });
                }
            }
            if point[0] < previous[0] || point[1] < previous[1] {
                return Err(CurveError::NotMonotone {
                    index: index + 1,
                    x: point[0],
                    y: point[1],
                    px: previous[0],
                    py: previous[1],
                });
            }
            previous = *point;
        }
        Ok(Curve { points })
    }

    /// Build from a flat `[x1, y1, x2, y2, ...]` list (the published layout).
    pub fn from_flat(flat: &[f64]) -> Result<Curve, CurveError> {
        if flat.len() % 2 != 0 {
            return Err(CurveError::OddCoordinates(flat.len()));
        }
        Curve::from_points(flat.chunks(2).map(|pair| [pair[0], pair[1]]).collect())
    }

    /// The identity curve `g(x) = x` with `pieces` pieces (the published starting point).
    pub fn identity(pieces: usize) -> Curve {
        let n = 2 * pieces.max(1) - 1;
        let denominator = (2 * pieces.max(1)) as f64;
        let points = (1..=n).map(|i| [i as f64 / denominator, i as f64 / denominator]).collect();
        Curve { points }
    }

    /// Number of search variables for a curve of `pieces` pieces.
    pub fn search_len(pieces: usize) -> usize {
        2 * (2 * pieces - 1)
    }

    /// Map search variables `u ∈ [0,1]` to control points (monotone by construction).
    pub fn from_search(u: &[f64], pieces: usize) -> Result<Curve, CurveError> {
        if pieces == 0 {
            return Err(CurveError::NoPieces);
        }
        let expected = Curve::search_len(pieces);
        if u.len() != expected {
            return Err(CurveError::SearchVariables { expected, pieces, got: u.len() });
        }
        let mut previous = [0.0f64, 0.0f64];
        let mut points = Vec::with_capacity(2 * pieces - 1);
        for pair in u.chunks(2) {
            let mut point = [0.0; 2];
            for axis in 0..2 {
                let step = pair[axis].clamp(0.0, 1.0);
                point[axis] = (previous[axis] + step * (1.0 - previous[axis])).clamp(previous[axis], 1.0);
            }
            points.push(point);
            previous = point;
        }
        Ok(Curve { points })
    }

    /// The inverse of [`Curve::from_search`] (where a coordinate reaches 1 the later `u` are 0).
    pub fn to_search(&self) -> Vec<f64> {
        let mut previous = [0.0f64, 0.0f64];
        let mut u = Vec::with_capacity(self.points.len() * 2);
        for point in &self.points {
            for axis in 0..2 {
                let room = 1.0 - previous[axis];
                u.push(if room > 0.0 { ((point[axis] - previous[axis]) / room).clamp(0.0, 1.0) } else { 0.0 });
            }
            previous = *point;
        }
        u
    }

    pub fn pieces(&self) -> usize {
        self.points.len().div_ceil(2)
    }

    pub fn points(&self) -> &[[f64; 2]] {
        &self.points
    }

    /// Control points flattened to `[x1, y1, x2, y2, ...]`.
    pub fn flat(&self) -> Vec<f64> {
        self.points.iter().flat_map(|p| [p[0], p[1]]).collect()
    }

    /// The pieces with folded coefficients, in x order.
    pub fn segments(&self) -> Vec<Segment> {
        let mut all = Vec::with_capacity(self.points.len() + 2);
        all.push([0.0, 0.0]);
        all.extend(self.points.iter().copied());
        all.push([1.0, 1.0]);
        (0..self.pieces())
            .map(|i| {
                let (start, middle, end) = (all[2 * i], all[2 * i + 1], all[2 * i + 2]);
                let width = end[0] - start[0];
                let m = if width > 0.0 { (middle[0] - start[0]) / width } else { 0.5 };
                Segment { start, middle, end, m, linear: (2.0 * m - 1.0).abs() < LINEAR_TOLERANCE }
            })
            .collect()
    }

    /// `g(x)` for `x` clamped to `[0, 1]` (NaN counts as 0), in float64: the curve math of
    /// [`math`] with plain numbers.
    pub fn eval(&self, x: f64) -> f64 {
        let x = if x.is_nan() { 0.0 } else { x };
        let pieces: Vec<_> = self.segments().iter().map(|s| math::Piece::known(&mut math::Numbers, s)).collect();
        math::eval(&mut math::Numbers, &x, &pieces, math::Strategy::EachPiece, false).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_identity_and_matches_published_start() {
        for pieces in 1..=4 {
            let curve = Curve::identity(pieces);
            for i in 0..=100 {
                let x = i as f64 / 100.0;
                assert!((curve.eval(x) - x).abs() < 1e-12, "pieces {pieces} x {x}");
            }
        }
        let u = Curve::identity(2).to_search();
        let published = [0.25, 0.25, 1.0 / 3.0, 1.0 / 3.0, 0.5, 0.5];
        for (a, b) in u.iter().zip(published) {
            assert!((a - b).abs() < 1e-12);
        }
        assert_eq!(Curve::identity(1).to_search(), vec![0.5, 0.5]);
    }

    #[test]
    fn search_round_trip_and_monotone() {
        let u = [0.9, 0.1, 0.3, 0.7, 0.5, 0.2];
        let curve = Curve::from_search(&u, 2).unwrap();
        let back = curve.to_search();
        for (a, b) in u.iter().zip(&back) {
            assert!((a - b).abs() < 1e-12);
        }
        let mut last = 0.0;
        for i in 0..=1000 {
            let y = curve.eval(i as f64 / 1000.0);
            assert!(y >= last - 1e-12 && y.is_finite());
            last = y;
        }
        assert_eq!(curve.eval(0.0), 0.0);
        assert!((curve.eval(1.0) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn rejects_bad_points() {
        assert_eq!(Curve::from_flat(&[0.1, 0.2, 0.3]), Err(CurveError::OddCoordinates(3)));
        assert_eq!(Curve::from_flat(&[0.1, 0.2, 0.3, 0.4]), Err(CurveError::EvenPoints(2)));
        assert!(matches!(
            Curve::from_flat(&[0.5, 0.5, 0.4, 0.6, 0.9, 0.9]),
            Err(CurveError::NotMonotone { index: 2, .. })
        ));
        assert!(matches!(Curve::from_flat(&[1.5, 0.5]), Err(CurveError::OutOfRange { .. })));
    }

    #[test]
    fn extreme_control_points_stay_finite() {
        for flat in [[0.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.5, 0.5]] {
            let curve = Curve::from_flat(&flat).unwrap();
            for i in 0..=100 {
                let y = curve.eval(i as f64 / 100.0);
                assert!(y.is_finite() && (0.0..=1.0).contains(&y), "{flat:?} {y}");
            }
        }
    }
}
