//! The IR validator. It checks, and lists every violation rather than stopping at the first:
//! * side tables (shapes, spans, rules) have one entry per node;
//! * operands come before users and are in range; the root and reports are in range;
//! * exact modules hold no `Softmax`/`Curve`; relaxed modules hold no `Pred`, `And`, `Or`,
//!   `Xor`, `Not`, `CurveTag` or `Scope` on pixel tensors;
//! * accumulators take pixel tensors and give numbers; reductions take per-class numbers;
//! * curve ids are inside the manifest.

use crate::ir::{Mode, Module, Node, Shape};
use crate::relax::Manifest;

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
        for operand in node.operands() {
            if operand >= handle {
                errors.push(format!("{handle} ({}) uses {operand}, which does not come before it", node.mnemonic()));
            }
        }
        let pixel = matches!(module.shape(handle), Shape::Pixels | Shape::ClassPixels(_));
        match (module.mode, node) {
            (Mode::Exact, Node::Softmax | Node::Curve { .. }) => {
                errors.push(format!("{handle}: exact module holds surrogate node {}", node.mnemonic()))
            }
            (Mode::Relaxed, Node::Pred | Node::CurveTag { .. } | Node::Scope { .. }) => {
                errors.push(format!("{handle}: relaxed module holds exact node {}", node.mnemonic()))
            }
            (Mode::Relaxed, Node::And(..) | Node::Or(..) | Node::Xor(..) | Node::Not(..)) if pixel => {
                errors.push(format!("{handle}: relaxed module holds exact set operator {}", node.mnemonic()))
            }
            (_, Node::Count(input)) if !matches!(module.shape(*input), Shape::Pixels | Shape::ClassPixels(_)) => {
                errors.push(format!("{handle}: count of a non-pixel value {input}"))
            }
            (_, Node::Mean { value, .. } | Node::Sum { value, .. })
                if !matches!(module.shape(*value), Shape::Classes(_)) =>
            {
                errors.push(format!("{handle}: reduction over a value {value} that is not per class"))
            }
            (_, Node::Curve { curve, .. }) => {
                if let Some(manifest) = manifest {
                    if curve.0 as usize >= manifest.curves.len() {
                        errors.push(format!("{handle}: curve #{} is not in the manifest", curve.0));
                    }
                }
            }
            _ => {}
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
