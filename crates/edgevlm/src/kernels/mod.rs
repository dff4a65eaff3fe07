//! Hand-written CPU kernels for the shapes where the general GEMM is slow.

pub mod amx;
pub mod attention;
pub mod elementwise;
pub mod encoder_attention;
pub mod fixed16;
pub mod matvec;
pub mod qmatvec;
// Its kernels are x86 only; elsewhere the row-tiled layers run the exact fallback of `qmatvec`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
mod qtiles;
pub(crate) mod sgemm;

/// Horizontal reductions of 8-lane vectors, shared by the AVX2 kernels (inlined into their
/// `target_feature` functions; the CPU has AVX).
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// The sum of the 8 lanes of `v`.
    #[inline(always)]
    pub(crate) unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// The largest of the 8 lanes of `v` (as `f32::max` folds them: a NaN lane is passed over).
    #[inline(always)]
    pub(crate) unsafe fn hmax256(v: __m256) -> f32 {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), v);
        let mut max = f32::NEG_INFINITY;
        for x in lanes {
            max = max.max(x);
        }
        max
    }
}

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

/// Whether the CPU has AVX-VNNI (`vpdpwssd` / `vpdpbusd` on 256-bit registers, VEX-encoded: Intel
/// Alder Lake and later, AMD Zen 5) and the AVX2 set, and `EDGEVLM_NO_AVXVNNI` is not set (checked at run time, once).
pub(crate) fn has_avx_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            has_avx2()
                && std::arch::is_x86_feature_detected!("avxvnni")
                && std::env::var_os("EDGEVLM_NO_AVXVNNI").is_none()
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
