//! The search's journal: `OUT/history.jsonl`, the single source of truth for `--resume`.
//!
//! One JSON object per line, appended and flushed as it happens:
//! * a finished candidate ([`Candidate`]: `round`, `sample`, `u`, `control_points`, a numeric
//!   `reward`, where and when it ran);
//! * a candidate that failed every attempt ([`Failed`]: `"failed": true`, the reason and the
//!   tail of its stderr);
//! * a Slurm job array submitted for a round ([`Submitted`]: `"event": "slurm_array"`, the job
//!   id and the attempts it runs), so that `--resume` reattaches to a job still running.
//!
//! A torn last line (a kill mid-write) is cut when the journal is read.

use crate::run::SearchError;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One finished candidate.
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
    /// Where it ran: the host, the device, and the executor (`local` or `slurm`).
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub device: String,
    #[serde(default)]
    pub executor: String,
    /// Attempts it took (1 unless a failed attempt was retried).
    #[serde(default = "one")]
    pub attempts: usize,
    /// When the attempt that finished started and ended (seconds since the Unix epoch).
    #[serde(default)]
    pub started: f64,
    #[serde(default)]
    pub finished: f64,
}

fn one() -> usize {
    1
}

/// A candidate that failed every attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Failed {
    pub round: usize,
    pub sample: usize,
    pub u: Vec<f64>,
    pub control_points: Vec<Vec<f64>>,
    /// Always `true`: tells failed lines from finished ones.
    pub failed: bool,
    /// Why the last attempt failed, in a sentence.
    pub reason: String,
    /// The end of the last attempt's stderr.
    pub stderr_tail: String,
    pub attempts: usize,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub executor: String,
}

/// A Slurm job array submitted for (some attempts of) a round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Submitted {
    /// Always `slurm_array`.
    pub event: String,
    pub round: usize,
    pub job: String,
    /// `(sample, attempt folder)` of each array task, in task order.
    pub tasks: Vec<(usize, PathBuf)>,
    /// When `sbatch` returned (seconds since the Unix epoch).
    pub submitted: f64,
}

/// One line of the journal.
#[derive(Clone, Debug, PartialEq)]
pub enum Entry {
    Finished(Candidate),
    Failed(Failed),
    Submitted(Submitted),
}

impl Entry {
    fn to_line(&self) -> String {
        let value = match self {
            Entry::Finished(candidate) => serde_json::to_string(candidate),
            Entry::Failed(failed) => serde_json::to_string(failed),
            Entry::Submitted(submitted) => serde_json::to_string(submitted),
        };
        value.expect("journal entries serialize")
    }

    fn from_line(line: &str) -> Option<Entry> {
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        if value.get("event").and_then(|e| e.as_str()) == Some("slurm_array") {
            serde_json::from_value(value).ok().map(Entry::Submitted)
        } else if value.get("failed").and_then(|f| f.as_bool()) == Some(true) {
            serde_json::from_value(value).ok().map(Entry::Failed)
        } else {
            serde_json::from_value(value).ok().map(Entry::Finished)
        }
    }
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
    /// The folder of one candidate: `candidates/<round>-<sample>`, numbered as in the journal.
    pub fn candidate(&self, round: usize, sample: usize) -> PathBuf {
        self.dir.join("candidates").join(format!("{round}-{sample}"))
    }
    /// The folder of a round's job arrays (scripts and Slurm's output files).
    pub fn round(&self, round: usize) -> PathBuf {
        self.dir.join("rounds").join(round.to_string())
    }
}

pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SearchError + '_ {
    move |error| SearchError::Io { path: path.display().to_string(), error }
}

/// Read the journal of an earlier run, `(line number, entry)` each. A torn last line (a kill
/// mid-write) is cut off the file, so that new lines start clean.
pub(crate) fn read(path: &Path) -> Result<Vec<(usize, Entry)>, SearchError> {
    let mut text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(io_error(path)(error)),
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.truncate(text.rfind('\n').map_or(0, |end| end + 1));
        std::fs::write(path, &text).map_err(io_error(path))?;
    }
    Ok(text.lines().enumerate().filter_map(|(index, line)| Entry::from_line(line).map(|e| (index + 1, e))).collect())
}

/// The journal, open for appending.
pub(crate) struct Journal {
    path: PathBuf,
    file: std::fs::File,
}

impl Journal {
    pub(crate) fn open(path: &Path) -> Result<Journal, SearchError> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(io_error(path))?;
        Ok(Journal { path: path.to_path_buf(), file })
    }

    /// Append one entry and flush it to the file before returning.
    pub(crate) fn append(&mut self, entry: &Entry) -> Result<(), SearchError> {
        writeln!(self.file, "{}", entry.to_line()).and_then(|_| self.file.flush()).map_err(io_error(&self.path))
    }
}
