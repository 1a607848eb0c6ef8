//! What the user sees for type errors and for errors found once parameter values are known:
//! each case is a snippet that parses but does not compile, and its rendered diagnostics are
//! pinned as a snapshot (with the source, for review).
//!
//! Syntax errors are pinned by the grammar crate's own `tests/diagnostics.rs`; every case
//! here must get past the parser, which the test checks through the diagnostic codes
//! (`E00xx` belongs to the parser, `E02xx` to the checker, `E03xx` to lowering).
//!
//! Adding a case is adding a line to `CASES`; `INSTA_UPDATE=always cargo test -p
//! losscc-compiler --test diagnostics` writes its snapshot, to be read and committed.

use compiler::{compile_source, Failure};

/// `(name, source, number of diagnostics)`. Names become snapshot names, so keep them unique.
const CASES: &[(&str, &str, usize)] = &[
    // ---- the checker: kinds of expressions ----
    ("unknown_name_with_suggestion", "metric m {\n    sum(count(P & Lx)) / sum(count(L))\n}\n", 1),
    ("unknown_name_without_suggestion", "metric m {\n    sum(count(P & Q)) / sum(count(L))\n}\n", 1),
    ("unknown_function_with_suggestion", "metric m {\n    sum(cout(P & L)) / sum(count(L))\n}\n", 1),
    ("function_used_as_name", "metric m {\n    mean(count / count(L))\n}\n", 1),
    ("set_operator_on_numbers", "metric m {\n    mean(count(P) & count(L))\n}\n", 1),
    ("arithmetic_on_sets", "metric m {\n    mean(count(P + L))\n}\n", 1),
    ("not_on_a_number", "metric m {\n    mean(!count(P & L) / count(L))\n}\n", 1),
    ("mean_of_pixel_set", "metric m {\n    mean(P & L)\n}\n", 1),
    ("count_of_number", "metric m {\n    mean(count(count(P & L)))\n}\n", 1),
    ("erode_wrong_arity", "metric m {\n    mean(count(erode(P) & L) / count(L))\n}\n", 1),
    ("non_integer_radius", "metric m {\n    mean(count(P & dilate(boundary(L), 1.5)) / count(L))\n}\n", 1),
    ("float_parameter_as_radius", "metric m(tol: float = 2.0) {\n    mean(count(P & dilate(L, tol)) / count(L))\n}\n", 1),
    ("unknown_named_argument", "metric m {\n    mean(count(P & L) / count(L), were: count(L) > 0)\n}\n", 1),
    ("where_not_a_mask", "metric m {\n    mean(count(P & L) / count(L), where: count(L))\n}\n", 1),
    ("weights_not_floats", "metric m {\n    mean(count(P & L) / count(L), weights: count(L))\n}\n", 1),
    ("floats_parameter_in_arithmetic", "metric m(w: floats = 1) {\n    mean(w * count(P & L) / count(L))\n}\n", 1),
    ("weights_all_zero", "metric m(w: floats = 0) {\n    mean(count(P & L) / count(L), weights: w)\n}\n", 1),
    ("slice_of_pixel_set", "metric m {\n    count(V[1:])\n}\n", 1),
    ("non_integer_slice_bound", "metric m {\n    mean((count(P & L) / count(L))[0.5:])\n}\n", 1),
    ("comparison_of_numbers", "metric m {\n    mean(count(P & L) / count(L), where: sum(count(L)) > 0)\n}\n", 1),
    (
        "if_condition_not_boolean",
        "metric m(tol: int = 3) {\n    let first = if tol then 1 else 0;\n    mean(count(P & L)[first:] / count(L)[first:])\n}\n",
        1,
    ),
    (
        "if_branches_differ",
        "metric m(drop_bg: bool = true) {\n    mean(if drop_bg then count(P & L) / count(L) else P & L)\n}\n",
        1,
    ),
    ("curve_annotation_on_number", "metric m {\n    mean(count(P & L)@tp / count(L))\n}\n", 1),
    ("metric_is_per_class", "metric m {\n    count(P & L) / count(L)\n}\n", 1),
    ("metric_is_pixel_set", "metric m {\n    P & L\n}\n", 1),
    // ---- the checker: names, parameters, options ----
    ("duplicate_let", "metric m {\n    let a = count(P & L);\n    let a = count(L);\n    mean(a)\n}\n", 1),
    // The second diagnostic is a follow-up: `P` keeps meaning the built-in set after the
    // rejected binding.
    ("rebinding_builtin_set", "metric m {\n    let P = count(L);\n    mean(P)\n}\n", 2),
    ("builtin_as_parameter", "metric m(count: int = 1) {\n    mean(count(P & dilate(L, count)) / count(L))\n}\n", 1),
    ("duplicate_parameter", "metric m(tol: int = 1, tol: int = 2) {\n    mean(count(dilate(L, tol)))\n}\n", 1),
    ("parameter_default_of_wrong_type", "metric m(tol: int = 2.5) {\n    mean(count(dilate(L, tol)))\n}\n", 1),
    ("ce_in_metric", "metric m {\n    mean(count(P & L) / count(L)) + ce\n}\n", 1),
    ("metric_term_in_metric", "metric a {\n    mean(count(P & L) / count(L))\n}\n\nmetric b {\n    a()\n}\n", 1),
    ("duplicate_definition", "metric a {\n    mean(count(P & L) / count(L))\n}\n\nmetric a {\n    mean(count(L))\n}\n", 1),
    ("unknown_option", "metric m with piece = 2 {\n    mean(count(P & L) / count(L))\n}\n", 1),
    ("pieces_out_of_range", "metric m with pieces = 0 {\n    mean(count(P & L) / count(L))\n}\n", 1),
    ("sigmoid_not_boolean", "metric m with sigmoid = 1 {\n    mean(count(P & L) / count(L))\n}\n", 1),
    (
        "threshold_out_of_range",
        "metric m with sigmoid = true, threshold = 1.5 {\n    mean(count(P & L) / count(L))\n}\n",
        1,
    ),
    ("threshold_without_sigmoid", "metric m with threshold = 0.3 {\n    mean(count(P & L) / count(L))\n}\n", 1),
    (
        "threshold_parameter_not_float",
        "metric m(t: int = 1) with sigmoid = true, threshold = t {\n    mean(count(P & L) / count(L))\n}\n",
        1,
    ),
    (
        "threshold_parameter_out_of_range",
        "metric m(t: float = 1.5) with sigmoid = true, threshold = t {\n    mean(count(P & L) / count(L))\n}\n",
        1,
    ),
    (
        "option_set_twice",
        "metric m with sigmoid = false, sigmoid = true, threshold = 0.3 {\n    mean(count(P & L) / count(L))\n}\n",
        1,
    ),
    ("per_image_not_boolean", "metric m with per_image = 2 {\n    mean(count(P & L) / count(L))\n}\n", 1),
    (
        "loss_terms_disagree_on_per_image",
        "metric d with per_image = true {\n    mean(2 * count(P & L) / (count(P) + count(L)))\n}\n\nmetric miou {\n    mean(count(P & L & V) / count((P | L) & V))\n}\n\nloss l {\n    (1 - d()) + (1 - miou())\n}\n",
        1,
    ),
    (
        "loss_terms_disagree_on_predictions",
        "metric bdice with sigmoid = true {\n    mean(2 * count(P & L) / (count(P) + count(L)))\n}\n\nmetric miou {\n    mean(count(P & L & V) / count((P | L) & V))\n}\n\nloss l {\n    (1 - bdice()) + (1 - miou())\n}\n",
        1,
    ),
    (
        "metric_term_with_unknown_parameter",
        "metric biou(tol: int = 5) {\n    mean(count(P & dilate(L, tol)) / count(L))\n}\n\nloss l {\n    1 - biou(tolerance: 3)\n}\n",
        1,
    ),
    (
        "metric_term_with_positional_argument",
        "metric biou(tol: int = 5) {\n    mean(count(P & dilate(L, tol)) / count(L))\n}\n\nloss l {\n    1 - biou(3)\n}\n",
        1,
    ),
    (
        "two_independent_errors",
        "metric m {\n    let inter = count(P & Lx & V);\n    let union = count((P | L) & V);\n    mean(union + V)\n}\n",
        2,
    ),
    // ---- lowering: parameter values known, class ranges and radii checked ----
    ("class_ranges_differ_in_arithmetic", "metric m {\n    mean(count(P & L)[1:] / count(L))\n}\n", 1),
    ("class_ranges_differ_in_set_operator", "metric m {\n    mean(count(P[1:] & L) / count(L)[1:])\n}\n", 1),
    (
        "class_ranges_differ_in_where",
        "metric m {\n    mean((count(P & L) / count(L))[1:], where: count(L) > 0)\n}\n",
        1,
    ),
    ("empty_slice", "metric m {\n    mean((count(P & L) / count(L))[2:1])\n}\n", 1),
    ("negative_slice_bound", "metric m {\n    mean((count(P & L) / count(L))[-1:])\n}\n", 1),
    ("radius_out_of_range", "metric m {\n    mean(count(P & dilate(L, 99)) / count(L))\n}\n", 1),
    ("curve_annotation_on_labels", "metric m {\n    mean(count(P & L@lab) / count(L))\n}\n", 1),
    (
        "radius_out_of_range_from_parameter",
        "metric m(tol: int = -2) {\n    mean(count(P & erode(L, tol)) / count(L))\n}\n",
        1,
    ),
    ("constant_division_by_zero", "metric m(k: int = 0) {\n    mean(count(P & L) / count(L)) * (1 / k)\n}\n", 1),
];

/// The failure of a case that must not compile: its diagnostic count and its rendering
/// without colour.
fn rendered(name: &str, source: &str) -> (usize, String) {
    let failure = match compile_source("test.metric", source, &[]) {
        Ok(compiled) => panic!("case {name} compiled without errors: {}", compiled.exact.name),
        Err(failure) => failure,
    };
    let Failure::Diagnostics(files) = &failure else {
        panic!("case {name} failed without source diagnostics: {}", failure.render(false));
    };
    for (_, _, diagnostics) in files {
        for diagnostic in diagnostics {
            assert!(
                !diagnostic.code.starts_with("E00"),
                "case {name} is a syntax error ({}), not a type error: fix the snippet",
                diagnostic.code
            );
        }
    }
    (failure.count(), failure.render(false))
}

#[test]
fn type_and_lowering_errors_render_helpful_diagnostics() {
    let mut wrong_counts = Vec::new();
    for (name, source, expected_count) in CASES {
        let (count, text) = rendered(name, source);
        assert!(text.contains("--> test.metric:"), "case {name} has no location:\n{text}");
        insta::assert_snapshot!(*name, format!("{source}\n=====\n{text}"));
        if count != *expected_count {
            wrong_counts.push(format!("{name}: {count} diagnostics, expected {expected_count}"));
        }
    }
    assert!(wrong_counts.is_empty(), "every error must be reported, each once:\n{}", wrong_counts.join("\n"));
}

#[test]
fn case_names_are_unique() {
    let mut names: Vec<&str> = CASES.iter().map(|(name, _, _)| *name).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(names.len(), before, "duplicate case names");
}
