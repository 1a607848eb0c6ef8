//! What the user sees for common mistakes: each case is a malformed snippet, and its
//! rendered diagnostics are pinned as a snapshot (with the source, for review).
//!
//! Adding a case is adding a line to `CASES`; `INSTA_UPDATE=always cargo test -p
//! losscc-grammar` writes its snapshot, to be read and committed.

use grammar::parser::parse_bytes;
use grammar::{parse, render};

/// `(name, source)`. Names become snapshot names, so keep them unique.
const CASES: &[(&str, &str)] = &[
    ("missing_paren_in_call", "metric m {\n    mean(count(P & L)\n}\n"),
    ("unclosed_call_at_eof", "metric m {\n    mean(count(P & L)"),
    ("unclosed_paren_before_next_metric", "metric a {\n    mean((count(P)\n\nmetric b {\n    1\n}\n"),
    ("unterminated_block", "metric m {\n    let x = count(P);\n    x\n"),
    ("unterminated_block_before_next_metric", "metric a {\n    count(P)\n\nmetric b {\n    1\n}\n"),
    ("let_without_semicolon", "metric m {\n    let a = count(P & L)\n    let b = count(L);\n    a / b\n}\n"),
    ("let_without_semicolon_same_line", "metric m {\n    let a = count(P & L) let b = 1;\n    a\n}\n"),
    ("trailing_semicolon", "metric m {\n    mean(count(P & L));\n}\n"),
    ("expression_statement", "metric m {\n    count(P);\n    let x = 1;\n    x\n}\n"),
    ("no_final_expression", "metric m {\n    let x = count(P);\n}\n"),
    ("single_equals", "metric m {\n    mean(count(P & L), where: count(L) = 0)\n}\n"),
    ("equals_greater", "metric m {\n    mean(count(P), where: count(L) => 1)\n}\n"),
    ("chained_comparison", "metric m {\n    let ok = 0 < count(L) < 10;\n    mean(count(P), where: ok)\n}\n"),
    ("double_ampersand", "metric m {\n    count(P && L)\n}\n"),
    ("power_operator", "metric m {\n    mean(count(P) ** 2)\n}\n"),
    ("missing_operator", "metric m {\n    count(P) count(L)\n}\n"),
    ("missing_comma_in_call", "metric m {\n    dilate(P 3)\n}\n"),
    ("named_argument_with_equals", "metric m {\n    mean(count(P), where = count(L) > 0)\n}\n"),
    ("unknown_top_level", "metrc m {\n    mean(count(P & L))\n}\n"),
    ("let_at_top_level", "let x = 1;\nmetric m { x }\n"),
    ("stray_closing_brace", "metric m { 1 }\n}\n"),
    ("keyword_as_metric_name", "metric let {\n    1\n}\n"),
    ("keyword_as_let_name", "metric m {\n    let then = count(P);\n    1\n}\n"),
    ("missing_metric_name", "metric {\n    1\n}\n"),
    ("integer_too_large", "metric m(k: int = 99999999999999999999) {\n    k\n}\n"),
    ("float_too_large", "metric m {\n    mean(count(P) * 1e999)\n}\n"),
    ("float_too_small", "metric m {\n    mean(count(P) * 1e-999)\n}\n"),
    ("number_with_suffix", "metric m {\n    2x\n}\n"),
    ("missing_fraction_digits", "metric m {\n    1. + 2\n}\n"),
    ("leading_dot", "metric m {\n    .5\n}\n"),
    ("missing_exponent", "metric m {\n    1e + 2\n}\n"),
    ("missing_else", "metric m(b: bool = true) {\n    if b then 1\n}\n"),
    ("missing_then", "metric m(b: bool = true) {\n    if b { 1 } else 0\n}\n"),
    ("slice_without_colon", "metric m {\n    mean(count(P)[1])\n}\n"),
    ("unclosed_slice", "metric m {\n    mean(count(P)[1:\n}\n"),
    ("bad_curve_name", "metric m {\n    count(P@1 & L)\n}\n"),
    ("unknown_param_type", "metric m(k: integer = 5) {\n    k\n}\n"),
    ("param_without_type", "metric m(k = 5) {\n    k\n}\n"),
    ("param_without_default", "metric m(k: int) {\n    k\n}\n"),
    ("param_default_expression", "metric m(k: int = 1 + 2) {\n    k\n}\n"),
    ("unclosed_param_list", "metric m(k: int = 1 {\n    k\n}\n"),
    ("option_with_double_equals", "metric m with pieces == 1 {\n    1\n}\n"),
    ("unterminated_string", "use \"miou.metric;\nloss l {\n    miou()\n}\n"),
    ("use_without_quotes", "use miou;\nloss l {\n    miou()\n}\n"),
    ("use_without_semicolon", "use \"miou.metric\"\nloss l {\n    miou()\n}\n"),
    ("string_in_expression", "metric m {\n    count(\"P\")\n}\n"),
    ("unexpected_character", "metric m {\n    count(P) $ 2\n}\n"),
    ("control_character", "metric m {\n    count(P)\u{7} + 1\n}\n"),
    ("non_ascii_name", "metric m {\n    count(π)\n}\n"),
    ("empty_file", ""),
    ("only_comments", "# nothing here yet\n## not attached to anything\n"),
    ("only_use", "use \"miou.metric\";\n"),
    (
        "several_errors",
        "metric a {\n    let x = count(P &);\n    let y = (count(L);\n    x / y\n}\n\nmetric b(k: int = 1) {\n    k k\n}\n\nloss c {\n    a() +\n}\n",
    ),
];

fn rendered(name: &str, source: &str) -> String {
    match parse(source) {
        Ok(file) => panic!("case {name} parsed without errors: {file:#?}"),
        Err(diagnostics) => {
            assert!(!diagnostics.is_empty(), "case {name}: Err without diagnostics");
            render(&diagnostics, "test.metric", source, false)
        }
    }
}

#[test]
fn malformed_snippets_render_helpful_diagnostics() {
    for (name, source) in CASES {
        let text = rendered(name, source);
        assert!(text.contains("--> test.metric:"), "case {name} has no location:\n{text}");
        insta::assert_snapshot!(name.to_string(), format!("{source}\n=====\n{text}"));
    }
}

#[test]
fn case_names_are_unique() {
    let mut names: Vec<&str> = CASES.iter().map(|(name, _)| *name).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(names.len(), before, "duplicate case names");
}

#[test]
fn invalid_utf8_is_reported_at_its_byte_offset() {
    let bytes = b"metric m {\n    count(P) \xff\xfe + 1\n}\n";
    let diagnostics = match parse_bytes(bytes) {
        Ok(file) => panic!("parsed invalid UTF-8: {file:?}"),
        Err(diagnostics) => diagnostics,
    };
    assert_eq!(diagnostics[0].primary.span.start, 24);
    let source = String::from_utf8_lossy(bytes);
    insta::assert_snapshot!("invalid_utf8", render(&diagnostics, "test.metric", &source, false));
}

#[test]
fn color_rendering_adds_escapes_but_keeps_the_text() {
    let source = "metric m { (1 }";
    let Err(diagnostics) = parse(source) else { panic!("should not parse") };
    let colored = render(&diagnostics, "test.metric", source, true);
    assert!(colored.contains("\u{1b}["), "no ANSI escapes in {colored:?}");
    assert!(colored.contains("test.metric:1:"), "{colored}");
}
