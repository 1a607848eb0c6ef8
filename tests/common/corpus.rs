//! The back-end corpus (`tests/corpus/README.md`): every case's metric file, overrides,
//! ignore label and inputs, made the same way for every suite that runs it.

use super::{examples, root, Rng};
use compiler::curve::Curve;
use losscc_loss::Overrides;
use std::path::PathBuf;
use tch::Tensor;

/// One case: a metric file and how to make its inputs.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub path: PathBuf,
    pub shape: [i64; 4],
    pub seed: u64,
    pub scale: f64,
    pub ignore: Option<i64>,
    pub ignored: f64,
    pub sets: Vec<(String, String)>,
    /// Labels are 0 and 1 whatever C is (a one-channel sigmoid metric's binary labels).
    pub binary: bool,
}

impl Case {
    fn parse(path: PathBuf) -> Case {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        let mut case = Case {
            name,
            path,
            shape: [2, 5, 19, 23],
            seed,
            scale: 3.0,
            ignore: Some(255),
            ignored: 0.1,
            sets: Vec::new(),
            binary: false,
        };
        for line in text.lines().take_while(|l| l.starts_with('#') && !l.starts_with("##")) {
            if let Some(rest) = line.strip_prefix("# corpus:") {
                for item in rest.split_whitespace() {
                    let (key, value) = item.split_once('=').expect("key=value in a corpus header");
                    match key {
                        "shape" => {
                            let dims: Vec<i64> = value.split(',').map(|d| d.parse().unwrap()).collect();
                            case.shape = dims.try_into().expect("four dimensions");
                        }
                        "seed" => case.seed = value.parse().unwrap(),
                        "scale" => case.scale = value.parse().unwrap(),
                        "ignore" => case.ignore = if value == "none" { None } else { Some(value.parse().unwrap()) },
                        "ignored" => case.ignored = value.parse().unwrap(),
                        "labels" => case.binary = value == "binary",
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

    /// Float32 logits uniform in `[-scale, scale]` and blocky labels (classes `0..C`, or 0
    /// and 1 for `labels=binary`), `ignored` of them carrying the ignore label, for `shape`.
    pub fn inputs(&self, shape: [i64; 4]) -> (Tensor, Tensor) {
        let [n, c, h, w] = shape;
        let mut rng = Rng(self.seed | 1);
        let logits: Vec<f32> = (0..n * c * h * w).map(|_| ((rng.next() * 2.0 - 1.0) * self.scale) as f32).collect();
        let (bh, bw) = (1 + (rng.next() * 4.0) as i64, 2 + (rng.next() * 4.0) as i64);
        let classes = if self.binary { 2 } else { c };
        let labels: Vec<i64> = (0..n * h * w)
            .map(|i| {
                let (image, y, x) = (i / (h * w), (i / w) % h, i % w);
                match self.ignore {
                    Some(ignore) if rng.next() < self.ignored => ignore,
                    _ => (y / bh + 2 * (x / bw) + image) % classes,
                }
            })
            .collect();
        (Tensor::from_slice(&logits).reshape(shape), Tensor::from_slice(&labels).reshape([n, h, w]))
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
