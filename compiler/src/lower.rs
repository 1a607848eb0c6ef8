//! Lowering: a checked program plus parameter values becomes an exact IR [`Module`].
//!
//! Parameters are known here, so `if` picks a branch, slice bounds and radii become
//! numbers and class ranges are checked (`X[1:] & Y` needs `Y` to cover the same classes).
//! Sugar disappears: `boundary(X)` is `X ^ erode(X, 1)`, `ce` is the summed pixel
//! cross-entropy over the number of valid pixels. Structurally equal nodes are built once
//! (see [`crate::ir::Builder`]), which is the compiler's common-subexpression elimination.

use crate::check::FileDiagnostics;
use crate::ir::{
    Builder, ClassRange, CmpOp, DivGuard, Float, Handle, Mode, Module, Node, Predictions, Report, RootKind, Shape,
};
use crate::program::{Program, SourceId};
use grammar::ast::{self, BinaryOp, ExprKind, Literal, OptionValue, ParamType, Span, UnaryOp};
use grammar::{suggest, Diagnostic};
use std::collections::BTreeMap;
use std::fmt;

/// Largest radius accepted by `erode` and `dilate`.
pub const MAX_RADIUS: i64 = 64;
/// Bézier pieces per curve when a definition does not say (`with pieces = N`).
pub const DEFAULT_PIECES: usize = 2;

/// A parameter value, typed.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum ParamValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    /// A `floats` parameter: per-class weights, or one number for every class.
    Floats(Vec<f64>),
}

impl From<i64> for ParamValue {
    fn from(value: i64) -> Self {
        ParamValue::Int(value)
    }
}

impl From<i32> for ParamValue {
    fn from(value: i32) -> Self {
        ParamValue::Int(value.into())
    }
}

impl From<f64> for ParamValue {
    fn from(value: f64) -> Self {
        ParamValue::Float(value)
    }
}

impl From<Vec<f64>> for ParamValue {
    fn from(value: Vec<f64>) -> Self {
        ParamValue::Floats(value)
    }
}

impl From<&[f64]> for ParamValue {
    fn from(value: &[f64]) -> Self {
        ParamValue::Floats(value.to_vec())
    }
}

impl From<bool> for ParamValue {
    fn from(value: bool) -> Self {
        ParamValue::Bool(value)
    }
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamValue::Int(v) => write!(f, "{v}"),
            ParamValue::Float(v) => write!(f, "{v:?}"),
            ParamValue::Bool(v) => write!(f, "{v}"),
            ParamValue::Floats(v) => {
                write!(f, "{}", v.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>().join(","))
            }
        }
    }
}

/// Why lowering failed.
#[derive(Debug)]
pub enum LowerError {
    /// The main file defines no metric or loss.
    NoEntry,
    /// A `--set NAME=VALUE` override is wrong; the message is one full sentence.
    Param(String),
    /// Errors found with parameter values known (class ranges, radii), per file.
    Diagnostics(Vec<FileDiagnostics>),
}

/// Resolve `--set` overrides against the entry's declared parameters.
pub fn resolve_params(
    definition: &ast::Definition,
    overrides: &[(String, String)],
) -> Result<BTreeMap<String, ParamValue>, LowerError> {
    let mut values = BTreeMap::new();
    for param in &definition.params {
        values.insert(param.name.name.clone(), literal_value(param.ty, &param.default));
    }
    for (name, raw) in overrides {
        let Some(param) = definition.params.iter().find(|p| &p.name.name == name) else {
            let known: Vec<&str> = definition.params.iter().map(|p| p.name.name.as_str()).collect();
            let prefix_match = known.iter().copied().find(|k| name.starts_with(k) || k.starts_with(name.as_str()));
            let hint = match prefix_match.or_else(|| suggest(name, known.iter().copied())) {
                Some(best) => format!(" Did you mean `{best}`?"),
                None if known.is_empty() => " It declares no parameters.".to_string(),
                None => format!(" Its parameters are: {}.", known.join(", ")),
            };
            return Err(LowerError::Param(format!("`{}` has no parameter `{name}`.{hint}", definition.name.name)));
        };
        let raw_trimmed = raw.trim();
        let value = match param.ty {
            ParamType::Int => raw_trimmed.parse::<i64>().ok().map(ParamValue::Int),
            ParamType::Float => raw_trimmed.parse::<f64>().ok().filter(|v| v.is_finite()).map(ParamValue::Float),
            ParamType::Bool => match raw_trimmed {
                "true" => Some(ParamValue::Bool(true)),
                "false" => Some(ParamValue::Bool(false)),
                _ => None,
            },
            ParamType::Floats => parse_weights(raw_trimmed).map(ParamValue::Floats),
        };
        let Some(value) = value else {
            let expected = match param.ty {
                ParamType::Int => "an integer such as 3",
                ParamType::Float => "a finite number such as 0.5",
                ParamType::Bool => "`true` or `false`",
                ParamType::Floats => "non-negative numbers separated by commas, one per class, such as 1,2,2,1",
            };
            return Err(LowerError::Param(format!("parameter `{name}` expects {expected}, but got `{raw}`.")));
        };
        values.insert(name.clone(), value);
    }
    Ok(values)
}

/// `1,2,2.5` as weights: finite, non-negative, at least one of them positive.
fn parse_weights(raw: &str) -> Option<Vec<f64>> {
    let values: Vec<f64> = raw.split(',').map(|part| part.trim().parse::<f64>().ok()).collect::<Option<_>>()?;
    let valid = values.iter().all(|v| v.is_finite() && *v >= 0.0) && values.iter().any(|v| *v > 0.0);
    valid.then_some(values)
}

fn literal_value(ty: ParamType, literal: &Literal) -> ParamValue {
    match (ty, literal) {
        (ParamType::Floats, Literal::Int(v)) => ParamValue::Floats(vec![*v as f64]),
        (ParamType::Floats, Literal::Float(v)) => ParamValue::Floats(vec![*v]),
        (ParamType::Float, Literal::Int(v)) => ParamValue::Float(*v as f64),
        (_, Literal::Int(v)) => ParamValue::Int(*v),
        (_, Literal::Float(v)) => ParamValue::Float(*v),
        (_, Literal::Bool(v)) => ParamValue::Bool(*v),
    }
}

/// Lower the program's entry with the given parameter overrides. The program must have
/// passed [`crate::check::check_program`].
pub fn lower(program: &Program, overrides: &[(String, String)]) -> Result<Module, LowerError> {
    let (definition, is_loss) = program.entry().ok_or(LowerError::NoEntry)?;
    lower_definition(program, definition, is_loss, overrides)
}

/// Lower one definition of the main file (the entry, or any other for `check`).
pub fn lower_definition(
    program: &Program,
    definition: &ast::Definition,
    is_loss: bool,
    overrides: &[(String, String)],
) -> Result<Module, LowerError> {
    let params = resolve_params(definition, overrides)?;
    let mut lowering = Lowering {
        program,
        builder: Builder::default(),
        diagnostics: Vec::new(),
        min_classes: 1,
        source: 0,
        term_predictions: Vec::new(),
        term_per_image: Vec::new(),
    };
    let pieces = definition_pieces(definition);
    let mut env: Vec<(String, Value)> = params.iter().map(|(k, v)| (k.clone(), param_value(k, v.clone()))).collect();
    for binding in &definition.lets {
        let value = lowering.expr(&binding.value, &env, None);
        env.push((binding.name.name.clone(), value));
    }
    let root_value = lowering.expr(&definition.body, &env, None);
    let root = lowering.to_node(root_value, definition.body.span);
    let predictions = lowering.predictions(definition, &env);
    let per_image = lowering.per_image(definition, &env);
    if !lowering.diagnostics.is_empty() {
        let mut by_file: BTreeMap<SourceId, Vec<Diagnostic>> = BTreeMap::new();
        for (source, diagnostic) in lowering.diagnostics {
            by_file.entry(source).or_default().push(diagnostic);
        }
        return Err(LowerError::Diagnostics(
            by_file.into_iter().map(|(source, diagnostics)| FileDiagnostics { source, diagnostics }).collect(),
        ));
    }
    let root = root.expect("no diagnostics implies a root node");
    let mut reports = Vec::new();
    if let Some(per_class) = top_level_reduction(&definition.body, &env, &lowering) {
        reports.push(Report { name: "per_class".into(), value: per_class });
    }
    // Terms report their own value (undefined shows as such), not the substituted one.
    for node in &lowering.builder.nodes {
        if let Node::Term { name, value } = node {
            reports.push(Report { name: name.clone(), value: *value });
        }
    }
    let root_kind = if is_loss { RootKind::Loss } else { RootKind::Metric };
    let min_classes = lowering.min_classes;
    Ok(lowering.builder.finish(
        definition.name.name.clone(),
        Mode::Exact,
        root_kind,
        root,
        reports,
        min_classes,
        pieces,
        predictions,
        per_image,
    ))
}

fn handle_at(index: usize) -> Handle {
    // Handles are dense indices; the builder hands them out in order.
    crate::ir::handle_from_index(index)
}

fn definition_pieces(definition: &ast::Definition) -> usize {
    definition
        .options
        .iter()
        .find_map(|o| match (o.key.name.as_str(), &o.value) {
            ("pieces", OptionValue::Literal(Literal::Int(n))) if *n >= 1 => Some(*n as usize),
            _ => None,
        })
        .unwrap_or(DEFAULT_PIECES)
}

/// If the body is `mean(v, ...)` or `sum(v, ...)`, the per-class values `v`.
fn top_level_reduction(body: &ast::Expr, env: &[(String, Value)], lowering: &Lowering) -> Option<Handle> {
    let mut expr = body;
    while let ExprKind::Paren(inner) = &expr.kind {
        expr = inner;
    }
    let ExprKind::Call { callee, args } = &expr.kind else { return None };
    if callee.name != "mean" && callee.name != "sum" {
        return None;
    }
    let first = args.iter().find(|a| a.name.is_none())?;
    // Re-lowering finds the existing node through hash-consing; nothing new is built for a
    // well-formed body, but we only look up, never add: walk by name for the common case.
    match &first.value.kind {
        ExprKind::Name(ident) => match env.iter().rev().find(|(n, _)| n == &ident.name) {
            Some((_, Value::Node(handle))) => Some(*handle),
            _ => None,
        },
        _ => {
            // Find the node whose span is exactly the argument's.
            let span = first.value.span;
            (0..lowering.builder.nodes.len())
                .rev()
                .find(|&i| lowering.builder.spans[i] == span && matches!(lowering.builder.shapes[i], Shape::Classes(_)))
                .map(handle_at)
        }
    }
}

#[derive(Clone, Debug)]
enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    /// The per-class weights of the `floats` parameter `param` (one value: every class).
    Weights {
        values: Vec<f64>,
        param: String,
    },
    Node(Handle),
    /// Already reported.
    Error,
}

/// The value of parameter `name`.
fn param_value(name: &str, value: ParamValue) -> Value {
    match value {
        ParamValue::Int(v) => Value::Int(v),
        ParamValue::Float(v) => Value::Float(v),
        ParamValue::Bool(v) => Value::Bool(v),
        ParamValue::Floats(values) => Value::Weights { values, param: name.to_string() },
    }
}

/// The metric term being lowered inside a loss: its name and curve pieces.
#[derive(Clone)]
struct TermScope {
    name: String,
    pieces: usize,
}

struct Lowering<'p> {
    program: &'p Program,
    builder: Builder,
    diagnostics: Vec<(SourceId, Diagnostic)>,
    min_classes: usize,
    source: SourceId,
    /// The predictions of each metric term of a loss, with the term's name and call span.
    term_predictions: Vec<(Predictions, String, Span)>,
    /// Whether each metric term of a loss is per image, with the term's name and call span.
    term_per_image: Vec<(bool, String, Span)>,
}

/// The predictions a definition's options ask for, with parameter values known: `None` when
/// it sets no `sigmoid` option; otherwise the mode, or the diagnostic for a threshold outside
/// `(0, 1)` given by a parameter.
fn option_predictions(
    definition: &ast::Definition,
    env: &[(String, Value)],
) -> Result<Option<Predictions>, Diagnostic> {
    let lookup = |value: &OptionValue| -> Option<Value> {
        match value {
            OptionValue::Literal(Literal::Bool(b)) => Some(Value::Bool(*b)),
            OptionValue::Literal(Literal::Float(v)) => Some(Value::Float(*v)),
            OptionValue::Literal(Literal::Int(v)) => Some(Value::Float(*v as f64)),
            OptionValue::Name(name) => env.iter().rev().find(|(n, _)| n == &name.name).map(|(_, v)| v.clone()),
        }
    };
    let option = |key: &str| definition.options.iter().find(|o| o.key.name == key);
    let Some(sigmoid) = option("sigmoid") else { return Ok(None) };
    if !matches!(lookup(&sigmoid.value), Some(Value::Bool(true))) {
        return Ok(Some(Predictions::Softmax));
    }
    let threshold = match option("threshold") {
        None => 0.5,
        Some(setting) => match lookup(&setting.value) {
            Some(Value::Float(t)) if t > 0.0 && t < 1.0 => t,
            Some(Value::Float(t)) => {
                return Err(Diagnostic::error(
                    "E0310",
                    format!("the sigmoid threshold must be strictly between 0 and 1, but it is {t}"),
                    setting.value_span,
                    "from this parameter",
                )
                .with_help(format!(
                    "set it with `--set {}=0.5`, for example",
                    grammar::format::format_option_value(&setting.value)
                )))
            }
            _ => 0.5,
        },
    };
    Ok(Some(Predictions::Sigmoid { threshold }))
}

/// How a disagreement between a loss's terms on a whole-definition setting is worded:
/// "metric term `a` {by_term}, but term `b` {by_term}" (or "this loss {by_loss}").
struct Agreement<'a, T> {
    code: &'static str,
    by_term: &'a dyn Fn(T) -> String,
    by_loss: &'a dyn Fn(T) -> String,
    label: &'a dyn Fn(T) -> String,
    help: &'static str,
}

/// Whether a definition's options ask for a per-image metric (`None` when they do not say).
fn option_per_image(definition: &ast::Definition, env: &[(String, Value)]) -> Option<bool> {
    let setting = definition.options.iter().find(|o| o.key.name == "per_image")?;
    Some(match &setting.value {
        OptionValue::Literal(Literal::Bool(b)) => *b,
        OptionValue::Name(name) => {
            matches!(env.iter().rev().find(|(n, _)| n == &name.name), Some((_, Value::Bool(true))))
        }
        OptionValue::Literal(_) => false,
    })
}

impl<'p> Lowering<'p> {
    /// Whether the definition is per image: its own option, else its metric terms', which
    /// must all agree (and agree with the option); dataset-level when nothing says otherwise.
    fn per_image(&mut self, definition: &ast::Definition, env: &[(String, Value)]) -> bool {
        let own = option_per_image(definition, env);
        let terms = std::mem::take(&mut self.term_per_image);
        let describe = |per_image: bool| if per_image { "per image" } else { "over the dataset" }.to_string();
        let said = Agreement {
            code: "E0312",
            by_term: &|p| format!("is {}", describe(p)),
            by_loss: &|p| format!("is {}", describe(p)),
            label: &describe,
            help: "a loss averages its terms one way: give the metrics the same `per_image` option",
        };
        self.agree(own, terms, &said).unwrap_or(false)
    }

    /// The definition's predictions: its own options, else those of its metric terms, which
    /// must all agree (and agree with the options); softmax when nothing says otherwise.
    fn predictions(&mut self, definition: &ast::Definition, env: &[(String, Value)]) -> Predictions {
        let own = match option_predictions(definition, env) {
            Ok(own) => own,
            Err(diagnostic) => {
                self.error(diagnostic);
                return Predictions::Softmax;
            }
        };
        let terms = std::mem::take(&mut self.term_predictions);
        let said = Agreement {
            code: "E0311",
            by_term: &|p| format!("has {p} predictions"),
            by_loss: &|p| format!("declares {p} predictions"),
            label: &|p| format!("{p} predictions"),
            help: "every term of a loss reads the same logits the same way: give the metrics the same `sigmoid` and `threshold` options",
        };
        self.agree(own, terms, &said).unwrap_or(Predictions::Softmax)
    }

    /// A setting of the whole definition: its own value if it has one, else the first term's;
    /// every term must have the same, and each that differs is one diagnostic.
    fn agree<T: Copy + PartialEq>(
        &mut self,
        own: Option<T>,
        terms: Vec<(T, String, Span)>,
        said: &Agreement<'_, T>,
    ) -> Option<T> {
        let mut chosen = own.map(|value| (value, None::<(String, Span)>));
        for (term, name, span) in terms {
            match &chosen {
                None => chosen = Some((term, Some((name, span)))),
                Some((first, _)) if *first == term => {}
                Some((first, origin)) => {
                    let first_text = match origin {
                        Some((other, _)) => format!("term `{other}` {}", (said.by_term)(*first)),
                        None => format!("this loss {}", (said.by_loss)(*first)),
                    };
                    let mut diagnostic = Diagnostic::error(
                        said.code,
                        format!("metric term `{name}` {}, but {first_text}", (said.by_term)(term)),
                        span,
                        (said.label)(term),
                    )
                    .with_help(said.help);
                    if let Some((_, other_span)) = origin {
                        diagnostic = diagnostic.with_secondary(*other_span, (said.label)(*first));
                    }
                    self.error(diagnostic);
                }
            }
        }
        chosen.map(|(value, _)| value)
    }

    fn error(&mut self, diagnostic: Diagnostic) -> Value {
        self.diagnostics.push((self.source, diagnostic));
        Value::Error
    }

    /// Whether `handle` is computed from the predictions `P`.
    fn depends_on_predictions(&self, handle: Handle) -> bool {
        let mut stack = vec![handle];
        let mut visited = vec![false; self.builder.nodes.len()];
        while let Some(next) = stack.pop() {
            if std::mem::replace(&mut visited[next.index()], true) {
                continue;
            }
            let node = self.builder.node(next);
            if matches!(node, Node::Pred) {
                return true;
            }
            stack.extend(node.operands());
        }
        false
    }

    fn add(&mut self, node: Node, shape: Shape, span: Span) -> Value {
        Value::Node(self.builder.add(node, shape, span, "lower"))
    }

    /// A node for a value: compile-time numbers become constants.
    fn to_node(&mut self, value: Value, span: Span) -> Option<Handle> {
        match value {
            Value::Node(handle) => Some(handle),
            Value::Int(v) => Some(self.builder.constant(v as f64, span, "lower")),
            Value::Float(v) => Some(self.builder.constant(v, span, "lower")),
            Value::Bool(_) | Value::Weights { .. } | Value::Error => None,
        }
    }

    fn expr(&mut self, expr: &ast::Expr, env: &[(String, Value)], scope: Option<&TermScope>) -> Value {
        let span = expr.span;
        match &expr.kind {
            ExprKind::Literal(Literal::Int(v)) => Value::Int(*v),
            ExprKind::Literal(Literal::Float(v)) => Value::Float(*v),
            ExprKind::Literal(Literal::Bool(v)) => Value::Bool(*v),
            ExprKind::Paren(inner) => self.expr(inner, env, scope),
            ExprKind::Name(ident) => self.name(ident, env, scope),
            ExprKind::Unary { op, operand, .. } => {
                let value = self.expr(operand, env, scope);
                match (op, value) {
                    (_, Value::Error) => Value::Error,
                    (UnaryOp::Not, Value::Bool(b)) => Value::Bool(!b),
                    (UnaryOp::Neg, Value::Int(v)) => Value::Int(v.saturating_neg()),
                    (UnaryOp::Neg, Value::Float(v)) => Value::Float(-v),
                    (UnaryOp::Not, Value::Node(h)) => {
                        let shape = self.builder.shape(h);
                        self.add(Node::Not(h), shape, span)
                    }
                    (UnaryOp::Neg, Value::Node(h)) => {
                        let shape = self.builder.shape(h);
                        self.add(Node::Neg(h), shape, span)
                    }
                    _ => Value::Error,
                }
            }
            ExprKind::Binary { op, op_span, lhs, rhs } => {
                let left = self.expr(lhs, env, scope);
                let right = self.expr(rhs, env, scope);
                self.binary(*op, *op_span, left, right, lhs, rhs, span)
            }
            ExprKind::If { cond, then_branch, else_branch } => match self.expr(cond, env, scope) {
                Value::Bool(true) => self.expr(then_branch, env, scope),
                Value::Bool(false) => self.expr(else_branch, env, scope),
                _ => Value::Error,
            },
            ExprKind::Annotated { operand, curve } => {
                let Value::Node(input) = self.expr(operand, env, scope) else { return Value::Error };
                if !self.depends_on_predictions(input) {
                    return self.error(
                        Diagnostic::error(
                            "E0307",
                            format!("curve annotation `@{}` on an operand that does not depend on `P`", curve.name),
                            span,
                            "label-only operands stay exact and never get a curve",
                        )
                        .with_help("annotate the operand that involves the predictions, e.g. `P@tp & L`"),
                    );
                }
                let shape = self.builder.shape(input);
                let name = match curve.name.as_str() {
                    "none" => None,
                    other => Some(match scope {
                        Some(term) => format!("{}.{other}", term.name),
                        None => other.to_string(),
                    }),
                };
                self.add(Node::CurveTag { input, name }, shape, span)
            }
            ExprKind::Slice { base, start, end } => {
                let base_value = self.expr(base, env, scope);
                let bound = |this: &mut Self, e: &Option<Box<ast::Expr>>| -> Result<Option<usize>, ()> {
                    match e {
                        None => Ok(None),
                        Some(e) => match this.expr(e, env, scope) {
                            Value::Int(v) if v >= 0 => Ok(Some(v as usize)),
                            Value::Int(v) => {
                                this.error(Diagnostic::error(
                                    "E0301",
                                    format!("slice bounds cannot be negative, but this is {v}"),
                                    e.span,
                                    "negative bound",
                                ));
                                Err(())
                            }
                            _ => Err(()),
                        },
                    }
                };
                let (Ok(start_value), Ok(end_value)) = (bound(self, start), bound(self, end)) else {
                    return Value::Error;
                };
                let Value::Node(input) = base_value else { return Value::Error };
                let start_value = start_value.unwrap_or(0);
                if let Some(end_value) = end_value {
                    if end_value <= start_value {
                        return self.error(Diagnostic::error(
                            "E0302",
                            format!("this slice keeps no class: {start_value}:{end_value}"),
                            span,
                            "empty class range",
                        ));
                    }
                }
                if start_value == 0 && end_value.is_none() {
                    return Value::Node(input);
                }
                let shape = match self.builder.shape(input) {
                    Shape::ClassPixels(r) => Shape::ClassPixels(r.slice(start_value, end_value)),
                    Shape::Classes(r) => Shape::Classes(r.slice(start_value, end_value)),
                    _ => return Value::Error,
                };
                if let Shape::ClassPixels(r) | Shape::Classes(r) = shape {
                    self.min_classes = self.min_classes.max(r.end.unwrap_or(r.start + 1)).max(r.start + 1);
                }
                self.add(Node::Slice { input, start: start_value, end: end_value }, shape, span)
            }
            ExprKind::Call { callee, args } => self.call(expr, callee, args, env, scope),
        }
    }

    fn name(&mut self, ident: &ast::Ident, env: &[(String, Value)], scope: Option<&TermScope>) -> Value {
        let span = ident.span;
        match ident.name.as_str() {
            "P" => {
                let pred = self.builder.add(Node::Pred, Shape::ClassPixels(ClassRange::ALL), span, "lower");
                match scope {
                    Some(term) => self.add(
                        Node::Scope { input: pred, name: term.name.clone(), pieces: term.pieces },
                        Shape::ClassPixels(ClassRange::ALL),
                        span,
                    ),
                    None => Value::Node(pred),
                }
            }
            "L" => self.add(Node::Labels, Shape::ClassPixels(ClassRange::ALL), span),
            "V" => self.add(Node::Valid, Shape::Pixels, span),
            "ce" if !env.iter().any(|(n, _)| n == "ce") => {
                let nll = self.builder.add(Node::NllSum, Shape::Scalar, span, "lower.ce");
                let valid = self.builder.add(Node::Valid, Shape::Pixels, span, "lower.ce");
                let pixels = self.builder.add(Node::Count(valid), Shape::Scalar, span, "lower.ce");
                Value::Node(self.builder.add(
                    Node::Div { num: nll, den: pixels, guard: DivGuard::Auto },
                    Shape::Scalar,
                    span,
                    "lower.ce",
                ))
            }
            name => env.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v.clone()).unwrap_or(Value::Error),
        }
    }

    fn shape_error(&mut self, op_span: Span, what: &str, a: Shape, b: Shape, lhs: Span, rhs: Span) -> Value {
        self.error(
            Diagnostic::error(
                "E0303",
                format!("{what} covers different classes on each side"),
                op_span,
                "class ranges differ",
            )
            .with_secondary(lhs, describe_shape(a))
            .with_secondary(rhs, describe_shape(b))
            .with_help("slice both sides the same way, e.g. `x[1:]` and `y[1:]`"),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn binary(
        &mut self,
        op: BinaryOp,
        op_span: Span,
        left: Value,
        right: Value,
        lhs: &ast::Expr,
        rhs: &ast::Expr,
        span: Span,
    ) -> Value {
        // Compile-time folding.
        match (&left, &right) {
            (Value::Error, _) | (_, Value::Error) => return Value::Error,
            (Value::Bool(a), Value::Bool(b)) => {
                return Value::Bool(match op {
                    BinaryOp::And => *a && *b,
                    BinaryOp::Or => *a || *b,
                    BinaryOp::Xor | BinaryOp::Ne => a != b,
                    BinaryOp::Eq => a == b,
                    _ => return Value::Error,
                })
            }
            (Value::Int(a), Value::Int(b)) if op != BinaryOp::Div => {
                let (a, b) = (*a, *b);
                return match op {
                    BinaryOp::Add => Value::Int(a.saturating_add(b)),
                    BinaryOp::Sub => Value::Int(a.saturating_sub(b)),
                    BinaryOp::Mul => Value::Int(a.saturating_mul(b)),
                    _ => match cmp_op(op) {
                        Some(c) => Value::Bool(c.apply(a as f64, b as f64)),
                        None => Value::Error,
                    },
                };
            }
            _ => {}
        }
        if let (Some(a), Some(b)) = (compile_time_number(&left), compile_time_number(&right)) {
            return match op {
                BinaryOp::Add => Value::Float(a + b),
                BinaryOp::Sub => Value::Float(a - b),
                BinaryOp::Mul => Value::Float(a * b),
                BinaryOp::Div if b != 0.0 => Value::Float(a / b),
                BinaryOp::Div => self.error(Diagnostic::error(
                    "E0304",
                    "division by zero in a constant expression",
                    span,
                    "this divides by zero",
                )),
                _ => match cmp_op(op) {
                    Some(c) => Value::Bool(c.apply(a, b)),
                    None => Value::Error,
                },
            };
        }
        let (Some(a), Some(b)) = (self.to_node(left, lhs.span), self.to_node(right, rhs.span)) else {
            return Value::Error;
        };
        let (sa, sb) = (self.builder.shape(a), self.builder.shape(b));
        match op {
            BinaryOp::And | BinaryOp::Or | BinaryOp::Xor => {
                let shape = match (sa, sb) {
                    (Shape::Pixels, Shape::Pixels) => Shape::Pixels,
                    (Shape::ClassPixels(r), Shape::Pixels) | (Shape::Pixels, Shape::ClassPixels(r)) => {
                        Shape::ClassPixels(r)
                    }
                    (Shape::ClassPixels(r1), Shape::ClassPixels(r2)) if r1 == r2 => Shape::ClassPixels(r1),
                    (Shape::Classes(r1), Shape::Classes(r2)) if r1 == r2 => Shape::Classes(r1),
                    _ => return self.shape_error(op_span, &format!("`{}`", op.symbol()), sa, sb, lhs.span, rhs.span),
                };
                let node = match op {
                    BinaryOp::And => Node::And(a, b),
                    BinaryOp::Or => Node::Or(a, b),
                    _ => Node::Xor(a, b),
                };
                self.add(node, shape, span)
            }
            _ => {
                let shape = match (sa, sb) {
                    (Shape::Scalar, Shape::Scalar) => Shape::Scalar,
                    (Shape::Classes(r), Shape::Scalar) | (Shape::Scalar, Shape::Classes(r)) => Shape::Classes(r),
                    (Shape::Classes(r1), Shape::Classes(r2)) if r1 == r2 => Shape::Classes(r1),
                    _ => return self.shape_error(op_span, &format!("`{}`", op.symbol()), sa, sb, lhs.span, rhs.span),
                };
                let node = match op {
                    BinaryOp::Add => Node::Add(a, b),
                    BinaryOp::Sub => Node::Sub(a, b),
                    BinaryOp::Mul => Node::Mul(a, b),
                    BinaryOp::Div => Node::Div { num: a, den: b, guard: division_guard(rhs) },
                    _ => match cmp_op(op) {
                        Some(c) => Node::Compare { op: c, lhs: a, rhs: b },
                        None => return Value::Error,
                    },
                };
                self.add(node, shape, span)
            }
        }
    }

    fn call(
        &mut self,
        expr: &ast::Expr,
        callee: &ast::Ident,
        args: &[ast::Arg],
        env: &[(String, Value)],
        scope: Option<&TermScope>,
    ) -> Value {
        let span = expr.span;
        let name = callee.name.as_str();
        if !matches!(name, "count" | "mean" | "sum" | "erode" | "dilate" | "boundary" | "any" | "border") {
            return self.metric_term(callee, args, env, scope, span);
        }
        let mut positional = Vec::new();
        let mut filter = None;
        let mut weights = None;
        for arg in args {
            let value = self.expr(&arg.value, env, scope);
            if let Value::Error = value {
                return Value::Error;
            }
            match &arg.name {
                None => positional.push((value, arg.value.span)),
                Some(name) if name.name == "weights" => weights = Some((value, arg.value.span)),
                Some(_) => filter = Some((value, arg.value.span)),
            }
        }
        let Some((first, first_span)) = positional.first().cloned() else { return Value::Error };
        if name == "border" {
            let Value::Int(radius) = first else { return Value::Error };
            if !(0..=MAX_RADIUS).contains(&radius) {
                return self.error(
                    Diagnostic::error(
                        "E0305",
                        format!("`border` radius must be between 0 and {MAX_RADIUS}, but it is {radius}"),
                        first_span,
                        "radius out of range",
                    )
                    .with_note("`border(r)` is the pixels closer than r to the image border"),
                );
            }
            return self.add(Node::Border { radius: radius as u32 }, Shape::Pixels, span);
        }
        let Value::Node(input) = first else { return Value::Error };
        let shape = self.builder.shape(input);
        match name {
            "count" => {
                let out = match shape {
                    Shape::ClassPixels(r) => Shape::Classes(r),
                    _ => Shape::Scalar,
                };
                self.add(Node::Count(input), out, span)
            }
            "any" => match shape {
                Shape::ClassPixels(_) => self.add(Node::AnyClass(input), Shape::Pixels, span),
                _ => Value::Error,
            },
            "erode" | "dilate" => {
                let Some((Value::Int(radius), radius_span)) = positional.get(1).cloned() else { return Value::Error };
                if !(0..=MAX_RADIUS).contains(&radius) {
                    return self.error(
                        Diagnostic::error(
                            "E0305",
                            format!("`{name}` radius must be between 0 and {MAX_RADIUS}, but it is {radius}"),
                            radius_span,
                            "radius out of range",
                        )
                        .with_note("the window is a square of side 2·radius + 1"),
                    );
                }
                if radius == 0 {
                    return Value::Node(input);
                }
                let radius = radius as u32;
                let node = if name == "erode" { Node::Erode { input, radius } } else { Node::Dilate { input, radius } };
                self.add(node, shape, span)
            }
            "boundary" => {
                let eroded = self.builder.add(Node::Erode { input, radius: 1 }, shape, span, "lower.boundary");
                Value::Node(self.builder.add(Node::Xor(input, eroded), shape, span, "lower.boundary"))
            }
            "mean" | "sum" => {
                let Shape::Classes(range) = shape else { return Value::Error };
                let filter = match filter {
                    None => None,
                    Some((Value::Node(mask), mask_span)) => {
                        let mask_shape = self.builder.shape(mask);
                        if mask_shape != Shape::Classes(range) {
                            return self.shape_error(
                                span,
                                &format!("`{name}(..., where: ...)`"),
                                shape,
                                mask_shape,
                                first_span,
                                mask_span,
                            );
                        }
                        Some(mask)
                    }
                    Some(_) => return Value::Error,
                };
                match weights {
                    None => {
                        let node = if name == "mean" {
                            Node::Mean { value: input, filter }
                        } else {
                            Node::Sum { value: input, filter }
                        };
                        self.add(node, Shape::Scalar, span)
                    }
                    Some((weights, weights_span)) => {
                        self.weighted(name == "mean", input, range, filter, weights, weights_span, span)
                    }
                }
            }
            _ => Value::Error,
        }
    }

    /// `mean(v, where: m, weights: w)` and `sum(...)` with per-class weights, from nodes every
    /// back end has:
    /// * `sum` is `sum(w * v, where: m)`;
    /// * `mean` is `mean(w * v, where: m) / mean(w + 0 * v, where: m)`, that is
    ///   `Σ w·v / Σ w` over the selected classes. In exact mode `0 * v` is undefined exactly
    ///   where `v` is, so both means skip the same undefined classes and the weights of the
    ///   classes skipped leave the denominator too (a weighted nanmean). The division adds no
    ///   epsilon (the denominator is a mean of weights, positive unless every selected
    ///   weight is 0, which is then 0 / 0: undefined in exact mode, 0 in the surrogate).
    ///
    /// One weight (the default, or a number) weights every class alike: a plain `mean`, and a
    /// `sum` scaled by it.
    #[allow(clippy::too_many_arguments)]
    fn weighted(
        &mut self,
        is_mean: bool,
        input: Handle,
        range: ClassRange,
        filter: Option<Handle>,
        weights: Value,
        weights_span: Span,
        span: Span,
    ) -> Value {
        let (values, param) = match weights {
            Value::Weights { values, param } => (values, param),
            Value::Int(v) => (vec![v as f64], "weights".to_string()),
            Value::Float(v) => (vec![v], "weights".to_string()),
            _ => return Value::Error,
        };
        let function = if is_mean { "mean" } else { "sum" };
        if values.iter().any(|v| !v.is_finite() || *v < 0.0) || (is_mean && values.iter().all(|v| *v == 0.0)) {
            return self.error(
                Diagnostic::error(
                    "E0308",
                    format!("the weights of `{function}` must be non-negative numbers, not all zero"),
                    weights_span,
                    "invalid weights",
                )
                .with_help(format!("set them with `--set {param}=1,2,2,1`")),
            );
        }
        let weight_node = if values.len() == 1 {
            let weight = values[0];
            if is_mean || weight == 1.0 {
                let node =
                    if is_mean { Node::Mean { value: input, filter } } else { Node::Sum { value: input, filter } };
                return self.add(node, Shape::Scalar, span);
            }
            self.builder.constant(weight, weights_span, "lower.weights")
        } else {
            if let Some(end) = range.end {
                if end - range.start != values.len() {
                    return self.error(
                        Diagnostic::error(
                            "E0309",
                            format!(
                                "`{param}` gives {} weights, but `{function}` here reduces over {} classes ({range})",
                                values.len(),
                                end - range.start
                            ),
                            weights_span,
                            "wrong number of weights",
                        )
                        .with_help("give one weight per class of the reduction"),
                    );
                }
            }
            let node = Node::Weights { values: values.iter().map(|v| Float::new(*v)).collect(), range, param };
            self.builder.add(node, Shape::Classes(range), weights_span, "lower.weights")
        };
        let shape = Shape::Classes(range);
        let weighted = self.builder.add(Node::Mul(weight_node, input), shape, span, "lower.weights");
        if !is_mean {
            return self.add(Node::Sum { value: weighted, filter }, Shape::Scalar, span);
        }
        let zero = self.builder.constant(0.0, span, "lower.weights");
        let zeroed = self.builder.add(Node::Mul(zero, input), shape, span, "lower.weights");
        let selected = self.builder.add(Node::Add(weight_node, zeroed), shape, span, "lower.weights");
        let num = self.builder.add(Node::Mean { value: weighted, filter }, Shape::Scalar, span, "lower.weights");
        let den = self.builder.add(Node::Mean { value: selected, filter }, Shape::Scalar, span, "lower.weights");
        self.add(Node::Div { num, den, guard: DivGuard::Explicit }, Shape::Scalar, span)
    }

    fn metric_term(
        &mut self,
        callee: &ast::Ident,
        args: &[ast::Arg],
        env: &[(String, Value)],
        scope: Option<&TermScope>,
        span: Span,
    ) -> Value {
        let Some((definition, source)) = self.program.find_metric_with_source(&callee.name) else {
            return Value::Error;
        };
        let mut term_env: Vec<(String, Value)> = definition
            .params
            .iter()
            .map(|p| (p.name.name.clone(), param_value(&p.name.name, literal_value(p.ty, &p.default))))
            .collect();
        let mut label_parts = Vec::new();
        for arg in args {
            let value = self.expr(&arg.value, env, scope);
            let Some(arg_name) = &arg.name else { return Value::Error };
            let param = definition.params.iter().find(|p| p.name.name == arg_name.name);
            let value = match (param.map(|p| p.ty), value) {
                (Some(ParamType::Float), Value::Int(v)) => Value::Float(v as f64),
                (Some(ParamType::Floats), Value::Int(v)) => {
                    Value::Weights { values: vec![v as f64], param: arg_name.name.clone() }
                }
                (Some(ParamType::Floats), Value::Float(v)) => {
                    Value::Weights { values: vec![v], param: arg_name.name.clone() }
                }
                (_, Value::Node(_)) => {
                    return self.error(Diagnostic::error(
                        "E0306",
                        "metric parameters must be known at compile time",
                        arg.value.span,
                        "this is a run-time value",
                    ))
                }
                (_, value) => value,
            };
            label_parts.push(format!("{}={}", arg_name.name, value_text(&value)));
            if let Some(slot) = term_env.iter_mut().find(|(n, _)| n == &arg_name.name) {
                slot.1 = value;
            }
        }
        let term_name = callee.name.clone();
        match option_predictions(definition, &term_env) {
            Ok(predictions) => {
                self.term_predictions.push((predictions.unwrap_or(Predictions::Softmax), term_name.clone(), span))
            }
            Err(diagnostic) => {
                let outer = self.source;
                self.source = source;
                self.error(diagnostic);
                self.source = outer;
            }
        }
        self.term_per_image.push((option_per_image(definition, &term_env).unwrap_or(false), term_name.clone(), span));
        let term = TermScope { name: term_name.clone(), pieces: definition_pieces(definition) };
        let outer_source = self.source;
        self.source = source;
        for binding in &definition.lets {
            let value = self.expr(&binding.value, &term_env, Some(&term));
            term_env.push((binding.name.name.clone(), value));
        }
        let value = self.expr(&definition.body, &term_env, Some(&term));
        let node = self.to_node(value, definition.body.span);
        self.source = outer_source;
        let Some(value) = node else { return Value::Error };
        let label =
            if label_parts.is_empty() { term_name } else { format!("{}({})", term_name, label_parts.join(", ")) };
        self.add(Node::Term { value, name: label }, Shape::Scalar, span)
    }
}

fn value_text(value: &Value) -> String {
    match value {
        Value::Int(v) => v.to_string(),
        Value::Float(v) => format!("{v:?}"),
        Value::Bool(v) => v.to_string(),
        Value::Weights { values, .. } => values.iter().map(|v| format!("{v:?}")).collect::<Vec<_>>().join(","),
        Value::Node(_) | Value::Error => "?".into(),
    }
}

fn compile_time_number(value: &Value) -> Option<f64> {
    match value {
        Value::Int(v) => Some(*v as f64),
        Value::Float(v) => Some(*v),
        _ => None,
    }
}

fn cmp_op(op: BinaryOp) -> Option<CmpOp> {
    Some(match op {
        BinaryOp::Lt => CmpOp::Lt,
        BinaryOp::Le => CmpOp::Le,
        BinaryOp::Gt => CmpOp::Gt,
        BinaryOp::Ge => CmpOp::Ge,
        BinaryOp::Eq => CmpOp::Eq,
        BinaryOp::Ne => CmpOp::Ne,
        _ => return None,
    })
}

/// A denominator written as `d + literal` (or `literal + d`) with a positive literal carries
/// its own epsilon. `d + 0` does not: it gets the automatic one, so that it cannot be 0/0.
fn division_guard(denominator: &ast::Expr) -> DivGuard {
    let mut expr = denominator;
    while let ExprKind::Paren(inner) = &expr.kind {
        expr = inner;
    }
    let is_literal = |e: &ast::Expr| match e.kind {
        ExprKind::Literal(Literal::Float(value)) => value > 0.0,
        ExprKind::Literal(Literal::Int(value)) => value > 0,
        _ => false,
    };
    match &expr.kind {
        ExprKind::Binary { op: BinaryOp::Add, lhs, rhs, .. } if is_literal(rhs) || is_literal(lhs) => {
            DivGuard::Explicit
        }
        _ => DivGuard::Auto,
    }
}

fn describe_shape(shape: Shape) -> String {
    match shape {
        Shape::Pixels => "a pixel set".into(),
        Shape::ClassPixels(r) => format!("per-class pixel sets of classes [{r}]"),
        Shape::Classes(r) => format!("per-class numbers of classes [{r}]"),
        Shape::Scalar => "a number".into(),
    }
}
