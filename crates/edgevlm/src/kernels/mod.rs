//! Hand-written CPU kernels for the shapes where the general GEMM is slow.

pub mod attention;
pub mod elementwise;
pub mod encoder_attention;
pub mod matvec;
pub mod qmatvec;

/// Whether the CPU has AVX2 and FMA, which the x86 kernels are compiled for (checked at run time).
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
