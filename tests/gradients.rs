//! Gradients and robustness of every example metric's surrogate:
//! * gradients match central finite differences on small random inputs, with random
//!   monotone curves so the curves are exercised: on the float64 reference path (to 1e-4
//!   relative) and on the default fused path in float32 (differences in float64 of float32
//!   losses, to a tolerance that fits float32's resolution);
//! * loss and gradients stay finite for extreme logits, all-ignored batches, images of one
//!   class and classes absent from the batch.

mod common;

use common::{examples, Rng};

use compiler::curve::Curve;
use compiler::params::Params;
use losscc_loss::{Loss, Overrides};
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn random_params(loss: &Loss, rng: &mut Rng) -> Params {
    let manifest = loss.compiled().manifest();
    let curves = manifest
        .curves
        .iter()
        .map(|spec| {
            let u: Vec<f64> = (0..Curve::search_len(spec.pieces)).map(|_| 0.15 + 0.7 * rng.next()).collect();
            Curve::from_search(&u, spec.pieces).unwrap()
        })
        .collect();
    Params { curves, fixed: vec![false; manifest.curves.len()] }
}

fn inputs(rng: &mut Rng, n: i64, c: i64, h: i64, w: i64, scale: f64) -> (Tensor, Tensor) {
    let logits: Vec<f64> = (0..n * c * h * w).map(|_| (rng.next() - 0.5) * 2.0 * scale).collect();
    // Blocky labels so there are real boundaries, plus a few ignored pixels.
    let labels: Vec<i64> = (0..n * h * w)
        .map(|i| {
            let (y, x) = ((i / w) % h, i % w);
            if rng.next() < 0.05 {
                255
            } else {
                ((y / 3 + x / 4) % c + (i / (h * w))) % c
            }
        })
        .collect();
    (
        Tensor::from_slice(&logits).reshape([n, c, h, w]).to_kind(Kind::Double),
        Tensor::from_slice(&labels).reshape([n, h, w]),
    )
}

fn example_loss(path: &Path) -> Loss {
    Loss::from_file(path, &Overrides::new().set("tol", 1))
        .or_else(|_| Loss::from_file(path, &Overrides::new()))
        .unwrap()
}

/// Compare the gradient of `loss` at `logits` (of their kind) with central differences
/// (of losses evaluated at float64 copies shifted by `eps`, cast to the logits' kind) on 24
/// random coordinates, with tolerance `absolute + relative·|g|` (or a quarter of the step,
/// with four times `absolute`, where the loss bends within the first). Returns how many of
/// them have a clearly non-zero derivative.
fn check_gradient(
    name: &str,
    loss: &Loss,
    logits: &Tensor,
    labels: &Tensor,
    eps: f64,
    (absolute, relative): (f64, f64),
    rng: &mut Rng,
) -> usize {
    let x = logits.copy().set_requires_grad(true);
    let value = loss.forward(&x, labels).unwrap();
    value.backward();
    let grad = x.grad().to_kind(Kind::Double);
    let numel = x.numel() as i64;
    let base = logits.to_kind(Kind::Double);
    let mut nonzero = 0;
    for _ in 0..24 {
        let index = (rng.next() * numel as f64) as i64 % numel;
        let shifted = |delta: f64| {
            let y = base.copy();
            let _ = y.view([-1]).get(index).fill_(base.view([-1]).get(index).double_value(&[]) + delta);
            loss.forward(&y.to_kind(logits.kind()), labels).unwrap().double_value(&[])
        };
        let analytic = grad.view([-1]).get(index).double_value(&[]);
        let differences = |step: f64, absolute: f64| {
            let numeric = (shifted(step) - shifted(-step)) / (2.0 * step);
            (numeric, absolute + relative * numeric.abs().max(analytic.abs()))
        };
        let (mut numeric, mut tolerance) = differences(eps, absolute);
        if (numeric - analytic).abs() > tolerance {
            // The loss is piecewise smooth: a curve joint or a change of a pooling's winner
            // within ±eps bends it. A quarter of the step must then agree (the rounding of
            // the losses weighs four times as much there).
            (numeric, tolerance) = differences(eps / 4.0, 4.0 * absolute);
        }
        assert!(
            (numeric - analytic).abs() <= tolerance,
            "{name}: d loss / d logit[{index}] {analytic:e} vs finite difference {numeric:e} (tolerance {tolerance:e})"
        );
        // Clearly above the differences' own rounding. A sigmoid metric's derivatives are
        // smaller (every channel of every pixel weighs a little), so they count from 3x.
        let clearly = if loss.compiled().relaxed.predictions.is_sigmoid() { 3.0 } else { 10.0 };
        if numeric.abs() > clearly * absolute {
            nonzero += 1;
        }
    }
    nonzero
}

/// A seed from a file's name (FNV-1a).
fn name_seed(path: &Path) -> u64 {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

#[test]
fn gradients_match_finite_differences_on_the_reference_path() {
    for path in examples() {
        // Each example its own stream: adding an example changes no other one's draws.
        let mut rng = Rng(0x5eed_1234_abcd_0001 ^ name_seed(&path));
        let mut loss = example_loss(&path);
        loss.set_params(random_params(&loss, &mut rng)).unwrap();
        loss.set_fast_path(false);
        let (logits, labels) = inputs(&mut rng, 2, 4, 7, 8, 2.0);
        let name = path.display().to_string();
        let nonzero = check_gradient(&name, &loss, &logits, &labels, 1e-6, (1e-6, 1e-4), &mut rng);
        // A loss that ignored most logits (a gradient lost on the way) would fail here.
        assert!(nonzero >= 8, "{name}: only {nonzero} of 24 sampled derivatives are non-zero");
    }
}

/// The default path (the fused kernel on CPU float32) against finite differences of its own
/// float32 losses: a step of 1e-2 keeps the float32 rounding of a loss near 1 (about 6e-8)
/// small against the change it measures, and the tolerance allows for that rounding and the
/// curvature over the step.
#[test]
fn gradients_match_finite_differences_on_the_fused_path() {
    for path in examples() {
        // Each example its own stream: adding an example changes no other one's draws.
        let mut rng = Rng(0x5eed_1234_abcd_0002 ^ name_seed(&path));
        let mut loss = example_loss(&path);
        loss.set_params(random_params(&loss, &mut rng)).unwrap();
        let (logits, labels) = inputs(&mut rng, 2, 4, 7, 8, 2.0);
        let logits = logits.to_kind(Kind::Float);
        let name = path.display().to_string();
        let nonzero = check_gradient(&name, &loss, &logits, &labels, 1e-2, (2e-5, 2e-2), &mut rng);
        assert!(nonzero >= 8, "{name}: only {nonzero} of 24 sampled derivatives are non-zero");
    }
}

fn assert_finite(path: &Path, what: &str, loss: &Loss, logits: &Tensor, labels: &Tensor) {
    let x = logits.to_kind(Kind::Float).set_requires_grad(true);
    let value = loss.forward(&x, labels).unwrap();
    let v = value.double_value(&[]);
    assert!(v.is_finite(), "{} ({what}): loss {v}", path.display());
    value.backward();
    let grad = x.grad();
    let bad = grad.isfinite().logical_not().sum(Kind::Int64).int64_value(&[]);
    assert_eq!(bad, 0, "{} ({what}): {bad} non-finite gradient entries", path.display());
}

#[test]
fn loss_and_gradients_stay_finite_on_edge_cases() {
    let mut rng = Rng(0x0bad_cafe_0000_0042);
    for path in examples() {
        let mut loss = Loss::from_file(&path, &Overrides::new()).unwrap();
        loss.set_params(random_params(&loss, &mut rng)).unwrap();
        let (logits, labels) = inputs(&mut rng, 1, 3, 9, 9, 1.0);
        let huge = (&logits.sign() * 1e4).to_kind(Kind::Double);
        assert_finite(&path, "logits of +-1e4", &loss, &huge, &labels);
        let ignored = labels.full_like(255);
        assert_finite(&path, "every pixel ignored", &loss, &logits, &ignored);
        let one_class = labels.zeros_like();
        assert_finite(&path, "one class, no boundaries", &loss, &logits, &one_class);
        let absent = labels.clamp(0, 1);
        assert_finite(&path, "class 2 absent", &loss, &logits, &absent);
        let saturated = (one_class.zeros_like().unsqueeze(1).to_kind(Kind::Double) * 0.0
            + Tensor::from_slice(&[1e4, -1e4, -1e4]).view([1, 3, 1, 1]))
        .to_device(Device::Cpu);
        assert_finite(&path, "saturated softmax", &loss, &saturated, &one_class);
    }
}

/// A denominator written `d + 0` is not an explicit epsilon: where `d` is 0 the surrogate is
/// still finite (0/0 would be NaN), on both paths, in value and gradient.
#[test]
fn a_zero_literal_in_a_denominator_cannot_make_nan() {
    let source = "metric ratio {\n    mean(count(P & L & V) / (count(P & L & V) + 0))\n}\n";
    let mut loss = Loss::from_source("ratio.metric", source, &Overrides::new()).unwrap();
    // Class 2 is absent from the labels, so its intersection is exactly 0.
    let logits = Tensor::from_slice(&[2.0f32, -1.0, 0.5, 0.0]).repeat([9]).view([1, 4, 3, 3]);
    let labels = Tensor::from_slice(&[0i64, 1, 3, 0, 1, 3, 0, 1, 3]).view([1, 3, 3]);
    for fast in [true, false] {
        loss.set_fast_path(fast);
        let x = logits.copy().set_requires_grad(true);
        let value = loss.forward(&x, &labels).unwrap();
        value.backward();
        assert!(value.double_value(&[]).is_finite(), "fast path {fast}: {}", value.double_value(&[]));
        assert_eq!(x.grad().isfinite().logical_not().sum(Kind::Int64).int64_value(&[]), 0, "fast path {fast}");
    }
}

#[test]
fn undefined_metric_gives_zero_loss_and_says_so() {
    // BF1 averages over classes with label boundaries: an image of one class has none.
    let path = common::root().join("examples/bf1.metric");
    let loss = Loss::from_file(&path, &Overrides::new()).unwrap();
    let mut rng = Rng(7);
    let values: Vec<f32> = (0..3 * 64).map(|_| (rng.next() - 0.5) as f32 * 4.0).collect();
    let logits = Tensor::from_slice(&values).view([1, 3, 8, 8]).set_requires_grad(true);
    let labels = Tensor::zeros([1, 8, 8], (Kind::Int64, Device::Cpu));
    let out = loss.forward_detailed(&logits, &labels).unwrap();
    assert!(!out.defined);
    assert_eq!(out.loss.double_value(&[]), 0.0);
    out.loss.backward();
    assert_eq!(logits.grad().abs().sum(Kind::Double).double_value(&[]), 0.0);
    let mut evaluator = loss.evaluator();
    evaluator.add_batch(&logits.detach(), &labels).unwrap();
    assert!(evaluator.finish().unwrap().value.is_nan(), "the exact metric is undefined too");
}
