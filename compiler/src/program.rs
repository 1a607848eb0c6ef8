//! Loading a metric program: the main file plus the files it `use`s, parsed, each kept
//! with its text so diagnostics can be rendered against the right source.
//!
//! The entry definition of a program is the last `metric` or `loss` of the main file.
//! `use` paths are relative to the file that names them and are followed transitively;
//! each file is loaded once, so cycles end.

use crate::check::FileDiagnostics;
use grammar::ast::{self, Item};
use grammar::Diagnostic;
use std::path::{Path, PathBuf};

/// Index of a file in a [`Program`]; 0 is the main file.
pub type SourceId = usize;

/// One parsed source file.
#[derive(Debug)]
pub struct SourceFile {
    /// The name diagnostics show (the path as given).
    pub name: String,
    pub text: String,
    pub ast: ast::File,
}

/// A loaded file's name and text, as recorded for provenance.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceRecord {
    pub name: String,
    pub text: String,
}

/// The main file and the files it uses.
#[derive(Debug)]
pub struct Program {
    files: Vec<SourceFile>,
}

/// Why a program could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    /// A file could not be read.
    Io { path: PathBuf, error: std::io::Error },
    /// Syntax errors, per file.
    Syntax(Vec<(String, String, Vec<Diagnostic>)>),
}

impl Program {
    /// Parse `text` as the main file, reading `use`d files relative to `base_dir`.
    pub fn from_source(name: &str, text: String, base_dir: Option<&Path>) -> Result<Program, LoadError> {
        let mut syntax_errors = Vec::new();
        let main = match grammar::parse(&text) {
            Ok(ast) => SourceFile { name: name.to_string(), text, ast },
            Err(diagnostics) => {
                syntax_errors.push((name.to_string(), text, diagnostics));
                return Err(LoadError::Syntax(syntax_errors));
            }
        };
        // Follow `use` items breadth-first, each relative to the file that names it; a file
        // reached twice (or a cycle) is loaded once.
        let mut files = vec![main];
        let mut directories: Vec<Option<PathBuf>> = vec![base_dir.map(Path::to_path_buf)];
        let mut seen: Vec<PathBuf> = Vec::new();
        let mut next = 0;
        while next < files.len() {
            let uses: Vec<ast::UseItem> = files[next]
                .ast
                .items
                .iter()
                .filter_map(|item| match item {
                    Item::Use(use_item) => Some(use_item.clone()),
                    _ => None,
                })
                .collect();
            let directory = directories[next].clone();
            for use_item in uses {
                let path = match &directory {
                    Some(dir) => dir.join(&use_item.path),
                    None => PathBuf::from(&use_item.path),
                };
                let key = path.canonicalize().unwrap_or_else(|_| path.clone());
                if seen.contains(&key) {
                    continue;
                }
                seen.push(key);
                let text = match std::fs::read(&path) {
                    Ok(bytes) => bytes,
                    Err(error) => {
                        let diagnostic = Diagnostic::error(
                            "E0101",
                            format!("cannot read `{}`: {error}", path.display()),
                            use_item.path_span,
                            "used here",
                        )
                        .with_help("`use` paths are relative to the file that names them");
                        let user = &files[next];
                        syntax_errors.push((user.name.clone(), user.text.clone(), vec![diagnostic]));
                        continue;
                    }
                };
                let display = path.display().to_string();
                let lossy = String::from_utf8_lossy(&text).into_owned();
                match grammar::parser::parse_bytes(&text) {
                    Ok(ast) => {
                        files.push(SourceFile { name: display, text: lossy, ast });
                        directories.push(path.parent().map(Path::to_path_buf));
                    }
                    Err(diagnostics) => syntax_errors.push((display, lossy, diagnostics)),
                }
            }
            next += 1;
        }
        if syntax_errors.is_empty() {
            Ok(Program { files })
        } else {
            Err(LoadError::Syntax(syntax_errors))
        }
    }

    /// Read and parse the file at `path` and what it uses.
    pub fn load(path: &Path) -> Result<Program, LoadError> {
        let bytes = std::fs::read(path).map_err(|error| LoadError::Io { path: path.to_path_buf(), error })?;
        let name = path.display().to_string();
        let text = match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(error) => {
                let bytes = error.into_bytes();
                let diagnostics = grammar::parser::parse_bytes(&bytes).err().unwrap_or_default();
                return Err(LoadError::Syntax(vec![(name, String::from_utf8_lossy(&bytes).into_owned(), diagnostics)]));
            }
        };
        Program::from_source(&name, text, path.parent())
    }

    pub fn files(&self) -> impl Iterator<Item = (SourceId, &SourceFile)> {
        self.files.iter().enumerate()
    }

    /// Every loaded file's name and text, the main file first: what compiled artifacts (ONNX
    /// metadata, a search's configuration) record, so that a change to any used file is noticed.
    pub fn sources(&self) -> Vec<SourceRecord> {
        self.files.iter().map(|f| SourceRecord { name: f.name.clone(), text: f.text.clone() }).collect()
    }

    pub fn file(&self, id: SourceId) -> &SourceFile {
        &self.files[id]
    }

    pub fn main(&self) -> &SourceFile {
        &self.files[0]
    }

    /// The entry definition: the last `metric` or `loss` of the main file.
    pub fn entry(&self) -> Option<(&ast::Definition, bool)> {
        self.files[0].ast.items.iter().rev().find_map(|item| match item {
            Item::Metric(definition) => Some((definition, false)),
            Item::Loss(definition) => Some((definition, true)),
            Item::Use(_) => None,
        })
    }

    /// A metric by name: the main file's first, then used files in order.
    pub fn find_metric(&self, name: &str) -> Option<&ast::Definition> {
        self.find_metric_with_source(name).map(|(definition, _)| definition)
    }

    pub fn find_metric_with_source(&self, name: &str) -> Option<(&ast::Definition, SourceId)> {
        self.files.iter().enumerate().find_map(|(id, file)| {
            file.ast.items.iter().find_map(|item| match item {
                Item::Metric(definition) if definition.name.name == name => Some((definition, id)),
                _ => None,
            })
        })
    }

    pub fn metric_names(&self) -> Vec<String> {
        self.files
            .iter()
            .flat_map(|file| file.ast.items.iter())
            .filter_map(|item| match item {
                Item::Metric(definition) => Some(definition.name.name.clone()),
                _ => None,
            })
            .collect()
    }

    /// Render diagnostics of one file.
    pub fn render(&self, diagnostics: &FileDiagnostics, color: bool) -> String {
        let file = self.file(diagnostics.source);
        grammar::render(&diagnostics.diagnostics, &file.name, &file.text, color)
    }
}
