//! The proxy task's parts, each against an independent reference: the built-in scenes, the
//! VOC-layout reader on real PNG and JPEG files, Lovász-softmax against a float64 loop,
//! the truncated-normal density, and the PPO step.

mod common;

use compiler::ir::DEFAULT_IGNORE_LABEL as IGNORE;
use losscc_loss::{Loss, Overrides};
use losscc_proxy::data::{self, SyntheticSpec};
use losscc_proxy::trainer::{self, TrainConfig};
use losscc_search::config::{Baseline, SearchConfig};
use losscc_search::policy::{self as search, Layout};
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

fn small_spec(seed: u64) -> SyntheticSpec {
    SyntheticSpec { seed, size: 48, train: 24, holdout: 6, test: 12, ignore_band: true }
}

#[test]
fn synthetic_scenes_are_a_function_of_their_seed() {
    let a = data::synthetic(&small_spec(3));
    let b = data::synthetic(&small_spec(3));
    let c = data::synthetic(&small_spec(4));
    assert_eq!(a.train.len(), 24);
    assert_eq!((a.holdout.len(), a.test.len()), (6, 12));
    for (x, y) in a.train.iter().chain(&a.test).zip(b.train.iter().chain(&b.test)) {
        assert_eq!(x.image, y.image);
        assert_eq!(x.label, y.label);
    }
    assert_ne!(a.train[0].image, c.train[0].image);
    // Splits are different scenes.
    assert_ne!(a.train[0].label, a.holdout[0].label);
    // Every class appears, thin strokes included, and the ignore band is there.
    let mut seen = [0usize; 5];
    let mut ignored = 0;
    for sample in &a.train {
        assert_eq!(sample.image.len(), 3 * 48 * 48);
        for &value in &sample.label {
            match value {
                IGNORE => ignored += 1,
                0..=4 => seen[value as usize] += 1,
                other => panic!("label value {other} outside the scene classes"),
            }
        }
        assert!(sample.image.iter().all(|v| v.is_finite()));
    }
    assert!(seen.iter().all(|&count| count > 0), "class pixel counts {seen:?}");
    assert!(ignored > 0);
    let without_band = data::synthetic(&SyntheticSpec { ignore_band: false, ..small_spec(3) });
    assert!(without_band.train.iter().all(|s| s.label.iter().all(|&v| v != IGNORE)));
}

fn scratch(name: &str) -> PathBuf {
    common::scratch("proxy", name)
}

/// A palette PNG whose indices are `label` (palette colours are arbitrary, as in VOC).
fn write_palette_png(path: &Path, width: u32, height: u32, label: &[u8]) {
    let file = std::fs::File::create(path).unwrap();
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    encoder.set_color(png::ColorType::Indexed);
    encoder.set_depth(png::BitDepth::Eight);
    let palette: Vec<u8> =
        (0..=255u32).flat_map(|i| [(i * 37 % 256) as u8, (i * 91 % 256) as u8, (i * 13 % 256) as u8]).collect();
    encoder.set_palette(palette);
    encoder.write_header().unwrap().write_image_data(label).unwrap();
}

fn write_gray_png(path: &Path, width: u32, height: u32, label: &[u8]) {
    image::GrayImage::from_raw(width, height, label.to_vec()).unwrap().save(path).unwrap();
}

fn voc_folder(name: &str) -> PathBuf {
    voc_folder_with(name, |i, index| if i % 11 == 0 { 255 } else { ((i / 12 + index as u32) % 3) as u8 })
}

/// A VOC folder whose label value at flat pixel `i` of image `index` is `label(i, index)`.
fn voc_folder_with(name: &str, label: impl Fn(u32, usize) -> u8) -> PathBuf {
    let dir = scratch(name);
    for sub in ["JPEGImages", "SegmentationClass", "ImageSets/Segmentation"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let (w, h) = (12u32, 8u32);
    let names = ["a", "b", "c", "d"];
    for (index, name) in names.iter().enumerate() {
        let rgb =
            image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 20) as u8, (y * 30) as u8, (index * 60) as u8]));
        if index % 2 == 0 {
            rgb.save(dir.join("JPEGImages").join(format!("{name}.jpg"))).unwrap();
        } else {
            rgb.save(dir.join("JPEGImages").join(format!("{name}.png"))).unwrap();
        }
        let label: Vec<u8> = (0..w * h).map(|i| label(i, index)).collect();
        let path = dir.join("SegmentationClass").join(format!("{name}.png"));
        if index == 3 {
            write_gray_png(&path, w, h, &label);
        } else {
            write_palette_png(&path, w, h, &label);
        }
    }
    std::fs::write(dir.join("ImageSets/Segmentation/train.txt"), "a\nb\nc\n").unwrap();
    std::fs::write(dir.join("ImageSets/Segmentation/val.txt"), "d\n").unwrap();
    dir
}

#[test]
fn voc_folders_load_palette_and_grayscale_labels_with_jpeg_and_png_images() {
    let dir = voc_folder("ok");
    let dataset = data::load_voc(&dir, None, Some(255)).unwrap();
    assert_eq!(dataset.classes, 3);
    // Every tenth training image is held out; with three, the last one is.
    assert_eq!(dataset.train.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(dataset.holdout[0].name, "c");
    assert_eq!(dataset.test[0].name, "d");
    for (index, sample) in dataset.train.iter().chain(&dataset.holdout).chain(&dataset.test).enumerate() {
        assert_eq!((sample.width, sample.height), (12, 8));
        for (i, &value) in sample.label.iter().enumerate() {
            let expected = if i % 11 == 0 { 255 } else { ((i / 12 + index) % 3) as i64 };
            assert_eq!(value, expected, "{} pixel {i}", sample.name);
        }
    }
    // PNG images are lossless: pixel (x=3, y=2) of image b is (60, 60, 60).
    let b = &dataset.train[1];
    let plane = 12 * 8;
    for c in 0..3 {
        let value = b.image[c * plane + 2 * 12 + 3];
        assert!((value - (60.0 / 255.0 - 0.5) / 0.25).abs() < 1e-6, "channel {c}: {value}");
    }
    std::fs::write(dir.join("ImageSets/Segmentation/holdout.txt"), "b\n").unwrap();
    let dataset = data::load_voc(&dir, Some(4), Some(255)).unwrap();
    assert_eq!(dataset.classes, 4);
    assert_eq!(dataset.train.len(), 3);
    assert_eq!(dataset.holdout[0].name, "b");
}

/// `--ignore-label`: another value marks ignored pixels in the files (here 0, with classes
/// 1..=3); in memory they carry the marker 255. With the default (255), the files' 0 is a
/// class; with none, a written 255 is out of range, said in one sentence.
#[test]
fn voc_folders_take_their_own_ignore_label() {
    let written = |i: u32, index: usize| if i % 7 == 0 { 0 } else { 1 + ((i / 12 + index as u32) % 3) as u8 };
    let dir = voc_folder_with("ignore0", written);
    let dataset = data::load_voc(&dir, None, Some(0)).unwrap();
    assert_eq!(dataset.classes, 4);
    let samples: Vec<_> = dataset.train.iter().chain(&dataset.holdout).chain(&dataset.test).collect();
    for (index, sample) in samples.iter().enumerate() {
        for (i, &value) in sample.label.iter().enumerate() {
            let expected = match written(i as u32, index) {
                0 => 255,
                other => other as i64,
            };
            assert_eq!(value, expected, "{} pixel {i}", sample.name);
        }
    }
    let default = data::load_voc(&dir, None, Some(255)).unwrap();
    assert_eq!(default.train[0].label[0], 0, "with 255 ignored, 0 is a class");
    let dir = voc_folder("ignorenone");
    let error = data::load_voc(&dir, None, None).map(|_| ()).unwrap_err().to_string();
    assert!(
        error.contains("value 255") && error.contains("no value is ignored") && error.contains("--ignore-label"),
        "{error}"
    );
}

fn voc_error(dir: &Path, classes: Option<usize>) -> String {
    match data::load_voc(dir, classes, Some(255)) {
        Ok(_) => panic!("`{}` should not load", dir.display()),
        Err(error) => error.to_string(),
    }
}

#[test]
fn voc_folders_with_problems_get_one_sentence_naming_the_file() {
    let missing = voc_error(Path::new("/nonexistent/voc"), None);
    assert!(missing.contains("does not exist") && missing.contains("--data"), "{missing}");

    let dir = voc_folder("noimage");
    std::fs::remove_file(dir.join("JPEGImages/b.png")).unwrap();
    let message = voc_error(&dir, None);
    assert!(
        message.contains("`b`") && message.contains("JPEGImages/b.jpg") && message.contains("train.txt"),
        "{message}"
    );

    let dir = voc_folder("nolabel");
    std::fs::remove_file(dir.join("SegmentationClass/d.png")).unwrap();
    let message = voc_error(&dir, None);
    assert!(message.contains("SegmentationClass/d.png") && message.contains("val.txt"), "{message}");

    let dir = voc_folder("size");
    write_palette_png(&dir.join("SegmentationClass/a.png"), 5, 5, &[0; 25]);
    let message = voc_error(&dir, None);
    assert!(message.contains("12×8") && message.contains("5×5") && message.contains("same size"), "{message}");

    let dir = voc_folder("value");
    let mut label = vec![0u8; 96];
    label[2 * 12 + 7] = 9;
    write_palette_png(&dir.join("SegmentationClass/c.png"), 12, 8, &label);
    let message = voc_error(&dir, Some(3));
    assert!(message.contains("value 9 at row 2, column 7") && message.contains("--classes"), "{message}");

    let dir = voc_folder("rgb");
    image::RgbImage::new(12, 8).save(dir.join("SegmentationClass/a.png")).unwrap();
    let message = voc_error(&dir, None);
    assert!(message.contains("palette or 8-bit grayscale"), "{message}");

    let dir = voc_folder("empty");
    std::fs::write(dir.join("ImageSets/Segmentation/val.txt"), "\n").unwrap();
    let message = voc_error(&dir, None);
    assert!(message.contains("lists no images"), "{message}");
}

/// Lovász-softmax in plain float64 loops: the definition, written independently.
fn lovasz_reference(probabilities: &[Vec<f64>], labels: &[i64], classes: usize) -> f64 {
    let kept: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] != IGNORE).collect();
    let mut terms = Vec::new();
    for class in 0..classes {
        let foreground: Vec<f64> = kept.iter().map(|&i| (labels[i] == class as i64) as u8 as f64).collect();
        let total: f64 = foreground.iter().sum();
        if total == 0.0 {
            continue;
        }
        let mut order: Vec<usize> = (0..kept.len()).collect();
        let errors: Vec<f64> =
            kept.iter().zip(&foreground).map(|(&i, f)| (f - probabilities[i][class]).abs()).collect();
        order.sort_by(|&a, &b| errors[b].partial_cmp(&errors[a]).unwrap());
        let (mut previous, mut loss, mut seen_fg, mut seen_bg) = (0.0, 0.0, 0.0, 0.0);
        for &k in &order {
            if foreground[k] == 1.0 {
                seen_fg += 1.0;
            } else {
                seen_bg += 1.0;
            }
            let jaccard = 1.0 - (total - seen_fg) / (total + seen_bg);
            loss += errors[k] * (jaccard - previous);
            previous = jaccard;
        }
        terms.push(loss);
    }
    terms.iter().sum::<f64>() / terms.len() as f64
}

#[test]
fn lovasz_softmax_matches_its_definition() {
    let mut rng = common::Rng(11);
    let (n, c, h, w) = (2usize, 4usize, 5usize, 6usize);
    let logits: Vec<f32> = (0..n * c * h * w).map(|_| (rng.next() * 6.0 - 3.0) as f32).collect();
    let labels: Vec<i64> =
        (0..n * h * w).map(|i| if i % 7 == 0 { IGNORE } else { (rng.next() * 3.0) as i64 }).collect();
    let logits_t = Tensor::from_slice(&logits).view([n as i64, c as i64, h as i64, w as i64]).set_requires_grad(true);
    let labels_t = Tensor::from_slice(&labels).view([n as i64, h as i64, w as i64]);
    let value = trainer::lovasz_softmax(&logits_t, &labels_t);
    let probabilities: Vec<Vec<f64>> = (0..n * h * w)
        .map(|pixel| {
            let (image, offset) = (pixel / (h * w), pixel % (h * w));
            let row: Vec<f64> = (0..c).map(|k| logits[(image * c + k) * h * w + offset] as f64).collect();
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = row.iter().map(|v| (v - max).exp()).sum();
            row.iter().map(|v| (v - max).exp() / sum).collect()
        })
        .collect();
    let expected = lovasz_reference(&probabilities, &labels, c);
    let got = value.double_value(&[]);
    assert!((got - expected).abs() < 1e-5, "tch {got} vs reference {expected}");
    value.backward();
    let gradient = logits_t.grad();
    assert_eq!(gradient.isfinite().all().int64_value(&[]), 1);
    assert!(gradient.abs().sum(Kind::Double).double_value(&[]) > 0.0);
    // No valid pixel: zero, not NaN.
    let all_ignored = Tensor::full([1, 3, 2, 2], IGNORE, (Kind::Int64, tch::Device::Cpu));
    let zero = trainer::lovasz_softmax(
        &Tensor::zeros([1, 4, 2, 2], (Kind::Float, tch::Device::Cpu)),
        &all_ignored.select(1, 0),
    );
    assert_eq!(zero.double_value(&[]), 0.0);
}

#[test]
fn truncated_normal_density_integrates_to_one_and_draws_stay_inside() {
    for mu in [0.03, 0.25, 0.5, 0.9] {
        let steps = 20_000;
        let xs: Vec<f64> = (0..steps).map(|i| (i as f64 + 0.5) / steps as f64).collect();
        let x = Tensor::from_slice(&xs).view([steps as i64, 1]);
        let mu_t = Tensor::from_slice(&[mu]);
        let density = search::truncated_normal_log_prob(&x, &mu_t, 0.2).exp();
        let integral = density.sum(Kind::Double).double_value(&[]) / steps as f64;
        assert!((integral - 1.0).abs() < 1e-6, "μ = {mu}: ∫ = {integral}");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let draws: Vec<f64> = (0..4000).map(|_| search::truncated_normal(mu, 0.2, &mut rng)).collect();
        assert!(draws.iter().all(|&d| d > 0.0 && d < 1.0));
        // The sample mean agrees with the density's mean.
        let mean_density =
            (&density * &x.squeeze_dim(1).unsqueeze(1)).sum(Kind::Double).double_value(&[]) / steps as f64;
        let mean_draws = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean_density - mean_draws).abs() < 0.01, "μ = {mu}: {mean_density} vs {mean_draws}");
    }
}

fn ppo_config() -> SearchConfig {
    SearchConfig {
        file: "x.metric".into(),
        sources: Vec::new(),
        overrides: Vec::new(),
        target: "x".into(),
        rounds: 1,
        samples: 3,
        sigma: 0.2,
        clip: 0.2,
        adam_steps: 60,
        adam_lr: 0.2,
        baseline: Baseline::Mu,
        policy: losscc_search::config::Policy::Ppo,
        seed: 0,
        train: TrainConfig::default(),
        proxy_seeds: 1,
        data: String::new(),
        start: Vec::new(),
        threads_per_model: 1,
        device: "cpu".into(),
        target_sources: Vec::new(),
        target_overrides: Vec::new(),
        dataset: losscc_search::config::DatasetSpec {
            folder: None,
            classes: None,
            ignore_label: Some(255),
            synthetic: SyntheticSpec::default(),
        },
        evaluator: losscc_search::config::EvaluatorSpec::Proxy,
    }
}

#[test]
fn the_ppo_step_moves_mu_toward_better_samples_within_the_clip() {
    let config = ppo_config();
    let mu_x = [0.0, 0.0];
    let samples = vec![vec![0.5, 0.5], vec![0.7, 0.6], vec![0.3, 0.4]];
    let moved = search::ppo_update(&mu_x, &samples, &[0.0, 0.1, -0.1], &config);
    assert!(moved.iter().all(|&m| m > 0.0), "{moved:?}");
    // The clip bounds the move: the better sample's ratio stops paying beyond 1 + ε, so μ
    // stays well inside (0, 1) after 60 steps at lr 0.2.
    assert!(moved.iter().all(|&m| m < 1.5), "{moved:?}");
    // Flipped rewards move the other way.
    let flipped = search::ppo_update(&mu_x, &samples, &[0.0, -0.1, 0.1], &config);
    assert!(flipped.iter().all(|&m| m < 0.0), "{flipped:?}");
    // No advantage, no move.
    assert_eq!(search::ppo_update(&mu_x, &samples, &[0.0, 0.0, 0.0], &config), mu_x.to_vec());
}

#[test]
fn search_variables_map_to_the_published_identity_start_and_keep_fixed_curves() {
    let loss = Loss::from_file(&common::root().join("examples/biou.metric"), &Overrides::new()).unwrap();
    let mut start = loss.params().clone();
    let layout = Layout::new(start.clone());
    assert_eq!(layout.dimensions, 12);
    let u = layout.start_u();
    let published = [0.25, 0.25, 1.0 / 3.0, 1.0 / 3.0, 0.5, 0.5];
    for (got, want) in u.iter().zip(published.iter().chain(&published)) {
        assert!((got - want).abs() < 1e-12, "{u:?}");
    }
    assert_eq!(layout.params(&u).curves, start.curves);
    start.fixed[0] = true;
    let layout = Layout::new(start.clone());
    assert_eq!(layout.dimensions, 6);
    let moved = layout.params(&[0.9; 6]);
    assert_eq!(moved.curves[0], start.curves[0]);
    assert_ne!(moved.curves[1], start.curves[1]);
}

#[test]
fn training_is_deterministic_for_a_seed_and_learns() {
    let dataset = data::synthetic(&small_spec(1));
    let config = TrainConfig { iters: 80, batch: 4, crop: 32, width: 8, seed: 7, ..TrainConfig::default() };
    let miou = trainer::standard_metric("miou").unwrap();
    let run = |config: &TrainConfig| {
        let trained =
            trainer::train(&dataset, &trainer::Objective::CrossEntropy, config, tch::Device::Cpu, &mut |_| {}).unwrap();
        (trained.final_loss, trained.evaluate(&dataset.test, &[&miou]).unwrap()[0])
    };
    let first = run(&config);
    let second = run(&config);
    assert_eq!(first, second);
    let other_seed = run(&TrainConfig { seed: 8, ..config.clone() });
    assert_ne!(first.0, other_seed.0);
    // Training helps: eighty steps beat two by a clear margin.
    let barely = run(&TrainConfig { iters: 2, ..config.clone() });
    assert!(first.1 > barely.1 + 0.05, "mIoU after 80 steps {} vs 2 steps {}", first.1, barely.1);
    assert!(first.0.is_finite());
}
