//! The AArch64 NEON path: the portable blocked driver around hand-written 128-bit
//! micro-kernels for f32 and f64, chosen at compile time because NEON (Advanced SIMD) is part
//! of the AArch64 baseline every such target enables.
//!
//! As on x86_64 and wasm32, the micro-kernels use intrinsics rather than trusting LLVM to
//! vectorize the portable loops once the whole driver is inlined around them. AArch64 has
//! 32 vector registers and a fused multiply-add that takes its multiplier from one lane of
//! another register (`fmla v.4s, v.4s, v.s[lane]`), so a step of the inner sum loads A's
//! column of the tile as whole vectors instead of broadcasting each element, and the tiles
//! are the larger ones BLIS uses on ARMv8-A. Unlike on x86_64 there is no prefetch of C:
//! `core::arch::aarch64::_prefetch` is still unstable (rust-lang/rust#117217).
//!
//! The kernels are `#[target_feature(enable = "neon")]` functions even though every target
//! that compiles this module enables NEON already: the intrinsics are safe to call only from
//! a function that lists the feature itself, so the one `unsafe` is at the kernel call.

use core::any::TypeId;
use core::arch::aarch64::{
    float32x4_t, float64x2_t, vdupq_n_f32, vdupq_n_f64, vfmaq_laneq_f32, vfmaq_laneq_f64,
    vld1q_f32, vld1q_f64, vst1q_f32, vst1q_f64,
};

use super::portable::{self, MicroKernel, Portable, Tile, same_slice, same_value};
use super::{Element, MatMut, MatRef};

// Thirty-two 128-bit registers. f32: eight rows of three vectors make 24 accumulators, plus
// three B vectors and the two vectors holding A's eight elements (29). f64: six rows of four
// vectors make 24 accumulators, plus four B vectors and three A vectors (31). These are BLIS's
// `armv8a` sgemm 8x12 and dgemm 6x8 shapes.
const TILE_32: Tile = Tile { mr: 8, nr: 12 };
const TILE_64: Tile = Tile { mr: 6, nr: 8 };

#[cfg(feature = "rayon")]
pub(super) fn tile<T>() -> Tile {
    if size_of::<T>() == 4 {
        TILE_32
    } else {
        TILE_64
    }
}

/// `acc[v] += b[v] * a[LANE]` for every vector of one row of the tile.
#[target_feature(enable = "neon")]
#[inline]
fn fma_row_f32<const LANE: i32, const NV: usize>(
    acc: &mut [float32x4_t; NV],
    b: &[float32x4_t; NV],
    a: float32x4_t,
) {
    for (acc, &b) in acc.iter_mut().zip(b) {
        *acc = vfmaq_laneq_f32::<LANE>(*acc, b, a);
    }
}

/// [`fma_row_f32`] with two-lane f64 vectors.
#[target_feature(enable = "neon")]
#[inline]
fn fma_row_f64<const LANE: i32, const NV: usize>(
    acc: &mut [float64x2_t; NV],
    b: &[float64x2_t; NV],
    a: float64x2_t,
) {
    for (acc, &b) in acc.iter_mut().zip(b) {
        *acc = vfmaq_laneq_f64::<LANE>(*acc, b, a);
    }
}

/// An 8x12 f32 tile: per step of the inner sum, three 4-lane loads of B and two of A feed
/// 24 lane-indexed FMAs into accumulators that never leave registers.
#[target_feature(enable = "neon")]
fn kernel_f32(a: &[f32], b: &[f32]) -> [[f32; 12]; 8] {
    let mut acc = [[vdupq_n_f32(0.0); 3]; 8];
    for (a, b) in a.chunks_exact(8).zip(b.chunks_exact(12)) {
        // SAFETY: `b` holds 12 floats and `a` holds 8, so each 4-float load (from float
        // `4 * v` of `b`, and from floats 0 and 4 of `a`) is in bounds; `vld1q_f32` needs
        // only the alignment of `f32`, which the slices have.
        let (b, a_lo, a_hi): ([float32x4_t; 3], _, _) = unsafe {
            (
                core::array::from_fn(|v| vld1q_f32(b.as_ptr().add(4 * v))),
                vld1q_f32(a.as_ptr()),
                vld1q_f32(a.as_ptr().add(4)),
            )
        };
        let [r0, r1, r2, r3, r4, r5, r6, r7] = &mut acc;
        fma_row_f32::<0, 3>(r0, &b, a_lo);
        fma_row_f32::<1, 3>(r1, &b, a_lo);
        fma_row_f32::<2, 3>(r2, &b, a_lo);
        fma_row_f32::<3, 3>(r3, &b, a_lo);
        fma_row_f32::<0, 3>(r4, &b, a_hi);
        fma_row_f32::<1, 3>(r5, &b, a_hi);
        fma_row_f32::<2, 3>(r6, &b, a_hi);
        fma_row_f32::<3, 3>(r7, &b, a_hi);
    }
    let mut out = [[0.0; 12]; 8];
    for (out, acc) in out.iter_mut().zip(&acc) {
        for (v, &acc) in acc.iter().enumerate() {
            // SAFETY: `out` holds 12 floats, so the 4 floats from float `4 * v` (v < 3) are
            // in bounds, and it is an `f32` array, so aligned for `vst1q_f32`.
            unsafe { vst1q_f32(out.as_mut_ptr().add(4 * v), acc) };
        }
    }
    out
}

/// A 6x8 f64 tile: per step of the inner sum, four 2-lane loads of B and three of A feed
/// 24 lane-indexed FMAs.
#[target_feature(enable = "neon")]
fn kernel_f64(a: &[f64], b: &[f64]) -> [[f64; 8]; 6] {
    let mut acc = [[vdupq_n_f64(0.0); 4]; 6];
    for (a, b) in a.chunks_exact(6).zip(b.chunks_exact(8)) {
        // SAFETY: `b` holds 8 doubles and `a` holds 6, so each 2-double load (from double
        // `2 * v` of `b`, and from doubles 0, 2 and 4 of `a`) is in bounds; `vld1q_f64` needs
        // only the alignment of `f64`, which the slices have.
        let (b, a01, a23, a45): ([float64x2_t; 4], _, _, _) = unsafe {
            (
                core::array::from_fn(|v| vld1q_f64(b.as_ptr().add(2 * v))),
                vld1q_f64(a.as_ptr()),
                vld1q_f64(a.as_ptr().add(2)),
                vld1q_f64(a.as_ptr().add(4)),
            )
        };
        let [r0, r1, r2, r3, r4, r5] = &mut acc;
        fma_row_f64::<0, 4>(r0, &b, a01);
        fma_row_f64::<1, 4>(r1, &b, a01);
        fma_row_f64::<0, 4>(r2, &b, a23);
        fma_row_f64::<1, 4>(r3, &b, a23);
        fma_row_f64::<0, 4>(r4, &b, a45);
        fma_row_f64::<1, 4>(r5, &b, a45);
    }
    let mut out = [[0.0; 8]; 6];
    for (out, acc) in out.iter_mut().zip(&acc) {
        for (v, &acc) in acc.iter().enumerate() {
            // SAFETY: `out` holds 8 doubles, so the 2 doubles from double `2 * v` (v < 4) are
            // in bounds, and it is an `f64` array, so aligned for `vst1q_f64`.
            unsafe { vst1q_f64(out.as_mut_ptr().add(2 * v), acc) };
        }
    }
    out
}

/// The NEON micro-kernels. Unlike `x86_64::Avx2Fma` a value needs no runtime check to
/// exist: this module is compiled only where `neon` is enabled for the whole binary.
#[derive(Clone, Copy, Debug)]
struct Neon;

impl<T: Element> MicroKernel<T, { TILE_32.mr }, { TILE_32.nr }> for Neon {
    #[inline(always)]
    fn run(self, a: &[T], b: &[T]) -> [[T; TILE_32.nr]; TILE_32.mr] {
        if TypeId::of::<T>() != TypeId::of::<f32>() {
            // Another 4-byte element type: the portable loops on the same tile.
            return Portable.run(a, b);
        }
        // SAFETY: `kernel_f32` only requires that the CPU executes NEON instructions; this
        // module is compiled only for targets with `neon` enabled (see `mod aarch64`), so
        // the whole binary already assumes it.
        same_value(unsafe { kernel_f32(same_slice(a), same_slice(b)) })
    }
}

impl<T: Element> MicroKernel<T, { TILE_64.mr }, { TILE_64.nr }> for Neon {
    #[inline(always)]
    fn run(self, a: &[T], b: &[T]) -> [[T; TILE_64.nr]; TILE_64.mr] {
        if TypeId::of::<T>() != TypeId::of::<f64>() {
            return Portable.run(a, b);
        }
        // SAFETY: as for the f32 kernel: `neon` is enabled for the whole binary.
        same_value(unsafe { kernel_f64(same_slice(a), same_slice(b)) })
    }
}

pub(super) fn gemm<T: Element>(
    alpha: T,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    beta: T,
    c: MatMut<'_, T>,
) {
    if size_of::<T>() == 4 {
        portable::gemm_blocked::<T, { TILE_32.mr }, { TILE_32.nr }, _>(alpha, a, b, beta, c, Neon)
    } else {
        portable::gemm_blocked::<T, { TILE_64.mr }, { TILE_64.nr }, _>(alpha, a, b, beta, c, Neon)
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
    if size_of::<T>() == 4 {
        portable::block::<T, { TILE_32.mr }, { TILE_32.nr }, _>(
            alpha, a, b_packed, beta, c, a_buf, Neon,
        )
    } else {
        portable::block::<T, { TILE_64.mr }, { TILE_64.nr }, _>(
            alpha, a, b_packed, beta, c, a_buf, Neon,
        )
    }
}
