//! `losscc task FOLDER`: run one attempt of a search's candidate — what the local and Slurm
//! executors start for every attempt. Reads `FOLDER/task.json` and the search's
//! `config.json`, writes `FOLDER/outcome.json`, and prints `losscc-progress STEP TOTAL` lines
//! on stdout while the proxy network trains. Exit status 0 when the attempt produced a
//! reward, 1 otherwise (the reason is in `outcome.json` and on stderr).

use anyhow::Result;
use losscc_search::task::{self, PROGRESS_PREFIX};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// The attempt's folder (`OUT/candidates/<round>-<sample>/attempt-<k>`).
    folder: PathBuf,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let stdout = std::io::stdout();
    let mut on_step = |step: usize, total: usize| {
        let mut out = stdout.lock();
        let _ = writeln!(out, "{PROGRESS_PREFIX} {step} {total}");
        let _ = out.flush();
    };
    let outcome = task::run(&args.folder, &mut on_step)?;
    match (outcome.reward, outcome.reason) {
        (Some(_), _) => Ok(ExitCode::SUCCESS),
        (None, reason) => {
            eprintln!("error: {}", reason.unwrap_or_else(|| "the attempt failed".into()));
            if !outcome.stderr_tail.trim().is_empty() {
                eprintln!("{}", outcome.stderr_tail.trim_end());
            }
            Ok(ExitCode::from(1))
        }
    }
}
