//! The check's passes in vector registers on x86_64 with AVX-512F: 512-bit ones, or
//! 256-bit ones (AVX-512VL gives them 32 registers too) where those run the check cheaper
//! (see [`Registers`](super::Registers)). One loop for each kind of pass, generic over the
//! lanes it sums in ([`Lanes`]): f64 lanes fed from f32 or f64 rows ([`Wide`],
//! [`Wide256`]), or f32 lanes fed from f32 rows ([`Narrow`], [`Narrow256`]: an f32 job's
//! passes, see "f32 passes" in the parent's docs). Every lane's sum is widened into an f64
//! total after at most [`NARROW_CHAIN`] of its own terms; a narrow row or block whose f32
//! sums overflow is done again wide.

use std::arch::x86_64::*;
use std::marker::PhantomData;

use super::{Element, NARROW_CHAIN, PREFETCH, Registers, Stats};

/// One kind of lanes: what a row's and a column's elements are, and the few vector
/// operations the passes take. Every method is inlined into the passes below, which carry
/// the CPU features (their callers checked AVX-512F, AVX-512VL and FMA).
trait Lanes {
    /// Elements of the rows read (A, B, C and results).
    type Row: Copy;
    /// Elements of `r` and `W`.
    type Col: Copy;
    type V: Copy;
    /// Elements a vector holds.
    const WIDTH: usize;
    fn zero() -> Self::V;
    /// `WIDTH` elements of `row` from `l` on. Safety: `l + WIDTH <= row.len()`.
    unsafe fn row(row: &[Self::Row], l: usize) -> Self::V;
    /// As [`Lanes::row`], of a column.
    unsafe fn col(col: &[Self::Col], l: usize) -> Self::V;
    fn fmadd(a: Self::V, b: Self::V, acc: Self::V) -> Self::V;
    fn add(a: Self::V, b: Self::V) -> Self::V;
    fn abs(a: Self::V) -> Self::V;
    /// The larger of each lane, `b`'s where `a` is NaN.
    fn max(a: Self::V, b: Self::V) -> Self::V;
    /// The sum of every lane, each widened to f64 first.
    fn total(v: Self::V) -> f64;
    /// The largest lane.
    fn peak(v: Self::V) -> f64;
    fn row_f64(v: Self::Row) -> f64;
    fn col_f64(v: Self::Col) -> f64;
}

/// f64 lanes, eight a vector (512 bits), fed from rows of `T` (f32 widened as they are
/// loaded).
struct Wide<T>(PhantomData<T>);

/// f32 lanes, sixteen a vector (512 bits), fed from f32 rows.
struct Narrow;

impl<T: Element> Lanes for Wide<T> {
    type Row = T;
    type Col = f64;
    type V = __m512d;
    const WIDTH: usize = 8;
    #[inline(always)]
    fn zero() -> __m512d {
        // SAFETY: the passes this is inlined into enable AVX-512F.
        unsafe { _mm512_setzero_pd() }
    }
    #[inline(always)]
    unsafe fn row(row: &[T], l: usize) -> __m512d {
        // SAFETY: as the caller promised; AVX-512F as above.
        unsafe {
            if T::F32 {
                _mm512_cvtps_pd(_mm256_loadu_ps(row.as_ptr().add(l).cast::<f32>()))
            } else {
                _mm512_loadu_pd(row.as_ptr().add(l).cast::<f64>())
            }
        }
    }
    #[inline(always)]
    unsafe fn col(col: &[f64], l: usize) -> __m512d {
        // SAFETY: as the caller promised; AVX-512F as above.
        unsafe { _mm512_loadu_pd(col.as_ptr().add(l)) }
    }
    #[inline(always)]
    fn fmadd(a: __m512d, b: __m512d, acc: __m512d) -> __m512d {
        // SAFETY: AVX-512F as above.
        unsafe { _mm512_fmadd_pd(a, b, acc) }
    }
    #[inline(always)]
    fn add(a: __m512d, b: __m512d) -> __m512d {
        // SAFETY: AVX-512F as above.
        unsafe { _mm512_add_pd(a, b) }
    }
    #[inline(always)]
    fn abs(a: __m512d) -> __m512d {
        // SAFETY: AVX-512F as above.
        unsafe { _mm512_abs_pd(a) }
    }
    #[inline(always)]
    fn max(a: __m512d, b: __m512d) -> __m512d {
        // SAFETY: AVX-512F as above.
        unsafe { _mm512_max_pd(a, b) }
    }
    #[inline(always)]
    fn total(v: __m512d) -> f64 {
        // SAFETY: AVX-512F as above.
        unsafe { _mm512_reduce_add_pd(v) }
    }
    #[inline(always)]
    fn peak(v: __m512d) -> f64 {
        // SAFETY: AVX-512F as above.
        unsafe { _mm512_reduce_max_pd(v) }
    }
    #[inline(always)]
    fn row_f64(v: T) -> f64 {
        v.widen()
    }
    #[inline(always)]
    fn col_f64(v: f64) -> f64 {
        v
    }
}

impl Lanes for Narrow {
    type Row = f32;
    type Col = f32;
    type V = __m512;
    const WIDTH: usize = 16;
    #[inline(always)]
    fn zero() -> __m512 {
        // SAFETY: the passes this is inlined into enable AVX-512F.
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn row(row: &[f32], l: usize) -> __m512 {
        // SAFETY: as the caller promised; AVX-512F as above.
        unsafe { _mm512_loadu_ps(row.as_ptr().add(l)) }
    }
    #[inline(always)]
    unsafe fn col(col: &[f32], l: usize) -> __m512 {
        // SAFETY: as the caller promised; AVX-512F as above.
        unsafe { _mm512_loadu_ps(col.as_ptr().add(l)) }
    }
    #[inline(always)]
    fn fmadd(a: __m512, b: __m512, acc: __m512) -> __m512 {
        // SAFETY: AVX-512F as above.
        unsafe { _mm512_fmadd_ps(a, b, acc) }
    }
    #[inline(always)]
    fn add(a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F as above.
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    fn abs(a: __m512) -> __m512 {
        // SAFETY: AVX-512F as above.
        unsafe { _mm512_abs_ps(a) }
    }
    #[inline(always)]
    fn max(a: __m512, b: __m512) -> __m512 {
        // SAFETY: AVX-512F as above.
        unsafe { _mm512_max_ps(a, b) }
    }
    #[inline(always)]
    fn total(v: __m512) -> f64 {
        // SAFETY: AVX-512F as above.
        unsafe {
            let low = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
            let high = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                _mm512_castps_pd(v),
            )));
            _mm512_reduce_add_pd(_mm512_add_pd(low, high))
        }
    }
    #[inline(always)]
    fn peak(v: __m512) -> f64 {
        // SAFETY: AVX-512F as above.
        f64::from(unsafe { _mm512_reduce_max_ps(v) })
    }
    #[inline(always)]
    fn row_f64(v: f32) -> f64 {
        f64::from(v)
    }
    #[inline(always)]
    fn col_f64(v: f32) -> f64 {
        f64::from(v)
    }
}

/// f64 lanes, four a vector (256 bits), fed from rows of `T` (f32 widened as they are
/// loaded).
struct Wide256<T>(PhantomData<T>);

/// f32 lanes, eight a vector (256 bits), fed from f32 rows.
struct Narrow256;

impl<T: Element> Lanes for Wide256<T> {
    type Row = T;
    type Col = f64;
    type V = __m256d;
    const WIDTH: usize = 4;
    #[inline(always)]
    fn zero() -> __m256d {
        // SAFETY: the passes this is inlined into enable AVX2.
        unsafe { _mm256_setzero_pd() }
    }
    #[inline(always)]
    unsafe fn row(row: &[T], l: usize) -> __m256d {
        // SAFETY: as the caller promised; AVX2 as above.
        unsafe {
            if T::F32 {
                _mm256_cvtps_pd(_mm_loadu_ps(row.as_ptr().add(l).cast::<f32>()))
            } else {
                _mm256_loadu_pd(row.as_ptr().add(l).cast::<f64>())
            }
        }
    }
    #[inline(always)]
    unsafe fn col(col: &[f64], l: usize) -> __m256d {
        // SAFETY: as the caller promised; AVX2 as above.
        unsafe { _mm256_loadu_pd(col.as_ptr().add(l)) }
    }
    #[inline(always)]
    fn fmadd(a: __m256d, b: __m256d, acc: __m256d) -> __m256d {
        // SAFETY: FMA, which the passes enable.
        unsafe { _mm256_fmadd_pd(a, b, acc) }
    }
    #[inline(always)]
    fn add(a: __m256d, b: __m256d) -> __m256d {
        // SAFETY: AVX2 as above.
        unsafe { _mm256_add_pd(a, b) }
    }
    #[inline(always)]
    fn abs(a: __m256d) -> __m256d {
        // SAFETY: AVX2 as above.
        unsafe { _mm256_andnot_pd(_mm256_set1_pd(-0.0), a) }
    }
    #[inline(always)]
    fn max(a: __m256d, b: __m256d) -> __m256d {
        // SAFETY: AVX2 as above.
        unsafe { _mm256_max_pd(a, b) }
    }
    #[inline(always)]
    fn total(v: __m256d) -> f64 {
        // SAFETY: AVX2 as above.
        unsafe {
            let pair = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd::<1>(v));
            _mm_cvtsd_f64(_mm_add_sd(pair, _mm_unpackhi_pd(pair, pair)))
        }
    }
    #[inline(always)]
    fn peak(v: __m256d) -> f64 {
        // SAFETY: AVX2 as above.
        unsafe {
            let pair = _mm_max_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd::<1>(v));
            _mm_cvtsd_f64(_mm_max_sd(pair, _mm_unpackhi_pd(pair, pair)))
        }
    }
    #[inline(always)]
    fn row_f64(v: T) -> f64 {
        v.widen()
    }
    #[inline(always)]
    fn col_f64(v: f64) -> f64 {
        v
    }
}

impl Lanes for Narrow256 {
    type Row = f32;
    type Col = f32;
    type V = __m256;
    const WIDTH: usize = 8;
    #[inline(always)]
    fn zero() -> __m256 {
        // SAFETY: the passes this is inlined into enable AVX2.
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn row(row: &[f32], l: usize) -> __m256 {
        // SAFETY: as the caller promised; AVX2 as above.
        unsafe { _mm256_loadu_ps(row.as_ptr().add(l)) }
    }
    #[inline(always)]
    unsafe fn col(col: &[f32], l: usize) -> __m256 {
        // SAFETY: as the caller promised; AVX2 as above.
        unsafe { _mm256_loadu_ps(col.as_ptr().add(l)) }
    }
    #[inline(always)]
    fn fmadd(a: __m256, b: __m256, acc: __m256) -> __m256 {
        // SAFETY: FMA, which the passes enable.
        unsafe { _mm256_fmadd_ps(a, b, acc) }
    }
    #[inline(always)]
    fn add(a: __m256, b: __m256) -> __m256 {
        // SAFETY: AVX2 as above.
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    fn abs(a: __m256) -> __m256 {
        // SAFETY: AVX2 as above.
        unsafe { _mm256_andnot_ps(_mm256_set1_ps(-0.0), a) }
    }
    #[inline(always)]
    fn max(a: __m256, b: __m256) -> __m256 {
        // SAFETY: AVX2 as above.
        unsafe { _mm256_max_ps(a, b) }
    }
    #[inline(always)]
    fn total(v: __m256) -> f64 {
        // SAFETY: AVX2 as above.
        unsafe {
            let wide = _mm256_add_pd(
                _mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)),
            );
            Wide256::<f64>::total(wide)
        }
    }
    #[inline(always)]
    fn peak(v: __m256) -> f64 {
        // SAFETY: AVX2 as above.
        unsafe {
            let quad = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let pair = _mm_max_ps(quad, _mm_movehl_ps(quad, quad));
            f64::from(_mm_cvtss_f32(_mm_max_ss(
                pair,
                _mm_shuffle_ps::<1>(pair, pair),
            )))
        }
    }
    #[inline(always)]
    fn row_f64(v: f32) -> f64 {
        f64::from(v)
    }
    #[inline(always)]
    fn col_f64(v: f32) -> f64 {
        f64::from(v)
    }
}

/// `(Σ x·r, Σ |x|, max |x|)` of every row `x` of `rows` (`width` elements each) appended to
/// `out`, four vectors per sum, in `registers`; f32 rows with `r32` in f32 lanes, a row
/// whose f32 sums overflow again in f64. `DOT_ONLY`: `Σ x·r` alone, the rest 0.
///
/// # Safety
/// The CPU has AVX-512F, AVX-512VL, AVX2 and FMA.
pub(super) unsafe fn row_stats<T: Element, const DOT_ONLY: bool>(
    registers: Registers,
    rows: &[T],
    width: usize,
    r: &[f64],
    r32: Option<&[f32]>,
    out: &mut Vec<Stats>,
) {
    // SAFETY: as the caller promised.
    unsafe {
        match registers {
            Registers::Zmm => row_stats_zmm::<T, DOT_ONLY>(rows, width, r, r32, out),
            Registers::Ymm => row_stats_ymm::<T, DOT_ONLY>(rows, width, r, r32, out),
        }
    }
}

/// [`row_stats`] in 512-bit registers.
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn row_stats_zmm<T: Element, const DOT_ONLY: bool>(
    rows: &[T],
    width: usize,
    r: &[f64],
    r32: Option<&[f32]>,
    out: &mut Vec<Stats>,
) {
    row_stats_in::<Narrow, Wide<T>, DOT_ONLY>(rows, width, r, r32, out)
}

/// [`row_stats`] in 256-bit registers.
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn row_stats_ymm<T: Element, const DOT_ONLY: bool>(
    rows: &[T],
    width: usize,
    r: &[f64],
    r32: Option<&[f32]>,
    out: &mut Vec<Stats>,
) {
    row_stats_in::<Narrow256, Wide256<T>, DOT_ONLY>(rows, width, r, r32, out)
}

/// [`row_stats`] in narrow lanes `N` (f32 rows with `r32`) and wide lanes `W`.
#[inline(always)]
fn row_stats_in<N, W, const DOT_ONLY: bool>(
    rows: &[W::Row],
    width: usize,
    r: &[f64],
    r32: Option<&[f32]>,
    out: &mut Vec<Stats>,
) where
    N: Lanes<Row = f32, Col = f32>,
    W: Lanes<Col = f64>,
    W::Row: Element,
{
    if width == 0 {
        return;
    }
    let r32 = r32.filter(|_| W::Row::F32);
    for row in rows.chunks_exact(width) {
        if let Some(r32) = r32 {
            let (dot, sum, max) = row_pass::<N, DOT_ONLY>(bytemuck::cast_slice(row), r32);
            if dot.is_finite() && sum.is_finite() {
                out.push((dot, sum, max));
                continue;
            }
        }
        out.push(row_pass::<W, DOT_ONLY>(row, r));
    }
}

/// One row of [`row_stats`]: four vectors per sum, so that no chain of dependent adds holds
/// the loop up, folded lane by lane at the end (two more roundings on a narrow lane's
/// chain); the tail (under four vectors) in f64.
#[inline(always)]
fn row_pass<L: Lanes, const DOT_ONLY: bool>(row: &[L::Row], r: &[L::Col]) -> Stats {
    const U: usize = 4;
    let step = L::WIDTH * U;
    let line = 64 / std::mem::size_of::<L::Row>();
    let full = row.len().min(r.len()) / step * step;
    let fold = |v: [L::V; U]| L::add(L::add(v[0], v[1]), L::add(v[2], v[3]));
    let (mut d, mut s) = (0.0, 0.0);
    let mut max = [L::zero(); U];
    let mut l = 0;
    while l < full {
        let stretch = (full - l).min(step * NARROW_CHAIN);
        let mut dot = [L::zero(); U];
        let mut sum = [L::zero(); U];
        for at in (l..l + stretch).step_by(step) {
            for u in 0..U {
                let at = at + L::WIDTH * u;
                if at % line == 0 {
                    // The row's lines a few KiB ahead (into the rows after it): a hint,
                    // never a fault.
                    // SAFETY: SSE, which every x86_64 has.
                    unsafe {
                        _mm_prefetch::<_MM_HINT_T0>(
                            row.as_ptr().wrapping_add(at + 4 * PREFETCH).cast::<i8>(),
                        )
                    };
                }
                // SAFETY: `at + WIDTH <= full <= row.len(), r.len()`.
                let (v, q) = unsafe { (L::row(row, at), L::col(r, at)) };
                dot[u] = L::fmadd(v, q, dot[u]);
                if !DOT_ONLY {
                    let a = L::abs(v);
                    sum[u] = L::add(sum[u], a);
                    // The running maximum second: a NaN `a` leaves it as it was.
                    max[u] = L::max(a, max[u]);
                }
            }
        }
        d += L::total(fold(dot));
        if !DOT_ONLY {
            s += L::total(fold(sum));
        }
        l += stretch;
    }
    let mut m = L::peak(L::max(L::max(max[0], max[1]), L::max(max[2], max[3])));
    for (&v, &q) in row[full..].iter().zip(&r[full..]) {
        let v = L::row_f64(v);
        d = v.mul_add(L::col_f64(q), d);
        if !DOT_ONLY {
            s += v.abs();
            m = if v.abs() > m { v.abs() } else { m };
        }
    }
    (d, s, m)
}

/// `out[t·width + offset + c] = Σ_l f(A_tl)·w[c·k + l]` for every row `t` of `a` (`k`
/// elements each) and every column `c` of `w`, where `f` is `|·|` when `ABS`; with
/// `sum_at`, also `out[t·width + sum_at] = Σ_l |A_tl|`, in `registers`. With `w32` (`w`
/// rounded to f32) and f32 rows, in f32 lanes, three rows at a time (with four, the
/// accumulators, rows and `|row|`s take more than the 32 registers and spill); else four.
///
/// # Safety
/// The CPU has AVX-512F, AVX-512VL, AVX2 and FMA; `k > 0`.
pub(super) unsafe fn times<T: Element, const ABS: bool>(
    registers: Registers,
    a: &[T],
    k: usize,
    w: (&[f64], Option<&[f32]>),
    out: &mut [f64],
    at: (usize, usize),
    sum_at: Option<usize>,
) {
    // SAFETY: as the caller promised.
    unsafe {
        match registers {
            Registers::Zmm => times_zmm::<T, ABS>(a, k, w, out, at, sum_at),
            Registers::Ymm => times_ymm::<T, ABS>(a, k, w, out, at, sum_at),
        }
    }
}

/// [`times`] in 512-bit registers.
#[target_feature(enable = "avx512f,fma")]
unsafe fn times_zmm<T: Element, const ABS: bool>(
    a: &[T],
    k: usize,
    (w, w32): (&[f64], Option<&[f32]>),
    out: &mut [f64],
    at: (usize, usize),
    sum_at: Option<usize>,
) {
    match w32.filter(|_| T::F32) {
        Some(w32) => times_by::<Narrow, Wide<T>, ABS, 3>(a, k, (w, Some(w32)), out, at, sum_at),
        None => times_by::<Narrow, Wide<T>, ABS, 4>(a, k, (w, None), out, at, sum_at),
    }
}

/// [`times`] in 256-bit registers.
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn times_ymm<T: Element, const ABS: bool>(
    a: &[T],
    k: usize,
    (w, w32): (&[f64], Option<&[f32]>),
    out: &mut [f64],
    at: (usize, usize),
    sum_at: Option<usize>,
) {
    match w32.filter(|_| T::F32) {
        Some(w32) => {
            times_by::<Narrow256, Wide256<T>, ABS, 3>(a, k, (w, Some(w32)), out, at, sum_at)
        }
        None => times_by::<Narrow256, Wide256<T>, ABS, 4>(a, k, (w, None), out, at, sum_at),
    }
}

/// [`times`] `R` rows at a time, against up to six columns of `w`: each element of `w`
/// loaded once for `R` products, each of `A` loaded once for six. (Cutting `k` into
/// L1-sized stretches of `w` was tried: slower, the rows of `A` then stream in pieces.)
#[inline(always)]
fn times_by<N, W, const ABS: bool, const R: usize>(
    a: &[W::Row],
    k: usize,
    (w, w32): (&[f64], Option<&[f32]>),
    out: &mut [f64],
    (width, offset): (usize, usize),
    sum_at: Option<usize>,
) where
    N: Lanes<Row = f32, Col = f32>,
    W: Lanes<Col = f64>,
    W::Row: Element,
{
    let columns = w.len() / k;
    let rows = a.len() / k;
    for t in (0..rows).step_by(R) {
        let real = (rows - t).min(R);
        let rows_here: [&[W::Row]; R] =
            std::array::from_fn(|h| &a[(t + h.min(real - 1)) * k..][..k]);
        let mut c = 0;
        let with_sums = sum_at.is_some();
        while c < columns || (c == 0 && with_sums) {
            // Columns in groups of at most six, as even as can be (8 is 4 + 4, not 6 + 2).
            let left = columns - c;
            let group = left.div_ceil(left.div_ceil(6).max(1));
            let sums_here = c == 0 && with_sums;
            let at = |g: usize| (c + g.min(group.max(1) - 1)) * k;
            let (sums, abs) = match (group > 4, sums_here) {
                (true, true) => block::<N, W, R, 6, ABS, true>(rows_here, w, w32, at, group),
                (true, false) => block::<N, W, R, 6, ABS, false>(rows_here, w, w32, at, group),
                (false, true) => block::<N, W, R, 4, ABS, true>(rows_here, w, w32, at, group),
                (false, false) => block::<N, W, R, 4, ABS, false>(rows_here, w, w32, at, group),
            };
            for h in 0..real {
                let row = &mut out[(t + h) * width..][..width];
                row[offset + c..][..group].copy_from_slice(&sums[h][..group]);
                if let Some(at) = sum_at.filter(|_| sums_here) {
                    row[at] = abs[h];
                }
            }
            c += group.max(1);
        }
    }
}

/// `R` rows of `A` against `G` columns of `w` (`group` of them real, the column at
/// `at(g)`, the rest repeats of the last; none when `group` is 0): `sums[h][g]` = row `h`
/// times column `g`, and with `SUM`, `abs[h]` = `Σ |A_hl|`. With `w32` and f32 rows in f32
/// lanes; a block whose f32 sums overflow again in f64.
#[inline(always)]
fn block<N, W, const R: usize, const G: usize, const ABS: bool, const SUM: bool>(
    rows: [&[W::Row]; R],
    w: &[f64],
    w32: Option<&[f32]>,
    at: impl Fn(usize) -> usize,
    group: usize,
) -> ([[f64; 6]; R], [f64; R])
where
    N: Lanes<Row = f32, Col = f32>,
    W: Lanes<Col = f64>,
    W::Row: Element,
{
    let k = rows[0].len();
    if let Some(w32) = w32.filter(|_| W::Row::F32) {
        let rows32 = rows.map(bytemuck::cast_slice::<W::Row, f32>);
        let columns = std::array::from_fn(|g| {
            if group == 0 {
                &[][..]
            } else {
                &w32[at(g)..][..k]
            }
        });
        let (sums, abs) = block_pass::<N, R, G, ABS, SUM>(rows32, columns, group);
        let finite = sums
            .iter()
            .all(|row| row[..G.min(group)].iter().all(|v| v.is_finite()))
            && abs.iter().all(|v| v.is_finite());
        if finite {
            return (sums, abs);
        }
    }
    let columns = std::array::from_fn(|g| {
        if group == 0 {
            &[][..]
        } else {
            &w[at(g)..][..k]
        }
    });
    block_pass::<W, R, G, ABS, SUM>(rows, columns, group)
}

/// [`block`] in lanes `L`: a stretch of at most [`NARROW_CHAIN`] vectors of every row at a
/// time in registers ([`stretch`]), widened into f64 totals after each; the tail (under
/// one vector) in f64.
#[inline(always)]
fn block_pass<L: Lanes, const R: usize, const G: usize, const ABS: bool, const SUM: bool>(
    rows: [&[L::Row]; R],
    columns: [&[L::Col]; G],
    group: usize,
) -> ([[f64; 6]; R], [f64; R]) {
    let k = rows[0].len();
    let full = k / L::WIDTH * L::WIDTH;
    let mut sums = [[0.0; 6]; R];
    let mut abs = [0.0; R];
    let mut l = 0;
    while l < full {
        let end = full.min(l + L::WIDTH * NARROW_CHAIN);
        let (acc, abs_acc) = stretch::<L, R, G, ABS, SUM>(rows, columns, group, l..end);
        for h in 0..R {
            for g in 0..G.min(group) {
                sums[h][g] += L::total(acc[h][g]);
            }
            if SUM {
                abs[h] += L::total(abs_acc[h]);
            }
        }
        l = end;
    }
    for h in 0..R {
        for g in 0..G.min(group) {
            for l in full..k {
                let v = L::row_f64(rows[h][l]);
                let v = if ABS { v.abs() } else { v };
                sums[h][g] = v.mul_add(L::col_f64(columns[g][l]), sums[h][g]);
            }
        }
        if SUM {
            abs[h] += rows[h][full..]
                .iter()
                .map(|&v| L::row_f64(v).abs())
                .sum::<f64>();
        }
    }
    (sums, abs)
}

/// The sums of [`block_pass`] over `stretch` (whole vectors, within every row and column),
/// in registers.
#[inline(always)]
fn stretch<L: Lanes, const R: usize, const G: usize, const ABS: bool, const SUM: bool>(
    rows: [&[L::Row]; R],
    columns: [&[L::Col]; G],
    group: usize,
    stretch: std::ops::Range<usize>,
) -> ([[L::V; G]; R], [L::V; R]) {
    let load = |row: &[L::Row], l: usize| {
        // SAFETY: `l + WIDTH <= stretch.end <= row.len()`.
        let v = unsafe { L::row(row, l) };
        if ABS { L::abs(v) } else { v }
    };
    let line = 64 / std::mem::size_of::<L::Row>();
    let mut acc = [[L::zero(); G]; R];
    let mut abs_acc = [L::zero(); R];
    for l in stretch.step_by(L::WIDTH) {
        if l % line == 0 {
            for row in rows {
                // A line of each row a few hundred elements ahead: a hint, never a fault.
                // SAFETY: SSE, which every x86_64 has.
                unsafe {
                    _mm_prefetch::<_MM_HINT_T0>(
                        row.as_ptr().wrapping_add(l + PREFETCH).cast::<i8>(),
                    )
                };
            }
        }
        let xs: [L::V; R] = std::array::from_fn(|h| load(rows[h], l));
        if SUM {
            for h in 0..R {
                abs_acc[h] = L::add(abs_acc[h], L::abs(xs[h]));
            }
        }
        if group > 0 {
            for g in 0..G {
                // SAFETY: `l + WIDTH <= stretch.end`, within every column.
                let wv = unsafe { L::col(columns[g], l) };
                for h in 0..R {
                    acc[h][g] = L::fmadd(xs[h], wv, acc[h][g]);
                }
            }
        }
    }
    (acc, abs_acc)
}
