//! The parser: `.metric` source text to a [`File`], or a list of diagnostics.
//!
//! # Structure
//!
//! The parser is written in nom's style on `&str` input: tokens are recognised with nom
//! combinators (`identifier`, `number`, `string_body`, trivia), and every grammar
//! function takes the remaining input and returns `IResult<&str, T, Fail>`. A node's byte
//! offset is `source.len() - remaining.len()`. Grammar functions skip the trivia
//! (whitespace and `#` comments) *before* their first token and stop right after their
//! last one, so every span covers exactly the node's text.
//!
//! Grammar errors are always `nom::Err::Failure` carrying a finished [`Diagnostic`]: the
//! grammar needs no backtracking, because one token of lookahead decides every choice.
//!
//! # Recovery
//!
//! Errors are collected, not fatal. After an error inside a `let` binding the parser
//! resumes at the next line that starts with `let`; after any other error in an item it
//! resumes at the next line that starts with `metric`, `loss` or `use`. A file with errors
//! yields `Err` with all of them (up to [`MAX_ERRORS`]), never a partial tree.
//!
//! # Robustness
//!
//! No input makes the parser panic or overflow the stack. Recursion happens only where an
//! expression contains another one (parentheses, call arguments, slice bounds, `if`), and
//! is cut off at [`MAX_DEPTH`]. Operator chains (`a + b + ...`), prefix operators
//! (`!!!x`) and postfix chains (`x[1:][1:]...`) are parsed by loops, but they still build
//! deep trees, so the height of every tree built is checked against the same limit: any
//! tree handed to later stages (and its recursive `Drop`) is at most [`MAX_DEPTH`] deep.
//!
//! # Files
//!
//! [`lexer`] recognises tokens; [`items`] parses the file, its items and definitions (with
//! recovery); [`expr`] parses expressions; this file holds the entry points, the error
//! plumbing and the `Parser`'s position and message helpers.

mod expr;
mod items;
mod lexer;
#[cfg(test)]
mod tests;

use items::*;
use lexer::*;

use nom::branch::alt;
use nom::bytes::complete::{take_till, take_while, take_while1};
use nom::character::complete::{char, digit1, one_of, satisfy};
use nom::combinator::{opt, recognize};
use nom::error::{ErrorKind, ParseError};
use nom::multi::many0_count;
use nom::sequence::{pair, preceded, tuple};
use nom::IResult;

use crate::ast::{
    Arg, BinaryOp, Definition, Expr, ExprKind, File, Ident, Item, Let, Literal, OptionSetting, OptionValue, Param,
    ParamType, Span, UnaryOp, UseItem,
};
use crate::diagnostic::{codes, suggest, Diagnostic};

/// The deepest expression tree the parser builds, counted in nodes from root to leaf.
pub const MAX_DEPTH: usize = 256;

/// Parsing stops after this many errors; later ones are usually echoes of earlier ones.
pub const MAX_ERRORS: usize = 50;

/// Words that cannot be used as names.
pub const KEYWORDS: [&str; 10] = ["metric", "loss", "let", "use", "if", "then", "else", "with", "true", "false"];

/// Keywords that start a top-level item; recovery resynchronises on them.
const ITEM_KEYWORDS: [&str; 3] = ["metric", "loss", "use"];

/// Punctuation, longest first so that `==` is not read as `=` `=`.
const PUNCTUATION: [&str; 28] = [
    "==", "!=", "<=", ">=", "&&", "||", "**", "(", ")", "{", "}", "[", "]", ",", ";", ":", "=", "<", ">", "+", "-",
    "*", "/", "&", "|", "^", "!", "@",
];

/// The stack the parser runs on. Nesting [`MAX_DEPTH`] levels deep takes about 2.5 MiB
/// in an unoptimised build (about 10 KiB per level), more than a test thread's 2 MiB;
/// 32 MiB leaves room for sanitizer builds, which grow frames severalfold.
const PARSER_STACK_BYTES: usize = 32 << 20;

/// Parses a whole `.metric` file.
///
/// Returns the file's items, or every syntax error found (at least one). A file that
/// parses but defines no `metric` or `loss` is an error too.
///
/// The parse runs on a helper thread with a stack of known size, so that the depth limit
/// protects the caller whatever thread it is on and however the crate was compiled. The
/// returned tree is at most [`MAX_DEPTH`] nodes deep.
pub fn parse(source: &str) -> Result<File, Vec<Diagnostic>> {
    std::thread::scope(|scope| {
        let spawned = std::thread::Builder::new()
            .name("losscc-parse".to_string())
            .stack_size(PARSER_STACK_BYTES)
            .spawn_scoped(scope, || parse_on_this_thread(source));
        match spawned {
            Ok(handle) => match handle.join() {
                Ok(result) => result,
                // The parser does not panic on any input; if it ever does, that is a bug
                // to surface, not to turn into a diagnostic.
                Err(payload) => std::panic::resume_unwind(payload),
            },
            // The system refused a thread (resource limits). Parsing here is still right;
            // only input nested close to `MAX_DEPTH` could then exhaust a small stack.
            Err(_) => parse_on_this_thread(source),
        }
    })
}

fn parse_on_this_thread(source: &str) -> Result<File, Vec<Diagnostic>> {
    let mut parser = Parser { src: source, diagnostics: Vec::new() };
    let file = parser.file();
    if !parser.diagnostics.is_empty() {
        return Err(parser.diagnostics);
    }
    let defines_something = file.items.iter().any(|item| matches!(item, Item::Metric(_) | Item::Loss(_)));
    if !defines_something {
        let end = Span::new(source.len(), source.len());
        let mut diagnostic = Diagnostic::error(
            codes::EMPTY,
            "file defines no metric or loss",
            end,
            "expected a `metric` or `loss` definition",
        )
        .with_help("define one, for example `metric accuracy { sum(count(P & L)) / sum(count(L)) }`");
        if !file.items.is_empty() {
            diagnostic = diagnostic.with_note("`use` only makes another file's metrics callable; it defines nothing");
        }
        return Err(vec![diagnostic]);
    }
    Ok(file)
}

/// Parses a file given as raw bytes, reporting invalid UTF-8 instead of assuming it away.
///
/// The encoding error points at the first invalid byte. Render it against
/// `String::from_utf8_lossy(bytes)`: that text keeps every byte before the first invalid
/// one in place and shows the invalid sequence as one `U+FFFD` character, which the
/// error's span covers.
pub fn parse_bytes(bytes: &[u8]) -> Result<File, Vec<Diagnostic>> {
    match std::str::from_utf8(bytes) {
        Ok(source) => parse(source),
        Err(error) => {
            let offset = error.valid_up_to();
            let invalid_len = error.error_len().unwrap_or(bytes.len() - offset);
            let shown: Vec<String> =
                bytes[offset..offset + invalid_len].iter().map(|byte| format!("0x{byte:02X}")).collect();
            let plural = if invalid_len == 1 { "" } else { "s" };
            let diagnostic = Diagnostic::error(
                codes::ENCODING,
                "file is not valid UTF-8",
                Span::new(offset, offset + '\u{FFFD}'.len_utf8()),
                format!("invalid byte{plural} {}", shown.join(" ")),
            )
            .with_note(format!("the first invalid byte is at byte offset {offset}; `.metric` files are UTF-8 text"))
            .with_help("check that this is the file you meant, and save it as UTF-8");
            Err(vec![diagnostic])
        }
    }
}

/// Why a grammar function did not produce its node.
#[derive(Debug)]
pub(crate) enum Fail {
    /// A nom combinator did not match; `rest_len` is the length of the input it saw.
    /// Grammar functions turn these into diagnostics, so one reaching the top is a gap in
    /// the parser, reported as a plain syntax error rather than lost.
    Mismatch { rest_len: usize },
    /// A syntax error, not yet recorded.
    Diag(Box<Diagnostic>),
    /// Errors already recorded; recovery should look for the next item from byte `at`.
    Reported { at: usize },
    /// Errors already recorded; parsing can continue exactly at byte `at`.
    ResumeAt { at: usize },
}

impl<'a> ParseError<&'a str> for Fail {
    fn from_error_kind(input: &'a str, _kind: ErrorKind) -> Self {
        Fail::Mismatch { rest_len: input.len() }
    }

    fn append(_input: &'a str, _kind: ErrorKind, other: Self) -> Self {
        other
    }
}

type PResult<'a, T> = IResult<&'a str, T, Fail>;

fn failure<'a, T>(diagnostic: Diagnostic) -> PResult<'a, T> {
    Err(nom::Err::Failure(Fail::Diag(Box::new(diagnostic))))
}

/// An expression under construction, with the height of its tree (a leaf is 1).
struct Node {
    expr: Expr,
    height: usize,
}

impl Node {
    fn leaf(kind: ExprKind, span: Span) -> Node {
        Node { expr: Expr { kind, span }, height: 1 }
    }
}

struct Parser<'a> {
    src: &'a str,
    diagnostics: Vec<Diagnostic>,
}

impl<'a> Parser<'a> {
    fn offset(&self, i: &'a str) -> usize {
        self.src.len() - i.len()
    }

    /// The next token after trivia.
    fn lexeme(&self, i: &'a str) -> Lexeme<'a> {
        let at = trivia(i);
        let (tok, len) = lex(at);
        let start = self.offset(at);
        Lexeme { tok, span: Span::new(start, start + len), at, after: &at[len..] }
    }

    fn line_start(&self, offset: usize) -> usize {
        let offset = offset.min(self.src.len());
        self.src.as_bytes()[..offset].iter().rposition(|&byte| byte == b'\n').map_or(0, |newline| newline + 1)
    }

    fn on_later_line(&self, earlier: usize, later: usize) -> bool {
        let later = later.min(self.src.len());
        earlier < later && self.src.as_bytes()[earlier..later].contains(&b'\n')
    }

    /// Whether the parser should stop looking for a closing delimiter here: the end of
    /// the file, or a line that starts the next item.
    fn is_sync_point(&self, lexeme: &Lexeme<'a>) -> bool {
        match lexeme.tok {
            Tok::Eof => true,
            Tok::Ident(word) => {
                ITEM_KEYWORDS.contains(&word)
                    && self.src[self.line_start(lexeme.span.start)..lexeme.span.start].trim().is_empty()
            }
            _ => false,
        }
    }

    /// The diagnostic for a delimiter still open at `found`, a sync point.
    fn unclosed(&self, opener: Span, open: &str, close: &str, what: &str, found: &Lexeme<'a>) -> Diagnostic {
        let (there, help) = match found.tok {
            Tok::Eof => ("the file ends here".to_string(), format!("add `{close}` to close {what}")),
            _ => (
                format!("{} starts here", describe(found.tok)),
                format!("add `{close}` to close {what} before the next definition"),
            ),
        };
        Diagnostic::error(
            codes::UNCLOSED,
            format!("unclosed `{open}`"),
            opener,
            format!("this `{open}` is never closed"),
        )
        .with_secondary(Span::new(found.span.start, found.span.start), there)
        .with_help(help)
    }

    /// The usual "expected X, found Y" diagnostic, with the primary label at the token.
    fn expected(&self, what: &str, found: &Lexeme<'a>) -> Diagnostic {
        let diagnostic = Diagnostic::error(
            codes::SYNTAX,
            format!("expected {what}, found {}", describe(found.tok)),
            found.span,
            format!("expected {what}"),
        );
        match found.tok {
            Tok::Other(c) if c.is_alphanumeric() => {
                diagnostic.with_note("names use only ASCII letters, digits and `_`")
            }
            _ => diagnostic,
        }
    }

    /// "expected X" where X (`token`, described in full by `what`) was due right after
    /// `previous_end`: when the unexpected token is on a later line the user most likely
    /// forgot X at the end of the line, so the primary label goes there.
    fn expected_after(&self, what: &str, token: &str, previous_end: usize, found: &Lexeme<'a>) -> Diagnostic {
        if matches!(found.tok, Tok::Eof) || self.on_later_line(previous_end, found.span.start) {
            let mut diagnostic = Diagnostic::error(
                codes::SYNTAX,
                format!("expected {what}, found {}", describe(found.tok)),
                Span::new(previous_end, previous_end),
                format!("expected {token} here"),
            );
            if !matches!(found.tok, Tok::Eof) {
                diagnostic = diagnostic.with_secondary(found.span, format!("unexpected {}", describe(found.tok)));
            }
            diagnostic
        } else {
            self.expected(what, found)
        }
    }
}
