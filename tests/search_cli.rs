//! `losscc search` and `losscc train` as users run them, on small built-in scenes: outputs,
//! resume after a real kill, and one clear sentence for each misuse.

mod common;

use common::{example, losscc, text};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Small enough for seconds per candidate on one core.
const TINY: [&str; 8] = ["--iters", "8", "--train-images", "12", "--image-size", "32", "--crop", "32"];

/// Small built-in data for `train`.
const SMALL_DATA: [&str; 6] = ["--train-images", "8", "--image-size", "32", "--crop", "32"];

/// A folder for one search: it must not exist yet (a search refuses to overwrite one).
fn scratch(name: &str) -> PathBuf {
    let dir = common::scratch("search", name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn search(out: &Path, extra: &[&str]) -> Output {
    let biou = example("biou.metric");
    let out = out.display().to_string();
    let mut args = vec!["search", biou.as_str(), "--out", out.as_str(), "--set", "tol=2"];
    args.extend_from_slice(&TINY);
    args.extend_from_slice(extra);
    // Two rounds of three candidates unless the caller says otherwise.
    for (flag, value) in [("--rounds", "2"), ("--samples", "3")] {
        if !extra.contains(&flag) {
            args.extend_from_slice(&[flag, value]);
        }
    }
    losscc(&args)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn a_search_killed_mid_round_resumes_to_the_uninterrupted_result() {
    let whole = scratch("whole");
    let output = search(&whole, &[]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert!(stdout.contains("μ reward") && stdout.contains("best: candidate"), "{stdout}");
    for file in
        ["config.json", "history.jsonl", "best.params.json", "mu.params.json", "report.md", "reward.svg", "curves.svg"]
    {
        assert!(whole.join(file).exists(), "{file} missing");
    }
    let history = read(&whole.join("history.jsonl"));
    let lines: Vec<Value> = history.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 6);
    for line in &lines {
        let reward = line["reward"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&reward));
        assert_eq!(line["control_points"].as_array().unwrap().len(), 2);
        assert!(line["seconds"].as_f64().unwrap() > 0.0);
        // Where it ran.
        assert_eq!(line["executor"], "local");
        assert!(!line["host"].as_str().unwrap().is_empty() && line["device"] == "Cpu", "{line}");
    }
    let best: Value = serde_json::from_str(&read(&whole.join("best.params.json"))).unwrap();
    assert_eq!(best["format"], "losscc-params");
    let best_reward = best["provenance"]["reward"].as_f64().unwrap();
    let max_reward = lines.iter().map(|l| l["reward"].as_f64().unwrap()).fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(best_reward, max_reward);
    assert!(read(&whole.join("reward.svg")).contains("<svg"));
    assert!(read(&whole.join("report.md")).contains("| round | μ reward |"));

    // Kill a second run once it has finished two candidates, then resume it.
    let killed = scratch("killed");
    let biou = example("biou.metric");
    let out = killed.display().to_string();
    let mut args =
        vec!["search", biou.as_str(), "--out", out.as_str(), "--set", "tol=2", "--rounds", "2", "--samples", "3"];
    args.extend_from_slice(&TINY);
    let mut child = Command::new(env!("CARGO_BIN_EXE_losscc"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        let finished = std::fs::read_to_string(killed.join("history.jsonl")).map_or(0, |h| h.lines().count());
        if finished >= 2 || started.elapsed() > Duration::from_secs(300) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = read(&killed.join("history.jsonl")).lines().count();
    assert!(before < 6, "the kill came too late to test anything ({before} candidates done)");
    // A kill in the middle of a write leaves a torn line; resume must cope.
    let mut torn = read(&killed.join("history.jsonl"));
    torn.push_str("{\"round\":1,\"sam");
    std::fs::write(killed.join("history.jsonl"), torn).unwrap();

    let resumed = search(&killed, &["--resume"]);
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    let stdout = text(&resumed.stdout);
    assert!(stdout.contains(&format!("{before} reused from history")), "{stdout}");
    assert_eq!(read(&killed.join("best.params.json")), read(&whole.join("best.params.json")));
    assert_eq!(read(&killed.join("mu.params.json")), read(&whole.join("mu.params.json")));
    assert_eq!(read(&killed.join("history.jsonl")).lines().count(), 6);

    // Resuming with more rounds extends the search; the first rounds are reused.
    let extended = search(&killed, &["--resume", "--rounds", "3"]);
    assert!(extended.status.success(), "{}", text(&extended.stderr));
    assert!(text(&extended.stdout).contains("3 candidates run now, 6 reused"), "{}", text(&extended.stdout));

    // The searched curves feed the other commands.
    let best_path = whole.join("best.params.json").display().to_string();
    let onnx = whole.join("loss.onnx").display().to_string();
    let compiled = losscc(&["compile", &biou, "--set", "tol=2", "--params", &best_path, "-o", &onnx]);
    assert!(compiled.status.success(), "{}", text(&compiled.stderr));
    let mut args = vec!["train", &biou, "--set", "tol=2", "--params", &best_path, "--iters", "4"];
    args.extend_from_slice(&SMALL_DATA);
    let trained = losscc(&args);
    assert!(trained.status.success(), "{}", text(&trained.stderr));
}

#[test]
fn train_prints_the_six_exact_metrics_for_each_loss() {
    for loss in [&["--loss", "ce"][..], &["--loss", "dice"], &["--loss", "lovasz"], &[&example("miou.metric")]] {
        let mut args = vec!["train"];
        args.extend_from_slice(loss);
        args.extend_from_slice(&["--iters", "6", "--batch", "4"]);
        args.extend_from_slice(&SMALL_DATA);
        let output = losscc(&args);
        assert!(output.status.success(), "{loss:?}: {}", text(&output.stderr));
        let json: Value = serde_json::from_slice(&output.stdout).unwrap();
        for metric in ["miou", "fwiou", "macc", "gacc", "biou", "bf1"] {
            let value = json[metric].as_f64().unwrap_or_else(|| panic!("{loss:?}: {metric} missing in {json}"));
            assert!((0.0..=1.0).contains(&value), "{loss:?}: {metric} = {value}");
        }
        assert_eq!(json["split"], "test");
        // Global accuracy is the fraction of pixels right: it must be consistent with the
        // frequency-weighted IoU, which can never exceed it.
        assert!(json["fwiou"].as_f64().unwrap() <= json["gacc"].as_f64().unwrap() + 1e-12);
    }
    // The same seed gives the same numbers.
    let mut args = vec!["train", "--loss", "ce", "--iters", "5", "--seed", "3"];
    args.extend_from_slice(&SMALL_DATA);
    let a: Value = serde_json::from_slice(&losscc(&args).stdout).unwrap();
    let b: Value = serde_json::from_slice(&losscc(&args).stdout).unwrap();
    assert_eq!(a["miou"], b["miou"]);
    assert_eq!(a["final_training_loss"], b["final_training_loss"]);
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let output = losscc(args);
    assert_eq!(output.status.code(), Some(1), "{args:?} should fail: {}", text(&output.stdout));
    let stderr = text(&output.stderr);
    for needle in needles {
        assert!(stderr.contains(needle), "{args:?}: `{needle}` not in: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn misuse_gets_one_clear_sentence() {
    let biou = example("biou.metric");
    let dir = scratch("misuse");
    let out = dir.display().to_string();
    // Resume with nothing there.
    fails_with(&["search", &biou, "--out", &out, "--resume"], &["holds no search to resume"]);
    // A finished search is not overwritten, and a changed setting is named.
    let first = search(&dir, &["--rounds", "1", "--samples", "2"]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let mut args =
        vec!["search", biou.as_str(), "--out", out.as_str(), "--set", "tol=2", "--rounds", "1", "--samples", "2"];
    args.extend_from_slice(&TINY);
    fails_with(&args, &["already holds a search", "--resume"]);
    args.extend_from_slice(&["--resume", "--seed", "9"]);
    fails_with(&args, &["different settings", "`seed` was 0, now 9"]);
    // A loss file needs a target.
    fails_with(
        &["search", &example("miou_biou.metric"), "--out", &scratch("loss").display().to_string()],
        &["--target"],
    );
    fails_with(&["search", &biou, "--target", "nonsense", "--out", &out], &["neither a built-in metric"]);
    fails_with(&["train", "--loss", "ce", "--data", "/nonexistent/voc"], &["does not exist", "--data"]);
    fails_with(&["train", "--loss", "ce", "--crop", "30"], &["multiple of 4"]);
    fails_with(&["train", "--loss", "ce", "--batch", "1"], &["at least 2"]);
    fails_with(&["train", "--loss", "ce", "--width", "0"], &["--width must be at least 1"]);
    let fresh = scratch("sigma").display().to_string();
    fails_with(&["search", &biou, "--out", &fresh, "--sigma", "0"], &["--sigma must be a number in (0, 10]"]);
    fails_with(&["search", &biou, "--out", &fresh, "--ppo-lr=-1"], &["--ppo-lr must be a number"]);
    fails_with(&["train", &biou, "--params", "/nonexistent/p.json"], &["/nonexistent/p.json"]);
    fails_with(&["search", &biou, "--out", &fresh, "--proxy-seeds", "0"], &["--proxy-seeds must be at least 1"]);
    fails_with(
        &["search", &biou, "--out", &fresh, "--proxy-seeds", "2", "--trainer", "true"],
        &["--proxy-seeds averages the built-in proxy's rewards"],
    );
}

/// With `--proxy-seeds 2` a candidate's reward is the mean of its proxy trainings from the
/// search's seed and the next: μ (the same curves in every search) shows it exactly.
#[test]
fn proxy_seeds_average_the_reward() {
    let single = ["--rounds", "1", "--samples", "2"];
    let mu_reward = |name: &str, extra: &[&str]| {
        let dir = scratch(name);
        let mut args = extra.to_vec();
        args.extend_from_slice(&single);
        let output = search(&dir, &args);
        assert!(output.status.success(), "{}", text(&output.stderr));
        let lines = history_lines(&dir);
        let mu = lines.iter().find(|l| l["round"] == 0 && l["sample"] == 0).expect("μ's line");
        (mu["reward"].as_f64().unwrap(), dir)
    };
    let (seed0, _) = mu_reward("proxy-seed0", &["--seed", "0"]);
    let (seed1, _) = mu_reward("proxy-seed1", &["--seed", "1"]);
    let (both, dir) = mu_reward("proxy-seeds2", &["--seed", "0", "--proxy-seeds", "2"]);
    assert_ne!(seed0, seed1, "two proxy seeds gave the same reward");
    assert!((both - (seed0 + seed1) / 2.0).abs() < 1e-12, "{both} is not the mean of {seed0} and {seed1}");
    assert!(read(&dir.join("report.md")).contains("the mean over 2 proxy trainings (seeds 0 to 1)"));
}

#[test]
fn gpu_runs_train_on_cuda_or_stop_with_a_clear_sentence() {
    let args =
        ["train", "--loss", "ce", "--gpu", "--iters", "3", "--train-images", "8", "--image-size", "32", "--crop", "32"];
    if tch::Cuda::is_available() {
        let output = losscc(&args);
        assert!(output.status.success(), "{}", text(&output.stderr));
        let json: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(json["device"], "Cuda(0)");
        let out = scratch("gpu");
        let output = search(&out, &["--gpu", "--models-per-device", "2"]);
        assert!(output.status.success(), "{}", text(&output.stderr));
    } else {
        eprintln!("no CUDA device: checking that --gpu stops with a clear error (the GPU run is skipped)");
        fails_with(&args, &["--gpu was given but libtorch sees no CUDA device", "run without --gpu"]);
        fails_with(&["search", &example("biou.metric"), "--gpu"], &["no CUDA device"]);
    }
}

/// The search's configuration records the source of every file the loss `use`s: a changed
/// used file is noticed on `--resume`, and named.
#[test]
fn resume_notices_a_changed_used_file() {
    let dir = scratch("provenance");
    std::fs::create_dir_all(&dir).unwrap();
    let used = dir.join("iou.metric");
    std::fs::write(&used, "metric iou {\n    mean(count(P & L & V) / count((P | L) & V))\n}\n").unwrap();
    let file = dir.join("both.metric");
    std::fs::write(&file, "use \"iou.metric\";\n\nloss both {\n    (1 - iou()) + 0.1 * ce\n}\n").unwrap();
    let out = dir.join("search").display().to_string();
    let file = file.display().to_string();
    let mut args =
        vec!["search", file.as_str(), "--target", "miou", "--out", out.as_str(), "--rounds", "1", "--samples", "2"];
    args.extend_from_slice(&TINY);
    let first = losscc(&args);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let config: Value = serde_json::from_str(&read(&dir.join("search/config.json"))).unwrap();
    let names: Vec<&str> = config["sources"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names[1].ends_with("iou.metric"), "{names:?}");
    std::fs::write(&used, "metric iou {\n    mean(count(P & L) / count((P | L) & V))\n}\n").unwrap();
    args.push("--resume");
    fails_with(&args, &["different settings", "iou.metric` changed since the search started"]);
}

fn history_lines(dir: &Path) -> Vec<Value> {
    read(&dir.join("history.jsonl")).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn random_search_keeps_mu_where_it_started_and_ppo_moves_it() {
    let (ppo, random) = (scratch("policy-ppo"), scratch("policy-random"));
    for (out, policy) in [(&ppo, "ppo"), (&random, "random")] {
        let output = search(out, &["--policy", policy]);
        assert!(output.status.success(), "{policy}: {}", text(&output.stderr));
    }
    let mu = |dir: &Path, round: u64| -> Vec<f64> {
        let lines = history_lines(dir);
        let line = lines.iter().find(|l| l["round"] == round && l["sample"] == 0).expect("μ's line");
        line["u"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
    };
    assert_eq!(mu(&random, 0), mu(&random, 1), "random search moved μ");
    assert_ne!(mu(&ppo, 0), mu(&ppo, 1), "PPO left μ where it was");
    // The first round is the same draw under both policies (same seed, no update yet).
    let first = |dir: &Path| -> Vec<f64> {
        // Lines come in the order the workers finish; the sample index orders them.
        let mut round: Vec<(u64, f64)> = history_lines(dir)
            .iter()
            .filter(|l| l["round"] == 0)
            .map(|l| (l["sample"].as_u64().unwrap(), l["reward"].as_f64().unwrap()))
            .collect();
        round.sort_by_key(|&(sample, _)| sample);
        round.into_iter().map(|(_, reward)| reward).collect()
    };
    assert_eq!(first(&ppo), first(&random));
    assert!(read(&random.join("report.md")).contains("Random search"));
    assert!(read(&ppo.join("report.md")).contains("PPO over"));
}

#[test]
fn a_target_metric_takes_its_parameters() {
    // The loss (BIoU at tol 2) and its first candidate are the same; only the reward's
    // tolerance differs, so μ's reward must differ.
    let (own, other) = (scratch("target-own"), scratch("target-other"));
    let biou = example("biou.metric");
    let single = ["--rounds", "1", "--samples", "2"];
    let output = search(&own, &single);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let mut extra = vec!["--target", biou.as_str(), "--target-set", "tol=5"];
    extra.extend_from_slice(&single);
    let output = search(&other, &extra);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let reward = |dir: &Path| {
        let lines = history_lines(dir);
        let mu = lines.iter().find(|l| l["round"] == 0 && l["sample"] == 0).expect("μ's line");
        mu["reward"].as_f64().unwrap()
    };
    assert!((reward(&own) - reward(&other)).abs() > 1e-6, "tol 2 and tol 5 gave the same reward {}", reward(&own));
    let config: Value = serde_json::from_str(&read(&own.join("config.json"))).unwrap();
    assert_eq!(config["target_overrides"], serde_json::json!([["tol", "2"]]));
    // A built-in target has no file to set parameters of.
    fails_with(
        &[
            "search",
            biou.as_str(),
            "--target",
            "bf1",
            "--target-set",
            "tol=1",
            "--out",
            &scratch("target-bad").display().to_string(),
        ],
        &["--target-set", "examples/bf1.metric"],
    );
}

#[test]
fn train_reports_more_metrics_with_their_parameters() {
    let bf1 = format!("{}:tol=1", example("bf1.metric"));
    let mut args = vec!["train", "--loss", "ce", "--iters", "6", "--batch", "4", "--metric", bf1.as_str()];
    args.extend_from_slice(&SMALL_DATA);
    let output = losscc(&args);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let json: Value = serde_json::from_slice(&output.stdout).unwrap();
    let strict = json["bf1:tol=1"].as_f64().unwrap_or_else(|| panic!("bf1:tol=1 missing in {json}"));
    assert!((0.0..=1.0).contains(&strict) && strict <= json["bf1"].as_f64().unwrap() + 1e-12, "{json}");
    let ce = example("ce.metric");
    let mut args = vec!["train", "--loss", "ce", "--iters", "2", "--metric", ce.as_str()];
    args.extend_from_slice(&SMALL_DATA);
    fails_with(&args, &["is a loss"]);
}
