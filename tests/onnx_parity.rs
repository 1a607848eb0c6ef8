//! The ONNX back end agrees with the tch back end: every example metric, compiled once to
//! ONNX and run through ONNX Runtime on inputs of several shapes (one model, many shapes),
//! gives the tch loss to 1e-5 relative, and its exact-count graph gives the tch counts. The
//! reference vectors are checked through ONNX too.

mod common;

use common::{examples, root, Rng};

use compiler::curve::Curve;
use compiler::onnx;
use compiler::params::Params;
use runtime::onnx_runtime::OnnxModel;
use runtime::{npy, tch_backend, Loss};
use tch::{Kind, Tensor};

fn random_inputs(rng: &mut Rng, shape: [i64; 4]) -> (Tensor, Tensor) {
    let [n, c, h, w] = shape;
    let logits: Vec<f32> = (0..n * c * h * w).map(|_| ((rng.next() - 0.5) * 6.0) as f32).collect();
    let (cy, cx) = (rng.next() * h as f64, rng.next() * w as f64);
    let labels: Vec<i64> = (0..n * h * w)
        .map(|i| {
            let (y, x) = (((i / w) % h) as f64, (i % w) as f64);
            if rng.next() < 0.03 {
                255
            } else {
                let ring = (((y - cy).powi(2) + (x - cx).powi(2)).sqrt() / 3.0) as i64;
                (ring + i / (h * w)) % c
            }
        })
        .collect();
    (Tensor::from_slice(&logits).reshape(shape), Tensor::from_slice(&labels).reshape([n, h, w]))
}

fn run_onnx(model: &mut OnnxModel, logits: &Tensor, labels: &Tensor) -> Vec<(String, Vec<f32>)> {
    let size = logits.size();
    let shape = [size[0], size[1], size[2], size[3]];
    let logits: Vec<f32> = Vec::try_from(logits.reshape([-1])).unwrap();
    let labels: Vec<i64> = Vec::try_from(labels.reshape([-1])).unwrap();
    model.run(logits, shape, labels).unwrap()
}

#[test]
fn every_example_matches_tch_on_many_shapes() {
    let mut rng = Rng(0x0a11_0e55_1234_5678);
    let shapes = [[1, 3, 9, 11], [2, 5, 16, 12], [3, 2, 7, 7], [1, 4, 32, 20]];
    let mut worst: f64 = 0.0;
    for path in examples() {
        let mut loss = Loss::from_file(&path, &[]).unwrap();
        let manifest = loss.compiled().manifest.clone();
        let curves = manifest
            .curves
            .iter()
            .map(|spec| {
                let u: Vec<f64> = (0..Curve::search_len(spec.pieces)).map(|_| 0.05 + 0.9 * rng.next()).collect();
                Curve::from_search(&u, spec.pieces).unwrap()
            })
            .collect::<Vec<_>>();
        loss.set_params(Params { fixed: vec![false; curves.len()], curves: curves.clone() });
        let model = onnx::emit_loss(loss.compiled(), &curves).unwrap();
        let mut session = OnnxModel::from_bytes(&onnx::to_bytes(&model)).unwrap();
        let exact_model = onnx::emit_exact(loss.compiled()).unwrap();
        let mut exact_session = OnnxModel::from_bytes(&onnx::to_bytes(&exact_model)).unwrap();
        for shape in shapes {
            if (shape[1] as usize) < loss.compiled().relaxed.min_classes {
                continue;
            }
            let (logits, labels) = random_inputs(&mut rng, shape);
            let expected = loss.forward(&logits, &labels).unwrap().double_value(&[]);
            let outputs = run_onnx(&mut session, &logits, &labels);
            assert_eq!(outputs[0].0, "loss");
            let got = outputs[0].1[0] as f64;
            let relative = (got - expected).abs() / expected.abs().max(1e-3);
            assert!(relative < 1e-5, "{} {shape:?}: onnx {got} vs tch {expected}", path.display());
            worst = worst.max(relative);
            // Exact counts: the same numbers, output by output.
            let counts = tch_backend::exact_counts(&loss.compiled().exact, &logits, &labels);
            let exact_outputs = run_onnx(&mut exact_session, &logits, &labels);
            assert_eq!(counts.len(), exact_outputs.len());
            for ((node, values), (name, onnx_values)) in counts.iter().zip(&exact_outputs) {
                assert_eq!(name, &format!("count_{}", node.index()));
                for (a, b) in values.iter().zip(onnx_values) {
                    assert!((a - *b as f64).abs() <= 1e-3 * a.abs().max(1.0), "{} {name}: {a} vs {b}", path.display());
                }
            }
        }
    }
    eprintln!("worst ONNX vs tch relative difference: {worst:e}");
}

#[test]
fn reference_vectors_through_onnx() {
    let dir = root().join("tests/data/asl-vectors");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    for case in cases["cases"].as_array().unwrap() {
        let metric = case["metric"].as_str().unwrap();
        let mut overrides = Vec::new();
        if metric == "biou" || metric == "bf1" {
            overrides.push(("tol".to_string(), case["tol"].to_string()));
            overrides.push(("drop_bg".to_string(), case["drop_bg"].to_string()));
        }
        let loss = Loss::from_file(&root().join(format!("examples/{metric}.metric")), &overrides).unwrap();
        let published = serde_json::json!({ "control_points": case["control_points"] }).to_string();
        let params = Params::from_json(&published, &loss.compiled().manifest).unwrap();
        let model = onnx::emit_loss(loss.compiled(), &params.curves).unwrap();
        let mut session = OnnxModel::from_bytes(&onnx::to_bytes(&model)).unwrap();
        let logits = npy::read_logits(&dir.join(case["logits"].as_str().unwrap())).unwrap();
        let labels = npy::read_labels(&dir.join(case["labels"].as_str().unwrap())).unwrap();
        let got = run_onnx(&mut session, &logits.to_kind(Kind::Float), &labels)[0].1[0] as f64;
        let expected = case["expected_loss"].as_f64().unwrap();
        assert!(((got - expected) / expected).abs() < 1e-5, "case {} {metric}: {got} vs {expected}", case["case"]);
    }
}
