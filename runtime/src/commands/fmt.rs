//! `losscc fmt FILE [--check | --write]`: the canonical layout of a metric file.

use super::color;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    file: PathBuf,
    /// Exit with 1 if the file is not formatted, printing nothing.
    #[arg(long)]
    check: bool,
    /// Rewrite the file in place.
    #[arg(long, conflicts_with = "check")]
    write: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let program = match compiler::program::Program::load(&args.file) {
        Ok(program) => program,
        Err(error) => {
            eprint!("{}", compiler::Failure::from(error).render(color()));
            return Ok(ExitCode::from(1));
        }
    };
    let formatted = grammar::format_file(&program.main().ast);
    if args.check {
        return Ok(if formatted == program.main().text { ExitCode::SUCCESS } else { ExitCode::from(1) });
    }
    if args.write {
        std::fs::write(&args.file, &formatted).with_context(|| format!("cannot write `{}`", args.file.display()))?;
    } else {
        print!("{formatted}");
    }
    Ok(ExitCode::SUCCESS)
}
