//! The `losscc` command line: argument parsing and one module per command. The binary's
//! `main.rs` sets the process up (signals, stack, exit codes) and calls [`run`].
//!
//! Code map:
//! * [`args`] — argument types several commands share (`--set`, the proxy task's options);
//! * [`commands`] — `check`, `fmt`, `eval`, `compile`, `bench`, `train`, `search`, `task`,
//!   one file each;
//! * [`npy`] — `.npy` input and output; [`onnx_runtime`] — running our ONNX graphs in ONNX
//!   Runtime (`ort`, loaded dynamically); [`progress`] — progress bars.
//!
//! This crate is the only one that uses `anyhow`, prints, and chooses exit codes: 0 success;
//! 1 the input is wrong (diagnostics, bad tensors, bad parameters, unreadable files) or
//! `fmt --check` found a difference; 2 the command line itself is wrong (clap's usage errors).

pub mod args;
pub mod commands;
pub mod npy;
pub mod onnx_runtime;
pub mod progress;

use clap::{Parser, Subcommand};
use commands::Reported;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "losscc", version, about = "Compile segmentation metrics into differentiable losses")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and type-check metric files; print diagnostics with source positions.
    Check(commands::check::Args),
    /// Print a file in canonical formatting.
    Fmt(commands::fmt::Args),
    /// Compile to an ONNX loss graph (opset 17) that other frameworks load.
    Compile(commands::compile::Args),
    /// Median forward+backward time of the loss against libtorch cross-entropy.
    Bench(commands::bench::Args),
    /// Train the proxy network with a loss; prints the seven exact metrics (the six published ones and Boundary IoU) on the test split as JSON.
    Train(commands::train::Args),
    /// Search the loss's curves with PPO on the proxy task; writes OUT/best.params.json and a report.
    Search(commands::search::Args),
    /// Evaluate the surrogate loss and the exact metric on saved tensors; prints JSON.
    Eval(commands::eval::Args),
    /// Run one attempt of a search's candidate (what `search`'s executors start).
    Task(commands::task::Args),
}

/// Parse the command line and run the command; errors are printed here, once.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check(args) => commands::check::run(args),
        Command::Fmt(args) => commands::fmt::run(args),
        Command::Compile(args) => commands::compile::run(args),
        Command::Bench(args) => commands::bench::run_command(args),
        Command::Train(args) => commands::train::run(args),
        Command::Search(args) => commands::search::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Task(args) => commands::task::run(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            if error.downcast_ref::<Reported>().is_none() {
                eprintln!("error: {error:#}");
            }
            ExitCode::from(1)
        }
    }
}
