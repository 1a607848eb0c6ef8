//! The exact metric's second half: from accumulated counts to the metric, in float64.
//!
//! Exact evaluation is confusion-matrix style. A back end computes the accumulator nodes
//! ([`Node::Count`], [`Node::NllSum`]) per batch and adds them up over a dataset; this
//! module then evaluates everything above them once. Undefined ratios (`x / 0` under
//! [`DivGuard::Auto`]) are NaN internally and skipped by `mean`, like the published
//! evaluator's nanmean; a metric that ends up NaN is reported as undefined.

use crate::ir::{Handle, Node, Shape};
use crate::ExactModule;
use std::collections::BTreeMap;

/// A number or one number per class.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Scalar(f64),
    Classes(Vec<f64>),
}

impl Value {
    pub fn as_vec(&self) -> Vec<f64> {
        match self {
            Value::Scalar(v) => vec![*v],
            Value::Classes(v) => v.clone(),
        }
    }
    fn map(&self, f: impl Fn(f64) -> f64) -> Value {
        match self {
            Value::Scalar(v) => Value::Scalar(f(*v)),
            Value::Classes(v) => Value::Classes(v.iter().map(|x| f(*x)).collect()),
        }
    }
    fn zip(&self, other: &Value, f: impl Fn(f64, f64) -> f64) -> Value {
        match (self, other) {
            (Value::Scalar(a), Value::Scalar(b)) => Value::Scalar(f(*a, *b)),
            (Value::Classes(a), Value::Scalar(b)) => Value::Classes(a.iter().map(|x| f(*x, *b)).collect()),
            (Value::Scalar(a), Value::Classes(b)) => Value::Classes(b.iter().map(|y| f(*a, *y)).collect()),
            (Value::Classes(a), Value::Classes(b)) => Value::Classes(a.iter().zip(b).map(|(x, y)| f(*x, *y)).collect()),
        }
    }
}

/// Running sums of every accumulator node of an exact module.
///
/// The sums are plain numbers, so a trainer that evaluates on several processes can
/// all-reduce them: [`Accumulator::to_flat`] gives every sum (and the batch count) as one
/// vector, element-wise additive across processes, and [`Accumulator::from_flat`] rebuilds
/// the accumulator from the reduced vector.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Accumulator {
    sums: BTreeMap<Handle, Vec<f64>>,
    /// Number of batches added.
    pub batches: usize,
}

/// Sums that cannot be added up.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AccumulateError {
    #[error("accumulator {node} got {got} values but earlier batches gave {expected}; every batch of one evaluation must have the same number of classes")]
    Length { node: Handle, expected: usize, got: usize },
    #[error("the flat counts have {got} numbers but this metric's layout needs {expected}")]
    Flat { expected: usize, got: usize },
}

impl Accumulator {
    /// Add one batch's values for `node` (per class, or a single number).
    pub fn add(&mut self, node: Handle, values: &[f64]) -> Result<(), AccumulateError> {
        let entry = self.sums.entry(node).or_insert_with(|| vec![0.0; values.len()]);
        if entry.len() != values.len() {
            return Err(AccumulateError::Length { node, expected: entry.len(), got: values.len() });
        }
        for (sum, value) in entry.iter_mut().zip(values) {
            *sum += value;
        }
        Ok(())
    }

    /// Add another accumulator of the same module (another process's, say).
    pub fn merge(&mut self, other: &Accumulator) -> Result<(), AccumulateError> {
        for (node, values) in &other.sums {
            self.add(*node, values)?;
        }
        self.batches += other.batches;
        Ok(())
    }

    pub fn get(&self, node: Handle) -> Option<&[f64]> {
        self.sums.get(&node).map(Vec::as_slice)
    }

    /// Every sum in node order, then the batch count: the vector to all-reduce. Its layout
    /// is [`Accumulator::layout`].
    pub fn to_flat(&self) -> Vec<f64> {
        let mut flat: Vec<f64> = self.sums.values().flatten().copied().collect();
        flat.push(self.batches as f64);
        flat
    }

    /// The length of each node's sums, in node order.
    pub fn layout(&self) -> Vec<(Handle, usize)> {
        self.sums.iter().map(|(node, values)| (*node, values.len())).collect()
    }

    /// Rebuild an accumulator from a (reduced) flat vector with the given layout.
    pub fn from_flat(layout: &[(Handle, usize)], flat: &[f64]) -> Result<Accumulator, AccumulateError> {
        let expected = layout.iter().map(|(_, len)| len).sum::<usize>() + 1;
        if flat.len() != expected {
            return Err(AccumulateError::Flat { expected, got: flat.len() });
        }
        let mut sums = BTreeMap::new();
        let mut offset = 0;
        for &(node, len) in layout {
            sums.insert(node, flat[offset..offset + len].to_vec());
            offset += len;
        }
        Ok(Accumulator { sums, batches: flat[offset].round().max(0.0) as usize })
    }
}

/// The exact result: the metric (NaN when undefined) and the module's reported values.
#[derive(Clone, Debug)]
pub struct Evaluation {
    pub value: f64,
    pub reports: Vec<(String, Value)>,
}

/// Why the accumulated counts cannot be finished.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FinishError {
    #[error("no values were accumulated for {0} (no batch was evaluated)")]
    Missing(Handle),
    #[error(transparent)]
    Accumulate(AccumulateError),
}

impl Accumulator {
    /// For a per-image module ([`crate::ir::Module::per_image`]): add one image's results,
    /// finished from that image's own counts (`image`, an accumulator of one image): its
    /// value where it is defined, and each report's entries where they are defined. The sums
    /// sit beside the module's nodes (keys past its last handle), so they merge, flatten and
    /// all-reduce like counts.
    pub fn add_image(&mut self, module: &ExactModule, image: &Accumulator) -> Result<(), FinishError> {
        let evaluation = finish_counts(module, image)?;
        let defined = |x: f64| if x.is_nan() { (0.0, 0.0) } else { (x, 1.0) };
        let (value, ok) = defined(evaluation.value);
        self.add(image_key(module, 0), &[value, ok]).map_err(FinishError::Accumulate)?;
        for (index, report) in module.reports.iter().enumerate() {
            let Some((_, entries)) = evaluation.reports.iter().find(|(name, _)| name == &report.name) else { continue };
            let entries = entries.as_vec();
            let mut sums: Vec<f64> = entries.iter().map(|&x| defined(x).0).collect();
            sums.extend(entries.iter().map(|&x| defined(x).1));
            self.add(image_key(module, 1 + index), &sums).map_err(FinishError::Accumulate)?;
        }
        Ok(())
    }
}

/// Where [`Accumulator::add_image`] keeps its sums: keys past the module's last node.
fn image_key(module: &ExactModule, index: usize) -> Handle {
    crate::ir::handle_from_index(module.len() + index)
}

/// Evaluate the module's root (and reports) from accumulated sums: for a per-image module,
/// the mean over images of each image's value (NaN when no image's is defined), and of each
/// report entry over the images where it is defined.
pub fn finish(module: &ExactModule, accumulated: &Accumulator) -> Result<Evaluation, FinishError> {
    if !module.per_image {
        return finish_counts(module, accumulated);
    }
    let mean = |sum: f64, n: f64| if n > 0.0 { sum / n } else { f64::NAN };
    let root = accumulated.get(image_key(module, 0)).ok_or(FinishError::Missing(image_key(module, 0)))?;
    let value = mean(root[0], root[1]);
    let mut reports = Vec::new();
    for (index, report) in module.reports.iter().enumerate() {
        let Some(sums) = accumulated.get(image_key(module, 1 + index)) else { continue };
        let k = sums.len() / 2;
        let entries: Vec<f64> = (0..k).map(|i| mean(sums[i], sums[k + i])).collect();
        let entry = match module.shape(report.value) {
            Shape::Classes(_) => Value::Classes(entries),
            _ => Value::Scalar(entries.first().copied().unwrap_or(f64::NAN)),
        };
        reports.push((report.name.clone(), entry));
    }
    Ok(Evaluation { value, reports })
}

/// Evaluate the module's root (and reports) from one set of accumulated counts (a dataset's,
/// or for a per-image module one image's).
pub fn finish_counts(module: &ExactModule, accumulated: &Accumulator) -> Result<Evaluation, FinishError> {
    let mut values: Vec<Option<Value>> = vec![None; module.len()];
    for handle in module.handles() {
        let get = |h: Handle| values[h.index()].clone();
        let node = module.node(handle);
        let value = match node {
            Node::Count(_) | Node::NllSum => {
                let sums = accumulated.get(handle).ok_or(FinishError::Missing(handle))?;
                Some(match module.shape(handle) {
                    Shape::Classes(_) => Value::Classes(sums.to_vec()),
                    _ => Value::Scalar(sums.first().copied().unwrap_or(0.0)),
                })
            }
            Node::Const(c) => Some(Value::Scalar(c.get())),
            Node::Weights { values, .. } => Some(Value::Classes(values.iter().map(|v| v.get()).collect())),
            Node::Add(a, b) => both(get(*a), get(*b), |x, y| x + y),
            Node::Sub(a, b) => both(get(*a), get(*b), |x, y| x - y),
            Node::Mul(a, b) => both(get(*a), get(*b), |x, y| x * y),
            // `x / 0` is undefined whatever the guard (an explicit epsilon is positive, so
            // only a denominator that cancels it reaches zero).
            Node::Div { num, den, .. } => both(get(*num), get(*den), |x, y| if y == 0.0 { f64::NAN } else { x / y }),
            Node::Neg(a) => get(*a).map(|v| v.map(|x| -x)),
            Node::Compare { op, lhs, rhs } => both(get(*lhs), get(*rhs), |x, y| if op.apply(x, y) { 1.0 } else { 0.0 }),
            // Logical operators on class masks (pixel-level ones have no value here).
            Node::And(a, b) => both(get(*a), get(*b), |x, y| if x > 0.5 && y > 0.5 { 1.0 } else { 0.0 }),
            Node::Or(a, b) => both(get(*a), get(*b), |x, y| if x > 0.5 || y > 0.5 { 1.0 } else { 0.0 }),
            Node::Xor(a, b) => both(get(*a), get(*b), |x, y| if (x > 0.5) != (y > 0.5) { 1.0 } else { 0.0 }),
            Node::Not(a) => get(*a).map(|v| v.map(|x| if x > 0.5 { 0.0 } else { 1.0 })),
            Node::Slice { input, start, end } => get(*input).map(|v| match v {
                Value::Classes(values) => {
                    let end = end.unwrap_or(values.len()).min(values.len());
                    Value::Classes(values.get(*start..end).map(<[f64]>::to_vec).unwrap_or_default())
                }
                scalar => scalar,
            }),
            Node::Mean { value, filter } => {
                let selected = selected(get(*value), filter.and_then(|f| get(f)));
                selected.map(|entries| {
                    let defined: Vec<f64> = entries.into_iter().filter(|x| !x.is_nan()).collect();
                    Value::Scalar(if defined.is_empty() {
                        f64::NAN
                    } else {
                        defined.iter().sum::<f64>() / defined.len() as f64
                    })
                })
            }
            Node::Sum { value, filter } => {
                selected(get(*value), filter.and_then(|f| get(f))).map(|entries| Value::Scalar(entries.iter().sum()))
            }
            // An undefined term of a loss counts as a perfect score, as in the surrogate, so
            // the other terms still give the loss a value.
            Node::Term { value, .. } => get(*value).map(|v| v.map(|x| if x.is_nan() { 1.0 } else { x })),
            Node::CurveTag { input: value, .. } | Node::Scope { input: value, .. } => get(*value),
            // Pixel-level nodes have no accumulated value.
            Node::Pred
            | Node::Softmax
            | Node::Labels
            | Node::Valid
            | Node::Border { .. }
            | Node::Curve { .. }
            | Node::Erode { .. }
            | Node::Dilate { .. }
            | Node::AnyClass(_) => None,
        };
        values[handle.index()] = value;
    }
    let value = match &values[module.root.index()] {
        Some(Value::Scalar(v)) => *v,
        Some(Value::Classes(v)) => v.first().copied().unwrap_or(f64::NAN),
        None => f64::NAN,
    };
    let reports =
        module.reports.iter().filter_map(|r| values[r.value.index()].clone().map(|v| (r.name.clone(), v))).collect();
    Ok(Evaluation { value, reports })
}

fn both(a: Option<Value>, b: Option<Value>, f: impl Fn(f64, f64) -> f64) -> Option<Value> {
    Some(a?.zip(&b?, f))
}

fn selected(value: Option<Value>, filter: Option<Value>) -> Option<Vec<f64>> {
    let values = value?.as_vec();
    Some(match filter {
        None => values,
        Some(mask) => {
            let mask = mask.as_vec();
            values.into_iter().zip(mask).filter(|(_, m)| *m > 0.5).map(|(v, _)| v).collect()
        }
    })
}
