//! One thread's f32 matrix product (the `gemm` crate's kernels) on operands read in place, with
//! their strides named.

/// A matrix read in place: element `(i, j)` at `ptr + i·row + j·col`.
#[derive(Clone, Copy)]
pub(crate) struct Strided {
    pub ptr: *const f32,
    pub row: isize,
    pub col: isize,
}

impl Strided {
    /// Row-major rows `stride` values apart.
    pub fn rows(ptr: *const f32, stride: usize) -> Self {
        Self {
            ptr,
            row: stride as isize,
            col: 1,
        }
    }

    /// The transpose of row-major rows `stride` values apart (column `j` is row `j` there).
    pub fn columns(ptr: *const f32, stride: usize) -> Self {
        Self {
            ptr,
            row: 1,
            col: stride as isize,
        }
    }
}

/// `dst (m × n, rows dst_stride apart) = scale · lhs (m × k) · rhs (k × n)`, on the calling thread.
///
/// # Safety
/// Every element the shapes and strides address lies inside a live allocation, and `dst` overlaps
/// neither operand.
pub(crate) unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_stride: usize,
    lhs: Strided,
    rhs: Strided,
    scale: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_stride as isize,
        false,
        lhs.ptr,
        lhs.col,
        lhs.row,
        rhs.ptr,
        rhs.col,
        rhs.row,
        0.0,
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}
