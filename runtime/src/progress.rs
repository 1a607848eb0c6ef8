//! Progress bars for long work (training, search), drawn on stderr only when it is a
//! terminal, so pipes and logs stay clean.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use losscc_search::progress::Progress;
use std::sync::Mutex;

/// The style of a bar counting `what` (`steps`, `candidates`, `rounds`).
pub fn style(what: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!(
        "{{prefix:>24}} [{{bar:30}}] {{pos}}/{{len}} {what} {{msg}} ({{elapsed}}, eta {{eta}})"
    ))
    .expect("a valid template")
    .progress_chars("=> ")
}

/// A bar over training steps.
pub fn steps_bar(steps: u64, prefix: &str) -> ProgressBar {
    let bar = ProgressBar::new(steps).with_style(style("steps")).with_prefix(prefix.to_string());
    bar.set_draw_target(ProgressDrawTarget::stderr());
    bar
}

/// The search's bars: rounds, candidates of the round, and one bar of training steps per
/// worker. Hidden when stderr is not a terminal; round lines are printed anyway.
pub struct SearchBars {
    multi: Option<MultiProgress>,
    rounds: ProgressBar,
    candidates: ProgressBar,
    workers: Mutex<Vec<ProgressBar>>,
}

impl SearchBars {
    pub fn new(visible: bool, rounds: usize, samples: usize) -> SearchBars {
        let multi = visible.then(MultiProgress::new);
        let make = |length: usize, what: &str, prefix: &str| {
            let bar = ProgressBar::new(length as u64).with_style(style(what)).with_prefix(prefix.to_string());
            SearchBars::attach(&multi, bar)
        };
        SearchBars {
            rounds: make(rounds, "rounds", "search"),
            candidates: make(samples, "candidates", "this round"),
            workers: Mutex::new(Vec::new()),
            multi,
        }
    }

    fn attach(multi: &Option<MultiProgress>, bar: ProgressBar) -> ProgressBar {
        match multi {
            Some(multi) => multi.add(bar),
            None => {
                bar.set_draw_target(ProgressDrawTarget::hidden());
                bar
            }
        }
    }

    fn worker(&self, slot: usize) -> ProgressBar {
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        while workers.len() <= slot {
            let bar =
                ProgressBar::new(0).with_style(style("steps")).with_prefix(format!("model {}", workers.len() + 1));
            workers.push(SearchBars::attach(&self.multi, bar));
        }
        workers[slot].clone()
    }

    /// Clear the bars (the search is over).
    pub fn finish(&self) {
        for bar in self.workers.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            bar.finish_and_clear();
        }
        self.candidates.finish_and_clear();
        self.rounds.finish_and_clear();
    }
}

impl Progress for SearchBars {
    fn round_started(&self, round: usize, done: usize) {
        self.rounds.set_position(round as u64);
        self.candidates.set_position(done as u64);
    }

    fn candidate_started(&self, slot: usize, label: &str, steps: usize) {
        let bar = self.worker(slot);
        bar.reset();
        bar.set_length(steps as u64);
        bar.set_message(label.to_string());
    }

    fn candidate_step(&self, slot: usize, step: usize) {
        self.worker(slot).set_position(step as u64);
    }

    fn worker_idle(&self, slot: usize) {
        self.worker(slot).set_message("");
    }

    fn candidate_finished(&self) {
        self.candidates.inc(1);
    }

    fn array(&self, queued: usize, running: usize, done: usize, failed: usize) {
        let line = format!("job array: {queued} queued, {running} running, {done} done, {failed} failed");
        match &self.multi {
            Some(_) => self.candidates.set_message(line),
            None => eprintln!("{line}"),
        }
    }

    fn round_finished(&self, summary: &str) {
        match &self.multi {
            Some(multi) => {
                let _ = multi.println(summary);
            }
            None => eprintln!("{summary}"),
        }
        self.rounds.inc(1);
    }
}
