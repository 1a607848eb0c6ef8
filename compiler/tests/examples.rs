//! Every example metric compiles; its exact and relaxed IR are pinned by snapshots, and the
//! curve layouts of the six published metrics are the published ones.

use compiler::{compile_file, print};
use std::path::{Path, PathBuf};

#[path = "../../tests/common/files.rs"]
mod files;

fn examples() -> Vec<PathBuf> {
    files::metric_files(&files::root_from(env!("CARGO_MANIFEST_DIR")).join("examples"))
}

#[test]
fn every_example_compiles_and_snapshots() {
    let files = examples();
    assert!(files.len() >= 12, "expected the example library, found {}", files.len());
    for path in files {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let compiled = compile_file(&path, &[]).unwrap_or_else(|e| panic!("{name}: {}", e.render(false)));
        let text = format!(
            "{}\n{}",
            print::dump(&compiled.exact, None),
            print::dump(&compiled.relaxed, Some(&compiled.manifest()))
        );
        insta::assert_snapshot!(format!("ir_{name}"), text);
    }
}

fn curve_names(file: &str, overrides: &[(String, String)]) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples").join(file);
    let compiled = compile_file(&path, overrides).unwrap_or_else(|e| panic!("{}", e.render(false)));
    compiled.manifest().curves.iter().map(|c| format!("{}:{}", c.name, c.pieces)).collect()
}

#[test]
fn published_curve_layouts() {
    let check = |file: &str, expected: &[&str]| assert_eq!(curve_names(file, &[]), expected, "{file}");
    check("miou.metric", &["and_P:2", "or_P:2"]);
    check("fwiou.metric", &["and_P:2", "or_P:2"]);
    check("biou.metric", &["and_P:2", "or_P:2"]);
    check("macc.metric", &["and_P:2"]);
    check("gacc.metric", &["and_P:2"]);
    check("bf1.metric", &["and_P:1", "and_erode_P:1", "or_P:1", "or_erode_P:1"]);
    check("miou_biou.metric", &["miou.and_P:2", "miou.or_P:2", "biou.and_P:2", "biou.or_P:2"]);
    let no_bg = [("drop_bg".to_string(), "false".to_string()), ("tol".to_string(), "0".to_string())];
    assert_eq!(curve_names("bf1.metric", &no_bg).len(), 4);
}

#[test]
fn bad_overrides_are_one_sentence() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/biou.metric");
    let cases = [
        ("tolerance", "3", "`biou` has no parameter `tolerance`. Did you mean `tol`?"),
        ("tol", "three", "parameter `tol` expects an integer such as 3, but got `three`."),
        ("drop_bg", "yes", "parameter `drop_bg` expects `true` or `false`, but got `yes`."),
    ];
    for (name, value, expected) in cases {
        let error = compile_file(&path, &[(name.to_string(), value.to_string())]).unwrap_err();
        assert_eq!(error.render(false).trim(), format!("error: {expected}"));
    }
    let error = compile_file(&path, &[("tol".into(), "99".into())]).unwrap_err();
    assert!(error.render(false).contains("radius must be between 0 and 64, but it is 99"), "{}", error.render(false));
}

#[test]
fn own_params_format_round_trips_and_checks_names() {
    use compiler::curve::Curve;
    use compiler::params::Params;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bf1.metric");
    let compiled = compile_file(&path, &[]).unwrap();
    let manifest = &compiled.manifest();
    let curves: Vec<Curve> = (0..4).map(|i| Curve::from_search(&[0.2 + 0.1 * i as f64, 0.6], 1).unwrap()).collect();
    let params = Params { curves, fixed: vec![false, true, false, false] };
    let file = params.to_file("bf1", manifest, serde_json::json!({"source": "test"}));
    let text = serde_json::to_string(&file).unwrap();
    let back = Params::from_json(&text, manifest).unwrap();
    assert_eq!(back, params);
    // Curves are matched by name, not position.
    let mut shuffled = file.clone();
    shuffled.curves.reverse();
    assert_eq!(Params::from_json(&serde_json::to_string(&shuffled).unwrap(), manifest).unwrap(), params);
    let mut renamed = file.clone();
    renamed.curves[0].name = "and_Q".into();
    let error = Params::from_json(&serde_json::to_string(&renamed).unwrap(), manifest).unwrap_err();
    assert_eq!(
        error.to_string(),
        "the parameters name curve `and_Q`, which this metric does not have (its curves: `and_P`, `and_erode_P`, `or_P`, `or_erode_P`)"
    );
}

#[test]
fn use_is_transitive_and_loads_each_file_once() {
    let dir = std::env::temp_dir().join(format!("losscc-use-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("lib")).unwrap();
    std::fs::write(dir.join("lib/acc.metric"), "metric acc {\n    sum(count(P & L)) / sum(count(L))\n}\n").unwrap();
    // `mid` uses `acc` and itself again (a cycle must end).
    std::fs::write(
        dir.join("lib/mid.metric"),
        "use \"acc.metric\";\nuse \"mid.metric\";\nloss mid {\n    1 - acc()\n}\n",
    )
    .unwrap();
    std::fs::write(dir.join("top.metric"), "use \"lib/mid.metric\";\nloss top {\n    2 * (1 - acc())\n}\n").unwrap();
    let compiled = compile_file(&dir.join("top.metric"), &[]).unwrap_or_else(|e| panic!("{}", e.render(false)));
    assert_eq!(compiled.program.files().count(), 3, "top, mid and acc, each once");
    assert_eq!(compiled.manifest().curves.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(), ["acc.and_P"]);
}

/// ONNX models record the source of the main file and of every file it `use`s, and the
/// ignore label they were compiled for.
#[test]
fn onnx_metadata_records_every_used_source() {
    let root = files::root_from(env!("CARGO_MANIFEST_DIR"));
    let compiled = compile_file(&root.join("examples/miou_biou.metric"), &[]).unwrap();
    let curves: Vec<_> =
        compiled.manifest().curves.iter().map(|c| compiler::curve::Curve::identity(c.pieces)).collect();
    let options = compiler::onnx::EmitOptions { ignore_label: Some(7), ..Default::default() };
    let model = compiler::onnx::emit_loss(&compiled, &curves, &options).unwrap();
    let meta = |key: &str| model.metadata_props.iter().find(|p| p.key == key).map(|p| p.value.clone()).unwrap();
    let sources: Vec<serde_json::Value> = serde_json::from_str(&meta("losscc.sources")).unwrap();
    let names: Vec<&str> = sources.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names[1].ends_with("miou.metric") && names[2].ends_with("biou.metric"), "{names:?}");
    let used = std::fs::read_to_string(root.join("examples/biou.metric")).unwrap();
    assert_eq!(sources[2]["text"].as_str().unwrap(), used);
    assert_eq!(meta("losscc.ignore_label"), "7");
}
