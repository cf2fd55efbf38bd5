//! The wasm32 `simd128` path: the portable blocked driver around hand-written 128-bit
//! micro-kernels for f32 and f64, chosen at compile time because wasm has no runtime
//! feature detection (a module using an instruction the engine lacks fails to validate).
//!
//! As on x86_64, the micro-kernels use intrinsics rather than trusting LLVM to vectorize the
//! portable loops once the whole driver is inlined around them. With rustc 1.95 it does, and
//! both run at the same speed; the intrinsics make that a property of the code rather than
//! of the compiler version. simd128 has no fused multiply-add, so each step multiplies and
//! then adds; built with `+relaxed-simd` as well (the page's third bundle, picked when the
//! browser validates a relaxed-simd probe), each step is one `relaxed_madd`, which engines
//! lower to an FMA where the CPU has one. The engine's register allocator, not LLVM's,
//! decides what stays in registers, which is what sizes the tiles.

use core::any::TypeId;
use core::arch::wasm32::{f32x4_splat, f64x2_splat, v128, v128_load, v128_store};

use super::portable::{self, MicroKernel, Portable, Tile, same_slice, same_value};
use super::{Element, MatMut, MatRef};

// Eight accumulators, two B vectors and one A broadcast. Under Node 20 (V8) on an x86_64
// host, tiles with more accumulators were slower: 6x8 and 8x8 f32 ran at about 60% and
// 70% of 4x8, 4x12 and 4x16 at about 75%, and the f64 tiles of the same shapes alike,
// presumably because V8 spills them; unrolling the inner sum by two cost 25-40% as well.
// 2x16 f32 and 2x8 f64 tied with these.
const TILE_32: Tile = Tile { mr: 4, nr: 8 };
const TILE_64: Tile = Tile { mr: 4, nr: 4 };

#[cfg(feature = "rayon")]
pub(super) fn tile<T>() -> Tile {
    if size_of::<T>() == 4 {
        TILE_32
    } else {
        TILE_64
    }
}

/// `c + a·b` per lane: one fused (or not: the engine's choice) `relaxed_madd` where the
/// bundle has relaxed-simd, a multiply then an add otherwise.
#[inline(always)]
fn madd_f32(a: v128, b: v128, c: v128) -> v128 {
    #[cfg(target_feature = "relaxed-simd")]
    {
        core::arch::wasm32::f32x4_relaxed_madd(a, b, c)
    }
    #[cfg(not(target_feature = "relaxed-simd"))]
    {
        core::arch::wasm32::f32x4_add(c, core::arch::wasm32::f32x4_mul(a, b))
    }
}

/// [`madd_f32`] on two f64 lanes.
#[inline(always)]
fn madd_f64(a: v128, b: v128, c: v128) -> v128 {
    #[cfg(target_feature = "relaxed-simd")]
    {
        core::arch::wasm32::f64x2_relaxed_madd(a, b, c)
    }
    #[cfg(not(target_feature = "relaxed-simd"))]
    {
        core::arch::wasm32::f64x2_add(c, core::arch::wasm32::f64x2_mul(a, b))
    }
}

/// An `MR x NR` f32 tile held as `MR x NV` vectors of four lanes: per step of the inner sum,
/// `NV` loads of B and `MR` broadcasts of A feed `MR * NV` multiplies and adds.
#[inline(always)]
fn kernel_f32<const MR: usize, const NR: usize, const NV: usize>(
    a: &[f32],
    b: &[f32],
) -> [[f32; NR]; MR] {
    const { assert!(NV * 4 == NR) };
    let mut acc = [[f32x4_splat(0.0); NV]; MR];
    for (a, b) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        let b: [v128; NV] = core::array::from_fn(|v| {
            // SAFETY: `b` holds `NR = 4 * NV` floats, so the 16 bytes from float `4 * v` are
            // in bounds; `v128_load` has no alignment requirement.
            unsafe { v128_load(b.as_ptr().add(4 * v).cast()) }
        });
        for (acc, &ai) in acc.iter_mut().zip(a) {
            let ai = f32x4_splat(ai);
            for (acc, &bv) in acc.iter_mut().zip(&b) {
                *acc = madd_f32(ai, bv, *acc);
            }
        }
    }
    let mut out = [[0.0; NR]; MR];
    for (out, acc) in out.iter_mut().zip(&acc) {
        for (v, &acc) in acc.iter().enumerate() {
            // SAFETY: `out` holds `NR = 4 * NV` floats, so the 16 bytes from float `4 * v`
            // are in bounds; `v128_store` has no alignment requirement.
            unsafe { v128_store(out.as_mut_ptr().add(4 * v).cast(), acc) };
        }
    }
    out
}

/// The f32 kernel's shape with two-lane f64 vectors.
#[inline(always)]
fn kernel_f64<const MR: usize, const NR: usize, const NV: usize>(
    a: &[f64],
    b: &[f64],
) -> [[f64; NR]; MR] {
    const { assert!(NV * 2 == NR) };
    let mut acc = [[f64x2_splat(0.0); NV]; MR];
    for (a, b) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        let b: [v128; NV] = core::array::from_fn(|v| {
            // SAFETY: `b` holds `NR = 2 * NV` doubles, so the 16 bytes from double `2 * v`
            // are in bounds; `v128_load` has no alignment requirement.
            unsafe { v128_load(b.as_ptr().add(2 * v).cast()) }
        });
        for (acc, &ai) in acc.iter_mut().zip(a) {
            let ai = f64x2_splat(ai);
            for (acc, &bv) in acc.iter_mut().zip(&b) {
                *acc = madd_f64(ai, bv, *acc);
            }
        }
    }
    let mut out = [[0.0; NR]; MR];
    for (out, acc) in out.iter_mut().zip(&acc) {
        for (v, &acc) in acc.iter().enumerate() {
            // SAFETY: `out` holds `NR = 2 * NV` doubles, so the 16 bytes from double `2 * v`
            // are in bounds; `v128_store` has no alignment requirement.
            unsafe { v128_store(out.as_mut_ptr().add(2 * v).cast(), acc) };
        }
    }
    out
}

/// The simd128 micro-kernels. Unlike `x86_64::Avx2Fma` it needs no proof of the CPU's
/// features: this module is compiled only where `simd128` is enabled for the whole binary.
#[derive(Clone, Copy, Debug)]
struct Simd128;

impl<T: Element> MicroKernel<T, { TILE_32.mr }, { TILE_32.nr }> for Simd128 {
    #[inline(always)]
    fn run(self, a: &[T], b: &[T]) -> [[T; TILE_32.nr]; TILE_32.mr] {
        if TypeId::of::<T>() != TypeId::of::<f32>() {
            return Portable.run(a, b);
        }
        same_value(kernel_f32::<
            { TILE_32.mr },
            { TILE_32.nr },
            { TILE_32.nr / 4 },
        >(same_slice(a), same_slice(b)))
    }
}

impl<T: Element> MicroKernel<T, { TILE_64.mr }, { TILE_64.nr }> for Simd128 {
    #[inline(always)]
    fn run(self, a: &[T], b: &[T]) -> [[T; TILE_64.nr]; TILE_64.mr] {
        if TypeId::of::<T>() != TypeId::of::<f64>() {
            return Portable.run(a, b);
        }
        same_value(kernel_f64::<
            { TILE_64.mr },
            { TILE_64.nr },
            { TILE_64.nr / 2 },
        >(same_slice(a), same_slice(b)))
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
        portable::gemm_blocked::<T, { TILE_32.mr }, { TILE_32.nr }, _>(
            alpha, a, b, beta, c, Simd128,
        )
    } else {
        portable::gemm_blocked::<T, { TILE_64.mr }, { TILE_64.nr }, _>(
            alpha, a, b, beta, c, Simd128,
        )
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
            alpha, a, b_packed, beta, c, a_buf, Simd128,
        )
    } else {
        portable::block::<T, { TILE_64.mr }, { TILE_64.nr }, _>(
            alpha, a, b_packed, beta, c, a_buf, Simd128,
        )
    }
}
