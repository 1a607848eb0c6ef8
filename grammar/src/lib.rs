//! The front end of losscc: the `.metric` language's syntax tree, parser, formatter and
//! diagnostics.
//!
//! # The language
//!
//! A `.metric` file defines segmentation metrics and losses over three built-in sets of
//! per-class pixel masks: `P` (predicted), `L` (labelled) and `V` (valid pixels).
//!
//! ```text
//! ## Mean intersection over union.              <- a doc comment, kept in the tree
//! metric miou with pieces = 1 {
//!     let inter = count(P & L & V);             # `let` bindings end with `;`
//!     let union = count((P | L) & V);
//!     mean(inter / union, where: count(L) > 0)  # the final expression is the value
//! }
//! ```
//!
//! and a loss, in another file, built from it:
//!
//! ```text
//! use "miou.metric";                            # makes `miou()` callable here
//! loss miou_ce(w: float = 0.1) { (1 - miou()) + w * ce }
//! ```
//!
//! * Items: `use "path";`, `metric NAME [(params)] [with opt = literal, ...] { ... }` and
//!   the same for `loss`. Parameters are `name: int|float|bool = literal`.
//! * Expressions, loosest first: `if c then a else b`; comparisons `== != < <= > >=`
//!   (which do not chain); `|`; `^`; `&`; `+ -`; `* /`; prefix `-` and `!`; postfix
//!   slices `x[start:end]` and curve annotations `x@name`; then literals, names, calls
//!   `f(a, key: b)` and parentheses. Binary operators are left-associative. An `if` may
//!   also stand as an operand (`1 + if c then a else b`); its `else` branch extends to
//!   the end of the enclosing expression.
//! * Comments run from `#` to the end of the line. `##` lines are documentation: all
//!   those after the previous definition (imports may stand between) attach to the next.
//! * Keywords: `metric loss let use if then else with true false`.
//!
//! # Map
//!
//! * [`ast`]: the tree, with a byte [`ast::Span`] on every node.
//! * [`parser`]: [`parse`] and [`parser::parse_bytes`]; all syntax errors of a file at once.
//! * [`diagnostic`]: [`Diagnostic`] as data and [`render`], the one place they become text.
//! * [`format`](mod@format): [`format_file`], the canonical layout; round-trips through [`parse`].
//! * [`dump`]: [`dump::dump_file`], the tree as text for `--emit ast` and snapshots.
//!
//! Architecture invariant: this crate knows syntax only. It does not know which names
//! exist, what calls mean or what types expressions have; that is the checker's job.

pub mod ast;
pub mod diagnostic;
pub mod dump;
pub mod format;
pub mod parser;

pub use diagnostic::{line_col, render, suggest, Diagnostic, Label, Severity};
pub use format::format_file;
pub use parser::parse;
