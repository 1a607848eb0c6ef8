//! Helpers shared by the integration tests: paths, the example library, running the built
//! binary, scratch folders, and a small deterministic random generator (the same data on
//! every machine).

#![allow(dead_code)]

pub mod corpus;
#[path = "files.rs"]
mod files;

use std::path::PathBuf;
use std::process::{Command, Output};

/// The repository root.
pub fn root() -> PathBuf {
    files::root_from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `examples/*.metric`, sorted: adding a file there adds it to every suite.
pub fn examples() -> Vec<PathBuf> {
    files::metric_files(&root().join("examples"))
}

/// An example's path as a string argument.
pub fn example(name: &str) -> String {
    root().join("examples").join(name).display().to_string()
}

/// Run the built `losscc` binary.
pub fn losscc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_losscc")).args(args).output().expect("run losscc")
}

/// The path of the built `losscc` binary.
pub fn losscc_path() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_losscc"))
}

/// A fresh, empty folder for one test (`suite` and `name` keep tests apart, the process id
/// keeps concurrent runs apart).
pub fn scratch(suite: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("losscc-{suite}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    dir
}

/// A process's stderr (or stdout) as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// xorshift64: uniform numbers in [0, 1).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Blocky volume labels `[N, D, H, W]` for `C` classes: blocks of `depth × rows × columns`
/// voxels (class `z/depth + y/rows + 2·(x/columns) + image`), a tenth of the voxels drawn
/// as ignored (255) from `rng`.
pub fn volume_labels(rng: &mut Rng, [n, c, d, h, w]: [i64; 5], [depth, rows, columns]: [i64; 3]) -> tch::Tensor {
    let labels: Vec<i64> = (0..n * d * h * w)
        .map(|i| {
            let (z, y, x) = ((i / (h * w)) % d, (i / w) % h, i % w);
            if rng.next() < 0.1 {
                255
            } else {
                (z / depth + y / rows + 2 * (x / columns) + i / (d * h * w)) % c
            }
        })
        .collect();
    tch::Tensor::from_slice(&labels).view([n, d, h, w])
}
