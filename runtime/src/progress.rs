//! Progress bars for long work (training, search), drawn on stderr only when it is a
//! terminal, so pipes and logs stay clean.

use indicatif::{ProgressBar, ProgressStyle};

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
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar
}
