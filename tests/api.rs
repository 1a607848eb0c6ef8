//! The Rust API as a user's own tch training loop uses it: typed overrides, label and logit
//! kinds, the ignore label, curves that do not fit, and an evaluator that resets, merges and
//! hands its counts to an all-reduce.

mod common;

use common::{root, Rng};
use losscc_loss::{Curve, InputError, Loss, LossError, Overrides};
use tch::{Device, Kind, Tensor};

fn batch(seed: u64, n: i64, c: i64, h: i64, w: i64) -> (Tensor, Tensor) {
    let mut rng = Rng(seed);
    let logits: Vec<f32> = (0..n * c * h * w).map(|_| (rng.next() as f32 - 0.5) * 6.0).collect();
    let labels: Vec<i64> =
        (0..n * h * w).map(|i| if rng.next() < 0.1 { 255 } else { ((i / w) / 3 + (i % w) / 4) % c }).collect();
    (Tensor::from_slice(&logits).view([n, c, h, w]), Tensor::from_slice(&labels).view([n, h, w]))
}

fn biou(tol: i64) -> Loss {
    Loss::from_file(&root().join("examples/biou.metric"), &Overrides::new().set("tol", tol).set("drop_bg", false))
        .unwrap()
}

#[test]
fn typed_overrides_equal_text_overrides_and_bad_types_are_one_sentence() {
    let path = root().join("examples/tversky.metric");
    let typed = Loss::from_file(&path, &Overrides::new().set("alpha", 0.25).set("beta", 0.75)).unwrap();
    let text = Loss::from_file(&path, &Overrides::new().text("alpha", "0.25").text("beta", "0.75")).unwrap();
    assert_eq!(typed.compiled().params, text.compiled().params);
    let (logits, labels) = batch(1, 2, 3, 8, 8);
    let (a, b) = (typed.forward(&logits, &labels).unwrap(), text.forward(&logits, &labels).unwrap());
    assert_eq!(a.double_value(&[]), b.double_value(&[]));
    let error = Loss::from_file(&root().join("examples/biou.metric"), &Overrides::new().set("tol", true)).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("tol") && message.lines().count() == 1, "{message}");
}

#[test]
fn labels_may_be_uint8_and_logits_half_precision() {
    let loss = biou(1);
    let (logits, labels) = batch(2, 2, 4, 10, 9);
    let reference = loss.forward(&logits, &labels).unwrap().double_value(&[]);
    let bytes = labels.to_kind(Kind::Uint8);
    assert_eq!(loss.forward(&logits, &bytes).unwrap().double_value(&[]), reference);
    for kind in [Kind::Half, Kind::BFloat16] {
        let half = logits.to_kind(kind).set_requires_grad(true);
        let value = loss.forward(&half, &labels).unwrap();
        // Computed in float32 from the rounded logits: close to the float32 loss.
        assert!((value.double_value(&[]) - reference).abs() < 1e-2, "{kind:?}");
        value.backward();
        assert_eq!(half.grad().kind(), kind, "the gradient flows back to the {kind:?} logits");
        assert!(half.grad().to_kind(Kind::Float).abs().sum(Kind::Double).double_value(&[]) > 0.0);
    }
    let ints = logits.to_kind(Kind::Int64);
    assert!(matches!(loss.forward(&ints, &labels), Err(LossError::Input(InputError::LogitsKind(Kind::Int64)))));
    let float_labels = labels.to_kind(Kind::Float);
    assert!(matches!(
        loss.forward(&logits, &float_labels),
        Err(LossError::Input(InputError::LabelsKind { kind: Kind::Float, .. }))
    ));
}

#[test]
fn the_ignore_label_is_settable() {
    let mut loss = biou(1);
    let (logits, labels) = batch(3, 1, 4, 12, 12);
    let default = loss.forward(&logits, &labels).unwrap().double_value(&[]);
    // The same pixels marked 7 instead of 255, with 7 as the ignore label: the same loss.
    let relabelled = labels.where_scalarother(&labels.ne(255), 7);
    loss.set_ignore_label(Some(7));
    assert_eq!(loss.forward(&logits, &relabelled).unwrap().double_value(&[]), default);
    // 255 is now an ordinary (invalid) value, with one sentence.
    let error = loss.forward(&logits, &labels).unwrap_err().to_string();
    assert!(error.contains("label value 255") && error.contains("ignore label 7"), "{error}");
    // No ignore label at all: every label must be a class.
    loss.set_ignore_label(None);
    let error = loss.forward(&logits, &relabelled).unwrap_err().to_string();
    assert!(error.contains("label value 7") && error.contains("there is none"), "{error}");
    let valid = labels.where_scalarother(&labels.ne(255), 0);
    assert!(loss.forward(&logits, &valid).unwrap().double_value(&[]).is_finite());
}

#[test]
fn curves_that_do_not_fit_are_refused() {
    let mut loss = biou(1);
    let error = loss.set_curves(vec![Curve::identity(2)]).unwrap_err().to_string();
    assert!(error.contains("biou") && error.contains("2 curves"), "{error}");
    let error = loss.set_curves(vec![Curve::identity(2), Curve::identity(3)]).unwrap_err().to_string();
    assert!(error.contains("or_P") && error.contains("3"), "{error}");
    // The loss keeps working with its old curves.
    let (logits, labels) = batch(4, 1, 3, 6, 6);
    assert!(loss.forward(&logits, &labels).is_ok());
}

#[test]
fn evaluators_reset_merge_and_all_reduce() {
    let loss = biou(2);
    let (a_logits, a_labels) = batch(5, 2, 4, 16, 16);
    let (b_logits, b_labels) = batch(6, 3, 4, 16, 16);
    let mut both = loss.evaluator();
    both.add_batch(&a_logits, &a_labels).unwrap();
    both.add_batch(&b_logits, &b_labels).unwrap();
    let expected = both.finish().unwrap().value;
    // Two "processes", merged or all-reduced, give the metric of the whole dataset.
    let (mut first, mut second) = (loss.evaluator(), loss.evaluator());
    first.add_batch(&a_logits, &a_labels).unwrap();
    second.add_batch(&b_logits, &b_labels).unwrap();
    let mut merged = first.clone();
    merged.merge(&second).unwrap();
    assert_eq!(merged.finish().unwrap().value, expected);
    let summed: Vec<f64> = first.counts().iter().zip(second.counts()).map(|(x, y)| x + y).collect();
    first.set_counts(&summed).unwrap();
    assert_eq!(first.finish().unwrap().value, expected);
    assert_eq!(first.batches(), 2);
    // The evaluator outlives its loss and moves across threads.
    let evaluator = std::thread::spawn(move || {
        let mut evaluator = loss.evaluator();
        drop(loss);
        evaluator.add_batch(&a_logits, &a_labels).unwrap();
        evaluator
    })
    .join()
    .unwrap();
    assert_eq!(evaluator.batches(), 1);
    // A batch with another class count is refused in one sentence; reset starts over.
    let mut evaluator = evaluator;
    let (other_logits, other_labels) = batch(7, 1, 5, 16, 16);
    let error = evaluator.add_batch(&other_logits, &other_labels).unwrap_err().to_string();
    assert!(error.contains("5 classes") && error.contains("4"), "{error}");
    assert_eq!(evaluator.batches(), 1, "a refused batch changes nothing");
    evaluator.reset();
    evaluator.add_batch(&other_logits, &other_labels).unwrap();
    assert!(evaluator.finish().unwrap().value.is_finite());
    assert!(matches!(loss_without_batches().finish(), Err(LossError::NoBatch)));
}

fn loss_without_batches() -> losscc_loss::Evaluator {
    Loss::from_file(&root().join("examples/miou.metric"), &Overrides::new()).unwrap().evaluator()
}

#[test]
fn forward_returns_exactly_the_fused_value() {
    // The autograd node returns the kernel's value as it is.
    let loss = biou(1);
    let (logits, labels) = batch(8, 2, 4, 12, 12);
    let with_grad = loss.forward(&logits.copy().set_requires_grad(true), &labels).unwrap();
    let without = loss.forward(&logits, &labels).unwrap();
    assert!(loss.uses_fused_kernel(&logits));
    assert_eq!(with_grad.double_value(&[]), without.double_value(&[]));
    assert_eq!(with_grad.kind(), Kind::Float);
    assert_eq!(with_grad.device(), Device::Cpu);
}

/// Non-finite logits are one error with their count on every path: the fused kernel's
/// softmax sweep checks them (the input checks leave it there), the reference path before it
/// runs, for one-stage and pooling modules, per-image ones, with or without a gradient.
#[test]
fn non_finite_logits_are_counted_on_every_path() {
    let examples = ["miou", "bf1", "miou_per_image"];
    for (name, fast) in examples.iter().flat_map(|name| [(name, true), (name, false)]) {
        let mut loss = Loss::from_file(&root().join(format!("examples/{name}.metric")), &Overrides::new()).unwrap();
        loss.set_fast_path(fast);
        let (logits, labels) = batch(5, 2, 4, 9, 70);
        assert_eq!(loss.uses_fused_kernel(&logits), fast, "{name}");
        let flat = logits.copy().reshape([-1]);
        let _ = flat.get(3).fill_(f64::NAN);
        let _ = flat.get(700).fill_(f64::INFINITY);
        let _ = flat.get(4000).fill_(f64::NEG_INFINITY);
        let bad = flat.view([2, 4, 9, 70]);
        for leaf in [bad.copy(), bad.copy().set_requires_grad(true)] {
            match loss.forward(&leaf, &labels) {
                Err(LossError::Input(InputError::NonFinite(count))) => assert_eq!(count, 3, "{name} fast={fast}"),
                other => panic!("{name} fast={fast}: expected the non-finite error, got {:?}", other.map(|t| t.size())),
            }
        }
        // Finite logits still pass, with the same value on both paths.
        assert!(loss.forward(&logits, &labels).unwrap().double_value(&[]).is_finite(), "{name}");
    }
}

/// The fused loss's autograd function (a C++ node that hands the kernel's gradient to
/// libtorch): the gradient a plain `backward` leaves on the leaf is the reference path's; an
/// upstream gradient scales it; a graph kept with `retain_graph` gives the same gradient
/// again and the first one is not changed by the second pass; the loss composes with other
/// autograd terms; a second backward through a freed graph is libtorch's error, not a crash.
#[test]
fn the_fused_gradient_behaves_as_an_autograd_node() {
    let loss = biou(1);
    let mut reference = biou(1);
    reference.set_fast_path(false);
    let (logits, labels) = batch(9, 2, 4, 12, 12);
    assert!(loss.uses_fused_kernel(&logits));
    let leaf = logits.copy().set_requires_grad(true);
    reference.forward(&leaf, &labels).unwrap().backward();
    let expected = leaf.grad().copy();
    let scale = expected.abs().max().double_value(&[]);
    assert!(scale > 0.0, "the gradient is not zero");
    let close = |a: &Tensor, b: &Tensor, factor: f64| {
        let error = (a - b * factor).abs().max().double_value(&[]);
        assert!(error <= 1e-5 * scale * factor.abs().max(1.0), "gradient differs by {error} (scale {scale})");
    };
    // A plain backward.
    let leaf = logits.copy().set_requires_grad(true);
    loss.forward(&leaf, &labels).unwrap().backward();
    close(&leaf.grad(), &expected, 1.0);
    // Scaled, and combined with another term of the same logits.
    let leaf = logits.copy().set_requires_grad(true);
    let combined = loss.forward(&leaf, &labels).unwrap() * 2.5 + leaf.sum(Kind::Float) * 0.0;
    combined.backward();
    close(&leaf.grad(), &expected, 2.5);
    // A kept graph: two backward passes accumulate twice the gradient, and the gradient
    // taken after the first pass is not changed by the second.
    let leaf = logits.copy().set_requires_grad(true);
    let value = loss.forward(&leaf, &labels).unwrap();
    let first = Tensor::run_backward(&[&value], &[&leaf], true, false).pop().unwrap();
    let second = Tensor::run_backward(&[&value], &[&leaf], true, false).pop().unwrap();
    close(&first, &expected, 1.0);
    close(&second, &expected, 1.0);
    // The graph freed by a first backward: the second is refused with libtorch's error.
    let leaf = logits.copy().set_requires_grad(true);
    let value = loss.forward(&leaf, &labels).unwrap();
    value.backward();
    let again = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Tensor::f_run_backward(&[&value], &[&leaf], false, false)
    }));
    match again {
        Ok(result) => assert!(result.is_err(), "a second backward through a freed graph is refused"),
        Err(_) => panic!("a second backward must be an error, not a panic"),
    }
}

/// Boundary IoU as Cheng et al. define it, in plain float64 loops: per class, a mask's inner
/// band is the mask minus its erosion by a (2d+1)-square with zero padding (pixels near the
/// image border are band); intersection and union of the prediction's and the label's bands
/// over valid pixels, summed over every batch, then averaged over classes with a non-empty
/// union.
fn boundary_iou_by_definition(batches: &[(Tensor, Tensor)], classes: usize, d: usize) -> f64 {
    let (mut inter, mut union) = (vec![0.0f64; classes], vec![0.0f64; classes]);
    for (logits, labels) in batches {
        let size = logits.size();
        let (n, h, w) = (size[0] as usize, size[2] as usize, size[3] as usize);
        let pred: Vec<i64> = Vec::try_from(logits.argmax(1, false).reshape([-1])).unwrap();
        let label: Vec<i64> = Vec::try_from(labels.reshape([-1])).unwrap();
        for image in 0..n {
            let at = |y: usize, x: usize| image * h * w + y * w + x;
            for class in 0..classes {
                let band = |mask: &dyn Fn(usize, usize) -> bool, y: usize, x: usize| {
                    if !mask(y, x) {
                        return false;
                    }
                    // Eroded (zero padding): every pixel of the window inside the image and in the mask.
                    let eroded = (y as i64 - d as i64..=y as i64 + d as i64).all(|yy| {
                        (x as i64 - d as i64..=x as i64 + d as i64).all(|xx| {
                            yy >= 0
                                && xx >= 0
                                && (yy as usize) < h
                                && (xx as usize) < w
                                && mask(yy as usize, xx as usize)
                        })
                    });
                    !eroded
                };
                let in_pred = |y: usize, x: usize| pred[at(y, x)] == class as i64;
                let in_label = |y: usize, x: usize| label[at(y, x)] == class as i64;
                for y in 0..h {
                    for x in 0..w {
                        if label[at(y, x)] == 255 {
                            continue;
                        }
                        let (bp, bl) = (band(&in_pred, y, x), band(&in_label, y, x));
                        inter[class] += f64::from(u8::from(bp && bl));
                        union[class] += f64::from(u8::from(bp || bl));
                    }
                }
            }
        }
    }
    let defined: Vec<f64> = inter.iter().zip(&union).filter(|(_, &u)| u > 0.0).map(|(i, u)| i / u).collect();
    defined.iter().sum::<f64>() / defined.len() as f64
}

#[test]
fn boundary_iou_equals_its_published_definition() {
    let path = root().join("examples/boundary_iou.metric");
    for d in [1i64, 2, 3] {
        let loss = Loss::from_file(&path, &Overrides::new().set("d", d)).unwrap();
        // Two batches of different image sizes, accumulated; logits made blocky so that
        // predicted masks have real interiors.
        let batches: Vec<(Tensor, Tensor)> = [(21u64, 2i64, 4i64, 17i64, 23i64), (22, 3, 4, 12, 9)]
            .iter()
            .map(|&(seed, n, c, h, w)| {
                let (logits, labels) = batch(seed, n, c, h, w);
                let smooth = logits.avg_pool2d([5, 5], [1, 1], [2, 2], false, true, None::<i64>) * 4.0;
                (smooth, labels)
            })
            .collect();
        let mut evaluator = loss.evaluator();
        for (logits, labels) in &batches {
            evaluator.add_batch(logits, labels).unwrap();
        }
        let ours = evaluator.finish().unwrap().value;
        let expected = boundary_iou_by_definition(&batches, 4, d as usize);
        assert!(expected > 0.05 && expected < 0.95, "d={d}: a test that can tell ({expected})");
        assert!((ours - expected).abs() < 1e-12, "d={d}: evaluator {ours} vs definition {expected}");
    }
}

/// `Σ w·v / Σ w` over the entries where `v` is defined (not NaN): a weighted nanmean.
fn weighted_mean(values: &[f64], weights: &[f64]) -> f64 {
    let pairs = values.iter().zip(weights).filter(|(v, _)| !v.is_nan());
    let (num, den) = pairs.fold((0.0, 0.0), |(n, d), (v, w)| (n + v * w, d + w));
    num / den
}

#[test]
fn class_weights_weight_each_class_skip_undefined_ones_and_wrong_lengths_are_one_sentence() {
    let dice = Loss::from_file(&root().join("examples/dice.metric"), &Overrides::new()).unwrap();
    let path = root().join("examples/weighted_dice.metric");
    // Class 3 is in neither labels nor predictions: its exact Dice is undefined (skipped,
    // with its weight), while the surrogate's is defined (softmax is never exactly 0).
    let (logits, labels) = batch(31, 2, 4, 12, 13);
    let labels = labels.where_self(&labels.ne(3), &Tensor::from(2i64));
    let _ = logits.narrow(1, 3, 1).fill_(-20.0);
    let mut evaluator = dice.evaluator();
    evaluator.add_batch(&logits, &labels).unwrap();
    let exact_per_class = match &evaluator.finish().unwrap().reports[0] {
        (name, compiler::accumulate::Value::Classes(values)) if name == "per_class" => values.clone(),
        other => panic!("dice reports {other:?}"),
    };
    assert!(exact_per_class[3].is_nan() && exact_per_class[..3].iter().all(|v| v.is_finite()), "{exact_per_class:?}");
    let surrogate = dice.forward_detailed(&logits, &labels).unwrap();
    let surrogate_per_class: Vec<f64> = Vec::try_from(surrogate.reports[0].1.to_kind(Kind::Double)).unwrap();

    for (background, weights) in [(true, vec![0.5, 2.0, 1.0, 3.0]), (false, vec![2.0, 0.0, 3.0])] {
        let skip = usize::from(!background);
        let loss =
            Loss::from_file(&path, &Overrides::new().set("weights", weights.clone()).set("background", background))
                .unwrap();
        let mut evaluator = loss.evaluator();
        evaluator.add_batch(&logits, &labels).unwrap();
        let exact = evaluator.finish().unwrap().value;
        let expected = weighted_mean(&exact_per_class[skip..], &weights);
        assert!((exact - expected).abs() < 1e-12, "background={background}: exact {exact} vs {expected}");
        let x = logits.copy().set_requires_grad(true);
        let value = loss.forward(&x, &labels).unwrap();
        let expected = 1.0 - weighted_mean(&surrogate_per_class[skip..], &weights);
        assert!(
            (value.double_value(&[]) - expected).abs() < 1e-6,
            "background={background}: surrogate {value} vs {expected}"
        );
        value.backward();
        assert!(bool::try_from(x.grad().isfinite().all()).unwrap());
        // Weighted differently from the plain mean, so the test can tell.
        let plain = 1.0 - surrogate_per_class[skip..].iter().sum::<f64>() / (4 - skip) as f64;
        assert!((value.double_value(&[]) - plain).abs() > 1e-3, "background={background}: weights made no difference");
    }

    // One weight per class reduced, or one sentence saying how many.
    let two = Loss::from_file(&path, &Overrides::new().set("weights", vec![1.0, 2.0])).unwrap();
    let message = two.forward(&logits, &labels).unwrap_err().to_string();
    assert!(message.contains("`weights` gives 2 weights") && message.contains("--set weights=1,1,1,1"), "{message}");
    assert_eq!(message.lines().count(), 1, "{message}");
    let message = two.evaluator().add_batch(&logits, &labels).unwrap_err().to_string();
    assert!(message.contains("`weights` gives 2 weights"), "{message}");
    // A reduction over a bounded slice knows its class count when compiled.
    let bounded = "metric m(w: floats = 1) {\n    mean((count(P & L) / count(L))[1:3], weights: w)\n}\n";
    let message = Loss::from_source("m", bounded, &Overrides::new().text("w", "1,2,3")).unwrap_err().to_string();
    assert!(message.contains("`w` gives 3 weights, but `mean` here reduces over 2 classes (1:3)"), "{message}");
    assert!(message.contains(":2:51"), "points at the weights in the source: {message}");
    for bad in ["1,x,2", "1,-2,1,1", "0,0,0,0", ""] {
        let message = Loss::from_file(&path, &Overrides::new().text("weights", bad)).unwrap_err().to_string();
        assert!(message.contains("non-negative numbers separated by commas"), "{bad}: {message}");
        assert_eq!(message.lines().count(), 1, "{message}");
    }
}

/// A volume batch `[N, C, D, H, W]` with blocky labels (10% ignored) and logits that lean to
/// the label with noise, so predictions have interiors and boundaries.
fn volume(seed: u64, [n, c, d, h, w]: [i64; 5]) -> (Tensor, Tensor) {
    let mut rng = Rng(seed);
    let labels = common::volume_labels(&mut rng, [n, c, d, h, w], [3, 4, 5]);
    let noise: Vec<f32> = (0..n * c * d * h * w).map(|_| (rng.next() as f32 - 0.5) * 6.0).collect();
    let hot = labels.clamp(0, c - 1).one_hot(c).permute([0, 4, 1, 2, 3]).to_kind(Kind::Float);
    (Tensor::from_slice(&noise).view([n, c, d, h, w]) + hot * 2.5, labels)
}

/// Index of voxel (z, y, x) of image `i` in a flat `[N, D, H, W]` map.
fn at(dims: [usize; 4], i: usize, z: usize, y: usize, x: usize) -> usize {
    ((i * dims[1] + z) * dims[2] + y) * dims[3] + x
}

/// Minimum (erode) or maximum over the cube of radius `r` around every voxel, the border
/// counting as inside for erosion and outside for dilation, in plain loops.
fn cube_pool(mask: &[bool], dims: [usize; 4], r: usize, erode: bool) -> Vec<bool> {
    let [n, d, h, w] = dims;
    let mut out = vec![false; mask.len()];
    for i in 0..n {
        for z in 0..d {
            for y in 0..h {
                for x in 0..w {
                    let mut result = erode;
                    for zz in z.saturating_sub(r)..(z + r + 1).min(d) {
                        for yy in y.saturating_sub(r)..(y + r + 1).min(h) {
                            for xx in x.saturating_sub(r)..(x + r + 1).min(w) {
                                let m = mask[at(dims, i, zz, yy, xx)];
                                result = if erode { result && m } else { result || m };
                            }
                        }
                    }
                    out[at(dims, i, z, y, x)] = result;
                }
            }
        }
    }
    out
}

/// Dice and BIoU (the example files' definitions) of a volume batch in float64, from the
/// argmax and the labels with loops: `(dice, biou)`.
fn volume_metrics_by_definition(logits: &Tensor, labels: &Tensor, tol: usize) -> (f64, f64) {
    let size = logits.size();
    let (c, dims) = (size[1] as usize, [size[0] as usize, size[2] as usize, size[3] as usize, size[4] as usize]);
    let pred: Vec<i64> = Vec::try_from(logits.argmax(1, false).reshape([-1])).unwrap();
    let label: Vec<i64> = Vec::try_from(labels.reshape([-1])).unwrap();
    let valid: Vec<bool> = label.iter().map(|&l| l != 255).collect();
    let nan_mean = |values: Vec<f64>| {
        let defined: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
        defined.iter().sum::<f64>() / defined.len() as f64
    };
    let count = |f: &dyn Fn(usize) -> bool| (0..label.len()).filter(|&i| f(i)).count() as f64;
    let dice = nan_mean(
        (0..c as i64)
            .map(|k| {
                let inter = count(&|i| pred[i] == k && label[i] == k && valid[i]);
                2.0 * inter / (count(&|i| pred[i] == k && valid[i]) + count(&|i| label[i] == k))
            })
            .collect(),
    );
    // Band: label boundaries of the foreground classes (drop_bg), dilated by `tol`.
    let mut band = vec![false; label.len()];
    for k in 1..c as i64 {
        let mask: Vec<bool> = label.iter().map(|&l| l == k).collect();
        let eroded = cube_pool(&mask, dims, 1, true);
        let boundary: Vec<bool> = mask.iter().zip(&eroded).map(|(m, e)| m != e).collect();
        for (b, e) in band.iter_mut().zip(cube_pool(&boundary, dims, tol, false)) {
            *b |= e;
        }
    }
    let biou = nan_mean(
        (0..c as i64)
            .map(|k| {
                let inter = count(&|i| pred[i] == k && label[i] == k && valid[i] && band[i]);
                let union = count(&|i| (pred[i] == k || label[i] == k) && valid[i] && band[i]);
                if union == 0.0 {
                    f64::NAN
                } else {
                    inter / union
                }
            })
            .collect(),
    );
    (dice, biou)
}

#[test]
fn dice_and_biou_work_unchanged_on_volumes() {
    let dice = Loss::from_file(&root().join("examples/dice.metric"), &Overrides::new()).unwrap();
    let biou = Loss::from_file(&root().join("examples/biou.metric"), &Overrides::new().set("tol", 2)).unwrap();
    // Two batches of different volume sizes, accumulated.
    let batches = [volume(41, [2, 4, 7, 9, 11]), volume(42, [1, 4, 5, 12, 6])];
    let (mut dice_eval, mut biou_eval) = (dice.evaluator(), biou.evaluator());
    let (mut all_logits, mut all_labels) = (Vec::new(), Vec::new());
    for (logits, labels) in &batches {
        dice_eval.add_batch(logits, labels).unwrap();
        biou_eval.add_batch(logits, labels).unwrap();
        // Each batch alone, against the definition.
        let (expected_dice, expected_biou) = volume_metrics_by_definition(logits, labels, 2);
        let (mut one_dice, mut one_biou) = (dice.evaluator(), biou.evaluator());
        one_dice.add_batch(logits, labels).unwrap();
        one_biou.add_batch(logits, labels).unwrap();
        let (got_dice, got_biou) = (one_dice.finish().unwrap().value, one_biou.finish().unwrap().value);
        assert!((got_dice - expected_dice).abs() < 1e-12, "dice {got_dice} vs {expected_dice}");
        assert!((got_biou - expected_biou).abs() < 1e-12, "biou {got_biou} vs {expected_biou}");
        assert!(expected_biou > 0.05 && expected_biou < 0.95, "a test that can tell ({expected_biou})");
        all_logits.push(logits.shallow_clone());
        all_labels.push(labels.shallow_clone());
    }
    // Accumulated over both batches (of different sizes): the same as two evaluators merged.
    let mut merged = dice.evaluator();
    merged.add_batch(&all_logits[0], &all_labels[0]).unwrap();
    let mut second = dice.evaluator();
    second.add_batch(&all_logits[1], &all_labels[1]).unwrap();
    merged.merge(&second).unwrap();
    assert_eq!(merged.finish().unwrap().value, dice_eval.finish().unwrap().value);
    assert!(biou_eval.finish().unwrap().value.is_finite());

    // The surrogate on volumes: with peaked logits and identity curves it approaches the
    // exact metric; Dice (no windows) takes the fused kernel, BIoU the reference path, and
    // both give a finite gradient of the volume's shape.
    let (logits, labels) = &batches[0];
    let peaked = logits * 60.0;
    for (loss, name) in [(&dice, "dice"), (&biou, "biou")] {
        let mut evaluator = loss.evaluator();
        evaluator.add_batch(&peaked, labels).unwrap();
        let exact = evaluator.finish().unwrap().value;
        let x = peaked.copy().set_requires_grad(true);
        let value = loss.forward(&x, labels).unwrap();
        assert!((1.0 - value.double_value(&[]) - exact).abs() < 1e-3, "{name}: surrogate {value} vs exact {exact}");
        value.backward();
        assert_eq!(x.grad().size(), peaked.size());
        assert!(bool::try_from(x.grad().isfinite().all()).unwrap(), "{name}");
        assert_eq!(loss.uses_fused_kernel(&x), name == "dice", "{name}: which path");
        // The fused kernel on a volume equals the reference path.
        let mut reference =
            Loss::from_file(&root().join(format!("examples/{name}.metric")), &Overrides::new().set("tol", 2))
                .or_else(|_| Loss::from_file(&root().join(format!("examples/{name}.metric")), &Overrides::new()))
                .unwrap();
        reference.set_fast_path(false);
        let (a, b) = (loss.forward(logits, labels).unwrap(), reference.forward(logits, labels).unwrap());
        assert!((a.double_value(&[]) - b.double_value(&[])).abs() < 1e-6, "{name}: fast {a} vs reference {b}");
    }

    // Shapes that do not fit: one sentence each.
    let message = dice.forward(&batches[0].0, &batches[0].1.reshape([2, 7, 99])).unwrap_err().to_string();
    assert!(message.contains("one dimension less than the logits"), "{message}");
    let message = dice.forward(&batches[0].0.unsqueeze(0), &batches[0].1.unsqueeze(0)).unwrap_err().to_string();
    assert!(message.contains("images [N, C, H, W] or volumes [N, C, D, H, W]"), "{message}");
}

#[test]
fn soft_labels_are_used_as_given_and_one_hot_ones_equal_class_indices() {
    let (logits, labels) = batch(51, 2, 4, 10, 11);
    let valid = labels.ne(255);
    let classes = labels.where_self(&valid, &Tensor::from(0i64));
    let hot = classes.one_hot(4).permute([0, 3, 1, 2]).to_kind(Kind::Float) * valid.unsqueeze(1).to_kind(Kind::Float);
    // One-hot soft labels (ignored pixels all 0) give what class indices give: surrogate,
    // gradient and exact metric, for a region metric, a boundary metric and a loss with `ce`.
    for name in ["miou", "biou", "dice", "miou_ce"] {
        let mut loss = Loss::from_file(&root().join(format!("examples/{name}.metric")), &Overrides::new()).unwrap();
        for fast in [false, true] {
            loss.set_fast_path(fast);
            let run = |target: &Tensor| {
                let x = logits.copy().set_requires_grad(true);
                let value = loss.forward(&x, target).unwrap();
                value.backward();
                (value.double_value(&[]), x.grad())
            };
            let ((a, grad_a), (b, grad_b)) = (run(&labels), run(&hot));
            assert!((a - b).abs() < 1e-5, "{name} fast={fast}: indices {a} vs one-hot soft labels {b}");
            let gap = (&grad_a - &grad_b).abs().max().double_value(&[]) / grad_a.abs().max().double_value(&[]);
            assert!(gap < 1e-5, "{name} fast={fast}: gradients differ by {gap:e}");
        }
        let (mut by_index, mut by_soft) = (loss.evaluator(), loss.evaluator());
        by_index.add_batch(&logits, &labels).unwrap();
        by_soft.add_batch(&logits, &hot).unwrap();
        assert_eq!(by_index.finish().unwrap().value, by_soft.finish().unwrap().value, "{name}: exact");
    }

    // Smoothed labels: the surrogate takes the probabilities as they are. Dice with identity
    // curves is 1 − mean over classes of 2·Σ p·q / (Σ p + Σ q) over valid pixels (p the
    // softmax, q the soft labels); the exact metric uses their argmax (unchanged here).
    let smooth = (&hot * 0.9 + 0.025) * valid.unsqueeze(1).to_kind(Kind::Float);
    let dice = Loss::from_file(&root().join("examples/dice.metric"), &Overrides::new()).unwrap();
    let p = logits.softmax(1, Kind::Double) * valid.unsqueeze(1).to_kind(Kind::Double);
    let q = smooth.to_kind(Kind::Double);
    let per_class = (&p * &q).sum_dim_intlist([0i64, 2, 3].as_slice(), false, Kind::Double) * 2.0
        / (p.sum_dim_intlist([0i64, 2, 3].as_slice(), false, Kind::Double)
            + q.sum_dim_intlist([0i64, 2, 3].as_slice(), false, Kind::Double)
            + 1e-8);
    let expected = 1.0 - per_class.mean(Kind::Double).double_value(&[]);
    let got = dice.forward(&logits, &smooth).unwrap().double_value(&[]);
    assert!((got - expected).abs() < 1e-6, "smoothed labels: {got} vs {expected}");
    let one_hot_value = dice.forward(&logits, &hot).unwrap().double_value(&[]);
    assert!((got - one_hot_value).abs() > 1e-3, "smoothing made no difference");
    let (mut smoothed, mut indices) = (dice.evaluator(), dice.evaluator());
    smoothed.add_batch(&logits, &smooth).unwrap();
    indices.add_batch(&logits, &labels).unwrap();
    assert_eq!(smoothed.finish().unwrap().value, indices.finish().unwrap().value);
    // `ce` with soft labels is the cross-entropy against probabilities, libtorch's own.
    let all_valid = (&hot * 0.0 + 0.25).where_self(&valid.logical_not().unsqueeze(1), &smooth);
    let ce = Loss::from_file(&root().join("examples/ce.metric"), &Overrides::new()).unwrap();
    let ours = ce.forward(&logits, &all_valid).unwrap().double_value(&[]);
    let theirs =
        logits.cross_entropy_loss::<Tensor>(&all_valid, None, tch::Reduction::Mean, -100, 0.0).double_value(&[]);
    assert!((ours - theirs).abs() < 1e-5, "soft cross-entropy {ours} vs libtorch {theirs}");

    // Misuse: an ignore value inside soft labels, and probabilities that do not sum to 1.
    let with_ignore = hot.where_self(&valid.unsqueeze(1), &Tensor::from(255.0f32));
    let message = dice.forward(&logits, &with_ignore).unwrap_err().to_string();
    assert!(message.contains("an ignore value such as 255 has no place in soft labels"), "{message}");
    let message = dice.forward(&logits, &(&hot * 0.5)).unwrap_err().to_string();
    let halves = valid.sum(Kind::Int64).int64_value(&[]);
    assert!(
        message.contains(&format!("but {halves} pixels sum to neither 1 nor 0 (one of them: 0.5); multi-hot")),
        "{message}"
    );
    // A count of 0 is left out, and one pixel is one pixel.
    assert!(!message.contains("outside [0, 1] and"), "{message}");
    let one_off = hot.copy();
    for class in 0..4 {
        let _ = one_off.get(0).get(class).get(0).get(0).fill_(if class == 0 { 0.5 } else { 0.0 });
    }
    let message = dice.forward(&logits, &one_off).unwrap_err().to_string();
    assert!(message.contains("but 1 pixel sums to neither 1 nor 0 (0.5); multi-hot"), "{message}");
    let message = dice.forward(&logits, &(&hot * 2.0 - 1.0)).unwrap_err().to_string();
    assert!(message.contains(" values are outside [0, 1] (one of them: -1) and "), "{message}");
    let multi_hot = (&hot + hot.roll([1], [1])).clamp(0.0, 1.0);
    let message = dice.forward(&logits, &multi_hot).unwrap_err().to_string();
    assert!(message.contains("one of them: 2)") && message.contains("multi-hot labels"), "{message}");
    assert_eq!(message.lines().count(), 1, "{message}");
}

/// Binary labels `[N, H, W]` of 0 and 1, a tenth ignored (255).
fn binary_batch(seed: u64, n: i64, h: i64, w: i64) -> (Tensor, Tensor) {
    let (logits, labels) = batch(seed, n, 2, h, w);
    (logits.narrow(1, 0, 1).contiguous(), labels)
}

#[test]
fn sigmoid_metrics_threshold_each_channel_and_misuse_is_one_sentence() {
    let example = |name: &str, overrides: Overrides| {
        Loss::from_file(&root().join(format!("examples/{name}.metric")), &overrides).unwrap()
    };
    let sum = |t: &Tensor| t.sum(Kind::Double).double_value(&[]);

    // Binary Dice: exact on `sigmoid > t`, surrogate (identity curves) on the sigmoid itself.
    let (logits, labels) = binary_batch(61, 2, 12, 13);
    let valid = labels.ne(255).unsqueeze(1).to_kind(Kind::Double);
    let y = labels.eq(1).unsqueeze(1).to_kind(Kind::Double);
    for threshold in [0.5, 0.7] {
        let dice = example("binary_dice", Overrides::new().set("threshold", threshold));
        assert!(!dice.uses_fused_kernel(&logits), "sigmoid metrics take the reference path");
        let p = logits.to_kind(Kind::Double).sigmoid().gt(threshold).to_kind(Kind::Double);
        let expected = 2.0 * sum(&(&p * &y * &valid)) / (sum(&(&p * &valid)) + sum(&y));
        let mut evaluator = dice.evaluator();
        evaluator.add_batch(&logits.narrow(0, 0, 1), &labels.narrow(0, 0, 1)).unwrap();
        evaluator.add_batch(&logits.narrow(0, 1, 1), &labels.narrow(0, 1, 1)).unwrap();
        let got = evaluator.finish().unwrap().value;
        assert!((got - expected).abs() < 1e-12, "threshold {threshold}: exact {got} vs {expected}");
    }
    let s = logits.to_kind(Kind::Double).sigmoid();
    let soft_dice = 2.0 * sum(&(&s * &y * &valid)) / (sum(&(&s * &valid)) + sum(&y) + 1e-8);
    let dice = example("binary_dice", Overrides::new());
    let got = dice.forward(&logits, &labels).unwrap().double_value(&[]);
    assert!((got - (1.0 - soft_dice)).abs() < 1e-6, "surrogate {got} vs {}", 1.0 - soft_dice);

    // Dice + BCE: `ce` is PyTorch's BCEWithLogitsLoss over the valid pixels.
    let bce = logits.to_kind(Kind::Double).binary_cross_entropy_with_logits::<&Tensor>(
        &y,
        Some(&valid),
        None,
        tch::Reduction::Sum,
    );
    let expected = (1.0 - soft_dice) + sum(&bce) / sum(&valid);
    let got = example("dice_bce", Overrides::new()).forward(&logits, &labels).unwrap().double_value(&[]);
    assert!((got - expected).abs() < 1e-6, "dice + bce {got} vs {expected}");

    // Multi-label IoU: multi-hot labels, the ignore value in one channel ignores the pixel.
    let (logits, classes) = batch(62, 2, 3, 11, 12);
    let mut rng = Rng(63);
    let hot: Vec<f32> = (0..2 * 3 * 11 * 12).map(|_| if rng.next() < 0.4 { 1.0 } else { 0.0 }).collect();
    let ignored = classes.eq(255).unsqueeze(1);
    let multi = Tensor::from_slice(&hot).view([2, 3, 11, 12]);
    let multi = multi.where_self(
        &ignored.logical_not().logical_or(&Tensor::from_slice(&[false, true, false]).view([1, 3, 1, 1]).logical_not()),
        &Tensor::from(255.0f32),
    );
    let valid = ignored.logical_not().to_kind(Kind::Double);
    let y = multi.eq(1.0).to_kind(Kind::Double) * &valid;
    let p = logits.gt(0.0).to_kind(Kind::Double);
    let dims = [0i64, 2, 3];
    let inter = (&p * &y * &valid).sum_dim_intlist(dims.as_slice(), false, Kind::Double);
    let union = ((&p + &y).clamp_max(1.0) * &valid).sum_dim_intlist(dims.as_slice(), false, Kind::Double);
    let expected = (inter / union).mean(Kind::Double).double_value(&[]);
    let iou = example("multilabel_iou", Overrides::new());
    for labels in [multi.shallow_clone(), multi.to_kind(Kind::Uint8)] {
        let mut evaluator = iou.evaluator();
        evaluator.add_batch(&logits, &labels).unwrap();
        let got = evaluator.finish().unwrap().value;
        assert!((got - expected).abs() < 1e-12, "{:?} multi-hot labels: {got} vs {expected}", labels.kind());
    }

    // Class indices with several channels are one-hot targets: the same as one-hot labels.
    let one_hot = classes.where_self(&classes.ne(255), &Tensor::from(0i64)).one_hot(3).permute([0, 3, 1, 2]);
    let one_hot = one_hot.to_kind(Kind::Float).where_self(&ignored.logical_not(), &Tensor::from(255.0f32));
    let by_index = iou.forward(&logits, &classes).unwrap().double_value(&[]);
    let by_hot = iou.forward(&logits, &one_hot).unwrap().double_value(&[]);
    assert!((by_index - by_hot).abs() < 1e-6, "indices {by_index} vs one-hot {by_hot}");

    // Misuse, one sentence each.
    let (logits, labels) = binary_batch(64, 1, 6, 7);
    let twos = labels.where_self(&labels.ne(1), &Tensor::from(2i64));
    let message = dice.forward(&logits, &twos).unwrap_err().to_string();
    let ones = labels.eq(1).sum(Kind::Int64).int64_value(&[]);
    assert!(
        message.contains("binary labels, 0 (background) and 1 (foreground)")
            && message.contains(&format!("but {ones} pixels have other values (one of them: 2);")),
        "{message}"
    );
    let one_two = labels.copy();
    let _ = one_two.get(0).get(2).get(3).fill_(2);
    let message = dice.forward(&logits, &one_two).unwrap_err().to_string();
    assert!(message.contains("but 1 pixel has another value (2);"), "{message}");
    // Labels of neither form for a sigmoid metric: the logits' shape is offered too.
    let message = dice.forward(&logits, &labels.unsqueeze(1).repeat([1, 3, 1, 1])).unwrap_err().to_string();
    assert!(message.contains("or, for a sigmoid metric, the logits' shape (one target per channel), but"), "{message}");
    // A softmax metric on one channel with labels 0 and 1: a binary model is a sigmoid one.
    let softmax_dice = example("dice", Overrides::new());
    let message = softmax_dice.forward(&logits, &labels).unwrap_err().to_string();
    assert!(
        message.contains("label value 1 is neither a class in 0..1")
            && message
                .contains("; for a binary model with one output channel declare the metric `with sigmoid = true`"),
        "{message}"
    );
    let (logits, _) = batch(65, 1, 3, 6, 7);
    let message =
        iou.forward(&logits, &(&multi.narrow(0, 0, 1).narrow(2, 0, 6).narrow(3, 0, 7) * 2.0)).unwrap_err().to_string();
    assert!(message.contains("one target per channel, in [0, 1]") && message.contains("(one of them: 2)"), "{message}");
    let miou = example("miou", Overrides::new());
    let message = miou
        .forward(&logits, &multi.narrow(0, 0, 1).narrow(2, 0, 6).narrow(3, 0, 7).to_kind(Kind::Uint8))
        .unwrap_err()
        .to_string();
    assert!(message.contains("multi-hot") && message.contains("`with sigmoid = true`"), "{message}");
    assert_eq!(message.lines().count(), 1, "{message}");
}

#[test]
fn per_image_metrics_average_each_images_own_metric_and_skip_undefined_images() {
    let body = "let dice = 2 * count(P & L & V) / (count(P & V) + count(L));\n    mean(dice, where: count(L) > 0)";
    let mut per_image = Loss::from_source(
        "per.metric",
        &format!("metric d with per_image = true {{\n    {body}\n}}\n"),
        &Overrides::new(),
    )
    .unwrap();
    let mut dataset =
        Loss::from_source("whole.metric", &format!("metric d {{\n    {body}\n}}\n"), &Overrides::new()).unwrap();
    let (logits, labels) = batch(71, 4, 3, 10, 12);
    // Image 0 is predicted nearly right, the others at random, so pooling differs from
    // averaging images.
    let right = labels.narrow(0, 0, 1).clamp_max(2).one_hot(3).permute([0, 3, 1, 2]).to_kind(Kind::Float) * 6.0;
    let logits = Tensor::cat(&[right, logits.narrow(0, 1, 3)], 0);
    // Image 2 has no valid pixel: no class is labelled, so its Dice is undefined.
    let labels = labels.index_fill(0, &Tensor::from_slice(&[2i64]), 255);
    // Image 1 is mostly ignored: pooled counts barely see it, the mean over images does.
    let _ = labels.narrow(0, 1, 1).narrow(1, 0, 8).fill_(255);
    let image = |t: &Tensor, i: i64| t.narrow(0, i, 1);

    // Exact: the mean over the images whose own metric is defined.
    let mut own = Vec::new();
    for i in 0..4 {
        let mut evaluator = dataset.evaluator();
        evaluator.add_batch(&image(&logits, i), &image(&labels, i)).unwrap();
        own.push(evaluator.finish().unwrap().value);
    }
    assert!(own[2].is_nan() && own.iter().filter(|v| v.is_nan()).count() == 1, "{own:?}");
    let expected = own.iter().filter(|v| !v.is_nan()).sum::<f64>() / 3.0;
    let mut whole = per_image.evaluator();
    whole.add_batch(&logits, &labels).unwrap();
    let got = whole.finish().unwrap().value;
    assert!((got - expected).abs() < 1e-12, "per image {got} vs {expected}");
    // Batches of any size give the same, and the sums all-reduce like counts.
    let (mut first, mut second) = (per_image.evaluator(), per_image.evaluator());
    first.add_batch(&logits.narrow(0, 0, 1), &labels.narrow(0, 0, 1)).unwrap();
    second.add_batch(&logits.narrow(0, 1, 3), &labels.narrow(0, 1, 3)).unwrap();
    let mut merged = first.clone();
    merged.merge(&second).unwrap();
    assert!((merged.finish().unwrap().value - expected).abs() < 1e-12);
    let summed: Vec<f64> = first.counts().iter().zip(second.counts()).map(|(a, b)| a + b).collect();
    first.set_counts(&summed).unwrap();
    assert!((first.finish().unwrap().value - expected).abs() < 1e-12);
    // The dataset-level metric differs: images are not pooled.
    let mut pooled = dataset.evaluator();
    pooled.add_batch(&logits, &labels).unwrap();
    assert!((pooled.finish().unwrap().value - expected).abs() > 1e-2, "per image equals pooled: {own:?}");

    // Surrogate: each image's loss by itself, averaged over the defined images; the
    // gradient is theirs, on the fused kernel and on the reference path.
    for fast in [true, false] {
        per_image.set_fast_path(fast);
        dataset.set_fast_path(fast);
        let x = logits.copy().set_requires_grad(true);
        let value = per_image.forward(&x, &labels).unwrap();
        value.backward();
        let mut expected = 0.0;
        let expected_grad = logits.zeros_like();
        for i in [0i64, 1, 3] {
            let xi = image(&logits, i).copy().set_requires_grad(true);
            let part = dataset.forward(&xi, &image(&labels, i)).unwrap();
            part.backward();
            expected += part.double_value(&[]) / 3.0;
            expected_grad.narrow(0, i, 1).copy_(&(xi.grad() / 3.0));
        }
        let undefined = dataset.forward_detailed(&image(&logits, 2), &image(&labels, 2)).unwrap();
        assert!(!undefined.defined, "the all-ignored image is undefined");
        assert!(
            (value.double_value(&[]) - expected).abs() < 1e-6,
            "fast={fast}: {} vs {expected}",
            value.double_value(&[])
        );
        let gap = (x.grad() - &expected_grad).abs().max().double_value(&[]);
        assert!(gap < 1e-7, "fast={fast}: gradient off by {gap:e}");
        assert_eq!(x.grad().narrow(0, 2, 1).abs().sum(Kind::Double).double_value(&[]), 0.0);
    }
}
