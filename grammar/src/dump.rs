//! A readable dump of the syntax tree: what `losscc --emit ast` prints and what the
//! snapshot tests pin.
//!
//! One node per line, children indented by two spaces, each line ending in the node's
//! byte span `@start..end`. A child that plays a named role is prefixed with it
//! (`body:`, `start:`, `cond:`, a named argument's name). For example
//! `metric m(k: int = 1) { let x = a[k:]; -x }` dumps as
//!
//! ```text
//! metric m @0..42
//!   param k: int = 1 @9..19
//!   let x @23..37
//!     slice @31..36
//!       name a @31..32
//!       start: name k @33..34
//!   body: unary - @38..40
//!     name x @39..40
//! ```
//!
//! Literals print in source form, so `1e-8` shows as `float 1e-8`.

use std::fmt::Write;

use crate::ast::{Definition, Expr, ExprKind, File, Item};
use crate::format::{format_literal, format_param_type};

/// Dumps a whole file, one item after another.
pub fn dump_file(file: &File) -> String {
    let mut out = String::new();
    for item in &file.items {
        match item {
            Item::Use(item) => {
                let _ = writeln!(
                    out,
                    "use {:?} @{}..{} (path @{}..{})",
                    item.path, item.span.start, item.span.end, item.path_span.start, item.path_span.end
                );
            }
            Item::Metric(definition) => dump_definition(&mut out, "metric", definition),
            Item::Loss(definition) => dump_definition(&mut out, "loss", definition),
        }
    }
    out
}

/// Dumps one expression tree, its root at indentation level `indent`.
pub fn dump_expr(expr: &Expr, indent: usize) -> String {
    let mut out = String::new();
    expr_lines(&mut out, expr, indent, "");
    out
}

fn dump_definition(out: &mut String, keyword: &str, definition: &Definition) {
    let _ = writeln!(out, "{keyword} {} @{}..{}", definition.name.name, definition.span.start, definition.span.end);
    for line in &definition.doc {
        let _ = writeln!(out, "  doc {line:?}");
    }
    for param in &definition.params {
        let _ = writeln!(
            out,
            "  param {}: {} = {} @{}..{}",
            param.name.name,
            format_param_type(param.ty),
            format_literal(&param.default),
            param.span.start,
            param.span.end
        );
    }
    for option in &definition.options {
        let _ = writeln!(
            out,
            "  with {} = {} @{}..{}",
            option.key.name,
            crate::format::format_option_value(&option.value),
            option.span.start,
            option.span.end
        );
    }
    for binding in &definition.lets {
        let _ = writeln!(out, "  let {} @{}..{}", binding.name.name, binding.span.start, binding.span.end);
        expr_lines(out, &binding.value, 2, "");
    }
    expr_lines(out, &definition.body, 1, "body: ");
}

fn expr_lines(out: &mut String, expr: &Expr, indent: usize, role: &str) {
    for _ in 0..indent {
        out.push_str("  ");
    }
    out.push_str(role);
    match &expr.kind {
        ExprKind::Literal(literal) => {
            let kind = match literal {
                crate::ast::Literal::Int(_) => "int",
                crate::ast::Literal::Float(_) => "float",
                crate::ast::Literal::Bool(_) => "bool",
            };
            let _ = write!(out, "{kind} {}", format_literal(literal));
        }
        ExprKind::Name(name) => {
            let _ = write!(out, "name {}", name.name);
        }
        ExprKind::Unary { op, .. } => {
            let _ = write!(out, "unary {}", op.symbol());
        }
        ExprKind::Binary { op, .. } => {
            let _ = write!(out, "binary {}", op.symbol());
        }
        ExprKind::Call { callee, .. } => {
            let _ = write!(out, "call {}", callee.name);
        }
        ExprKind::Slice { .. } => out.push_str("slice"),
        ExprKind::If { .. } => out.push_str("if"),
        ExprKind::Annotated { curve, .. } => {
            let _ = write!(out, "curve {}", curve.name);
        }
        ExprKind::Paren(_) => out.push_str("paren"),
    }
    let _ = writeln!(out, " @{}..{}", expr.span.start, expr.span.end);

    let child = indent + 1;
    match &expr.kind {
        ExprKind::Literal(_) | ExprKind::Name(_) => {}
        ExprKind::Unary { operand, .. } => expr_lines(out, operand, child, ""),
        ExprKind::Binary { lhs, rhs, .. } => {
            expr_lines(out, lhs, child, "");
            expr_lines(out, rhs, child, "");
        }
        ExprKind::Call { args, .. } => {
            for arg in args {
                match &arg.name {
                    Some(name) => expr_lines(out, &arg.value, child, &format!("{}: ", name.name)),
                    None => expr_lines(out, &arg.value, child, ""),
                }
            }
        }
        ExprKind::Slice { base, start, end } => {
            expr_lines(out, base, child, "");
            if let Some(start) = start {
                expr_lines(out, start, child, "start: ");
            }
            if let Some(end) = end {
                expr_lines(out, end, child, "end: ");
            }
        }
        ExprKind::If { cond, then_branch, else_branch } => {
            expr_lines(out, cond, child, "cond: ");
            expr_lines(out, then_branch, child, "then: ");
            expr_lines(out, else_branch, child, "else: ");
        }
        ExprKind::Annotated { operand, .. } => expr_lines(out, operand, child, ""),
        ExprKind::Paren(inner) => expr_lines(out, inner, child, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_doc_example_is_accurate() {
        let file = crate::parse("metric m(k: int = 1) { let x = a[k:]; -x }").expect("parses");
        let expected = "\
metric m @0..42
  param k: int = 1 @9..19
  let x @23..37
    slice @31..36
      name a @31..32
      start: name k @33..34
  body: unary - @38..40
    name x @39..40
";
        assert_eq!(dump_file(&file), expected);
    }
}
