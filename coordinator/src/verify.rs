//! Freivalds' check: is a tile a worker sent really `alpha·A_i·B_j + beta·C_ij`?
//!
//! With a random vector `r` the coordinator draws and never sends, the tile `T` passes
//! when `T·r` equals `alpha·A_i·(B_j·r) + beta·C_ij·r` row by row, within a rounding
//! tolerance.
//!
//! # What it costs
//!
//! Done tile by tile, the check is `O(m·k + k·n + m·n)` against the `O(m·n·k)` of the
//! tile, but with a tile edge of 256 those passes over `A_i` and `B_j` are a few percent of
//! the tile's arithmetic, at a fraction of the kernel's speed: measured, as much as the
//! compute itself for f32. So a job's check ([`JobCheck`]) draws one `r` over all the
//! result's columns and shares the work between tiles: once per job, a pass over `B`
//! gives, for every row `l` of `B` and column band `j`, `(B_j·r_j)_l`, `Σ|B_lc|` over the
//! band, and `max |B_lc|` over the row (the `W` matrix, `k × (2J+1)`); once per row band
//! `i`, `X_i = A_i·W` (with `|A_i|` for the bound columns) gives every tile of that band its
//! expected `A_i·B_j·r_j` and its bounds. A tile's own check is then one pass over its
//! result (and its C): `O(m·n)`. Where B's rows carry similar weight (each bound column
//! within a factor of two), the bound columns of `X` are replaced by `Σ_l |A_il|` times
//! the column's largest entry: an upper bound at most twice the exact one, for J + 1
//! fewer products per row of A. `cargo xtask bench verify` measures the whole as a share
//! of the job's compute.
//!
//! `r_j` is a random sign times a uniform magnitude in `[1/2, 1]`: an error in one element
//! larger than twice the tolerance is always found, and errors that cancel for one draw
//! (as two opposite ones do for ±1 vectors half the time) do so with probability zero.
//!
//! # The tolerance
//!
//! An honest worker's element `T_ij` differs from the exact value by at most `γ·P_ij`,
//! where `P_ij = |alpha|·Σ_l |A_il|·|B_lj| + |beta|·|C_ij|` and `γ ≈ (k + 2)·u`, `u` the
//! unit roundoff of the job's dtype (2⁻²⁴ for f32, 2⁻⁵³ for f64), whatever the kernel's
//! summation order or use of FMA (the classic worst-case bound for dot products; blocked
//! sums only do better). The check allows `γ = 2·(k + 2)·u`.
//!
//! Row `i` of `T·r − z` is `Σ_j e_ij·r_j` with honest errors `|e_ij| ≤ γ·P_ij` and
//! symmetric `|r_j| ≤ 1` the worker never saw, so it is a sum of independent, bounded,
//! zero-mean terms, and
//! Hoeffding's inequality bounds it by `8·γ·√(Σ_j P_ij²)` except with probability
//! `2·e⁻³² ≈ 3·10⁻¹⁴`. `Σ_j P_ij² ≤ max_j P_ij · Σ_j P_ij`, and both factors have cheap
//! upper bounds: `Σ_j P_ij ≤ S_i = |alpha|·Σ_l |A_il|·(Σ_j |B_lj|) + |beta|·Σ_j |C_ij|`
//! and `max_j P_ij ≤ M_i = |alpha|·Σ_l |A_il|·(max_j |B_lj|) + |beta|·max_j |C_ij|` (the
//! maximum taken over the whole row of `B`, a little looser than over the tile). The
//! check's own f64 rounding adds at most `2·(k + n + 2)·2⁻⁵³·S_i`. So a row passes when
//!
//! ```text
//! |(T·r)_i − z_i| ≤ 8·γ·√(M_i·S_i) + 2·(k + n + 2)·2⁻⁵³·S_i
//! ```
//!
//! An honest tile is refused with probability below 10⁻¹³ per row (tested over many
//! random tiles, with both kernels' summation orders). What gets through: an error
//! in one element smaller than that tolerance — about `16·(k + 2)·u·√(2n)` times the
//! typical `P_ij` of the row; for an f32 tile 256 wide with k = 2048 that is about 2 % of
//! `Σ_l |A_il|·|B_lj|`, for f64 about 10⁻¹¹ of it.
//!
//! Rows whose inputs hold Inf or NaN (so `S_i` is not finite) are not checked: their exact
//! result is itself Inf or NaN. A non-finite `T·r` in a row with finite inputs fails,
//! unless the row's magnitude is near the dtype's overflow threshold.

use std::sync::OnceLock;

use bytes::Bytes;
use rand::RngExt;
use tabgrid_shared::Dtype;
use tabgrid_shared::tiling::TilePlan;

/// What the check needs of one tile, as little-endian bytes of the job's dtype, row-major:
/// A is `m x k`, B is `k x n`, C (when `beta` counts) and the result are `m x n`.
#[derive(Debug, Clone, Copy)]
pub struct Tile<'a> {
    pub dtype: Dtype,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f64,
    pub beta: f64,
    pub a: &'a [u8],
    pub b: &'a [u8],
    pub c: Option<&'a [u8]>,
}

/// Why a tile failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Mismatch {
    pub row: usize,
    /// `(T·r)_row` and `(alpha·A·B·r + beta·C·r)_row`.
    pub got: f64,
    pub want: f64,
    pub tolerance: f64,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "row {} of the tile fails Freivalds' check: T·r = {:e}, A·B·r = {:e}, tolerance {:e}",
            self.row, self.got, self.want, self.tolerance
        )
    }
}

/// Checks one tile on its own (a job of one tile).
pub fn check(tile: &Tile<'_>, result: &[u8], rng: &mut impl rand::Rng) -> Result<(), Mismatch> {
    let plan = TilePlan::new(
        tile.m as u32,
        tile.n as u32,
        tile.k as u32,
        tile.m.max(1) as u32,
        tile.n.max(1) as u32,
    );
    let job = JobCheck::new(
        tile.dtype,
        tile.alpha,
        tile.beta,
        plan,
        vec![Bytes::copy_from_slice(tile.a)],
        vec![Bytes::copy_from_slice(tile.b)],
        rng,
    );
    job.check((0, 0), tile.c.filter(|_| tile.beta != 0.0), result)
}

/// The check of every tile of one job: its secret `r`, and the work tiles share (see the
/// module docs), computed when first needed and kept while the job lives.
#[derive(Debug)]
pub struct JobCheck {
    dtype: Dtype,
    alpha: f64,
    beta: f64,
    plan: TilePlan,
    /// Row panels of A and column panels of B, as workers get them.
    a: Vec<Bytes>,
    b: Vec<Bytes>,
    /// One entry per result column.
    r: Vec<f64>,
    /// What every row band's check needs of B.
    w: OnceLock<Columns>,
    /// Per row band, `m_i × width`: `A_i·W`, with `|A_i|` for the bound columns.
    x: Vec<OnceLock<Vec<f64>>>,
}

/// `W`, `(2J + 1) × k` column by column: for each band `(B_j·r_j)_l`, then for each band
/// `Σ_c |B_lc|`, then `max_c |B_lc|` over the row.
#[derive(Debug)]
struct Columns {
    w: Vec<f64>,
    /// Where the rows of B carry similar weight (each bound column's largest entry within
    /// twice its smallest): per band `max_l Σ_c |B_lc|`, and `max_l max_c |B_lc|`. The
    /// bounds then come from `Σ_l |A_il|` alone (`S_i ≤ |alpha|·Σ_l |A_il|·max_l Σ_c |B_lc|`,
    /// at most twice the exact sum), which saves the J + 1 bound columns of `X`.
    balanced: Option<(Vec<f64>, f64)>,
}

impl Columns {
    /// Columns of `X` per row: the J signed ones, then one (`Σ|A_il|`) or J + 1 bounds.
    fn x_width(&self, bands: usize) -> usize {
        if self.balanced.is_some() {
            bands + 1
        } else {
            2 * bands + 1
        }
    }
}

/// Converts little-endian elements of `dtype` into `out`.
fn to_f64(dtype: Dtype, bytes: &[u8], out: &mut Vec<f64>) {
    out.clear();
    match dtype {
        Dtype::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        ),
        Dtype::F64 => out.extend(
            bytes
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])),
        ),
    }
}

impl JobCheck {
    /// `beta` is the job's when it has a C, else 0. `a` and `b` are the job's panels in
    /// plan order.
    pub fn new(
        dtype: Dtype,
        alpha: f64,
        beta: f64,
        plan: TilePlan,
        a: Vec<Bytes>,
        b: Vec<Bytes>,
        rng: &mut impl rand::Rng,
    ) -> JobCheck {
        let r = (0..plan.n)
            .map(|_| {
                let magnitude = 0.5 + 0.5 * rng.random::<f64>();
                if rng.random::<bool>() {
                    magnitude
                } else {
                    -magnitude
                }
            })
            .collect();
        JobCheck {
            dtype,
            alpha,
            beta,
            x: (0..plan.tiles_i()).map(|_| OnceLock::new()).collect(),
            plan,
            a,
            b,
            r,
            w: OnceLock::new(),
        }
    }

    /// Multiply-adds the next check of a tile in row band `i` costs: the band's share
    /// the first time, then the tile's own pass.
    pub fn cost(&self, (i, j): (u32, u32)) -> usize {
        let (m, n, k) = (
            self.plan.rows(i).len(),
            self.plan.cols(j).len(),
            self.plan.k as usize,
        );
        let mut cost = 2 * m * n;
        if self.x[i as usize].get().is_none() {
            cost += m * k * (self.plan.tiles_j() as usize + 1);
        }
        if self.w.get().is_none() {
            cost += 3 * k * self.plan.n as usize;
        }
        cost
    }

    fn w(&self) -> &Columns {
        self.w.get_or_init(|| {
            let k = self.plan.k as usize;
            let bands = self.plan.tiles_j() as usize;
            let width = 2 * bands + 1;
            let mut w = vec![0.0; k * width];
            let mut row = Vec::new();
            for (j, panel) in self.b.iter().enumerate() {
                let cols = self.plan.cols(j as u32);
                let n = cols.len();
                let r = &self.r[cols.start as usize..cols.end as usize];
                for l in 0..k {
                    let bytes =
                        panel.get(l * n * self.dtype.size()..(l + 1) * n * self.dtype.size());
                    let Some(bytes) = bytes else { break };
                    to_f64(self.dtype, bytes, &mut row);
                    let (dot, sum, max) = row_stats(&row, r);
                    w[j * k + l] = dot;
                    w[(bands + j) * k + l] = sum;
                    let peak = &mut w[2 * bands * k + l];
                    *peak = peak.max(max);
                }
            }
            let spread = |column: &[f64]| {
                let (low, high) = column.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &v| {
                    (lo.min(v), hi.max(v))
                });
                (low > 0.0 && high.is_finite() && high <= 2.0 * low).then_some(high)
            };
            let bounds = &w[bands * k..];
            let balanced = bounds
                .chunks_exact(k.max(1))
                .map(spread)
                .collect::<Option<Vec<f64>>>()
                .filter(|_| k > 0)
                .map(|mut highs| {
                    let peak = highs.pop().unwrap_or(0.0);
                    (highs, peak)
                });
            Columns { w, balanced }
        })
    }

    fn x(&self, i: u32) -> &[f64] {
        self.x[i as usize].get_or_init(|| {
            let columns = self.w();
            let w = &columns.w;
            let k = self.plan.k as usize;
            let m = self.plan.rows(i).len();
            let bands = self.plan.tiles_j() as usize;
            let width = columns.x_width(bands);
            let panel = &self.a[i as usize];
            let mut x = vec![0.0; m * width];
            let (mut row, mut abs) = (Vec::new(), Vec::new());
            for (r, out) in x.chunks_exact_mut(width).enumerate() {
                let bytes = panel.get(r * k * self.dtype.size()..(r + 1) * k * self.dtype.size());
                let Some(bytes) = bytes else { break };
                to_f64(self.dtype, bytes, &mut row);
                let (signed, bounds) = out.split_at_mut(bands);
                dots(&row, &w[..bands * k], signed);
                if columns.balanced.is_some() {
                    bounds[0] = row_stats(&row, &row).1;
                } else {
                    abs.clear();
                    abs.extend(row.iter().map(|v| v.abs()));
                    dots(&abs, &w[bands * k..], bounds);
                }
            }
            x
        })
    }

    /// Checks `result`, the worker's tile `(i, j)`, with `c` its tile of C when beta
    /// counts. Sizes must match the plan (the caller checked the result's).
    pub fn check(
        &self,
        (i, j): (u32, u32),
        c: Option<&[u8]>,
        result: &[u8],
    ) -> Result<(), Mismatch> {
        let (rows, cols) = (self.plan.rows(i), self.plan.cols(j));
        let (m, n, k) = (rows.len(), cols.len(), self.plan.k as usize);
        let bands = self.plan.tiles_j() as usize;
        let x = self.x(i);
        let columns = self.w();
        let width = columns.x_width(bands);
        let r = &self.r[cols.start as usize..cols.end as usize];
        let unit = match self.dtype {
            Dtype::F32 => f64::from(f32::EPSILON) / 2.0,
            Dtype::F64 => f64::EPSILON / 2.0,
        };
        let overflow = match self.dtype {
            Dtype::F32 => f64::from(f32::MAX),
            Dtype::F64 => f64::MAX,
        };
        let gamma = 2.0 * (k + 2) as f64 * unit;
        let own = 2.0 * (k + n + 2) as f64 * (f64::EPSILON / 2.0);
        let beta = c.map_or(0.0, |_| self.beta);
        let mut row = Vec::with_capacity(n);
        for (t, xs) in x.chunks_exact(width).enumerate().take(m) {
            let mut want = self.alpha * xs[j as usize];
            let (scale_ab, peak_ab) = match &columns.balanced {
                Some((sums, peak)) => (xs[bands] * sums[j as usize], xs[bands] * peak),
                None => (xs[bands + j as usize], xs[2 * bands]),
            };
            let mut scale = self.alpha.abs() * scale_ab;
            let mut peak = self.alpha.abs() * peak_ab;
            if let Some(c) = c {
                to_f64(
                    self.dtype,
                    &c[t * n * self.dtype.size()..(t + 1) * n * self.dtype.size()],
                    &mut row,
                );
                let (dot, sum, max) = row_stats(&row, r);
                want += beta * dot;
                scale += beta.abs() * sum;
                peak += beta.abs() * max;
            }
            to_f64(
                self.dtype,
                &result[t * n * self.dtype.size()..(t + 1) * n * self.dtype.size()],
                &mut row,
            );
            let got = row_stats(&row, r).0;
            if !scale.is_finite() || !peak.is_finite() {
                continue;
            }
            let tolerance = 8.0 * gamma * (peak * scale).sqrt() + own * scale + f64::MIN_POSITIVE;
            let fine = if got.is_finite() && want.is_finite() {
                (got - want).abs() <= tolerance
            } else {
                // An overflow the worker's dtype could not avoid.
                scale >= overflow / 2.0
            };
            if !fine {
                return Err(Mismatch {
                    row: t,
                    got,
                    want,
                    tolerance,
                });
            }
        }
        Ok(())
    }
}
/// `(Σ x·r, Σ |x|, max |x|)` of a row.
fn row_stats(x: &[f64], r: &[f64]) -> (f64, f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { row_stats_avx2(x, r) };
    }
    row_stats_lanes(x, r)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn row_stats_avx2(x: &[f64], r: &[f64]) -> (f64, f64, f64) {
    row_stats_lanes(x, r)
}

/// Eight independent lanes, so the loop vectorises without reassociating a sum.
#[inline(always)]
fn row_stats_lanes(x: &[f64], r: &[f64]) -> (f64, f64, f64) {
    const LANES: usize = 8;
    let (mut dot, mut sum, mut max) = ([0.0; LANES], [0.0; LANES], [0.0f64; LANES]);
    let full = x.len().min(r.len()) / LANES * LANES;
    for (xs, rs) in x[..full]
        .chunks_exact(LANES)
        .zip(r[..full].chunks_exact(LANES))
    {
        for l in 0..LANES {
            dot[l] += xs[l] * rs[l];
            sum[l] += xs[l].abs();
            max[l] = max[l].max(xs[l].abs());
        }
    }
    for (v, q) in x[full..].iter().zip(&r[full..]) {
        dot[0] += v * q;
        sum[0] += v.abs();
        max[0] = max[0].max(v.abs());
    }
    (
        dot.iter().sum(),
        sum.iter().sum(),
        max.iter().fold(0.0, |m, v| m.max(*v)),
    )
}

/// `out[c] = Σ_l x_l·w[c·k + l]` for every column `c` of `w` (`out.len()` columns of
/// `x.len()` entries each).
fn dots(x: &[f64], w: &[f64], out: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA, checked just above.
        return unsafe { dots_fma(x, w, out) };
    }
    dots_lanes::<false>(x, w, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_fma(x: &[f64], w: &[f64], out: &mut [f64]) {
    dots_lanes::<true>(x, w, out)
}

/// Four columns at a time (each element of `x` loaded once for four products), eight
/// independent lanes each, so the loop vectorises without reassociating a sum. `FMA`:
/// fused multiply-adds, only where the CPU has them (elsewhere `mul_add` is a slow
/// library call).
#[inline(always)]
fn dots_lanes<const FMA: bool>(x: &[f64], w: &[f64], out: &mut [f64]) {
    const LANES: usize = 8;
    let k = x.len();
    let madd = |acc: f64, a: f64, b: f64| if FMA { a.mul_add(b, acc) } else { acc + a * b };
    let full = k / LANES * LANES;
    let mut c = 0;
    while c < out.len() {
        let group = (out.len() - c).min(4);
        let mut acc = [[0.0; LANES]; 4];
        let columns: [&[f64]; 4] =
            std::array::from_fn(|g| &w[(c + g.min(group - 1)) * k..(c + g.min(group - 1) + 1) * k]);
        for base in (0..full).step_by(LANES) {
            let xs = &x[base..base + LANES];
            for (g, column) in columns.iter().enumerate() {
                let ws = &column[base..base + LANES];
                for l in 0..LANES {
                    acc[g][l] = madd(acc[g][l], xs[l], ws[l]);
                }
            }
        }
        for g in 0..group {
            let mut sum: f64 = acc[g].iter().sum();
            for l in full..k {
                sum = madd(sum, x[l], columns[g][l]);
            }
            out[c + g] = sum;
        }
        c += group;
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use tabgrid_shared::kernels::{MatMut, MatRef, gemm, gemm_portable};
    use tabgrid_shared::matrix::{f32_bytes, f64_bytes};

    use super::*;

    fn random(rng: &mut StdRng, len: usize, spread: f64) -> Vec<f64> {
        (0..len)
            .map(|_| (rng.random::<f64>() * 2.0 - 1.0) * spread)
            .collect()
    }

    /// An honest tile computed by one of the real kernels, in `dtype`.
    struct Case {
        dtype: Dtype,
        m: usize,
        n: usize,
        k: usize,
        alpha: f64,
        beta: f64,
        a: Vec<u8>,
        b: Vec<u8>,
        c: Option<Vec<u8>>,
        result: Vec<u8>,
    }

    impl Case {
        fn new(dtype: Dtype, (m, n, k): (usize, usize, usize), seed: u64, portable: bool) -> Case {
            let mut rng = StdRng::seed_from_u64(seed);
            let spread = 10f64.powi((seed % 7) as i32 - 3);
            let (mut a, mut b, c) = (
                random(&mut rng, m * k, spread),
                random(&mut rng, k * n, 1.0),
                seed.is_multiple_of(2)
                    .then(|| random(&mut rng, m * n, spread)),
            );
            if seed.is_multiple_of(3) {
                // All positive: rounding errors pile up with one sign, the worst case.
                a.iter_mut().chain(b.iter_mut()).for_each(|v| *v = v.abs());
            }
            let alpha = rng.random::<f64>() * 4.0 - 2.0;
            let beta = if c.is_some() {
                rng.random::<f64>() * 2.0 - 1.0
            } else {
                0.0
            };
            match dtype {
                Dtype::F32 => {
                    let to32 = |v: &[f64]| v.iter().map(|x| *x as f32).collect::<Vec<f32>>();
                    let (a, b) = (to32(&a), to32(&b));
                    let mut out = c.as_deref().map_or(vec![0.0; m * n], to32);
                    let c_bytes = c.as_deref().map(|c| f32_bytes(&to32(c)));
                    let run = if portable {
                        gemm_portable::<f32>
                    } else {
                        gemm::<f32>
                    };
                    run(
                        alpha as f32,
                        MatRef::row_major(&a, m, k).unwrap(),
                        MatRef::row_major(&b, k, n).unwrap(),
                        beta as f32,
                        MatMut::row_major(&mut out, m, n).unwrap(),
                    )
                    .unwrap();
                    Case {
                        dtype,
                        m,
                        n,
                        k,
                        alpha: f64::from(alpha as f32),
                        beta: f64::from(beta as f32),
                        a: f32_bytes(&a),
                        b: f32_bytes(&b),
                        c: c_bytes,
                        result: f32_bytes(&out),
                    }
                }
                Dtype::F64 => {
                    let mut out = c.clone().unwrap_or(vec![0.0; m * n]);
                    let run = if portable {
                        gemm_portable::<f64>
                    } else {
                        gemm::<f64>
                    };
                    run(
                        alpha,
                        MatRef::row_major(&a, m, k).unwrap(),
                        MatRef::row_major(&b, k, n).unwrap(),
                        beta,
                        MatMut::row_major(&mut out, m, n).unwrap(),
                    )
                    .unwrap();
                    Case {
                        dtype,
                        m,
                        n,
                        k,
                        alpha,
                        beta,
                        a: f64_bytes(&a),
                        b: f64_bytes(&b),
                        c: c.as_deref().map(f64_bytes),
                        result: f64_bytes(&out),
                    }
                }
            }
        }

        fn tile(&self) -> Tile<'_> {
            Tile {
                dtype: self.dtype,
                m: self.m,
                n: self.n,
                k: self.k,
                alpha: self.alpha,
                beta: self.beta,
                a: &self.a,
                b: &self.b,
                c: self.c.as_deref(),
            }
        }

        /// Adds `relative` times the tile's largest magnitude to element `(i, j)`.
        fn corrupt(&mut self, i: usize, j: usize, relative: f64) {
            let largest = match self.dtype {
                Dtype::F32 => tabgrid_shared::matrix::f32s(&self.result)
                    .iter()
                    .fold(0.0f64, |m, v| m.max(f64::from(v.abs()))),
                Dtype::F64 => tabgrid_shared::matrix::f64s(&self.result)
                    .iter()
                    .fold(0.0f64, |m, v| m.max(v.abs())),
            };
            let at = (i * self.n + j) * self.dtype.size();
            match self.dtype {
                Dtype::F32 => {
                    let bytes: [u8; 4] = self.result[at..at + 4].try_into().unwrap();
                    let v = f32::from_le_bytes(bytes);
                    let bumped = v + (largest * relative) as f32;
                    self.result[at..at + 4].copy_from_slice(&bumped.to_le_bytes());
                }
                Dtype::F64 => {
                    let bytes: [u8; 8] = self.result[at..at + 8].try_into().unwrap();
                    let v = f64::from_le_bytes(bytes);
                    let bumped = v + largest * relative;
                    self.result[at..at + 8].copy_from_slice(&bumped.to_le_bytes());
                }
            }
        }
    }

    #[test]
    fn honest_tiles_always_pass() {
        let mut rng = StdRng::seed_from_u64(7);
        let shapes = [
            (1, 1, 1),
            (7, 5, 3),
            (37, 29, 53),
            (64, 64, 1000),
            (3, 200, 4000),
        ];
        for (s, &shape) in shapes.iter().enumerate() {
            for seed in 0..12u64 {
                for dtype in [Dtype::F32, Dtype::F64] {
                    for portable in [false, true] {
                        let case = Case::new(dtype, shape, seed * 31 + s as u64, portable);
                        assert_eq!(
                            check(&case.tile(), &case.result, &mut rng),
                            Ok(()),
                            "{dtype} {shape:?} seed {seed} portable {portable}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rows_of_b_of_every_weight_take_the_exact_bounds_and_still_judge_right() {
        let mut rng = StdRng::seed_from_u64(11);
        for dtype in [Dtype::F32, Dtype::F64] {
            let mut case = Case::new(dtype, (24, 40, 300), 5, false);
            // Rows of B a thousand times apart: the balanced shortcut does not apply.
            let scale = |l: usize| if l.is_multiple_of(3) { 1000.0 } else { 1.0 };
            let (m, n, k) = (case.m, case.n, case.k);
            let mut b = match dtype {
                Dtype::F32 => tabgrid_shared::matrix::f32s(&case.b)
                    .iter()
                    .map(|&v| f64::from(v))
                    .collect::<Vec<f64>>(),
                Dtype::F64 => tabgrid_shared::matrix::f64s(&case.b),
            };
            for (l, row) in b.chunks_exact_mut(n).enumerate() {
                row.iter_mut().for_each(|v| *v *= scale(l));
            }
            let a = match dtype {
                Dtype::F32 => tabgrid_shared::matrix::f32s(&case.a)
                    .iter()
                    .map(|&v| f64::from(v))
                    .collect::<Vec<f64>>(),
                Dtype::F64 => tabgrid_shared::matrix::f64s(&case.a),
            };
            let mut out = vec![0.0; m * n];
            gemm_portable(
                case.alpha,
                MatRef::row_major(&a, m, k).unwrap(),
                MatRef::row_major(&b, k, n).unwrap(),
                0.0,
                MatMut::row_major(&mut out, m, n).unwrap(),
            )
            .unwrap();
            let bytes = |v: &[f64]| match dtype {
                Dtype::F32 => f32_bytes(&v.iter().map(|&x| x as f32).collect::<Vec<f32>>()),
                Dtype::F64 => f64_bytes(v),
            };
            case.b = bytes(&b);
            case.c = None;
            case.beta = 0.0;
            case.result = bytes(&out);
            let plan = TilePlan::new(m as u32, n as u32, k as u32, m as u32, n as u32);
            let check = JobCheck::new(
                dtype,
                case.alpha,
                0.0,
                plan,
                vec![Bytes::from(case.a.clone())],
                vec![Bytes::from(case.b.clone())],
                &mut rng,
            );
            assert!(check.w().balanced.is_none());
            assert_eq!(check.check((0, 0), None, &case.result), Ok(()), "{dtype}");
            case.corrupt(7, 9, if dtype == Dtype::F32 { 0.1 } else { 1e-6 });
            let err = check
                .check((0, 0), None, &case.result)
                .expect_err("a wrong element");
            assert_eq!(err.row, 7, "{err}");
        }
        // Random rows are balanced: the shortcut is what most jobs take.
        let case = Case::new(Dtype::F32, (8, 256, 512), 1, false);
        let plan = TilePlan::new(8, 256, 512, 8, 256);
        let check = JobCheck::new(
            Dtype::F32,
            1.0,
            0.0,
            plan,
            vec![Bytes::from(case.a.clone())],
            vec![Bytes::from(case.b.clone())],
            &mut rng,
        );
        assert!(check.w().balanced.is_some());
    }

    #[test]
    fn a_wrong_element_fails() {
        let mut rng = StdRng::seed_from_u64(9);
        for dtype in [Dtype::F32, Dtype::F64] {
            for seed in 0..8u64 {
                let mut case = Case::new(dtype, (40, 30, 500), seed, false);
                // f32: a tenth of the tile's largest value; f64: a millionth.
                let size = if dtype == Dtype::F32 { 0.1 } else { 1e-6 };
                case.corrupt((seed as usize * 7) % 40, (seed as usize * 3) % 30, size);
                let err = check(&case.tile(), &case.result, &mut rng)
                    .expect_err(&format!("{dtype} seed {seed}"));
                assert_eq!(err.row, (seed as usize * 7) % 40, "{err}");
            }
        }
    }

    #[test]
    fn a_scaled_or_garbage_tile_fails() {
        let mut rng = StdRng::seed_from_u64(3);
        let case = Case::new(Dtype::F32, (32, 32, 300), 4, false);
        let mut scaled = case.result.clone();
        for chunk in scaled.chunks_exact_mut(4) {
            let v = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) * 1.01;
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        assert!(check(&case.tile(), &scaled, &mut rng).is_err());
        let zeros = vec![0u8; case.result.len()];
        assert!(check(&case.tile(), &zeros, &mut rng).is_err());
        let nans = f32_bytes(&vec![f32::NAN; 32 * 32]);
        assert!(check(&case.tile(), &nans, &mut rng).is_err());
    }

    #[test]
    fn rows_with_non_finite_inputs_are_not_held_against_the_worker() {
        let mut rng = StdRng::seed_from_u64(5);
        let (m, n, k) = (2, 3, 4);
        let mut a = vec![1.0; m * k];
        a[1] = f64::INFINITY;
        let b = vec![1.0; k * n];
        let mut result = vec![4.0; m * n];
        result[..n].fill(f64::INFINITY);
        let (a, b, result) = (f64_bytes(&a), f64_bytes(&b), f64_bytes(&result));
        let tile = Tile {
            dtype: Dtype::F64,
            m,
            n,
            k,
            alpha: 1.0,
            beta: 0.0,
            a: &a,
            b: &b,
            c: None,
        };
        assert_eq!(check(&tile, &result, &mut rng), Ok(()));
    }
}
