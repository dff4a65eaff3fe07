//! Hand-written CPU kernels for the shapes where the general GEMM is slow.

pub mod attention;
pub mod matvec;
pub mod qmatvec;
