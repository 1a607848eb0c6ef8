//! The back-end corpus (`tests/corpus/README.md`): every case's metric file, overrides,
//! ignore label and inputs, made the same way for every suite that runs it.

use super::{examples, root, Rng};
use compiler::curve::Curve;
use losscc_loss::Overrides;
use std::path::PathBuf;
use tch::Tensor;

/// The form of a case's labels (`labels=` in its header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Labels {
    /// Class indices `0..C` without the class axis (the default).
    Classes,
    /// 0 and 1 without the class axis whatever C is (a one-channel sigmoid metric's labels).
    Binary,
    /// 0 or 1 per channel, float32 of the logits' shape (a sigmoid metric's multi-hot labels);
    /// the ignore label in one channel ignores the pixel.
    MultiHot,
    /// Float32 probabilities of the logits' shape summing to 1 at each pixel, all 0 at an
    /// ignored pixel (a softmax metric's soft labels; no ignore value inside).
    Soft,
}

/// One case: a metric file and how to make its inputs.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub path: PathBuf,
    /// Logits `[N, C, H, W]`, or volumes `[N, C, D, H, W]`.
    pub shape: Vec<i64>,
    pub seed: u64,
    pub scale: f64,
    pub ignore: Option<i64>,
    pub ignored: f64,
    pub sets: Vec<(String, String)>,
    pub labels: Labels,
}

impl Case {
    fn parse(path: PathBuf) -> Case {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        let mut case = Case {
            name,
            path,
            shape: vec![2, 5, 19, 23],
            seed,
            scale: 3.0,
            ignore: Some(255),
            ignored: 0.1,
            sets: Vec::new(),
            labels: Labels::Classes,
        };
        for line in text.lines().take_while(|l| l.starts_with('#') && !l.starts_with("##")) {
            if let Some(rest) = line.strip_prefix("# corpus:") {
                for item in rest.split_whitespace() {
                    let (key, value) = item.split_once('=').expect("key=value in a corpus header");
                    match key {
                        "shape" => {
                            case.shape = value.split(',').map(|d| d.parse().unwrap()).collect();
                            assert!(
                                case.shape.len() == 4 || case.shape.len() == 5,
                                "{}: shape is N,C,H,W or N,C,D,H,W",
                                case.path.display()
                            );
                        }
                        "seed" => case.seed = value.parse().unwrap(),
                        "scale" => case.scale = value.parse().unwrap(),
                        "ignore" => case.ignore = if value == "none" { None } else { Some(value.parse().unwrap()) },
                        "ignored" => case.ignored = value.parse().unwrap(),
                        "labels" => {
                            case.labels = match value {
                                "classes" => Labels::Classes,
                                "binary" => Labels::Binary,
                                "multihot" => Labels::MultiHot,
                                "soft" => Labels::Soft,
                                other => panic!("{}: unknown labels form `{other}`", case.path.display()),
                            }
                        }
                        other => panic!("{}: unknown corpus key `{other}`", case.path.display()),
                    }
                }
            } else if let Some(rest) = line.strip_prefix("# set:") {
                for item in rest.split_whitespace() {
                    let (key, value) = item.split_once('=').expect("name=value in `# set:`");
                    case.sets.push((key.to_string(), value.to_string()));
                }
            }
        }
        case
    }

    pub fn overrides(&self) -> Overrides {
        Overrides::from(self.sets.as_slice())
    }

    /// Volumes `[N, C, D, H, W]` rather than images.
    pub fn volumes(&self) -> bool {
        self.shape.len() == 5
    }

    /// Labels of the logits' shape (multi-hot or soft): float32, taken by ONNX graphs
    /// compiled with `soft_labels`.
    pub fn channel_labels(&self) -> bool {
        matches!(self.labels, Labels::MultiHot | Labels::Soft)
    }

    /// Float32 logits uniform in `[-scale, scale]` and blocky labels of the case's form for
    /// `shape` (`[N, C, H, W]` or `[N, C, D, H, W]`), `ignored` of the pixels ignored: class
    /// indices (or 0 and 1) with the ignore label, multi-hot channels with the ignore label in
    /// one channel, or soft labels all 0.
    pub fn inputs(&self, shape: &[i64]) -> (Tensor, Tensor) {
        let (n, c) = (shape[0], shape[1]);
        let (d, h, w) = match *shape {
            [_, _, h, w] => (1, h, w),
            [_, _, d, h, w] => (d, h, w),
            _ => panic!("logits [N,C,H,W] or [N,C,D,H,W], not {shape:?}"),
        };
        let mut rng = Rng(self.seed | 1);
        let logits: Vec<f32> = (0..n * c * d * h * w).map(|_| ((rng.next() * 2.0 - 1.0) * self.scale) as f32).collect();
        let (bh, bw) = (1 + (rng.next() * 4.0) as i64, 2 + (rng.next() * 4.0) as i64);
        // Images draw no block depth, so their inputs stay what they were before volumes.
        let bd = if shape.len() == 5 { 1 + (rng.next() * 3.0) as i64 } else { 1 };
        let pixels = d * h * w;
        let logits = Tensor::from_slice(&logits).reshape(shape);
        // The blocky class of pixel `p` of `image`.
        let block = |image: i64, p: i64| {
            let (z, y, x) = (p / (h * w), (p / w) % h, p % w);
            z / bd + y / bh + 2 * (x / bw) + image
        };
        let mut without_classes = shape.to_vec();
        without_classes.remove(1);
        match self.labels {
            Labels::Classes | Labels::Binary => {
                let classes = if self.labels == Labels::Binary { 2 } else { c };
                let labels: Vec<i64> = (0..n * pixels)
                    .map(|i| match self.ignore {
                        Some(ignore) if rng.next() < self.ignored => ignore,
                        _ => block(i / pixels, i % pixels) % classes,
                    })
                    .collect();
                (logits, Tensor::from_slice(&labels).reshape(without_classes.as_slice()))
            }
            Labels::MultiHot => {
                // Overlapping blocks: a pixel may carry several channels, or none.
                let mut labels = vec![0f32; (n * c * pixels) as usize];
                for image in 0..n {
                    for p in 0..pixels {
                        let at = |k: i64| (image * c * pixels + k * pixels + p) as usize;
                        let (y, x) = ((p / w) % h, p % w);
                        for k in 0..c {
                            let on = (block(image, p) + k) % 3 == 0 || (y / bh + x / bw + k) % 4 == 0;
                            labels[at(k)] = f32::from(u8::from(on));
                        }
                        if let Some(ignore) = self.ignore {
                            if rng.next() < self.ignored {
                                labels[at(p % c)] = ignore as f32;
                            }
                        }
                    }
                }
                (logits, Tensor::from_slice(&labels).reshape(shape))
            }
            Labels::Soft => {
                // Each pixel's blocky class holds at least 0.6 (a clear argmax), the rest is
                // spread at random; ignored pixels are all 0.
                let mut labels = vec![0f32; (n * c * pixels) as usize];
                for image in 0..n {
                    for p in 0..pixels {
                        let at = |k: i64| (image * c * pixels + k * pixels + p) as usize;
                        if rng.next() < self.ignored {
                            continue;
                        }
                        let spread: Vec<f64> = (0..c).map(|_| rng.next() + 1e-3).collect();
                        let total: f64 = spread.iter().sum();
                        let class = block(image, p) % c;
                        for k in 0..c {
                            let hard = if k == class { 0.6 } else { 0.0 };
                            labels[at(k)] = (hard + 0.4 * spread[k as usize] / total) as f32;
                        }
                    }
                }
                (logits, Tensor::from_slice(&labels).reshape(shape))
            }
        }
    }

    /// Random monotone curves for a manifest's entries (pieces per curve).
    pub fn curves(&self, pieces: &[usize]) -> Vec<Curve> {
        let mut rng = Rng(self.seed.rotate_left(17) | 1);
        pieces
            .iter()
            .map(|&k| {
                let u: Vec<f64> = (0..Curve::search_len(k)).map(|_| 0.05 + 0.9 * rng.next()).collect();
                Curve::from_search(&u, k).unwrap()
            })
            .collect()
    }
}

/// Every case: the example library, then `tests/corpus/`.
pub fn cases() -> Vec<Case> {
    let mut paths = examples();
    paths.extend(super::files::metric_files(&root().join("tests/corpus")));
    paths.into_iter().map(Case::parse).collect()
}
