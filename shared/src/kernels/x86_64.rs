//! The x86_64 paths, chosen at runtime: AVX-512F where the CPU has it, else AVX2+FMA. Each
//! is the portable blocked driver recompiled under `#[target_feature]` around hand-written
//! micro-kernels for f32 and f64 (512-bit or 256-bit), all made by the two macros below.
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

/// An `MR x 2·LANES` tile held as `MR x 2` vectors: per step of the inner sum, two loads
/// of B and `MR` broadcasts of A feed `2·MR` FMAs into accumulators that never leave
/// registers.
macro_rules! micro_kernel {
    ($name:ident, $features:literal, $elem:ty, $vec:ty, $mr:expr, $lanes:expr,
     $zero:ident, $load:ident, $splat:ident, $fma:ident, $store:ident) => {
        #[target_feature(enable = $features)]
        fn $name(a: &[$elem], b: &[$elem]) -> [[$elem; 2 * $lanes]; $mr] {
            let mut acc: [[$vec; 2]; $mr] = [[$zero(); 2]; $mr];
            for (a, b) in a.chunks_exact($mr).zip(b.chunks_exact(2 * $lanes)) {
                // SAFETY: `b` holds exactly 2·LANES elements, so both loads are in bounds.
                let (b0, b1) = unsafe { ($load(b.as_ptr()), $load(b.as_ptr().add($lanes))) };
                for (acc, &ai) in acc.iter_mut().zip(a) {
                    let ai = $splat(ai);
                    acc[0] = $fma(ai, b0, acc[0]);
                    acc[1] = $fma(ai, b1, acc[1]);
                }
            }
            let mut out = [[0.0; 2 * $lanes]; $mr];
            for (out, acc) in out.iter_mut().zip(&acc) {
                // SAFETY: `out` holds exactly 2·LANES elements, so both stores are in bounds.
                unsafe {
                    $store(out.as_mut_ptr(), acc[0]);
                    $store(out.as_mut_ptr().add($lanes), acc[1]);
                }
            }
            out
        }
    };
}

micro_kernel!(
    kernel_f32,
    "avx2,fma",
    f32,
    __m256,
    6,
    8,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_set1_ps,
    _mm256_fmadd_ps,
    _mm256_storeu_ps
);
micro_kernel!(
    kernel_f64,
    "avx2,fma",
    f64,
    __m256d,
    6,
    4,
    _mm256_setzero_pd,
    _mm256_loadu_pd,
    _mm256_set1_pd,
    _mm256_fmadd_pd,
    _mm256_storeu_pd
);
micro_kernel!(
    kernel512_f32,
    "avx512f,avx2,fma",
    f32,
    __m512,
    12,
    16,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_set1_ps,
    _mm512_fmadd_ps,
    _mm512_storeu_ps
);
micro_kernel!(
    kernel512_f64,
    "avx512f,avx2,fma",
    f64,
    __m512d,
    12,
    8,
    _mm512_setzero_pd,
    _mm512_loadu_pd,
    _mm512_set1_pd,
    _mm512_fmadd_pd,
    _mm512_storeu_pd
);

/// A path: a token type whose value exists only where `$available()` returned true (which
/// is what lets its safe methods call the `#[target_feature]` kernels), its `MicroKernel`
/// for each element size, and the driver entry points (`$gemm`, `$block`, `$tile`)
/// inlined into functions compiled for `$features`, so packing and stores use the wide
/// instructions as well.
macro_rules! x86_path {
    ($path:ident, $features:literal, $available:ident, $t32:ident, $t64:ident,
     $k32:ident, $k64:ident, $tile:ident, $gemm:ident, $gemm_tf:ident, $block:ident,
     $block_tf:ident) => {
        #[derive(Clone, Copy, Debug)]
        struct $path(());

        impl $path {
            fn new() -> Self {
                assert!(
                    $available(),
                    concat!("the ", $features, " kernel was chosen on a CPU without it")
                );
                $path(())
            }
        }

        impl<T: Element> MicroKernel<T, { $t32.mr }, { $t32.nr }> for $path {
            const PREFETCHES: bool = true;

            #[inline(always)]
            fn run(self, a: &[T], b: &[T]) -> [[T; $t32.nr]; $t32.mr] {
                if TypeId::of::<T>() != TypeId::of::<f32>() {
                    // Another 4-byte element type: the portable loops, still compiled with
                    // this path's features here.
                    return Portable.run(a, b);
                }
                // SAFETY: `self` exists, so the CPU has the kernel's features (see `new`).
                same_value(unsafe { $k32(same_slice(a), same_slice(b)) })
            }

            #[inline(always)]
            fn prefetch_c_row(self, first: &T, last: &T) {
                prefetch(first, last);
            }
        }

        impl<T: Element> MicroKernel<T, { $t64.mr }, { $t64.nr }> for $path {
            const PREFETCHES: bool = true;

            #[inline(always)]
            fn run(self, a: &[T], b: &[T]) -> [[T; $t64.nr]; $t64.mr] {
                if TypeId::of::<T>() != TypeId::of::<f64>() {
                    return Portable.run(a, b);
                }
                // SAFETY: `self` exists, so the CPU has the kernel's features (see `new`).
                same_value(unsafe { $k64(same_slice(a), same_slice(b)) })
            }

            #[inline(always)]
            fn prefetch_c_row(self, first: &T, last: &T) {
                prefetch(first, last);
            }
        }

        #[cfg(feature = "rayon")]
        pub(super) fn $tile<T>() -> Tile {
            if size_of::<T>() == 4 { $t32 } else { $t64 }
        }

        pub(super) fn $gemm<T: Element>(
            alpha: T,
            a: MatRef<'_, T>,
            b: MatRef<'_, T>,
            beta: T,
            c: MatMut<'_, T>,
        ) {
            let kernel = $path::new();
            // SAFETY: the function only requires the CPU features that `new` has just
            // confirmed.
            unsafe { $gemm_tf(kernel, alpha, a, b, beta, c) }
        }

        #[target_feature(enable = $features)]
        fn $gemm_tf<T: Element>(
            kernel: $path,
            alpha: T,
            a: MatRef<'_, T>,
            b: MatRef<'_, T>,
            beta: T,
            c: MatMut<'_, T>,
        ) {
            if size_of::<T>() == 4 {
                portable::gemm_blocked::<T, { $t32.mr }, { $t32.nr }, _>(
                    alpha, a, b, beta, c, kernel,
                )
            } else {
                portable::gemm_blocked::<T, { $t64.mr }, { $t64.nr }, _>(
                    alpha, a, b, beta, c, kernel,
                )
            }
        }

        #[cfg(feature = "rayon")]
        pub(super) fn $block<T: Element>(
            alpha: T,
            a: MatRef<'_, T>,
            b_packed: &[T],
            beta: Option<T>,
            c: MatMut<'_, T>,
            a_buf: &mut Vec<T>,
        ) {
            let kernel = $path::new();
            // SAFETY: the function only requires the CPU features that `new` has just
            // confirmed.
            unsafe { $block_tf(kernel, alpha, a, b_packed, beta, c, a_buf) }
        }

        #[cfg(feature = "rayon")]
        #[target_feature(enable = $features)]
        fn $block_tf<T: Element>(
            kernel: $path,
            alpha: T,
            a: MatRef<'_, T>,
            b_packed: &[T],
            beta: Option<T>,
            c: MatMut<'_, T>,
            a_buf: &mut Vec<T>,
        ) {
            if size_of::<T>() == 4 {
                portable::block::<T, { $t32.mr }, { $t32.nr }, _>(
                    alpha, a, b_packed, beta, c, a_buf, kernel,
                )
            } else {
                portable::block::<T, { $t64.mr }, { $t64.nr }, _>(
                    alpha, a, b_packed, beta, c, a_buf, kernel,
                )
            }
        }
    };
}

x86_path!(
    Avx2Fma,
    "avx2,fma",
    available,
    TILE_32,
    TILE_64,
    kernel_f32,
    kernel_f64,
    tile,
    gemm,
    gemm_avx2_fma,
    block,
    block_avx2_fma
);
x86_path!(
    Avx512,
    "avx512f,avx2,fma",
    available_avx512,
    TILE512_32,
    TILE512_64,
    kernel512_f32,
    kernel512_f64,
    tile_avx512,
    gemm_avx512,
    gemm_avx512f,
    block_avx512,
    block_avx512f
);

#[inline(always)]
fn prefetch<T>(first: &T, last: &T) {
    // SAFETY: `_mm_prefetch` needs only SSE, which every x86_64 CPU has, and it is a hint that
    // never faults, whatever the address.
    unsafe {
        _mm_prefetch::<_MM_HINT_T0>(core::ptr::from_ref(first).cast());
        _mm_prefetch::<_MM_HINT_T0>(core::ptr::from_ref(last).cast());
    }
}
