//! The abstract syntax tree of a `.metric` file.
//!
//! Every node carries the [`Span`] of the source text it was parsed from, so later stages
//! (the checker, lowering, ONNX emission) can point diagnostics at the exact characters.
//! The tree is plain data: it knows nothing of tensors or types.

use serde::Serialize;

/// A half-open byte range `start..end` into the source text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Default)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Span {
        Span { start, end }
    }

    /// The smallest span covering both `self` and `other`.
    pub fn to(self, other: Span) -> Span {
        Span { start: self.start.min(other.start), end: self.end.max(other.end) }
    }
}

/// An identifier together with where it was written.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// A whole source file: `use` imports, then metric and loss definitions in source order.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct File {
    pub items: Vec<Item>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Item {
    /// `use "other.metric";` makes the metrics of another file callable from a loss.
    Use(UseItem),
    /// `metric name(params) with pieces = 1 { let ...; expr }`
    Metric(Definition),
    /// `loss name(params) { let ...; expr }` combines metric terms and `ce`.
    Loss(Definition),
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UseItem {
    pub path: String,
    pub path_span: Span,
    pub span: Span,
}

/// The shared shape of `metric` and `loss` definitions.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Definition {
    /// Doc comment lines (`##`) written directly above the definition, without the markers.
    pub doc: Vec<String>,
    pub name: Ident,
    pub params: Vec<Param>,
    /// `with key = literal, ...` options (for example `pieces = 1`).
    pub options: Vec<OptionSetting>,
    pub lets: Vec<Let>,
    pub body: Expr,
    pub span: Span,
}

/// `name: type = default` in a definition's parameter list.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Param {
    pub name: Ident,
    pub ty: ParamType,
    pub ty_span: Span,
    pub default: Literal,
    pub default_span: Span,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ParamType {
    Int,
    Float,
    Bool,
    /// Per-class weights for `mean` and `sum` (`weights:`): one non-negative number per
    /// class, or one number for every class. The default is written as one number.
    Floats,
}

/// `key = value` after `with`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OptionSetting {
    pub key: Ident,
    pub value: OptionValue,
    pub value_span: Span,
    pub span: Span,
}

/// An option's value: a literal, or the name of one of the definition's parameters (so that
/// `--set` can change it, as in `with sigmoid = true, threshold = t`).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum OptionValue {
    Literal(Literal),
    Name(Ident),
}

impl OptionValue {
    /// The literal, when the value is one.
    pub fn literal(&self) -> Option<&Literal> {
        match self {
            OptionValue::Literal(literal) => Some(literal),
            OptionValue::Name(_) => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Literal {
    Int(i64),
    Float(f64),
    Bool(bool),
}

/// `let name = expr;`
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Let {
    pub name: Ident,
    pub value: Expr,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum ExprKind {
    /// A numeric or boolean literal.
    Literal(Literal),
    /// A reference to a built-in set (`P`, `L`, `V`), a parameter, a `let` binding or `ce`.
    Name(Ident),
    /// `-x` or `!x`.
    Unary { op: UnaryOp, op_span: Span, operand: Box<Expr> },
    /// `a op b` for set, arithmetic and comparison operators.
    Binary { op: BinaryOp, op_span: Span, lhs: Box<Expr>, rhs: Box<Expr> },
    /// `f(a, b, key: c)`: built-in functions and metric terms in loss files.
    Call { callee: Ident, args: Vec<Arg> },
    /// `x[start:end]` keeps classes `start..end` (either bound may be omitted).
    Slice { base: Box<Expr>, start: Option<Box<Expr>>, end: Option<Box<Expr>> },
    /// `if cond then a else b`, decided when parameters are known.
    If { cond: Box<Expr>, then_branch: Box<Expr>, else_branch: Box<Expr> },
    /// `x @ name`: the curve a logical operator applies to this operand is called `name`
    /// (operands annotated with the same name share one curve; `@none` applies no curve).
    Annotated { operand: Box<Expr>, curve: Ident },
    /// `(x)`, kept so that formatting round-trips and spans stay faithful.
    Paren(Box<Expr>),
}

/// A call argument, positional (`name == None`) or named (`where: cond`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Arg {
    pub name: Option<Ident>,
    pub value: Expr,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum UnaryOp {
    /// `-x`
    Neg,
    /// `!x`
    Not,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum BinaryOp {
    And,
    Or,
    Xor,
    Add,
    Sub,
    Mul,
    Div,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl BinaryOp {
    /// The operator as written in source.
    pub fn symbol(self) -> &'static str {
        match self {
            BinaryOp::And => "&",
            BinaryOp::Or => "|",
            BinaryOp::Xor => "^",
            BinaryOp::Add => "+",
            BinaryOp::Sub => "-",
            BinaryOp::Mul => "*",
            BinaryOp::Div => "/",
            BinaryOp::Lt => "<",
            BinaryOp::Le => "<=",
            BinaryOp::Gt => ">",
            BinaryOp::Ge => ">=",
            BinaryOp::Eq => "==",
            BinaryOp::Ne => "!=",
        }
    }

    /// Binding strength; a larger number binds tighter. Follows Rust's table: arithmetic
    /// binds tighter than the set operators, which bind tighter than comparisons.
    pub fn precedence(self) -> u8 {
        match self {
            BinaryOp::Eq | BinaryOp::Ne | BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge => 1,
            BinaryOp::Or => 2,
            BinaryOp::Xor => 3,
            BinaryOp::And => 4,
            BinaryOp::Add | BinaryOp::Sub => 5,
            BinaryOp::Mul | BinaryOp::Div => 6,
        }
    }
}

impl UnaryOp {
    pub fn symbol(self) -> &'static str {
        match self {
            UnaryOp::Neg => "-",
            UnaryOp::Not => "!",
        }
    }
}
