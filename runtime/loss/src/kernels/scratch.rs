//! Reusing large scratch planes across calls.
//!
//! Guarantee: [`take_buffer`] returns a buffer of the asked length whose contents are
//! unspecified (with poisoning on, NaN), so every user writes what it later reads; tests
//! turn poisoning on to prove it.

/// Scratch planes given back by earlier calls. The sweeps' large buffers (softmax, curve
/// stores) come from here, so that repeated calls reuse memory whose pages are already
/// mapped instead of faulting in fresh zeroed pages every time (a visible share of a call).
static SCRATCH: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());

/// Most buffers kept for reuse (several models may train in threads at once).
const SCRATCH_KEPT: usize = 16;

/// When on, reused scratch is filled with NaN first, so that a test reading a value the
/// current call did not write fails instead of finding the previous call's data.
static POISON_SCRATCH: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Testing aid: fill reused scratch planes with NaN (see [`take_buffer`]).
pub fn set_scratch_poisoning(on: bool) {
    POISON_SCRATCH.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether tests asked for poisoned scratch (see [`set_scratch_poisoning`]); per-thread
/// scratch of the kernels starts as NaN then too.
pub(crate) fn poisoning() -> bool {
    POISON_SCRATCH.load(std::sync::atomic::Ordering::Relaxed)
}

/// A buffer of `len` values with unspecified contents (every user overwrites all of it).
pub(crate) fn take_buffer(len: usize) -> Vec<f32> {
    let reused = {
        let mut pool = SCRATCH.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // The smallest buffer that is large enough.
        let best = (0..pool.len()).filter(|&i| pool[i].capacity() >= len).min_by_key(|&i| pool[i].capacity());
        best.map(|i| pool.swap_remove(i))
    };
    let mut buffer = reused.unwrap_or_default();
    buffer.resize(len, 0.0);
    buffer.truncate(len);
    if poisoning() {
        buffer.fill(f32::NAN);
    }
    buffer
}

pub(crate) fn give_back(buffer: Vec<f32>) {
    let mut pool = SCRATCH.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    pool.push(buffer);
    if pool.len() > SCRATCH_KEPT {
        // Keep the largest.
        let smallest = (0..pool.len()).min_by_key(|&i| pool[i].capacity()).expect("not empty");
        pool.swap_remove(smallest);
    }
}
