//! Train a small tch network with a losscc loss, in your own training loop.
//!
//! `cargo run --release -p losscc --example train_tch -- examples/miou.metric [--set NAME=VALUE]...`
//!
//! The data are synthetic: noisy images of discs and bars whose class is their colour. The
//! program prints the surrogate loss and the exact metric on held-out images as it trains.

use anyhow::{bail, Result};
use losscc_loss::{Loss, Overrides};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

const CLASSES: i64 = 4;
const SIZE: i64 = 32;

/// Images `[N,3,S,S]` and labels `[N,S,S]`: background 0 plus up to three coloured shapes.
fn synthetic(n: i64, seed: i64) -> (Tensor, Tensor) {
    tch::manual_seed(seed);
    let ys = Tensor::arange(SIZE, (Kind::Float, Device::Cpu)).view([1, SIZE, 1]);
    let xs = Tensor::arange(SIZE, (Kind::Float, Device::Cpu)).view([1, 1, SIZE]);
    let mut labels = Tensor::zeros([n, SIZE, SIZE], (Kind::Int64, Device::Cpu));
    for class in 1..CLASSES {
        let centre = Tensor::rand([n, 2, 1, 1], (Kind::Float, Device::Cpu)) * (SIZE as f64);
        let radius = Tensor::rand([n, 1, 1], (Kind::Float, Device::Cpu)) * 6.0 + 3.0;
        let dy = &ys - centre.select(1, 0);
        let dx = &xs - centre.select(1, 1);
        let inside = if class % 2 == 1 {
            (&dy * &dy + &dx * &dx).le_tensor(&(&radius * &radius))
        } else {
            dy.abs().le_tensor(&radius).logical_and(&dx.abs().le(1.5))
        };
        labels = labels.where_self(&inside.logical_not(), &(labels.zeros_like() + class));
    }
    let palette =
        Tensor::from_slice(&[0.1f32, 0.1, 0.1, 0.9, 0.2, 0.2, 0.2, 0.9, 0.2, 0.2, 0.2, 0.9]).view([CLASSES, 3]);
    let images = palette.index_select(0, &labels.view([-1])).view([n, SIZE, SIZE, 3]).permute([0, 3, 1, 2]);
    let images = images + Tensor::randn([n, 3, SIZE, SIZE], (Kind::Float, Device::Cpu)) * 0.35;
    (images, labels)
}

fn network(vs: &nn::Path) -> impl Module {
    let conv = |i, o, name: &str| nn::conv2d(vs / name, i, o, 3, nn::ConvConfig { padding: 1, ..Default::default() });
    nn::seq()
        .add(conv(3, 16, "c1"))
        .add_fn(|x| x.relu())
        .add(conv(16, 16, "c2"))
        .add_fn(|x| x.relu())
        .add(conv(16, CLASSES, "c3"))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(metric) = args.first() else { bail!("usage: train_tch METRIC_FILE [--set NAME=VALUE]...") };
    let mut overrides = Overrides::new();
    let mut rest = args[1..].iter();
    while let Some(arg) = rest.next() {
        if arg == "--set" {
            if let Some((k, v)) = rest.next().and_then(|s| s.split_once('=')) {
                overrides = overrides.text(k, v);
            }
        }
    }
    let loss = Loss::from_file(metric.as_ref(), &overrides)?;
    let (train_x, train_y) = synthetic(64, 1);
    let (test_x, test_y) = synthetic(32, 2);
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = network(&vs.root());
    let mut opt = nn::Adam::default().build(&vs, 1e-2)?;
    let evaluate = |net: &dyn Module| -> Result<f64> {
        let _guard = tch::no_grad_guard();
        let mut evaluator = loss.evaluator();
        evaluator.add_batch(&net.forward(&test_x), &test_y)?;
        Ok(evaluator.finish()?.value)
    };
    println!("step  loss     held-out {}", loss.compiled().exact.name);
    println!("{:>4}  {:>7}  {:.4}", 0, "-", evaluate(&net)?);
    for step in 1..=150 {
        let index = Tensor::randint(64, [16], (Kind::Int64, Device::Cpu));
        let value = loss.forward(&net.forward(&train_x.index_select(0, &index)), &train_y.index_select(0, &index))?;
        opt.backward_step(&value);
        if step % 30 == 0 {
            println!("{:>4}  {:>7.4}  {:.4}", step, value.double_value(&[]), evaluate(&net)?);
        }
    }
    Ok(())
}
