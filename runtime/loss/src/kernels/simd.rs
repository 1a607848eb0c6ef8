//! Compiling a kernel twice, for the baseline target and for AVX2 + FMA, and choosing at run
//! time: the binary stays portable and uses the wide instructions where the CPU has them.

/// Defines a function whose `body` is compiled for AVX2 and FMA when the CPU has them (the
/// kernels it calls are `inline(always)`, so they are compiled into each version), else for the
/// baseline target. The binary stays portable; the fast version is chosen at run time.
macro_rules! with_best_simd {
    ($vis:vis $name:ident, ($($arg:ident: $ty:ty),*), $body:block) => {
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $body
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports the features `wide` was compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            $body
        }
    };
}

pub(crate) use with_best_simd;
