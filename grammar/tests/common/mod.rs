//! Checks shared by the integration tests: every span in a parsed tree covers exactly the
//! text of its node.

use grammar::ast::{Expr, ExprKind, File, Ident, Item, Literal, OptionValue};
use grammar::format::format_param_type;

/// Panics with a description of the first span that does not cover its node's text.
pub fn check_spans(source: &str, file: &File) {
    let text = |start: usize, end: usize| -> &str {
        source.get(start..end).unwrap_or_else(|| panic!("span {start}..{end} is not a valid range of the source"))
    };
    let ident = |ident: &Ident| assert_eq!(text(ident.span.start, ident.span.end), ident.name, "identifier span");
    for item in &file.items {
        match item {
            Item::Use(item) => {
                let whole = text(item.span.start, item.span.end);
                assert!(whole.starts_with("use") && whole.ends_with(';'), "use span: {whole:?}");
                assert_eq!(text(item.path_span.start, item.path_span.end), format!("\"{}\"", item.path));
            }
            Item::Metric(definition) | Item::Loss(definition) => {
                let whole = text(definition.span.start, definition.span.end);
                assert!(whole.starts_with("metric") || whole.starts_with("loss"), "definition span: {whole:?}");
                assert!(whole.ends_with('}'), "definition span: {whole:?}");
                ident(&definition.name);
                for param in &definition.params {
                    ident(&param.name);
                    assert_eq!(text(param.ty_span.start, param.ty_span.end), format_param_type(param.ty));
                    check_literal(text(param.default_span.start, param.default_span.end), &param.default);
                    assert_eq!(param.span.start, param.name.span.start);
                    assert_eq!(param.span.end, param.default_span.end);
                }
                for option in &definition.options {
                    ident(&option.key);
                    let value_text = text(option.value_span.start, option.value_span.end);
                    match &option.value {
                        OptionValue::Literal(literal) => check_literal(value_text, literal),
                        OptionValue::Name(name) => {
                            ident(name);
                            assert_eq!(value_text, name.name, "an option naming a parameter");
                        }
                    }
                    assert_eq!((option.span.start, option.span.end), (option.key.span.start, option.value_span.end));
                }
                for binding in &definition.lets {
                    let whole = text(binding.span.start, binding.span.end);
                    assert!(whole.starts_with("let") && whole.ends_with(';'), "let span: {whole:?}");
                    ident(&binding.name);
                    check_expr(source, &binding.value);
                }
                check_expr(source, &definition.body);
            }
        }
    }
}

fn check_literal(text: &str, literal: &Literal) {
    match literal {
        Literal::Int(value) => assert_eq!(text.parse::<i64>().ok(), Some(*value), "int literal {text:?}"),
        Literal::Float(value) => assert_eq!(text.parse::<f64>().ok(), Some(*value), "float literal {text:?}"),
        Literal::Bool(value) => assert_eq!(text, value.to_string(), "bool literal"),
    }
}

fn check_expr(source: &str, expr: &Expr) {
    let whole = &source[expr.span.start..expr.span.end];
    let starts_with = |child: &Expr| assert_eq!(expr.span.start, child.span.start, "{whole:?} starts with a child");
    let ends_with = |child: &Expr| assert_eq!(expr.span.end, child.span.end, "{whole:?} ends with a child");
    match &expr.kind {
        ExprKind::Literal(literal) => check_literal(whole, literal),
        ExprKind::Name(name) => {
            assert_eq!(whole, name.name);
            assert_eq!(name.span, expr.span);
        }
        ExprKind::Unary { op, op_span, operand } => {
            assert_eq!(&source[op_span.start..op_span.end], op.symbol());
            assert_eq!(expr.span.start, op_span.start);
            ends_with(operand);
            check_expr(source, operand);
        }
        ExprKind::Binary { op, op_span, lhs, rhs } => {
            assert_eq!(&source[op_span.start..op_span.end], op.symbol());
            starts_with(lhs);
            ends_with(rhs);
            check_expr(source, lhs);
            check_expr(source, rhs);
        }
        ExprKind::Call { callee, args } => {
            assert!(whole.starts_with(&callee.name) && whole.ends_with(')'), "call span {whole:?}");
            assert_eq!(source[callee.span.start..callee.span.end], callee.name);
            for arg in args {
                if let Some(name) = &arg.name {
                    assert_eq!(source[name.span.start..name.span.end], name.name);
                    assert_eq!(arg.span.start, name.span.start);
                } else {
                    assert_eq!(arg.span.start, arg.value.span.start);
                }
                assert_eq!(arg.span.end, arg.value.span.end);
                check_expr(source, &arg.value);
            }
        }
        ExprKind::Slice { base, start, end } => {
            starts_with(base);
            assert!(whole.ends_with(']'), "slice span {whole:?}");
            check_expr(source, base);
            for bound in [start, end].into_iter().flatten() {
                check_expr(source, bound);
            }
        }
        ExprKind::If { cond, then_branch, else_branch } => {
            assert!(whole.starts_with("if"), "if span {whole:?}");
            ends_with(else_branch);
            for child in [cond, then_branch, else_branch] {
                check_expr(source, child);
            }
        }
        ExprKind::Annotated { operand, curve } => {
            starts_with(operand);
            assert_eq!(source[curve.span.start..curve.span.end], curve.name);
            assert_eq!(expr.span.end, curve.span.end);
            check_expr(source, operand);
        }
        ExprKind::Paren(inner) => {
            assert!(whole.starts_with('(') && whole.ends_with(')'), "paren span {whole:?}");
            check_expr(source, inner);
        }
    }
}
