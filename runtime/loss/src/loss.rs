//! [`Loss`]: a compiled metric as a differentiable loss, for a user's own tch training loop.

use crate::error::LossError;
use crate::evaluator::Evaluator;
use crate::fused::{self, FusedBatch};
use crate::inputs::{self, InputError};
use crate::reference::{self, Surrogate};
use compiler::curve::Curve;
use compiler::ir::DEFAULT_IGNORE_LABEL;
use compiler::lower::ParamValue;
use compiler::params::{self, Params};
use compiler::Compiled;
use std::path::Path;
use std::sync::Arc;
use tch::Tensor;

/// Parameter overrides for compiling a metric, typed (`.set("tol", 3)`) or as the text a
/// command line gives (`.text("tol", "3")`); each value is checked against the parameter's
/// declared type when the metric compiles.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides {
    pairs: Vec<(String, String)>,
}

impl Overrides {
    pub fn new() -> Overrides {
        Overrides::default()
    }

    /// Set parameter `name` to a typed value (`3`, `0.5`, `false`, or `vec![1.0, 2.0]` for
    /// per-class weights).
    pub fn set(mut self, name: &str, value: impl Into<ParamValue>) -> Overrides {
        let text = match value.into() {
            ParamValue::Int(v) => v.to_string(),
            // Rust prints the shortest text that parses back to the same float.
            ParamValue::Float(v) => format!("{v:?}"),
            ParamValue::Bool(v) => v.to_string(),
            ParamValue::Floats(v) => v.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>().join(","),
        };
        self.pairs.push((name.to_string(), text));
        self
    }

    /// Set parameter `name` from text, as `--set NAME=VALUE` does.
    pub fn text(mut self, name: &str, value: &str) -> Overrides {
        self.pairs.push((name.to_string(), value.to_string()));
        self
    }

    /// The overrides as `(name, text)` pairs, in the order given.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.pairs
    }
}

impl From<&[(String, String)]> for Overrides {
    fn from(pairs: &[(String, String)]) -> Overrides {
        Overrides { pairs: pairs.to_vec() }
    }
}

/// A compiled metric or loss with its current curves: `forward` gives the differentiable
/// surrogate loss of a batch, [`Loss::evaluator`] an exact evaluator of the metric.
///
/// ```
/// use losscc_loss::{Loss, Overrides};
/// use tch::{Device, Kind, Tensor};
/// # fn main() -> Result<(), losscc_loss::LossError> {
/// let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/biou.metric");
/// let loss = Loss::from_file(&path, &Overrides::new().set("tol", 1))?;
///
/// // A batch of 2 images, 3 classes, 8x8 pixels; labels may be uint8 or int64.
/// tch::manual_seed(0);
/// let logits = Tensor::randn([2, 3, 8, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
/// let labels = Tensor::randint(3, [2, 8, 8], (Kind::Uint8, Device::Cpu));
///
/// let value = loss.forward(&logits, &labels)?; // 1 − surrogate BIoU, on the logits' device
/// value.backward();
/// assert!(value.double_value(&[]) > 0.0 && value.double_value(&[]) < 1.0);
/// assert_eq!(logits.grad().size(), vec![2, 3, 8, 8]);
///
/// let mut exact = loss.evaluator(); // owns what it needs: no borrow of `loss`
/// exact.add_batch(&logits.detach(), &labels)?; // counts add across batches
/// let biou = exact.finish()?.value; // the metric on argmax predictions, NaN if undefined
/// assert!((0.0..=1.0).contains(&biou));
/// # Ok(()) }
/// ```
///
/// Cost: on CPU float32 logits the fused kernel computes the gradient during `forward`
/// (tch has no custom autograd function, so the gradient is spliced in then), so `forward`
/// costs about forward + backward and `backward` is cheap. Under `tch::no_grad`, or when the
/// logits do not require a gradient, `forward` skips that work.
#[derive(Debug)]
pub struct Loss {
    compiled: Arc<Compiled>,
    params: Params,
    ignore_label: Option<i64>,
    /// The fast path (on by default): on CPU float32 logits, the fused kernel (see
    /// [`crate::fused`]) for every module with a curve. Off, or for a module without curves
    /// (plain cross-entropy, which libtorch's own fused kernels do best), every loss runs op
    /// by op in libtorch: the reference the fast path is tested against.
    fast_path: bool,
}

impl Loss {
    /// Compile `path` with parameter overrides; curves start at the identity.
    pub fn from_file(path: &Path, overrides: &Overrides) -> Result<Loss, LossError> {
        Ok(Loss::new(compiler::compile_file(path, overrides.pairs())?))
    }

    /// Compile source text (`use` paths are read relative to the working directory).
    pub fn from_source(name: &str, text: &str, overrides: &Overrides) -> Result<Loss, LossError> {
        Ok(Loss::new(compiler::compile_source(name, text, overrides.pairs())?))
    }

    /// A loss from an already compiled metric, with identity curves.
    pub fn new(compiled: Compiled) -> Loss {
        let params = Params::identity(compiled.manifest());
        Loss { compiled: Arc::new(compiled), params, ignore_label: Some(DEFAULT_IGNORE_LABEL), fast_path: true }
    }

    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    /// The current curves, in manifest order.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Replace the curves. They must fit the metric's manifest: one curve per entry, each
    /// with the entry's number of pieces.
    pub fn set_params(&mut self, params: Params) -> Result<(), LossError> {
        let manifest = self.compiled.manifest();
        let metric = self.compiled.exact.name.clone();
        if params.curves.len() != manifest.curves.len() || params.fixed.len() != params.curves.len() {
            return Err(LossError::Curves {
                metric,
                problem: format!(
                    "it has {} curves, the parameters give {} (and {} fixed flags)",
                    manifest.curves.len(),
                    params.curves.len(),
                    params.fixed.len()
                ),
            });
        }
        for (spec, curve) in manifest.curves.iter().zip(&params.curves) {
            if curve.pieces() != spec.pieces {
                return Err(LossError::Curves {
                    metric,
                    problem: format!(
                        "curve `{}` has {} pieces, the parameters give {}",
                        spec.name,
                        spec.pieces,
                        curve.pieces()
                    ),
                });
            }
        }
        self.params = params;
        Ok(())
    }

    /// Replace the curves with `curves` (in manifest order), none of them fixed.
    pub fn set_curves(&mut self, curves: Vec<Curve>) -> Result<(), LossError> {
        let fixed = vec![false; curves.len()];
        self.set_params(Params { curves, fixed })
    }

    /// Load curves from a parameter file in either supported format.
    pub fn load_params(&mut self, path: &Path) -> Result<(), LossError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| LossError::ParamsIo { path: path.display().to_string(), error })?;
        let name = &self.compiled.exact.name;
        if let Some(file_metric) = params::own_format_metric(&text) {
            if &file_metric != name {
                return Err(LossError::Params {
                    path: path.display().to_string(),
                    error: params::ParamsError::Metric { file: file_metric, expected: name.clone() },
                });
            }
        }
        let params = Params::from_json(&text, self.compiled.manifest()).map_err(|error| LossError::Params {
            path: path.display().to_string(),
            error: params::with_metric(error, name),
        })?;
        self.set_params(params)
    }

    /// The label value of ignored pixels (255 unless set; `None`: every pixel counts).
    pub fn ignore_label(&self) -> Option<i64> {
        self.ignore_label
    }

    /// Set the label value of ignored pixels, or `None` for no ignored pixels. Evaluators
    /// made afterwards use it too.
    pub fn set_ignore_label(&mut self, ignore: Option<i64>) {
        self.ignore_label = ignore;
    }

    /// The differentiable surrogate loss for a batch.
    pub fn forward(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor, LossError> {
        Ok(self.forward_detailed(logits, labels)?.loss)
    }

    /// Turn the fast path on (the default) or off (the op-by-op reference path); see
    /// docs/performance.md for what each costs.
    pub fn set_fast_path(&mut self, on: bool) {
        self.fast_path = on;
    }

    /// Whether the fast path is on.
    pub fn fast_path(&self) -> bool {
        self.fast_path
    }

    /// Whether `forward` on these logits takes the fused kernel (with class-index labels:
    /// soft labels, and sigmoid metrics, always take the reference path).
    pub fn uses_fused_kernel(&self, logits: &Tensor) -> bool {
        self.fast_path
            && logits.device() == tch::Device::Cpu
            && logits.kind() == tch::Kind::Float
            && (logits.dim() == 4 || (logits.dim() == 5 && !inputs::has_windows(&self.compiled.relaxed)))
            && self.plan(logits.size().get(1).copied().unwrap_or(0) as usize).is_some()
    }

    /// The fused kernel's program, when the module has one worth running (some curve).
    fn plan(&self, classes: usize) -> Option<fused::plan::FusedPlan> {
        // Sigmoid predictions take the reference path: the kernel's stages are softmax's.
        if self.compiled.relaxed.predictions.is_sigmoid() {
            return None;
        }
        fused::plan::FusedPlan::new(&self.compiled.relaxed, &self.params.curves, classes)
            .filter(|plan| plan.has_curves())
    }

    /// The surrogate with its undefined flags and reported values.
    pub fn forward_detailed(&self, logits: &Tensor, labels: &Tensor) -> Result<Surrogate, LossError> {
        let module = &self.compiled.relaxed;
        // The fused kernel's softmax sweep checks the logits' finiteness as it reads them.
        let finiteness =
            if self.uses_fused_kernel(logits) { inputs::Finiteness::InKernel } else { inputs::Finiteness::Here };
        let mut checked = inputs::check_with(logits, labels, module, self.ignore_label, finiteness)?;
        if !inputs::has_windows(module) {
            checked = checked.volumes_as_images();
        }
        let result = if module.per_image { self.per_image(&checked) } else { self.surrogate(&checked) };
        match result {
            // The kernel saw them in one image (or volume slice): count them in the batch.
            Err(LossError::Input(InputError::NonFinite(_))) if finiteness == inputs::Finiteness::InKernel => {
                Err(inputs::non_finite(logits).into())
            }
            result => result,
        }
    }

    /// The surrogate of a per-image metric: each image's loss from that image alone, averaged
    /// over the images where it is defined (an image whose filtered mean selects no class
    /// adds nothing); reported values are means over the same images.
    fn per_image(&self, checked: &inputs::Checked) -> Result<Surrogate, LossError> {
        let images = checked.batch().logits.size()[0];
        let parts: Vec<Surrogate> =
            (0..images).map(|image| self.surrogate(&checked.image(image))).collect::<Result<_, _>>()?;
        let defined: Vec<&Surrogate> = parts.iter().filter(|part| part.defined).collect();
        let mean = |values: Vec<Tensor>| Tensor::stack(&values, 0).mean_dim(0, false, values[0].kind());
        let (loss, value) = if defined.is_empty() {
            (&parts[0].loss * 0.0, &parts[0].value * 0.0)
        } else {
            (
                mean(defined.iter().map(|part| part.loss.shallow_clone()).collect()),
                mean(defined.iter().map(|part| part.value.shallow_clone()).collect()),
            )
        };
        let mut undefined_terms: Vec<String> = parts.iter().flat_map(|part| part.undefined_terms.clone()).collect();
        undefined_terms.sort();
        undefined_terms.dedup();
        // Reported values are means over the defined images too (over every image when none is).
        let reported: Vec<&Surrogate> = if defined.is_empty() { parts.iter().collect() } else { defined.clone() };
        let reports = parts[0]
            .reports
            .iter()
            .enumerate()
            .map(|(index, (name, _))| {
                (name.clone(), mean(reported.iter().map(|part| part.reports[index].1.shallow_clone()).collect()))
            })
            .collect();
        Ok(Surrogate { loss, value, defined: !defined.is_empty(), undefined_terms, reports })
    }

    /// The surrogate of one batch (for a per-image metric, of one image).
    fn surrogate(&self, checked: &inputs::Checked) -> Result<Surrogate, LossError> {
        let module = &self.compiled.relaxed;
        let logits = checked.batch().logits;
        let batch = checked.batch();
        if self.fast_path {
            // Volumes with windows take the reference path (3-D pooling is libtorch's).
            if let Some(fused_batch) = FusedBatch::new(&batch).filter(|_| batch.logits.dim() == 4) {
                if let Some(plan) = self.plan(logits.size()[1] as usize) {
                    return fused::surrogate(module, &self.params.curves, &plan, &fused_batch);
                }
            }
        }
        Ok(reference::surrogate(module, &self.params.curves, &batch))
    }

    /// A fresh exact evaluator (counts accumulate over batches). It holds what it needs, so
    /// it can outlive this `Loss` and move to another thread.
    pub fn evaluator(&self) -> Evaluator {
        Evaluator::new(Arc::clone(&self.compiled), self.ignore_label)
    }
}
