//! `losscc search --trainer CMD` and the local executor's isolation: the trainer contract
//! (files and variables in each candidate's folder), retries, failed candidates in the
//! journal and the report, and one sentence for each misuse that stops a search early.

mod common;

use common::{example, losscc, text};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;

fn scratch(name: &str) -> PathBuf {
    let dir = common::scratch("trainers", name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn search_with(out: &Path, trainer: &str, extra: &[&str]) -> Output {
    let miou = example("miou.metric");
    let out = out.display().to_string();
    let mut args = vec!["search", miou.as_str(), "--out", out.as_str(), "--trainer", trainer, "--workers", "2"];
    for (flag, value) in [("--rounds", "1"), ("--samples", "3")] {
        if !extra.contains(&flag) {
            args.extend_from_slice(&[flag, value]);
        }
    }
    args.extend_from_slice(extra);
    losscc(&args)
}

fn history(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("history.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// The trainer contract: in each candidate's folder, `loss.onnx` (the candidate's curves
/// baked in) and `params.json`; `sh -c CMD` runs there with the five variables; its stdout,
/// stderr and exit status are kept; the reward it writes is journaled.
#[test]
fn a_trainer_command_gets_the_contract() {
    let out = scratch("contract");
    // Reward: the candidate's sample number / 10, so the journal can be checked.
    let trainer = r#"env | grep '^LOSSCC_' | sort > env.txt; echo "training $LOSSCC_CANDIDATE"; echo warn >&2; sample=${LOSSCC_CANDIDATE#*-}; echo "{\"reward\": 0.$sample}" > "$LOSSCC_RESULT""#;
    let output = search_with(&out, trainer, &["--seed", "7"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let lines = history(&out);
    assert_eq!(lines.len(), 3);
    for line in &lines {
        let (round, sample) = (line["round"].as_u64().unwrap(), line["sample"].as_u64().unwrap());
        assert_eq!(line["reward"].as_f64().unwrap(), format!("0.{sample}").parse::<f64>().unwrap());
        let folder = out.join(format!("candidates/{round}-{sample}/attempt-1"));
        let env = std::fs::read_to_string(folder.join("env.txt")).unwrap();
        let var = |name: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("{name} in {env}"))
                .to_string()
        };
        assert_eq!(var("LOSSCC_CANDIDATE"), format!("{round}-{sample}"));
        assert_eq!(var("LOSSCC_SEED"), "7");
        assert_eq!(PathBuf::from(var("LOSSCC_ONNX")), folder.join("loss.onnx"));
        assert_eq!(PathBuf::from(var("LOSSCC_PARAMS")), folder.join("params.json"));
        assert_eq!(PathBuf::from(var("LOSSCC_RESULT")), folder.join("result.json"));
        assert!(std::fs::metadata(folder.join("loss.onnx")).unwrap().len() > 1000);
        // The parameters are the candidate's curves, in losscc's own format.
        let params: Value =
            serde_json::from_str(&std::fs::read_to_string(folder.join("params.json")).unwrap()).unwrap();
        assert_eq!(params["format"], "losscc-params");
        let curves: Vec<Value> =
            params["curves"].as_array().unwrap().iter().map(|c| c["control_points"].clone()).collect();
        assert_eq!(Value::Array(curves), line["control_points"]);
        assert_eq!(
            std::fs::read_to_string(folder.join("trainer.stdout")).unwrap().trim(),
            format!("training {round}-{sample}")
        );
        assert_eq!(std::fs::read_to_string(folder.join("trainer.stderr")).unwrap().trim(), "warn");
        assert_eq!(std::fs::read_to_string(folder.join("trainer.status")).unwrap().trim(), "0");
    }
    let stdout = text(&output.stdout);
    assert!(stdout.contains("best: candidate 0-2"), "{stdout}");
}

/// A failing attempt is retried; a candidate that fails every attempt is journaled as failed
/// with its reason and stderr, listed in the report, and the round still updates the policy
/// from the others. A trainer that kills itself takes only its own attempt down.
#[test]
fn failed_attempts_are_retried_and_failed_candidates_journaled() {
    let out = scratch("retries");
    // Sample 1 fails on its first attempt only; sample 2 always kills itself; the rest pass.
    let trainer = r#"case "$LOSSCC_CANDIDATE" in
        0-1) if [ ! -e ../flaky ]; then touch ../flaky; echo "flaky failure" >&2; exit 3; fi ;;
        0-2) echo "about to crash" >&2; kill -9 $$ ;;
    esac
    echo '{"reward": 0.5}' > "$LOSSCC_RESULT""#;
    let output = search_with(&out, trainer, &["--samples", "4", "--retries", "1"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let lines = history(&out);
    let find = |sample: u64| lines.iter().find(|l| l["sample"].as_u64() == Some(sample)).unwrap().clone();
    assert_eq!(find(1)["attempts"], 2, "{}", find(1));
    assert_eq!(find(1)["reward"], 0.5);
    let failed = find(2);
    assert_eq!(failed["failed"], true);
    assert_eq!(failed["attempts"], 2);
    assert!(failed["reason"].as_str().unwrap().contains("killed by a signal"), "{failed}");
    assert!(failed["stderr_tail"].as_str().unwrap().contains("about to crash"), "{failed}");
    assert!(out.join("candidates/0-2/attempt-2/trainer.stderr").exists());
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("## Failed candidates") && report.contains("`0-2`"), "{report}");
    let stdout = text(&output.stdout);
    assert!(
        stdout.contains("1 candidate(s) failed every attempt") && stdout.contains("0-2: the trainer command"),
        "{stdout}"
    );
    assert!(out.join("mu.params.json").exists());
}

fn fails_with(output: &Output, needles: &[&str]) {
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stdout));
    let stderr = text(&output.stderr);
    for needle in needles {
        assert!(stderr.contains(needle), "`{needle}` not in: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A trainer command that does not exist stops the search at once (no retries, no more
/// candidates), and one that fails on every candidate of the first round stops it with its
/// stderr.
#[test]
fn broken_trainers_stop_the_search_early() {
    let out = scratch("missing");
    let started = std::time::Instant::now();
    let output = search_with(&out, "no-such-trainer-command --epochs 3", &["--retries", "5"]);
    fails_with(&output, &["`no-such-trainer-command --epochs 3` was not found", "exit status 127", "not found"]);
    assert!(started.elapsed().as_secs() < 30);
    let attempts = std::fs::read_dir(out.join("candidates")).unwrap().count();
    assert!(attempts <= 3, "{attempts} candidates were started");

    let out = scratch("always");
    let output = search_with(&out, "echo 'CUDA error: out of memory' >&2; exit 2", &["--retries", "3"]);
    fails_with(&output, &["failed on every candidate of the first round", "status 2", "CUDA error: out of memory"]);
    // Stopped after the first pass: no retries were spent.
    assert!(!out.join("candidates/0-0/attempt-2").exists());

    let out = scratch("malformed");
    let output = search_with(&out, "echo '{\"score\": 1}' > \"$LOSSCC_RESULT\"", &["--samples", "2"]);
    fails_with(&output, &["not JSON with a numeric \"reward\""]);
}

/// Misuse of the executors gets one sentence.
#[test]
fn executor_misuse_gets_one_sentence() {
    let out = scratch("nosbatch").display().to_string();
    let biou = example("biou.metric");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_losscc"))
        .args(["search", &biou, "--out", &out, "--executor", "slurm"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    fails_with(&output, &["`sbatch` was not found", "scripts/slurm-local.sh start"]);
    let output = losscc(&["task", "/nonexistent/attempt-1"]);
    fails_with(&output, &["cannot read `/nonexistent/attempt-1/task.json`", "filesystem every node shares"]);
    let output = losscc(&["search", &biou, "--out", &out, "--workers", "0"]);
    fails_with(&output, &["--workers must be at least 1"]);
}
