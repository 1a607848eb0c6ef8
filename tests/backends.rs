//! Every case of the back-end corpus (the example library and `tests/corpus/`, see its
//! README) through every Rust back end, compared on the same inputs:
//! * the tch reference interpreter in float64 is the yardstick;
//! * the reference path in float32 and the fused CPU kernel (the default on CPU float32,
//!   with reused scratch poisoned) give its loss to 1e-5 of max(|loss|, 1) and its gradient
//!   to 1e-5 (fused) or 1e-4 (float32 op by op) of the gradient's largest entry;
//! * the ONNX loss graph in ONNX Runtime gives its loss to 1e-5, on the case's shape and on
//!   a second shape through the same model (symbolic N, H, W);
//! * the exact-count graph in ONNX Runtime gives exactly the exact evaluator's counts, and
//!   the metric finished from them equals the evaluator's.

mod common;

use common::corpus::{cases, Case};
use compiler::accumulate::{self, Accumulator};
use compiler::onnx::{self, EmitOptions};
use losscc_cli::onnx_runtime::OnnxModel;
use losscc_loss::{Loss, LossError};
use tch::{Kind, Tensor};

/// The loss value and the logits' gradient for a path and a float kind.
fn forward_backward(loss: &mut Loss, fast: bool, logits: &Tensor, labels: &Tensor) -> Result<(f64, Tensor), LossError> {
    loss.set_fast_path(fast);
    let x = logits.copy().set_requires_grad(true);
    let value = loss.forward(&x, labels)?;
    if value.requires_grad() {
        value.backward();
        Ok((value.double_value(&[]), x.grad().to_kind(Kind::Double)))
    } else {
        Ok((value.double_value(&[]), x.zeros_like().to_kind(Kind::Double)))
    }
}

fn run_onnx(model: &mut OnnxModel, logits: &Tensor, labels: &Tensor) -> Vec<(String, Vec<f32>)> {
    let size = logits.size();
    let shape = [size[0], size[1], size[2], size[3]];
    let logits: Vec<f32> = Vec::try_from(logits.to_kind(Kind::Float).reshape([-1])).unwrap();
    let labels: Vec<i64> = Vec::try_from(labels.reshape([-1])).unwrap();
    model.run(logits, shape, labels).unwrap()
}

fn load(case: &Case) -> Loss {
    let mut loss = Loss::from_file(&case.path, &case.overrides()).unwrap();
    loss.set_ignore_label(case.ignore);
    let pieces: Vec<usize> = loss.compiled().manifest().curves.iter().map(|c| c.pieces).collect();
    loss.set_curves(case.curves(&pieces)).unwrap();
    loss
}

/// The shape of a case with at least as many classes as its metric slices.
fn shape_for(loss: &Loss, shape: [i64; 4]) -> [i64; 4] {
    let [n, c, h, w] = shape;
    [n, c.max(loss.compiled().relaxed.min_classes as i64), h, w]
}

#[test]
fn every_case_agrees_across_back_ends() {
    losscc_loss::testing::set_scratch_poisoning(true);
    let cases = cases();
    assert!(cases.len() >= 20, "the corpus has {} cases", cases.len());
    let mut fused_cases = 0;
    for case in &cases {
        let name = &case.name;
        let mut loss = load(case);
        let shape = shape_for(&loss, case.shape);
        let (logits, labels) = case.inputs(shape);

        let (truth, truth_grad) = forward_backward(&mut loss, false, &logits.to_kind(Kind::Double), &labels).unwrap();
        assert!(truth.is_finite(), "{name}: loss {truth}");
        let scale = truth_grad.abs().max().double_value(&[]).max(1e-9);
        let close = |value: f64| (value - truth).abs() <= 1e-5 * truth.abs().max(1.0);
        let gradient_gap = |grad: &Tensor| (grad - &truth_grad).abs().max().double_value(&[]) / scale;

        let (single, single_grad) = forward_backward(&mut loss, false, &logits, &labels).unwrap();
        assert!(close(single), "{name}: float32 reference {single} vs float64 {truth}");
        assert!(gradient_gap(&single_grad) <= 1e-4, "{name}: float32 reference gradient off by {:e}", gradient_gap(&single_grad));

        loss.set_fast_path(true);
        let fused = loss.uses_fused_kernel(&logits);
        // Every loss with a curve takes the fused kernel; plain cross-entropy stays on
        // libtorch's own kernels.
        assert_eq!(fused, !loss.compiled().manifest().curves.is_empty(), "{name}: which path applies");
        fused_cases += usize::from(fused);
        let (fast, fast_grad) = forward_backward(&mut loss, true, &logits, &labels).unwrap();
        assert!(close(fast), "{name}: fast path {fast} vs reference {truth}");
        assert!(gradient_gap(&fast_grad) <= 1e-5, "{name}: fast-path gradient off by {:e}", gradient_gap(&fast_grad));
        // Without a gradient (no curve stores, no backward sweep) the value is the same.
        let no_grad = tch::no_grad(|| loss.forward(&logits.copy().set_requires_grad(true), &labels)).unwrap();
        assert!((no_grad.double_value(&[]) - fast).abs() <= 1e-6 * fast.abs().max(1.0), "{name}: under no_grad");
        assert!(!no_grad.requires_grad(), "{name}: a value under no_grad needs no backward");

        let options = EmitOptions { ignore_label: case.ignore, ..EmitOptions::default() };
        let model = onnx::emit_loss(loss.compiled(), &loss.params().curves, &options).unwrap();
        let mut session = OnnxModel::from_bytes(&onnx::to_bytes(&model)).unwrap();
        let outputs = run_onnx(&mut session, &logits, &labels);
        assert_eq!(outputs[0].0, "loss");
        let onnx_loss = outputs[0].1[0] as f64;
        assert!(close(onnx_loss), "{name}: ONNX Runtime {onnx_loss} vs tch {truth}");
        // The same model on another shape (symbolic N, H, W; C as the metric needs).
        let other = shape_for(&loss, [1, shape[1], 9, 11]);
        let (other_logits, other_labels) = case.inputs(other);
        let expected = forward_backward(&mut loss, false, &other_logits.to_kind(Kind::Double), &other_labels).unwrap().0;
        let got = run_onnx(&mut session, &other_logits, &other_labels)[0].1[0] as f64;
        assert!((got - expected).abs() <= 1e-5 * expected.abs().max(1.0), "{name} {other:?}: ONNX {got} vs tch {expected}");

        // Exact counts: the evaluator's and the exact graph's, number for number.
        let mut evaluator = loss.evaluator();
        evaluator.add_batch(&logits, &labels).unwrap();
        let counts = evaluator.counts();
        let exact_model = onnx::emit_exact(loss.compiled(), &options).unwrap();
        let mut exact_session = OnnxModel::from_bytes(&onnx::to_bytes(&exact_model)).unwrap();
        let exact_outputs = run_onnx(&mut exact_session, &logits, &labels);
        let exact = &loss.compiled().exact;
        let mut offset = 0;
        for (node, (output, values)) in exact.accumulators().iter().zip(&exact_outputs) {
            let ours = &counts[offset..offset + values.len()];
            offset += values.len();
            for (&a, &b) in ours.iter().zip(values) {
                // Counts of pixel sets are integers, exact in float32; the cross-entropy sum
                // is a float32 sum in ONNX.
                let same = match exact.node(*node) {
                    compiler::ir::Node::NllSum => (a - b as f64).abs() <= 1e-5 * a.abs().max(1.0),
                    _ => a == b as f64,
                };
                assert!(same, "{name}: {output}: evaluator {ours:?} vs ONNX {values:?}");
            }
        }
        assert_eq!(offset + 1, counts.len(), "{name}: every count compared");
        let mut from_onnx = Accumulator::default();
        for (node, (_, values)) in exact.accumulators().iter().zip(&exact_outputs) {
            from_onnx.add(*node, &values.iter().map(|&v| v as f64).collect::<Vec<_>>()).unwrap();
        }
        from_onnx.batches = 1;
        let (ours, theirs) = (evaluator.finish().unwrap().value, accumulate::finish(exact, &from_onnx).unwrap().value);
        let agree = (ours - theirs).abs() <= 1e-6 * ours.abs().max(1.0) || (ours.is_nan() && theirs.is_nan());
        assert!(agree, "{name}: exact metric {ours} vs {theirs}");
    }
    assert!(fused_cases + 1 >= cases.len(), "{fused_cases} of {} cases took the fused kernel", cases.len());
}

#[test]
fn reference_vectors_through_onnx() {
    let dir = common::root().join("tests/data/asl-vectors");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    for case in cases["cases"].as_array().unwrap() {
        let metric = case["metric"].as_str().unwrap();
        let mut overrides = losscc_loss::Overrides::new();
        if metric == "biou" || metric == "bf1" {
            overrides = overrides.text("tol", &case["tol"].to_string()).text("drop_bg", &case["drop_bg"].to_string());
        }
        let loss = Loss::from_file(&common::root().join(format!("examples/{metric}.metric")), &overrides).unwrap();
        let published = serde_json::json!({ "control_points": case["control_points"] }).to_string();
        let params = compiler::params::Params::from_json(&published, loss.compiled().manifest()).unwrap();
        let model = onnx::emit_loss(loss.compiled(), &params.curves, &EmitOptions::default()).unwrap();
        let mut session = OnnxModel::from_bytes(&onnx::to_bytes(&model)).unwrap();
        let logits = losscc_cli::npy::read_logits(&dir.join(case["logits"].as_str().unwrap())).unwrap();
        let labels = losscc_cli::npy::read_labels(&dir.join(case["labels"].as_str().unwrap())).unwrap();
        let got = run_onnx(&mut session, &logits, &labels)[0].1[0] as f64;
        let expected = case["expected_loss"].as_f64().unwrap();
        assert!(((got - expected) / expected).abs() < 1e-5, "case {} {metric}: {got} vs {expected}", case["case"]);
    }
}
