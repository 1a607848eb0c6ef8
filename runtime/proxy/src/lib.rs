//! losscc's proxy task: what a candidate loss is trained and judged on during search.
//!
//! * [`data`] — the built-in scenes (a pure function of their [`data::SyntheticSpec`]) and
//!   VOC-layout folders, training batches (random crops, flips) and evaluation batches;
//! * [`network`] — [`network::ProxyNet`], the small DeepLab-like encoder–decoder;
//! * [`trainer`] — [`trainer::train`] (SGD, poly schedule) with an [`trainer::Objective`]
//!   (a compiled loss, cross-entropy, Lovász-softmax), and [`trainer::Trained::evaluate`]
//!   (exact metrics over a split).
//!
//! Architecture invariant: training is deterministic on the CPU for a seed: batches come
//! from a ChaCha stream, initial weights from libtorch's generator seeded under a
//! process-wide lock.

pub mod data;
pub mod network;
pub mod trainer;
