//! The type checker: gives every expression a [`Kind`] and reports every error in a
//! definition (not just the first), each pointing at its source span.
//!
//! Kinds separate what is known at compile time (parameters: `Int`, `Float`, `Bool`) from
//! run-time values: pixel sets, per-class pixel sets, per-class numbers, class masks and
//! single numbers. Class ranges (`X[1:]`) are checked later, in lowering, when parameter
//! values are known.

use crate::program::{Program, SourceId};
use grammar::ast::{self, BinaryOp, ExprKind, Item, Literal, OptionValue, ParamType, Span, UnaryOp};
use grammar::{suggest, Diagnostic};
use std::collections::HashMap;
use std::fmt;

/// The kind of a value in the metric language.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Compile-time integer (parameters, literals, slice bounds, radii).
    Int,
    /// Compile-time real number.
    Float,
    /// Compile-time boolean.
    Bool,
    /// One pixel set per image (`V`, `any(X)`).
    PixelSet,
    /// One pixel set per class (`P`, `L`).
    ClassSet,
    /// One number per class (`count(P & L)`).
    ClassVec,
    /// One yes/no per class (`count(L) > 0`), for `where:` filters.
    ClassMask,
    /// One run-time number (`mean(...)`, `count(V)`, a metric term).
    Number,
    /// Per-class weights: a `floats` parameter, only for `weights:` of `mean` and `sum`.
    Weights,
    /// Already reported; suppresses follow-up errors.
    Error,
}

impl Kind {
    fn is_set(self) -> bool {
        matches!(self, Kind::PixelSet | Kind::ClassSet)
    }
    fn is_compile_time_number(self) -> bool {
        matches!(self, Kind::Int | Kind::Float)
    }
    fn is_number(self) -> bool {
        matches!(self, Kind::Int | Kind::Float | Kind::ClassVec | Kind::Number)
    }
    pub(crate) fn of_param(ty: ParamType) -> Kind {
        match ty {
            ParamType::Int => Kind::Int,
            ParamType::Float => Kind::Float,
            ParamType::Bool => Kind::Bool,
            ParamType::Floats => Kind::Weights,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Kind::Int => "an integer",
            Kind::Float => "a compile-time number",
            Kind::Bool => "a boolean",
            Kind::PixelSet => "a pixel set",
            Kind::ClassSet => "a per-class pixel set",
            Kind::ClassVec => "a per-class number",
            Kind::ClassMask => "a per-class mask",
            Kind::Number => "a number",
            Kind::Weights => "per-class weights (a `floats` parameter)",
            Kind::Error => "an erroneous value",
        };
        f.write_str(text)
    }
}

/// The built-in names and functions, for "did you mean" hints.
pub const BUILTIN_SETS: [&str; 3] = ["P", "L", "V"];
pub const BUILTIN_FUNCTIONS: [&str; 8] = ["count", "mean", "sum", "erode", "dilate", "boundary", "any", "border"];

/// Errors of one source file.
#[derive(Debug)]
pub struct FileDiagnostics {
    pub source: SourceId,
    pub diagnostics: Vec<Diagnostic>,
}

/// Check every definition of every loaded file. Returns the diagnostics of every file with
/// errors (empty when the program is well-typed).
pub fn check_program(program: &Program) -> Vec<FileDiagnostics> {
    let mut out = Vec::new();
    for (source_id, file) in program.files() {
        let mut checker = Checker { program, diagnostics: Vec::new() };
        let mut seen: HashMap<&str, Span> = HashMap::new();
        for item in &file.ast.items {
            let (definition, is_loss) = match item {
                Item::Metric(definition) => (definition, false),
                Item::Loss(definition) => (definition, true),
                Item::Use(_) => continue,
            };
            if let Some(previous) = seen.insert(&definition.name.name, definition.name.span) {
                checker.diagnostics.push(
                    Diagnostic::error(
                        "E0201",
                        format!("`{}` is defined twice", definition.name.name),
                        definition.name.span,
                        "second definition",
                    )
                    .with_secondary(previous, "first defined here"),
                );
            }
            checker.definition(definition, is_loss);
        }
        if !checker.diagnostics.is_empty() {
            out.push(FileDiagnostics { source: source_id, diagnostics: checker.diagnostics });
        }
    }
    out
}

struct Checker<'p> {
    program: &'p Program,
    diagnostics: Vec<Diagnostic>,
}

struct Scope<'a> {
    names: Vec<(&'a str, Kind)>,
    is_loss: bool,
}

impl<'a> Scope<'a> {
    fn lookup(&self, name: &str) -> Option<Kind> {
        self.names.iter().rev().find(|(n, _)| *n == name).map(|(_, k)| *k)
    }
}

impl<'p> Checker<'p> {
    fn error(&mut self, code: &'static str, message: impl Into<String>, span: Span, label: impl Into<String>) {
        self.diagnostics.push(Diagnostic::error(code, message.into(), span, label.into()));
    }

    fn definition(&mut self, definition: &ast::Definition, is_loss: bool) {
        let mut scope = Scope { names: Vec::new(), is_loss };
        for param in &definition.params {
            let kind = Kind::of_param(param.ty);
            let default_ok = matches!(
                (param.ty, &param.default),
                (ParamType::Int, Literal::Int(_))
                    | (ParamType::Float, Literal::Float(_) | Literal::Int(_))
                    | (ParamType::Bool, Literal::Bool(_))
                    | (ParamType::Floats, Literal::Float(_) | Literal::Int(_))
            );
            if !default_ok {
                self.error(
                    "E0202",
                    format!("the default of `{}` does not match its type", param.name.name),
                    param.default_span,
                    format!("expected {}", kind),
                );
            }
            if is_reserved(&param.name.name) {
                self.error(
                    "E0203",
                    format!("`{}` is a built-in name and cannot be a parameter", param.name.name),
                    param.name.span,
                    "rename this parameter",
                );
            }
            if scope.lookup(&param.name.name).is_some() {
                self.error(
                    "E0201",
                    format!("parameter `{}` is declared twice", param.name.name),
                    param.name.span,
                    "duplicate",
                );
            }
            scope.names.push((&param.name.name, kind));
        }
        self.options(definition, &scope);
        for binding in &definition.lets {
            let kind = self.expr(&binding.value, &scope);
            if is_reserved(&binding.name.name) {
                self.error(
                    "E0203",
                    format!("`{}` is a built-in name and cannot be rebound", binding.name.name),
                    binding.name.span,
                    "choose another name",
                );
            } else if scope.lookup(&binding.name.name).is_some() {
                self.error(
                    "E0201",
                    format!("`{}` is already defined in this scope", binding.name.name),
                    binding.name.span,
                    "names cannot be rebound; choose another name",
                );
            }
            scope.names.push((&binding.name.name, kind));
        }
        let kind = self.expr(&definition.body, &scope);
        let result_ok = matches!(kind, Kind::Number | Kind::Int | Kind::Float | Kind::Error);
        if !result_ok {
            let what = if is_loss { "a loss" } else { "a metric" };
            let mut diagnostic = Diagnostic::error(
                "E0206",
                format!("{what} must evaluate to a single number, but this is {kind}"),
                definition.body.span,
                format!("this is {kind}"),
            );
            if kind == Kind::ClassVec {
                diagnostic = diagnostic.with_help("reduce over classes with `mean(...)` or `sum(...)`");
            } else if kind.is_set() {
                diagnostic = diagnostic.with_help("count pixels with `count(...)`, then reduce over classes");
            }
            self.diagnostics.push(diagnostic);
        }
    }

    /// The `with` options: `pieces = N`, `sigmoid = true|false`, `threshold = t`. A value may
    /// name a parameter of the right type (`threshold = t` with `t: float`); a parameter's
    /// value is checked when it is known, in lowering.
    fn options(&mut self, definition: &ast::Definition, scope: &Scope) {
        let parameter = |value: &OptionValue| match value {
            OptionValue::Name(name) => Some(scope.lookup(&name.name)),
            OptionValue::Literal(_) => None,
        };
        let mut sigmoid_set = false;
        let mut threshold_span = None;
        let mut seen: HashMap<&str, Span> = HashMap::new();
        for option in &definition.options {
            if let Some(first) = seen.insert(&option.key.name, option.key.span) {
                self.diagnostics.push(
                    Diagnostic::error(
                        "E0251",
                        format!("option `{}` is set twice", option.key.name),
                        option.key.span,
                        "second setting",
                    )
                    .with_secondary(first, "first set here"),
                );
            }
            let value = &option.value;
            match option.key.name.as_str() {
                "pieces" => {
                    if !matches!(value, OptionValue::Literal(Literal::Int(n)) if (1..=16).contains(n)) {
                        self.error(
                            "E0204",
                            "`pieces` must be an integer from 1 to 16",
                            option.value_span,
                            "the number of Bézier pieces per curve",
                        )
                    }
                }
                "sigmoid" => match (value, parameter(value)) {
                    (OptionValue::Literal(Literal::Bool(on)), _) => sigmoid_set |= *on,
                    (_, Some(Some(Kind::Bool))) => sigmoid_set = true,
                    _ => self.error(
                        "E0207",
                        "`sigmoid` must be `true` or `false`, or the name of a `bool` parameter",
                        option.value_span,
                        "sigmoid per channel (true) or softmax over classes (false)",
                    ),
                },
                "per_image" => match (value, parameter(value)) {
                    (OptionValue::Literal(Literal::Bool(_)), _) | (_, Some(Some(Kind::Bool))) => {}
                    _ => self.error(
                        "E0250",
                        "`per_image` must be `true` or `false`, or the name of a `bool` parameter",
                        option.value_span,
                        "the metric of each image, averaged over images (true) or of the whole dataset (false)",
                    ),
                },
                "threshold" => {
                    threshold_span = Some(option.key.span);
                    let ok = match (value, parameter(value)) {
                        (OptionValue::Literal(Literal::Float(t)), _) => *t > 0.0 && *t < 1.0,
                        (_, Some(Some(Kind::Float))) => true,
                        _ => false,
                    };
                    if !ok {
                        self.error(
                            "E0208",
                            "`threshold` must be a number strictly between 0 and 1, or the name of a `float` parameter",
                            option.value_span,
                            "exact mode predicts a channel where its sigmoid exceeds this",
                        )
                    }
                }
                other => {
                    let mut diagnostic = Diagnostic::error(
                        "E0205",
                        format!("unknown option `{other}`"),
                        option.key.span,
                        "not an option",
                    );
                    let help = "the options are `pieces = N` (Bézier pieces per curve), `sigmoid = true` (a sigmoid per channel instead of a softmax over classes), `threshold = 0.5` (where exact sigmoid predictions start) and `per_image = true` (the metric of each image, averaged over images)";
                    diagnostic = match suggest(other, ["pieces", "sigmoid", "threshold", "per_image"]) {
                        Some(name) => diagnostic.with_help(format!("did you mean `{name}`? {help}")),
                        None => diagnostic.with_help(help),
                    };
                    self.diagnostics.push(diagnostic);
                }
            }
        }
        if let (Some(span), false) = (threshold_span, sigmoid_set) {
            self.error(
                "E0209",
                "`threshold` applies only to sigmoid predictions",
                span,
                "add `sigmoid = true`, or remove the threshold (softmax predictions take the argmax)",
            );
        }
    }

    fn expr(&mut self, expr: &ast::Expr, scope: &Scope) -> Kind {
        match &expr.kind {
            ExprKind::Literal(Literal::Int(_)) => Kind::Int,
            ExprKind::Literal(Literal::Float(_)) => Kind::Float,
            ExprKind::Literal(Literal::Bool(_)) => Kind::Bool,
            ExprKind::Paren(inner) => self.expr(inner, scope),
            ExprKind::Name(ident) => self.name(ident, scope),
            ExprKind::Unary { op, operand, op_span } => {
                let kind = self.expr(operand, scope);
                match (op, kind) {
                    (_, Kind::Error) => Kind::Error,
                    (UnaryOp::Not, k) if k.is_set() || k == Kind::Bool || k == Kind::ClassMask => k,
                    (UnaryOp::Neg, k) if k.is_number() => k,
                    (op, k) => {
                        let help = if *op == UnaryOp::Not && k.is_number() {
                            Some("for the complement of a number, write `1 - x`")
                        } else {
                            None
                        };
                        let mut diagnostic = Diagnostic::error(
                            "E0210",
                            format!("`{}` cannot be applied to {k}", op.symbol()),
                            *op_span,
                            format!("operand is {k}"),
                        )
                        .with_secondary(operand.span, "this operand");
                        if let Some(help) = help {
                            diagnostic = diagnostic.with_help(help);
                        }
                        self.diagnostics.push(diagnostic);
                        Kind::Error
                    }
                }
            }
            ExprKind::Binary { op, op_span, lhs, rhs } => {
                let left = self.expr(lhs, scope);
                let right = self.expr(rhs, scope);
                self.binary(*op, *op_span, left, right, lhs, rhs)
            }
            ExprKind::Slice { base, start, end } => {
                let kind = self.expr(base, scope);
                for bound in [start, end].into_iter().flatten() {
                    let bound_kind = self.expr(bound, scope);
                    if !matches!(bound_kind, Kind::Int | Kind::Error) {
                        self.error(
                            "E0211",
                            format!("slice bounds must be integers known at compile time, but this is {bound_kind}"),
                            bound.span,
                            "not an integer",
                        );
                    }
                }
                match kind {
                    Kind::ClassSet | Kind::ClassVec | Kind::ClassMask | Kind::Error => kind,
                    other => {
                        self.error(
                            "E0212",
                            format!("only per-class values can be sliced, but this is {other}"),
                            base.span,
                            "slicing selects classes",
                        );
                        Kind::Error
                    }
                }
            }
            ExprKind::If { cond, then_branch, else_branch } => {
                let cond_kind = self.expr(cond, scope);
                if !matches!(cond_kind, Kind::Bool | Kind::Error) {
                    self.diagnostics.push(
                        Diagnostic::error(
                            "E0213",
                            format!(
                                "an `if` condition must be a boolean known at compile time, but this is {cond_kind}"
                            ),
                            cond.span,
                            "not a compile-time boolean",
                        )
                        .with_help(
                            "conditions choose between formulas using parameters, e.g. `if drop_bg then X[1:] else X`",
                        ),
                    );
                }
                let a = self.expr(then_branch, scope);
                let b = self.expr(else_branch, scope);
                match (a, b) {
                    (Kind::Error, _) | (_, Kind::Error) => Kind::Error,
                    (a, b) if a == b => a,
                    (Kind::Int, Kind::Float) | (Kind::Float, Kind::Int) => Kind::Float,
                    (a, b) => {
                        self.diagnostics.push(
                            Diagnostic::error(
                                "E0214",
                                format!("the branches of this `if` differ: {a} and {b}"),
                                expr.span,
                                "both branches must have the same kind",
                            )
                            .with_secondary(then_branch.span, format!("this is {a}"))
                            .with_secondary(else_branch.span, format!("this is {b}")),
                        );
                        Kind::Error
                    }
                }
            }
            ExprKind::Annotated { operand, curve } => {
                let kind = self.expr(operand, scope);
                if !matches!(kind, Kind::PixelSet | Kind::ClassSet | Kind::Error) {
                    self.error(
                        "E0215",
                        format!("curve annotations `@{}` apply to pixel sets, but this is {kind}", curve.name),
                        expr.span,
                        "not a set",
                    );
                }
                kind
            }
            ExprKind::Call { callee, args } => self.call(expr, callee, args, scope),
        }
    }

    fn name(&mut self, ident: &ast::Ident, scope: &Scope) -> Kind {
        match ident.name.as_str() {
            "P" | "L" => return Kind::ClassSet,
            "V" => return Kind::PixelSet,
            "ce" if scope.is_loss => return Kind::Number,
            _ => {}
        }
        if let Some(kind) = scope.lookup(&ident.name) {
            return kind;
        }
        let mut candidates: Vec<&str> = BUILTIN_SETS.to_vec();
        candidates.extend(scope.names.iter().map(|(n, _)| *n));
        if scope.is_loss {
            candidates.push("ce");
        }
        let mut diagnostic =
            Diagnostic::error("E0220", format!("unknown name `{}`", ident.name), ident.span, "not defined");
        if ident.name == "ce" {
            diagnostic = diagnostic.with_help("`ce` (cross-entropy) is available in `loss` definitions");
        } else if let Some(best) = suggest(&ident.name, candidates.iter().copied()) {
            diagnostic = diagnostic.with_help(format!("did you mean `{best}`?"));
        } else if BUILTIN_FUNCTIONS.contains(&ident.name.as_str()) {
            diagnostic =
                diagnostic.with_help(format!("`{}` is a function: call it as `{}(...)`", ident.name, ident.name));
        } else {
            diagnostic =
                diagnostic.with_note("built-in sets are `P` (predictions), `L` (labels) and `V` (valid pixels)");
        }
        self.diagnostics.push(diagnostic);
        Kind::Error
    }

    fn binary(
        &mut self,
        op: BinaryOp,
        op_span: Span,
        left: Kind,
        right: Kind,
        lhs: &ast::Expr,
        rhs: &ast::Expr,
    ) -> Kind {
        if left == Kind::Error || right == Kind::Error {
            return Kind::Error;
        }
        let result = match op {
            BinaryOp::And | BinaryOp::Or | BinaryOp::Xor => match (left, right) {
                (a, b) if a.is_set() && b.is_set() => {
                    Some(if a == Kind::ClassSet || b == Kind::ClassSet { Kind::ClassSet } else { Kind::PixelSet })
                }
                (Kind::Bool, Kind::Bool) => Some(Kind::Bool),
                (Kind::ClassMask, Kind::ClassMask) if op == BinaryOp::And || op == BinaryOp::Or => {
                    Some(Kind::ClassMask)
                }
                _ => None,
            },
            BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Div => match (left, right) {
                (Kind::Int, Kind::Int) if op != BinaryOp::Div => Some(Kind::Int),
                (a, b) if a.is_compile_time_number() && b.is_compile_time_number() => Some(Kind::Float),
                (a, b) if a.is_number() && b.is_number() => {
                    Some(if a == Kind::ClassVec || b == Kind::ClassVec { Kind::ClassVec } else { Kind::Number })
                }
                _ => None,
            },
            BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge | BinaryOp::Eq | BinaryOp::Ne => {
                match (left, right) {
                    (a, b) if a.is_compile_time_number() && b.is_compile_time_number() => Some(Kind::Bool),
                    (Kind::Bool, Kind::Bool) if matches!(op, BinaryOp::Eq | BinaryOp::Ne) => Some(Kind::Bool),
                    (a, b) if a.is_number() && b.is_number() && (a == Kind::ClassVec || b == Kind::ClassVec) => {
                        Some(Kind::ClassMask)
                    }
                    _ => None,
                }
            }
        };
        match result {
            Some(kind) => kind,
            None => {
                let mut diagnostic = Diagnostic::error(
                    "E0230",
                    format!("`{}` cannot combine {left} and {right}", op.symbol()),
                    op_span,
                    "incompatible operands",
                )
                .with_secondary(lhs.span, format!("this is {left}"))
                .with_secondary(rhs.span, format!("this is {right}"));
                let is_set_op = matches!(op, BinaryOp::And | BinaryOp::Or | BinaryOp::Xor);
                if is_set_op && (left.is_number() || right.is_number()) {
                    diagnostic =
                        diagnostic.with_help("set operators combine pixel sets; count pixels after combining sets");
                } else if !is_set_op && (left.is_set() || right.is_set()) {
                    diagnostic = diagnostic.with_help("arithmetic works on numbers: wrap pixel sets in `count(...)`");
                } else if left == Kind::Weights || right == Kind::Weights {
                    diagnostic = diagnostic
                        .with_help("per-class weights are used by reductions: `mean(values, weights: w)`, `sum(values, weights: w)`");
                } else if left == Kind::Number && right == Kind::Number {
                    diagnostic = diagnostic
                        .with_note("comparisons are only defined per class (for `where:` filters) or on parameters");
                }
                self.diagnostics.push(diagnostic);
                Kind::Error
            }
        }
    }

    fn call(&mut self, expr: &ast::Expr, callee: &ast::Ident, args: &[ast::Arg], scope: &Scope) -> Kind {
        let kinds: Vec<Kind> = args.iter().map(|arg| self.expr(&arg.value, scope)).collect();
        let name = callee.name.as_str();
        let signature: Option<(usize, &[&str])> = match name {
            "count" | "boundary" | "any" | "border" => Some((1, &[])),
            "mean" | "sum" => Some((1, &["where", "weights"])),
            "erode" | "dilate" => Some((2, &[])),
            _ => None,
        };
        let Some((positional, named)) = signature else {
            return self.metric_call(expr, callee, args, &kinds, scope);
        };
        // Arity and named arguments.
        let mut ok = true;
        let positional_args: Vec<usize> = (0..args.len()).filter(|&i| args[i].name.is_none()).collect();
        if positional_args.len() != positional {
            ok = false;
            let plural = if positional == 1 { "" } else { "s" };
            let usage = match name {
                "erode" | "dilate" => format!("`{name}(set, radius)`"),
                "mean" | "sum" => format!("`{name}(values)` or `{name}(values, where: mask, weights: w)`"),
                "border" => "`border(radius)`".to_string(),
                _ => format!("`{name}(set)`"),
            };
            self.diagnostics.push(
                Diagnostic::error(
                    "E0240",
                    format!(
                        "`{name}` takes {positional} argument{plural}, but {} {} given",
                        positional_args.len(),
                        if positional_args.len() == 1 { "was" } else { "were" }
                    ),
                    expr.span,
                    "wrong number of arguments",
                )
                .with_help(format!("use {usage}")),
            );
        }
        for arg in args {
            if let Some(arg_name) = &arg.name {
                if !named.contains(&arg_name.name.as_str()) {
                    ok = false;
                    let mut diagnostic = Diagnostic::error(
                        "E0241",
                        format!("`{name}` has no argument named `{}`", arg_name.name),
                        arg_name.span,
                        "unknown argument",
                    );
                    if let Some(best) = suggest(&arg_name.name, named.iter().copied()) {
                        diagnostic = diagnostic.with_help(format!("did you mean `{best}:`?"));
                    }
                    self.diagnostics.push(diagnostic);
                }
            }
        }
        if !ok || kinds.contains(&Kind::Error) {
            return Kind::Error;
        }
        let first = kinds[positional_args[0]];
        let first_span = args[positional_args[0]].value.span;
        let expect = |checker: &mut Checker, good: bool, what: &str, span: Span, got: Kind| {
            if !good {
                checker.error(
                    "E0242",
                    format!("`{name}` expects {what}, but this is {got}"),
                    span,
                    format!("expected {what}"),
                );
            }
            good
        };
        match name {
            "count" => {
                if expect(self, first.is_set(), "a pixel set", first_span, first) {
                    if first == Kind::ClassSet {
                        Kind::ClassVec
                    } else {
                        Kind::Number
                    }
                } else {
                    Kind::Error
                }
            }
            "boundary" => {
                if expect(self, first.is_set(), "a pixel set", first_span, first) {
                    first
                } else {
                    Kind::Error
                }
            }
            "border" => {
                if expect(self, first == Kind::Int, "an integer radius", first_span, first) {
                    Kind::PixelSet
                } else {
                    Kind::Error
                }
            }
            "any" => {
                if expect(self, first == Kind::ClassSet, "a per-class pixel set", first_span, first) {
                    Kind::PixelSet
                } else {
                    Kind::Error
                }
            }
            "erode" | "dilate" => {
                let radius = kinds[positional_args[1]];
                let radius_span = args[positional_args[1]].value.span;
                let good_set = expect(self, first.is_set(), "a pixel set", first_span, first);
                let good_radius = expect(self, radius == Kind::Int, "an integer radius", radius_span, radius);
                if good_set && good_radius {
                    first
                } else {
                    Kind::Error
                }
            }
            "mean" | "sum" => {
                let good = first == Kind::ClassVec;
                if !good {
                    let mut diagnostic = Diagnostic::error(
                        "E0242",
                        format!("`{name}` reduces over classes and expects a per-class number, but this is {first}"),
                        first_span,
                        "expected a per-class number",
                    );
                    if first.is_set() {
                        diagnostic = diagnostic.with_help("count the pixels first: `count(...)`");
                    }
                    self.diagnostics.push(diagnostic);
                }
                let mut filter_ok = true;
                for (arg, kind) in args.iter().zip(&kinds) {
                    let is_weights = arg.name.as_ref().is_some_and(|n| n.name == "weights");
                    if is_weights && !(*kind == Kind::Weights || kind.is_compile_time_number()) {
                        filter_ok = false;
                        self.diagnostics.push(
                            Diagnostic::error(
                                "E0249",
                                format!("`weights:` expects per-class weights (a `floats` parameter) or one number, but this is {kind}"),
                                arg.value.span,
                                "expected a `floats` parameter",
                            )
                            .with_help("declare `weights: floats = 1` and set it with `--set weights=1,2,2,1`"),
                        );
                    } else if arg.name.is_some() && !is_weights && *kind != Kind::ClassMask {
                        filter_ok = false;
                        self.diagnostics.push(
                            Diagnostic::error(
                                "E0243",
                                format!("`where:` expects a per-class mask, but this is {kind}"),
                                arg.value.span,
                                "expected a per-class mask",
                            )
                            .with_help("compare per-class numbers, e.g. `where: count(L) > 0`"),
                        );
                    }
                }
                if good && filter_ok {
                    Kind::Number
                } else {
                    Kind::Error
                }
            }
            _ => Kind::Error,
        }
    }

    /// A call of a metric defined in this file or a `use`d one: allowed in losses only.
    fn metric_call(
        &mut self,
        expr: &ast::Expr,
        callee: &ast::Ident,
        args: &[ast::Arg],
        kinds: &[Kind],
        scope: &Scope,
    ) -> Kind {
        let target = self.program.find_metric(&callee.name);
        let Some(target) = target else {
            let mut candidates: Vec<String> = BUILTIN_FUNCTIONS.iter().map(|s| s.to_string()).collect();
            candidates.extend(self.program.metric_names());
            let mut diagnostic =
                Diagnostic::error("E0244", format!("unknown function `{}`", callee.name), callee.span, "not defined");
            if let Some(best) = suggest(&callee.name, candidates.iter().map(String::as_str)) {
                diagnostic = diagnostic.with_help(format!("did you mean `{best}`?"));
            } else {
                diagnostic = diagnostic.with_note(format!("built-in functions: {}", BUILTIN_FUNCTIONS.join(", ")));
            }
            self.diagnostics.push(diagnostic);
            return Kind::Error;
        };
        if !scope.is_loss {
            self.diagnostics.push(
                Diagnostic::error(
                    "E0245",
                    format!("metric `{}` can only be used as a term of a `loss`", callee.name),
                    expr.span,
                    "metric term outside a loss",
                )
                .with_help("write `loss name { 1 - metric() }` to combine metrics"),
            );
            return Kind::Error;
        }
        for (arg, kind) in args.iter().zip(kinds) {
            let Some(arg_name) = &arg.name else {
                self.error("E0246", "metric terms take named parameters only", arg.span, "write `name: value`");
                continue;
            };
            match target.params.iter().find(|p| p.name.name == arg_name.name) {
                None => {
                    let mut diagnostic = Diagnostic::error(
                        "E0247",
                        format!("metric `{}` has no parameter `{}`", callee.name, arg_name.name),
                        arg_name.span,
                        "unknown parameter",
                    );
                    if let Some(best) = suggest(&arg_name.name, target.params.iter().map(|p| p.name.name.as_str())) {
                        diagnostic = diagnostic.with_help(format!("did you mean `{best}`?"));
                    }
                    self.diagnostics.push(diagnostic);
                }
                Some(param) => {
                    let expected = Kind::of_param(param.ty);
                    let fits = *kind == expected
                        || (expected == Kind::Float && *kind == Kind::Int)
                        || (expected == Kind::Weights && kind.is_compile_time_number())
                        || *kind == Kind::Error;
                    if !fits {
                        self.error(
                            "E0248",
                            format!("parameter `{}` expects {expected}, but this is {kind}", arg_name.name),
                            arg.value.span,
                            format!("expected {expected}"),
                        );
                    }
                }
            }
        }
        Kind::Number
    }
}

fn is_reserved(name: &str) -> bool {
    BUILTIN_SETS.contains(&name) || BUILTIN_FUNCTIONS.contains(&name) || name == "ce"
}
