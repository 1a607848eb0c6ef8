//! The tch back end: interprets IR modules on libtorch tensors, on CPU or CUDA.
//!
//! * Relaxed modules run end to end with autograd: the surrogate loss.
//! * Exact modules run up to their accumulator nodes (counts, summed cross-entropy),
//!   which are returned as float64 numbers for [`compiler::accumulate`] to finish.
//!
//! Guarantees: with inputs that passed [`check_inputs`], every value is finite: curve
//! square roots are clamped, surrogate denominators carry `+1e-8`, and a reduction over
//! no class yields an undefined marker instead of NaN.

use compiler::curve::{Curve, Segment, SQRT_FLOOR};
use compiler::ir::{CmpOp, DivGuard, Handle, Mode, Module, Node, Shape, SURROGATE_EPS};
use tch::{Kind, Reduction, Tensor};

/// The ignore label: pixels with it belong to no class.
pub const IGNORE_LABEL: i64 = 255;

/// Bad inputs, each a single sentence that says what to do.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InputError {
    #[error("logits must have 4 dimensions [N, C, H, W], but they have shape {0:?}; add a batch dimension or check the layout")]
    LogitsRank(Vec<i64>),
    #[error("labels must have 3 dimensions [N, H, W], but they have shape {0:?}")]
    LabelsRank(Vec<i64>),
    #[error("logits of shape {logits:?} and labels of shape {labels:?} disagree on N, H or W; labels must be [N, H, W] for logits [N, C, H, W]")]
    ShapeMismatch { logits: Vec<i64>, labels: Vec<i64> },
    #[error("logits must be float32 or float64, but they are {0:?}")]
    LogitsKind(Kind),
    #[error("labels must be int64 class indices, but they are {0:?}")]
    LabelsKind(Kind),
    #[error("the logits contain {0} non-finite values (NaN or infinity); check the network's output")]
    NonFinite(i64),
    #[error("label value {value} is neither a class in 0..{classes} nor the ignore label 255 ({count} {})", pixels_with_value(.count))]
    LabelValue { value: i64, classes: i64, count: i64 },
    #[error("this metric needs at least {needed} classes (it slices classes), but the logits have {got}")]
    TooFewClasses { needed: usize, got: i64 },
    #[error("an image must be at least 1x1 pixels, but the logits have shape {0:?}")]
    Empty(Vec<i64>),
}

fn pixels_with_value(count: &i64) -> &'static str {
    if *count == 1 {
        "pixel has such a value"
    } else {
        "pixels have such values"
    }
}

/// Check logits `[N,C,H,W]` float and labels `[N,H,W]` int64 for a module.
pub fn check_inputs(logits: &Tensor, labels: &Tensor, min_classes: usize) -> Result<(), InputError> {
    let ls = logits.size();
    let ys = labels.size();
    if ls.len() != 4 {
        return Err(InputError::LogitsRank(ls));
    }
    if ys.len() != 3 {
        return Err(InputError::LabelsRank(ys));
    }
    if ls[0] != ys[0] || ls[2] != ys[1] || ls[3] != ys[2] {
        return Err(InputError::ShapeMismatch { logits: ls, labels: ys });
    }
    if ls.iter().any(|&d| d == 0) {
        return Err(InputError::Empty(ls));
    }
    if !matches!(logits.kind(), Kind::Float | Kind::Double) {
        return Err(InputError::LogitsKind(logits.kind()));
    }
    if labels.kind() != Kind::Int64 {
        return Err(InputError::LabelsKind(labels.kind()));
    }
    let classes = ls[1];
    if (classes as usize) < min_classes {
        return Err(InputError::TooFewClasses { needed: min_classes, got: classes });
    }
    // One pass for float32: a float64 sum of finite float32 values cannot overflow, so it is
    // finite exactly when every logit is. Otherwise count the bad ones.
    let surely_finite = logits.kind() == Kind::Float && logits.sum(Kind::Double).double_value(&[]).is_finite();
    if !surely_finite {
        let non_finite = logits.isfinite().logical_not().sum(Kind::Int64).int64_value(&[]);
        if non_finite > 0 {
            return Err(InputError::NonFinite(non_finite));
        }
    }
    let bad = (labels.lt(0).logical_or(&labels.ge(classes))).logical_and(&labels.ne(IGNORE_LABEL));
    let count = bad.sum(Kind::Int64).int64_value(&[]);
    if count > 0 {
        let value = labels.masked_select(&bad).get(0).int64_value(&[]);
        return Err(InputError::LabelValue { value, classes, count });
    }
    Ok(())
}

/// `g(x)` for a whole tensor, with gradients finite everywhere on `[0, 1]`.
pub fn apply_curve(x: &Tensor, curve: &Curve) -> Tensor {
    let x = x.clamp(0.0, 1.0);
    let segments = curve.segments();
    let mut result: Option<Tensor> = None;
    for segment in segments.iter().rev() {
        let y = segment_value(&x, segment);
        result = Some(match result {
            None => y,
            Some(later) => y.where_self(&x.le(segment.end[0]), &later),
        });
    }
    result.expect("a curve has at least one piece")
}

fn segment_value(x: &Tensor, segment: &Segment) -> Tensor {
    let width = segment.width();
    if width <= 0.0 {
        // A vertical piece covers a single x; its end value is the curve's value there.
        return x.zeros_like() + segment.end[1];
    }
    let x_norm = ((x - segment.start[0]) / width).clamp(0.0, 1.0);
    let t = if segment.linear {
        x_norm
    } else {
        let m = segment.m;
        let disc = (x_norm * (1.0 - 2.0 * m) + m * m).clamp_min(SQRT_FLOOR);
        ((disc.sqrt().neg() + m) / (2.0 * m - 1.0)).clamp(0.0, 1.0)
    };
    let s = t.ones_like() - &t;
    &s * &s * segment.start[1] + &t * &s * (2.0 * segment.middle[1]) + &t * &t * segment.end[1]
}

fn one_hot(classes_index: &Tensor, classes: i64, kind: Kind) -> Tensor {
    let range = Tensor::arange(classes, (Kind::Int64, classes_index.device())).view([1, classes, 1, 1]);
    classes_index.unsqueeze(1).eq_tensor(&range).to_kind(kind)
}

fn pool(x: &Tensor, radius: u32, erode: bool) -> Tensor {
    if x.device() == tch::Device::Cpu && x.kind() == Kind::Float && x.dim() == 4 {
        if !x.requires_grad() {
            return pool_cpu(x, radius as usize, erode);
        }
        // With a gradient: the window's winner per pixel, then a differentiable gather
        // (its backward is one scatter-add, as max_pool2d's is).
        let size = x.size();
        let winners = pool_winners_cpu(&x.detach(), radius as usize, erode);
        return x.reshape([size[0] * size[1], size[2] * size[3]]).gather(1, &winners, false).reshape(size);
    }
    let k = 2 * radius as i64 + 1;
    let r = radius as i64;
    // A square window's maximum is the maximum of row maxima: two 1-D passes (2k reads per
    // pixel) instead of one 2-D pass (k² reads). max_pool2d pads with -inf: for dilation the
    // border is outside; erosion is the negated dilation of the negation, so there the
    // border counts as inside.
    let dilate = |t: &Tensor| {
        t.max_pool2d([k, 1], [1, 1], [r, 0], [1, 1], false).max_pool2d([1, k], [1, 1], [0, r], [1, 1], false)
    };
    if erode {
        dilate(&x.neg()).neg()
    } else {
        dilate(x)
    }
}

/// The same square-window maximum (minimum for erosion) for tensors that need no gradient,
/// such as label morphology: per `[H, W]` plane, a row pass then a column pass, each a few
/// contiguous, vectorized sweeps of `max`/`min` over shifted rows; the window is clipped at
/// the border, as `max_pool2d`'s −inf padding does. Planes are split over the cores.
fn pool_cpu(x: &Tensor, radius: usize, erode: bool) -> Tensor {
    let size = x.size();
    let (planes, h, w) = ((size[0] * size[1]) as usize, size[2] as usize, size[3] as usize);
    let plane = h * w;
    let elements = planes * plane;
    if elements == 0 {
        return x.copy();
    }
    let source = x.contiguous();
    let result = Tensor::empty(size.as_slice(), (Kind::Float, tch::Device::Cpu));
    // SAFETY: `source` is a contiguous float32 CPU tensor of `elements` values that lives to
    // the end of this function; `result` is a fresh tensor of the same size that nothing
    // else refers to yet.
    let input: &[f32] = unsafe { std::slice::from_raw_parts(source.data_ptr() as *const f32, elements) };
    let output: &mut [f32] = unsafe { std::slice::from_raw_parts_mut(result.data_ptr() as *mut f32, elements) };
    let chunk = crate::fused::plane_chunk(elements, plane);
    std::thread::scope(|scope| {
        for (inputs, outputs) in input.chunks(chunk).zip(output.chunks_mut(chunk)) {
            scope.spawn(move || pool_planes(inputs, outputs, h, w, radius, erode));
        }
    });
    drop(source);
    result
}

crate::fused::with_best_simd!(
    pool_planes,
    (inputs: &[f32], outputs: &mut [f32], h: usize, w: usize, radius: usize, erode: bool),
    {
        if erode {
            pool_planes_of(inputs, outputs, h, w, radius, f32::min)
        } else {
            pool_planes_of(inputs, outputs, h, w, radius, f32::max)
        }
    }
);

/// Square-window `combine` (min or max) of every `[H, W]` plane of `inputs`, the window clipped
/// at the border: a row pass, then a column pass over whole rows, each a few contiguous
/// sweeps over shifted rows (inlined into each SIMD version; shared by the float and byte
/// planes).
#[inline(always)]
pub(crate) fn pool_planes_of<T: Copy + Default>(
    inputs: &[T],
    outputs: &mut [T],
    h: usize,
    w: usize,
    radius: usize,
    combine: impl Fn(T, T) -> T + Copy,
) {
    let plane = h * w;
    let mut rows = vec![T::default(); plane];
    for (source, target) in inputs.chunks(plane).zip(outputs.chunks_mut(plane)) {
        // Row pass into `rows`.
        for (line, out) in source.chunks(w).zip(rows.chunks_mut(w)) {
            out.copy_from_slice(line);
            for d in 1..=radius.min(w.saturating_sub(1)) {
                for (o, &v) in out[..w - d].iter_mut().zip(&line[d..]) {
                    *o = combine(*o, v);
                }
                for (o, &v) in out[d..].iter_mut().zip(&line[..w - d]) {
                    *o = combine(*o, v);
                }
            }
        }
        // Column pass: whole rows at a time.
        for y in 0..h {
            let out = &mut target[y * w..(y + 1) * w];
            out.copy_from_slice(&rows[y * w..(y + 1) * w]);
            for neighbour in y.saturating_sub(radius)..(y + radius + 1).min(h) {
                if neighbour != y {
                    for (o, &v) in out.iter_mut().zip(&rows[neighbour * w..(neighbour + 1) * w]) {
                        *o = combine(*o, v);
                    }
                }
            }
        }
    }
}

/// `if take { a } else { b }` on bit patterns, so loops using it vectorize.
#[inline(always)]
fn select_bits(take: bool, a: u32, b: u32) -> u32 {
    let mask = 0u32.wrapping_sub(u32::from(take));
    (a & mask) | (b & !mask)
}

/// For every pixel of every `[H, W]` plane, the flat index (`y·W + x`) of the maximum
/// (minimum for erosion) of its clipped square window: the first one met in the column
/// pass, then in the row pass, like the separable `max_pool2d` pair. Each pass sweeps the
/// window's offsets over whole rows with compare-and-select, so it vectorizes. Returns int64
/// `[planes, H·W]`.
fn pool_winners_cpu(x: &Tensor, radius: usize, erode: bool) -> Tensor {
    let size = x.size();
    let (planes, h, w) = ((size[0] * size[1]) as usize, size[2] as usize, size[3] as usize);
    let plane = h * w;
    let elements = planes * plane;
    let source = x.contiguous();
    let result = Tensor::empty([planes as i64, plane as i64], (Kind::Int64, tch::Device::Cpu));
    // SAFETY: `source` is a contiguous float32 CPU tensor of `elements` values alive until the
    // end of this function; `result` is fresh, of the same length, and referred to nowhere else.
    let input: &[f32] =
        if elements == 0 { &[] } else { unsafe { std::slice::from_raw_parts(source.data_ptr() as *const f32, elements) } };
    let winners: &mut [i64] = if elements == 0 {
        &mut []
    } else {
        unsafe { std::slice::from_raw_parts_mut(result.data_ptr() as *mut i64, elements) }
    };
    if plane > 0 {
        let chunk = crate::fused::plane_chunk(elements, plane);
        std::thread::scope(|scope| {
            for (inputs, outputs) in input.chunks(chunk).zip(winners.chunks_mut(chunk)) {
                scope.spawn(move || winner_planes(inputs, outputs, h, w, radius, erode));
            }
        });
    }
    drop(source);
    result
}

crate::fused::with_best_simd!(
    winner_planes,
    (inputs: &[f32], outputs: &mut [i64], h: usize, w: usize, radius: usize, erode: bool),
    {
        if erode {
            winners_of_planes::<true, i64>(inputs, outputs, None, h, w, radius)
        } else {
            winners_of_planes::<false, i64>(inputs, outputs, None, h, w, radius)
        }
    }
);

crate::fused::with_best_simd!(
    winner_planes_u32,
    (inputs: &[f32], outputs: &mut [u32], values: &mut [f32], h: usize, w: usize, radius: usize, erode: bool),
    {
        if erode {
            winners_of_planes::<true, u32>(inputs, outputs, Some(values), h, w, radius)
        } else {
            winners_of_planes::<false, u32>(inputs, outputs, Some(values), h, w, radius)
        }
    }
);

/// Window winners (as [`pool_winners_cpu`] finds them, index within the plane) of every
/// `[H, W]` plane of `input` into `winners`, and their values (the pooled planes) into
/// `values`, split over the cores (the fused kernel's pooling stage; inputs are finite).
pub(crate) fn window_winners(
    input: &[f32],
    winners: &mut [u32],
    values: &mut [f32],
    (h, w): (usize, usize),
    radius: usize,
    erode: bool,
) {
    let plane = h * w;
    if plane == 0 || input.is_empty() {
        return;
    }
    let chunk = crate::fused::plane_chunk(input.len(), plane);
    std::thread::scope(|scope| {
        for ((inputs, outputs), values) in input.chunks(chunk).zip(winners.chunks_mut(chunk)).zip(values.chunks_mut(chunk)) {
            scope.spawn(move || winner_planes_u32(inputs, outputs, values, h, w, radius, erode));
        }
    });
}

/// The body of [`pool_winners_cpu`] for some planes (inlined into each SIMD version).
#[inline(always)]
fn winners_of_planes<const ERODE: bool, T: From<u32> + Copy>(
    inputs: &[f32],
    outputs: &mut [T],
    mut values: Option<&mut [f32]>,
    h: usize,
    w: usize,
    radius: usize,
) {
    const L: usize = WINNER_LANES;
    let plane = h * w;
    // Strictly better, so the first of equal values wins; the sentinel never does.
    let sentinel = if ERODE { f32::INFINITY } else { f32::NEG_INFINITY };
    let better = |c: f32, best: f32| if ERODE { c < best } else { c > best };
    // The column pass comes first, as in the reference (`[k, 1]` then `[1, k]`), so ties
    // pick the same winner.
    let mut column_value = vec![0.0f32; plane];
    let mut column_index = vec![0u32; plane];
    let mut padded_value = vec![sentinel; w + 2 * radius];
    let mut padded_index = vec![0u32; w + 2 * radius];
    let blocks = w / L * L;
    for (index, (source, target)) in inputs.chunks(plane).zip(outputs.chunks_mut(plane)).enumerate() {
        for y in 0..h {
            let rows = y.saturating_sub(radius)..(y + radius + 1).min(h);
            for start in (0..blocks).step_by(L) {
                // The pixel itself always qualifies, so no stale index survives (even for
                // NaN or infinite values).
                let mut v = [sentinel; L];
                let mut i: [u32; L] = std::array::from_fn(|lane| (y * w + start + lane) as u32);
                for row in rows.clone() {
                    let c: &[f32; L] = source[row * w + start..][..L].try_into().expect("a block");
                    let ci: [u32; L] = std::array::from_fn(|lane| (row * w + start + lane) as u32);
                    take_better::<ERODE, L>(&mut v, &mut i, c, &ci);
                }
                column_value[y * w + start..][..L].copy_from_slice(&v);
                column_index[y * w + start..][..L].copy_from_slice(&i);
            }
            for x in blocks..w {
                let (mut v, mut i) = (sentinel, (y * w + x) as u32);
                for row in rows.clone() {
                    if better(source[row * w + x], v) {
                        (v, i) = (source[row * w + x], (row * w + x) as u32);
                    }
                }
                column_value[y * w + x] = v;
                column_index[y * w + x] = i;
            }
        }
        for y in 0..h {
            padded_value[radius..radius + w].copy_from_slice(&column_value[y * w..(y + 1) * w]);
            padded_index[radius..radius + w].copy_from_slice(&column_index[y * w..(y + 1) * w]);
            let own = &column_index[y * w..(y + 1) * w];
            let out = &mut target[y * w..(y + 1) * w];
            // The winners' values too, when asked for (the fused kernel's pooled frame).
            let mut out_values = values.as_deref_mut().map(|v| &mut v[index * plane + y * w..index * plane + (y + 1) * w]);
            for start in (0..blocks).step_by(L) {
                let mut v = [sentinel; L];
                let mut i: [u32; L] = own[start..][..L].try_into().expect("a block");
                for offset in 0..=2 * radius {
                    let c: &[f32; L] = padded_value[offset + start..][..L].try_into().expect("a block");
                    let ci: &[u32; L] = padded_index[offset + start..][..L].try_into().expect("a block");
                    take_better::<ERODE, L>(&mut v, &mut i, c, ci);
                }
                for (t, &index) in out[start..][..L].iter_mut().zip(&i) {
                    *t = T::from(index);
                }
                if let Some(out_values) = out_values.as_deref_mut() {
                    out_values[start..][..L].copy_from_slice(&v);
                }
            }
            for x in blocks..w {
                let (mut v, mut i) = (sentinel, own[x]);
                for offset in 0..=2 * radius {
                    if better(padded_value[offset + x], v) {
                        (v, i) = (padded_value[offset + x], padded_index[offset + x]);
                    }
                }
                out[x] = T::from(i);
                if let Some(out_values) = out_values.as_deref_mut() {
                    out_values[x] = v;
                }
            }
        }
    }
}

/// Lanes kept in registers while a block of pixels runs through its window.
const WINNER_LANES: usize = 16;

/// One window step for a block of lanes: where the candidate is strictly better (first wins
/// ties), take its value and index. A compare and two bit selects per lane, on arrays the
/// compiler keeps in registers, so it vectorizes without masked stores.
#[inline(always)]
fn take_better<const ERODE: bool, const L: usize>(v: &mut [f32; L], i: &mut [u32; L], c: &[f32; L], ci: &[u32; L]) {
    for lane in 0..L {
        let take = if ERODE { c[lane] < v[lane] } else { c[lane] > v[lane] };
        v[lane] = f32::from_bits(select_bits(take, c[lane].to_bits(), v[lane].to_bits()));
        i[lane] = select_bits(take, ci[lane], i[lane]);
    }
}

fn compare(op: CmpOp, a: &Tensor, b: &Tensor) -> Tensor {
    match op {
        CmpOp::Lt => a.lt_tensor(b),
        CmpOp::Le => a.le_tensor(b),
        CmpOp::Gt => a.gt_tensor(b),
        CmpOp::Ge => a.ge_tensor(b),
        CmpOp::Eq => a.eq_tensor(b),
        CmpOp::Ne => a.ne_tensor(b),
    }
}

/// The result of running a relaxed module.
pub struct Surrogate {
    /// The loss: `1 − metric` for metrics, the expression for losses; 0 when undefined.
    pub loss: Tensor,
    /// The root value (surrogate metric or loss expression).
    pub value: Tensor,
    /// False when no class qualified for a filtered mean: the loss is 0 with zero gradient.
    pub defined: bool,
    /// Metric terms of a loss that were undefined for this batch (they contribute 0).
    pub undefined_terms: Vec<String>,
    /// Reported values (per-class values, terms), detached.
    pub reports: Vec<(String, Tensor)>,
}

/// Values of a relaxed module's nodes, as far as they were needed.
pub struct NodeValues {
    pub values: Vec<Option<Tensor>>,
    pub undefined: Vec<bool>,
    pub undefined_terms: Vec<String>,
}

/// Which nodes must be computed to get `wanted`, given that `provided` nodes are known.
fn needed(module: &Module, wanted: &[Handle], provided: &[Option<Tensor>]) -> Vec<bool> {
    let mut need = vec![false; module.len()];
    for handle in wanted {
        need[handle.index()] = true;
    }
    for index in (0..module.len()).rev() {
        if need[index] && provided[index].is_none() {
            for operand in module.nodes[index].operands() {
                need[operand.index()] = true;
            }
        }
    }
    need
}

/// Run the nodes of a relaxed module that `wanted` depends on, with autograd. Nodes with a
/// `provided` value take it instead of being computed (the fused kernel provides counts).
pub fn run_nodes(
    module: &Module,
    curves: &[Curve],
    logits: &Tensor,
    labels: &Tensor,
    provided: Vec<Option<Tensor>>,
    wanted: &[Handle],
) -> NodeValues {
    assert_eq!(module.mode, Mode::Relaxed);
    let need = needed(module, wanted, &provided);
    let classes = logits.size()[1];
    let kind = logits.kind();
    let mut values: Vec<Option<Tensor>> = Vec::with_capacity(module.len());
    let mut undefined: Vec<bool> = Vec::with_capacity(module.len());
    let mut undefined_terms = Vec::new();
    let mut provided = provided;
    for handle in module.handles() {
        let node = module.node(handle);
        let mut is_undefined = node.operands().iter().any(|o| undefined[o.index()]);
        if let Some(value) = provided[handle.index()].take() {
            values.push(Some(value));
            undefined.push(is_undefined);
            continue;
        }
        if !need[handle.index()] {
            values.push(None);
            undefined.push(is_undefined);
            continue;
        }
        let v = |h: &Handle| values[h.index()].as_ref().expect("operands come first");
        let value = match node {
            Node::Softmax => logits.softmax(1, kind),
            Node::Labels => one_hot(labels, classes, kind),
            Node::Valid => labels.ne(IGNORE_LABEL).unsqueeze(1).to_kind(kind),
            Node::Const(c) => Tensor::from(c.get()).to_kind(kind).to_device(logits.device()),
            Node::Curve { input, curve } => apply_curve(v(input), &curves[curve.0 as usize]),
            Node::Erode { input, radius } => pool(v(input), *radius, true),
            Node::Dilate { input, radius } => pool(v(input), *radius, false),
            Node::AnyClass(input) => v(input).amax([1].as_slice(), true),
            Node::Slice { input, start, end } => slice(v(input), module.shape(*input), *start, *end),
            Node::Count(input) => match module.shape(*input) {
                Shape::ClassPixels(_) => v(input).sum_dim_intlist([0i64, 2, 3].as_slice(), false, kind),
                _ => v(input).sum(kind),
            },
            Node::NllSum => logits.cross_entropy_loss::<Tensor>(labels, None, Reduction::Sum, IGNORE_LABEL, 0.0),
            Node::Add(a, b) => v(a) + v(b),
            Node::Sub(a, b) => v(a) - v(b),
            Node::Mul(a, b) => v(a) * v(b),
            Node::Div { num, den, guard } => match guard {
                DivGuard::Auto => v(num) / (v(den) + SURROGATE_EPS),
                DivGuard::Explicit => v(num) / v(den),
            },
            Node::Neg(a) => v(a).neg(),
            Node::Compare { op, lhs, rhs } => compare(*op, &v(lhs).detach(), &v(rhs).detach()).to_kind(kind),
            Node::Mean { value, filter } => match filter {
                None => v(value).mean(kind),
                Some(mask) => {
                    let mask = v(mask);
                    let selected = mask.sum(kind);
                    if selected.double_value(&[]) <= 0.0 {
                        is_undefined = true;
                        (v(value) * mask).sum(kind)
                    } else {
                        (v(value) * mask).sum(kind) / selected
                    }
                }
            },
            Node::Sum { value, filter } => match filter {
                None => v(value).sum(kind),
                Some(mask) => (v(value) * v(mask)).sum(kind),
            },
            Node::Term { value, name } => {
                if is_undefined {
                    // An undefined term counts as a perfect score: `1 - term` adds nothing.
                    is_undefined = false;
                    undefined_terms.push(name.clone());
                    v(value).detach().zeros_like() + 1.0
                } else {
                    v(value).shallow_clone()
                }
            }
            Node::Pred
            | Node::CurveTag { .. }
            | Node::Scope { .. }
            | Node::And(..)
            | Node::Or(..)
            | Node::Xor(..)
            | Node::Not(..) => unreachable!("validated relaxed modules hold no exact nodes"),
        };
        values.push(Some(value));
        undefined.push(is_undefined);
    }
    NodeValues { values, undefined, undefined_terms }
}

/// Run a relaxed module with autograd, op by op (the reference path).
pub fn surrogate(module: &Module, curves: &[Curve], logits: &Tensor, labels: &Tensor) -> Surrogate {
    let provided = (0..module.len()).map(|_| None).collect();
    let mut wanted = vec![module.root];
    wanted.extend(module.reports.iter().map(|r| r.value));
    finish_surrogate(module, run_nodes(module, curves, logits, labels, provided, &wanted))
}

/// Assemble the loss from node values: `1 − metric` or the loss expression, 0 if undefined.
pub fn finish_surrogate(module: &Module, node_values: NodeValues) -> Surrogate {
    let NodeValues { mut values, undefined, undefined_terms } = node_values;
    let root = values[module.root.index()].take().expect("root computed");
    let defined = !undefined[module.root.index()];
    let loss = if !defined {
        root.detach().zeros_like() + &root * 0.0
    } else {
        match module.root_kind {
            compiler::ir::RootKind::Metric => root.ones_like() - &root,
            compiler::ir::RootKind::Loss => root.shallow_clone(),
        }
    };
    let reports = module
        .reports
        .iter()
        .filter_map(|r| values[r.value.index()].as_ref().map(|t| (r.name.clone(), t.detach())))
        .collect();
    Surrogate { loss, value: root, defined, undefined_terms, reports }
}

fn slice(x: &Tensor, shape: Shape, start: usize, end: Option<usize>) -> Tensor {
    let dim = match shape {
        Shape::ClassPixels(_) => 1,
        _ => 0,
    };
    let size = x.size()[dim] as usize;
    let end = end.unwrap_or(size).min(size);
    x.narrow(dim as i64, start as i64, (end - start.min(end)) as i64)
}

/// Run an exact module up to its accumulators; returns `(node, values)` per accumulator.
pub fn exact_counts(module: &Module, logits: &Tensor, labels: &Tensor) -> Vec<(Handle, Vec<f64>)> {
    assert_eq!(module.mode, Mode::Exact);
    let classes = logits.size()[1];
    let set_kind = Kind::Float;
    let mut values: Vec<Option<Tensor>> = (0..module.len()).map(|_| None).collect();
    let mut out = Vec::new();
    let _guard = tch::no_grad_guard();
    for handle in module.handles() {
        let node = module.node(handle);
        let v = |h: &Handle| values[h.index()].as_ref();
        let value = match node {
            Node::Pred => Some(one_hot(&logits.argmax(1, false), classes, set_kind)),
            Node::Labels => Some(one_hot(labels, classes, set_kind)),
            Node::Valid => Some(labels.ne(IGNORE_LABEL).unsqueeze(1).to_kind(set_kind)),
            Node::CurveTag { input, .. } | Node::Scope { input, .. } => v(input).map(Tensor::shallow_clone),
            Node::And(a, b) => pixel(module, handle).then(|| v(a).unwrap() * v(b).unwrap()),
            Node::Or(a, b) => pixel(module, handle).then(|| v(a).unwrap().maximum(v(b).unwrap())),
            Node::Xor(a, b) => pixel(module, handle).then(|| v(a).unwrap().ne_tensor(v(b).unwrap()).to_kind(set_kind)),
            Node::Not(a) => pixel(module, handle).then(|| v(a).unwrap().ones_like() - v(a).unwrap()),
            Node::Erode { input, radius } => v(input).map(|x| pool(x, *radius, true)),
            Node::Dilate { input, radius } => v(input).map(|x| pool(x, *radius, false)),
            Node::AnyClass(input) => v(input).map(|x| x.amax([1].as_slice(), true)),
            Node::Slice { input, start, end } => {
                pixel(module, handle).then(|| slice(v(input).unwrap(), module.shape(*input), *start, *end))
            }
            Node::Count(input) => {
                let x = v(input).expect("counts take pixel sets");
                let counted = match module.shape(*input) {
                    Shape::ClassPixels(_) => x.sum_dim_intlist([0i64, 2, 3].as_slice(), false, Kind::Double),
                    _ => x.sum(Kind::Double).reshape([1]),
                };
                out.push((handle, Vec::<f64>::try_from(counted.to_device(tch::Device::Cpu)).unwrap_or_default()));
                None
            }
            Node::NllSum => {
                let nll = logits.to_kind(Kind::Double).cross_entropy_loss::<Tensor>(
                    labels,
                    None,
                    Reduction::Sum,
                    IGNORE_LABEL,
                    0.0,
                );
                out.push((handle, vec![nll.double_value(&[])]));
                None
            }
            // Numbers above the accumulators are finished in float64 by the compiler.
            Node::Const(_)
            | Node::Add(..)
            | Node::Sub(..)
            | Node::Mul(..)
            | Node::Div { .. }
            | Node::Neg(_)
            | Node::Compare { .. }
            | Node::Mean { .. }
            | Node::Sum { .. }
            | Node::Term { .. } => None,
            Node::Softmax | Node::Curve { .. } => unreachable!("validated exact modules hold no surrogate nodes"),
        };
        values[handle.index()] = value;
    }
    out
}

fn pixel(module: &Module, handle: Handle) -> bool {
    matches!(module.shape(handle), Shape::Pixels | Shape::ClassPixels(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU pooling kernels equal libtorch's separable `max_pool2d` pair in values and,
    /// on inputs full of ties, in which pixel receives the gradient; widths below and above
    /// the winner search's block of lanes (with a remainder) are both covered.
    #[test]
    fn pooling_kernel_matches_max_pool2d_including_ties() {
        tch::manual_seed(3);
        for (x, radius) in [[2, 3, 9, 11], [2, 2, 13, 37]]
            .into_iter()
            .map(|shape| Tensor::randint(3, shape, (Kind::Float, tch::Device::Cpu)))
            .flat_map(|x| [1u32, 2, 5].map(|radius| (x.copy(), radius)))
        {
            for erode in [false, true] {
                let k = 2 * radius as i64 + 1;
                let r = radius as i64;
                let dilate = |t: &Tensor| {
                    t.max_pool2d([k, 1], [1, 1], [r, 0], [1, 1], false).max_pool2d(
                        [1, k],
                        [1, 1],
                        [0, r],
                        [1, 1],
                        false,
                    )
                };
                let reference_input = x.copy().set_requires_grad(true);
                let reference = if erode { dilate(&reference_input.neg()).neg() } else { dilate(&reference_input) };
                let weights = Tensor::rand(reference.size().as_slice(), (Kind::Float, tch::Device::Cpu));
                (&reference * &weights).sum(Kind::Float).backward();
                let fast_input = x.copy().set_requires_grad(true);
                let fast = pool(&fast_input, radius, erode);
                (&fast * &weights).sum(Kind::Float).backward();
                assert_eq!(f64::try_from((&fast - &reference).abs().max()).unwrap(), 0.0, "values r={radius}");
                let no_grad = pool(&x, radius, erode);
                assert_eq!(f64::try_from((&no_grad - &reference).abs().max()).unwrap(), 0.0, "values r={radius}");
                // A different winner would move a whole weight (0..1); only the order in which
                // one pixel's contributions are summed may differ.
                let difference = f64::try_from((fast_input.grad() - reference_input.grad()).abs().max()).unwrap();
                assert!(difference < 1e-5, "gradients r={radius} erode={erode}: {difference}");
            }
        }
    }
}
