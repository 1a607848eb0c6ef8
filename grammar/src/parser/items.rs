//! The file and its items: `use`, `metric` and `loss` definitions with their parameters,
//! options, `let` bindings and bodies, and the recovery that resumes after an error.

use super::*;

impl<'a> Parser<'a> {
    // ----- top level ------------------------------------------------------------------

    pub(super) fn file(&mut self) -> File {
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

    pub(super) fn too_many_errors(&mut self, i: &'a str) {
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
    pub(super) fn top_trivia(&self, mut i: &'a str, docs: &mut Vec<String>) -> &'a str {
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

    pub(super) fn top_level_garbage(&self, found: &Lexeme<'a>) -> Diagnostic {
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
    pub(super) fn recover_item(&mut self, error: nom::Err<Fail>, item_start: usize) -> &'a str {
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
    pub(super) fn record(&mut self, error: nom::Err<Fail>) -> Recovery {
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

    pub(super) fn use_item(&mut self, keyword: Lexeme<'a>) -> PResult<'a, UseItem> {
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
    pub(super) fn definition(&mut self, keyword: Lexeme<'a>, kind: &str, doc: Vec<String>) -> PResult<'a, Definition> {
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
    pub(super) fn name(
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
    pub(super) fn params(&mut self, open: Lexeme<'a>) -> PResult<'a, Vec<Param>> {
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
    pub(super) fn param(&mut self, i: &'a str) -> PResult<'a, Param> {
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
            Tok::Ident("floats") => ParamType::Floats,
            Tok::Ident(word) => {
                let diagnostic = Diagnostic::error(
                    codes::SYNTAX,
                    format!("unknown parameter type `{}`", shorten(word)),
                    ty_lexeme.span,
                    "not a parameter type",
                )
                .with_note("parameter types are `int`, `float`, `bool` and `floats` (per-class weights)");
                let alias = match word {
                    "integer" | "i64" | "i32" | "usize" => Some("int"),
                    "f64" | "f32" | "double" | "real" | "number" => Some("float"),
                    "boolean" => Some("bool"),
                    "weights" | "list" | "vector" | "array" => Some("floats"),
                    _ => suggest(word, ["int", "float", "bool", "floats"]),
                };
                return failure(match alias {
                    Some(ty) => diagnostic.with_help(format!("did you mean `{ty}`?")),
                    None => diagnostic,
                });
            }
            _ => {
                return failure(
                    self.expected("a parameter type", &ty_lexeme)
                        .with_note("parameter types are `int`, `float`, `bool` and `floats` (per-class weights)"),
                )
            }
        };
        let equals = self.lexeme(ty_lexeme.after);
        if equals.tok != Tok::Punct("=") {
            let example = match ty {
                ParamType::Int => "0",
                ParamType::Float => "0.5",
                ParamType::Bool => "false",
                ParamType::Floats => "1",
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

    /// `with key = value {, key = value}`, each value a literal or a parameter's name (a trailing `,` before `{` is allowed).
    pub(super) fn options(&mut self, with: Lexeme<'a>) -> PResult<'a, Vec<OptionSetting>> {
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
            let value_start = self.lexeme(equals.after);
            let (rest, (value, value_span)) = match value_start.tok {
                Tok::Ident(word) if word != "true" && word != "false" && !is_keyword(word) => {
                    let name = Ident { name: word.to_string(), span: value_start.span };
                    (value_start.after, (OptionValue::Name(name), value_start.span))
                }
                _ => {
                    let (rest, (literal, span)) = self.literal_value(equals.after)?;
                    (rest, (OptionValue::Literal(literal), span))
                }
            };
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
    pub(super) fn literal_value(&self, i: &'a str) -> PResult<'a, (Literal, Span)> {
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
    pub(super) fn number_literal(&self, lexeme: &Lexeme<'a>, negative: bool) -> PResult<'a, Literal> {
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

    pub(super) fn bad_number(&self, lexeme: &Lexeme<'a>, message: &str, label: &str) -> Diagnostic {
        Diagnostic::error(codes::LITERAL, message, lexeme.span, label)
    }

    /// `{ let ...; expr }` after the opening brace. Returns the lets, the final
    /// expression and the span of the closing brace.
    ///
    /// An error in a `let` is recorded and parsing resumes at the next line starting with
    /// `let`, so one broken binding does not hide the errors of the next.
    pub(super) fn body(&mut self, open: Lexeme<'a>, kind: &str, name: &str) -> PResult<'a, (Vec<Let>, Expr, Span)> {
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
    pub(super) fn next_let_line(&self, stmt_start: usize, error_at: usize) -> Option<&'a str> {
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
    pub(super) fn let_binding(&mut self, keyword: Lexeme<'a>) -> PResult<'a, Let> {
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
}

/// Where to continue after an error.
pub(super) enum Recovery {
    /// Look for the next item starting from this byte.
    From(usize),
    /// Continue right at this byte.
    Exactly(usize),
}

pub(super) fn take_digits(i: &str) -> &str {
    let end = i.find(|c: char| !c.is_ascii_digit()).unwrap_or(i.len());
    &i[..end]
}
