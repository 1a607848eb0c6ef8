//! losscc's search: PPO over a loss's curve parameters, each candidate rewarded by training
//! on the proxy task (Auto Seg-Loss's PPO2).
//!
//! * [`config`] — [`config::SearchConfig`], what determines a search's result; presets;
//! * [`policy`] — truncated normals, the PPO update, the search-variable [`policy::Layout`];
//! * [`journal`] — `history.jsonl`, the search's single source of truth;
//! * [`run`] — [`run::Search`], the driver: rounds, attempts, retries, resume;
//! * [`task`] — one attempt at one candidate as a unit of work (`task.json` in,
//!   `outcome.json` out): the proxy evaluator or the user's trainer command;
//! * [`executor`] — where attempts run: [`executor::local::Local`] child processes, or
//!   [`executor::slurm::Slurm`] job arrays;
//! * [`report`] — the rounds table, `report.md` and its SVG plots;
//! * [`progress`] — the [`progress::Progress`] trait callers implement to show progress.
//!
//! Architecture invariant: a search is a pure function of its configuration and the rewards
//! (draws from per-round ChaCha streams, a deterministic float64 policy update), which is
//! what makes `--resume` exact.

pub mod config;
pub mod executor;
pub mod journal;
pub mod policy;
pub mod progress;
pub mod report;
pub mod run;
pub mod task;
