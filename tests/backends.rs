//! Every case of the back-end corpus (the example library and `tests/corpus/`, see its
//! README) through every Rust back end, compared on the same inputs:
//! * the tch reference interpreter in float64 is the yardstick;
//! * the reference path in float32 and the fused CPU kernel (the default on CPU float32,
//!   with reused scratch poisoned; sigmoid metrics stay op by op) give its loss to 1e-5 of
//!   max(|loss|, 1) and its gradient to 1e-5 (fused) or 1e-4 (float32 op by op) of the
//!   gradient's largest entry;
//! * soft labels never take the fused kernel (it reads class indices): there the fast path
//!   is the float32 reference path, bit for bit; volumes with windows take the reference
//!   path too (3-D pooling is libtorch's);
//! * the ONNX loss graph in ONNX Runtime gives its loss to 1e-5, on the case's shape and on
//!   a second shape through the same model (symbolic N, H, W);
//! * the gradient graph (`compile --grad`) in ONNX Runtime gives its loss to 1e-5 and its
//!   `dloss_dlogits` to 1e-5 of the gradient's largest entry (or 4x the float32 tch
//!   reference's own error, where that exceeds it), on both shapes;
//! * the exact-count graph in ONNX Runtime gives exactly the exact evaluator's counts, and
//!   the metric finished from them equals the evaluator's.
//!
//! Every label form of the corpus goes to every one of these back ends: class indices,
//! binary, multi-hot and soft labels (the ONNX graphs compiled with `soft_labels` for the
//! last two, fed float32 labels of the logits' shape), and volumes (graphs compiled with
//! `volumes`).

mod common;

use common::corpus::{cases, Case, Labels};
use compiler::accumulate::{self, Accumulator};
use compiler::curve::Curve;
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
    let shape = logits.size();
    let logits: Vec<f32> = Vec::try_from(logits.to_kind(Kind::Float).reshape([-1])).unwrap();
    // Float labels (soft or multi-hot) have the logits' shape and go in as float32.
    if labels.is_floating_point() {
        let labels: Vec<f32> = Vec::try_from(labels.to_kind(Kind::Float).reshape([-1])).unwrap();
        return model.run(logits, &shape, labels).unwrap();
    }
    let labels: Vec<i64> = Vec::try_from(labels.reshape([-1])).unwrap();
    model.run(logits, &shape, labels).unwrap()
}

fn load(case: &Case) -> Loss {
    let mut loss = Loss::from_file(&case.path, &case.overrides()).unwrap();
    loss.set_ignore_label(case.ignore);
    let pieces: Vec<usize> = loss.compiled().manifest().curves.iter().map(|c| c.pieces).collect();
    loss.set_curves(case.curves(&pieces)).unwrap();
    loss
}

/// The shape of a case with at least as many classes as its metric slices.
fn shape_for(loss: &Loss, shape: &[i64]) -> Vec<i64> {
    let mut shape = shape.to_vec();
    shape[1] = shape[1].max(loss.compiled().relaxed.min_classes as i64);
    shape
}

/// Whether the loss looks at neighbourhoods (`erode`, `dilate`, `border`; `boundary` is
/// built from them), which in a volume are cubes.
fn has_windows(loss: &Loss) -> bool {
    let module = loss.compiled().relaxed.module();
    module.handles().any(|h| {
        matches!(
            module.node(h),
            compiler::ir::Node::Erode { .. } | compiler::ir::Node::Dilate { .. } | compiler::ir::Node::Border { .. }
        )
    })
}

#[test]
fn every_case_agrees_across_back_ends() {
    losscc_loss::testing::set_scratch_poisoning(true);
    let cases = cases();
    assert!(cases.len() >= 20, "the corpus has {} cases", cases.len());
    let (mut fused_cases, mut sigmoid_cases, mut declined_cases) = (0, 0, 0);
    let count = |form: Labels| cases.iter().filter(|case| case.labels == form).count();
    assert!(count(Labels::MultiHot) >= 1 && count(Labels::Soft) >= 1, "multi-hot and soft label cases");
    assert!(cases.iter().filter(|case| case.volumes()).count() >= 2, "volume cases");
    for case in &cases {
        let name = &case.name;
        let mut loss = load(case);
        let shape = shape_for(&loss, &case.shape);
        let (logits, labels) = case.inputs(&shape);

        let (truth, truth_grad) = forward_backward(&mut loss, false, &logits.to_kind(Kind::Double), &labels).unwrap();
        assert!(truth.is_finite(), "{name}: loss {truth}");
        let scale = truth_grad.abs().max().double_value(&[]).max(1e-9);
        let close = |value: f64| (value - truth).abs() <= 1e-5 * truth.abs().max(1.0);
        let gradient_gap = |grad: &Tensor| (grad - &truth_grad).abs().max().double_value(&[]) / scale;

        let (single, single_grad) = forward_backward(&mut loss, false, &logits, &labels).unwrap();
        assert!(close(single), "{name}: float32 reference {single} vs float64 {truth}");
        assert!(
            gradient_gap(&single_grad) <= 1e-4,
            "{name}: float32 reference gradient off by {:e}",
            gradient_gap(&single_grad)
        );

        loss.set_fast_path(true);
        // Every softmax loss with a curve takes the fused kernel; plain cross-entropy stays on
        // libtorch's own kernels, sigmoid metrics and volumes with windows (3-D pooling) on
        // the reference path.
        let sigmoid = loss.compiled().relaxed.predictions.is_sigmoid();
        let window_volume = case.volumes() && has_windows(&loss);
        assert_eq!(
            loss.uses_fused_kernel(&logits),
            !loss.compiled().manifest().curves.is_empty() && !sigmoid && !window_volume,
            "{name}: which path applies"
        );
        // `uses_fused_kernel` looks at the logits only; the kernel reads class indices, so it
        // declines soft labels at `forward`, which then runs the float32 reference path (held
        // to it bit for bit below).
        let soft = case.labels == Labels::Soft;
        let fused = loss.uses_fused_kernel(&logits) && !soft;
        fused_cases += usize::from(fused);
        sigmoid_cases += usize::from(sigmoid);
        declined_cases += usize::from(!sigmoid && (soft || window_volume));
        let (fast, fast_grad) = forward_backward(&mut loss, true, &logits, &labels).unwrap();
        assert!(close(fast), "{name}: fast path {fast} vs reference {truth}");
        if soft {
            assert_eq!(fast, single, "{name}: soft labels take the float32 reference path");
            assert!(fast_grad.equal(&single_grad), "{name}: soft labels take the float32 reference path's gradient");
        }
        // Off the fused kernel the fast path is the float32 reference, held to its bound.
        let fast_bound = if fused { 1e-5 } else { 1e-4 };
        assert!(
            gradient_gap(&fast_grad) <= fast_bound,
            "{name}: fast-path gradient off by {:e}",
            gradient_gap(&fast_grad)
        );
        // Without a gradient (no curve stores, no backward sweep) the value is the same.
        let no_grad = tch::no_grad(|| loss.forward(&logits.copy().set_requires_grad(true), &labels)).unwrap();
        assert!((no_grad.double_value(&[]) - fast).abs() <= 1e-6 * fast.abs().max(1.0), "{name}: under no_grad");
        assert!(!no_grad.requires_grad(), "{name}: a value under no_grad needs no backward");

        let options = EmitOptions {
            ignore_label: case.ignore,
            volumes: case.volumes(),
            soft_labels: case.channel_labels(),
            ..EmitOptions::default()
        };
        let model = onnx::emit_loss(loss.compiled(), &loss.params().curves, &options).unwrap();
        let mut session = OnnxModel::from_bytes(&onnx::to_bytes(&model)).unwrap();
        let outputs = run_onnx(&mut session, &logits, &labels);
        assert_eq!(outputs[0].0, "loss");
        let onnx_loss = outputs[0].1[0] as f64;
        assert!(close(onnx_loss), "{name}: ONNX Runtime {onnx_loss} vs tch {truth}");
        // The same model on another shape (symbolic N, D, H, W; C as the metric needs).
        let other = if case.volumes() { vec![1, shape[1], 3, 5, 6] } else { vec![1, shape[1], 9, 11] };
        let (other_logits, other_labels) = case.inputs(&other);
        let expected =
            forward_backward(&mut loss, false, &other_logits.to_kind(Kind::Double), &other_labels).unwrap().0;
        let got = run_onnx(&mut session, &other_logits, &other_labels)[0].1[0] as f64;
        assert!(
            (got - expected).abs() <= 1e-5 * expected.abs().max(1.0),
            "{name} {other:?}: ONNX {got} vs tch {expected}"
        );

        // The gradient graph: the compiler's own reverse-mode pass, on both shapes.
        let gradient_model = onnx::emit_gradient(loss.compiled(), &loss.params().curves, &options).unwrap();
        let mut gradient_session = OnnxModel::from_bytes(&onnx::to_bytes(&gradient_model)).unwrap();
        for (logits, labels) in [(logits.shallow_clone(), labels.shallow_clone()), (other_logits, other_labels)] {
            let (expected, expected_grad) =
                forward_backward(&mut loss, false, &logits.to_kind(Kind::Double), &labels).unwrap();
            let outputs = run_onnx(&mut gradient_session, &logits, &labels);
            assert_eq!(
                (outputs[0].0.as_str(), outputs[1].0.as_str()),
                ("loss", "dloss_dlogits"),
                "{name}: output names"
            );
            let value = outputs[0].1[0] as f64;
            assert!(
                (value - expected).abs() <= 1e-5 * expected.abs().max(1.0),
                "{name}: gradient graph's loss {value} vs {expected}"
            );
            let grad = Tensor::from_slice(&outputs[1].1).reshape(logits.size()).to_kind(Kind::Double);
            let scale = expected_grad.abs().max().double_value(&[]).max(1e-9);
            let gap = (&grad - &expected_grad).abs().max().double_value(&[]) / scale;
            // Where float32 itself cannot reach 1e-5 (a class whose union is a few pixels makes
            // steep ratios), the graph must stay within 4x of tch's own float32 error.
            let (_, single_grad) = forward_backward(&mut loss, false, &logits, &labels).unwrap();
            let float32_gap = (&single_grad - &expected_grad).abs().max().double_value(&[]) / scale;
            assert!(
                gap <= 1e-5_f64.max(4.0 * float32_gap),
                "{name} {:?}: gradient graph off by {gap:e} of the largest entry (float32 tch: {float32_gap:e})",
                logits.size()
            );
        }
        loss.set_fast_path(true);

        // Exact counts: the evaluator's and the exact graph's, number for number.
        let mut evaluator = loss.evaluator();
        evaluator.add_batch(&logits, &labels).unwrap();
        let counts = evaluator.counts();
        let exact_model = onnx::emit_exact(loss.compiled(), &options).unwrap();
        let mut exact_session = OnnxModel::from_bytes(&onnx::to_bytes(&exact_model)).unwrap();
        let exact_outputs = run_onnx(&mut exact_session, &logits, &labels);
        let exact = &loss.compiled().exact;
        let from_onnx = if exact.per_image {
            // One row per image: each image's counts, finished per image as the evaluator does.
            let images = logits.size()[0] as usize;
            let mut from_onnx = Accumulator::default();
            for image in 0..images {
                let mut counts = Accumulator::default();
                for (node, (_, values)) in exact.accumulators().iter().zip(&exact_outputs) {
                    let width = values.len() / images;
                    let row: Vec<f64> = values[image * width..(image + 1) * width].iter().map(|&v| v as f64).collect();
                    counts.add(*node, &row).unwrap();
                }
                from_onnx.add_image(exact, &counts).unwrap();
            }
            from_onnx.batches = 1;
            let (ours, theirs) = (evaluator.counts(), from_onnx.to_flat());
            assert_eq!(ours.len(), theirs.len(), "{name}: per-image sums");
            for (a, b) in ours.iter().zip(&theirs) {
                assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "{name}: per-image sums {ours:?} vs ONNX {theirs:?}");
            }
            from_onnx
        } else {
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
            from_onnx
        };
        let (ours, theirs) = (evaluator.finish().unwrap().value, accumulate::finish(exact, &from_onnx).unwrap().value);
        let agree = (ours - theirs).abs() <= 1e-6 * ours.abs().max(1.0) || (ours.is_nan() && theirs.is_nan());
        assert!(agree, "{name}: exact metric {ours} vs {theirs}");
    }
    assert!(sigmoid_cases >= 8, "{sigmoid_cases} sigmoid cases");
    // Off the kernel: sigmoid metrics, soft labels, volumes with windows and plain `ce`.
    assert!(
        fused_cases + sigmoid_cases + declined_cases + 1 >= cases.len(),
        "{fused_cases} of {} cases took the fused kernel",
        cases.len()
    );
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

        // The gradient graph at the published curves: the published loss, and tch's gradient.
        let gradient_model = onnx::emit_gradient(loss.compiled(), &params.curves, &EmitOptions::default()).unwrap();
        let mut gradient_session = OnnxModel::from_bytes(&onnx::to_bytes(&gradient_model)).unwrap();
        let outputs = run_onnx(&mut gradient_session, &logits, &labels);
        let value = outputs[0].1[0] as f64;
        assert!(
            ((value - expected) / expected).abs() < 1e-5,
            "case {} {metric}: gradient graph {value} vs {expected}",
            case["case"]
        );
        let mut loss = loss;
        loss.set_params(params.clone()).unwrap();
        let (_, truth) = forward_backward(&mut loss, false, &logits.to_kind(Kind::Double), &labels).unwrap();
        let grad = Tensor::from_slice(&outputs[1].1).reshape(logits.size()).to_kind(Kind::Double);
        let gap = (&grad - &truth).abs().max().double_value(&[]) / truth.abs().max().double_value(&[]);
        // Case 2's logits reach 15.8 (a nearly saturated softmax), where float32 itself
        // cannot give 1e-5: there the bound is four times tch's own float32 deviation.
        let (_, single) = forward_backward(&mut loss, false, &logits, &labels).unwrap();
        let float32_gap = (&single - &truth).abs().max().double_value(&[]) / truth.abs().max().double_value(&[]);
        let bound = f64::max(1e-5, 4.0 * float32_gap);
        assert!(
            gap <= bound,
            "case {} {metric}: gradient graph off by {gap:e} of the largest entry (bound {bound:e})",
            case["case"]
        );
    }
}

/// The gradient graph of `loss` (its current curves) on `logits` and `labels`, against tch's
/// float64 gradient: the loss to 1e-5 and every entry to 1e-5 of the largest one. Returns the
/// graph's gradient.
fn gradient_graph_agrees(what: &str, loss: &mut Loss, logits: &Tensor, labels: &Tensor) -> Tensor {
    let options = EmitOptions { ignore_label: loss.ignore_label(), ..EmitOptions::default() };
    let model = onnx::emit_gradient(loss.compiled(), &loss.params().curves, &options).unwrap();
    let mut session = OnnxModel::from_bytes(&onnx::to_bytes(&model)).unwrap();
    let (expected, truth) = forward_backward(loss, false, &logits.to_kind(Kind::Double), labels).unwrap();
    let outputs = run_onnx(&mut session, logits, labels);
    let value = outputs[0].1[0] as f64;
    assert!(
        value.is_finite() && (value - expected).abs() <= 1e-5 * expected.abs().max(1.0),
        "{what}: loss {value} vs tch {expected}"
    );
    let grad = Tensor::from_slice(&outputs[1].1).reshape(logits.size()).to_kind(Kind::Double);
    assert!(bool::try_from(grad.isfinite().all()).unwrap(), "{what}: a gradient entry is not finite");
    let scale = truth.abs().max().double_value(&[]);
    let gap = (&grad - &truth).abs().max().double_value(&[]);
    assert!(gap <= 1e-5 * scale.max(1e-9), "{what}: gradient off by {gap:e} (largest entry {scale:e})");
    grad
}

/// Every example with curves, at the inputs where a gradient is easiest to get wrong.
#[test]
fn gradient_graph_at_the_edges() {
    for path in common::examples() {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let mut loss = Loss::from_file(&path, &losscc_loss::Overrides::new().set("tol", 1))
            .or_else(|_| Loss::from_file(&path, &losscc_loss::Overrides::new()))
            .unwrap();
        let classes = 4i64.max(loss.compiled().relaxed.min_classes as i64);
        let [n, h, w] = [2i64, 12, 14];
        let mut rng = common::Rng(7 + name.len() as u64);
        let uniform = |rng: &mut common::Rng, scale: f64| ((rng.next() * 2.0 - 1.0) * scale) as f32;
        let blocky = |i: i64, c: i64| ((i / w) % h / 3 + 2 * ((i % w) / 4) + i / (h * w)) % c;
        let shape = [n, classes, h, w];
        let count = n * classes * h * w;

        // Curve piece joints: every curve bent (slopes differ either side of its joints) with
        // its first joint at 1/C, and half the pixels tied (softmax exactly 1/C there).
        let curves: Vec<Curve> =
            loss.compiled().manifest().curves.iter().map(|spec| jointed(spec.pieces, 1.0 / classes as f64)).collect();
        loss.set_curves(curves).unwrap();
        let tied: Vec<f32> =
            (0..count).map(|i| if (i % (h * w)) % 2 == 0 { 0.0 } else { uniform(&mut rng, 3.0) }).collect();
        let labels =
            Tensor::from_slice(&(0..n * h * w).map(|i| blocky(i, classes)).collect::<Vec<_>>()).reshape([n, h, w]);
        let _ = gradient_graph_agrees(
            &format!("{name} at joints"),
            &mut loss,
            &Tensor::from_slice(&tied).reshape(shape),
            &labels,
        );

        // Ignored pixels: a third of them; their gradient is exactly zero unless the metric
        // erodes or dilates the predictions (then an ignored pixel's prediction moves its
        // neighbours' boundaries).
        let random: Vec<f32> = (0..count).map(|_| uniform(&mut rng, 3.0)).collect();
        let logits = Tensor::from_slice(&random).reshape(shape);
        let ignored: Vec<i64> =
            (0..n * h * w).map(|i| if rng.next() < 0.33 { 255 } else { blocky(i, classes) }).collect();
        let ignored = Tensor::from_slice(&ignored).reshape([n, h, w]);
        let grad = gradient_graph_agrees(&format!("{name} with ignored pixels"), &mut loss, &logits, &ignored);
        let on_ignored =
            grad.abs().sum_dim_intlist([1i64].as_slice(), false, Kind::Double).masked_select(&ignored.eq(255));
        if !morphology_on_predictions(&loss) {
            assert_eq!(on_ignored.abs().max().double_value(&[]), 0.0, "{name}: ignored pixels get a gradient");
        }

        // Classes absent from the labels (only 0 and 1 occur among C).
        let absent = Tensor::from_slice(&(0..n * h * w).map(|i| blocky(i, 2)).collect::<Vec<_>>()).reshape([n, h, w]);
        let _ = gradient_graph_agrees(&format!("{name} with absent classes"), &mut loss, &logits, &absent);

        // A saturated softmax on half the pixels (float32 probabilities exactly 0 and 1).
        let saturated: Vec<f32> = (0..count)
            .map(|i| {
                if (i % (h * w)) < h * w / 2 {
                    60.0 * uniform(&mut rng, 1.0).signum()
                } else {
                    uniform(&mut rng, 3.0)
                }
            })
            .collect();
        let _ = gradient_graph_agrees(
            &format!("{name} saturated"),
            &mut loss,
            &Tensor::from_slice(&saturated).reshape(shape),
            &labels,
        );

        // An undefined metric (every pixel ignored): the loss is tch's and the gradient zero.
        let all_ignored = Tensor::full([n, h, w], 255i64, (Kind::Int64, tch::Device::Cpu));
        let grad = gradient_graph_agrees(&format!("{name} all ignored"), &mut loss, &logits, &all_ignored);
        assert_eq!(grad.abs().max().double_value(&[]), 0.0, "{name}: an undefined metric gives a gradient");
    }
}

fn morphology_on_predictions(loss: &Loss) -> bool {
    let module = loss.compiled().relaxed.module();
    let on_predictions = compiler::analysis::prediction_dependent(module);
    module.handles().any(|h| {
        on_predictions[h.index()]
            && matches!(module.node(h), compiler::ir::Node::Erode { .. } | compiler::ir::Node::Dilate { .. })
    })
}

/// A monotone curve of `pieces` pieces whose joints sit at `first`, then evenly above it, with
/// the slope changing at every joint.
fn jointed(pieces: usize, first: f64) -> Curve {
    let joints: Vec<f64> =
        (1..pieces).map(|j| first + (1.0 - first) * (j - 1) as f64 / (pieces - 1).max(1) as f64 * 0.8).collect();
    let mut xs = vec![0.0];
    xs.extend(&joints);
    xs.push(1.0);
    let mut points = Vec::new();
    for (piece, pair) in xs.windows(2).enumerate() {
        // The middle point low in even pieces and high in odd ones bends each piece.
        let (a, b) = (pair[0], pair[1]);
        let (ya, yb) = (curve_height(a), curve_height(b));
        let middle = if piece % 2 == 0 { ya + 0.2 * (yb - ya) } else { ya + 0.8 * (yb - ya) };
        points.push([(a + b) / 2.0, middle]);
        if b < 1.0 {
            points.push([b, yb]);
        }
    }
    Curve::from_points(points).unwrap()
}

fn curve_height(x: f64) -> f64 {
    x * x * (3.0 - 2.0 * x)
}

/// Volumes `[N, C, D, H, W]` through the ONNX graphs compiled with `volumes`: for the example
/// metrics that use windows and borders (cubic in 3-D) and one that does not, the loss graph
/// gives tch's float64 loss to 1e-5, the gradient graph its gradient to 1e-5 of the largest
/// entry (or 4x float32 tch's own error), and the exact-count graph the evaluator's counts.
#[test]
fn volumes_agree_across_back_ends() {
    let cases: [(&str, &[(&str, &str)]); 5] = [
        ("dice", &[]),
        ("miou", &[]),
        ("biou", &[("tol", "1")]),
        ("bf1", &[("tol", "1")]),
        ("boundary_iou", &[("d", "1")]),
    ];
    for (index, (name, sets)) in cases.iter().enumerate() {
        let overrides = sets.iter().fold(losscc_loss::Overrides::new(), |o, (k, v)| o.text(k, v));
        let mut loss = Loss::from_file(&common::root().join(format!("examples/{name}.metric")), &overrides).unwrap();
        let pieces: Vec<usize> = loss.compiled().manifest().curves.iter().map(|c| c.pieces).collect();
        let case = &cases_by_name(name);
        loss.set_curves(case.curves(&pieces)).unwrap();
        let [n, c, d, h, w] = [2i64, 4, 5, 7, 6];
        let mut rng = common::Rng(90 + index as u64);
        let logits: Vec<f32> = (0..n * c * d * h * w).map(|_| ((rng.next() * 2.0 - 1.0) * 3.0) as f32).collect();
        let labels = common::volume_labels(&mut rng, [n, c, d, h, w], [2, 3, 3]);
        let logits = Tensor::from_slice(&logits).reshape([n, c, d, h, w]);

        let (truth, truth_grad) = forward_backward(&mut loss, false, &logits.to_kind(Kind::Double), &labels).unwrap();
        let (_, single_grad) = forward_backward(&mut loss, false, &logits, &labels).unwrap();
        let (fast, _) = forward_backward(&mut loss, true, &logits, &labels).unwrap();
        assert!((fast - truth).abs() <= 1e-5 * truth.abs().max(1.0), "{name}: default path {fast} vs {truth}");
        let scale = truth_grad.abs().max().double_value(&[]).max(1e-9);
        let float32_gap = (&single_grad - &truth_grad).abs().max().double_value(&[]) / scale;

        let options = EmitOptions { volumes: true, ..EmitOptions::default() };
        let model = onnx::emit_loss(loss.compiled(), &loss.params().curves, &options).unwrap();
        let value = run_onnx(&mut OnnxModel::from_bytes(&onnx::to_bytes(&model)).unwrap(), &logits, &labels)[0].1[0];
        assert!((value as f64 - truth).abs() <= 1e-5 * truth.abs().max(1.0), "{name}: ONNX {value} vs tch {truth}");

        let gradient_model = onnx::emit_gradient(loss.compiled(), &loss.params().curves, &options).unwrap();
        let outputs = run_onnx(&mut OnnxModel::from_bytes(&onnx::to_bytes(&gradient_model)).unwrap(), &logits, &labels);
        let grad = Tensor::from_slice(&outputs[1].1).reshape(logits.size()).to_kind(Kind::Double);
        let gap = (&grad - &truth_grad).abs().max().double_value(&[]) / scale;
        assert!(
            gap <= 1e-5_f64.max(4.0 * float32_gap),
            "{name}: gradient graph off by {gap:e} (float32 tch {float32_gap:e})"
        );

        let mut evaluator = loss.evaluator();
        evaluator.add_batch(&logits, &labels).unwrap();
        let exact_model = onnx::emit_exact(loss.compiled(), &options).unwrap();
        let exact_outputs =
            run_onnx(&mut OnnxModel::from_bytes(&onnx::to_bytes(&exact_model)).unwrap(), &logits, &labels);
        let exact = &loss.compiled().exact;
        let mut from_onnx = Accumulator::default();
        for (node, (_, values)) in exact.accumulators().iter().zip(&exact_outputs) {
            from_onnx.add(*node, &values.iter().map(|&v| v as f64).collect::<Vec<_>>()).unwrap();
        }
        from_onnx.batches = 1;
        let counts = evaluator.counts();
        assert_eq!(&from_onnx.to_flat()[..counts.len() - 1], &counts[..counts.len() - 1], "{name}: exact counts");
        let (ours, theirs) = (evaluator.finish().unwrap().value, accumulate::finish(exact, &from_onnx).unwrap().value);
        assert!(ours.is_finite() && (ours - theirs).abs() <= 1e-6, "{name}: exact metric {ours} vs {theirs}");
    }
}

fn cases_by_name(name: &str) -> Case {
    cases().into_iter().find(|c| c.name == name).expect("a corpus case")
}
