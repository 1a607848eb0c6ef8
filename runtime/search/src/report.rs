//! What a finished search shows: the table of rounds, `OUT/report.md`, and its plots
//! (`reward.svg`: rewards per round; `curves.svg`: μ's curves at each round).

use crate::config::SearchConfig;
use crate::run::Outcome;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, CellAlignment, Table};
use compiler::curve::Curve;
use plotters::prelude::*;
use std::fmt::Write as _;
use std::path::Path;

fn format_reward(value: Option<f64>) -> String {
    value.map_or("-".to_string(), |v| format!("{v:.4}"))
}

/// The rounds as a terminal table.
pub fn rounds_table(outcome: &Outcome) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_header(vec!["round", "μ reward", "mean reward", "best reward", "failed", "seconds"]);
    for round in &outcome.rounds {
        table.add_row(vec![
            Cell::new(round.round + 1),
            Cell::new(format_reward(round.mu_reward)).set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.4}", round.mean_reward)).set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.4}", round.best_reward)).set_alignment(CellAlignment::Right),
            Cell::new(round.failed).set_alignment(CellAlignment::Right),
            Cell::new(format!("{:.0}", round.seconds)).set_alignment(CellAlignment::Right),
        ]);
    }
    table
}

/// Write `report.md`, `reward.svg` and `curves.svg` into `dir`.
pub fn write(
    dir: &Path,
    config: &SearchConfig,
    outcome: &Outcome,
    curve_names: &[String],
    data: &str,
) -> Result<(), String> {
    plot_rewards(&dir.join("reward.svg"), outcome).map_err(|e| format!("cannot draw reward.svg: {e}"))?;
    plot_curves(&dir.join("curves.svg"), outcome, curve_names).map_err(|e| format!("cannot draw curves.svg: {e}"))?;
    let mut text = String::new();
    let _ = writeln!(text, "# losscc search: `{}` for `{}`\n", config.file, config.target);
    if config.policy == crate::config::Policy::Random {
        let _ = writeln!(
            text,
            "Random search over {} search variables (no policy update: every round draws from the starting policy, σ = {}): {} rounds × {} samples, baseline `{}`, seed {}.",
            outcome.final_mu.len(),
            config.sigma,
            config.rounds,
            config.samples,
            serde_json::to_value(config.baseline).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
            config.seed
        );
    } else {
        let _ = writeln!(
        text,
        "PPO over {} search variables: {} rounds × {} samples (σ = {}, clip ε = {}, {} Adam steps at lr {}, baseline `{}`), seed {}.",
        outcome.final_mu.len(),
        config.rounds,
        config.samples,
        config.sigma,
        config.clip,
        config.adam_steps,
        config.adam_lr,
        serde_json::to_value(config.baseline).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
        config.seed
    );
    }
    let _ = writeln!(
        text,
        "Proxy: {} iterations, batch {}, {}×{} crops, SGD lr {} (poly), width {}. Data: {data}. Reward: exact `{}` on the hold-out split{}.\n",
        config.train.iters,
        config.train.batch,
        config.train.crop,
        config.train.crop,
        config.train.lr,
        config.train.width,
        config.target,
        if config.proxy_seeds > 1 {
            let last = config.seed + config.proxy_seeds as u64 - 1;
            format!(", the mean over {} proxy trainings (seeds {} to {last})", config.proxy_seeds, config.seed)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        text,
        "| round | μ reward | mean reward | best reward | failed | seconds |\n|---:|---:|---:|---:|---:|---:|"
    );
    for round in &outcome.rounds {
        let _ = writeln!(
            text,
            "| {} | {} | {:.4} | {:.4} | {} | {:.0} |",
            round.round + 1,
            format_reward(round.mu_reward),
            round.mean_reward,
            round.best_reward,
            round.failed,
            round.seconds
        );
    }
    let best = &outcome.best;
    let _ = writeln!(
        text,
        "\nBest candidate: `{}-{}` (round {}, sample {}), reward {:.4} → `best.params.json`. The policy's final μ → `mu.params.json`.\n",
        best.round,
        best.sample,
        best.round + 1,
        best.sample + 1,
        best.reward
    );
    let _ = writeln!(text, "| curve | best control points (x, y pairs) | final μ control points |\n|---|---|---|");
    for (index, name) in curve_names.iter().enumerate() {
        let show = |points: &[f64]| points.iter().map(|v| format!("{v:.3}")).collect::<Vec<_>>().join(", ");
        let _ = writeln!(
            text,
            "| `{name}` | {} | {} |",
            show(&best.control_points[index]),
            show(&outcome.final_curves[index])
        );
    }
    let _ = writeln!(text, "\n![reward per round](reward.svg)\n\n![curves of μ per round](curves.svg)\n");
    let _ = writeln!(
        text,
        "## Candidates\n\nNumbered `<round>-<sample>` as in `history.jsonl`; folders under `candidates/`.\n\n\
         | candidate | reward | seconds | attempts | host | device | executor |\n|---|---:|---:|---:|---|---|---|"
    );
    for candidate in &outcome.candidates {
        let _ = writeln!(
            text,
            "| `{}-{}` | {:.4} | {:.1} | {} | {} | {} | {} |",
            candidate.round,
            candidate.sample,
            candidate.reward,
            candidate.seconds,
            candidate.attempts,
            candidate.host,
            candidate.device,
            candidate.executor
        );
    }
    if !outcome.failed.is_empty() {
        let _ =
            writeln!(text, "\n## Failed candidates\n\n| candidate | attempts | host | reason |\n|---|---:|---|---|");
        for failed in &outcome.failed {
            let _ = writeln!(
                text,
                "| `{}-{}` | {} | {} | {} |",
                failed.round,
                failed.sample,
                failed.attempts,
                failed.host,
                failed.reason.replace('|', "\\|")
            );
        }
        let _ = writeln!(
            text,
            "\nEach failed candidate's folder keeps its attempts' `task.log` (and a trainer's output files)."
        );
    }
    let _ = writeln!(
        text,
        "Use the result: `losscc train {file} --params best.params.json`, `losscc compile {file} --params best.params.json -o loss.onnx`.",
        file = config.file
    );
    let path = dir.join("report.md");
    std::fs::write(&path, text).map_err(|e| format!("cannot write `{}`: {e}", path.display()))
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

fn plot_rewards(path: &Path, outcome: &Outcome) -> PlotResult {
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let rewards: Vec<f64> = outcome.candidates.iter().map(|c| c.reward).collect();
    let low = rewards.iter().copied().fold(f64::INFINITY, f64::min);
    let high = rewards.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let pad = ((high - low) * 0.1).max(1e-3);
    let rounds = outcome.rounds.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption("reward per round", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.5..rounds + 0.5, (low - pad)..(high + pad))?;
    chart.configure_mesh().x_desc("round").y_desc("reward (hold-out)").draw()?;
    chart.draw_series(
        outcome
            .candidates
            .iter()
            .map(|c| Circle::new(((c.round + 1) as f64, c.reward), 3, RGBColor(150, 150, 150).filled())),
    )?;
    let line = |values: Vec<(f64, f64)>, color: RGBColor, label: &str, chart: &mut ChartContext<_, _>| -> PlotResult {
        chart
            .draw_series(LineSeries::new(values, color.stroke_width(2)))?
            .label(label.to_string())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        Ok(())
    };
    if outcome.rounds.iter().all(|r| r.mu_reward.is_some()) {
        let mu = outcome.rounds.iter().map(|r| ((r.round + 1) as f64, r.mu_reward.unwrap_or(0.0))).collect();
        line(mu, RGBColor(200, 40, 40), "μ", &mut chart)?;
    }
    let mean = outcome.rounds.iter().map(|r| ((r.round + 1) as f64, r.mean_reward)).collect();
    line(mean, RGBColor(40, 90, 200), "mean", &mut chart)?;
    let best = outcome.rounds.iter().map(|r| ((r.round + 1) as f64, r.best_reward)).collect();
    line(best, RGBColor(40, 150, 60), "best", &mut chart)?;
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw()?;
    root.present()?;
    Ok(())
}

fn plot_curves(path: &Path, outcome: &Outcome, names: &[String]) -> PlotResult {
    let count = names.len().max(1);
    let columns = count.min(2);
    let rows = count.div_ceil(columns);
    let root = SVGBackend::new(path, (380 * columns as u32, 360 * rows as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((rows, columns));
    let rounds = outcome.rounds.len().max(1);
    for (index, (name, area)) in names.iter().zip(areas).enumerate() {
        let mut chart = ChartBuilder::on(&area)
            .caption(name.as_str(), ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(28)
            .y_label_area_size(36)
            .build_cartesian_2d(0.0..1.0, 0.0..1.0)?;
        chart.configure_mesh().x_labels(5).y_labels(5).draw()?;
        let sample = |points: &[f64]| -> Vec<(f64, f64)> {
            match Curve::from_flat(points) {
                Ok(curve) => (0..=100).map(|i| i as f64 / 100.0).map(|x| (x, curve.eval(x))).collect(),
                Err(_) => Vec::new(),
            }
        };
        chart.draw_series(LineSeries::new(vec![(0.0, 0.0), (1.0, 1.0)], RGBColor(200, 200, 200).stroke_width(1)))?;
        for round in &outcome.rounds {
            // Later rounds are darker.
            let shade = 200 - (150 * (round.round + 1) / rounds) as u8;
            chart.draw_series(LineSeries::new(sample(&round.mu_curves[index]), RGBColor(shade, shade, 255)))?;
        }
        chart
            .draw_series(LineSeries::new(sample(&outcome.final_curves[index]), RGBColor(200, 40, 40).stroke_width(2)))?
            .label("final μ")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RGBColor(200, 40, 40).stroke_width(2)));
        chart
            .draw_series(LineSeries::new(
                sample(&outcome.best.control_points[index]),
                RGBColor(40, 150, 60).stroke_width(2),
            ))?
            .label("best")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RGBColor(40, 150, 60).stroke_width(2)));
        chart.configure_series_labels().position(SeriesLabelPosition::LowerRight).border_style(BLACK).draw()?;
    }
    root.present()?;
    Ok(())
}
