//! The IR validator. [`ExactModule::new`](crate::ExactModule::new) and
//! [`RelaxedModule::new`](crate::RelaxedModule::new) run it, so every module a back end sees
//! has passed it. It checks, and lists every violation rather than stopping at the first:
//! * side tables (shapes, spans, rules) have one entry per node;
//! * operands come before users; the root and every report are in range, the root is a
//!   single number;
//! * exact modules hold no `softmax` or `curve`; relaxed modules hold no `pred`,
//!   `curve_tag` or `scope`, and no `and`, `or`, `xor`, `not` on pixel tensors;
//! * every node's shape is the one its operands imply (see [`expected_shape`]): pixel
//!   operators take pixel tensors (and scalar constants), arithmetic on numbers takes
//!   numbers, class ranges agree where two operands meet;
//! * accumulators (`count`, `nll_sum`) are the only bridge from pixel tensors to numbers: no
//!   other node with a number shape has a pixel-tensor operand;
//! * every `curve` refers to an entry of the manifest.

use crate::ir::{ClassRange, Mode, Module, Node, Shape};
use crate::relax::Manifest;

fn is_pixel(shape: Shape) -> bool {
    matches!(shape, Shape::Pixels | Shape::ClassPixels(_))
}

/// The shape of two operands that meet elementwise: pixel sets broadcast over classes,
/// single numbers over per-class numbers; class ranges must be equal.
fn broadcast(a: Shape, b: Shape) -> Option<Shape> {
    match (a, b) {
        (x, y) if x == y => Some(x),
        (Shape::Pixels, Shape::ClassPixels(r)) | (Shape::ClassPixels(r), Shape::Pixels) => Some(Shape::ClassPixels(r)),
        (Shape::Scalar, Shape::Classes(r)) | (Shape::Classes(r), Shape::Scalar) => Some(Shape::Classes(r)),
        _ => None,
    }
}

/// The shape a node must have given its operands' shapes, or why its operands are wrong.
pub fn expected_shape(module: &Module, node: &Node) -> Result<Shape, String> {
    let shape = |h: &crate::ir::Handle| module.shape(*h);
    let pixels_only = |h: &crate::ir::Handle, what: &str| {
        if is_pixel(shape(h)) {
            Ok(shape(h))
        } else {
            Err(format!("{what} takes a pixel tensor, not {:?}", shape(h)))
        }
    };
    let constant = |h: &crate::ir::Handle| matches!(module.node(*h), Node::Const(_));
    match node {
        Node::Pred | Node::Softmax | Node::Labels => Ok(Shape::ClassPixels(ClassRange::ALL)),
        Node::Valid | Node::Border { .. } => Ok(Shape::Pixels),
        Node::Const(_) | Node::NllSum => Ok(Shape::Scalar),
        Node::Weights { range, .. } => Ok(Shape::Classes(*range)),
        Node::CurveTag { input, .. } | Node::Scope { input, .. } => pixels_only(input, "an annotation"),
        Node::Curve { input, .. } => pixels_only(input, "a curve"),
        Node::Erode { input, .. } | Node::Dilate { input, .. } => pixels_only(input, "a morphological operator"),
        Node::AnyClass(input) => match shape(input) {
            Shape::ClassPixels(_) => Ok(Shape::Pixels),
            other => Err(format!("`any` takes per-class pixel sets, not {other:?}")),
        },
        Node::Slice { input, start, end } => match shape(input) {
            Shape::ClassPixels(r) => Ok(Shape::ClassPixels(r.slice(*start, *end))),
            Shape::Classes(r) => Ok(Shape::Classes(r.slice(*start, *end))),
            other => Err(format!("a class slice takes per-class values, not {other:?}")),
        },
        Node::Count(input) => match shape(input) {
            Shape::Pixels => Ok(Shape::Scalar),
            Shape::ClassPixels(r) => Ok(Shape::Classes(r)),
            other => Err(format!("a count takes pixel tensors, not {other:?}")),
        },
        Node::And(a, b) | Node::Or(a, b) | Node::Xor(a, b) | Node::Add(a, b) | Node::Sub(a, b) | Node::Mul(a, b) => {
            let (sa, sb) = (shape(a), shape(b));
            // Pixel tensors combine with pixel tensors; relaxation also scales them by
            // constants (`1 − x`). Numbers combine with numbers only: counts are the bridge.
            let (sa, sb) = match (is_pixel(sa), is_pixel(sb)) {
                (true, false) if constant(b) && sb == Shape::Scalar => (sa, sa),
                (false, true) if constant(a) && sa == Shape::Scalar => (sb, sb),
                (true, false) | (false, true) => {
                    return Err(format!(
                        "`{}` mixes a pixel tensor with the number {:?}",
                        node.mnemonic(),
                        if is_pixel(sa) { sb } else { sa }
                    ))
                }
                _ => (sa, sb),
            };
            broadcast(sa, sb).ok_or_else(|| format!("`{}` combines {sa:?} with {sb:?}", node.mnemonic()))
        }
        Node::Not(a) | Node::Neg(a) => Ok(shape(a)),
        Node::Div { num, den, .. } | Node::Compare { lhs: num, rhs: den, .. } => {
            let (sa, sb) = (shape(num), shape(den));
            if is_pixel(sa) || is_pixel(sb) {
                return Err(format!("`{}` takes numbers, not pixel tensors", node.mnemonic()));
            }
            broadcast(sa, sb).ok_or_else(|| format!("`{}` combines {sa:?} with {sb:?}", node.mnemonic()))
        }
        Node::Mean { value, filter } | Node::Sum { value, filter } => {
            let Shape::Classes(range) = shape(value) else {
                return Err(format!("a reduction takes per-class numbers, not {:?}", shape(value)));
            };
            match filter.map(|f| shape(&f)) {
                None | Some(Shape::Scalar) => Ok(Shape::Scalar),
                Some(Shape::Classes(r)) if r == range => Ok(Shape::Scalar),
                Some(other) => Err(format!("a reduction over classes [{range}] is filtered by {other:?}")),
            }
        }
        Node::Term { value, .. } => match shape(value) {
            Shape::Scalar => Ok(Shape::Scalar),
            other => Err(format!("a metric term is a single number, not {other:?}")),
        },
    }
}

/// Whether a node may appear in an exact and in a relaxed module. Set operators on pixels
/// exist only in exact modules (relaxation replaces them); on class masks, in both.
fn modes(node: &Node, pixel: bool) -> (bool, bool) {
    match node {
        Node::Pred | Node::CurveTag { .. } | Node::Scope { .. } => (true, false),
        Node::Softmax | Node::Curve { .. } => (false, true),
        Node::And(..) | Node::Or(..) | Node::Xor(..) | Node::Not(..) => (true, !pixel),
        Node::Labels
        | Node::Valid
        | Node::Border { .. }
        | Node::Const(_)
        | Node::Weights { .. }
        | Node::Erode { .. }
        | Node::Dilate { .. }
        | Node::AnyClass(_)
        | Node::Slice { .. }
        | Node::Count(_)
        | Node::NllSum
        | Node::Add(..)
        | Node::Sub(..)
        | Node::Mul(..)
        | Node::Div { .. }
        | Node::Neg(_)
        | Node::Compare { .. }
        | Node::Mean { .. }
        | Node::Sum { .. }
        | Node::Term { .. } => (true, true),
    }
}

/// Every invariant violation found, as sentences (empty when valid).
pub fn validate(module: &Module, manifest: Option<&Manifest>) -> Vec<String> {
    let mut errors = Vec::new();
    let n = module.len();
    if module.shapes.len() != n || module.spans.len() != n || module.rules.len() != n {
        errors.push(format!(
            "side tables have {}, {}, {} entries for {n} nodes",
            module.shapes.len(),
            module.spans.len(),
            module.rules.len()
        ));
        return errors;
    }
    for handle in module.handles() {
        let node = module.node(handle);
        let mut ordered = true;
        for operand in node.operands() {
            if operand >= handle {
                errors.push(format!("{handle} ({}) uses {operand}, which does not come before it", node.mnemonic()));
                ordered = false;
            }
        }
        if !ordered {
            continue;
        }
        let pixel = is_pixel(module.shape(handle));
        let (in_exact, in_relaxed) = modes(node, pixel);
        match module.mode {
            Mode::Exact if !in_exact => {
                errors.push(format!("{handle}: exact module holds surrogate node {}", node.mnemonic()))
            }
            Mode::Relaxed if !in_relaxed => {
                errors.push(format!("{handle}: relaxed module holds exact node {}", node.mnemonic()))
            }
            Mode::Exact | Mode::Relaxed => {}
        }
        if let (Mode::Relaxed, Node::Curve { curve, .. }) = (module.mode, node) {
            if manifest.map_or(true, |manifest| curve.0 as usize >= manifest.curves.len()) {
                errors.push(format!("{handle}: curve #{} is not in the manifest", curve.0));
            }
        }
        match expected_shape(module, node) {
            Ok(shape) if shape == module.shape(handle) => {}
            Ok(shape) => errors.push(format!(
                "{handle} ({}) has shape {:?} but its operands make {shape:?}",
                node.mnemonic(),
                module.shape(handle)
            )),
            Err(problem) => errors.push(format!("{handle}: {problem}")),
        }
    }
    if module.root.index() >= n {
        errors.push(format!("root {} is out of range", module.root));
    } else if module.shape(module.root) != Shape::Scalar {
        errors.push(format!("root {} is not a single number", module.root));
    }
    for report in &module.reports {
        if report.value.index() >= n {
            errors.push(format!("report {} points outside the module", report.name));
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Builder, RootKind};
    use grammar::ast::Span;

    fn span() -> Span {
        Span::new(0, 0)
    }

    /// A count of classes summed straight into a pixel set, and a mean over pixels: both
    /// break the rule that counts are the only bridge between pixels and numbers.
    #[test]
    fn numbers_from_pixels_without_a_count_are_reported() {
        let mut builder = Builder::default();
        let labels = builder.add(Node::Labels, Shape::ClassPixels(ClassRange::ALL), span(), "test");
        let count = builder.add(Node::Count(labels), Shape::Classes(ClassRange::ALL), span(), "test");
        let mixed = builder.add(Node::Add(count, labels), Shape::Classes(ClassRange::ALL), span(), "test");
        let mean = builder.add(Node::Mean { value: labels, filter: None }, Shape::Scalar, span(), "test");
        let root = builder.add(Node::Add(mean, mean), Shape::Scalar, span(), "test");
        let module = builder.finish(
            "bad".into(),
            Mode::Exact,
            RootKind::Metric,
            root,
            vec![],
            1,
            2,
            crate::ir::Predictions::Softmax,
            false,
        );
        let errors = validate(&module, None);
        assert!(
            errors.iter().any(|e| e.starts_with(&format!("{mixed}:")) && e.contains("mixes a pixel tensor")),
            "{errors:?}"
        );
        assert!(
            errors.iter().any(|e| e.starts_with(&format!("{mean}:")) && e.contains("per-class numbers")),
            "{errors:?}"
        );
    }

    /// A node whose recorded shape disagrees with its operands, and class ranges that do not
    /// meet, are both found.
    #[test]
    fn wrong_shapes_and_mismatched_ranges_are_reported() {
        let mut builder = Builder::default();
        let labels = builder.add(Node::Labels, Shape::ClassPixels(ClassRange::ALL), span(), "test");
        let sliced = builder.add(
            Node::Slice { input: labels, start: 1, end: None },
            Shape::ClassPixels(ClassRange { start: 1, end: None }),
            span(),
            "test",
        );
        let and = builder.add(Node::And(labels, sliced), Shape::ClassPixels(ClassRange::ALL), span(), "test");
        let count = builder.add(Node::Count(and), Shape::Scalar, span(), "test");
        let module = builder.finish(
            "bad".into(),
            Mode::Exact,
            RootKind::Metric,
            count,
            vec![],
            2,
            2,
            crate::ir::Predictions::Softmax,
            false,
        );
        let errors = validate(&module, None);
        assert!(errors.iter().any(|e| e.starts_with(&format!("{and}:")) && e.contains("combines")), "{errors:?}");
        assert!(
            errors.iter().any(|e| e.starts_with(&format!("{count} ")) && e.contains("operands make")),
            "{errors:?}"
        );
    }
}
