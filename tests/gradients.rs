//! Gradients and robustness of every example metric's surrogate:
//! * autograd gradients match float64 central finite differences on small random inputs,
//!   with random monotone curves so the curves are exercised;
//! * loss and gradients stay finite for extreme logits, all-ignored batches, images of one
//!   class and classes absent from the batch.

mod common;

use common::{examples, Rng};

use compiler::curve::Curve;
use compiler::params::Params;
use runtime::Loss;
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn random_params(loss: &Loss, rng: &mut Rng) -> Params {
    let manifest = &loss.compiled().manifest;
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

#[test]
fn gradients_match_finite_differences() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for path in examples() {
        let mut loss =
            Loss::from_file(&path, &[("tol".into(), "1".into())]).or_else(|_| Loss::from_file(&path, &[])).unwrap();
        loss.set_params(random_params(&loss, &mut rng));
        let (logits, labels) = inputs(&mut rng, 2, 4, 7, 8, 2.0);
        let x = logits.set_requires_grad(true);
        let value = loss.forward(&x, &labels).unwrap();
        value.backward();
        let grad = x.grad();
        let numel = x.numel() as i64;
        let mut checked = 0;
        let mut worst: f64 = 0.0;
        for _ in 0..24 {
            let index = (rng.next() * numel as f64) as i64 % numel;
            let eps = 1e-6;
            let shifted = |delta: f64| {
                let y = logits.copy();
                let flat = y.view([-1]);
                let _ = flat.get(index).fill_(logits.view([-1]).get(index).double_value(&[]) + delta);
                loss.forward(&y, &labels).unwrap().double_value(&[])
            };
            let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
            let analytic = grad.view([-1]).get(index).double_value(&[]);
            let error = (numeric - analytic).abs();
            let tolerance = 1e-6 + 1e-4 * numeric.abs().max(analytic.abs());
            assert!(
                error <= tolerance,
                "{}: d loss / d logit[{index}] autograd {analytic:e} vs finite difference {numeric:e}",
                path.display()
            );
            worst = worst.max(error);
            checked += 1;
        }
        assert_eq!(checked, 24);
        assert!(grad.abs().sum(Kind::Double).double_value(&[]) > 0.0, "{}: gradient is all zero", path.display());
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
        let mut loss = Loss::from_file(&path, &[]).unwrap();
        loss.set_params(random_params(&loss, &mut rng));
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

#[test]
fn undefined_metric_gives_zero_loss_and_says_so() {
    // BF1 averages over classes with label boundaries: an image of one class has none.
    let path = common::root().join("examples/bf1.metric");
    let loss = Loss::from_file(&path, &[]).unwrap();
    let logits = Tensor::randn([1, 3, 8, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let labels = Tensor::zeros([1, 8, 8], (Kind::Int64, Device::Cpu));
    let out = loss.forward_detailed(&logits, &labels).unwrap();
    assert!(!out.defined);
    assert_eq!(out.loss.double_value(&[]), 0.0);
    out.loss.backward();
    assert_eq!(logits.grad().abs().sum(Kind::Double).double_value(&[]), 0.0);
    let mut evaluator = loss.evaluator();
    evaluator.add_batch(&logits, &labels).unwrap();
    assert!(evaluator.finish().unwrap().value.is_nan(), "the exact metric is undefined too");
}
