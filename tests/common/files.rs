//! Paths every test suite shares, with no dependency beyond std, so that the grammar and
//! compiler test crates include this file too (`#[path]`): the repository root and the walk
//! over `examples/*.metric` exist once.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The repository root (every test crate's manifest is one level below it, or two for the
/// runtime's packages, which pass their own depth).
pub fn root_from(manifest_dir: &str) -> PathBuf {
    let mut dir = Path::new(manifest_dir).to_path_buf();
    while !dir.join("examples").is_dir() {
        if !dir.pop() {
            panic!("no examples/ above {manifest_dir}");
        }
    }
    dir
}

/// Every `*.metric` file of `dir`, sorted.
pub fn metric_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "metric"))
        .collect();
    files.sort();
    files
}
