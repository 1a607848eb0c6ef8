//! The published Auto Seg-Loss reference values: for every case and all six metrics, the
//! tch surrogate loss is within 1e-5 relative of `expected_loss` and the exact evaluator
//! within 1e-6 of `expected_metric_of_argmax`.

mod common;

use common::root;

use compiler::params::Params;
use losscc_cli::npy;
use losscc_loss::{Loss, Overrides};
use serde_json::Value;

#[test]
fn all_reference_cases_match() {
    let dir = root().join("tests/data/asl-vectors");
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let cases = cases["cases"].as_array().expect("cases list");
    assert_eq!(cases.len(), 24, "4 inputs x 6 metrics");
    let mut worst_loss: f64 = 0.0;
    let mut worst_metric: f64 = 0.0;
    for case in cases {
        let metric = case["metric"].as_str().unwrap();
        let mut overrides = Overrides::new();
        if metric == "biou" || metric == "bf1" {
            overrides = overrides.text("tol", &case["tol"].to_string()).text("drop_bg", &case["drop_bg"].to_string());
        }
        let mut loss = Loss::from_file(&root().join(format!("examples/{metric}.metric")), &overrides).unwrap();
        let published = serde_json::json!({ "control_points": case["control_points"] }).to_string();
        loss.set_params(Params::from_json(&published, loss.compiled().manifest()).unwrap()).unwrap();
        let logits = npy::read_logits(&dir.join(case["logits"].as_str().unwrap())).unwrap();
        let labels = npy::read_labels(&dir.join(case["labels"].as_str().unwrap())).unwrap();
        let got_loss = loss.forward(&logits, &labels).unwrap().double_value(&[]);
        let expected_loss = case["expected_loss"].as_f64().unwrap();
        let relative = ((got_loss - expected_loss) / expected_loss).abs();
        assert!(relative < 1e-5, "case {} {metric}: loss {got_loss} vs {expected_loss} ({relative:e})", case["case"]);
        let mut evaluator = loss.evaluator();
        evaluator.add_batch(&logits, &labels).unwrap();
        let got_metric = evaluator.finish().unwrap().value;
        let expected_metric = case["expected_metric_of_argmax"].as_f64().unwrap();
        let difference = (got_metric - expected_metric).abs();
        assert!(difference < 1e-6, "case {} {metric}: metric {got_metric} vs {expected_metric}", case["case"]);
        worst_loss = worst_loss.max(relative);
        worst_metric = worst_metric.max(difference);
    }
    eprintln!("worst loss relative error {worst_loss:e}, worst metric absolute error {worst_metric:e}");
}

#[test]
fn exact_counts_add_across_batches() {
    // Evaluating a two-image case image by image gives the same metric as one batch:
    // counts accumulate, ratios are taken once at the end.
    let dir = root().join("tests/data/asl-vectors");
    let logits = npy::read_logits(&dir.join("case2_logits.npy")).unwrap();
    let labels = npy::read_labels(&dir.join("case2_labels.npy")).unwrap();
    for metric in ["miou", "fwiou", "macc", "gacc", "biou", "bf1"] {
        let loss = Loss::from_file(&root().join(format!("examples/{metric}.metric")), &Overrides::new()).unwrap();
        let mut whole = loss.evaluator();
        whole.add_batch(&logits, &labels).unwrap();
        let mut split = loss.evaluator();
        for i in 0..2 {
            split.add_batch(&logits.narrow(0, i, 1), &labels.narrow(0, i, 1)).unwrap();
        }
        let (a, b) = (whole.finish().unwrap().value, split.finish().unwrap().value);
        assert!((a - b).abs() < 1e-12, "{metric}: {a} vs {b}");
    }
}
