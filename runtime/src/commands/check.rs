//! `losscc check FILE... [--emit ast|ir|relaxed|grad]`: parse and type-check metric files, print
//! diagnostics with source positions, and optionally a stage's output.

use super::{color, Reported};
use crate::args::parse_sets;
use anyhow::Result;
use clap::ValueEnum;
use compiler::ir::RootKind;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Copy, Clone, ValueEnum)]
pub enum Emit {
    /// The syntax tree, with spans.
    Ast,
    /// The exact IR (the metric on argmax predictions).
    Ir,
    /// The relaxed IR (the surrogate) and its curve manifest.
    Relaxed,
    /// The gradient program: reverse mode over the relaxed IR (what `compile --grad` emits).
    Grad,
}

#[derive(clap::Args)]
pub struct Args {
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Print a stage's output for each file.
    #[arg(long, value_enum)]
    emit: Option<Emit>,
    /// Parameter overrides, `NAME=VALUE`.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let overrides = parse_sets(&args.set)?;
    let mut failed = 0;
    for file in &args.files {
        if check_one(file, args.emit, overrides.pairs()).is_err() {
            failed += 1;
        }
    }
    if failed > 0 {
        eprintln!("{failed} of {} files failed to check", args.files.len());
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

fn check_one(file: &Path, emit: Option<Emit>, overrides: &[(String, String)]) -> Result<(), Reported> {
    if let Some(Emit::Ast) = emit {
        match compiler::program::Program::load(file) {
            Ok(program) => print!("{}", grammar::dump::dump_file(&program.main().ast)),
            Err(error) => {
                eprint!("{}", compiler::Failure::from(error).render(color()));
                return Err(Reported);
            }
        }
    }
    let checked = compiler::load_checked(file).and_then(|program| {
        compiler::check_other_definitions(&program)?;
        compiler::compile_program(program, overrides)
    });
    match checked {
        Ok(compiled) => {
            match emit {
                Some(Emit::Ir) => print!("{}", compiler::print::dump(&compiled.exact, None)),
                Some(Emit::Relaxed) => {
                    print!("{}", compiler::print::dump(&compiled.relaxed, Some(compiled.manifest())))
                }
                Some(Emit::Grad) => match compiler::grad::differentiate(&compiled.relaxed) {
                    Ok(program) => print!("{}", compiler::grad::dump(&program, &compiled.relaxed)),
                    Err(error) => {
                        eprintln!("error: {error}");
                        return Err(Reported);
                    }
                },
                Some(Emit::Ast) | None => {}
            }
            let curves: Vec<&str> = compiled.manifest().curves.iter().map(|c| c.name.as_str()).collect();
            eprintln!(
                "ok: {} ({} `{}`, {} curve{}: {})",
                file.display(),
                match compiled.exact.root_kind {
                    RootKind::Metric => "metric",
                    RootKind::Loss => "loss",
                },
                compiled.exact.name,
                curves.len(),
                if curves.len() == 1 { "" } else { "s" },
                if curves.is_empty() { "none".to_string() } else { curves.join(", ") }
            );
            Ok(())
        }
        Err(failure) => {
            eprint!("{}", failure.render(color()));
            Err(Reported)
        }
    }
}
