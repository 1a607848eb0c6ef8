//! The `losscc` command as users run it: exit codes, JSON output, and one clear sentence
//! for every kind of bad input.

mod common;

use common::{example, examples, losscc, root};

use losscc_cli::npy;
use std::path::{Path, PathBuf};
use std::process::Output;

fn scratch(name: &str) -> PathBuf {
    common::scratch("cli", name)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn check_accepts_every_example() {
    let files: Vec<String> = examples().iter().map(|p| p.display().to_string()).collect();
    let mut args = vec!["check"];
    args.extend(files.iter().map(String::as_str));
    let output = losscc(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stderr(&output).matches("ok: ").count(), files.len());
}

#[test]
fn check_reports_every_error_with_line_and_column() {
    let dir = scratch("check");
    let file = dir.join("bad.metric");
    std::fs::write(&file, "metric m {\n    let a = count(P & Q);\n    mean(count(P) + V)\n}\n").unwrap();
    let output = losscc(&["check", file.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert!(text.contains("unknown name `Q`"), "{text}");
    assert!(text.contains("bad.metric:2:23"), "{text}");
    assert!(text.contains("`+` cannot combine a per-class number and a pixel set"), "{text}");
    assert!(text.contains("bad.metric:3:19"), "{text}");
}

#[test]
fn eval_prints_loss_and_metric_as_json() {
    let data = root().join("tests/data/asl-vectors");
    let output = losscc(&[
        "eval",
        &example("biou.metric"),
        "--logits",
        data.join("case1_logits.npy").to_str().unwrap(),
        "--labels",
        data.join("case1_labels.npy").to_str().unwrap(),
        "--set",
        "tol=3",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let value: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let loss = value["loss"].as_f64().unwrap();
    let metric = value["metric"].as_f64().unwrap();
    assert!(loss > 0.0 && loss < 1.0, "{value}");
    assert!((metric - 0.13393711118990131).abs() < 1e-6, "{value}");
    assert_eq!(value["exact"]["per_class"].as_array().unwrap().len(), 4);
    assert_eq!(value["params"]["tol"], 3);
}

/// Runs `eval` on miou with the given tensors and returns (exit code, stderr).
fn eval_with(name: &str, write: impl Fn(&Path, &Path)) -> (Option<i32>, String) {
    let dir = scratch(name);
    let (logits, labels) = (dir.join("logits.npy"), dir.join("labels.npy"));
    write(&logits, &labels);
    let output = losscc(&[
        "eval",
        &example("miou.metric"),
        "--logits",
        logits.to_str().unwrap(),
        "--labels",
        labels.to_str().unwrap(),
    ]);
    (output.status.code(), stderr(&output))
}

#[test]
fn bad_inputs_get_one_clear_sentence() {
    let good_logits = |p: &Path| npy::write_f32(p, &[1, 3, 4, 4], vec![0.5; 48]).unwrap();
    let good_labels = |p: &Path| npy::write_i64(p, &[1, 4, 4], vec![1; 16]).unwrap();
    let cases: Vec<(&str, Box<dyn Fn(&Path, &Path)>, &str)> = vec![
        (
            "shape",
            Box::new(|l, y| {
                good_logits(l);
                npy::write_i64(y, &[1, 4, 5], vec![0; 20]).unwrap();
            }),
            "disagree on N or the spatial sizes",
        ),
        (
            "label",
            Box::new(|l, y| {
                good_logits(l);
                npy::write_i64(y, &[1, 4, 4], (0..16).map(|i| if i == 3 { 7 } else { 0 }).collect()).unwrap();
            }),
            "label value 7 is neither a class in 0..3 nor the ignore label 255",
        ),
        (
            "nonfinite",
            Box::new(|l, y| {
                let mut values = vec![0.5f32; 48];
                values[5] = f32::NAN;
                npy::write_f32(l, &[1, 3, 4, 4], values).unwrap();
                good_labels(y);
            }),
            "the logits contain 1 non-finite values",
        ),
        (
            "dtype",
            Box::new(|l, y| {
                good_logits(l);
                npy::write_f32(y, &[1, 4, 4], vec![1.0; 16]).unwrap();
            }),
            "labels must be integer class indices [1, 4, 4] (uint8, int32 or int64, say) or soft labels",
        ),
        (
            "rank",
            Box::new(|l, y| {
                npy::write_f32(l, &[3, 4, 4], vec![0.5; 48]).unwrap();
                good_labels(y);
            }),
            "logits must be images [N, C, H, W] or volumes [N, C, D, H, W]",
        ),
        ("missing", Box::new(|_, y| good_labels(y)), "cannot open"),
    ];
    for (name, write, expected) in cases {
        let (code, text) = eval_with(name, write);
        assert_eq!(code, Some(1), "{name}: {text}");
        assert!(text.contains(expected), "{name}: expected `{expected}` in: {text}");
        assert_eq!(text.trim().lines().count(), 1, "{name}: one sentence, got: {text}");
        assert!(!text.contains("panicked"), "{name}: {text}");
    }
}

#[test]
fn bad_params_files_are_explained() {
    let dir = scratch("params");
    let data = root().join("tests/data/asl-vectors");
    let cases = [
        (r#"{"control_points": [[0.5, 0.5]]}"#, "the parameters have 1 curve but `miou` has 2"),
        (
            r#"{"control_points": [[0.5, 0.5, 0.4, 0.6, 0.9, 0.9], [0.2, 0.2, 0.5, 0.5, 0.7, 0.7]]}"#,
            "goes back from the previous point",
        ),
        (r#"{"curves": 3}"#, "neither losscc's format"),
        ("not json", "not valid JSON"),
    ];
    for (index, (text, expected)) in cases.iter().enumerate() {
        let params = dir.join(format!("p{index}.json"));
        std::fs::write(&params, text).unwrap();
        let output = losscc(&[
            "eval",
            &example("miou.metric"),
            "--logits",
            data.join("case0_logits.npy").to_str().unwrap(),
            "--labels",
            data.join("case0_labels.npy").to_str().unwrap(),
            "--params",
            params.to_str().unwrap(),
        ]);
        assert_eq!(output.status.code(), Some(1));
        assert!(stderr(&output).contains(expected), "expected `{expected}` in {}", stderr(&output));
    }
}

#[test]
fn fmt_round_trips_examples() {
    for name in ["miou.metric", "bf1.metric", "tversky.metric"] {
        let output = losscc(&["fmt", &example(name)]);
        assert!(output.status.success());
        let formatted = String::from_utf8(output.stdout).unwrap();
        assert_eq!(formatted, std::fs::read_to_string(root().join("examples").join(name)).unwrap());
        assert_eq!(losscc(&["fmt", "--check", &example(name)]).status.code(), Some(0));
    }
}

#[test]
fn emit_stages() {
    let output = losscc(&["check", &example("bf1.metric"), "--emit", "relaxed"]);
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("curve #3 or_erode_P"), "{text}");
    let output = losscc(&["check", &example("miou.metric"), "--emit", "ast"]);
    assert!(String::from_utf8(output.stdout).unwrap().starts_with("metric miou"));
}

#[test]
fn compile_writes_onnx_and_lists_it() {
    let dir = scratch("compile");
    let model = dir.join("bf1.onnx");
    let output = losscc(&["compile", &example("bf1.metric"), "-o", model.to_str().unwrap(), "--set", "tol=2"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let bytes = std::fs::read(&model).unwrap();
    assert!(bytes.len() > 1000);
    assert!(stderr(&output).contains("4 curves"));
    let listing = losscc(&["compile", &example("macc.metric"), "--emit", "onnx-text"]);
    let text = String::from_utf8(listing.stdout).unwrap();
    assert!(text.starts_with("graph losscc_macc (opset 17, IR 8)"), "{text}");
    assert!(text.contains("Softmax(logits) {axis=1}  # IR %0 `softmax` from rule relax.pred"), "{text}");
    assert!(text.contains("output loss"));
}

#[test]
fn check_lowers_every_definition_not_only_the_entry() {
    let dir = scratch("alldefs");
    let file = dir.join("two.metric");
    std::fs::write(
        &file,
        "metric wide {\n    mean(count(P & dilate(L, 99)) / count(L))\n}\n\nmetric fine {\n    mean(count(P & L) / count(L))\n}\n",
    )
    .unwrap();
    let output = losscc(&["check", file.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("two.metric:2:30"), "{}", stderr(&output));
}

#[test]
fn eval_gradient_of_a_label_only_formula_is_zero_and_errors_print_once() {
    let dir = scratch("labelonly");
    let file = dir.join("labels.metric");
    std::fs::write(&file, "metric share {\n    mean(count(L & V) / count(V))\n}\n").unwrap();
    let (logits, labels, grad) = (dir.join("x.npy"), dir.join("y.npy"), dir.join("g.npy"));
    npy::write_f32(&logits, &[1, 2, 3, 3], vec![0.25; 18]).unwrap();
    npy::write_i64(&labels, &[1, 3, 3], vec![1; 9]).unwrap();
    let args = ["eval", file.to_str().unwrap(), "--logits", logits.to_str().unwrap(), "--labels"];
    let mut ok = args.to_vec();
    ok.extend([labels.to_str().unwrap(), "--grad", grad.to_str().unwrap()]);
    let output = losscc(&ok);
    assert!(output.status.success(), "{}", stderr(&output));
    let gradient = npy::read_logits(&grad).unwrap();
    assert_eq!(gradient.size(), vec![1, 2, 3, 3]);
    assert_eq!(gradient.abs().sum(tch::Kind::Double).double_value(&[]), 0.0);
    // A bad label: the sentence appears once, not repeated by the error chain.
    npy::write_i64(&labels, &[1, 3, 3], vec![9; 9]).unwrap();
    let mut bad = args.to_vec();
    bad.push(labels.to_str().unwrap());
    let text = stderr(&losscc(&bad));
    assert_eq!(text.matches("label value 9").count(), 1, "{text}");
}

/// A libtorch failure (here: memory for an absurd shape) ends in one sentence that says what
/// to do instead, not in a request to report a bug.
#[test]
fn libtorch_out_of_memory_says_what_to_do() {
    let output = losscc(&["bench", &example("miou.metric"), "--shape", "4096,64,4096,4096", "--iterations", "1"]);
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert!(text.contains("ran out of memory") && text.contains("smaller --shape"), "{text}");
    assert!(!text.contains("please report") && !text.contains("panicked"), "{text}");
}

/// `losscc compile FILE` with no `-o` writes `FILE.onnx` beside the source and says where.
#[test]
fn compile_without_an_output_writes_beside_the_source() {
    let dir = scratch("beside");
    let source = dir.join("biou.metric");
    std::fs::copy(root().join("examples/biou.metric"), &source).unwrap();
    let output = losscc(&["compile", source.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let written = dir.join("biou.onnx");
    assert!(std::fs::metadata(&written).unwrap().len() > 1000);
    assert!(stderr(&output).contains(&format!("wrote {}", written.display())), "{}", stderr(&output));
    // The gradient and exact graphs get their own names beside it, leaving the loss graph.
    let loss_graph = std::fs::read(&written).unwrap();
    for (flag, name) in [("--grad", "biou.grad.onnx"), ("--exact", "biou.exact.onnx")] {
        let output = losscc(&["compile", source.to_str().unwrap(), flag]);
        assert!(output.status.success(), "{}", stderr(&output));
        assert!(stderr(&output).contains(&format!("wrote {}", dir.join(name).display())), "{}", stderr(&output));
    }
    assert_eq!(std::fs::read(&written).unwrap(), loss_graph, "the loss graph was overwritten");
    assert_ne!(std::fs::read(dir.join("biou.grad.onnx")).unwrap(), loss_graph);
}

/// `compile --grad` lists the reverse-mode stage, writes both outputs, and refuses a formula
/// that does not depend on the predictions with one sentence.
#[test]
fn gradient_graph_of_the_compiler() {
    let listing = losscc(&["check", &example("biou.metric"), "--emit", "grad"]);
    let text = String::from_utf8(listing.stdout).unwrap();
    assert!(text.starts_with("gradient of biou"), "{text}");
    assert!(text.contains("softmax_backward") && text.contains("output ∂loss/∂logits"), "{text}");
    let onnx_text = losscc(&["compile", &example("miou.metric"), "--grad", "--emit", "onnx-text"]);
    let text = String::from_utf8(onnx_text.stdout).unwrap();
    assert!(text.contains("output loss") && text.contains("output dloss_dlogits"), "{text}");

    let dir = scratch("gradlabels");
    let file = dir.join("share.metric");
    std::fs::write(&file, "metric share {\n    mean(count(L & V) / count(V))\n}\n").unwrap();
    let output = losscc(&["compile", file.to_str().unwrap(), "--grad"]);
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert!(text.contains("does not depend on the predictions `P`"), "{text}");
    assert_eq!(text.trim().lines().count(), 1, "{text}");
    assert!(!dir.join("share.grad.onnx").exists());
}
