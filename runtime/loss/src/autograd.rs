//! The one C++ part of the library (`cpp/linearized.cpp`, compiled by the build script
//! against libtorch's headers): a libtorch autograd function through which a gradient the
//! fused kernel computed itself enters autograd. tch cannot define autograd functions.
//!
//! Guarantee: the returned loss has exactly the given value, and its backward gives
//! `upstream · gradient` with respect to the input; for the usual upstream of 1 the
//! gradient tensor itself, with no copy (autograd can then keep it as the leaf's `.grad`).

use crate::error::LossError;
use std::ffi::{c_char, CStr};
use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    fn losscc_linearized(
        input: *const C_tensor,
        value: *const C_tensor,
        gradient: *const C_tensor,
        error: *mut *mut c_char,
    ) -> *mut C_tensor;
}

/// A scalar with the value of `value` (a scalar, no gradient) whose gradient with respect to
/// `input` is `gradient` (of `input`'s shape, no gradient).
pub(crate) fn linearized(input: &Tensor, value: &Tensor, gradient: &Tensor) -> Result<Tensor, LossError> {
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: the three pointers are live tensors for the duration of the call; the function
    // returns a new tensor that the returned `Tensor` owns (tch frees it with `delete`), or
    // null with a `strdup`ed message that is freed here.
    let tensor = unsafe { losscc_linearized(input.as_ptr(), value.as_ptr(), gradient.as_ptr(), &mut error) };
    if tensor.is_null() {
        let message = if error.is_null() {
            "libtorch refused the fused loss's autograd function".to_string()
        } else {
            // SAFETY: a NUL-terminated string from `strdup`, freed once here.
            let text = unsafe { CStr::from_ptr(error) }.to_string_lossy().into_owned();
            unsafe { libc::free(error.cast()) };
            text
        };
        return Err(LossError::Backend(message));
    }
    // SAFETY: a fresh heap tensor from the C++ side, owned from here on.
    Ok(unsafe { Tensor::from_ptr(tensor) })
}
