//! Relaxation: the exact module becomes a differentiable surrogate with parameterized curves.
//!
//! Rewrite rules (each node the pass builds records the rule's name):
//! * `relax.pred`    — `P` (argmax one-hot) becomes `softmax(logits)`;
//! * `relax.and`     — `a & b → g(a)·g'(b)`;
//! * `relax.or`      — `a | b → g(a) + g'(b) − g(a)·g'(b)`;
//! * `relax.xor`     — `a ^ b → (a | b) − (a & b)`, the `&` curves numbered before the `|` ones;
//! * `relax.not`     — `!a → 1 − a`;
//! * `relax.curve`   — the curve applied to an operand.
//!
//! Which operands get a curve (the published rule): an operand that depends on `P` and is
//! `P` itself or a structural image of it (erode, dilate, slice, any) — not the result of
//! another logical operator. Label-only operands stay exact. `x @ name` forces a curve named
//! `name` (operands with the same name share it); `x @ none` applies none. Curves are
//! numbered in source order, which reproduces the published layouts: mIoU, FWIoU, BIoU get
//! [and, or]; mAcc, gAcc [and]; BF1 [and·P, and·erode(P), or·P, or·erode(P)].

use crate::ir::{Builder, CurveId, Handle, Mode, Node, Shape};
use crate::modules::{ExactModule, Invalid, RelaxedModule};
use grammar::ast::Span;
use serde::Serialize;

/// Which logical operator a curve belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CurveOp {
    And,
    Or,
}

/// One curve of the surrogate.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CurveSpec {
    /// Stable name: `and_P`, `or_erode_P`, `biou.and_P`, or a user's `@name`.
    pub name: String,
    pub op: CurveOp,
    /// What the curve is applied to, in words (`P`, `erode(P)`).
    pub operand: String,
    pub pieces: usize,
    /// The operator the curve was first created for.
    pub span: Span,
}

/// The curves of a relaxed module, in source order (the order of published layouts).
#[derive(Clone, Debug, PartialEq, Serialize, Default)]
pub struct Manifest {
    pub curves: Vec<CurveSpec>,
}

impl Manifest {
    pub fn find(&self, name: &str) -> Option<usize> {
        self.curves.iter().position(|c| c.name == name)
    }
}

/// What relaxation knows about an exact node: whether a logical operator applying to it
/// should insert a curve, and how to name it.
#[derive(Clone, Debug)]
struct Eligibility {
    /// Human text for the operand (`P`, `erode(P)`), used in names.
    text: String,
    /// `Some(Some(name))`: user named the curve; `Some(None)`: user asked for no curve.
    tag: Option<Option<String>>,
    /// Name prefix and pieces of the metric term, inside a loss.
    scope: Option<(String, usize)>,
}

/// Relax an exact module into a surrogate module with its curve manifest. The result is
/// validated; an error here is the compiler's own bug, never the user's.
pub fn relax(exact: &ExactModule) -> Result<RelaxedModule, Invalid> {
    let depends_on_pred = exact.prediction_dependent();
    let mut builder = Builder::default();
    let mut manifest = Manifest::default();
    let mut map: Vec<Handle> = Vec::with_capacity(exact.len());
    let mut eligible: Vec<Option<Eligibility>> = Vec::with_capacity(exact.len());

    for handle in exact.handles() {
        let node = exact.node(handle);
        let shape = exact.shape(handle);
        let span = exact.span(handle);
        let rule = exact.rules[handle.index()];
        let m = |h: Handle| map[h.index()];
        let dep = depends_on_pred[handle.index()];
        let mut elig: Option<Eligibility> = None;
        let new_handle = match node {
            Node::Pred => {
                elig = Some(Eligibility { text: "P".into(), tag: None, scope: None });
                builder.add(Node::Softmax, shape, span, "relax.pred")
            }
            Node::Scope { input, name, pieces } => {
                let inner = eligible[input.index()].clone();
                elig = inner.map(|e| Eligibility { scope: Some((name.clone(), *pieces)), ..e });
                m(*input)
            }
            Node::CurveTag { input, name } => {
                let base = eligible[input.index()].clone().unwrap_or(Eligibility {
                    text: "expr".into(),
                    tag: None,
                    scope: None,
                });
                elig = Some(Eligibility { tag: Some(name.clone()), ..base });
                m(*input)
            }
            Node::Erode { input, radius } => {
                elig = eligible[input.index()].clone().map(|e| Eligibility { text: format!("erode_{}", e.text), ..e });
                builder.add(Node::Erode { input: m(*input), radius: *radius }, shape, span, rule)
            }
            Node::Dilate { input, radius } => {
                elig = eligible[input.index()].clone().map(|e| Eligibility { text: format!("dilate_{}", e.text), ..e });
                builder.add(Node::Dilate { input: m(*input), radius: *radius }, shape, span, rule)
            }
            Node::AnyClass(input) => {
                elig = eligible[input.index()].clone().map(|e| Eligibility { text: format!("any_{}", e.text), ..e });
                builder.add(Node::AnyClass(m(*input)), shape, span, rule)
            }
            Node::Slice { input, start, end } => {
                elig = eligible[input.index()].clone();
                builder.add(Node::Slice { input: m(*input), start: *start, end: *end }, shape, span, rule)
            }
            Node::And(a, b) => {
                let ga = curve_for(&mut builder, &mut manifest, &eligible, *a, m(*a), CurveOp::And, span, exact);
                let gb = curve_for(&mut builder, &mut manifest, &eligible, *b, m(*b), CurveOp::And, span, exact);
                builder.add(Node::Mul(ga, gb), shape, span, "relax.and")
            }
            Node::Or(a, b) => {
                let ga = curve_for(&mut builder, &mut manifest, &eligible, *a, m(*a), CurveOp::Or, span, exact);
                let gb = curve_for(&mut builder, &mut manifest, &eligible, *b, m(*b), CurveOp::Or, span, exact);
                soft_or(&mut builder, ga, gb, shape, span, "relax.or")
            }
            Node::Xor(a, b) => {
                let ha = curve_for(&mut builder, &mut manifest, &eligible, *a, m(*a), CurveOp::And, span, exact);
                let hb = curve_for(&mut builder, &mut manifest, &eligible, *b, m(*b), CurveOp::And, span, exact);
                let ga = curve_for(&mut builder, &mut manifest, &eligible, *a, m(*a), CurveOp::Or, span, exact);
                let gb = curve_for(&mut builder, &mut manifest, &eligible, *b, m(*b), CurveOp::Or, span, exact);
                let either = soft_or(&mut builder, ga, gb, shape, span, "relax.xor");
                let both = builder.add(Node::Mul(ha, hb), shape, span, "relax.xor");
                builder.add(Node::Sub(either, both), shape, span, "relax.xor")
            }
            Node::Not(a) => {
                let one = builder.constant(1.0, span, "relax.not");
                builder.add(Node::Sub(one, m(*a)), shape, span, "relax.not")
            }
            Node::Softmax | Node::Curve { .. } => unreachable!("exact modules hold no surrogate nodes"),
            Node::Labels | Node::Valid | Node::Border { .. } | Node::Const(_) | Node::Weights { .. } | Node::NllSum => {
                builder.add(node.clone(), shape, span, rule)
            }
            Node::Count(a) => builder.add(Node::Count(m(*a)), shape, span, rule),
            Node::Add(a, b) => builder.add(Node::Add(m(*a), m(*b)), shape, span, rule),
            Node::Sub(a, b) => builder.add(Node::Sub(m(*a), m(*b)), shape, span, rule),
            Node::Mul(a, b) => builder.add(Node::Mul(m(*a), m(*b)), shape, span, rule),
            Node::Div { num, den, guard } => {
                builder.add(Node::Div { num: m(*num), den: m(*den), guard: *guard }, shape, span, rule)
            }
            Node::Neg(a) => builder.add(Node::Neg(m(*a)), shape, span, rule),
            Node::Compare { op, lhs, rhs } => {
                builder.add(Node::Compare { op: *op, lhs: m(*lhs), rhs: m(*rhs) }, shape, span, rule)
            }
            Node::Mean { value, filter } => {
                builder.add(Node::Mean { value: m(*value), filter: filter.map(m) }, shape, span, rule)
            }
            Node::Sum { value, filter } => {
                builder.add(Node::Sum { value: m(*value), filter: filter.map(m) }, shape, span, rule)
            }
            Node::Term { value, name } => {
                builder.add(Node::Term { value: m(*value), name: name.clone() }, shape, span, rule)
            }
        };
        map.push(new_handle);
        eligible.push(if dep { elig } else { None });
    }
    let reports =
        exact.reports.iter().map(|r| crate::ir::Report { name: r.name.clone(), value: map[r.value.index()] }).collect();
    let root = map[exact.root.index()];
    let relaxed = builder.finish(
        exact.name.clone(),
        Mode::Relaxed,
        exact.root_kind,
        root,
        reports,
        exact.min_classes,
        exact.pieces,
        exact.predictions,
        exact.per_image,
    );
    RelaxedModule::new(relaxed, manifest)
}

fn soft_or(builder: &mut Builder, a: Handle, b: Handle, shape: Shape, span: Span, rule: &'static str) -> Handle {
    let sum = builder.add(Node::Add(a, b), shape, span, rule);
    let product = builder.add(Node::Mul(a, b), shape, span, rule);
    builder.add(Node::Sub(sum, product), shape, span, rule)
}

/// The operand as the logical operator sees it: wrapped in a curve when the rule says so.
#[allow(clippy::too_many_arguments)]
fn curve_for(
    builder: &mut Builder,
    manifest: &mut Manifest,
    eligible: &[Option<Eligibility>],
    exact_operand: Handle,
    relaxed_operand: Handle,
    op: CurveOp,
    span: Span,
    exact: &ExactModule,
) -> Handle {
    let Some(elig) = &eligible[exact_operand.index()] else { return relaxed_operand };
    let op_text = match op {
        CurveOp::And => "and",
        CurveOp::Or => "or",
    };
    let (prefix, pieces) = match &elig.scope {
        Some((name, pieces)) => (format!("{name}."), *pieces),
        None => (String::new(), exact.pieces),
    };
    let index = match &elig.tag {
        Some(None) => return relaxed_operand,
        Some(Some(user_name)) => match manifest.find(user_name) {
            Some(index) => index,
            None => {
                manifest.curves.push(CurveSpec {
                    name: user_name.clone(),
                    op,
                    operand: elig.text.clone(),
                    pieces,
                    span,
                });
                manifest.curves.len() - 1
            }
        },
        None => {
            let base = format!("{prefix}{op_text}_{}", elig.text);
            let mut name = base.clone();
            let mut n = 2;
            while manifest.find(&name).is_some() {
                name = format!("{base}_{n}");
                n += 1;
            }
            manifest.curves.push(CurveSpec { name, op, operand: elig.text.clone(), pieces, span });
            manifest.curves.len() - 1
        }
    };
    let shape = builder.shape(relaxed_operand);
    builder.add(Node::Curve { input: relaxed_operand, curve: CurveId(index as u32) }, shape, span, "relax.curve")
}
