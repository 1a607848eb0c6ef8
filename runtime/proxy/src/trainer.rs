//! Training the proxy network with a loss, and measuring it with exact metrics.
//!
//! SGD with momentum and a poly learning-rate schedule, random crops and flips. Everything
//! random comes from the run's seed: the batches from a ChaCha stream, the initial weights
//! from libtorch's generator seeded under a process-wide lock, so runs on parallel threads
//! stay deterministic on CPU. Baselines: cross-entropy (libtorch) and Lovász-softmax.

use crate::data::{self, Dataset, Sample};
use crate::network::{ProxyNet, STRIDE};
use compiler::ir::DEFAULT_IGNORE_LABEL;
use losscc_loss::{Loss, LossError, Overrides};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::Mutex;
use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Reduction, Tensor};

/// The six published metrics and Boundary IoU (Cheng et al.), compiled from the example
/// library with their default parameters, in report order.
pub const STANDARD_METRICS: [(&str, &str); 7] = [
    ("miou", include_str!("../../../examples/miou.metric")),
    ("fwiou", include_str!("../../../examples/fwiou.metric")),
    ("macc", include_str!("../../../examples/macc.metric")),
    ("gacc", include_str!("../../../examples/gacc.metric")),
    ("biou", include_str!("../../../examples/biou.metric")),
    ("bf1", include_str!("../../../examples/bf1.metric")),
    ("boundary_iou", include_str!("../../../examples/boundary_iou.metric")),
];

/// Soft Dice, the baseline loss `train --loss dice` and the results compare with: the
/// example library's Dice metric with identity curves.
pub fn dice() -> Loss {
    Loss::from_source("dice.metric", include_str!("../../../examples/dice.metric"), &Overrides::new())
        .expect("the example metrics compile")
}

/// The standard metric `name` as a compiled [`Loss`] (its exact evaluator is what we use).
pub fn standard_metric(name: &str) -> Option<Loss> {
    let (_, source) = STANDARD_METRICS.iter().find(|(n, _)| *n == name)?;
    Some(Loss::from_source(&format!("{name}.metric"), source, &Overrides::new()).expect("the example metrics compile"))
}

/// What the network is trained to minimize.
pub enum Objective<'a> {
    /// A compiled surrogate with its current curves.
    Compiled(&'a Loss),
    /// libtorch cross-entropy, 255 ignored.
    CrossEntropy,
    /// Lovász-softmax over the classes present in the batch (Berman et al., 2018).
    Lovasz,
}

impl Objective<'_> {
    pub fn forward(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor, LossError> {
        match self {
            Objective::Compiled(loss) => loss.forward(logits, labels),
            Objective::CrossEntropy => {
                if labels.ne(DEFAULT_IGNORE_LABEL).any().int64_value(&[]) == 0 {
                    return Ok(logits.sum(Kind::Float) * 0.0);
                }
                Ok(logits.cross_entropy_loss::<Tensor>(labels, None, Reduction::Mean, DEFAULT_IGNORE_LABEL, 0.0))
            }
            Objective::Lovasz => Ok(lovasz_softmax(logits, labels)),
        }
    }
}

/// Lovász-softmax: for each class present, the Lovász extension of the Jaccard loss applied
/// to the sorted per-pixel errors `|[label = c] − p_c|`; the mean over those classes.
pub fn lovasz_softmax(logits: &Tensor, labels: &Tensor) -> Tensor {
    let classes = logits.size()[1];
    let probabilities = logits.softmax(1, Kind::Float).permute([0, 2, 3, 1]).reshape([-1, classes]);
    let labels = labels.reshape([-1]);
    let keep = labels.ne(DEFAULT_IGNORE_LABEL).nonzero().squeeze_dim(1);
    let zero = logits.sum(Kind::Float) * 0.0;
    if keep.size()[0] == 0 {
        return zero;
    }
    let probabilities = probabilities.index_select(0, &keep);
    let labels = labels.index_select(0, &keep);
    let mut terms = Vec::new();
    for class in 0..classes {
        let foreground = labels.eq(class).to_kind(Kind::Float);
        if foreground.sum(Kind::Float).double_value(&[]) == 0.0 {
            continue;
        }
        let errors = (&foreground - probabilities.select(1, class)).abs();
        let (sorted, order) = errors.sort(0, true);
        let foreground_sorted = foreground.index_select(0, &order);
        let total = foreground_sorted.sum(Kind::Float);
        let intersection = &total - foreground_sorted.cumsum(0, Kind::Float);
        let union = &total + foreground_sorted.ones_like().g_sub(&foreground_sorted).cumsum(0, Kind::Float);
        let jaccard = (intersection / union).g_mul_scalar(-1.0) + 1.0;
        let n = jaccard.size()[0];
        let gradient = if n > 1 {
            Tensor::cat(&[jaccard.narrow(0, 0, 1), jaccard.narrow(0, 1, n - 1) - jaccard.narrow(0, 0, n - 1)], 0)
        } else {
            jaccard
        };
        terms.push(sorted.dot(&gradient));
    }
    if terms.is_empty() {
        return zero;
    }
    Tensor::stack(&terms, 0).mean(Kind::Float)
}

/// How the proxy network is trained.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub iters: usize,
    pub batch: usize,
    /// Side of the square training crops (a multiple of the network stride, 4).
    pub crop: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Channels at stride 2.
    pub width: i64,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig { iters: 300, batch: 8, crop: 64, lr: 0.05, momentum: 0.9, weight_decay: 1e-4, width: 16, seed: 0 }
    }
}

impl TrainConfig {
    /// One sentence on what is wrong with the settings, if anything.
    pub fn problem(&self) -> Option<String> {
        if self.iters == 0 {
            return Some("--iters must be at least 1".into());
        }
        if self.width < 1 {
            return Some("--width must be at least 1".into());
        }
        if self.batch < 2 {
            return Some("--batch must be at least 2 (batch normalization needs two images)".into());
        }
        if self.crop < STRIDE || self.crop % STRIDE != 0 {
            return Some(format!("--crop must be a positive multiple of {STRIDE}, the network's output stride"));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Some("--lr must be a positive number".into());
        }
        None
    }
}

/// A trained proxy network.
pub struct Trained {
    _store: nn::VarStore,
    net: ProxyNet,
    pub device: Device,
    /// The training loss at the last step.
    pub final_loss: f64,
}

/// libtorch's generator is process-wide: initialization happens under this lock.
static INIT: Mutex<()> = Mutex::new(());

/// Train a fresh network on the training split; `on_step` is called after every step.
pub fn train(
    dataset: &Dataset,
    objective: &Objective<'_>,
    config: &TrainConfig,
    device: Device,
    on_step: &mut dyn FnMut(usize),
) -> Result<Trained, LossError> {
    let store = nn::VarStore::new(device);
    let net = {
        let _guard = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        tch::manual_seed(config.seed as i64);
        ProxyNet::new(&store.root(), dataset.classes, config.width)
    };
    let mut optimizer = nn::Sgd { momentum: config.momentum, dampening: 0.0, wd: config.weight_decay, nesterov: false }
        .build(&store, config.lr)
        .expect("SGD over a fresh variable store");
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ 0x5EED_0F_BA7C4E5);
    let mut final_loss = f64::NAN;
    for step in 0..config.iters {
        let (images, labels) = data::training_batch(&dataset.train, config.batch, config.crop, &mut rng);
        let (images, labels) = (images.to_device(device), labels.to_device(device));
        let logits = net.forward_t(&images, true);
        let loss = objective.forward(&logits, &labels)?;
        optimizer.set_lr(config.lr * (1.0 - step as f64 / config.iters as f64).powf(0.9));
        optimizer.backward_step(&loss);
        final_loss = loss.double_value(&[]);
        on_step(step + 1);
    }
    Ok(Trained { _store: store, net, device, final_loss })
}

impl Trained {
    /// Logits for each evaluation batch of `samples`, cropped back to the image size, with
    /// the labels.
    fn predictions(&self, samples: &[Sample]) -> Vec<(Tensor, Tensor)> {
        let _no_grad = tch::no_grad_guard();
        data::evaluation_batches(samples, 16, STRIDE, self.device)
            .into_iter()
            .map(|(images, labels, (h, w))| {
                let logits = self.net.forward_t(&images, false).narrow(2, 0, h).narrow(3, 0, w);
                (logits, labels)
            })
            .collect()
    }

    /// The exact value of each metric on `samples`, counts accumulated over the whole split
    /// (NaN where a metric is undefined).
    pub fn evaluate(&self, samples: &[Sample], metrics: &[&Loss]) -> Result<Vec<f64>, LossError> {
        let batches = self.predictions(samples);
        metrics
            .iter()
            .map(|metric| {
                let mut evaluator = metric.evaluator();
                for (logits, labels) in &batches {
                    evaluator.add_batch(logits, labels)?;
                }
                Ok(evaluator.finish()?.value)
            })
            .collect()
    }
}

/// The device to train on: CUDA device 0 with `gpu`, else the CPU. Fails with one sentence
/// when a GPU is asked for and libtorch sees none.
pub fn choose_device(gpu: bool) -> Result<Device, String> {
    if !gpu {
        return Ok(Device::Cpu);
    }
    if tch::Cuda::is_available() {
        Ok(Device::Cuda(0))
    } else {
        Err("--gpu was given but libtorch sees no CUDA device on this machine; run without --gpu to use the CPU, \
             or check the NVIDIA driver and that LD_LIBRARY_PATH points at a CUDA build of libtorch"
            .into())
    }
}

/// The dataset a command asked for: a VOC-layout folder, or the built-in scenes.
pub fn load_dataset(
    folder: Option<&std::path::Path>,
    classes: Option<usize>,
    ignore_label: Option<i64>,
    synthetic: &data::SyntheticSpec,
) -> Result<Dataset, data::DataError> {
    match folder {
        Some(folder) => data::load_voc(folder, classes, ignore_label),
        None => Ok(data::synthetic(synthetic)),
    }
}
