//! Dense matrix multiply, `C = alpha·A·B + beta·C`, on strided views: the public API, the
//! views, and the choice of the fastest path this CPU has.
//!
//! The layout follows memchr's `src/arch/`. `portable` holds the one blocked algorithm
//! (packing, cache blocking, edge tiles) generic over its register-blocked micro-kernel, and
//! a portable micro-kernel written as plain loops; it is compiled on every target, both as
//! the fallback and so that tests can force it. Each architecture module supplies only
//! intrinsic micro-kernels sized to its registers and runs the shared driver around them:
//!
//! - `x86_64` (AVX2 and FMA) recompiles the driver with those features enabled and is picked
//!   at runtime, since most x86_64 targets do not assume them;
//! - `wasm32` (`simd128`) is picked at compile time, since wasm has no runtime feature
//!   detection (an engine without `simd128` rejects the whole module), so it exists only in
//!   builds with `-C target-feature=+simd128`; with `+relaxed-simd` too, its steps are
//!   `relaxed_madd` (an FMA where the engine has one) instead of a multiply and an add;
//! - `aarch64` (NEON) is picked at compile time too, since NEON is part of the AArch64
//!   baseline; only a target that turns it off (`aarch64-unknown-none-softfloat`) falls back.
//!
//! `parallel` (feature `rayon`) shares packed panels of B between threads; `reference` is
//! the naive loop every path is tested against.
//!
//! Adding a path means one more cfg'd module beside these that implements
//! `portable::MicroKernel` for a tile suited to its registers and calls
//! `portable::gemm_blocked` and `portable::block` with it, plus one more `Path` variant.

use core::fmt;

#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
mod aarch64;
#[cfg(feature = "rayon")]
mod parallel;
mod portable;
pub mod reference;

/// Products with fewer multiply-adds than this (`m·n·k`) run on the calling thread even
/// in [`par_gemm`]: threads would cost more than they save.
#[cfg(feature = "rayon")]
pub use parallel::MIN_PARALLEL_WORK;
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod wasm32;
#[cfg(target_arch = "x86_64")]
mod x86_64;

#[cfg(feature = "rayon")]
use portable::Tile;

/// Element types the kernels compute in.
pub trait Element:
    Copy
    + Send
    + Sync
    + PartialEq
    + fmt::Debug
    + Default
    + 'static
    + core::ops::Add<Output = Self>
    + core::ops::Mul<Output = Self>
{
    /// Additive identity; packed panels are padded with it.
    const ZERO: Self;
    /// Multiplicative identity.
    const ONE: Self;
    /// Nearest value of this type, rounding as `as` does.
    fn from_f64(v: f64) -> Self;
    /// Widening conversion; exact for `f32` and `f64`.
    fn to_f64(self) -> f64;
    /// `self * a + b`; for `f32` and `f64` one fused operation with a single rounding.
    ///
    /// The kernels' inner loops do not call it: the x86_64 and aarch64 paths issue FMA
    /// instructions themselves, and the portable path multiplies and adds separately, because
    /// where there is no FMA instruction (wasm32, baseline x86_64) a fused `mul_add` is a slow
    /// software routine.
    fn mul_add(self, a: Self, b: Self) -> Self;
}

macro_rules! impl_element_for_float {
    ($t:ty) => {
        impl Element for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                <$t>::mul_add(self, a, b)
            }
        }
    };
}
impl_element_for_float!(f32);
impl_element_for_float!(f64);

/// Why a view or a multiplication was rejected.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ShapeError {
    /// A row-major buffer whose length is not `rows * cols`.
    #[error(
        "a {rows}x{cols} row-major matrix needs {} elements but the buffer holds {len}",
        product(.rows, .cols)
    )]
    BufferLength {
        /// Rows asked for.
        rows: usize,
        /// Columns asked for.
        cols: usize,
        /// Length of the buffer given.
        len: usize,
    },
    /// A strided view whose last element lies past the end of its buffer.
    #[error(
        "a {rows}x{cols} view with strides ({row_stride}, {col_stride}) reaches past the end \
         of its {len}-element buffer"
    )]
    OutOfBounds {
        /// Rows asked for.
        rows: usize,
        /// Columns asked for.
        cols: usize,
        /// Distance between consecutive rows.
        row_stride: usize,
        /// Distance between consecutive columns.
        col_stride: usize,
        /// Length of the buffer given.
        len: usize,
    },
    /// An output view in which two elements share one slot, so writes would clobber each other.
    #[error(
        "a {rows}x{cols} output view with strides ({row_stride}, {col_stride}) maps distinct \
         elements to the same slot"
    )]
    OverlappingOutput {
        /// Rows asked for.
        rows: usize,
        /// Columns asked for.
        cols: usize,
        /// Distance between consecutive rows.
        row_stride: usize,
        /// Distance between consecutive columns.
        col_stride: usize,
    },
    /// `A.cols != B.rows`.
    #[error("A is {a_rows}x{a_cols} but B is {b_rows}x{b_cols}: inner dimensions differ")]
    InnerDimension {
        /// Rows of A.
        a_rows: usize,
        /// Columns of A.
        a_cols: usize,
        /// Rows of B.
        b_rows: usize,
        /// Columns of B.
        b_cols: usize,
    },
    /// C does not have the shape of `A·B`.
    #[error(
        "A is {a_rows}x{k} and B is {k}x{b_cols}, so C must be {a_rows}x{b_cols}, but it is {c_rows}x{c_cols}"
    )]
    OutputShape {
        /// Rows of A.
        a_rows: usize,
        /// Inner dimension.
        k: usize,
        /// Columns of B.
        b_cols: usize,
        /// Rows of C.
        c_rows: usize,
        /// Columns of C.
        c_cols: usize,
    },
}

/// Widened so the message is right even when `rows * cols` overflows `usize`.
fn product(rows: &usize, cols: &usize) -> u128 {
    *rows as u128 * *cols as u128
}

fn row_major_len(rows: usize, cols: usize, len: usize) -> Result<(), ShapeError> {
    if rows.checked_mul(cols) == Some(len) {
        Ok(())
    } else {
        Err(ShapeError::BufferLength { rows, cols, len })
    }
}

fn check_in_bounds(
    len: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
) -> Result<(), ShapeError> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let last = (rows - 1)
        .checked_mul(row_stride)
        .zip((cols - 1).checked_mul(col_stride))
        .and_then(|(r, c)| r.checked_add(c));
    match last {
        Some(last) if last < len => Ok(()),
        _ => Err(ShapeError::OutOfBounds {
            rows,
            cols,
            row_stride,
            col_stride,
            len,
        }),
    }
}

/// A sufficient (not necessary) test that no two elements share a slot: along one
/// dimension, each line of elements ends before the next begins. That admits every row- or
/// column-major layout, padded or not, which is all the grid produces. Called only once the
/// view is in bounds, so the products below cannot overflow.
fn writes_each_slot_once(rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> bool {
    if rows == 0 || cols == 0 {
        return true;
    }
    if rows == 1 || cols == 1 {
        let (len, stride) = if rows == 1 {
            (cols, col_stride)
        } else {
            (rows, row_stride)
        };
        return len == 1 || stride > 0;
    }
    (col_stride > 0 && row_stride > (cols - 1) * col_stride)
        || (row_stride > 0 && col_stride > (rows - 1) * row_stride)
}

/// A read-only strided view: element `(r, c)` is `data[r * row_stride + c * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T: Element> MatRef<'a, T> {
    /// A dense row-major matrix; `data.len()` must be `rows * cols`.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Result<Self, ShapeError> {
        row_major_len(rows, cols, data.len())?;
        Ok(Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        })
    }

    /// A strided view. Every element must lie inside `data`; strides may be zero (a
    /// broadcast) and any shape with a zero dimension is accepted whatever the buffer.
    pub fn new(
        data: &'a [T],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Result<Self, ShapeError> {
        check_in_bounds(data.len(), rows, cols, row_stride, col_stride)?;
        Ok(Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        })
    }

    /// The transpose, as a view of the same buffer.
    #[must_use]
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Distance in `data` between consecutive rows.
    pub fn row_stride(&self) -> usize {
        self.row_stride
    }

    /// Distance in `data` between consecutive columns.
    pub fn col_stride(&self) -> usize {
        self.col_stride
    }

    /// Element `(r, c)`.
    ///
    /// # Panics
    /// If `r >= rows` or `c >= cols`, even where a stride would land inside the buffer.
    #[inline]
    pub fn get(&self, r: usize, c: usize) -> T {
        assert!(
            r < self.rows && c < self.cols,
            "({r}, {c}) is outside a {}x{} view",
            self.rows,
            self.cols
        );
        self.data[r * self.row_stride + c * self.col_stride]
    }

    /// The `rows x cols` block whose top-left element is `(r0, c0)`.
    ///
    /// # Panics
    /// If the block does not fit inside this view. The kernels only cut blocks they have
    /// already sized, so a panic here is a bug, not bad input.
    #[must_use]
    pub fn submatrix(self, r0: usize, c0: usize, rows: usize, cols: usize) -> Self {
        let start = sub_start(
            (self.rows, self.cols),
            (r0, c0, rows, cols),
            (self.row_stride, self.col_stride),
            self.data.len(),
        );
        Self {
            data: &self.data[start..],
            rows,
            cols,
            row_stride: self.row_stride,
            col_stride: self.col_stride,
        }
    }
}

/// Offset of a block's first element, checking that the block fits. An empty block may start
/// past the last element, so it is clamped to the buffer end rather than indexed.
fn sub_start(
    (rows, cols): (usize, usize),
    (r0, c0, sub_rows, sub_cols): (usize, usize, usize, usize),
    (row_stride, col_stride): (usize, usize),
    len: usize,
) -> usize {
    assert!(
        r0.checked_add(sub_rows).is_some_and(|end| end <= rows)
            && c0.checked_add(sub_cols).is_some_and(|end| end <= cols),
        "a {sub_rows}x{sub_cols} block at ({r0}, {c0}) does not fit in a {rows}x{cols} view"
    );
    if sub_rows == 0 || sub_cols == 0 {
        len
    } else {
        r0 * row_stride + c0 * col_stride
    }
}

/// A mutable strided view for the output; element `(r, c)` is
/// `data[r * row_stride + c * col_stride]`, and no two elements share a slot.
#[derive(Debug)]
pub struct MatMut<'a, T> {
    data: &'a mut [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T: Element> MatMut<'a, T> {
    /// A dense row-major matrix; `data.len()` must be `rows * cols`.
    pub fn row_major(data: &'a mut [T], rows: usize, cols: usize) -> Result<Self, ShapeError> {
        row_major_len(rows, cols, data.len())?;
        Ok(Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        })
    }

    /// A strided view. Every element must lie inside `data`, and along one dimension each
    /// line of elements must end before the next begins (any padded row- or column-major
    /// layout), so that no two elements are written to the same slot.
    pub fn new(
        data: &'a mut [T],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Result<Self, ShapeError> {
        check_in_bounds(data.len(), rows, cols, row_stride, col_stride)?;
        if !writes_each_slot_once(rows, cols, row_stride, col_stride) {
            return Err(ShapeError::OverlappingOutput {
                rows,
                cols,
                row_stride,
                col_stride,
            });
        }
        Ok(Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        })
    }

    /// The transpose, as a view of the same buffer.
    #[must_use]
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Distance in `data` between consecutive rows.
    pub fn row_stride(&self) -> usize {
        self.row_stride
    }

    /// Distance in `data` between consecutive columns.
    pub fn col_stride(&self) -> usize {
        self.col_stride
    }

    /// Element `(r, c)`.
    ///
    /// # Panics
    /// If `r >= rows` or `c >= cols`.
    #[inline]
    pub fn get(&self, r: usize, c: usize) -> T {
        self.as_ref().get(r, c)
    }

    /// Mutable reference to element `(r, c)`.
    ///
    /// # Panics
    /// If `r >= rows` or `c >= cols`.
    #[inline]
    pub fn get_mut(&mut self, r: usize, c: usize) -> &mut T {
        assert!(
            r < self.rows && c < self.cols,
            "({r}, {c}) is outside a {}x{} view",
            self.rows,
            self.cols
        );
        &mut self.data[r * self.row_stride + c * self.col_stride]
    }

    /// Sets element `(r, c)`.
    ///
    /// # Panics
    /// If `r >= rows` or `c >= cols`.
    #[inline]
    pub fn set(&mut self, r: usize, c: usize, value: T) {
        *self.get_mut(r, c) = value;
    }

    /// A read-only view of the same elements.
    pub fn as_ref(&self) -> MatRef<'_, T> {
        MatRef {
            data: self.data,
            rows: self.rows,
            cols: self.cols,
            row_stride: self.row_stride,
            col_stride: self.col_stride,
        }
    }

    /// A shorter-lived mutable view of the same elements, so `self` can be used again after.
    pub fn rb_mut(&mut self) -> MatMut<'_, T> {
        MatMut {
            data: self.data,
            rows: self.rows,
            cols: self.cols,
            row_stride: self.row_stride,
            col_stride: self.col_stride,
        }
    }

    /// The `rows x cols` block whose top-left element is `(r0, c0)`.
    ///
    /// # Panics
    /// If the block does not fit inside this view (see [`MatRef::submatrix`]).
    #[must_use]
    pub fn submatrix(self, r0: usize, c0: usize, rows: usize, cols: usize) -> Self {
        let start = sub_start(
            (self.rows, self.cols),
            (r0, c0, rows, cols),
            (self.row_stride, self.col_stride),
            self.data.len(),
        );
        Self {
            data: &mut self.data[start..],
            rows,
            cols,
            row_stride: self.row_stride,
            col_stride: self.col_stride,
        }
    }

    /// Whether every row's elements come before every later row's in the buffer, which is
    /// what [`MatMut::split_rows_at`] needs to cut the buffer between rows. True for
    /// row-major layouts (padded or not); false for column-major ones with several rows
    /// and columns.
    pub fn rows_are_disjoint(&self) -> bool {
        self.rows <= 1 || self.cols == 0 || self.row_stride > (self.cols - 1) * self.col_stride
    }

    /// Splits into rows `0..r` and rows `r..`, two views that can be written from different
    /// threads.
    ///
    /// # Panics
    /// If `r > rows`, or if `0 < r < rows` and [`MatMut::rows_are_disjoint`] is false.
    pub fn split_rows_at(self, r: usize) -> (Self, Self) {
        assert!(
            r <= self.rows,
            "cannot split a {}-row view at row {r}",
            self.rows
        );
        let mid = if r == 0 {
            0
        } else if r == self.rows {
            self.data.len()
        } else {
            assert!(
                self.rows_are_disjoint(),
                "rows of a {}x{} view with strides ({}, {}) interleave; it cannot be split",
                self.rows,
                self.cols,
                self.row_stride,
                self.col_stride
            );
            r * self.row_stride
        };
        let (top, bottom) = self.data.split_at_mut(mid);
        let part = |data: &'a mut [T], rows: usize| MatMut {
            data,
            rows,
            cols: self.cols,
            row_stride: self.row_stride,
            col_stride: self.col_stride,
        };
        (part(top, r), part(bottom, self.rows - r))
    }
}

/// The code paths `gemm` can take; each is one instantiation of `portable::gemm_blocked`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    Simd128,
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    Neon,
}

impl Path {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if x86_64::available_avx512() {
            return Path::Avx512;
        }
        #[cfg(target_arch = "x86_64")]
        if x86_64::available() {
            return Path::Avx2Fma;
        }
        // No runtime detection on wasm: an engine without simd128 rejects the whole module.
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        let compiled = Path::Simd128;
        // NEON is baseline on AArch64, so a binary built with it runs only on CPUs that have it.
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        let compiled = Path::Neon;
        #[cfg(not(any(
            all(target_arch = "wasm32", target_feature = "simd128"),
            all(target_arch = "aarch64", target_feature = "neon")
        )))]
        let compiled = Path::Portable;
        compiled
    }

    /// AVX2+FMA where the CPU has it, else what `detect` picks.
    fn avx2_or_detected() -> Self {
        #[cfg(target_arch = "x86_64")]
        if x86_64::available() {
            return Path::Avx2Fma;
        }
        Path::detect()
    }

    fn name(self) -> &'static str {
        match self {
            Path::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Path::Avx2Fma => "x86_64-avx2-fma",
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => "x86_64-avx512f",
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            Path::Simd128 if cfg!(target_feature = "relaxed-simd") => "wasm32-relaxed-simd",
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            Path::Simd128 => "wasm32-simd128",
            #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
            Path::Neon => "aarch64-neon",
        }
    }

    #[cfg(feature = "rayon")]
    fn tile<T>(self) -> Tile {
        match self {
            Path::Portable => portable::tile::<T>(),
            #[cfg(target_arch = "x86_64")]
            Path::Avx2Fma => x86_64::tile::<T>(),
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => x86_64::tile_avx512::<T>(),
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            Path::Simd128 => wasm32::tile::<T>(),
            #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
            Path::Neon => aarch64::tile::<T>(),
        }
    }

    /// The whole product; shapes are checked and `m, n, k >= 1`.
    fn gemm<T: Element>(
        self,
        alpha: T,
        a: MatRef<'_, T>,
        b: MatRef<'_, T>,
        beta: T,
        c: MatMut<'_, T>,
    ) {
        match self {
            Path::Portable => portable::gemm(alpha, a, b, beta, c),
            #[cfg(target_arch = "x86_64")]
            Path::Avx2Fma => x86_64::gemm(alpha, a, b, beta, c),
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => x86_64::gemm_avx512(alpha, a, b, beta, c),
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            Path::Simd128 => wasm32::gemm(alpha, a, b, beta, c),
            #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
            Path::Neon => aarch64::gemm(alpha, a, b, beta, c),
        }
    }

    /// One row block against an already packed panel of B; see `portable::block`.
    #[cfg(feature = "rayon")]
    fn block<T: Element>(
        self,
        alpha: T,
        a: MatRef<'_, T>,
        b_packed: &[T],
        beta: Option<T>,
        c: MatMut<'_, T>,
        a_buf: &mut Vec<T>,
    ) {
        match self {
            Path::Portable => portable::block_dispatch(alpha, a, b_packed, beta, c, a_buf),
            #[cfg(target_arch = "x86_64")]
            Path::Avx2Fma => x86_64::block(alpha, a, b_packed, beta, c, a_buf),
            #[cfg(target_arch = "x86_64")]
            Path::Avx512 => x86_64::block_avx512(alpha, a, b_packed, beta, c, a_buf),
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            Path::Simd128 => wasm32::block(alpha, a, b_packed, beta, c, a_buf),
            #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
            Path::Neon => aarch64::block(alpha, a, b_packed, beta, c, a_buf),
        }
    }
}

fn check_shapes<T>(
    a: &MatRef<'_, T>,
    b: &MatRef<'_, T>,
    c: &MatMut<'_, T>,
) -> Result<(), ShapeError> {
    if a.cols != b.rows {
        return Err(ShapeError::InnerDimension {
            a_rows: a.rows,
            a_cols: a.cols,
            b_rows: b.rows,
            b_cols: b.cols,
        });
    }
    if c.rows != a.rows || c.cols != b.cols {
        return Err(ShapeError::OutputShape {
            a_rows: a.rows,
            k: a.cols,
            b_cols: b.cols,
            c_rows: c.rows,
            c_cols: c.cols,
        });
    }
    Ok(())
}

/// Finishes the products the blocked loops do not handle and returns whether it did: an
/// empty C, and `k == 0`, where `A·B` is an empty sum. That sum is still scaled by alpha, as in
/// the reference, so a NaN or infinite alpha poisons C there too.
fn finish_degenerate<T: Element>(alpha: T, k: usize, beta: T, c: &mut MatMut<'_, T>) -> bool {
    if c.rows == 0 || c.cols == 0 {
        return true;
    }
    if k != 0 {
        return false;
    }
    let scaled_sum = alpha * T::ZERO;
    for r in 0..c.rows {
        for col in 0..c.cols {
            let slot = c.get_mut(r, col);
            *slot = if beta == T::ZERO {
                scaled_sum
            } else {
                scaled_sum + beta * *slot
            };
        }
    }
    true
}

fn gemm_with<T: Element>(
    path: Path,
    alpha: T,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    beta: T,
    mut c: MatMut<'_, T>,
) -> Result<(), ShapeError> {
    check_shapes(&a, &b, &c)?;
    if !finish_degenerate(alpha, a.cols, beta, &mut c) {
        path.gemm(alpha, a, b, beta, c);
    }
    Ok(())
}

/// `C = alpha·A·B + beta·C` on one thread, dispatching at runtime to the fastest path for
/// this CPU (see [`active_path`]).
///
/// When `beta == 0`, C is overwritten and its old contents (even NaN) are ignored, as in
/// BLAS. Otherwise NaN and infinities propagate as in [`reference::gemm`]; results differ
/// from it only by rounding, since the blocked kernel sums in `T` in a different order.
pub fn gemm<T: Element>(
    alpha: T,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    beta: T,
    c: MatMut<'_, T>,
) -> Result<(), ShapeError> {
    gemm_with(Path::detect(), alpha, a, b, beta, c)
}

/// [`gemm`] forced onto the portable path, so tests on an AVX2 machine check it too.
#[doc(hidden)]
pub fn gemm_portable<T: Element>(
    alpha: T,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    beta: T,
    c: MatMut<'_, T>,
) -> Result<(), ShapeError> {
    gemm_with(Path::Portable, alpha, a, b, beta, c)
}

/// [`gemm`] forced onto the AVX2+FMA path where the CPU has it (so tests on an AVX-512
/// machine check it too), else the dispatched one.
#[doc(hidden)]
pub fn gemm_avx2<T: Element>(
    alpha: T,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    beta: T,
    c: MatMut<'_, T>,
) -> Result<(), ShapeError> {
    gemm_with(Path::avx2_or_detected(), alpha, a, b, beta, c)
}

/// [`par_gemm`] forced onto the AVX2+FMA path where the CPU has it, for tests.
#[cfg(feature = "rayon")]
#[doc(hidden)]
pub fn par_gemm_avx2<T: Element>(
    alpha: T,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    beta: T,
    c: MatMut<'_, T>,
) -> Result<(), ShapeError> {
    parallel::par_gemm_with(Path::avx2_or_detected(), alpha, a, b, beta, c)
}

/// [`gemm`] using the threads of the current rayon pool, each writing its own rows of C (or,
/// for a column-major C, its own columns).
///
/// Products too small to repay the threading, and outputs whose rows and columns both
/// interleave in memory, run on the calling thread.
#[cfg(feature = "rayon")]
pub fn par_gemm<T: Element>(
    alpha: T,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    beta: T,
    c: MatMut<'_, T>,
) -> Result<(), ShapeError> {
    parallel::par_gemm_with(Path::detect(), alpha, a, b, beta, c)
}

/// [`par_gemm`] forced onto the portable path, for tests.
#[cfg(feature = "rayon")]
#[doc(hidden)]
pub fn par_gemm_portable<T: Element>(
    alpha: T,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    beta: T,
    c: MatMut<'_, T>,
) -> Result<(), ShapeError> {
    parallel::par_gemm_with(Path::Portable, alpha, a, b, beta, c)
}

/// Name of the path [`gemm`] takes on this machine: `"x86_64-avx512f"`, `"x86_64-avx2-fma"`,
/// `"wasm32-simd128"`, `"wasm32-relaxed-simd"`, `"aarch64-neon"` or `"portable"`.
/// Workers report it so slow or odd results can be traced to a code path.
pub fn active_path() -> &'static str {
    Path::detect().name()
}
