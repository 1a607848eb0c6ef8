//! The search's journal: `OUT/history.jsonl`, one line per finished candidate, appended and
//! flushed as each finishes; the single source of truth for `--resume`. A torn last line (a
//! kill mid-write) is cut when the journal is read.

use crate::run::SearchError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One finished candidate: one line of `history.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub round: usize,
    pub sample: usize,
    /// The search variables in [0,1].
    pub u: Vec<f64>,
    /// The candidate's curves, flat control points per curve (manifest order).
    pub control_points: Vec<Vec<f64>>,
    pub reward: f64,
    pub seconds: f64,
}


/// Where a search writes.
pub struct Paths {
    pub dir: PathBuf,
}

impl Paths {
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    pub fn history(&self) -> PathBuf {
        self.dir.join("history.jsonl")
    }
    pub fn best(&self) -> PathBuf {
        self.dir.join("best.params.json")
    }
    pub fn mu(&self) -> PathBuf {
        self.dir.join("mu.params.json")
    }
    pub fn report(&self) -> PathBuf {
        self.dir.join("report.md")
    }
}

pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SearchError + '_ {
    move |error| SearchError::Io { path: path.display().to_string(), error }
}

/// Read the finished candidates of an earlier run. A torn last line (a kill mid-write) is
/// cut off the file, so that new lines start clean.
pub(crate) fn read_history(path: &Path) -> Result<Vec<(usize, Candidate)>, SearchError> {
    let mut text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(io_error(path)(error)),
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.truncate(text.rfind('\n').map_or(0, |end| end + 1));
        std::fs::write(path, &text).map_err(io_error(path))?;
    }
    Ok(text
        .lines()
        .enumerate()
        .filter_map(|(index, line)| serde_json::from_str::<Candidate>(line).ok().map(|c| (index + 1, c)))
        .collect())
}

