//! Argument types several commands share: `--set NAME=VALUE` overrides and the proxy task's
//! options (`train` and `search`).

use anyhow::Result;
use losscc_loss::Overrides;
use losscc_proxy::data::{Dataset, SyntheticSpec};
use losscc_proxy::trainer::{self, TrainConfig};
use std::path::PathBuf;

/// `--set NAME=VALUE` as overrides, or a sentence saying which one is malformed.
pub fn parse_sets(sets: &[String]) -> Result<Overrides> {
    let mut overrides = Overrides::new();
    for set in sets {
        match set.split_once('=') {
            Some((name, value)) if !name.trim().is_empty() => overrides = overrides.text(name.trim(), value),
            _ => anyhow::bail!("`--set {set}` must have the form NAME=VALUE, e.g. `--set tol=3`."),
        }
    }
    Ok(overrides)
}

/// The label of ignored pixels: a number, or `none` for no ignored pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IgnoreLabel(pub Option<i64>);

impl std::str::FromStr for IgnoreLabel {
    type Err = String;
    fn from_str(text: &str) -> Result<IgnoreLabel, String> {
        match text.trim() {
            "none" => Ok(IgnoreLabel(None)),
            number => number
                .parse::<i64>()
                .map(|value| IgnoreLabel(Some(value)))
                .map_err(|_| format!("`{text}` is neither a label value (an integer) nor `none`")),
        }
    }
}

/// `--ignore-label`: which label value marks ignored pixels.
#[derive(clap::Args, Clone, Copy)]
pub struct LabelArgs {
    /// The label value of ignored pixels (they belong to no class and are not valid), or
    /// `none` when every pixel counts.
    #[arg(long, value_name = "VALUE|none", default_value = "255")]
    pub ignore_label: IgnoreLabel,
}

/// Where the proxy task's images come from, and how the proxy network trains.
#[derive(clap::Args, Clone)]
pub struct ProxyArgs {
    /// A VOC-layout folder (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/); the
    /// built-in scenes when absent.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Number of classes in --data (default: the largest label value plus one).
    #[arg(long)]
    pub classes: Option<usize>,
    /// Seed of the built-in scenes (the same scenes for every training seed).
    #[arg(long, default_value_t = 0)]
    pub data_seed: u64,
    /// Side of the built-in scenes in pixels [default: 80; 160 with `--preset paper`].
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Number of built-in training scenes (hold-out gets a quarter, test a half of this).
    #[arg(long, default_value_t = 192)]
    pub train_images: usize,
    /// Leave the built-in scenes without the ignored (255) band around objects.
    #[arg(long)]
    pub no_ignore_band: bool,
    /// Which label value of --data's files (and of a --trainer's labels) marks ignored pixels.
    #[command(flatten)]
    pub labels: LabelArgs,
    /// Batch size of the proxy training.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Side of the square training crops (a multiple of 4).
    #[arg(long)]
    pub crop: Option<usize>,
    /// Initial SGD learning rate (poly schedule).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Channels of the proxy network at stride 2.
    #[arg(long)]
    pub width: Option<i64>,
    /// Train on CUDA through libtorch; stops with an error when no GPU is available.
    #[arg(long)]
    pub gpu: bool,
}

impl ProxyArgs {
    pub fn synthetic(&self) -> SyntheticSpec {
        let train = self.train_images.max(1);
        SyntheticSpec {
            seed: self.data_seed,
            size: self.image_size.unwrap_or(80),
            train,
            holdout: (train / 4).max(1),
            test: (train / 2).max(1),
            ignore_band: !self.no_ignore_band,
        }
    }

    pub fn train_config(&self, iters: usize, seed: u64) -> TrainConfig {
        let defaults = TrainConfig::default();
        TrainConfig {
            iters,
            batch: self.batch.unwrap_or(defaults.batch),
            crop: self.crop.unwrap_or(defaults.crop),
            lr: self.lr.unwrap_or(defaults.lr),
            width: self.width.unwrap_or(defaults.width),
            seed,
            ..defaults
        }
    }

    pub fn dataset(&self) -> Result<Dataset> {
        let size = self.image_size.unwrap_or(80);
        if self.data.is_none() && (size < 8 || size % 4 != 0) {
            anyhow::bail!("--image-size must be a multiple of 4 and at least 8");
        }
        Ok(trainer::load_dataset(self.data.as_deref(), self.classes, self.labels.ignore_label.0, &self.synthetic())?)
    }
}
