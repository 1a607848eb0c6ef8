//! Reusing large scratch buffers across calls.
//!
//! Guarantee: [`take`] returns a buffer of the asked length whose contents are unspecified
//! (with poisoning on, a poison value: NaN for floats), so every user writes what it later
//! reads; tests turn poisoning on to prove it.

use std::sync::Mutex;

/// Buffers given back by earlier calls, per element type. The kernels' large buffers
/// (frames, winners, label planes) come from here, so that repeated calls reuse memory
/// whose pages are already mapped instead of faulting in fresh zeroed pages every time (a
/// visible share of a call), and nothing is zeroed that is about to be overwritten.
pub(crate) trait Pooled: Copy + Default + Send + 'static {
    /// The pool of this element type.
    fn pool() -> &'static Mutex<Vec<Vec<Self>>>;
    /// What poisoned buffers hold.
    const POISON: Self;
}

impl Pooled for f32 {
    fn pool() -> &'static Mutex<Vec<Vec<f32>>> {
        static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());
        &POOL
    }
    const POISON: f32 = f32::NAN;
}

impl Pooled for u32 {
    fn pool() -> &'static Mutex<Vec<Vec<u32>>> {
        static POOL: Mutex<Vec<Vec<u32>>> = Mutex::new(Vec::new());
        &POOL
    }
    const POISON: u32 = u32::MAX;
}

impl Pooled for i8 {
    fn pool() -> &'static Mutex<Vec<Vec<i8>>> {
        static POOL: Mutex<Vec<Vec<i8>>> = Mutex::new(Vec::new());
        &POOL
    }
    const POISON: i8 = i8::MIN;
}

/// Most buffers kept for reuse, per element type (several models may train in threads at
/// once).
const SCRATCH_KEPT: usize = 16;

/// When on, reused scratch is filled with a poison value first, so that a test reading a
/// value the current call did not write fails instead of finding the previous call's data.
static POISON_SCRATCH: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Testing aid: fill reused scratch with a poison value (see [`take`]).
pub fn set_scratch_poisoning(on: bool) {
    POISON_SCRATCH.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether tests asked for poisoned scratch (see [`set_scratch_poisoning`]); per-thread
/// scratch of the kernels starts as NaN then too.
pub(crate) fn poisoning() -> bool {
    POISON_SCRATCH.load(std::sync::atomic::Ordering::Relaxed)
}

/// A buffer of `len` values with unspecified contents (every user overwrites what it reads).
pub(crate) fn take<T: Pooled>(len: usize) -> Vec<T> {
    let reused = {
        let mut pool = T::pool().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // The smallest buffer that is large enough.
        let best = (0..pool.len()).filter(|&i| pool[i].capacity() >= len).min_by_key(|&i| pool[i].capacity());
        best.map(|i| pool.swap_remove(i))
    };
    let mut buffer = reused.unwrap_or_default();
    buffer.resize(len, T::default());
    buffer.truncate(len);
    if poisoning() {
        buffer.fill(T::POISON);
    }
    buffer
}

/// Keep `buffer` for a later [`take`].
pub(crate) fn give_back<T: Pooled>(buffer: Vec<T>) {
    let mut pool = T::pool().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    pool.push(buffer);
    if pool.len() > SCRATCH_KEPT {
        // Keep the largest.
        let smallest = (0..pool.len()).min_by_key(|&i| pool[i].capacity()).expect("not empty");
        pool.swap_remove(smallest);
    }
}
