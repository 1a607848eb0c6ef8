//! Printable dumps of IR modules (`--emit ir`, `--emit relaxed`), pinned by snapshots.
//!
//! One node per line: `%id: shape = mnemonic operands attributes  [rule]`, then the curve
//! manifest and the root. The format is stable so that snapshot diffs read as changes.

use crate::ir::{ClassRange, Module, Node, Shape};
use crate::relax::Manifest;
use std::fmt::Write;

pub(crate) fn shape_text(shape: Shape) -> String {
    let range = |r: ClassRange| format!("C[{r}]");
    match shape {
        Shape::Pixels => "pixels".into(),
        Shape::ClassPixels(r) => format!("pixels×{}", range(r)),
        Shape::Classes(r) => range(r),
        Shape::Scalar => "scalar".into(),
    }
}

/// Dump a module, with its manifest when relaxed.
pub fn dump(module: &Module, manifest: Option<&Manifest>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "module {} ({:?}, {:?}, min classes {})",
        module.name, module.mode, module.root_kind, module.min_classes
    );
    if module.predictions.is_sigmoid() {
        let _ = writeln!(out, "predictions: {}", module.predictions);
    }
    if module.per_image {
        let _ = writeln!(out, "per image");
    }
    for handle in module.handles() {
        let node = module.node(handle);
        let operands: Vec<String> = node.operands().iter().map(|h| h.to_string()).collect();
        let attributes = match node {
            Node::Const(value) => format!(" {:?}", value.get()),
            Node::Weights { values, param, .. } => {
                let values: Vec<String> = values.iter().map(|v| format!("{:?}", v.get())).collect();
                format!(" {param}=[{}]", values.join(", "))
            }
            Node::CurveTag { name, .. } => format!(" @{}", name.as_deref().unwrap_or("none")),
            Node::Scope { name, pieces, .. } => format!(" {name} pieces={pieces}"),
            Node::Curve { curve, .. } => match manifest.and_then(|m| m.curves.get(curve.0 as usize)) {
                Some(spec) => format!(" #{} {}", curve.0, spec.name),
                None => format!(" #{}", curve.0),
            },
            Node::Erode { radius, .. } | Node::Dilate { radius, .. } | Node::Border { radius } => {
                format!(" r={radius}")
            }
            Node::Slice { start, end, .. } => match end {
                Some(end) => format!(" [{start}:{end}]"),
                None => format!(" [{start}:]"),
            },
            Node::Div { guard, .. } => format!(" guard={guard:?}"),
            Node::Compare { op, .. } => format!(" {}", op.symbol()),
            Node::Mean { filter: Some(_), .. } | Node::Sum { filter: Some(_), .. } => " where".into(),
            Node::Term { name, .. } => format!(" {name}"),
            // Nodes whose operands say everything.
            Node::Pred
            | Node::Softmax
            | Node::Labels
            | Node::Valid
            | Node::And(..)
            | Node::Or(..)
            | Node::Xor(..)
            | Node::Not(..)
            | Node::AnyClass(_)
            | Node::Count(_)
            | Node::NllSum
            | Node::Add(..)
            | Node::Sub(..)
            | Node::Mul(..)
            | Node::Neg(_)
            | Node::Mean { filter: None, .. }
            | Node::Sum { filter: None, .. } => String::new(),
        };
        let _ = writeln!(
            out,
            "  {handle}: {} = {}{}{}  [{}]",
            shape_text(module.shape(handle)),
            node.mnemonic(),
            if operands.is_empty() { String::new() } else { format!(" {}", operands.join(", ")) },
            attributes,
            module.rules[handle.index()]
        );
    }
    if let Some(manifest) = manifest {
        for (index, curve) in manifest.curves.iter().enumerate() {
            let _ = writeln!(
                out,
                "  curve #{index} {}: {:?} on {}, {} pieces",
                curve.name, curve.op, curve.operand, curve.pieces
            );
        }
    }
    for report in &module.reports {
        let _ = writeln!(out, "  report {} = {}", report.name, report.value);
    }
    let _ = writeln!(out, "  root {}", module.root);
    out
}
