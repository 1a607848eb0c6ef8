//! CPU kernels shared by the fused kernel, the label planes and the reference path's CPU
//! cases: square-window pooling and its winners ([`pool`]), compiling loops for the best
//! SIMD level ([`simd`]), splitting work over threads (here, run on libtorch's OpenMP team
//! by [`parallel`]), and reusing scratch planes ([`scratch`]). Kernels work on slices; the callers own the tensors and check their
//! dtype, device and layout before they hand slices over.

pub(crate) mod parallel;
pub(crate) mod pool;
pub(crate) mod scratch;
pub(crate) mod simd;

/// Threads for the CPU kernels: libtorch's intra-op thread count, so that a caller who
/// limits libtorch (as the search does, one thread per model) limits these too.
pub(crate) fn threads() -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (tch::get_num_threads().max(1) as usize).min(cores).min(16)
}

/// Elements per worker when `len` values, in `[H, W]` planes of `plane` values, are split
/// over [`threads`] by whole planes.
pub(crate) fn plane_chunk(len: usize, plane: usize) -> usize {
    let planes = len / plane.max(1);
    planes.div_ceil(threads().min(planes).max(1)).max(1) * plane.max(1)
}

/// Zero a buffer, split over the cores.
pub(crate) fn zero(buffer: &mut [f32]) {
    let chunk = buffer.len().div_ceil(threads()).max(1 << 16);
    parallel::run_parts(buffer.chunks_mut(chunk).collect(), |part| part.fill(0.0));
}
