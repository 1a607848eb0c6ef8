//! Tokens: identifiers, numbers, strings, punctuation and trivia (whitespace, `#`
//! comments), recognised with nom combinators, and one token of lookahead ([`lex`]).

use super::*;

pub(super) fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

pub(super) fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

pub(super) fn is_space(c: char) -> bool {
    c.is_ascii_whitespace()
}

/// Whether `word` is reserved (see [`KEYWORDS`]).
pub fn is_keyword(word: &str) -> bool {
    KEYWORDS.contains(&word)
}

/// `[A-Za-z_][A-Za-z0-9_]*`
pub(super) fn identifier(i: &str) -> IResult<&str, &str> {
    recognize(pair(satisfy(is_ident_start), take_while(is_ident_char)))(i)
}

/// `digits [. digits] [(e|E) [+|-] digits]`. What may not follow a number (a letter, a
/// lone `.`) is checked by [`Parser::number_literal`], which can explain the problem.
pub(super) fn number(i: &str) -> IResult<&str, &str> {
    recognize(tuple((digit1, opt(pair(char('.'), digit1)), opt(tuple((one_of("eE"), opt(one_of("+-")), digit1))))))(i)
}

/// The text of a string after its opening `"`, up to (not including) the closing `"` or
/// the end of the line, whichever comes first. Strings have no escapes: they only hold
/// file paths.
pub(super) fn string_body(i: &str) -> IResult<&str, &str, Fail> {
    take_till(|c| c == '"' || c == '\n')(i)
}

/// Skips whitespace and `#` comments (doc comments included).
pub(super) fn trivia(i: &str) -> &str {
    let comment = recognize(preceded(char('#'), take_till(|c| c == '\n')));
    let result: IResult<&str, usize> = many0_count(alt((take_while1(is_space), comment)))(i);
    match result {
        Ok((rest, _)) => rest,
        Err(_) => i,
    }
}

/// One token, seen without consuming it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Tok<'a> {
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
pub(super) struct Lexeme<'a> {
    pub(super) tok: Tok<'a>,
    pub(super) span: Span,
    pub(super) at: &'a str,
    pub(super) after: &'a str,
}

pub(super) fn lex(i: &str) -> (Tok<'_>, usize) {
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
pub(super) fn shorten(text: &str) -> String {
    const LIMIT: usize = 32;
    match text.char_indices().nth(LIMIT) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

/// How a token is named in "found ..." messages.
pub(super) fn describe(tok: Tok<'_>) -> String {
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

pub(super) fn binary_op(punct: &str) -> Option<BinaryOp> {
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
pub(super) fn starts_operand(tok: Tok<'_>) -> bool {
    match tok {
        Tok::Ident(word) => !is_keyword(word),
        Tok::Number(_) | Tok::Punct("(") => true,
        _ => false,
    }
}

pub(super) fn is_comparison(op: BinaryOp) -> bool {
    matches!(op, BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge | BinaryOp::Eq | BinaryOp::Ne)
}

pub(super) fn too_deep(span: Span) -> Diagnostic {
    Diagnostic::error(
        codes::TOO_DEEP,
        format!("expression nests too deeply (more than {MAX_DEPTH} levels)"),
        span,
        format!("this goes past {MAX_DEPTH} levels of nesting"),
    )
    .with_note("the limit keeps later compiler passes, which walk expressions recursively, from overflowing the stack")
    .with_help("split the expression into smaller `let` bindings")
}
