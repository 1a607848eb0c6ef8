//! `losscc search --executor slurm` on a real Slurm (a one-node cluster that
//! `scripts/slurm-local.sh start` brings up; `.ci/run` does): the same rewards as the local
//! executor, to the last bit; a driver killed with SIGKILL while an array runs reattaches to
//! it on `--resume` instead of resubmitting, and ends with the uninterrupted result; a failing
//! task is retried in a new array. Without Slurm these tests say so and pass, except under CI
//! (`CI=true`), where they fail: CI starts Slurm, so its absence is a broken set-up.

mod common;

use common::{example, losscc, text};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Small enough for a few seconds per candidate on one core (with `--iters` of the test's).
const TINY: [&str; 8] = ["--train-images", "12", "--image-size", "32", "--crop", "32", "--threads-per-model", "1"];

fn slurm_is_up() -> bool {
    let up = Command::new("sinfo")
        .args(["-h", "-o", "%T"])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).lines().any(|l| !l.contains("down")))
        .unwrap_or(false);
    if !up {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("Slurm is not up, but CI=true: .ci/run starts it with scripts/slurm-local.sh start; see its output");
        }
        eprintln!("Slurm is not up (run `sudo scripts/slurm-local.sh start`): the Slurm tests are skipped");
    }
    up
}

fn scratch(name: &str) -> PathBuf {
    let dir = common::scratch("slurm", name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn search_args(out: &Path, executor: &str, iters: usize) -> Vec<String> {
    let mut args: Vec<String> =
        ["search", &example("biou.metric"), "--set", "tol=2", "--out", &out.display().to_string()]
            .iter()
            .map(|s| s.to_string())
            .collect();
    args.extend(["--executor", executor, "--rounds", "2", "--samples", "3"].iter().map(|s| s.to_string()));
    args.extend(TINY.iter().map(|s| s.to_string()));
    args.extend(["--iters".to_string(), iters.to_string()]);
    args
}

fn run(args: &[String]) -> Output {
    losscc(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn journal(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("history.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `(round, sample, reward)` of every finished candidate, sorted.
fn rewards(out: &Path) -> Vec<(u64, u64, f64)> {
    let mut found: Vec<(u64, u64, f64)> = journal(out)
        .iter()
        .filter_map(|l| Some((l["round"].as_u64()?, l["sample"].as_u64()?, l["reward"].as_f64()?)))
        .collect();
    found.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    found
}

#[test]
fn slurm_journals_the_local_rewards_and_reattaches_after_a_kill() {
    if !slurm_is_up() {
        return;
    }
    let local = scratch("local");
    let output = run(&search_args(&local, "local", 12));
    assert!(output.status.success(), "{}", text(&output.stderr));
    let slurm = scratch("whole");
    let output = run(&search_args(&slurm, "slurm", 12));
    assert!(output.status.success(), "{}", text(&output.stderr));
    // Bit for bit: the same task code, the same threads per model.
    assert_eq!(rewards(&slurm), rewards(&local));
    assert_eq!(rewards(&slurm).len(), 6);
    let lines = journal(&slurm);
    let arrays: Vec<&Value> = lines.iter().filter(|l| l["event"] == "slurm_array").collect();
    assert_eq!(arrays.len(), 2, "one job array per round");
    for line in lines.iter().filter(|l| l["reward"].is_number()) {
        assert_eq!(line["executor"], "slurm");
    }
    let read = |dir: &Path, name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    assert_eq!(read(&slurm, "best.params.json"), read(&local, "best.params.json"));
    assert_eq!(read(&slurm, "mu.params.json"), read(&local, "mu.params.json"));

    // Kill the driver once the first array is submitted, while its tasks still run.
    let killed = scratch("killed");
    let args = search_args(&killed, "slurm", 60);
    let mut child = Command::new(env!("CARGO_BIN_EXE_losscc"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let job = loop {
        let submitted = journal(&killed).into_iter().find(|l| l["event"] == "slurm_array");
        if let Some(line) = submitted {
            break line["job"].as_str().unwrap().to_string();
        }
        assert!(started.elapsed() < Duration::from_secs(120), "no job array was submitted");
        std::thread::sleep(Duration::from_millis(50));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let queued = Command::new("squeue").args(["-h", "-j", &job]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&queued.stdout).trim().is_empty(),
        "the array {job} ended before the kill mattered"
    );
    let resumed = run(&[args.clone(), vec!["--resume".into()]].concat());
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    let arrays: Vec<Value> = journal(&killed).into_iter().filter(|l| l["event"] == "slurm_array").collect();
    assert_eq!(arrays.iter().filter(|l| l["round"] == 0).count(), 1, "round 0 was resubmitted: {arrays:?}");
    // The uninterrupted result, computed locally with the same settings.
    let reference = scratch("reference");
    let output = run(&search_args(&reference, "local", 60));
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(rewards(&killed), rewards(&reference));
    assert_eq!(read(&killed, "best.params.json"), read(&reference, "best.params.json"));
}

/// A task that fails is retried in a new array of its own, and the trainer contract holds on
/// Slurm as it does locally.
#[test]
fn slurm_retries_a_failed_task_in_a_new_array() {
    if !slurm_is_up() {
        return;
    }
    let out = scratch("retry");
    let trainer = r#"if [ "$LOSSCC_CANDIDATE" = 0-1 ] && [ ! -e ../flaky ]; then touch ../flaky; exit 4; fi; echo '{"reward": 0.25}' > "$LOSSCC_RESULT""#;
    let miou = example("miou.metric");
    let out_text = out.display().to_string();
    let args = [
        "search",
        &miou,
        "--out",
        &out_text,
        "--executor",
        "slurm",
        "--trainer",
        trainer,
        "--rounds",
        "1",
        "--samples",
        "3",
    ];
    let output = losscc(&args);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let lines = journal(&out);
    let arrays: Vec<&Value> = lines.iter().filter(|l| l["event"] == "slurm_array").collect();
    assert_eq!(arrays.len(), 2, "the first array, then one for the retry");
    assert_eq!(arrays[1]["tasks"].as_array().unwrap().len(), 1);
    let retried = lines.iter().find(|l| l["sample"] == 1 && l["reward"].is_number()).unwrap();
    assert_eq!(retried["attempts"], 2);
    assert!(out.join("candidates/0-1/attempt-1/trainer.status").exists());
    assert!(std::fs::read_dir(out.join("rounds/0")).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".out")));
}
