//! The search policy (Auto Seg-Loss's PPO2): independent truncated normals on [0, 1], one per
//! search variable, with μ = sigmoid(μ_x) and σ fixed; the clipped PPO update of μ_x; and the
//! [`Layout`] that maps search variables to curves (fixed curves left out).

use crate::config::SearchConfig;
use compiler::curve::Curve;
use compiler::params::Params;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor};

/// The search variables' layout over the loss's curves.
#[derive(Clone, Debug)]
pub struct Layout {
    start: Params,
    /// For each searched curve: (curve index, pieces, offset into u).
    searched: Vec<(usize, usize, usize)>,
    pub dimensions: usize,
}

impl Layout {
    pub fn new(start: Params) -> Layout {
        let mut searched = Vec::new();
        let mut offset = 0;
        for (index, (curve, fixed)) in start.curves.iter().zip(&start.fixed).enumerate() {
            if !fixed {
                searched.push((index, curve.pieces(), offset));
                offset += Curve::search_len(curve.pieces());
            }
        }
        Layout { start, searched, dimensions: offset }
    }

    /// The starting point in search variables.
    pub fn start_u(&self) -> Vec<f64> {
        let mut u = Vec::with_capacity(self.dimensions);
        for &(index, _, _) in &self.searched {
            u.extend(self.start.curves[index].to_search());
        }
        u
    }

    /// The curves for search variables `u` (fixed curves keep their start values).
    pub fn params(&self, u: &[f64]) -> Params {
        let mut params = self.start.clone();
        for &(index, pieces, offset) in &self.searched {
            let length = Curve::search_len(pieces);
            params.curves[index] = Curve::from_search(&u[offset..offset + length], pieces)
                .expect("search variables in [0,1] make a curve");
        }
        params
    }

    pub fn flat(&self, u: &[f64]) -> Vec<Vec<f64>> {
        self.params(u).curves.iter().map(Curve::flat).collect()
    }
}

pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

pub fn logit(u: f64) -> f64 {
    let u = u.clamp(1e-6, 1.0 - 1e-6);
    (u / (1.0 - u)).ln()
}

/// A draw from the normal(μ, σ) truncated to (0, 1), by rejection.
pub fn truncated_normal(mu: f64, sigma: f64, rng: &mut ChaCha8Rng) -> f64 {
    loop {
        let z: f64 = StandardNormal.sample(rng);
        let x = mu + sigma * z;
        if x > 0.0 && x < 1.0 {
            return x;
        }
    }
}

/// log density of the truncated normal on [0,1], elementwise (`x` `[S,D]`, `mu` `[D]`).
pub fn truncated_normal_log_prob(x: &Tensor, mu: &Tensor, sigma: f64) -> Tensor {
    let cdf = |a: Tensor| (a / std::f64::consts::SQRT_2).erf().g_add_scalar(1.0).g_mul_scalar(0.5);
    let z = (x - mu) / sigma;
    let log_density = z.square().g_mul_scalar(-0.5) - (sigma.ln() + 0.5 * (2.0 * std::f64::consts::PI).ln());
    let mass = cdf(mu.ones_like().g_sub(mu) / sigma) - cdf(mu.g_mul_scalar(-1.0) / sigma);
    log_density - mass.log()
}

/// The PPO step: `adam_steps` Adam steps on μ_x maximizing the clipped surrogate objective.
pub fn ppo_update(mu_x: &[f64], samples: &[Vec<f64>], advantages: &[f64], config: &SearchConfig) -> Vec<f64> {
    let _guard = tch::no_grad_guard();
    let store = tch::nn::VarStore::new(Device::Cpu);
    let start = Tensor::from_slice(mu_x).to_kind(Kind::Double);
    let variable = store.root().var_copy("mu_x", &start);
    let dimensions = mu_x.len() as i64;
    let flat: Vec<f64> = samples.iter().flatten().copied().collect();
    let x = Tensor::from_slice(&flat).view([samples.len() as i64, dimensions]);
    let advantage = Tensor::from_slice(advantages).view([samples.len() as i64, 1]);
    let old = truncated_normal_log_prob(&x, &start.sigmoid(), config.sigma);
    let mut adam = tch::nn::Adam::default().build(&store, config.adam_lr).expect("Adam over one variable");
    drop(_guard);
    for _ in 0..config.adam_steps {
        let new = truncated_normal_log_prob(&x, &variable.sigmoid(), config.sigma);
        let ratio = (new - &old).exp();
        let unclipped = &ratio * &advantage;
        let clipped = ratio.clamp(1.0 - config.clip, 1.0 + config.clip) * &advantage;
        let objective = unclipped.minimum(&clipped).sum_dim_intlist(1, false, Kind::Double).mean(Kind::Double);
        adam.backward_step(&objective.g_mul_scalar(-1.0));
    }
    Vec::<f64>::try_from(variable.detach()).expect("a float64 vector")
}
