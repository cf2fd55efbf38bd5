//! The x86_64 paths, chosen at runtime: AVX-512F where the CPU has it, else AVX2+FMA. Each
//! is the portable blocked driver recompiled under `#[target_feature]` around hand-written
//! micro-kernels for f32 and f64 (512-bit or 256-bit).
//!
//! The micro-kernels use intrinsics because LLVM's vectorization of the portable one is not
//! dependable once the whole driver is inlined around it: in one build the f32 kernel came
//! out scalar and ran twenty times slower. Packing, blocking and edge tiles stay shared.

use core::any::TypeId;
use core::arch::x86_64::{
    __m256, __m256d, __m512, __m512d, _MM_HINT_T0, _mm_prefetch, _mm256_fmadd_pd, _mm256_fmadd_ps,
    _mm256_loadu_pd, _mm256_loadu_ps, _mm256_set1_pd, _mm256_set1_ps, _mm256_setzero_pd,
    _mm256_setzero_ps, _mm256_storeu_pd, _mm256_storeu_ps, _mm512_fmadd_pd, _mm512_fmadd_ps,
    _mm512_loadu_pd, _mm512_loadu_ps, _mm512_set1_pd, _mm512_set1_ps, _mm512_setzero_pd,
    _mm512_setzero_ps, _mm512_storeu_pd, _mm512_storeu_ps,
};

use super::portable::{self, MicroKernel, Portable, Tile, same_slice, same_value};
use super::{Element, MatMut, MatRef};

// Sixteen 256-bit registers: six rows of two vectors make 12 accumulators, plus two B
// vectors and one A broadcast. This is the usual Haswell/Zen sgemm/dgemm shape.
const TILE_32: Tile = Tile { mr: 6, nr: 16 };
const TILE_64: Tile = Tile { mr: 6, nr: 8 };

// Thirty-two 512-bit registers: twelve rows of two vectors make 24 accumulators, plus two
// B vectors and one A broadcast.
const TILE512_32: Tile = Tile { mr: 12, nr: 32 };
const TILE512_64: Tile = Tile { mr: 12, nr: 16 };

pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

pub(super) fn available_avx512() -> bool {
    available() && is_x86_feature_detected!("avx512f")
}

#[cfg(feature = "rayon")]
pub(super) fn tile_avx512<T>() -> Tile {
    if size_of::<T>() == 4 {
        TILE512_32
    } else {
        TILE512_64
    }
}

/// A 12x32 f32 tile: per step of the inner sum, two 16-lane loads of B and twelve
/// broadcasts of A feed 24 FMAs into accumulators that never leave registers.
#[target_feature(enable = "avx512f,avx2,fma")]
fn kernel512_f32(a: &[f32], b: &[f32]) -> [[f32; 32]; 12] {
    let mut acc: [[__m512; 2]; 12] = [[_mm512_setzero_ps(); 2]; 12];
    for (a, b) in a.chunks_exact(12).zip(b.chunks_exact(32)) {
        // SAFETY: `b` holds exactly 32 floats, so both 16-float loads are in bounds.
        let (b0, b1) = unsafe {
            (
                _mm512_loadu_ps(b.as_ptr()),
                _mm512_loadu_ps(b.as_ptr().add(16)),
            )
        };
        for (acc, &ai) in acc.iter_mut().zip(a) {
            let ai = _mm512_set1_ps(ai);
            acc[0] = _mm512_fmadd_ps(ai, b0, acc[0]);
            acc[1] = _mm512_fmadd_ps(ai, b1, acc[1]);
        }
    }
    let mut out = [[0.0; 32]; 12];
    for (out, acc) in out.iter_mut().zip(&acc) {
        // SAFETY: `out` holds exactly 32 floats, so both 16-float stores are in bounds.
        unsafe {
            _mm512_storeu_ps(out.as_mut_ptr(), acc[0]);
            _mm512_storeu_ps(out.as_mut_ptr().add(16), acc[1]);
        }
    }
    out
}

/// A 12x16 f64 tile; the f32 kernel's shape with 8-lane vectors.
#[target_feature(enable = "avx512f,avx2,fma")]
fn kernel512_f64(a: &[f64], b: &[f64]) -> [[f64; 16]; 12] {
    let mut acc: [[__m512d; 2]; 12] = [[_mm512_setzero_pd(); 2]; 12];
    for (a, b) in a.chunks_exact(12).zip(b.chunks_exact(16)) {
        // SAFETY: `b` holds exactly 16 doubles, so both 8-double loads are in bounds.
        let (b0, b1) = unsafe {
            (
                _mm512_loadu_pd(b.as_ptr()),
                _mm512_loadu_pd(b.as_ptr().add(8)),
            )
        };
        for (acc, &ai) in acc.iter_mut().zip(a) {
            let ai = _mm512_set1_pd(ai);
            acc[0] = _mm512_fmadd_pd(ai, b0, acc[0]);
            acc[1] = _mm512_fmadd_pd(ai, b1, acc[1]);
        }
    }
    let mut out = [[0.0; 16]; 12];
    for (out, acc) in out.iter_mut().zip(&acc) {
        // SAFETY: `out` holds exactly 16 doubles, so both 8-double stores are in bounds.
        unsafe {
            _mm512_storeu_pd(out.as_mut_ptr(), acc[0]);
            _mm512_storeu_pd(out.as_mut_ptr().add(8), acc[1]);
        }
    }
    out
}

/// The AVX-512F micro-kernels. A value exists only where `available_avx512()` returned
/// true, which is what lets its safe methods call the `#[target_feature]` kernels.
#[derive(Clone, Copy, Debug)]
struct Avx512(());

impl Avx512 {
    fn new() -> Self {
        assert!(
            available_avx512(),
            "the AVX-512 kernel was chosen on a CPU without AVX-512F"
        );
        Avx512(())
    }
}

impl<T: Element> MicroKernel<T, { TILE512_32.mr }, { TILE512_32.nr }> for Avx512 {
    const PREFETCHES: bool = true;

    #[inline(always)]
    fn run(self, a: &[T], b: &[T]) -> [[T; TILE512_32.nr]; TILE512_32.mr] {
        if TypeId::of::<T>() != TypeId::of::<f32>() {
            return Portable.run(a, b);
        }
        // SAFETY: `self` exists, so the CPU has AVX-512F (see `Avx512::new`).
        same_value(unsafe { kernel512_f32(same_slice(a), same_slice(b)) })
    }

    #[inline(always)]
    fn prefetch_c_row(self, first: &T, last: &T) {
        prefetch(first, last);
    }
}

impl<T: Element> MicroKernel<T, { TILE512_64.mr }, { TILE512_64.nr }> for Avx512 {
    const PREFETCHES: bool = true;

    #[inline(always)]
    fn run(self, a: &[T], b: &[T]) -> [[T; TILE512_64.nr]; TILE512_64.mr] {
        if TypeId::of::<T>() != TypeId::of::<f64>() {
            return Portable.run(a, b);
        }
        // SAFETY: `self` exists, so the CPU has AVX-512F (see `Avx512::new`).
        same_value(unsafe { kernel512_f64(same_slice(a), same_slice(b)) })
    }

    #[inline(always)]
    fn prefetch_c_row(self, first: &T, last: &T) {
        prefetch(first, last);
    }
}

pub(super) fn gemm_avx512<T: Element>(
    alpha: T,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    beta: T,
    c: MatMut<'_, T>,
) {
    let kernel = Avx512::new();
    // SAFETY: `gemm_avx512f` only requires that the CPU executes AVX-512F, AVX2 and FMA
    // instructions, which `Avx512::new` has just confirmed.
    unsafe { gemm_avx512f(kernel, alpha, a, b, beta, c) }
}

/// The portable driver inlined into a function compiled for AVX-512F.
#[target_feature(enable = "avx512f,avx2,fma")]
fn gemm_avx512f<T: Element>(
    kernel: Avx512,
    alpha: T,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    beta: T,
    c: MatMut<'_, T>,
) {
    if size_of::<T>() == 4 {
        portable::gemm_blocked::<T, { TILE512_32.mr }, { TILE512_32.nr }, _>(
            alpha, a, b, beta, c, kernel,
        )
    } else {
        portable::gemm_blocked::<T, { TILE512_64.mr }, { TILE512_64.nr }, _>(
            alpha, a, b, beta, c, kernel,
        )
    }
}

#[cfg(feature = "rayon")]
pub(super) fn block_avx512<T: Element>(
    alpha: T,
    a: MatRef<'_, T>,
    b_packed: &[T],
    beta: Option<T>,
    c: MatMut<'_, T>,
    a_buf: &mut Vec<T>,
) {
    let kernel = Avx512::new();
    // SAFETY: `block_avx512f` only requires that the CPU executes AVX-512F, AVX2 and FMA
    // instructions, which `Avx512::new` has just confirmed.
    unsafe { block_avx512f(kernel, alpha, a, b_packed, beta, c, a_buf) }
}

#[cfg(feature = "rayon")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn block_avx512f<T: Element>(
    kernel: Avx512,
    alpha: T,
    a: MatRef<'_, T>,
    b_packed: &[T],
    beta: Option<T>,
    c: MatMut<'_, T>,
    a_buf: &mut Vec<T>,
) {
    if size_of::<T>() == 4 {
        portable::block::<T, { TILE512_32.mr }, { TILE512_32.nr }, _>(
            alpha, a, b_packed, beta, c, a_buf, kernel,
        )
    } else {
        portable::block::<T, { TILE512_64.mr }, { TILE512_64.nr }, _>(
            alpha, a, b_packed, beta, c, a_buf, kernel,
        )
    }
}

#[cfg(feature = "rayon")]
pub(super) fn tile<T>() -> Tile {
    if size_of::<T>() == 4 {
        TILE_32
    } else {
        TILE_64
    }
}

/// A 6x16 f32 tile: per step of the inner sum, two 8-lane loads of B and six broadcasts of A
/// feed twelve FMAs into accumulators that never leave registers.
#[target_feature(enable = "avx2,fma")]
fn kernel_f32(a: &[f32], b: &[f32]) -> [[f32; 16]; 6] {
    let mut acc: [[__m256; 2]; 6] = [[_mm256_setzero_ps(); 2]; 6];
    for (a, b) in a.chunks_exact(6).zip(b.chunks_exact(16)) {
        // SAFETY: `b` holds exactly 16 floats, so both 8-float loads are in bounds.
        let (b0, b1) = unsafe {
            (
                _mm256_loadu_ps(b.as_ptr()),
                _mm256_loadu_ps(b.as_ptr().add(8)),
            )
        };
        for (acc, &ai) in acc.iter_mut().zip(a) {
            let ai = _mm256_set1_ps(ai);
            acc[0] = _mm256_fmadd_ps(ai, b0, acc[0]);
            acc[1] = _mm256_fmadd_ps(ai, b1, acc[1]);
        }
    }
    let mut out = [[0.0; 16]; 6];
    for (out, acc) in out.iter_mut().zip(&acc) {
        // SAFETY: `out` holds exactly 16 floats, so both 8-float stores are in bounds.
        unsafe {
            _mm256_storeu_ps(out.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(out.as_mut_ptr().add(8), acc[1]);
        }
    }
    out
}

/// A 6x8 f64 tile; the f32 kernel's shape with 4-lane vectors.
#[target_feature(enable = "avx2,fma")]
fn kernel_f64(a: &[f64], b: &[f64]) -> [[f64; 8]; 6] {
    let mut acc: [[__m256d; 2]; 6] = [[_mm256_setzero_pd(); 2]; 6];
    for (a, b) in a.chunks_exact(6).zip(b.chunks_exact(8)) {
        // SAFETY: `b` holds exactly 8 doubles, so both 4-double loads are in bounds.
        let (b0, b1) = unsafe {
            (
                _mm256_loadu_pd(b.as_ptr()),
                _mm256_loadu_pd(b.as_ptr().add(4)),
            )
        };
        for (acc, &ai) in acc.iter_mut().zip(a) {
            let ai = _mm256_set1_pd(ai);
            acc[0] = _mm256_fmadd_pd(ai, b0, acc[0]);
            acc[1] = _mm256_fmadd_pd(ai, b1, acc[1]);
        }
    }
    let mut out = [[0.0; 8]; 6];
    for (out, acc) in out.iter_mut().zip(&acc) {
        // SAFETY: `out` holds exactly 8 doubles, so both 4-double stores are in bounds.
        unsafe {
            _mm256_storeu_pd(out.as_mut_ptr(), acc[0]);
            _mm256_storeu_pd(out.as_mut_ptr().add(4), acc[1]);
        }
    }
    out
}

/// The AVX2+FMA micro-kernels. A value exists only where `available()` returned true, which
/// is what lets its safe methods call the `#[target_feature]` kernels.
#[derive(Clone, Copy, Debug)]
struct Avx2Fma(());

impl Avx2Fma {
    fn new() -> Self {
        assert!(
            available(),
            "the AVX2+FMA kernel was chosen on a CPU without AVX2 and FMA"
        );
        Avx2Fma(())
    }
}

impl<T: Element> MicroKernel<T, { TILE_32.mr }, { TILE_32.nr }> for Avx2Fma {
    const PREFETCHES: bool = true;

    #[inline(always)]
    fn run(self, a: &[T], b: &[T]) -> [[T; TILE_32.nr]; TILE_32.mr] {
        if TypeId::of::<T>() != TypeId::of::<f32>() {
            // Another 4-byte element type: the portable loops, still compiled with AVX2 here.
            return Portable.run(a, b);
        }
        // SAFETY: `self` exists, so the CPU has AVX2 and FMA (see `Avx2Fma::new`).
        same_value(unsafe { kernel_f32(same_slice(a), same_slice(b)) })
    }

    #[inline(always)]
    fn prefetch_c_row(self, first: &T, last: &T) {
        prefetch(first, last);
    }
}

impl<T: Element> MicroKernel<T, { TILE_64.mr }, { TILE_64.nr }> for Avx2Fma {
    const PREFETCHES: bool = true;

    #[inline(always)]
    fn run(self, a: &[T], b: &[T]) -> [[T; TILE_64.nr]; TILE_64.mr] {
        if TypeId::of::<T>() != TypeId::of::<f64>() {
            return Portable.run(a, b);
        }
        // SAFETY: `self` exists, so the CPU has AVX2 and FMA (see `Avx2Fma::new`).
        same_value(unsafe { kernel_f64(same_slice(a), same_slice(b)) })
    }

    #[inline(always)]
    fn prefetch_c_row(self, first: &T, last: &T) {
        prefetch(first, last);
    }
}

#[inline(always)]
fn prefetch<T>(first: &T, last: &T) {
    // SAFETY: `_mm_prefetch` needs only SSE, which every x86_64 CPU has, and it is a hint that
    // never faults, whatever the address.
    unsafe {
        _mm_prefetch::<_MM_HINT_T0>(core::ptr::from_ref(first).cast());
        _mm_prefetch::<_MM_HINT_T0>(core::ptr::from_ref(last).cast());
    }
}

pub(super) fn gemm<T: Element>(
    alpha: T,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    beta: T,
    c: MatMut<'_, T>,
) {
    let kernel = Avx2Fma::new();
    // SAFETY: `gemm_avx2_fma` only requires that the CPU executes AVX2 and FMA instructions,
    // which `Avx2Fma::new` has just confirmed.
    unsafe { gemm_avx2_fma(kernel, alpha, a, b, beta, c) }
}

/// The portable driver inlined into a function compiled for AVX2 and FMA, so its packing and
/// stores use 256-bit instructions as well.
#[target_feature(enable = "avx2,fma")]
fn gemm_avx2_fma<T: Element>(
    kernel: Avx2Fma,
    alpha: T,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    beta: T,
    c: MatMut<'_, T>,
) {
    if size_of::<T>() == 4 {
        portable::gemm_blocked::<T, { TILE_32.mr }, { TILE_32.nr }, _>(alpha, a, b, beta, c, kernel)
    } else {
        portable::gemm_blocked::<T, { TILE_64.mr }, { TILE_64.nr }, _>(alpha, a, b, beta, c, kernel)
    }
}

#[cfg(feature = "rayon")]
pub(super) fn block<T: Element>(
    alpha: T,
    a: MatRef<'_, T>,
    b_packed: &[T],
    beta: Option<T>,
    c: MatMut<'_, T>,
    a_buf: &mut Vec<T>,
) {
    let kernel = Avx2Fma::new();
    // SAFETY: `block_avx2_fma` only requires that the CPU executes AVX2 and FMA instructions,
    // which `Avx2Fma::new` has just confirmed.
    unsafe { block_avx2_fma(kernel, alpha, a, b_packed, beta, c, a_buf) }
}

#[cfg(feature = "rayon")]
#[target_feature(enable = "avx2,fma")]
fn block_avx2_fma<T: Element>(
    kernel: Avx2Fma,
    alpha: T,
    a: MatRef<'_, T>,
    b_packed: &[T],
    beta: Option<T>,
    c: MatMut<'_, T>,
    a_buf: &mut Vec<T>,
) {
    if size_of::<T>() == 4 {
        portable::block::<T, { TILE_32.mr }, { TILE_32.nr }, _>(
            alpha, a, b_packed, beta, c, a_buf, kernel,
        )
    } else {
        portable::block::<T, { TILE_64.mr }, { TILE_64.nr }, _>(
            alpha, a, b_packed, beta, c, a_buf, kernel,
        )
    }
}
