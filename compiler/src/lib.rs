//! The losscc compiler: from a parsed metric program to an exact IR module (the metric on
//! argmax predictions) and a relaxed IR module (the differentiable surrogate) with its curve
//! manifest. It has no libtorch dependency, so it builds and tests fast.
//!
//! Stages, each a function with a printable output:
//! 1. [`program::Program::load`] — parse the file and the files it `use`s;
//! 2. [`check::check_program`] — kinds of every expression, every error reported;
//! 3. [`lower::lower`] — parameters bound, exact IR built with CSE;
//! 4. [`relax::relax`] — curves inserted by the published rule, manifest made;
//! 5. [`validate::validate`] — IR invariants, run when an [`ExactModule`] or a
//!    [`RelaxedModule`] is made, so back ends only ever see valid modules of the right mode;
//! 6. [`grad::differentiate`] — reverse mode over the relaxed module: the gradient program
//!    that the ONNX gradient graph is emitted from.
//!
//! Architecture invariant: this crate knows nothing of tensors. Back ends (tch in
//! `runtime/`, ONNX in [`onnx`]) interpret the closed [`ir::Node`] enum.

pub mod accumulate;
pub mod analysis;
pub mod check;
pub mod curve;
pub mod grad;
pub mod ir;
pub mod lower;
pub mod modules;
pub mod onnx;
pub mod params;
pub mod print;
pub mod program;
pub mod relax;
pub mod validate;

use check::FileDiagnostics;
use lower::{LowerError, ParamValue};
pub use modules::{ExactModule, RelaxedModule};
use program::{LoadError, Program};
use relax::Manifest;
use std::collections::BTreeMap;
use std::path::Path;

/// A metric compiled both ways.
#[derive(Debug)]
pub struct Compiled {
    pub program: Program,
    pub exact: ExactModule,
    pub relaxed: RelaxedModule,
    /// The parameter values used (defaults with overrides applied).
    pub params: BTreeMap<String, ParamValue>,
}

impl Compiled {
    /// The relaxed module's curves.
    pub fn manifest(&self) -> &Manifest {
        self.relaxed.manifest()
    }
}

/// Why compilation failed; [`Failure::render`] turns it into user-facing text.
#[derive(Debug)]
pub enum Failure {
    Io(String),
    /// Diagnostics per file: `(file name, source text, diagnostics)`.
    Diagnostics(Vec<(String, String, Vec<grammar::Diagnostic>)>),
    /// A one-sentence problem without a source location (e.g. a bad `--set`).
    Message(String),
}

impl Failure {
    /// Render for a terminal.
    pub fn render(&self, color: bool) -> String {
        match self {
            Failure::Io(message) | Failure::Message(message) => format!("error: {message}\n"),
            Failure::Diagnostics(files) => files
                .iter()
                .map(|(name, text, diagnostics)| grammar::render(diagnostics, name, text, color))
                .collect::<Vec<_>>()
                .join(""),
        }
    }

    /// Number of diagnostics (1 for a plain message).
    pub fn count(&self) -> usize {
        match self {
            Failure::Diagnostics(files) => files.iter().map(|(_, _, d)| d.len()).sum(),
            _ => 1,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.render(false).trim_end())
    }
}

impl std::error::Error for Failure {}

impl From<LoadError> for Failure {
    fn from(error: LoadError) -> Failure {
        from_load(error)
    }
}

fn from_load(error: LoadError) -> Failure {
    match error {
        LoadError::Io { path, error } => Failure::Io(format!(
            "cannot read `{}`: {error}; check the path and that the file is readable.",
            path.display()
        )),
        LoadError::Syntax(files) => Failure::Diagnostics(files),
    }
}

fn from_files(program: &Program, files: Vec<FileDiagnostics>) -> Failure {
    Failure::Diagnostics(
        files
            .into_iter()
            .map(|f| {
                let file = program.file(f.source);
                (file.name.clone(), file.text.clone(), f.diagnostics)
            })
            .collect(),
    )
}

/// Load and type-check a file (what `losscc check` does before lowering).
pub fn load_checked(path: &Path) -> Result<Program, Failure> {
    let program = Program::load(path).map_err(from_load)?;
    let errors = check::check_program(&program);
    if !errors.is_empty() {
        return Err(from_files(&program, errors));
    }
    Ok(program)
}

/// Compile a checked program with `--set` overrides.
pub fn compile_program(program: Program, overrides: &[(String, String)]) -> Result<Compiled, Failure> {
    let exact = match lower::lower(&program, overrides) {
        Ok(module) => module,
        Err(LowerError::NoEntry) => return Err(Failure::Message("the file defines no metric or loss.".into())),
        Err(LowerError::Param(message)) => return Err(Failure::Message(message)),
        Err(LowerError::Diagnostics(files)) => return Err(from_files(&program, files)),
    };
    let params = program
        .entry()
        .map(|(definition, _)| lower::resolve_params(definition, overrides))
        .transpose()
        .map_err(|_| Failure::Message("parameters could not be resolved.".into()))?
        .unwrap_or_default();
    let internal = |invalid: modules::Invalid| {
        Failure::Message(format!(
            "internal error: {invalid}; this is a bug in losscc, please report it with the metric file."
        ))
    };
    let exact = ExactModule::new(exact).map_err(internal)?;
    let relaxed = relax::relax(&exact).map_err(internal)?;
    Ok(Compiled { program, exact, relaxed, params })
}

/// Lower every definition of the main file with its default parameters, so that errors
/// that need parameter values (class ranges, radii) are found in definitions other than the
/// entry too. The entry is lowered by [`compile_program`] with the user's overrides.
pub fn check_other_definitions(program: &Program) -> Result<(), Failure> {
    let entry_span = program.entry().map(|(definition, _)| definition.span);
    let mut files = Vec::new();
    for item in &program.main().ast.items {
        let (definition, is_loss) = match item {
            grammar::ast::Item::Metric(definition) => (definition, false),
            grammar::ast::Item::Loss(definition) => (definition, true),
            grammar::ast::Item::Use(_) => continue,
        };
        if Some(definition.span) == entry_span {
            continue;
        }
        if let Err(LowerError::Diagnostics(found)) = lower::lower_definition(program, definition, is_loss, &[]) {
            files.extend(found);
        }
    }
    if files.is_empty() {
        Ok(())
    } else {
        Err(from_files(program, files))
    }
}

/// Load, check and compile a file.
pub fn compile_file(path: &Path, overrides: &[(String, String)]) -> Result<Compiled, Failure> {
    compile_program(load_checked(path)?, overrides)
}

/// Compile source text (no `use` resolution beyond the current directory).
pub fn compile_source(name: &str, text: &str, overrides: &[(String, String)]) -> Result<Compiled, Failure> {
    let program = Program::from_source(name, text.to_string(), None).map_err(from_load)?;
    let errors = check::check_program(&program);
    if !errors.is_empty() {
        return Err(from_files(&program, errors));
    }
    compile_program(program, overrides)
}
