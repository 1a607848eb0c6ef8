//! Unit tests of the parser: precedence, associativity, spans, limits, recovery.

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
