//! Hand-written CPU kernels for the shapes where the general GEMM is slow.

pub mod amx;
pub mod attention;
pub mod elementwise;
pub mod encoder_attention;
pub mod matvec;
pub mod qmatvec;
pub(crate) mod sgemm;

/// Whether the CPU has AVX2, FMA and F16C, which the x86 kernels are compiled for (checked at run
/// time).
pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU has AVX-512F (and the AVX2 set), for the 16-lane element-wise and quantization
/// kernels, and `EDGEVLM_NO_AVX512` is not set (checked at run time, once).
pub(crate) fn has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            has_avx2()
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::env::var_os("EDGEVLM_NO_AVX512").is_none()
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU has AVX-512 with VNNI and 256-bit forms (`avx512vl`), for the `vpdpwssd` kernels
/// (checked at run time, once).
pub(crate) fn has_avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            has_avx512f()
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}
