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
//! panic on a bad slice). A source line longer than [`MAX_SHOWN_LINE`] characters is shown
//! cut to a window around its labels, with `…` where text was left out; the
//! `file:line:column` still counts in the whole line.
//!
//! Codes `E00xx` are reserved for this crate (syntax); see [`codes`]. Later stages use
//! their own ranges so a code alone tells which stage complained.

use std::fmt;
use std::ops::Range;

use codespan_reporting::diagnostic as cs;
use codespan_reporting::files::{self as csfiles, Files, SimpleFile};
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
    let long_lines = source.lines().any(|line| line.chars().count() > MAX_SHOWN_LINE);
    for diagnostic in diagnostics {
        let converted = to_codespan(diagnostic, source);
        let emitted = if long_lines {
            let windowed = Windowed::new(file_name, source, &converted);
            let converted = windowed.remap(converted);
            term::emit(&mut buffer, &config, &windowed, &converted)
        } else {
            term::emit(&mut buffer, &config, &file, &converted)
        };
        if emitted.is_err() {
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

/// Lines longer than this many characters are shown cut around their labels.
pub const MAX_SHOWN_LINE: usize = 200;

/// Characters of context kept on each side of the labels of a cut line.
const CONTEXT: usize = 60;

/// How one line of the shown text maps back to the source.
struct LineMap {
    /// Where the line starts in the shown text.
    shown_start: usize,
    /// Where the line starts in the source.
    source_start: usize,
    /// The source byte where the kept window starts, and the bytes of the `…` shown before it.
    window_start: usize,
    marker: usize,
    /// The source byte where the kept window ends.
    window_end: usize,
}

/// The source as shown: lines longer than [`MAX_SHOWN_LINE`] cut to a window around the
/// labels on them (or their start), each cut marked with `…`. Positions in headers are
/// reported in the source's own lines and columns.
struct Windowed<'s> {
    name: &'s str,
    source: &'s str,
    shown: String,
    lines: Vec<LineMap>,
}

impl<'s> Windowed<'s> {
    fn new(name: &'s str, source: &'s str, diagnostic: &cs::Diagnostic<()>) -> Windowed<'s> {
        let mut shown = String::with_capacity(source.len().min(1 << 16));
        let mut lines = Vec::new();
        let mut source_start = 0;
        for line in source.split_inclusive('\n') {
            let body = line.strip_suffix('\n').unwrap_or(line);
            let end = source_start + body.len();
            let mut map = LineMap {
                shown_start: shown.len(),
                source_start,
                window_start: source_start,
                marker: 0,
                window_end: end,
            };
            if body.chars().count() > MAX_SHOWN_LINE {
                // The labels on this line, primary first; the window covers them if it can.
                let mut marks: Vec<(usize, usize)> = diagnostic
                    .labels
                    .iter()
                    .filter(|l| l.range.start <= end && l.range.end >= source_start)
                    .map(|l| (l.range.start.max(source_start), l.range.end.min(end)))
                    .collect();
                if marks.is_empty() {
                    marks.push((source_start, source_start));
                }
                let (first, last) = (marks[0].0, marks[0].1);
                let (low, high) = marks.iter().fold((first, last), |(lo, hi), &(a, b)| (lo.min(a), hi.max(b)));
                let (low, high) = if char_distance(source, low, high) <= MAX_SHOWN_LINE - 2 * CONTEXT {
                    (low, high)
                } else {
                    (first, last.min(advance(source, first, MAX_SHOWN_LINE - 2 * CONTEXT)))
                };
                let window_start = retreat(source, low, CONTEXT).max(source_start);
                let window_end = advance(source, high, CONTEXT).min(end);
                if window_start > source_start {
                    shown.push('…');
                }
                map.marker = shown.len() - map.shown_start;
                shown.push_str(&source[window_start..window_end]);
                if window_end < end {
                    shown.push('…');
                }
                map.window_start = window_start;
                map.window_end = window_end;
            } else {
                shown.push_str(body);
            }
            if line.len() > body.len() {
                shown.push('\n');
            }
            lines.push(map);
            source_start += line.len();
        }
        if lines.is_empty() || source.ends_with('\n') {
            lines.push(LineMap {
                shown_start: shown.len(),
                source_start,
                window_start: source_start,
                marker: 0,
                window_end: source_start,
            });
        }
        Windowed { name, source, shown, lines }
    }

    /// The shown position of source byte `offset` (clamped into its line's window).
    fn to_shown(&self, offset: usize) -> usize {
        let index = self.lines.partition_point(|l| l.source_start <= offset).saturating_sub(1);
        let line = &self.lines[index];
        if line.marker == 0 && line.window_start == line.source_start && line.window_end >= offset {
            return line.shown_start + (offset - line.source_start);
        }
        let inside = offset.clamp(line.window_start, line.window_end);
        line.shown_start + line.marker + (inside - line.window_start)
    }

    /// The source position of shown byte `offset`.
    fn to_source(&self, offset: usize) -> usize {
        let index = self.lines.partition_point(|l| l.shown_start <= offset).saturating_sub(1);
        let line = &self.lines[index];
        let within = offset.saturating_sub(line.shown_start + line.marker);
        (line.window_start + within).min(line.window_end.max(line.window_start))
    }

    fn remap(&self, mut diagnostic: cs::Diagnostic<()>) -> cs::Diagnostic<()> {
        for label in &mut diagnostic.labels {
            let start = self.to_shown(label.range.start);
            let end = self.to_shown(label.range.end).max(start);
            label.range = start..end;
        }
        diagnostic
    }
}

/// Characters between two byte offsets of `source`.
fn char_distance(source: &str, from: usize, to: usize) -> usize {
    source.get(from..to).map_or(0, |text| text.chars().count())
}

/// The byte offset `count` characters after `offset` (or the end).
fn advance(source: &str, offset: usize, count: usize) -> usize {
    source[offset..].char_indices().nth(count).map_or(source.len(), |(i, _)| offset + i)
}

/// The byte offset `count` characters before `offset` (or 0).
fn retreat(source: &str, offset: usize, count: usize) -> usize {
    source[..offset].char_indices().rev().nth(count.saturating_sub(1)).map_or(0, |(i, _)| i)
}

impl<'a> Files<'a> for Windowed<'_> {
    type FileId = ();
    type Name = &'a str;
    type Source = &'a str;

    fn name(&'a self, (): ()) -> Result<&'a str, csfiles::Error> {
        Ok(self.name)
    }

    fn source(&'a self, (): ()) -> Result<&'a str, csfiles::Error> {
        Ok(&self.shown)
    }

    fn line_index(&'a self, (): (), byte_index: usize) -> Result<usize, csfiles::Error> {
        Ok(self.lines.partition_point(|l| l.shown_start <= byte_index).saturating_sub(1))
    }

    fn line_range(&'a self, (): (), line_index: usize) -> Result<Range<usize>, csfiles::Error> {
        let start = self
            .lines
            .get(line_index)
            .ok_or(csfiles::Error::LineTooLarge { given: line_index, max: self.lines.len() })?
            .shown_start;
        let end = self.lines.get(line_index + 1).map_or(self.shown.len(), |next| next.shown_start);
        Ok(start..end)
    }

    fn location(&'a self, (): (), byte_index: usize) -> Result<csfiles::Location, csfiles::Error> {
        let (line_number, column_number) = line_col(self.source, self.to_source(byte_index));
        Ok(csfiles::Location { line_number, column_number })
    }
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

    /// A 200 000-character line is shown as a window around the caret, not whole, and the
    /// header still gives the column in the whole line.
    #[test]
    fn long_lines_are_cut_around_the_caret() {
        let padding = "x + ".repeat(50_000);
        let source = format!("metric m {{\n    mean({padding}Lx)\n}}\n");
        let at = source.find("Lx").unwrap();
        let diagnostic = Diagnostic::error(codes::SYNTAX, "unknown name", Span::new(at, at + 2), "not defined");
        let text = render(&[diagnostic], "long.metric", &source, false);
        let (line, column) = line_col(&source, at);
        assert!(text.contains(&format!("long.metric:{line}:{column}")), "{}", &text[..text.len().min(600)]);
        assert!(text.len() < 2_000, "the rendering is {} bytes long", text.len());
        assert!(text.contains('…') && text.contains("Lx") && text.contains("^^"), "{text}");
        // Short lines render as before.
        let short = "metric m {\n    mean(Lx)\n}\n";
        let diagnostic = Diagnostic::error(codes::SYNTAX, "unknown name", Span::new(20, 22), "not defined");
        let text = render(&[diagnostic], "short.metric", short, false);
        assert!(text.contains("short.metric:2:10") && !text.contains('…'), "{text}");
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
