//! The fused CPU kernel equals the op-by-op reference path: values and gradients to 1e-5
//! for every example metric it covers (all but those with pooling on predictions), on
//! random inputs with random curves and ignored pixels.

mod common;

use common::examples;

use compiler::curve::Curve;
use compiler::params::Params;
use runtime::Loss;
use tch::{Kind, Tensor};

/// The loss value and the logits' gradient, on the fast path or the reference path.
fn forward_backward(loss: &mut Loss, fast: bool, logits: &Tensor, labels: &Tensor) -> (f64, Tensor) {
    loss.set_fast_path(fast);
    let x = logits.copy().set_requires_grad(true);
    let value = loss.forward(&x, labels).unwrap();
    value.backward();
    (value.double_value(&[]), x.grad())
}

#[test]
fn fused_kernel_equals_reference_path() {
    // A value read but not written by the current call shows up as NaN.
    runtime::fused::set_scratch_poisoning(true);
    tch::manual_seed(11);
    let mut fused_count = 0;
    for path in examples() {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let mut loss = Loss::from_file(&path, &[]).unwrap();
        let manifest = loss.compiled().manifest.clone();
        let curves: Vec<Curve> = manifest
            .curves
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let u: Vec<f64> = (0..Curve::search_len(spec.pieces))
                    .map(|j| 0.1 + 0.8 * (((i * 7 + j * 3) % 10) as f64 / 10.0))
                    .collect();
                Curve::from_search(&u, spec.pieces).unwrap()
            })
            .collect();
        loss.set_params(Params { fixed: vec![false; curves.len()], curves });
        let logits = Tensor::randn([2, 5, 19, 23], (Kind::Float, tch::Device::Cpu)) * 3.0;
        let labels = Tensor::randint(5, [2, 19, 23], (Kind::Int64, tch::Device::Cpu));
        let ignore = Tensor::rand([2, 19, 23], (Kind::Float, tch::Device::Cpu)).lt(0.1);
        let labels = labels.where_self(&ignore.logical_not(), &labels.full_like(255));

        let uses_fast = {
            loss.set_fast_path(true);
            loss.uses_fused_kernel(&logits)
        };
        // BF1 pools predictions: the fused kernel runs it in three stages with poolings
        // between them. A loss without curves (plain cross-entropy) runs on libtorch's own
        // kernels.
        assert_eq!(uses_fast, name != "ce", "{name}: which path applies");
        if uses_fast {
            fused_count += 1;
        }
        let (fast_value, fast_grad) = forward_backward(&mut loss, true, &logits, &labels);
        let (reference_value, reference_grad) = forward_backward(&mut loss, false, &logits, &labels);
        // Without a gradient (no curve stores, no backward sweep) the value is the same.
        loss.set_fast_path(true);
        let no_grad_value = loss.forward(&logits, &labels).unwrap().double_value(&[]);
        // Losses are `1 − metric` (or sums of such terms and cross-entropy): float32 resolves
        // them to about 6e-8 near 1, so the tolerance is 1e-5 of the larger of the value and 1.
        assert!((no_grad_value - fast_value).abs() <= 1e-6 * fast_value.abs().max(1.0), "{name}: without a gradient");
        assert!(
            (fast_value - reference_value).abs() <= 1e-5 * reference_value.abs().max(1.0),
            "{name}: fast {fast_value} vs reference {reference_value}"
        );
        let scale = reference_grad.abs().max().double_value(&[]).max(1e-9);
        let difference = (&fast_grad - &reference_grad).abs().max().double_value(&[]);
        assert!(difference <= 1e-5 * scale, "{name}: gradients differ by {difference:e} (scale {scale:e})");
    }
    assert_eq!(fused_count, examples().len() - 1);
}

/// A metric whose label-only part nests `^` deeply enough that the interval analysis cannot
/// prove it fits bytes: the byte evaluator must decline, and the fast path still equal the
/// reference through libtorch's float planes.
const DEEP_XOR: &str = "metric deep {
    let a = (L ^ dilate(L, 1)) ^ (erode(L, 1) ^ dilate(L, 2));
    let b = a ^ dilate(a, 2);
    mean(count(P & b & V) / count((P | b) & V))
}";

/// The label-only pixel nodes of every example (and of `DEEP_XOR`), evaluated on bytes, equal
/// libtorch's float values exactly; where the byte evaluator declines, it says so.
#[test]
fn label_planes_on_bytes_equal_libtorch() {
    use runtime::label_planes::{self, Dims};
    let mut modules: Vec<(String, Loss)> = examples()
        .iter()
        .map(|p| (p.display().to_string(), Loss::from_file(p, &[]).unwrap()))
        .collect();
    modules.push(("deep".into(), Loss::from_source("deep.metric", DEEP_XOR, &[]).unwrap()));
    let (images, classes, height, width) = (2usize, 5usize, 19usize, 23usize);
    let labels = Tensor::randint(classes as i64, [2, 19, 23], (Kind::Int64, tch::Device::Cpu));
    let ignore = Tensor::rand([2, 19, 23], (Kind::Float, tch::Device::Cpu)).lt(0.1);
    let labels = labels.where_self(&ignore.logical_not(), &labels.full_like(255));
    let logits = Tensor::randn([2, 5, 19, 23], (Kind::Float, tch::Device::Cpu));
    let flat = Vec::<i64>::try_from(labels.reshape([-1])).unwrap();
    let dims = Dims { images, classes, height, width };
    let mut compared = 0;
    for (name, loss) in &modules {
        let module = &loss.compiled().relaxed;
        let on_pred = label_planes::prediction_dependent(module);
        let wanted: Vec<_> = module.handles().filter(|&h| label_planes::pixel_label_node(module, h, &on_pred)).collect();
        let Some(values) = label_planes::evaluate(module, &flat, dims, &wanted) else {
            assert_eq!(name, "deep", "{name}: the byte evaluator declined");
            continue;
        };
        assert_ne!(name, "deep", "nested xors exceed the i8 interval and must be declined");
        let provided = (0..module.len()).map(|_| None).collect();
        let reference = runtime::tch_backend::run_nodes(module, &loss.params().curves, &logits, &labels, provided, &wanted);
        for handle in &wanted {
            let ours = values[handle.index()].as_ref().unwrap().to_tensor(images, height, width);
            let theirs = reference.values[handle.index()].as_ref().unwrap();
            let difference = (&ours - theirs).abs().max().double_value(&[]);
            assert_eq!(difference, 0.0, "{name}: node %{} differs", handle.index());
            compared += 1;
        }
    }
    assert!(compared >= 10, "label-only nodes compared: {compared}");
    // Declined modules still take the fast path, with float planes, and equal the reference.
    let mut deep = Loss::from_source("deep.metric", DEEP_XOR, &[]).unwrap();
    assert!(deep.uses_fused_kernel(&logits));
    let (fast_value, fast_grad) = forward_backward(&mut deep, true, &logits, &labels);
    let (reference_value, reference_grad) = forward_backward(&mut deep, false, &logits, &labels);
    assert!((fast_value - reference_value).abs() <= 1e-5, "deep: {fast_value} vs {reference_value}");
    let difference = (&fast_grad - &reference_grad).abs().max().double_value(&[]);
    assert!(difference <= 1e-5 * reference_grad.abs().max().double_value(&[]).max(1e-9));
}
