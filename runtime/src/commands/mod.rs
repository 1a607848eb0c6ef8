//! One module per command; this file has what several share: loading a loss with its
//! diagnostics rendered, the marker for already reported failures, JSON numbers.

pub mod bench;
pub mod check;
pub mod compile;
pub mod eval;
pub mod fmt;
pub mod search;
pub mod task;
pub mod train;

use anyhow::Result;
use losscc_loss::{Loss, LossError, Overrides};
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::path::Path;

/// A failure whose diagnostics were already printed: exit code 1, nothing more to say.
#[derive(Debug)]
pub struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reported")
    }
}

impl std::error::Error for Reported {}

/// Whether diagnostics on stderr get colour.
pub fn color() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Compile a metric and load its curves, rendering diagnostics for the user.
pub fn load_loss(file: &Path, overrides: &Overrides, params: Option<&Path>) -> Result<Loss> {
    let mut loss = match Loss::from_file(file, overrides) {
        Ok(loss) => loss,
        Err(LossError::Compile(failure)) => {
            eprint!("{}", failure.render(color()));
            return Err(Reported.into());
        }
        Err(other) => return Err(other.into()),
    };
    if let Some(params) = params {
        loss.load_params(params)?;
    }
    Ok(loss)
}

/// A number for JSON output: `null` when not finite (an undefined metric).
pub fn json_number(value: f64) -> Value {
    if value.is_finite() {
        json!(value)
    } else {
        Value::Null
    }
}
