//! Running the CPU kernels' parts on libtorch's own OpenMP threads.
//!
//! libtorch parallelizes its CPU operations with OpenMP; after each parallel region its
//! workers spin for a while, waiting for the next one. Threads of our own, started right after
//! a libtorch operation, would compete with those spinning workers for the cores (on 2 cores
//! the fused mIoU loss measured 5.8× cross-entropy that way, against 3.9× with sleeping
//! workers), and making the workers sleep (`OMP_WAIT_POLICY=PASSIVE`) slows every libtorch
//! operation of the process, the user's network included. So the kernels run on the same
//! OpenMP team instead: [`run_parts`] hands its parts to `GOMP_parallel`, the entry point of
//! the OpenMP runtime libtorch loaded (libgomp, or Intel's libiomp5, which provides it too),
//! found at run time. The spinning workers then pick our work up at once, and nothing else
//! changes for libtorch.
//!
//! Where no OpenMP runtime is loaded (a libtorch built without OpenMP) the parts run on scoped
//! threads of our own; with one thread they run inline. Parts are claimed from a shared
//! counter, so uneven parts balance; a panic in a part is carried back to the caller.

use std::ffi::c_void;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// `void GOMP_parallel(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags)`.
type GompParallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, u32, u32);

/// The loaded OpenMP runtime's `GOMP_parallel`, if there is one.
fn gomp_parallel() -> Option<GompParallel> {
    static ENTRY: OnceLock<Option<GompParallel>> = OnceLock::new();
    *ENTRY.get_or_init(|| {
        if std::env::var_os("LOSSCC_OWN_THREADS").is_some() {
            return None;
        }
        // SAFETY: dlsym with a NUL-terminated name; the symbol, when present, has the
        // signature above (the libgomp ABI, also exported by libiomp5).
        let symbol = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"GOMP_parallel".as_ptr()) };
        (!symbol.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, GompParallel>(symbol) })
    })
}

/// How the kernels' parts are run, for `losscc bench` and the docs.
pub fn threading() -> &'static str {
    if gomp_parallel().is_some() {
        "libtorch's OpenMP team"
    } else {
        "own threads"
    }
}

/// What every thread of a parallel region reads: the parts' closure and the next part.
struct Region<'a> {
    run: &'a (dyn Fn(usize) + Sync),
    parts: usize,
    next: AtomicUsize,
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

impl Region<'_> {
    fn work(&self) {
        loop {
            let part = self.next.fetch_add(1, Ordering::Relaxed);
            if part >= self.parts {
                return;
            }
            if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| (self.run)(part))) {
                self.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(payload);
                // The other parts are claimed and skipped.
                self.next.store(self.parts, Ordering::Relaxed);
            }
        }
    }
}

extern "C" fn region_entry(data: *mut c_void) {
    // SAFETY: `data` is the `Region` that `for_each_part` keeps alive until GOMP_parallel
    // returns, which is after every thread of the team has left this function.
    let region = unsafe { &*(data as *const Region) };
    region.work();
}

/// Run `run(0..parts)` on up to `threads` threads, returning when every part is done.
pub(crate) fn for_each_part(parts: usize, threads: usize, run: &(dyn Fn(usize) + Sync)) {
    let threads = threads.min(parts);
    if threads <= 1 {
        (0..parts).for_each(run);
        return;
    }
    let region = Region { run, parts, next: AtomicUsize::new(0), panic: Mutex::new(None) };
    match gomp_parallel() {
        // SAFETY: `region` outlives the call; `region_entry` only reads it through `&`.
        Some(parallel) => unsafe {
            parallel(region_entry, &region as *const Region as *mut c_void, threads as u32, 0);
        },
        None => std::thread::scope(|scope| {
            for _ in 1..threads {
                scope.spawn(|| region.work());
            }
            region.work();
        }),
    }
    if let Some(payload) = region.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
        panic::resume_unwind(payload);
    }
}

/// `run` applied to every part, in parallel on the kernels' threads; the results in order.
pub(crate) fn run_parts<T: Send, R: Send>(parts: Vec<T>, run: impl Fn(T) -> R + Sync) -> Vec<R> {
    let count = parts.len();
    let inputs: Vec<Mutex<Option<T>>> = parts.into_iter().map(|p| Mutex::new(Some(p))).collect();
    let outputs: Vec<Mutex<Option<R>>> = (0..count).map(|_| Mutex::new(None)).collect();
    for_each_part(count, super::threads(), &|index| {
        let part = inputs[index].lock().unwrap_or_else(|e| e.into_inner()).take().expect("each part runs once");
        let result = run(part);
        *outputs[index].lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
    });
    outputs
        .into_iter()
        .map(|slot| slot.into_inner().unwrap_or_else(|e| e.into_inner()).expect("every part ran"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_in_order_of_results() {
        let parts: Vec<usize> = (0..1000).collect();
        let results = run_parts(parts, |p| p * p);
        assert_eq!(results, (0..1000).map(|p| p * p).collect::<Vec<_>>());
        let hits: Vec<AtomicUsize> = (0..257).map(|_| AtomicUsize::new(0)).collect();
        for_each_part(hits.len(), 4, &|i| {
            hits[i].fetch_add(1, Ordering::Relaxed);
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn a_panic_in_a_part_reaches_the_caller() {
        let caught = panic::catch_unwind(|| {
            for_each_part(64, 4, &|i| {
                if i == 17 {
                    panic!("part 17 failed");
                }
            })
        });
        let payload = caught.expect_err("the panic is carried back");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"part 17 failed"));
    }

    #[test]
    fn libtorchs_openmp_runtime_is_found() {
        // libtorch (the PyPI build) loads libgomp; the kernels run on its team.
        let _ = tch::get_num_threads();
        assert_eq!(threading(), "libtorch's OpenMP team");
    }
}
