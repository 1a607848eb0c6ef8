//! Facts about a module that several back ends need, each computed by one function here.
//!
//! * [`prediction_dependent`]: which nodes depend on the predictions (`P`, its relaxation
//!   `softmax`, or the cross-entropy sum, directly or through an operand). Relaxation uses it
//!   to decide where curves go; back ends use it to send gradients only where they flow and
//!   to evaluate label-only parts once. [`ExactModule`](crate::ExactModule) and
//!   [`RelaxedModule`](crate::RelaxedModule) compute it once, when they are made.
//! * [`needed`]: which nodes must be computed to obtain some wanted nodes, given that some
//!   nodes' values are supplied from elsewhere.

use crate::ir::{Handle, Module, Node};

/// Whether each node depends on the predictions.
pub fn prediction_dependent(module: &Module) -> Vec<bool> {
    let mut on_pred = vec![false; module.len()];
    for handle in module.handles() {
        let node = module.node(handle);
        on_pred[handle.index()] = matches!(node, Node::Pred | Node::Softmax | Node::NllSum)
            || node.operands().iter().any(|operand| on_pred[operand.index()]);
    }
    on_pred
}

/// Which nodes must be computed to get `wanted`: the wanted nodes and, transitively, the
/// operands of every needed node that is not `supplied` (a supplied node's value comes from
/// elsewhere, so its operands are not needed on its account).
pub fn needed(module: &Module, wanted: &[Handle], supplied: impl Fn(Handle) -> bool) -> Vec<bool> {
    let mut need = vec![false; module.len()];
    for handle in wanted {
        need[handle.index()] = true;
    }
    for handle in module.handles().rev() {
        if need[handle.index()] && !supplied(handle) {
            for operand in module.node(handle).operands() {
                need[operand.index()] = true;
            }
        }
    }
    need
}
