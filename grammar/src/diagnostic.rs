//! Diagnostics as plain data, and the one place that turns them into text.
//!
//! Every stage of losscc reports problems as [`Diagnostic`] values: a severity, a stable
//! code, a message, a primary [`Label`] pointing at the offending source text, optional
//! secondary labels, notes and a help line. Nothing is printed where a problem is found;
//! the driver collects diagnostics and calls [`render`] once, which draws them with
//! `codespan-reporting` in the familiar rustc layout:
//!
//! ```text
//! error[E0001]: expected `;` after the value of `let x`
//!   --> model.metric:3:14
//!   |
//! 3 |     let x = a
//!   |              ^ expected `;` here
//!   |
//!   = help: `let` bindings end with `;`
//! ```
//!
//! Guarantees: rendering never panics, whatever the spans. A span that runs past the end of
//! the source, starts after it ends, or cuts a multi-byte character is clamped to the
//! nearest valid range before it reaches `codespan-reporting` (which would otherwise
//! panic on a bad slice).
//!
//! Codes `E00xx` are reserved for this crate (syntax); see [`codes`]. Later stages use
//! their own ranges so a code alone tells which stage complained.

use std::fmt;
use std::ops::Range;

use codespan_reporting::diagnostic as cs;
use codespan_reporting::files::SimpleFile;
use codespan_reporting::term::{self, termcolor::Buffer};
use serde::Serialize;

use crate::ast::Span;

/// The diagnostic codes this crate emits. Each names one family of syntax problem.
pub mod codes {
    /// An unexpected token, a missing token, or text that fits no rule of the grammar.
    pub const SYNTAX: &str = "E0001";
    /// A `(`, `[`, `{` or `"` that is never closed.
    pub const UNCLOSED: &str = "E0002";
    /// A number literal that is malformed or does not fit its type.
    pub const LITERAL: &str = "E0003";
    /// An expression nested more deeply than the parser allows.
    pub const TOO_DEEP: &str = "E0004";
    /// The file is not valid UTF-8.
    pub const ENCODING: &str = "E0005";
    /// The file defines no metric and no loss.
    pub const EMPTY: &str = "E0006";
    /// `a < b < c`: comparisons do not chain.
    pub const CHAINED_COMPARISON: &str = "E0007";
    /// A keyword used where a name is required.
    pub const KEYWORD_AS_NAME: &str = "E0008";
    /// Parsing stopped because the file has too many errors to be worth reporting all.
    pub const TOO_MANY_ERRORS: &str = "E0009";
}

/// How serious a diagnostic is. Errors stop compilation; warnings do not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Severity {
    Error,
    Warning,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        })
    }
}

/// A span of source text and what to say about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Label {
    pub span: Span,
    pub message: String,
}

impl Label {
    pub fn new(span: Span, message: impl Into<String>) -> Label {
        Label { span, message: message.into() }
    }
}

/// One problem found in a source file, as data.
///
/// Build one with [`Diagnostic::error`] or [`Diagnostic::warning`] and the `with_*`
/// helpers; draw any number of them with [`render`].
#[derive(Clone, Debug, PartialEq, Serialize, thiserror::Error)]
#[error("{severity}[{code}]: {message}")]
pub struct Diagnostic {
    pub severity: Severity,
    /// A stable identifier such as `"E0001"` (see [`codes`]).
    pub code: &'static str,
    /// The headline: what is wrong, in one sentence without a trailing period.
    pub message: String,
    /// The place the problem is; its message says what is wrong right there.
    pub primary: Label,
    /// Related places (for example the `(` that a missing `)` should close).
    pub secondary: Vec<Label>,
    /// Background facts, each rendered as `= note: ...`.
    pub notes: Vec<String>,
    /// What to do about it, rendered as `= help: ...`.
    pub help: Option<String>,
}

impl Diagnostic {
    /// An error with its primary label.
    pub fn error(code: &'static str, message: impl Into<String>, span: Span, label: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            code,
            message: message.into(),
            primary: Label::new(span, label),
            secondary: Vec::new(),
            notes: Vec::new(),
            help: None,
        }
    }

    /// A warning with its primary label.
    pub fn warning(code: &'static str, message: impl Into<String>, span: Span, label: impl Into<String>) -> Diagnostic {
        Diagnostic { severity: Severity::Warning, ..Diagnostic::error(code, message, span, label) }
    }

    /// Adds a secondary label.
    pub fn with_secondary(mut self, span: Span, message: impl Into<String>) -> Diagnostic {
        self.secondary.push(Label::new(span, message));
        self
    }

    /// Adds a `= note: ...` line.
    pub fn with_note(mut self, note: impl Into<String>) -> Diagnostic {
        self.notes.push(note.into());
        self
    }

    /// Sets the `= help: ...` line (a later call replaces an earlier one).
    pub fn with_help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }

    /// Whether this diagnostic stops compilation.
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// Every label, primary first.
    pub fn labels(&self) -> impl Iterator<Item = &Label> {
        std::iter::once(&self.primary).chain(self.secondary.iter())
    }
}

/// Draws `diagnostics` against one source file, rustc style, as a single string.
///
/// Each diagnostic shows `file:line:column`, the source lines with carets under the
/// labelled spans, then its notes and help. With `color`, the text carries ANSI escapes.
/// Spans are clamped to the source first, so any span (past the end, inside a multi-byte
/// character, on an empty file) renders without panicking.
///
/// To render diagnostics of [`crate::parser::parse_bytes`] on a file that is not UTF-8,
/// pass `String::from_utf8_lossy(bytes)` as `source`: the reported offset is that of the
/// first invalid byte, which the lossy conversion leaves in place.
pub fn render(diagnostics: &[Diagnostic], file_name: &str, source: &str, color: bool) -> String {
    let file = SimpleFile::new(file_name, source);
    let config = term::Config { chars: term::Chars::ascii(), ..term::Config::default() };
    let mut buffer = if color { Buffer::ansi() } else { Buffer::no_color() };
    let mut fallback = String::new();
    for diagnostic in diagnostics {
        let converted = to_codespan(diagnostic, source);
        if term::emit(&mut buffer, &config, &file, &converted).is_err() {
            // `codespan-reporting` only fails on ranges it cannot map, which clamping rules
            // out; a plain line still tells the user what and where if it ever happens.
            let (line, column) = line_col(source, diagnostic.primary.span.start);
            fallback.push_str(&format!("{diagnostic}\n  --> {file_name}:{line}:{column}\n"));
        }
    }
    let mut text = String::from_utf8_lossy(buffer.as_slice()).into_owned();
    text.push_str(&fallback);
    text
}

fn to_codespan(diagnostic: &Diagnostic, source: &str) -> cs::Diagnostic<()> {
    let severity = match diagnostic.severity {
        Severity::Error => cs::Severity::Error,
        Severity::Warning => cs::Severity::Warning,
    };
    let mut labels =
        vec![cs::Label::primary((), clamp(diagnostic.primary.span, source))
            .with_message(diagnostic.primary.message.clone())];
    labels.extend(
        diagnostic
            .secondary
            .iter()
            .map(|label| cs::Label::secondary((), clamp(label.span, source)).with_message(label.message.clone())),
    );
    let mut notes: Vec<String> = diagnostic.notes.iter().map(|note| format!("note: {note}")).collect();
    if let Some(help) = &diagnostic.help {
        notes.push(format!("help: {help}"));
    }
    cs::Diagnostic::new(severity)
        .with_code(diagnostic.code)
        .with_message(diagnostic.message.clone())
        .with_labels(labels)
        .with_notes(notes)
}

/// The largest valid byte range of `source` inside `span`: ends clamped to the source
/// length, the start moved back and the end moved forward to character boundaries.
pub fn clamp(span: Span, source: &str) -> Range<usize> {
    let end = ceil_char_boundary(source, span.end);
    let start = floor_char_boundary(source, span.start.min(end));
    start..end
}

fn floor_char_boundary(source: &str, mut offset: usize) -> usize {
    offset = offset.min(source.len());
    while !source.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

fn ceil_char_boundary(source: &str, mut offset: usize) -> usize {
    offset = offset.min(source.len());
    while !source.is_char_boundary(offset) {
        offset += 1;
    }
    offset
}

/// The 1-based line and column (counted in characters) of byte `offset` in `source`.
///
/// An offset past the end counts as the end; one inside a multi-byte character counts as
/// the start of that character. This matches the `file:line:column` that [`render`] prints.
pub fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = floor_char_boundary(source, offset);
    let before = &source[..offset];
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let line = before.bytes().filter(|&byte| byte == b'\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// The candidate closest to `name`, if one is close enough to be a plausible typo.
///
/// A candidate that differs only in letter case always qualifies. Otherwise the
/// Levenshtein distance must be at most a third of the name's length (at least one edit),
/// and smaller than the name itself, so that `Q` does not suggest `P`. Ties go to the
/// earliest candidate, so callers should list the most likely names first. A candidate
/// equal to `name` is never suggested.
pub fn suggest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let length = name.chars().count();
    let allowed = (length / 3).max(1);
    let mut best: Option<(usize, &'a str)> = None;
    for candidate in candidates {
        if candidate == name {
            continue;
        }
        let distance = if candidate.eq_ignore_ascii_case(name) { 0 } else { strsim::levenshtein(name, candidate) };
        let plausible = distance == 0 || (distance <= allowed && distance < length);
        if plausible && best.map_or(true, |(best_distance, _)| distance < best_distance) {
            best = Some((distance, candidate));
        }
    }
    best.map(|(_, candidate)| candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamp_handles_out_of_range_and_multibyte() {
        assert_eq!(clamp(Span::new(5, 9), "abc"), 3..3);
        assert_eq!(clamp(Span::new(2, 1), "abc"), 1..1);
        // `é` is two bytes: a span that cuts it is widened to the whole character.
        assert_eq!(clamp(Span::new(2, 2), "aé"), 1..3);
        assert_eq!(clamp(Span::new(1, 2), "aé"), 1..3);
    }

    #[test]
    fn line_col_is_one_based_and_counts_characters() {
        assert_eq!(line_col("", 0), (1, 1));
        assert_eq!(line_col("ab\ncé d", 7), (2, 4));
        assert_eq!(line_col("ab\n", 100), (2, 1));
    }

    #[test]
    fn suggest_finds_typos_but_not_unrelated_names() {
        let names = ["metric", "loss", "use"];
        assert_eq!(suggest("metrc", names), Some("metric"));
        assert_eq!(suggest("Loss", names), Some("loss"));
        assert_eq!(suggest("banana", names), None);
        assert_eq!(suggest("Q", ["P", "L", "V"]), None);
        assert_eq!(suggest("metric", names), None);
    }

    #[test]
    fn render_survives_spans_past_the_end_of_an_empty_file() {
        let diagnostic = Diagnostic::error(codes::SYNTAX, "boom", Span::new(3, 10), "here")
            .with_secondary(Span::new(0, 0), "and here")
            .with_help("do something");
        let text = render(&[diagnostic], "empty.metric", "", false);
        assert!(text.contains("empty.metric:1:1"), "{text}");
        assert!(text.contains("= help: do something"), "{text}");
    }
}
