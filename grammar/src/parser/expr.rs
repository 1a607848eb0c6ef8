//! Expressions: precedence climbing with explicit stacks for operator chains, prefix and
//! postfix loops, primaries (literals, names, calls, parentheses, `if`), and the checks
//! that keep every tree within [`MAX_DEPTH`].

use super::*;

impl<'a> Parser<'a> {
    // ----- expressions ----------------------------------------------------------------
    //
    // These functions recurse once per nesting level, so their stack frames are kept
    // small: every diagnostic is built inside a closure passed to `fail_with`, which keeps
    // the `Diagnostic` and its temporaries out of the recursive frames (an unoptimised
    // build would otherwise reserve space for each of them in every frame).

    /// Any expression. `depth` counts the expressions this one is nested in.
    pub(super) fn expr(&mut self, i: &'a str, depth: usize) -> PResult<'a, Node> {
        if depth >= MAX_DEPTH {
            let at = self.lexeme(i).span;
            return fail_with(|| too_deep(at));
        }
        self.binary(i, depth)
    }

    /// Binary operators by precedence climbing with explicit stacks (shunting-yard), so a
    /// chain of any length uses constant stack space. All operators are left-associative;
    /// comparisons do not chain at all.
    pub(super) fn binary(&mut self, i: &'a str, depth: usize) -> PResult<'a, Node> {
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
    pub(super) fn check_misused_operator(&self, next: &Lexeme<'a>) -> Result<(), nom::Err<Fail>> {
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
    pub(super) fn unary(&mut self, i: &'a str, depth: usize) -> PResult<'a, Node> {
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
    pub(super) fn postfix(&mut self, i: &'a str, depth: usize) -> PResult<'a, Node> {
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
    pub(super) fn annotation(&mut self, operand: Node, at: Lexeme<'a>) -> PResult<'a, Node> {
        let (rest, curve) = self.name(at.after, "a curve name after `@`", |diagnostic, _| {
            diagnostic.with_help("annotate an operand with a curve name, like `P@tp`, or `@none` for no curve")
        })?;
        let span = operand.expr.span.to(curve.span);
        let height = operand.height + 1;
        let kind = ExprKind::Annotated { operand: Box::new(operand.expr), curve };
        Ok((rest, checked(kind, span, height, at.span)?))
    }

    /// `[start:end]` after `base`; `open` is the `[`.
    pub(super) fn slice(&mut self, base: Node, open: Lexeme<'a>, depth: usize) -> PResult<'a, Node> {
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
    pub(super) fn slice_without_colon(
        &self,
        open: &Lexeme<'a>,
        found: &Lexeme<'a>,
        start: Option<&Expr>,
    ) -> Diagnostic {
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
    pub(super) fn primary(&mut self, i: &'a str, depth: usize) -> PResult<'a, Node> {
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
    pub(super) fn not_an_expression(&self, found: &Lexeme<'a>) -> Diagnostic {
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
    pub(super) fn paren(&mut self, open: Lexeme<'a>, depth: usize) -> PResult<'a, Node> {
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
    pub(super) fn if_expr(&mut self, keyword: Lexeme<'a>, depth: usize) -> PResult<'a, Node> {
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
    pub(super) fn call(&mut self, callee: Ident, open: Lexeme<'a>, depth: usize) -> PResult<'a, Node> {
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
    pub(super) fn argument_name(&self, next: Lexeme<'a>) -> Result<(&'a str, Option<Ident>), nom::Err<Fail>> {
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
    pub(super) fn unclosed_call(&self, callee: &Ident, open: &Lexeme<'a>, found: &Lexeme<'a>) -> Diagnostic {
        self.unclosed(open.span, "(", ")", &format!("the call to `{}`", callee.name), found)
    }

    #[inline(never)]
    pub(super) fn bad_argument_separator(
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
pub(super) fn fail_with<'a, T>(make: impl FnOnce() -> Diagnostic) -> PResult<'a, T> {
    Err(nom::Err::Failure(Fail::Diag(Box::new(make()))))
}

/// A node of the given height, or the "too deep" error at `blame`.
pub(super) fn checked(kind: ExprKind, span: Span, height: usize, blame: Span) -> Result<Node, nom::Err<Fail>> {
    if height > MAX_DEPTH {
        return Err(nom::Err::Failure(Fail::Diag(Box::new(too_deep(blame)))));
    }
    Ok(Node { expr: Expr { kind, span }, height })
}

/// Pops one operator and its two operands and pushes the combined node.
pub(super) fn reduce(operands: &mut Vec<Node>, operators: &mut Vec<(BinaryOp, Span)>) -> Result<(), nom::Err<Fail>> {
    let (Some((op, op_span)), Some(rhs), Some(lhs)) = (operators.pop(), operands.pop(), operands.pop()) else {
        return Err(nom::Err::Failure(Fail::Mismatch { rest_len: 0 }));
    };
    let height = 1 + lhs.height.max(rhs.height);
    let span = lhs.expr.span.to(rhs.expr.span);
    let kind = ExprKind::Binary { op, op_span, lhs: Box::new(lhs.expr), rhs: Box::new(rhs.expr) };
    operands.push(checked(kind, span, height, op_span)?);
    Ok(())
}

pub(super) fn chained_comparison((first_op, first_span): (BinaryOp, Span), (op, span): (BinaryOp, Span)) -> Diagnostic {
    Diagnostic::error(codes::CHAINED_COMPARISON, "comparison operators cannot be chained", span, "second comparison")
        .with_secondary(first_span, "first comparison")
        .with_help(format!(
            "compare twice and combine the results: `(a {} b) & (b {} c)`",
            first_op.symbol(),
            op.symbol()
        ))
}

pub(super) fn keyword_in_expression(word: &str, span: Span) -> Diagnostic {
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
