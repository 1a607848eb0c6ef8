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

use nom::branch::alt;
use nom::bytes::complete::{take_till, take_while, take_while1};
use nom::character::complete::{char, digit1, one_of, satisfy};
use nom::combinator::{opt, recognize};
use nom::error::{ErrorKind, ParseError};
use nom::multi::many0_count;
use nom::sequence::{pair, preceded, tuple};
use nom::IResult;

use crate::ast::{
    Arg, BinaryOp, Definition, Expr, ExprKind, File, Ident, Item, Let, Literal, OptionSetting, Param, ParamType, Span,
    UnaryOp, UseItem,
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

// ---------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn is_space(c: char) -> bool {
    c.is_ascii_whitespace()
}

/// Whether `word` is reserved (see [`KEYWORDS`]).
pub fn is_keyword(word: &str) -> bool {
    KEYWORDS.contains(&word)
}

/// `[A-Za-z_][A-Za-z0-9_]*`
fn identifier(i: &str) -> IResult<&str, &str> {
    recognize(pair(satisfy(is_ident_start), take_while(is_ident_char)))(i)
}

/// `digits [. digits] [(e|E) [+|-] digits]`. What may not follow a number (a letter, a
/// lone `.`) is checked by [`Parser::number_literal`], which can explain the problem.
fn number(i: &str) -> IResult<&str, &str> {
    recognize(tuple((digit1, opt(pair(char('.'), digit1)), opt(tuple((one_of("eE"), opt(one_of("+-")), digit1))))))(i)
}

/// The text of a string after its opening `"`, up to (not including) the closing `"` or
/// the end of the line, whichever comes first. Strings have no escapes: they only hold
/// file paths.
fn string_body(i: &str) -> IResult<&str, &str, Fail> {
    take_till(|c| c == '"' || c == '\n')(i)
}

/// Skips whitespace and `#` comments (doc comments included).
fn trivia(i: &str) -> &str {
    let comment = recognize(preceded(char('#'), take_till(|c| c == '\n')));
    let result: IResult<&str, usize> = many0_count(alt((take_while1(is_space), comment)))(i);
    match result {
        Ok((rest, _)) => rest,
        Err(_) => i,
    }
}

/// One token, seen without consuming it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Tok<'a> {
    Eof,
    /// An identifier or keyword.
    Ident(&'a str),
    Number(&'a str),
    /// The `"` that opens a string.
    Quote,
    Punct(&'static str),
    /// A character that starts no token.
    Other(char),
}

/// A token with its position: `at` is the input starting at the token, `after` the input
/// right after it.
#[derive(Clone, Copy, Debug)]
struct Lexeme<'a> {
    tok: Tok<'a>,
    span: Span,
    at: &'a str,
    after: &'a str,
}

fn lex(i: &str) -> (Tok<'_>, usize) {
    let Some(first) = i.chars().next() else {
        return (Tok::Eof, 0);
    };
    if let Ok((rest, word)) = identifier(i) {
        return (Tok::Ident(word), i.len() - rest.len());
    }
    if let Ok((rest, digits)) = number(i) {
        return (Tok::Number(digits), i.len() - rest.len());
    }
    if first == '"' {
        return (Tok::Quote, 1);
    }
    match PUNCTUATION.iter().find(|punct| i.starts_with(**punct)) {
        Some(punct) => (Tok::Punct(punct), punct.len()),
        None => (Tok::Other(first), first.len_utf8()),
    }
}

/// Shortens long token text for messages (a 10 000-digit number is still one token).
fn shorten(text: &str) -> String {
    const LIMIT: usize = 32;
    match text.char_indices().nth(LIMIT) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

/// How a token is named in "found ..." messages.
fn describe(tok: Tok<'_>) -> String {
    match tok {
        Tok::Eof => "end of file".to_string(),
        Tok::Ident(word) if is_keyword(word) => format!("keyword `{word}`"),
        Tok::Ident(word) => format!("`{}`", shorten(word)),
        Tok::Number(digits) => format!("number `{}`", shorten(digits)),
        Tok::Quote => "a string".to_string(),
        Tok::Punct(punct) => format!("`{punct}`"),
        Tok::Other(c) if c.is_control() || c.is_whitespace() => {
            format!("character `{}` (U+{:04X})", c.escape_debug(), u32::from(c))
        }
        Tok::Other(c) => format!("character `{c}`"),
    }
}

fn binary_op(punct: &str) -> Option<BinaryOp> {
    Some(match punct {
        "&" => BinaryOp::And,
        "|" => BinaryOp::Or,
        "^" => BinaryOp::Xor,
        "+" => BinaryOp::Add,
        "-" => BinaryOp::Sub,
        "*" => BinaryOp::Mul,
        "/" => BinaryOp::Div,
        "<" => BinaryOp::Lt,
        "<=" => BinaryOp::Le,
        ">" => BinaryOp::Gt,
        ">=" => BinaryOp::Ge,
        "==" => BinaryOp::Eq,
        "!=" => BinaryOp::Ne,
        _ => return None,
    })
}

/// Whether `tok` can begin an operand: seen right after an expression, it suggests a
/// missing operator or `,`.
fn starts_operand(tok: Tok<'_>) -> bool {
    match tok {
        Tok::Ident(word) => !is_keyword(word),
        Tok::Number(_) | Tok::Punct("(") => true,
        _ => false,
    }
}

fn is_comparison(op: BinaryOp) -> bool {
    matches!(op, BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge | BinaryOp::Eq | BinaryOp::Ne)
}

fn too_deep(span: Span) -> Diagnostic {
    Diagnostic::error(
        codes::TOO_DEEP,
        format!("expression nests too deeply (more than {MAX_DEPTH} levels)"),
        span,
        format!("this goes past {MAX_DEPTH} levels of nesting"),
    )
    .with_note("the limit keeps later compiler passes, which walk expressions recursively, from overflowing the stack")
    .with_help("split the expression into smaller `let` bindings")
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

// ---------------------------------------------------------------------------------------
// The grammar
// ---------------------------------------------------------------------------------------

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

    // ----- top level ------------------------------------------------------------------

    fn file(&mut self) -> File {
        let mut items = Vec::new();
        let mut docs = Vec::new();
        // A byte-order mark is an editor's artefact, not text.
        let mut i = self.src.strip_prefix('\u{FEFF}').unwrap_or(self.src);
        loop {
            i = self.top_trivia(i, &mut docs);
            let lexeme = self.lexeme(i);
            if self.diagnostics.len() >= MAX_ERRORS && lexeme.tok != Tok::Eof {
                self.too_many_errors(i);
                break;
            }
            let item_start = lexeme.span.start;
            let result = match lexeme.tok {
                Tok::Eof => break,
                Tok::Ident("use") => self.use_item(lexeme).map(|(rest, item)| (rest, Item::Use(item))),
                Tok::Ident("metric") => self
                    .definition(lexeme, "metric", std::mem::take(&mut docs))
                    .map(|(rest, d)| (rest, Item::Metric(d))),
                Tok::Ident("loss") => {
                    self.definition(lexeme, "loss", std::mem::take(&mut docs)).map(|(rest, d)| (rest, Item::Loss(d)))
                }
                _ => failure(self.top_level_garbage(&lexeme)),
            };
            match result {
                Ok((rest, item)) => {
                    items.push(item);
                    i = rest;
                }
                Err(error) => i = self.recover_item(error, item_start),
            }
        }
        File { items }
    }

    fn too_many_errors(&mut self, i: &'a str) {
        let at = self.offset(i);
        self.diagnostics.push(
            Diagnostic::error(
                codes::TOO_MANY_ERRORS,
                format!("too many syntax errors; stopped after {MAX_ERRORS}"),
                Span::new(at, at),
                "parsing stopped here",
            )
            .with_help("fix the errors above first; later ones are often caused by them"),
        );
    }

    /// Skips trivia between items, collecting `##` doc comment lines into `docs`.
    ///
    /// Doc lines attach to the next `metric` or `loss`, even across `use` items, so a
    /// comment at the top of a loss file documents the loss defined below its imports.
    fn top_trivia(&self, mut i: &'a str, docs: &mut Vec<String>) -> &'a str {
        loop {
            let spaced: IResult<&str, &str> = take_while(is_space)(i);
            if let Ok((rest, _)) = spaced {
                i = rest;
            }
            let Some(comment) = i.strip_prefix('#') else {
                return i;
            };
            let line: IResult<&str, &str> = take_till(|c| c == '\n')(comment);
            let Ok((rest, text)) = line else {
                return i;
            };
            if let Some(doc) = text.strip_prefix('#') {
                let doc = doc.strip_prefix(' ').unwrap_or(doc);
                docs.push(doc.trim_end().to_string());
            }
            i = rest;
        }
    }

    fn top_level_garbage(&self, found: &Lexeme<'a>) -> Diagnostic {
        let diagnostic = Diagnostic::error(
            codes::SYNTAX,
            format!("expected `metric`, `loss` or `use`, found {}", describe(found.tok)),
            found.span,
            "expected an item",
        );
        match found.tok {
            Tok::Ident("let") => diagnostic.with_help("`let` bindings belong inside the body of a metric or loss"),
            Tok::Ident(word) => match suggest(word, ITEM_KEYWORDS) {
                Some(keyword) => diagnostic.with_help(format!("did you mean `{keyword}`?")),
                None => diagnostic
                    .with_help("a file holds `use \"file.metric\";` imports and `metric name { ... }` or `loss name { ... }` definitions"),
            },
            Tok::Punct("}") => diagnostic
                .with_help("this `}` closes nothing; is there an extra `}` above, or a `{` missing?"),
            _ => diagnostic,
        }
    }

    /// Records the error and finds where to continue: the first line after the item's
    /// first line, and not before the error's line, that starts with `metric`, `loss` or
    /// `use`. The error's own line counts, because an unclosed delimiter is reported at
    /// the keyword of the next item.
    fn recover_item(&mut self, error: nom::Err<Fail>, item_start: usize) -> &'a str {
        let at = match self.record(error) {
            Recovery::Exactly(at) => return &self.src[at.min(self.src.len())..],
            Recovery::From(at) => at,
        };
        let item_line = self.line_start(item_start);
        let mut line_start = self.line_start(at.max(item_start));
        loop {
            if line_start > item_line {
                let line = self.src[line_start..].trim_start_matches([' ', '\t']);
                if identifier(line).is_ok_and(|(_, word)| ITEM_KEYWORDS.contains(&word)) {
                    return line;
                }
            }
            let Some(newline) = self.src[line_start..].find('\n') else {
                return &self.src[self.src.len()..];
            };
            line_start += newline + 1;
        }
    }

    /// Records the diagnostics carried by `error`, returning where recovery should start.
    fn record(&mut self, error: nom::Err<Fail>) -> Recovery {
        let fail = match error {
            nom::Err::Error(fail) | nom::Err::Failure(fail) => fail,
            nom::Err::Incomplete(_) => Fail::Mismatch { rest_len: 0 },
        };
        match fail {
            Fail::Diag(diagnostic) => {
                let at = diagnostic.labels().map(|label| label.span.start).max().unwrap_or(0);
                self.diagnostics.push(*diagnostic);
                Recovery::From(at)
            }
            Fail::Reported { at } => Recovery::From(at),
            Fail::ResumeAt { at } => Recovery::Exactly(at),
            Fail::Mismatch { rest_len } => {
                let at = self.src.len().saturating_sub(rest_len);
                let found = self.lexeme(&self.src[at..]);
                self.diagnostics.push(Diagnostic::error(
                    codes::SYNTAX,
                    format!("syntax error at {}", describe(found.tok)),
                    found.span,
                    "unexpected here",
                ));
                Recovery::From(at)
            }
        }
    }

    // ----- items ----------------------------------------------------------------------

    fn use_item(&mut self, keyword: Lexeme<'a>) -> PResult<'a, UseItem> {
        let quote = self.lexeme(keyword.after);
        if quote.tok != Tok::Quote {
            let mut diagnostic = self.expected("a file path in quotes after `use`", &quote);
            if let Tok::Ident(word) = quote.tok {
                diagnostic = diagnostic.with_help(format!("paths are quoted strings: `use \"{word}.metric\";`"));
            } else {
                diagnostic = diagnostic.with_help("write the path in quotes: `use \"miou.metric\";`");
            }
            return failure(diagnostic);
        }
        let (rest, path) = string_body(quote.after)?;
        let path_start = quote.span.start;
        let Some(after_string) = rest.strip_prefix('"') else {
            let line_end = self.offset(rest);
            let there = if rest.is_empty() { "the file ends here" } else { "the line ends here" };
            return failure(
                Diagnostic::error(codes::UNCLOSED, "unterminated string", quote.span, "this string is never closed")
                    .with_secondary(Span::new(line_end, line_end), there)
                    .with_help("close the path with `\"`; strings cannot span lines"),
            );
        };
        let path_span = Span::new(path_start, self.offset(after_string));
        let semicolon = self.lexeme(after_string);
        if semicolon.tok != Tok::Punct(";") {
            return failure(
                self.expected_after("`;` after the path", "`;`", path_span.end, &semicolon)
                    .with_help("`use` items end with `;`"),
            );
        }
        let item =
            UseItem { path: path.to_string(), path_span, span: Span::new(keyword.span.start, semicolon.span.end) };
        Ok((semicolon.after, item))
    }

    /// `metric NAME [(params)] [with options] { lets expr }` (or `loss ...`).
    fn definition(&mut self, keyword: Lexeme<'a>, kind: &str, doc: Vec<String>) -> PResult<'a, Definition> {
        let (mut i, name) =
            self.name(keyword.after, &format!("a name for this {kind}"), |diagnostic, found| match found {
                Tok::Punct("{") | Tok::Punct("(") => {
                    diagnostic.with_help(format!("every {kind} has a name: `{kind} my_{kind} {{ ... }}`"))
                }
                _ => diagnostic,
            })?;

        let mut params = Vec::new();
        let open = self.lexeme(i);
        if open.tok == Tok::Punct("(") {
            let (rest, parsed) = self.params(open)?;
            params = parsed;
            i = rest;
        }

        let mut options = Vec::new();
        let with = self.lexeme(i);
        if with.tok == Tok::Ident("with") {
            let (rest, parsed) = self.options(with)?;
            options = parsed;
            i = rest;
        }

        let open = self.lexeme(i);
        if open.tok != Tok::Punct("{") {
            let mut diagnostic = self.expected(&format!("`{{` to start the body of `{}`", name.name), &open);
            diagnostic = match open.tok {
                Tok::Ident(word) if suggest(word, ["with"]).is_some() => {
                    diagnostic.with_help("options are introduced by `with`: `with pieces = 1`")
                }
                Tok::Punct("=") => diagnostic.with_help(format!(
                    "a {kind} is not assigned; its body is a block: `{kind} {} {{ ... }}`",
                    name.name
                )),
                Tok::Punct(":") => diagnostic
                    .with_help(format!("parameters go in parentheses: `{kind} {}(tol: int = 5) {{ ... }}`", name.name)),
                _ => diagnostic,
            };
            return failure(diagnostic);
        }
        let (rest, (lets, body, close)) = self.body(open, kind, &name.name)?;
        let definition =
            Definition { doc, name, params, options, lets, body, span: Span::new(keyword.span.start, close.end) };
        Ok((rest, definition))
    }

    /// A name that must not be a keyword; `explain` may add help for the found token.
    fn name(
        &self,
        i: &'a str,
        what: &str,
        explain: impl FnOnce(Diagnostic, Tok<'a>) -> Diagnostic,
    ) -> PResult<'a, Ident> {
        let found = self.lexeme(i);
        match found.tok {
            Tok::Ident(word) if !is_keyword(word) => {
                Ok((found.after, Ident { name: word.to_string(), span: found.span }))
            }
            Tok::Ident(word) => failure(
                Diagnostic::error(
                    codes::KEYWORD_AS_NAME,
                    format!("expected {what}, found keyword `{word}`"),
                    found.span,
                    format!("`{word}` is a keyword"),
                )
                .with_help(format!("keywords cannot be used as names; try `{word}_` or another name")),
            ),
            Tok::Number(digits) => failure(
                self.expected(what, &found)
                    .with_help(format!("names start with a letter or `_`, for example `_{}`", shorten(digits))),
            ),
            tok => failure(explain(self.expected(what, &found), tok)),
        }
    }

    /// `( name: type = literal, ... )` after a definition's name.
    fn params(&mut self, open: Lexeme<'a>) -> PResult<'a, Vec<Param>> {
        let mut params = Vec::new();
        let mut i = open.after;
        loop {
            let next = self.lexeme(i);
            if next.tok == Tok::Punct(")") {
                return Ok((next.after, params));
            }
            if self.is_sync_point(&next) {
                return failure(self.unclosed(open.span, "(", ")", "the parameter list", &next));
            }
            let (rest, param) = self.param(i)?;
            params.push(param);
            let separator = self.lexeme(rest);
            match separator.tok {
                Tok::Punct(",") => i = separator.after,
                Tok::Punct(")") => i = rest,
                _ if self.is_sync_point(&separator) => {
                    return failure(self.unclosed(open.span, "(", ")", "the parameter list", &separator));
                }
                _ => {
                    let previous_end = params.last().map_or(open.span.end, |param| param.span.end);
                    let diagnostic = self
                        .expected_after("`,` or `)` after this parameter", "`,` or `)`", previous_end, &separator)
                        .with_secondary(open.span, "parameter list starts here");
                    return failure(match separator.tok {
                        Tok::Punct("{") => diagnostic.with_help("add `)` to close the parameter list"),
                        Tok::Punct(punct) if binary_op(punct).is_some() => diagnostic.with_help(
                            "parameter defaults are literals such as `5`, `-0.5` or `true`, not expressions",
                        ),
                        _ => diagnostic,
                    });
                }
            }
        }
    }

    /// `name: int|float|bool = literal`
    fn param(&mut self, i: &'a str) -> PResult<'a, Param> {
        let (rest, name) = self.name(i, "a parameter name", |diagnostic, _| diagnostic)?;
        let colon = self.lexeme(rest);
        if colon.tok != Tok::Punct(":") {
            let mut diagnostic = self.expected(&format!("`:` and a type after parameter `{}`", name.name), &colon);
            if colon.tok == Tok::Punct("=") {
                let value = self.lexeme(colon.after);
                let guessed = match self.literal_value(colon.after) {
                    Ok((_, (Literal::Int(_), _))) => "int",
                    Ok((_, (Literal::Float(_), _))) => "float",
                    Ok((_, (Literal::Bool(_), _))) => "bool",
                    Err(_) => "int",
                };
                let shown = value.at.get(..value.span.end - value.span.start).unwrap_or("0");
                diagnostic = Diagnostic::error(
                    codes::SYNTAX,
                    format!("parameter `{}` has no type", name.name),
                    name.span,
                    "expected `:` and a type after this name",
                )
                .with_help(format!("write `{}: {guessed} = {shown}`", name.name));
            }
            return failure(diagnostic);
        }
        let ty_lexeme = self.lexeme(colon.after);
        let ty = match ty_lexeme.tok {
            Tok::Ident("int") => ParamType::Int,
            Tok::Ident("float") => ParamType::Float,
            Tok::Ident("bool") => ParamType::Bool,
            Tok::Ident(word) => {
                let diagnostic = Diagnostic::error(
                    codes::SYNTAX,
                    format!("unknown parameter type `{}`", shorten(word)),
                    ty_lexeme.span,
                    "not a parameter type",
                )
                .with_note("parameter types are `int`, `float` and `bool`");
                let alias = match word {
                    "integer" | "i64" | "i32" | "usize" => Some("int"),
                    "f64" | "f32" | "double" | "real" | "number" => Some("float"),
                    "boolean" => Some("bool"),
                    _ => suggest(word, ["int", "float", "bool"]),
                };
                return failure(match alias {
                    Some(ty) => diagnostic.with_help(format!("did you mean `{ty}`?")),
                    None => diagnostic,
                });
            }
            _ => {
                return failure(
                    self.expected("a parameter type", &ty_lexeme)
                        .with_note("parameter types are `int`, `float` and `bool`"),
                )
            }
        };
        let equals = self.lexeme(ty_lexeme.after);
        if equals.tok != Tok::Punct("=") {
            let example = match ty {
                ParamType::Int => "0",
                ParamType::Float => "0.5",
                ParamType::Bool => "false",
            };
            let type_name = ty_lexeme.at.get(..ty_lexeme.span.end - ty_lexeme.span.start).unwrap_or("int");
            return failure(
                Diagnostic::error(
                    codes::SYNTAX,
                    format!("parameter `{}` has no default value", name.name),
                    Span::new(ty_lexeme.span.end, ty_lexeme.span.end),
                    "expected `=` and a default value here",
                )
                .with_secondary(equals.span, format!("found {}", describe(equals.tok)))
                .with_note("every parameter has a default, so a metric can be used without arguments")
                .with_help(format!("for example `{}: {type_name} = {example}`", name.name)),
            );
        }
        let (rest, (default, default_span)) = self.literal_value(equals.after)?;
        let param =
            Param { span: name.span.to(default_span), name, ty, ty_span: ty_lexeme.span, default, default_span };
        Ok((rest, param))
    }

    /// `with key = literal {, key = literal}` (a trailing `,` before `{` is allowed).
    fn options(&mut self, with: Lexeme<'a>) -> PResult<'a, Vec<OptionSetting>> {
        let mut options = Vec::new();
        let mut i = with.after;
        loop {
            let (rest, key) = self.name(i, "an option name", |diagnostic, found| match found {
                Tok::Punct("{") => {
                    diagnostic.with_help("name at least one option after `with`, e.g. `with pieces = 1`")
                }
                _ => diagnostic,
            })?;
            let equals = self.lexeme(rest);
            if equals.tok != Tok::Punct("=") {
                let mut diagnostic = self.expected(&format!("`=` after option `{}`", key.name), &equals);
                if matches!(equals.tok, Tok::Punct("==") | Tok::Punct(":")) {
                    diagnostic = diagnostic.with_help(format!("options are set with a single `=`: `{} = 1`", key.name));
                }
                return failure(diagnostic);
            }
            let (rest, (value, value_span)) = self.literal_value(equals.after)?;
            options.push(OptionSetting { span: key.span.to(value_span), key, value, value_span });
            let comma = self.lexeme(rest);
            if comma.tok != Tok::Punct(",") {
                return Ok((rest, options));
            }
            if self.lexeme(comma.after).tok == Tok::Punct("{") {
                return Ok((comma.after, options));
            }
            i = comma.after;
        }
    }

    /// A literal with an optional leading `-`, as used for defaults and options.
    fn literal_value(&self, i: &'a str) -> PResult<'a, (Literal, Span)> {
        let first = self.lexeme(i);
        match first.tok {
            Tok::Ident("true") => Ok((first.after, (Literal::Bool(true), first.span))),
            Tok::Ident("false") => Ok((first.after, (Literal::Bool(false), first.span))),
            Tok::Number(_) => {
                let (rest, literal) = self.number_literal(&first, false)?;
                Ok((rest, (literal, first.span)))
            }
            Tok::Punct("-") => {
                let number = self.lexeme(first.after);
                if !matches!(number.tok, Tok::Number(_)) || number.span.start != first.span.end {
                    return failure(
                        self.expected("a number after `-`", &number)
                            .with_help("write negative numbers without a space, like `-1`"),
                    );
                }
                let (rest, literal) = self.number_literal(&number, true)?;
                Ok((rest, (literal, first.span.to(number.span))))
            }
            _ => failure(
                self.expected("a literal value", &first)
                    .with_help("defaults and options are literals such as `5`, `-0.5` or `true`"),
            ),
        }
    }

    /// The value of a number token (negated if `negative`), checking what follows it.
    fn number_literal(&self, lexeme: &Lexeme<'a>, negative: bool) -> PResult<'a, Literal> {
        let Tok::Number(text) = lexeme.tok else {
            return failure(self.expected("a number", lexeme));
        };
        // Letters, digits or a `.` glued to a number are a malformed literal, not two tokens.
        let suffix_len = lexeme.after.find(|c: char| !(is_ident_char(c) || c == '.')).unwrap_or(lexeme.after.len());
        if suffix_len > 0 {
            let suffix = &lexeme.after[..suffix_len];
            let span = Span::new(lexeme.span.start, lexeme.span.end + suffix_len);
            let diagnostic = if suffix.starts_with('.') {
                Diagnostic::error(codes::LITERAL, "expected a digit after the decimal point", span, "malformed number")
                    .with_help(format!("write `{}.0`", shorten(text)))
            } else if suffix.starts_with(['e', 'E']) && !suffix[1..].starts_with(is_ident_start) {
                Diagnostic::error(codes::LITERAL, "expected digits in the exponent", span, "malformed number")
                    .with_help("write exponents like `1e-8` or `2.5e3`")
            } else {
                let diagnostic = Diagnostic::error(
                    codes::LITERAL,
                    format!("invalid suffix `{}` on number `{}`", shorten(suffix), shorten(text)),
                    span,
                    "numbers cannot be followed directly by letters",
                );
                if is_keyword(suffix) {
                    diagnostic.with_help(format!("put a space between `{}` and `{suffix}`", shorten(text)))
                } else if is_ident_start(suffix.chars().next().unwrap_or('0')) && !suffix.contains('.') {
                    diagnostic.with_help(format!("to multiply, write `{} * {}`", shorten(text), shorten(suffix)))
                } else {
                    diagnostic
                }
            };
            return failure(diagnostic);
        }
        let is_float = text.contains(['.', 'e', 'E']);
        let signed = if negative { format!("-{text}") } else { text.to_string() };
        let literal = if is_float {
            let value: f64 = match signed.parse() {
                Ok(value) => value,
                Err(_) => return failure(self.bad_number(lexeme, "malformed float literal", "not a valid number")),
            };
            if value.is_infinite() {
                return failure(
                    self.bad_number(lexeme, "float literal too large", "this is infinite as a 64-bit float")
                        .with_note(format!("the largest finite float is about {:e}", f64::MAX)),
                );
            }
            let mantissa = text.split(['e', 'E']).next().unwrap_or(text);
            if value == 0.0 && mantissa.contains(|c: char| ('1'..='9').contains(&c)) {
                return failure(
                    self.bad_number(lexeme, "float literal too small", "this rounds to zero as a 64-bit float")
                        .with_help("write `0.0` if zero is what you mean"),
                );
            }
            Literal::Float(value)
        } else {
            match signed.parse::<i64>() {
                Ok(value) => Literal::Int(value),
                Err(_) => {
                    return failure(
                        self.bad_number(lexeme, "integer literal too large", "does not fit in a 64-bit integer")
                            .with_note(format!("integers range from {} to {}", i64::MIN, i64::MAX))
                            .with_help("write a float such as `1e20` for larger magnitudes"),
                    )
                }
            }
        };
        Ok((lexeme.after, literal))
    }

    fn bad_number(&self, lexeme: &Lexeme<'a>, message: &str, label: &str) -> Diagnostic {
        Diagnostic::error(codes::LITERAL, message, lexeme.span, label)
    }

    /// `{ let ...; expr }` after the opening brace. Returns the lets, the final
    /// expression and the span of the closing brace.
    ///
    /// An error in a `let` is recorded and parsing resumes at the next line starting with
    /// `let`, so one broken binding does not hide the errors of the next.
    fn body(&mut self, open: Lexeme<'a>, kind: &str, name: &str) -> PResult<'a, (Vec<Let>, Expr, Span)> {
        let mut lets: Vec<Let> = Vec::new();
        let mut had_error = false;
        let mut i = open.after;
        loop {
            let next = self.lexeme(i);
            if next.tok != Tok::Ident("let") {
                break;
            }
            match self.let_binding(next) {
                Ok((rest, binding)) => {
                    lets.push(binding);
                    i = rest;
                }
                Err(error) => {
                    had_error = true;
                    let at = match self.record(error) {
                        Recovery::Exactly(at) | Recovery::From(at) => at,
                    };
                    if self.diagnostics.len() >= MAX_ERRORS {
                        return Err(nom::Err::Failure(Fail::Reported { at }));
                    }
                    match self.next_let_line(next.span.start, at) {
                        Some(rest) => i = rest,
                        None => return Err(nom::Err::Failure(Fail::Reported { at })),
                    }
                }
            }
        }

        let next = self.lexeme(i);
        if next.tok == Tok::Punct("}") {
            let diagnostic = Diagnostic::error(
                codes::SYNTAX,
                format!("{kind} `{name}` has no final expression"),
                next.span,
                "expected an expression before `}`",
            )
            .with_note(format!("the last expression of a body is the {kind}'s value"));
            return failure(match lets.last() {
                Some(last) => {
                    diagnostic.with_help(format!("end the body with the value, for example `{}`", last.name.name))
                }
                None => diagnostic.with_help("for example `mean(count(P & L) / count(P | L))`"),
            });
        }
        if self.is_sync_point(&next) {
            return failure(self.unclosed(open.span, "{", "}", &format!("the body of `{name}`"), &next));
        }
        let (rest, body) = self.expr(i, 0)?;
        let close = self.lexeme(rest);
        match close.tok {
            Tok::Punct("}") => {}
            Tok::Punct(";") => {
                let after = self.lexeme(close.after);
                let diagnostic = if after.tok == Tok::Punct("}") {
                    Diagnostic::error(
                        codes::SYNTAX,
                        "unexpected `;` after the final expression",
                        close.span,
                        "remove this `;`",
                    )
                    .with_help(format!(
                        "the last expression of a body is the {kind}'s value and takes no `;`; only `let` bindings end with `;`"
                    ))
                } else {
                    Diagnostic::error(
                        codes::SYNTAX,
                        "expected `}` after the final expression, found `;`",
                        close.span,
                        "expected `}`",
                    )
                    .with_secondary(body.expr.span, "this expression is not bound to a name")
                    .with_note("a body is `let` bindings followed by one final expression")
                    .with_help("bind it with `let name = ...;` or remove it")
                };
                return failure(diagnostic);
            }
            Tok::Ident("let") => {
                return failure(
                    self.expected_after("`}` after the final expression", "`}`", body.expr.span.end, &close)
                        .with_note("`let` bindings must come before the body's final expression")
                        .with_help("if the line above is a binding, start it with `let` and end it with `;`"),
                )
            }
            _ if self.is_sync_point(&close) => {
                return failure(self.unclosed(open.span, "{", "}", &format!("the body of `{name}`"), &close));
            }
            _ => {
                let diagnostic =
                    self.expected_after("`}` after the final expression", "`}`", body.expr.span.end, &close);
                return failure(match close.tok {
                    tok if starts_operand(tok) => {
                        diagnostic.with_help("is an operator missing between the two expressions?")
                    }
                    _ => diagnostic,
                });
            }
        }
        if had_error {
            return Err(nom::Err::Failure(Fail::ResumeAt { at: close.span.end }));
        }
        Ok((close.after, (lets, body.expr, close.span)))
    }

    /// Where to resume after a broken `let` that started at `stmt_start`, with its error
    /// at `error_at`: the next line, past both, that starts with `let`. Stops at a line
    /// that starts an item, since that line belongs to the top-level recovery.
    fn next_let_line(&self, stmt_start: usize, error_at: usize) -> Option<&'a str> {
        let mut line_start = self.line_start(stmt_start);
        let not_before = self.line_start(error_at);
        loop {
            let newline = self.src[line_start..].find('\n')?;
            line_start += newline + 1;
            let line = self.src[line_start..].trim_start_matches([' ', '\t']);
            let word = identifier(line).ok().map(|(_, word)| word);
            if word.is_some_and(|word| ITEM_KEYWORDS.contains(&word)) {
                return None;
            }
            if line_start >= not_before && word == Some("let") {
                return Some(line);
            }
        }
    }

    /// `let NAME = expr;`
    fn let_binding(&mut self, keyword: Lexeme<'a>) -> PResult<'a, Let> {
        let (rest, name) = self.name(keyword.after, "a name after `let`", |diagnostic, _| diagnostic)?;
        let equals = self.lexeme(rest);
        if equals.tok != Tok::Punct("=") {
            let diagnostic = self.expected(&format!("`=` after `let {}`", name.name), &equals);
            return failure(match equals.tok {
                Tok::Punct("==") => diagnostic.with_help("a binding uses a single `=`"),
                Tok::Punct(":") => diagnostic.with_help("`let` bindings take no type annotation"),
                _ => diagnostic,
            });
        }
        let (rest, value) = self.expr(equals.after, 0)?;
        let semicolon = self.lexeme(rest);
        if semicolon.tok != Tok::Punct(";") {
            let diagnostic = self
                .expected_after(
                    &format!("`;` after the value of `let {}`", name.name),
                    "`;`",
                    value.expr.span.end,
                    &semicolon,
                )
                .with_help("`let` bindings end with `;`");
            return failure(match semicolon.tok {
                tok if starts_operand(tok) && !self.on_later_line(value.expr.span.end, semicolon.span.start) => {
                    diagnostic.with_help("is an operator missing between the two expressions?")
                }
                _ => diagnostic,
            });
        }
        let binding = Let { span: Span::new(keyword.span.start, semicolon.span.end), name, value: value.expr };
        Ok((semicolon.after, binding))
    }

    // ----- expressions ----------------------------------------------------------------
    //
    // These functions recurse once per nesting level, so their stack frames are kept
    // small: every diagnostic is built inside a closure passed to `fail_with`, which keeps
    // the `Diagnostic` and its temporaries out of the recursive frames (an unoptimised
    // build would otherwise reserve space for each of them in every frame).

    /// Any expression. `depth` counts the expressions this one is nested in.
    fn expr(&mut self, i: &'a str, depth: usize) -> PResult<'a, Node> {
        if depth >= MAX_DEPTH {
            let at = self.lexeme(i).span;
            return fail_with(|| too_deep(at));
        }
        self.binary(i, depth)
    }

    /// Binary operators by precedence climbing with explicit stacks (shunting-yard), so a
    /// chain of any length uses constant stack space. All operators are left-associative;
    /// comparisons do not chain at all.
    fn binary(&mut self, i: &'a str, depth: usize) -> PResult<'a, Node> {
        let (mut i, first) = self.unary(i, depth)?;
        let mut operands = vec![first];
        let mut operators: Vec<(BinaryOp, Span)> = Vec::new();
        let mut comparison: Option<(BinaryOp, Span)> = None;
        loop {
            let next = self.lexeme(i);
            let Tok::Punct(punct) = next.tok else { break };
            let Some(op) = binary_op(punct) else {
                self.check_misused_operator(&next)?;
                break;
            };
            if is_comparison(op) {
                if let Some(first) = comparison {
                    return fail_with(|| chained_comparison(first, (op, next.span)));
                }
                comparison = Some((op, next.span));
            }
            while let Some(&(top, _)) = operators.last() {
                if top.precedence() < op.precedence() {
                    break;
                }
                reduce(&mut operands, &mut operators)?;
            }
            operators.push((op, next.span));
            let (rest, rhs) = self.unary(next.after, depth)?;
            operands.push(rhs);
            i = rest;
        }
        while !operators.is_empty() {
            reduce(&mut operands, &mut operators)?;
        }
        match operands.pop() {
            Some(node) => Ok((i, node)),
            None => Err(nom::Err::Failure(Fail::Mismatch { rest_len: i.len() })),
        }
    }

    /// Rejects operators from other languages with a pointer to this one's spelling.
    #[inline(never)]
    fn check_misused_operator(&self, next: &Lexeme<'a>) -> Result<(), nom::Err<Fail>> {
        let (message, help) = match next.tok {
            Tok::Punct("=") => {
                let help = match self.lexeme(next.after).tok {
                    Tok::Punct(">") => "did you mean `>=`?",
                    Tok::Punct("<") => "did you mean `<=`?",
                    _ => "did you mean `==`?",
                };
                ("`=` cannot be used in an expression", help)
            }
            Tok::Punct("&&") => ("`&&` is not an operator", "intersection and logical and are written `&`"),
            Tok::Punct("||") => ("`||` is not an operator", "union and logical or are written `|`"),
            Tok::Punct("**") => ("there is no power operator", "multiply explicitly, for example `x * x`"),
            _ => return Ok(()),
        };
        Err(nom::Err::Failure(Fail::Diag(Box::new(
            Diagnostic::error(codes::SYNTAX, message, next.span, "not an operator").with_help(help),
        ))))
    }

    /// Prefix `-` and `!`, collected by a loop and applied innermost first.
    fn unary(&mut self, i: &'a str, depth: usize) -> PResult<'a, Node> {
        let mut operators: Vec<(UnaryOp, Span)> = Vec::new();
        let mut i = i;
        loop {
            let next = self.lexeme(i);
            let op = match next.tok {
                Tok::Punct("-") => UnaryOp::Neg,
                Tok::Punct("!") => UnaryOp::Not,
                _ => break,
            };
            if operators.len() >= MAX_DEPTH {
                return fail_with(|| too_deep(next.span));
            }
            operators.push((op, next.span));
            i = next.after;
        }
        let (rest, mut node) = self.postfix(i, depth)?;
        while let Some((op, op_span)) = operators.pop() {
            let span = op_span.to(node.expr.span);
            let kind = ExprKind::Unary { op, op_span, operand: Box::new(node.expr) };
            node = checked(kind, span, node.height + 1, op_span)?;
        }
        Ok((rest, node))
    }

    /// A primary followed by any number of `[start:end]` slices and `@curve` annotations.
    fn postfix(&mut self, i: &'a str, depth: usize) -> PResult<'a, Node> {
        let (mut i, mut node) = self.primary(i, depth)?;
        loop {
            let next = self.lexeme(i);
            let (rest, built) = match next.tok {
                Tok::Punct("[") => self.slice(node, next, depth)?,
                Tok::Punct("@") => self.annotation(node, next)?,
                _ => break,
            };
            node = built;
            i = rest;
        }
        Ok((i, node))
    }

    /// `@curve` after `operand`; `at` is the `@`.
    fn annotation(&mut self, operand: Node, at: Lexeme<'a>) -> PResult<'a, Node> {
        let (rest, curve) = self.name(at.after, "a curve name after `@`", |diagnostic, _| {
            diagnostic.with_help("annotate an operand with a curve name, like `P@tp`, or `@none` for no curve")
        })?;
        let span = operand.expr.span.to(curve.span);
        let height = operand.height + 1;
        let kind = ExprKind::Annotated { operand: Box::new(operand.expr), curve };
        Ok((rest, checked(kind, span, height, at.span)?))
    }

    /// `[start:end]` after `base`; `open` is the `[`.
    fn slice(&mut self, base: Node, open: Lexeme<'a>, depth: usize) -> PResult<'a, Node> {
        let mut height = base.height;
        let mut i = open.after;
        let mut start = None;
        if self.lexeme(i).tok != Tok::Punct(":") {
            let (rest, bound) = self.expr(i, depth + 1)?;
            height = height.max(bound.height);
            start = Some(Box::new(bound.expr));
            i = rest;
        }
        let colon = self.lexeme(i);
        if colon.tok != Tok::Punct(":") {
            return fail_with(|| self.slice_without_colon(&open, &colon, start.as_deref()));
        }
        i = colon.after;
        let mut end = None;
        let after_colon = self.lexeme(i);
        if matches!(after_colon.tok, Tok::Punct("}") | Tok::Punct(")") | Tok::Punct(";") | Tok::Punct(","))
            || self.is_sync_point(&after_colon)
        {
            return fail_with(|| {
                if self.is_sync_point(&after_colon) {
                    self.unclosed(open.span, "[", "]", "the slice", &after_colon)
                } else {
                    self.expected("`]` to close this slice", &after_colon)
                        .with_secondary(open.span, "slice starts here")
                }
            });
        }
        if after_colon.tok != Tok::Punct("]") {
            let (rest, bound) = self.expr(i, depth + 1)?;
            height = height.max(bound.height);
            end = Some(Box::new(bound.expr));
            i = rest;
        }
        let close = self.lexeme(i);
        if close.tok != Tok::Punct("]") {
            return fail_with(|| {
                if self.is_sync_point(&close) {
                    self.unclosed(open.span, "[", "]", "the slice", &close)
                } else {
                    self.expected("`]` to close this slice", &close).with_secondary(open.span, "slice starts here")
                }
            });
        }
        let span = base.expr.span.to(close.span);
        let kind = ExprKind::Slice { base: Box::new(base.expr), start, end };
        Ok((close.after, checked(kind, span, height + 1, open.span)?))
    }

    #[inline(never)]
    fn slice_without_colon(&self, open: &Lexeme<'a>, found: &Lexeme<'a>, start: Option<&Expr>) -> Diagnostic {
        if self.is_sync_point(found) {
            return self.unclosed(open.span, "[", "]", "the slice", found);
        }
        let diagnostic = self.expected("`:` in this slice", found).with_secondary(open.span, "slice starts here");
        match (found.tok, start.map(|bound| &bound.kind)) {
            (Tok::Punct("]"), Some(ExprKind::Literal(Literal::Int(k)))) if *k < i64::MAX => diagnostic
                .with_help(format!("slices take a range of classes; to keep class {k} write `[{k}:{}]`", k + 1)),
            (Tok::Punct("]"), _) => {
                diagnostic.with_help("slices take a range of classes: `x[start:end]`, `x[start:]` or `x[:end]`")
            }
            _ => diagnostic.with_help("slices are written `x[start:end]`; either bound may be left out"),
        }
    }

    /// Literals, names, calls, `(expr)` and `if`.
    fn primary(&mut self, i: &'a str, depth: usize) -> PResult<'a, Node> {
        let next = self.lexeme(i);
        match next.tok {
            Tok::Number(_) => {
                let (rest, literal) = self.number_literal(&next, false)?;
                Ok((rest, Node::leaf(ExprKind::Literal(literal), next.span)))
            }
            Tok::Ident("true") => Ok((next.after, Node::leaf(ExprKind::Literal(Literal::Bool(true)), next.span))),
            Tok::Ident("false") => Ok((next.after, Node::leaf(ExprKind::Literal(Literal::Bool(false)), next.span))),
            Tok::Ident("if") => self.if_expr(next, depth),
            Tok::Ident(word) if is_keyword(word) => fail_with(|| keyword_in_expression(word, next.span)),
            Tok::Ident(word) => {
                let name = Ident { name: word.to_string(), span: next.span };
                let open = self.lexeme(next.after);
                if open.tok == Tok::Punct("(") {
                    self.call(name, open, depth)
                } else {
                    Ok((next.after, Node::leaf(ExprKind::Name(name), next.span)))
                }
            }
            Tok::Punct("(") => self.paren(next, depth),
            _ => fail_with(|| self.not_an_expression(&next)),
        }
    }

    #[inline(never)]
    fn not_an_expression(&self, found: &Lexeme<'a>) -> Diagnostic {
        match found.tok {
            Tok::Quote => self
                .expected("an expression", found)
                .with_note("strings are only used for paths in `use \"file.metric\";`"),
            Tok::Other('.') if found.after.starts_with(|c: char| c.is_ascii_digit()) => Diagnostic::error(
                codes::LITERAL,
                "numbers need a digit before the decimal point",
                found.span,
                "expected a digit before `.`",
            )
            .with_help(format!("write `0.{}`", shorten(take_digits(found.after)))),
            _ => self.expected("an expression", found),
        }
    }

    /// `( expr )`; `open` is the `(`.
    fn paren(&mut self, open: Lexeme<'a>, depth: usize) -> PResult<'a, Node> {
        let (rest, inner) = self.expr(open.after, depth + 1)?;
        let close = self.lexeme(rest);
        if close.tok != Tok::Punct(")") {
            return fail_with(|| {
                if self.is_sync_point(&close) {
                    self.unclosed(open.span, "(", ")", "the parenthesis", &close)
                } else {
                    self.expected("`)` to close this parenthesis", &close)
                        .with_secondary(open.span, "to match this `(`")
                }
            });
        }
        let span = open.span.to(close.span);
        let height = inner.height + 1;
        Ok((close.after, checked(ExprKind::Paren(Box::new(inner.expr)), span, height, open.span)?))
    }

    /// `if cond then a else b`; the `else` branch extends as far right as possible.
    fn if_expr(&mut self, keyword: Lexeme<'a>, depth: usize) -> PResult<'a, Node> {
        let (rest, cond) = self.expr(keyword.after, depth + 1)?;
        let then = self.lexeme(rest);
        if then.tok != Tok::Ident("then") {
            return fail_with(|| {
                let diagnostic = self
                    .expected("`then` after the condition", &then)
                    .with_secondary(keyword.span, "this `if` needs `then` and `else`");
                match then.tok {
                    Tok::Punct("{") => {
                        diagnostic.with_help("write `if cond then a else b`; braces only enclose bodies")
                    }
                    _ => diagnostic.with_help("write `if cond then a else b`"),
                }
            });
        }
        let (rest, then_branch) = self.expr(then.after, depth + 1)?;
        let otherwise = self.lexeme(rest);
        if otherwise.tok != Tok::Ident("else") {
            return fail_with(|| {
                self.expected("`else`", &otherwise)
                    .with_secondary(keyword.span, "this `if` has no `else`")
                    .with_note("an `if` is an expression, so it needs a value for both outcomes")
                    .with_help("add `else` and the value to use when the condition is false")
            });
        }
        let (rest, else_branch) = self.expr(otherwise.after, depth + 1)?;
        let height = 1 + cond.height.max(then_branch.height).max(else_branch.height);
        let span = keyword.span.to(else_branch.expr.span);
        let kind = ExprKind::If {
            cond: Box::new(cond.expr),
            then_branch: Box::new(then_branch.expr),
            else_branch: Box::new(else_branch.expr),
        };
        Ok((rest, checked(kind, span, height, keyword.span)?))
    }

    /// `callee(arg, name: arg, ...)`; `open` is the `(`.
    fn call(&mut self, callee: Ident, open: Lexeme<'a>, depth: usize) -> PResult<'a, Node> {
        let mut args: Vec<Arg> = Vec::new();
        let mut height = 1;
        let mut i = open.after;
        loop {
            let next = self.lexeme(i);
            if next.tok == Tok::Punct(")") {
                let span = callee.span.to(next.span);
                let callee_span = callee.span;
                return Ok((next.after, checked(ExprKind::Call { callee, args }, span, height, callee_span)?));
            }
            if self.is_sync_point(&next) {
                return fail_with(|| self.unclosed_call(&callee, &open, &next));
            }
            if matches!(next.tok, Tok::Punct("}") | Tok::Punct(";") | Tok::Punct("]")) {
                return fail_with(|| self.bad_argument_separator(&callee, &open, &next, "an argument or `)`"));
            }
            let (value_input, arg_name) = self.argument_name(next)?;
            let (rest, value) = self.expr(value_input, depth + 1)?;
            height = height.max(value.height + 1);
            let start = arg_name.as_ref().map_or(value.expr.span, |name| name.span);
            args.push(Arg { span: start.to(value.expr.span), name: arg_name, value: value.expr });
            let separator = self.lexeme(rest);
            match separator.tok {
                Tok::Punct(",") => i = separator.after,
                Tok::Punct(")") => i = rest,
                _ => {
                    return fail_with(|| {
                        self.bad_argument_separator(&callee, &open, &separator, "`,` or `)` after this argument")
                    })
                }
            }
        }
    }

    /// `name:` before an argument makes it a named argument; `name =` is a likely slip
    /// for it. Returns where the argument's value starts.
    #[inline(never)]
    fn argument_name(&self, next: Lexeme<'a>) -> Result<(&'a str, Option<Ident>), nom::Err<Fail>> {
        let Tok::Ident(word) = next.tok else {
            return Ok((next.at, None));
        };
        if is_keyword(word) {
            return Ok((next.at, None));
        }
        let after = self.lexeme(next.after);
        match after.tok {
            Tok::Punct(":") => Ok((after.after, Some(Ident { name: word.to_string(), span: next.span }))),
            Tok::Punct("=") => Err(nom::Err::Failure(Fail::Diag(Box::new(
                Diagnostic::error(
                    codes::SYNTAX,
                    "named arguments are written with `:`",
                    after.span,
                    "expected `:` here",
                )
                .with_help(format!("write `{word}: value`")),
            )))),
            _ => Ok((next.at, None)),
        }
    }

    #[inline(never)]
    fn unclosed_call(&self, callee: &Ident, open: &Lexeme<'a>, found: &Lexeme<'a>) -> Diagnostic {
        self.unclosed(open.span, "(", ")", &format!("the call to `{}`", callee.name), found)
    }

    #[inline(never)]
    fn bad_argument_separator(
        &self,
        callee: &Ident,
        open: &Lexeme<'a>,
        found: &Lexeme<'a>,
        expected: &str,
    ) -> Diagnostic {
        if self.is_sync_point(found) {
            return self.unclosed_call(callee, open, found);
        }
        let diagnostic = self
            .expected(expected, found)
            .with_secondary(callee.span.to(open.span), format!("in this call to `{}`", callee.name));
        match found.tok {
            tok if starts_operand(tok) => diagnostic.with_help("is a `,` or an operator missing before it?"),
            Tok::Punct("}") | Tok::Punct(";") | Tok::Punct("]") => {
                diagnostic.with_help(format!("add `)` to close the call to `{}`", callee.name))
            }
            _ => diagnostic,
        }
    }
}

/// Builds a diagnostic in its own frame (see the note on the expression functions).
#[cold]
#[inline(never)]
fn fail_with<'a, T>(make: impl FnOnce() -> Diagnostic) -> PResult<'a, T> {
    Err(nom::Err::Failure(Fail::Diag(Box::new(make()))))
}

/// A node of the given height, or the "too deep" error at `blame`.
fn checked(kind: ExprKind, span: Span, height: usize, blame: Span) -> Result<Node, nom::Err<Fail>> {
    if height > MAX_DEPTH {
        return Err(nom::Err::Failure(Fail::Diag(Box::new(too_deep(blame)))));
    }
    Ok(Node { expr: Expr { kind, span }, height })
}

/// Pops one operator and its two operands and pushes the combined node.
fn reduce(operands: &mut Vec<Node>, operators: &mut Vec<(BinaryOp, Span)>) -> Result<(), nom::Err<Fail>> {
    let (Some((op, op_span)), Some(rhs), Some(lhs)) = (operators.pop(), operands.pop(), operands.pop()) else {
        return Err(nom::Err::Failure(Fail::Mismatch { rest_len: 0 }));
    };
    let height = 1 + lhs.height.max(rhs.height);
    let span = lhs.expr.span.to(rhs.expr.span);
    let kind = ExprKind::Binary { op, op_span, lhs: Box::new(lhs.expr), rhs: Box::new(rhs.expr) };
    operands.push(checked(kind, span, height, op_span)?);
    Ok(())
}

fn chained_comparison((first_op, first_span): (BinaryOp, Span), (op, span): (BinaryOp, Span)) -> Diagnostic {
    Diagnostic::error(codes::CHAINED_COMPARISON, "comparison operators cannot be chained", span, "second comparison")
        .with_secondary(first_span, "first comparison")
        .with_help(format!(
            "compare twice and combine the results: `(a {} b) & (b {} c)`",
            first_op.symbol(),
            op.symbol()
        ))
}

fn keyword_in_expression(word: &str, span: Span) -> Diagnostic {
    let diagnostic = Diagnostic::error(
        codes::SYNTAX,
        format!("expected an expression, found keyword `{word}`"),
        span,
        "expected an expression",
    );
    match word {
        "then" | "else" => diagnostic.with_help("`then` and `else` belong to `if cond then a else b`"),
        "let" => diagnostic.with_help("`let` bindings are statements: `let name = value;` at the start of a body"),
        "metric" | "loss" | "use" => diagnostic.with_help("is a closing `)` or `}` missing above?"),
        _ => diagnostic,
    }
}

/// Where to continue after an error.
enum Recovery {
    /// Look for the next item starting from this byte.
    From(usize),
    /// Continue right at this byte.
    Exactly(usize),
}

fn take_digits(i: &str) -> &str {
    let end = i.find(|c: char| !c.is_ascii_digit()).unwrap_or(i.len());
    &i[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(source: &str) -> Expr {
        let file = match parse(source) {
            Ok(file) => file,
            Err(diagnostics) => panic!("{source:?} failed: {diagnostics:#?}"),
        };
        match file.items.into_iter().next() {
            Some(Item::Metric(definition)) => definition.body,
            other => panic!("expected a metric, got {other:?}"),
        }
    }

    fn first_error(source: &str) -> Diagnostic {
        match parse(source) {
            Ok(file) => panic!("{source:?} parsed: {file:?}"),
            Err(mut diagnostics) => diagnostics.remove(0),
        }
    }

    #[test]
    fn precedence_follows_the_operator_table() {
        let body = body_of("metric m { a | b & c + d * e }");
        let ExprKind::Binary { op: BinaryOp::Or, rhs, .. } = body.kind else { panic!("{body:?}") };
        let ExprKind::Binary { op: BinaryOp::And, rhs, .. } = rhs.kind else { panic!("{rhs:?}") };
        let ExprKind::Binary { op: BinaryOp::Add, rhs, .. } = rhs.kind else { panic!("{rhs:?}") };
        assert!(matches!(rhs.kind, ExprKind::Binary { op: BinaryOp::Mul, .. }));
    }

    #[test]
    fn binary_operators_are_left_associative() {
        let body = body_of("metric m { a - b - c }");
        let ExprKind::Binary { op: BinaryOp::Sub, lhs, rhs, .. } = body.kind else { panic!() };
        assert!(matches!(lhs.kind, ExprKind::Binary { op: BinaryOp::Sub, .. }));
        assert!(matches!(rhs.kind, ExprKind::Name(_)));
    }

    #[test]
    fn spans_cover_the_whole_node() {
        let source = "metric m { count(P@tp & L)[1:] }";
        let body = body_of(source);
        assert_eq!(&source[body.span.start..body.span.end], "count(P@tp & L)[1:]");
    }

    #[test]
    fn postfix_binds_tighter_than_prefix() {
        let body = body_of("metric m { -x[1:] }");
        let ExprKind::Unary { operand, .. } = body.kind else { panic!() };
        assert!(matches!(operand.kind, ExprKind::Slice { .. }));
    }

    #[test]
    fn negative_defaults_and_extreme_integers() {
        let source = "metric m(a: int = -9223372036854775808, b: float = -0.5) { a }";
        let file = parse(source).expect("parses");
        let Item::Metric(definition) = &file.items[0] else { panic!() };
        assert_eq!(definition.params[0].default, Literal::Int(i64::MIN));
        assert_eq!(definition.params[1].default, Literal::Float(-0.5));
    }

    #[test]
    fn chained_comparisons_are_rejected() {
        assert_eq!(first_error("metric m { a < b < c }").code, codes::CHAINED_COMPARISON);
    }

    #[test]
    fn depth_limit_is_exact() {
        let ok = format!("metric m {{ {}x{} }}", "(".repeat(MAX_DEPTH - 1), ")".repeat(MAX_DEPTH - 1));
        assert!(parse(&ok).is_ok());
        let deep = format!("metric m {{ {}x{} }}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert_eq!(first_error(&deep).code, codes::TOO_DEEP);
    }

    #[test]
    fn recovery_resumes_at_the_item_an_unclosed_brace_runs_into() {
        let source = "metric a {\n    count(P)\n\nmetric b {\n    1 +\n}\nmetric c { ) }\n";
        let diagnostics = parse(source).expect_err("has errors");
        let codes: Vec<&str> = diagnostics.iter().map(|diagnostic| diagnostic.code).collect();
        assert_eq!(codes, [codes::UNCLOSED, codes::SYNTAX, codes::SYNTAX], "{diagnostics:#?}");
    }

    #[test]
    fn errors_in_several_lets_are_all_reported() {
        let source = "metric m {\n    let a = 1 +;\n    let b = (2;\n    a\n}\nmetric n { x y }\n";
        let diagnostics = parse(source).expect_err("has errors");
        assert_eq!(diagnostics.len(), 3, "{diagnostics:#?}");
    }
}
