//! The canonical formatter: [`File`] back to `.metric` source text.
//!
//! Layout: `use` items first as written (consecutive ones stay together), a blank line
//! between items, `##` doc lines above each definition, the header on one line
//! (`metric bf1(tol: int = 5) with pieces = 1 {`), then each `let` and the final
//! expression on its own line, indented by four spaces. Binary operators get a space on
//! each side; `x[1:]`, `P@tp`, `f(a, where: c)` are written tight.
//!
//! Guarantees, for every tree produced by [`crate::parse`]:
//!
//! * Round trip: `parse(&format_file(&file))` succeeds and equals `file` up to spans
//!   (compare with [`strip_spans`]).
//! * Idempotence: formatting the re-parsed file gives the same text again.
//!
//! Parentheses are printed where the tree has [`ExprKind::Paren`] nodes, which the parser
//! keeps. For trees built by hand the formatter also adds the parentheses that precedence
//! requires (never for parsed trees, where they are always explicit), so the printed text
//! means the same tree. Floats print in Rust's shortest round-trip form, which always
//! shows a `.` or an exponent (`1.0`, `0.1`, `1e-8`), so they re-parse as floats.
//!
//! Ordinary `#` comments are not part of the tree and are dropped; doc comments survive.

use std::fmt::Write;

use crate::ast::{Definition, Expr, ExprKind, File, Ident, Item, Let, Literal, OptionValue, ParamType, Span};

const INDENT: &str = "    ";

/// Formats a whole file in canonical style, ending with a newline.
pub fn format_file(file: &File) -> String {
    let mut out = String::new();
    let mut previous: Option<&Item> = None;
    for item in &file.items {
        if let Some(previous) = previous {
            let both_use = matches!((previous, item), (Item::Use(_), Item::Use(_)));
            if !both_use {
                out.push('\n');
            }
        }
        match item {
            Item::Use(item) => {
                let _ = writeln!(out, "use \"{}\";", item.path);
            }
            Item::Metric(definition) => definition_text(&mut out, "metric", definition),
            Item::Loss(definition) => definition_text(&mut out, "loss", definition),
        }
        previous = Some(item);
    }
    out
}

/// Formats one expression on a single line, as [`format_file`] would.
pub fn format_expr(expr: &Expr) -> String {
    let mut out = String::new();
    expr_text(&mut out, expr, 0, true);
    out
}

/// The source form of a literal: `5`, `-0.5`, `1e-8`, `true`.
pub fn format_literal(literal: &Literal) -> String {
    match literal {
        Literal::Int(value) => value.to_string(),
        // `{:?}` is the shortest text that parses back to the same value, and keeps a
        // `.0` or exponent on integral values, so `1.0` stays a float.
        Literal::Float(value) => format!("{value:?}"),
        Literal::Bool(value) => value.to_string(),
    }
}

/// An option's value as written: a literal or a parameter's name.
pub fn format_option_value(value: &OptionValue) -> String {
    match value {
        OptionValue::Literal(literal) => format_literal(literal),
        OptionValue::Name(name) => name.name.clone(),
    }
}

/// The keyword for a parameter type.
pub fn format_param_type(ty: ParamType) -> &'static str {
    match ty {
        ParamType::Int => "int",
        ParamType::Float => "float",
        ParamType::Bool => "bool",
        ParamType::Floats => "floats",
    }
}

fn definition_text(out: &mut String, keyword: &str, definition: &Definition) {
    for line in &definition.doc {
        // A doc line holding a line break would turn its second half into code.
        for part in line.split('\n') {
            if part.is_empty() {
                out.push_str("##\n");
            } else {
                let _ = writeln!(out, "## {part}");
            }
        }
    }
    let _ = write!(out, "{keyword} {}", definition.name.name);
    if !definition.params.is_empty() {
        out.push('(');
        for (index, param) in definition.params.iter().enumerate() {
            if index > 0 {
                out.push_str(", ");
            }
            let _ = write!(
                out,
                "{}: {} = {}",
                param.name.name,
                format_param_type(param.ty),
                format_literal(&param.default)
            );
        }
        out.push(')');
    }
    if !definition.options.is_empty() {
        out.push_str(" with ");
        for (index, option) in definition.options.iter().enumerate() {
            if index > 0 {
                out.push_str(", ");
            }
            let _ = write!(out, "{} = {}", option.key.name, format_option_value(&option.value));
        }
    }
    out.push_str(" {\n");
    for Let { name, value, .. } in &definition.lets {
        let _ = write!(out, "{INDENT}let {} = ", name.name);
        expr_text(out, value, 0, true);
        out.push_str(";\n");
    }
    out.push_str(INDENT);
    expr_text(out, &definition.body, 0, true);
    out.push_str("\n}\n");
}

/// Binding strength of an expression's outermost construct; larger binds tighter.
/// Binary operators use [`crate::ast::BinaryOp::precedence`] (1 to 6).
fn strength(expr: &Expr) -> u8 {
    match &expr.kind {
        ExprKind::If { .. } => 0,
        ExprKind::Binary { op, .. } => op.precedence(),
        ExprKind::Unary { .. } => 7,
        ExprKind::Slice { .. } | ExprKind::Annotated { .. } => 8,
        ExprKind::Literal(_) | ExprKind::Name(_) | ExprKind::Call { .. } | ExprKind::Paren(_) => 9,
    }
}

/// Writes `expr` where the context needs at least binding strength `min`. `open_right`
/// says whether nothing of the enclosing expression follows on the right, which is the
/// only place an `if` may stand unparenthesised (its `else` branch would swallow it).
fn expr_text(out: &mut String, expr: &Expr, min: u8, open_right: bool) {
    let needs_parens = match expr.kind {
        ExprKind::If { .. } => !open_right,
        _ => strength(expr) < min,
    };
    if needs_parens {
        out.push('(');
        expr_text(out, expr, 0, true);
        out.push(')');
        return;
    }
    match &expr.kind {
        ExprKind::Literal(literal) => out.push_str(&format_literal(literal)),
        ExprKind::Name(Ident { name, .. }) => out.push_str(name),
        ExprKind::Unary { op, operand, .. } => {
            out.push_str(op.symbol());
            expr_text(out, operand, 7, open_right);
        }
        ExprKind::Binary { op, lhs, rhs, .. } => {
            let precedence = op.precedence();
            // Comparisons do not chain, so a comparison operand of a comparison needs
            // parentheses on either side; other operators are left-associative.
            let comparison = precedence == 1;
            let left_min = if comparison { precedence + 1 } else { precedence };
            expr_text(out, lhs, left_min, false);
            let _ = write!(out, " {} ", op.symbol());
            expr_text(out, rhs, precedence + 1, open_right);
        }
        ExprKind::Call { callee, args } => {
            let _ = write!(out, "{}(", callee.name);
            for (index, arg) in args.iter().enumerate() {
                if index > 0 {
                    out.push_str(", ");
                }
                if let Some(name) = &arg.name {
                    let _ = write!(out, "{}: ", name.name);
                }
                expr_text(out, &arg.value, 0, true);
            }
            out.push(')');
        }
        ExprKind::Slice { base, start, end } => {
            expr_text(out, base, 8, false);
            out.push('[');
            if let Some(start) = start {
                expr_text(out, start, 0, true);
            }
            out.push(':');
            if let Some(end) = end {
                expr_text(out, end, 0, true);
            }
            out.push(']');
        }
        ExprKind::If { cond, then_branch, else_branch } => {
            out.push_str("if ");
            expr_text(out, cond, 0, true);
            out.push_str(" then ");
            expr_text(out, then_branch, 0, true);
            out.push_str(" else ");
            expr_text(out, else_branch, 0, open_right);
        }
        ExprKind::Annotated { operand, curve } => {
            expr_text(out, operand, 8, false);
            let _ = write!(out, "@{}", curve.name);
        }
        ExprKind::Paren(inner) => {
            out.push('(');
            expr_text(out, inner, 0, true);
            out.push(')');
        }
    }
}

/// A copy of `file` with every span set to `0..0`, for comparing trees by structure
/// (for example a file with its formatted and re-parsed self).
pub fn strip_spans(file: &File) -> File {
    let mut file = file.clone();
    for item in &mut file.items {
        match item {
            Item::Use(item) => {
                item.path_span = Span::default();
                item.span = Span::default();
            }
            Item::Metric(definition) | Item::Loss(definition) => {
                definition.span = Span::default();
                definition.name.span = Span::default();
                for param in &mut definition.params {
                    param.name.span = Span::default();
                    param.ty_span = Span::default();
                    param.default_span = Span::default();
                    param.span = Span::default();
                }
                for option in &mut definition.options {
                    option.key.span = Span::default();
                    option.value_span = Span::default();
                    option.span = Span::default();
                }
                for binding in &mut definition.lets {
                    binding.name.span = Span::default();
                    binding.span = Span::default();
                    strip_expr(&mut binding.value);
                }
                strip_expr(&mut definition.body);
            }
        }
    }
    file
}

fn strip_expr(expr: &mut Expr) {
    expr.span = Span::default();
    match &mut expr.kind {
        ExprKind::Literal(_) => {}
        ExprKind::Name(name) => name.span = Span::default(),
        ExprKind::Unary { op_span, operand, .. } => {
            *op_span = Span::default();
            strip_expr(operand);
        }
        ExprKind::Binary { op_span, lhs, rhs, .. } => {
            *op_span = Span::default();
            strip_expr(lhs);
            strip_expr(rhs);
        }
        ExprKind::Call { callee, args } => {
            callee.span = Span::default();
            for arg in args {
                arg.span = Span::default();
                if let Some(name) = &mut arg.name {
                    name.span = Span::default();
                }
                strip_expr(&mut arg.value);
            }
        }
        ExprKind::Slice { base, start, end } => {
            strip_expr(base);
            if let Some(start) = start {
                strip_expr(start);
            }
            if let Some(end) = end {
                strip_expr(end);
            }
        }
        ExprKind::If { cond, then_branch, else_branch } => {
            strip_expr(cond);
            strip_expr(then_branch);
            strip_expr(else_branch);
        }
        ExprKind::Annotated { operand, curve } => {
            curve.span = Span::default();
            strip_expr(operand);
        }
        ExprKind::Paren(inner) => strip_expr(inner),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ast::{BinaryOp, UnaryOp};
    use crate::parse;

    fn name(text: &str) -> Expr {
        Expr { kind: ExprKind::Name(Ident { name: text.to_string(), span: Span::default() }), span: Span::default() }
    }

    fn binary(op: BinaryOp, lhs: Expr, rhs: Expr) -> Expr {
        let kind = ExprKind::Binary { op, op_span: Span::default(), lhs: Box::new(lhs), rhs: Box::new(rhs) };
        Expr { kind, span: Span::default() }
    }

    #[test]
    fn hand_built_trees_get_the_parentheses_precedence_needs() {
        let sum = binary(BinaryOp::Add, name("a"), name("b"));
        assert_eq!(format_expr(&binary(BinaryOp::Mul, sum.clone(), name("c"))), "(a + b) * c");
        assert_eq!(format_expr(&binary(BinaryOp::Sub, name("c"), sum.clone())), "c - (a + b)");
        let less = binary(BinaryOp::Lt, name("a"), name("b"));
        assert_eq!(format_expr(&binary(BinaryOp::Lt, less, name("c"))), "(a < b) < c");
        let negated = Expr {
            kind: ExprKind::Unary { op: UnaryOp::Neg, op_span: Span::default(), operand: Box::new(sum) },
            span: Span::default(),
        };
        assert_eq!(format_expr(&negated), "-(a + b)");
    }

    #[test]
    fn if_is_parenthesised_unless_it_ends_the_expression() {
        let file = parse("metric m { 1 + if c then 2 else 3 }").expect("parses");
        let Item::Metric(definition) = &file.items[0] else { panic!() };
        assert_eq!(format_expr(&definition.body), "1 + if c then 2 else 3");
        let left = binary(BinaryOp::Add, definition.body.clone(), name("d"));
        assert_eq!(format_expr(&left), "1 + (if c then 2 else 3) + d");
    }

    #[test]
    fn floats_keep_a_float_form() {
        assert_eq!(format_literal(&Literal::Float(1.0)), "1.0");
        assert_eq!(format_literal(&Literal::Float(1e-8)), "1e-8");
        assert_eq!(format_literal(&Literal::Float(2.5e3)), "2500.0");
        assert_eq!(format_literal(&Literal::Float(1e300)), "1e300");
    }
}
