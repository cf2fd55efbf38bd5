//! The blocked GEMM every path runs: copy panels of A and B into contiguous, zero-padded
//! buffers sized for the caches, then sweep a register-blocked micro-kernel over them.
//!
//! The driver is generic over the micro-kernel (`MicroKernel`), so a faster path supplies
//! only its kernel and shares the packing, blocking and edge handling here. The portable
//! kernel is plain loops over fixed-size arrays for LLVM to vectorize with whatever target
//! features the caller is compiled with. Everything on the hot path is `#[inline(always)]` so
//! that `x86_64`'s `#[target_feature]` wrappers really do recompile it with AVX2: a generic
//! function that is not inlined is compiled once, for the baseline target.

use super::{Element, MatMut, MatRef};

/// Register tile: the micro-kernel holds an `mr x nr` block of C in registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tile {
    pub mr: usize,
    pub nr: usize,
}

// Baseline x86_64 (SSE2) and wasm32 simd128 have sixteen 128-bit registers. Two vectors per
// row of the tile and four rows make 8 accumulators, leaving room for the B vectors and the
// A broadcasts; a larger tile spills.
#[cfg(not(all(target_arch = "wasm32", not(target_feature = "simd128"))))]
const TILE_32: Tile = Tile { mr: 4, nr: 8 };
// Scalar wasm32 keeps every accumulator in its own local, and engines spill 32 of them: 4x4
// ran 40% faster than 4x8 under Node 20 (V8).
#[cfg(all(target_arch = "wasm32", not(target_feature = "simd128")))]
const TILE_32: Tile = Tile { mr: 4, nr: 4 };
const TILE_64: Tile = Tile { mr: 4, nr: 4 };

#[cfg(feature = "rayon")]
pub(crate) fn tile<T>() -> Tile {
    if size_of::<T>() == 4 {
        TILE_32
    } else {
        TILE_64
    }
}

/// Cache blocking: C is computed in `mc x nc` blocks, `kc` terms of the inner sum at a time.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Blocking {
    pub mc: usize,
    pub kc: usize,
    pub nc: usize,
}

/// `kc x nr` of B (16 KiB for f32 at nr = 16) stays in a 32 KiB L1 while an `mc x kc` block
/// of A (~144 KiB) streams from L2; the `kc x nc` panel of B (4-8 MiB) is meant for L3.
/// These follow BLIS's choices for AMD Zen, and suit recent Intel cores too.
///
/// Tiles of 512-bit registers (128-byte rows of C) take a deeper `kc`, 4 KiB of each row
/// of A: each pass over a C tile then does four times the arithmetic per load and store.
/// Measured on Zen 5 (`tabgrid-worker bench`, n = 2048, one thread): f32 192 GFLOP/s at
/// kc = 256, 210 at 384, 226 at 512, 231 at 1024; f64 95 at 256, 105 at 512, 96 at 1024.
pub(crate) fn blocking<T>(tile: Tile) -> Blocking {
    const KC: usize = 256;
    const WIDE_KC_BYTES: usize = 4096;
    const A_BLOCK_BYTES: usize = 144 * 1024;
    const NC: usize = 4080;
    let size = size_of::<T>().max(1);
    let kc = if tile.nr * size >= 128 {
        WIDE_KC_BYTES / size
    } else {
        KC
    };
    let mc = A_BLOCK_BYTES / (kc * size);
    Blocking {
        mc: (mc / tile.mr).max(1) * tile.mr,
        kc,
        nc: (NC / tile.nr).max(1) * tile.nr,
    }
}

/// The step for cutting `len` into as few pieces of at most `max` as possible, evened out
/// and rounded up to a multiple of `multiple` (which `max` must be a multiple of). With k
/// = 257 and a `kc` of 256, for instance, two slices of 129 and 128 rather than 256 and 1,
/// so no pass over C is spent on a sliver of work.
#[inline(always)]
pub(crate) fn even_step(len: usize, max: usize, multiple: usize) -> usize {
    let pieces = len.div_ceil(max).max(1);
    len.div_ceil(pieces).next_multiple_of(multiple)
}

/// Copies `src` into panels of `W` rows, each stored k-major (element `(i, p)` of a panel
/// at `p * W + i`), so the micro-kernel reads one contiguous `W`-vector per step of
/// the inner sum. Rows past the edge of `src` are zero, so edge tiles run the same
/// full-size kernel instead of a slow scalar tail; their results are simply not stored.
///
/// A is packed as is; B is packed as `B.t()`, whose rows are B's columns.
/// `out.len()` must be `src.cols * src.rows.next_multiple_of(W)`.
#[inline(always)]
pub(crate) fn pack<T: Element, const W: usize>(src: MatRef<'_, T>, out: &mut [T]) {
    let (rows, depth) = (src.rows, src.cols);
    let (rs, cs) = (src.row_stride, src.col_stride);
    debug_assert_eq!(out.len(), depth * rows.next_multiple_of(W));
    for (q, panel) in out.chunks_exact_mut(depth * W).enumerate() {
        let i0 = q * W;
        let live = W.min(rows - i0);
        if live < W {
            panel.fill(T::ZERO);
        }
        if rs == 1 && live == W {
            // The panel's rows are adjacent: each step of the inner sum is one fixed-size
            // copy, which compiles to a few vector moves rather than a call to `memcpy`.
            for (p, dst) in panel.chunks_exact_mut(W).enumerate() {
                let start = i0 + p * cs;
                let src: &[T; W] = src.data[start..start + W].try_into().expect("W elements");
                dst.copy_from_slice(src);
            }
        } else if rs == 1 {
            for (p, dst) in panel.chunks_exact_mut(W).enumerate() {
                let start = i0 + p * cs;
                dst[..live].copy_from_slice(&src.data[start..start + live]);
            }
        } else if cs == 1 && live == W {
            // Each row is contiguous. Walking all W rows side by side keeps W streams of
            // cache misses in flight, where finishing one row before the next would wait on
            // each row's misses in turn.
            let rows: [&[T]; W] = core::array::from_fn(|i| &src.data[(i0 + i) * rs..][..depth]);
            for (p, dst) in panel.chunks_exact_mut(W).enumerate() {
                for (dst, row) in dst.iter_mut().zip(&rows) {
                    *dst = row[p];
                }
            }
        } else if cs == 1 {
            for i in 0..live {
                let start = (i0 + i) * rs;
                let row = &src.data[start..start + depth];
                for (dst, &x) in panel[i..].iter_mut().step_by(W).zip(row) {
                    *dst = x;
                }
            }
        } else {
            for (p, dst) in panel.chunks_exact_mut(W).enumerate() {
                for (i, dst) in dst[..live].iter_mut().enumerate() {
                    *dst = src.data[(i0 + i) * rs + p * cs];
                }
            }
        }
    }
}

/// [`pack`] for a width known only at run time, as in the rayon driver.
#[cfg(feature = "rayon")]
pub(crate) fn pack_with_width<T: Element>(src: MatRef<'_, T>, width: usize, out: &mut [T]) {
    match width {
        4 => pack::<T, 4>(src, out),
        6 => pack::<T, 6>(src, out),
        8 => pack::<T, 8>(src, out),
        12 => pack::<T, 12>(src, out),
        16 => pack::<T, 16>(src, out),
        32 => pack::<T, 32>(src, out),
        _ => unreachable!("no path uses a tile {width} wide"),
    }
}

/// The first `len` elements of `buf` past a 64-byte boundary, growing `buf` as needed, so
/// that vector loads from packed panels do not straddle cache lines.
#[inline(always)]
pub(crate) fn aligned<T: Element>(buf: &mut Vec<T>, len: usize) -> &mut [T] {
    const LINE: usize = 64;
    let slack = LINE / size_of::<T>().max(1);
    if buf.len() < len + slack {
        buf.resize(len + slack, T::ZERO);
    }
    let offset = buf.as_ptr().align_offset(LINE).min(slack);
    &mut buf[offset..offset + len]
}

/// The register-blocked core of a path: everything else in this file is shared.
pub(crate) trait MicroKernel<T, const MR: usize, const NR: usize>: Copy {
    /// `MR x NR` block of `A·B` from a packed A panel and a packed B panel of equal depth.
    fn run(self, a: &[T], b: &[T]) -> [[T; NR]; MR];

    /// Whether `prefetch_c_row` does anything, so the driver can skip computing addresses.
    const PREFETCHES: bool = false;

    /// Called with the first and last element of each row of the C tile before `run`
    /// computes it, so that paths able to prefetch can have C's cache lines arrive during
    /// the arithmetic instead of stalling the store that follows.
    #[inline(always)]
    fn prefetch_c_row(self, _first: &T, _last: &T) {}
}

// Intrinsic micro-kernels exist only for f32 and f64, but the driver is generic over
// `Element`: a path's `MicroKernel::run` checks `TypeId` and reinterprets with these. Only
// the paths with intrinsic kernels use them.

/// `s` reinterpreted as `&[U]`, when `T` and `U` are the same type.
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "wasm32", target_feature = "simd128"),
    all(target_arch = "aarch64", target_feature = "neon")
))]
#[inline(always)]
pub(crate) fn same_slice<T: 'static, U: 'static>(s: &[T]) -> &[U] {
    assert!(core::any::TypeId::of::<T>() == core::any::TypeId::of::<U>());
    // SAFETY: `T` and `U` are the same type (asserted above), so this is the slice itself.
    unsafe { core::slice::from_raw_parts(s.as_ptr().cast::<U>(), s.len()) }
}

/// `v` reinterpreted as a `U`, when `T` and `U` are the same type.
#[cfg(any(
    target_arch = "x86_64",
    all(target_arch = "wasm32", target_feature = "simd128"),
    all(target_arch = "aarch64", target_feature = "neon")
))]
#[inline(always)]
pub(crate) fn same_value<T: Copy + 'static, U: Copy + 'static>(v: T) -> U {
    assert!(core::any::TypeId::of::<T>() == core::any::TypeId::of::<U>());
    // SAFETY: `T` and `U` are the same `Copy` type (asserted above), so this is a plain copy.
    unsafe { core::mem::transmute_copy(&v) }
}

/// Plain loops over fixed-size arrays for LLVM to vectorize. They multiply and add
/// separately: see [`Element::mul_add`] for why the portable path never fuses.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Portable;

impl<T: Element, const MR: usize, const NR: usize> MicroKernel<T, MR, NR> for Portable {
    #[inline(always)]
    fn run(self, a: &[T], b: &[T]) -> [[T; NR]; MR] {
        let mut acc = [[T::ZERO; NR]; MR];
        for (a, b) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
            let a: &[T; MR] = a.try_into().expect("chunks_exact yields MR elements");
            let b: &[T; NR] = b.try_into().expect("chunks_exact yields NR elements");
            for (acc_row, &ai) in acc.iter_mut().zip(a) {
                for (acc, &bj) in acc_row.iter_mut().zip(b) {
                    *acc = *acc + ai * bj;
                }
            }
        }
        acc
    }
}

/// Writes `alpha·acc + beta·C` into the tile of `c` at `(i0, j0)`, clipped to `c`'s edges;
/// `beta == None` overwrites C without reading it.
#[inline(always)]
fn store<T: Element, const MR: usize, const NR: usize>(
    acc: &[[T; NR]; MR],
    alpha: T,
    beta: Option<T>,
    c: &mut MatMut<'_, T>,
    i0: usize,
    j0: usize,
) {
    let rows = MR.min(c.rows - i0);
    let cols = NR.min(c.cols - j0);
    let (rs, cs) = (c.row_stride, c.col_stride);
    for (i, acc_row) in acc.iter().enumerate().take(rows) {
        let start = (i0 + i) * rs + j0 * cs;
        if cs == 1 {
            let dst = &mut c.data[start..start + cols];
            match beta {
                None => dst
                    .iter_mut()
                    .zip(acc_row)
                    .for_each(|(d, &x)| *d = alpha * x),
                Some(beta) => dst
                    .iter_mut()
                    .zip(acc_row)
                    .for_each(|(d, &x)| *d = alpha * x + beta * *d),
            }
        } else {
            for (j, &x) in acc_row.iter().enumerate().take(cols) {
                let d = &mut c.data[start + j * cs];
                *d = match beta {
                    None => alpha * x,
                    Some(beta) => alpha * x + beta * *d,
                };
            }
        }
    }
}

/// Asks `kernel` to prefetch the rows of the C tile at `(i0, j0)`; see `MicroKernel`.
#[inline(always)]
fn prefetch_tile<T: Element, const MR: usize, const NR: usize, K: MicroKernel<T, MR, NR>>(
    kernel: K,
    c: &MatMut<'_, T>,
    i0: usize,
    j0: usize,
) {
    if !K::PREFETCHES {
        return;
    }
    let cols = NR.min(c.cols - j0);
    for i in i0..i0 + MR.min(c.rows - i0) {
        let first = i * c.row_stride + j0 * c.col_stride;
        let last = first + (cols - 1) * c.col_stride;
        kernel.prefetch_c_row(&c.data[first], &c.data[last]);
    }
}

/// Adds `alpha·A·B` to the rows of C given, where `a` is `mb x kc` and `b_packed` holds the
/// matching `kc x nc` panel of B already packed with width `NR`: C is overwritten when
/// `beta` is `None` and scaled by `beta` first otherwise. A is packed `mc` rows at a time into
/// `a_buf`, which is grown as needed and kept by the caller so it is allocated once.
///
/// This is the unit of work the rayon driver hands to each thread.
#[inline(always)]
pub(crate) fn block<T, const MR: usize, const NR: usize, K>(
    alpha: T,
    a: MatRef<'_, T>,
    b_packed: &[T],
    beta: Option<T>,
    mut c: MatMut<'_, T>,
    a_buf: &mut Vec<T>,
    kernel: K,
) where
    T: Element,
    K: MicroKernel<T, MR, NR>,
{
    let (mb, kc, nc) = (a.rows, a.cols, c.cols);
    debug_assert!(kc > 0 && c.rows == mb);
    debug_assert_eq!(b_packed.len(), kc * nc.next_multiple_of(NR));
    let mc_max = even_step(mb, blocking::<T>(Tile { mr: MR, nr: NR }).mc, MR);
    for ic in (0..mb).step_by(mc_max) {
        let mc = mc_max.min(mb - ic);
        let a_packed = aligned(a_buf, kc * mc.next_multiple_of(MR));
        pack::<T, MR>(a.submatrix(ic, 0, mc, kc), a_packed);
        let mut c = c.rb_mut().submatrix(ic, 0, mc, nc);
        // B's micro-panel outside, A's inside: the kc x NR panel of B stays in L1 while the
        // packed block of A streams past it from L2.
        for (jp, b_panel) in b_packed.chunks_exact(kc * NR).enumerate() {
            for (ip, a_panel) in a_packed.chunks_exact(kc * MR).enumerate() {
                let (i0, j0) = (ip * MR, jp * NR);
                prefetch_tile(kernel, &c, i0, j0);
                let acc = kernel.run(a_panel, b_panel);
                store(&acc, alpha, beta, &mut c, i0, j0);
            }
        }
    }
}

/// How the first `kc`-slice of the inner sum combines with C's old contents; later slices
/// add to what the earlier ones stored.
#[inline(always)]
pub(crate) fn beta_for_slice<T: Element>(pc: usize, beta: T) -> Option<T> {
    match (pc, beta == T::ZERO) {
        (0, true) => None,
        (0, false) => Some(beta),
        _ => Some(T::ONE),
    }
}

/// The whole single-threaded product; shapes are checked and `m, n, k >= 1`.
#[inline(always)]
pub(crate) fn gemm_blocked<T, const MR: usize, const NR: usize, K>(
    alpha: T,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    beta: T,
    mut c: MatMut<'_, T>,
    kernel: K,
) where
    T: Element,
    K: MicroKernel<T, MR, NR>,
{
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let blocking = blocking::<T>(Tile { mr: MR, nr: NR });
    let kc_max = even_step(k, blocking.kc, 1);
    let nc_max = even_step(n, blocking.nc, NR);
    let mut b_buf = Vec::new();
    let mut a_buf = Vec::new();
    for jc in (0..n).step_by(nc_max) {
        let nc = nc_max.min(n - jc);
        for pc in (0..k).step_by(kc_max) {
            let kc = kc_max.min(k - pc);
            let b_packed = aligned(&mut b_buf, kc * nc.next_multiple_of(NR));
            pack::<T, NR>(b.submatrix(pc, jc, kc, nc).t(), b_packed);
            block(
                alpha,
                a.submatrix(0, pc, m, kc),
                b_packed,
                beta_for_slice(pc, beta),
                c.rb_mut().submatrix(0, jc, m, nc),
                &mut a_buf,
                kernel,
            );
        }
    }
}

pub(crate) fn gemm<T: Element>(
    alpha: T,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    beta: T,
    c: MatMut<'_, T>,
) {
    if size_of::<T>() == 4 {
        gemm_blocked::<T, { TILE_32.mr }, { TILE_32.nr }, _>(alpha, a, b, beta, c, Portable)
    } else {
        gemm_blocked::<T, { TILE_64.mr }, { TILE_64.nr }, _>(alpha, a, b, beta, c, Portable)
    }
}

#[cfg(feature = "rayon")]
pub(crate) fn block_dispatch<T: Element>(
    alpha: T,
    a: MatRef<'_, T>,
    b_packed: &[T],
    beta: Option<T>,
    c: MatMut<'_, T>,
    a_buf: &mut Vec<T>,
) {
    if size_of::<T>() == 4 {
        block::<T, { TILE_32.mr }, { TILE_32.nr }, _>(alpha, a, b_packed, beta, c, a_buf, Portable)
    } else {
        block::<T, { TILE_64.mr }, { TILE_64.nr }, _>(alpha, a, b_packed, beta, c, a_buf, Portable)
    }
}
