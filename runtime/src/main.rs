//! The `losscc` binary: process set-up, then [`losscc_cli::run`].
//!
//! * SIGPIPE gets its default action, so `losscc eval … | head` stops quietly;
//! * the command runs on a thread with a large stack (the checker and lowering recurse over
//!   deeply nested metric files);
//! * libtorch's threading is left as libtorch sets it (no `OMP_WAIT_POLICY`): the loss's
//!   kernels run on libtorch's own OpenMP team (`losscc_loss` `kernels::parallel`);
//! * a panic does not end in a backtrace: a libtorch failure (out of memory, say) becomes one
//!   sentence saying what to do instead, anything else a request to report the input.

use std::process::ExitCode;
use std::sync::Mutex;

/// The message of the last panic, kept by the hook for [`explain_panic`].
static PANIC_MESSAGE: Mutex<Option<String>> = Mutex::new(None);

/// What to tell the user about a panic with this message.
fn explain_panic(message: &str) -> String {
    let lower = message.to_lowercase();
    let from_libtorch = lower.contains("torch(") || lower.contains("libtorch") || lower.contains("c10");
    let first_line = message.lines().find(|line| !line.trim().is_empty()).unwrap_or(message).trim();
    if lower.contains("out of memory") || lower.contains("can't allocate memory") || lower.contains("alloc_cpu") {
        format!(
            "libtorch ran out of memory ({first_line}); use smaller inputs (a smaller --shape, --batch, --crop or \
             --image-size) or a machine with more memory."
        )
    } else if from_libtorch {
        format!(
            "libtorch failed: {first_line}; check the inputs and options of the command (shapes, device), or run on the \
             CPU if a GPU was asked for."
        )
    } else {
        format!("losscc stopped unexpectedly ({first_line}); please report this with the input that caused it.")
    }
}

fn main() -> ExitCode {
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        *PANIC_MESSAGE.lock().unwrap_or_else(|p| p.into_inner()) = Some(message);
    }));
    let child = std::thread::Builder::new().stack_size(256 << 20).spawn(losscc_cli::run);
    match child.map(|handle| handle.join()) {
        Ok(Ok(code)) => code,
        _ => {
            let message = PANIC_MESSAGE.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_default();
            eprintln!("error: {}", explain_panic(&message));
            ExitCode::from(1)
        }
    }
}
