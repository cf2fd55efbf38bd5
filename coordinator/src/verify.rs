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
//! result's columns and shares the work between tiles: a pass over `B` gives, for every
//! row `l` of `B` and column band `j`, `(B_j·r_j)_l`, `Σ|B_lc|` over the band, and
//! `max |B_lc|` over the row (the `W` matrix, `k × (2J+1)`); a pass over `A` gives, per row
//! band `i`, `X_i = A_i·W` and `Σ_l |A_il|` (with `|A_i|` for the bound columns): every
//! tile of that band's expected `A_i·B_j·r_j` and its bounds; a pass over C gives each of
//! its tiles' `C_ij·r_j`.
//! A tile's own check is then one pass over its result: `O(m·n)`. Where B's rows carry
//! similar weight (each bound column within a factor of two), the bound columns of `X` are
//! replaced by `Σ_l |A_il|` times the column's largest entry: an upper bound at most twice
//! the exact one, for J + 1 fewer products per row of A.
//!
//! The coordinator reads every one of those bytes anyway: it hashes each operand panel
//! for its content key when the job is cut, and each result for its checksum when it
//! arrives. So the check rides along ([`hash_rows`]): the job's `JobCheck` is built
//! ([`JobCheck::begin`], B's panels first) from each piece of rows right after it is
//! hashed, while the piece is in cache, and a result is checked as it is hashed
//! ([`JobCheck::check_hashed`]); what the check adds is its arithmetic, not trips to
//! memory. `cargo xtask bench verify` measures it as a share of the job's compute.
//!
//! Each pass reads the job's bytes in place (never copied): on x86_64 with AVX-512F,
//! `A_i·W` takes four rows of A (three in f32) against up to six columns of W in vector
//! registers, and the row passes keep four vectors per sum, so no chain of dependent adds
//! holds them up; f64 jobs are summed in f64, f32 jobs in f32 (no conversions; see "f32
//! passes"). On Intel CPUs the registers are 256-bit ones (32 of them with AVX-512VL),
//! elsewhere 512-bit ([`Registers`]): between BLAKE3's passes over the same bytes, Intel
//! cores lower their clock for heavy 512-bit arithmetic (BLAKE3's is light), and on the
//! Intel VM of 2026-12-07 the check in 256-bit registers cost 20–30 % less at n = 1024
//! (BENCHMARKS.md). AVX2 and other targets take the portable loops, which the compiler
//! vectorises, widening f32 to f64.
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
//!
//! # f32 passes
//!
//! An f32 job's passes run in f32 arithmetic where the CPU has AVX-512F: the products of
//! f32 elements with `r` (drawn exactly representable in f32) and with `W` rounded to f32,
//! summed in f32 lanes, each lane's sum widened into an f64 total after at most 64 terms
//! (then the lanes are added in f64). Half the bytes per vector of the f64 passes and no
//! conversions. What that costs in accuracy is bounded and added to the tolerance: a sum
//! whose lanes run `c` terms in f32 errs by at most `γ_c = c·2⁻²⁴/(1 − c·2⁻²⁴)` of the sum
//! of its terms' magnitudes, and every such sum is bounded by the row's `S_i` (with
//! `|r| ≤ 1`): `W` (chains of `c_n`, `n` the tile width), its rounding to f32 (one `2⁻²⁴`),
//! `A_i·W` (chains of `c_k`), `T·r` and `C·r` (`c_n` each). With `v` f32 lanes a vector
//! (16 in 512-bit registers, 8 in 256-bit ones), `c_n = ⌈n/4v⌉ + 2` (four vectors folded
//! at the end) and `c_k = ⌈k/v⌉`, each capped at 64 + 2 and 64, the check adds
//! `1.01·(3·c_n + c_k + 1)·2⁻²⁴·S_i` to the tolerance and inflates `S_i` and `M_i` by the
//! same factor (their own sums were f32). For an f32 tile 256 wide that is at most 8 % of
//! the tolerance at k = 1024 (where `M_i` is as small as it can be, `S_i/n`), 2 % at
//! k = 4096, 14 % at k = 256 and 35 % at k = 64 in 512-bit registers; in 256-bit ones 9 %,
//! 2 %, 25 % and 60 %. A row whose f32 sums overflow (magnitudes near 10³⁸, where f64
//! would not) is done again in f64.
//!
//! # Underflow
//!
//! The bounds above are relative; below a dtype's normal range every rounding errs by up
//! to half its smallest subnormal `η` whatever the magnitudes, in the worker's kernel as in
//! the check. The tolerance adds `η·n·(k + 2)·(1 + |alpha| + |beta|)` for the worker's
//! roundings and, with f32 passes, `η·((k + 2n)·(1 + |alpha| + |beta|) + (n + 1)·|alpha|·Σ_l
//! |A_il|)` for the check's: nothing for data of ordinary magnitudes.

use std::borrow::Cow;

#[cfg(target_arch = "x86_64")]
mod avx512;

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
    check_on(tile, result, rng, Passes::here(tile.dtype))
}

/// [`check`], its passes run as `passes` says.
fn check_on(
    tile: &Tile<'_>,
    result: &[u8],
    rng: &mut impl rand::Rng,
    passes: Passes,
) -> Result<(), Mismatch> {
    let plan = TilePlan::new(
        tile.m as u32,
        tile.n as u32,
        tile.k as u32,
        tile.m.max(1) as u32,
        tile.n.max(1) as u32,
    );
    let c = tile.c.filter(|_| tile.beta != 0.0).map(|c| vec![c]);
    let job = JobCheck::from_panels_on(
        tile.dtype,
        tile.alpha,
        tile.beta,
        plan,
        Panels {
            a: &[tile.a],
            b: &[tile.b],
            c: c.as_deref(),
        },
        rng,
        passes,
    );
    job.check((0, 0), result)
}

/// A job's operands as workers get them: A's row panels and B's column panels in plan
/// order, and C's tiles in plan order when beta counts.
#[derive(Debug, Clone, Copy)]
pub struct Panels<'a> {
    pub a: &'a [&'a [u8]],
    pub b: &'a [&'a [u8]],
    pub c: Option<&'a [&'a [u8]]>,
}

/// Bytes of rows a fused pass takes at a time: hashed, then checked while in L2 (256 KiB
/// measured best here against 16-512 KiB: fewer, longer hash updates).
const CHUNK_BYTES: usize = 256 << 10;

/// Feeds `bytes` (whole rows of `row_bytes` each) to `hasher` a few rows at a time, and
/// right after each piece calls `rows(first_row, piece)`, while the piece is still in
/// cache. The coordinator hashes every operand and result anyway (content keys,
/// checksums); a check fed this way costs its arithmetic, not another trip to memory.
pub fn hash_rows(
    hasher: &mut blake3::Hasher,
    bytes: &[u8],
    row_bytes: usize,
    rows: impl FnMut(usize, &[u8]),
) {
    hash_rows_by(CHUNK_BYTES, hasher, bytes, row_bytes, rows)
}

/// [`hash_rows`] with pieces of about `piece_bytes`.
fn hash_rows_by(
    piece_bytes: usize,
    hasher: &mut blake3::Hasher,
    bytes: &[u8],
    row_bytes: usize,
    mut rows: impl FnMut(usize, &[u8]),
) {
    if row_bytes == 0 {
        hasher.update(bytes);
        return;
    }
    let per_piece = (piece_bytes / row_bytes).max(1);
    for (n, piece) in bytes.chunks(per_piece * row_bytes).enumerate() {
        hasher.update(piece);
        rows(n * per_piece, piece);
    }
}

/// The check of every tile of one job: its secret `r`, and the work its tiles share (see
/// the module docs), all computed from the operands when the job is cut
/// ([`JobCheck::begin`]), so that checking a tile is one pass over it.
#[derive(Debug)]
pub struct JobCheck {
    dtype: Dtype,
    alpha: f64,
    beta: f64,
    plan: TilePlan,
    /// One entry per result column, each exactly an f32.
    r: Vec<f64>,
    /// The vector registers the passes use, if any (else the portable loops).
    registers: Option<Registers>,
    /// Whether this f32 job's passes run in f32 arithmetic (see "f32 passes" in the
    /// module docs); `r32` is then `r` as f32s, else empty.
    narrow: bool,
    r32: Vec<f32>,
    /// What every row band's check needs of B.
    columns: Columns,
    /// `m × width`, every row band's `A_i·W` in turn, with `|A_i|` for the bound columns.
    x: Vec<f64>,
    /// Per tile of C (when beta counts), per row: `(Σ c·r, Σ |c|, max |c|)`.
    c: Vec<Vec<Stats>>,
}

/// `W`, `(2J + 1) × k` column by column: for each band `(B_j·r_j)_l`, then for each band
/// `Σ_c |B_lc|`, then `max_c |B_lc|` over the row.
#[derive(Debug)]
struct Columns {
    w: Vec<f64>,
    /// `w` rounded to f32, for the f32 passes (else empty).
    w32: Vec<f32>,
    /// Where the rows of B carry similar weight (each bound column's largest entry within
    /// twice its smallest): per band `max_l Σ_c |B_lc|`, and `max_l max_c |B_lc|`. The
    /// bounds then come from `Σ_l |A_il|` alone (`S_i ≤ |alpha|·Σ_l |A_il|·max_l Σ_c |B_lc|`,
    /// at most twice the exact sum), which saves the J + 1 bound columns of `X`.
    balanced: Option<(Vec<f64>, f64)>,
}

impl Columns {
    /// Columns of `X` per row: the J signed ones, `Σ_l |A_il|`, then (rows of B not
    /// balanced) the J + 1 bound columns.
    fn x_width(&self, bands: usize) -> usize {
        if self.balanced.is_some() {
            bands + 1
        } else {
            2 * bands + 2
        }
    }
}

/// A [`JobCheck`] being built, first from B's panels ([`FromB::rows_of_b`]), then
/// ([`FromB::then_a`]) from A's and C's ([`FromA`]).
#[derive(Debug)]
pub struct FromB {
    job: JobCheck,
}

/// The second half of building a [`JobCheck`]: `W` is known.
#[derive(Debug)]
pub struct FromA {
    job: JobCheck,
}

impl JobCheck {
    /// Starts the check of a job: draws its `r`. `beta` is the job's when it has a C,
    /// else 0.
    pub fn begin(
        dtype: Dtype,
        alpha: f64,
        beta: f64,
        plan: TilePlan,
        rng: &mut impl rand::Rng,
    ) -> FromB {
        JobCheck::begin_on(dtype, alpha, beta, plan, rng, Passes::here(dtype))
    }

    /// [`JobCheck::begin`], its passes run as `passes` says.
    fn begin_on(
        dtype: Dtype,
        alpha: f64,
        beta: f64,
        plan: TilePlan,
        rng: &mut impl rand::Rng,
        passes: Passes,
    ) -> FromB {
        let registers = passes.registers.filter(|registers| registers.here_too());
        let narrow = passes.narrow && dtype == Dtype::F32 && registers.is_some();
        let r: Vec<f64> = (0..plan.n)
            .map(|_| {
                // Exactly an f32, so that the f32 passes use `r` itself.
                let magnitude = f64::from((0.5 + 0.5 * rng.random::<f64>()) as f32);
                if rng.random::<bool>() {
                    magnitude
                } else {
                    -magnitude
                }
            })
            .collect();
        let r32 = if narrow {
            r.iter().map(|&v| v as f32).collect()
        } else {
            Vec::new()
        };
        let (k, bands) = (plan.k as usize, plan.tiles_j() as usize);
        FromB {
            job: JobCheck {
                dtype,
                alpha,
                beta,
                plan,
                r,
                registers,
                narrow,
                r32,
                columns: Columns {
                    w: vec![0.0; k * (2 * bands + 1)],
                    w32: Vec::new(),
                    balanced: None,
                },
                x: Vec::new(),
                c: Vec::new(),
            },
        }
    }

    /// The whole check from a job's panels at once (A's row panels and B's column panels
    /// in plan order, C's tiles in plan order when beta counts), not hashed.
    pub fn from_panels(
        dtype: Dtype,
        alpha: f64,
        beta: f64,
        plan: TilePlan,
        panels: Panels<'_>,
        rng: &mut impl rand::Rng,
    ) -> JobCheck {
        JobCheck::from_panels_on(dtype, alpha, beta, plan, panels, rng, Passes::here(dtype))
    }

    /// [`JobCheck::from_panels`], its passes run as `passes` says.
    fn from_panels_on(
        dtype: Dtype,
        alpha: f64,
        beta: f64,
        plan: TilePlan,
        Panels { a, b, c }: Panels<'_>,
        rng: &mut impl rand::Rng,
        passes: Passes,
    ) -> JobCheck {
        let beta = if c.is_some() { beta } else { 0.0 };
        let mut check = JobCheck::begin_on(dtype, alpha, beta, plan, rng, passes);
        for (j, panel) in b.iter().enumerate() {
            check.rows_of_b(j as u32, 0, panel);
        }
        let mut check = check.then_a();
        for (i, panel) in a.iter().enumerate() {
            check.rows_of_a(i as u32, 0, panel);
        }
        for (tile, c) in plan.tiles().zip(c.unwrap_or_default()) {
            check.rows_of_c(tile, 0, c);
        }
        check.finish()
    }

    /// Multiply-adds a tile's check costs (to run it inline or on a blocking thread).
    pub fn cost(&self, (i, j): (u32, u32)) -> usize {
        2 * self.plan.rows(i).len() * self.plan.cols(j).len()
    }

    /// Checks `result`, the worker's tile `(i, j)`. Sizes must match the plan (the caller
    /// checked the result's).
    pub fn check(&self, tile: (u32, u32), result: &[u8]) -> Result<(), Mismatch> {
        let mut got = Vec::new();
        match self.dtype {
            Dtype::F32 => self.got::<f32>(tile, result, &mut got),
            Dtype::F64 => self.got::<f64>(tile, result, &mut got),
        }
        self.judge(tile, &got)
    }

    /// Checks `result` while hashing it: whether `checksum` is its
    /// [`protocol::checksum`](tabgrid_shared::protocol::checksum), and when it is, the
    /// verdict of [`JobCheck::check`].
    pub fn check_hashed(
        &self,
        tile: (u32, u32),
        result: &[u8],
        checksum: u64,
    ) -> (bool, Option<Result<(), Mismatch>>) {
        self.check_hashed_by(CHUNK_BYTES, tile, result, checksum)
    }

    /// [`JobCheck::check_hashed`], hashing pieces of about `piece_bytes`.
    fn check_hashed_by(
        &self,
        piece_bytes: usize,
        tile: (u32, u32),
        result: &[u8],
        checksum: u64,
    ) -> (bool, Option<Result<(), Mismatch>>) {
        let row_bytes = self.plan.cols(tile.1).len() * self.dtype.size();
        let mut hasher = blake3::Hasher::new();
        let mut got = Vec::new();
        hash_rows_by(
            piece_bytes,
            &mut hasher,
            result,
            row_bytes,
            |_, piece| match self.dtype {
                Dtype::F32 => self.got::<f32>(tile, piece, &mut got),
                Dtype::F64 => self.got::<f64>(tile, piece, &mut got),
            },
        );
        if tabgrid_shared::protocol::checksum_of(&hasher) != checksum {
            return (false, None);
        }
        (true, Some(self.judge(tile, &got)))
    }

    /// Appends `(T·r)` of every whole row in `rows`, a piece of tile `(i, j)`.
    fn got<T: Element>(&self, (_, j): (u32, u32), rows: &[u8], got: &mut Vec<Stats>) {
        let cols = self.plan.cols(j);
        let (r, r32) = self.r_of(cols.clone());
        row_stats::<T, true>(
            self.registers,
            &elements::<T>(rows),
            cols.len(),
            r,
            r32,
            got,
        );
    }

    /// `r` over `cols`, and as f32s when the passes are narrow.
    fn r_of(&self, cols: std::ops::Range<u32>) -> (&[f64], Option<&[f32]>) {
        let range = cols.start as usize..cols.end as usize;
        (
            &self.r[range.clone()],
            self.narrow.then(|| &self.r32[range]),
        )
    }

    /// The verdict on tile `(i, j)` from its rows' `(T·r)`.
    fn judge(&self, (i, j): (u32, u32), got: &[Stats]) -> Result<(), Mismatch> {
        let (rows, cols) = (self.plan.rows(i), self.plan.cols(j));
        let (m, n, k) = (rows.len(), cols.len(), self.plan.k as usize);
        let bands = self.plan.tiles_j() as usize;
        let columns = &self.columns;
        let width = columns.x_width(bands);
        let x = &self.x[rows.start as usize * width..rows.end as usize * width];
        let unit = match self.dtype {
            Dtype::F32 => f64::from(f32::EPSILON) / 2.0,
            Dtype::F64 => f64::EPSILON / 2.0,
        };
        let overflow = match self.dtype {
            Dtype::F32 => f64::from(f32::MAX),
            Dtype::F64 => f64::MAX,
        };
        let gamma = 2.0 * (k + 2) as f64 * unit;
        let mut own = 2.0 * (k + n + 2) as f64 * (f64::EPSILON / 2.0);
        // The smallest subnormal of the dtype: every rounding below its normal range
        // errs by up to half of it, whatever the magnitudes (see "Underflow").
        let tiny = match self.dtype {
            Dtype::F32 => 2f64.powi(-149),
            Dtype::F64 => f64::from_bits(1),
        };
        let (alpha, beta) = (self.alpha.abs(), self.beta.abs());
        let mut slack_per_sum_a = 0.0;
        let mut slack = tiny * (n * (k + 2)) as f64 * (1.0 + alpha + beta) + f64::MIN_POSITIVE;
        // The f32 passes' own rounding (see "f32 passes"), on top of the f64 one.
        let mut inflate = 1.0;
        if self.narrow {
            let lanes = self.registers.map_or(1, Registers::f32_lanes);
            let (c_n, c_k) = (narrow_chain(n, 4 * lanes) + 2, narrow_chain(k, lanes));
            let narrow = 1.01 * (3 * c_n + c_k + 1) as f64 * unit;
            own += narrow;
            inflate += narrow;
            slack_per_sum_a = tiny * (n + 1) as f64 * alpha;
            slack += tiny * (k + 2 * n) as f64 * (1.0 + alpha + beta);
        }
        let old = self
            .c
            .get(i as usize * bands + j as usize)
            .map_or(&[][..], Vec::as_slice);
        for (t, xs) in x.chunks_exact(width).enumerate().take(m.min(got.len())) {
            let mut want = self.alpha * xs[j as usize];
            let sum_a = xs[bands];
            let (scale_ab, peak_ab) = match &columns.balanced {
                Some((sums, peak)) => (sum_a * sums[j as usize], sum_a * peak),
                None => (xs[bands + 1 + j as usize], xs[2 * bands + 1]),
            };
            let mut scale = alpha * scale_ab;
            let mut peak = alpha * peak_ab;
            if let Some(&(dot, sum, max)) = old.get(t) {
                want += self.beta * dot;
                scale += beta * sum;
                peak += beta * max;
            }
            let (scale, peak) = (scale * inflate, peak * inflate);
            let got = got[t].0;
            if !scale.is_finite() || !peak.is_finite() {
                continue;
            }
            let tolerance =
                8.0 * gamma * (peak * scale).sqrt() + own * scale + slack + slack_per_sum_a * sum_a;
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

impl FromB {
    /// Rows `first..` of B's column panel `j`: `bytes` holds whole rows, little-endian.
    pub fn rows_of_b(&mut self, j: u32, first: usize, bytes: &[u8]) {
        match self.job.dtype {
            Dtype::F32 => self.rows::<f32>(j, first, bytes),
            Dtype::F64 => self.rows::<f64>(j, first, bytes),
        }
    }

    fn rows<T: Element>(&mut self, j: u32, first: usize, bytes: &[u8]) {
        let job = &mut self.job;
        let (k, bands) = (job.plan.k as usize, job.plan.tiles_j() as usize);
        let cols = job.plan.cols(j);
        let values = elements::<T>(bytes);
        let n = cols.len().max(1);
        let rows = (values.len() / n).min(k.saturating_sub(first));
        let mut stats = Vec::with_capacity(rows);
        let (r, r32) = job.r_of(cols.clone());
        let values = &values[..rows * n];
        row_stats::<T, false>(job.registers, values, cols.len(), r, r32, &mut stats);
        let w = &mut job.columns.w;
        for (l, &(dot, sum, max)) in stats.iter().enumerate() {
            let l = first + l;
            w[j as usize * k + l] = dot;
            w[(bands + j as usize) * k + l] = sum;
            let peak = &mut w[2 * bands * k + l];
            *peak = peak.max(max);
        }
    }

    /// B is complete: whether its rows are balanced is settled, and A's and C's rows can
    /// come.
    pub fn then_a(self) -> FromA {
        let mut job = self.job;
        let (k, bands) = (job.plan.k as usize, job.plan.tiles_j() as usize);
        let spread = |column: &[f64]| {
            let (low, high) = column.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
            (low > 0.0 && high.is_finite() && high <= 2.0 * low).then_some(high)
        };
        job.columns.balanced = job.columns.w[bands * k..]
            .chunks_exact(k.max(1))
            .map(spread)
            .collect::<Option<Vec<f64>>>()
            .filter(|_| k > 0)
            .map(|mut highs| {
                let peak = highs.pop().unwrap_or(0.0);
                (highs, peak)
            });
        if job.narrow {
            job.columns.w32 = job.columns.w.iter().map(|&v| v as f32).collect();
        }
        job.x = vec![0.0; job.plan.m as usize * job.columns.x_width(bands)];
        if job.beta != 0.0 {
            job.c = vec![Vec::new(); job.plan.tile_count() as usize];
        }
        FromA { job }
    }
}

impl FromA {
    /// Rows `first..` of A's row panel `i`: `bytes` holds whole rows, little-endian.
    pub fn rows_of_a(&mut self, i: u32, first: usize, bytes: &[u8]) {
        match self.job.dtype {
            Dtype::F32 => self.a_rows::<f32>(i, first, bytes),
            Dtype::F64 => self.a_rows::<f64>(i, first, bytes),
        }
    }

    /// Rows `first..` of C's tile `(i, j)` (nothing to do when beta does not count).
    pub fn rows_of_c(&mut self, tile: (u32, u32), first: usize, bytes: &[u8]) {
        match self.job.dtype {
            Dtype::F32 => self.c_rows::<f32>(tile, first, bytes),
            Dtype::F64 => self.c_rows::<f64>(tile, first, bytes),
        }
    }

    fn a_rows<T: Element>(&mut self, i: u32, first: usize, bytes: &[u8]) {
        let job = &mut self.job;
        let (k, bands) = (job.plan.k as usize, job.plan.tiles_j() as usize);
        if k == 0 {
            return;
        }
        let band = job.plan.rows(i);
        let width = job.columns.x_width(bands);
        let values = elements::<T>(bytes);
        let rows = (values.len() / k).min((band.len()).saturating_sub(first));
        let values = &values[..rows * k];
        let start = (band.start as usize + first) * width;
        let x = &mut job.x[start..start + rows * width];
        let (w, w32) = (&job.columns.w, &job.columns.w32);
        let narrow = |range: std::ops::RangeFrom<usize>| job.narrow.then(|| &w32[range]);
        // The signed columns, with `Σ|A_il|` beside them.
        let signed = (&w[..bands * k], narrow(0..).map(|w32| &w32[..bands * k]));
        times::<T, false>(job.registers, values, k, signed, x, (width, 0), Some(bands));
        if job.columns.balanced.is_none() {
            let bounds = (&w[bands * k..], narrow(bands * k..));
            times::<T, true>(
                job.registers,
                values,
                k,
                bounds,
                x,
                (width, bands + 1),
                None,
            );
        }
    }

    fn c_rows<T: Element>(&mut self, (i, j): (u32, u32), first: usize, bytes: &[u8]) {
        let job = &mut self.job;
        let bands = job.plan.tiles_j() as usize;
        let Some(stats) = job.c.get_mut(i as usize * bands + j as usize) else {
            return;
        };
        let cols = job.plan.cols(j);
        let range = cols.start as usize..cols.end as usize;
        let (r, r32) = (&job.r[range.clone()], job.narrow.then(|| &job.r32[range]));
        debug_assert_eq!(stats.len(), first, "C's rows come in order");
        let values = elements::<T>(bytes);
        row_stats::<T, false>(job.registers, &values, cols.len(), r, r32, stats);
    }

    pub fn finish(self) -> JobCheck {
        self.job
    }
}

/// Per row `(Σ x·r, Σ |x|, max |x|)`.
type Stats = (f64, f64, f64);

/// An element type of a job, widened to f64 for the check.
trait Element: bytemuck::Pod {
    const F32: bool;
    fn widen(self) -> f64;
    fn from_le(bytes: &[u8]) -> Self;
}

impl Element for f32 {
    const F32: bool = true;
    #[inline(always)]
    fn widen(self) -> f64 {
        f64::from(self)
    }
    fn from_le(bytes: &[u8]) -> f32 {
        f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
    }
}

impl Element for f64 {
    const F32: bool = false;
    #[inline(always)]
    fn widen(self) -> f64 {
        self
    }
    fn from_le(bytes: &[u8]) -> f64 {
        f64::from_le_bytes([
            bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
        ])
    }
}

/// `bytes`, little-endian elements, as `T`s: read in place where they are aligned (panels
/// and results always are), else copied. The passes below widen each element to f64 in
/// registers: no f64 copy of an operand is made.
fn elements<T: Element>(bytes: &[u8]) -> Cow<'_, [T]> {
    let size = std::mem::size_of::<T>();
    let whole = &bytes[..bytes.len() / size * size];
    #[cfg(target_endian = "little")]
    if let Ok(values) = bytemuck::try_cast_slice(whole) {
        return Cow::Borrowed(values);
    }
    Cow::Owned(whole.chunks_exact(size).map(T::from_le).collect())
}

/// `FMA`: fused multiply-adds, only where the CPU has them (elsewhere `mul_add` is a slow
/// library call).
#[inline(always)]
fn madd<const FMA: bool>(acc: f64, a: f64, b: f64) -> f64 {
    if FMA { a.mul_add(b, acc) } else { acc + a * b }
}

/// Appends `(Σ x·r, Σ |x|, max |x|)` of every row `x` of `rows` (`width` elements each)
/// to `out`: in `registers` where given (and this CPU has them), else compiled for the
/// widest vector unit this CPU has, in f64. `DOT_ONLY`: `Σ x·r` alone, the rest 0. With
/// `r32` (`r` as f32s), registers and f32 rows, in f32 arithmetic.
fn row_stats<T: Element, const DOT_ONLY: bool>(
    registers: Option<Registers>,
    rows: &[T],
    width: usize,
    r: &[f64],
    r32: Option<&[f32]>,
    out: &mut Vec<Stats>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(registers) = registers.filter(|registers| registers.here_too()) {
            // SAFETY: the CPU has what `registers` need (AVX-512F, AVX-512VL, AVX2 and
            // FMA), checked just above.
            return unsafe {
                avx512::row_stats::<T, DOT_ONLY>(registers, rows, width, r, r32, out)
            };
        }
        if std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx2")
        {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            return unsafe { row_stats_avx2::<T, DOT_ONLY>(rows, width, r, out) };
        }
    }
    let _ = (registers, r32);
    row_stats_lanes::<T, { cfg!(target_arch = "aarch64") }, 8, DOT_ONLY>(rows, width, r, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_stats_avx2<T: Element, const DOT_ONLY: bool>(
    rows: &[T],
    width: usize,
    r: &[f64],
    out: &mut Vec<Stats>,
) {
    row_stats_lanes::<T, true, 16, DOT_ONLY>(rows, width, r, out)
}

/// `L` independent lanes per sum (several vectors' worth, so that one sum's latency does
/// not hold the loop up), without reassociating a sum. `DOT_ONLY`: leaves `Σ |x|` and
/// `max |x|` at 0.
#[inline(always)]
fn row_stats_lanes<T: Element, const FMA: bool, const L: usize, const DOT_ONLY: bool>(
    rows: &[T],
    width: usize,
    r: &[f64],
    out: &mut Vec<Stats>,
) {
    if width == 0 {
        return;
    }
    let full = width.min(r.len()) / L * L;
    let (r_full, r_tail) = r.split_at(full);
    for row in rows.chunks_exact(width) {
        let (head, tail) = row.split_at(full);
        let (mut dot, mut sum, mut max) = ([0.0; L], [0.0; L], [0.0f64; L]);
        for (xs, rs) in head.chunks_exact(L).zip(r_full.chunks_exact(L)) {
            for l in 0..L {
                let v = xs[l].widen();
                dot[l] = madd::<FMA>(dot[l], v, rs[l]);
                if !DOT_ONLY {
                    sum[l] += v.abs();
                    // Not `f64::max`: the same for a NaN `v` (skipped), without its checks.
                    max[l] = if v.abs() > max[l] { v.abs() } else { max[l] };
                }
            }
        }
        for (v, q) in tail.iter().zip(r_tail) {
            let v = v.widen();
            dot[0] = madd::<FMA>(dot[0], v, *q);
            if !DOT_ONLY {
                sum[0] += v.abs();
                max[0] = if v.abs() > max[0] { v.abs() } else { max[0] };
            }
        }
        out.push((
            fold(dot, |a, b| a + b),
            fold(sum, |a, b| a + b),
            fold(max, |a, b| if b > a { b } else { a }),
        ));
    }
}

/// `lanes` folded pairwise by `op` (halves at a time: a few vector operations, not a chain
/// of `L` dependent scalar ones).
#[inline(always)]
fn fold<const L: usize>(mut lanes: [f64; L], op: impl Fn(f64, f64) -> f64) -> f64 {
    let mut half = L / 2;
    while half > 0 {
        for l in 0..half {
            lanes[l] = op(lanes[l], lanes[l + half]);
        }
        half /= 2;
    }
    lanes[0]
}

/// `out[t·width + offset + c] = Σ_l f(A_tl)·w[c·k + l]` for every row `t` of `a` (`k`
/// elements each) and every column `c` of `w`, where `f` is `|·|` when `ABS`; with
/// `sum_at`, also `out[t·width + sum_at] = Σ_l |A_tl|`. In `registers` where given (and
/// this CPU has them), else a row at a time in f64; with `w32` (`w` rounded to f32),
/// registers and f32 rows, in f32 arithmetic.
fn times<T: Element, const ABS: bool>(
    registers: Option<Registers>,
    a: &[T],
    k: usize,
    (w, w32): (&[f64], Option<&[f32]>),
    out: &mut [f64],
    (width, offset): (usize, usize),
    sum_at: Option<usize>,
) {
    if k == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(registers) = registers.filter(|registers| registers.here_too()) {
        let (ws, at) = ((w, w32), (width, offset));
        // SAFETY: the CPU has what `registers` need, checked just above; `k > 0`.
        return unsafe { avx512::times::<T, ABS>(registers, a, k, ws, out, at, sum_at) };
    }
    let _ = (registers, w32);
    times_portable::<T, ABS>(a, k, w, out, (width, offset), sum_at)
}

/// [`times`] a row at a time through [`dots`].
fn times_portable<T: Element, const ABS: bool>(
    a: &[T],
    k: usize,
    w: &[f64],
    out: &mut [f64],
    (width, offset): (usize, usize),
    sum_at: Option<usize>,
) {
    let columns = w.len() / k;
    let rows = a.len() / k;
    let mut x = Vec::with_capacity(k);
    let mut stats = Vec::new();
    for t in 0..rows {
        let row = &a[t * k..(t + 1) * k];
        x.clear();
        x.extend(
            row.iter()
                .map(|v| if ABS { v.widen().abs() } else { v.widen() }),
        );
        dots(&x, w, &mut out[t * width + offset..][..columns]);
        if let Some(at) = sum_at {
            stats.clear();
            row_stats::<T, false>(None, row, k, &w[..k], None, &mut stats);
            out[t * width + at] = stats[0].1;
        }
    }
}

/// How far ahead of the row the A·W passes prefetch, in elements.
const PREFETCH: usize = 256;

/// Most f32 terms a lane of an f32 pass adds up before it is widened into an f64 total.
const NARROW_CHAIN: usize = 64;

/// The longest f32 sum of a lane in an f32 pass over `len` elements, `step` of them an
/// iteration: what the f32 passes add to the tolerance (see "f32 passes"). The row
/// passes fold their four vectors in f32 at the end: two more.
fn narrow_chain(len: usize, step: usize) -> usize {
    len.div_ceil(step).min(NARROW_CHAIN)
}

/// The vector registers the x86_64 passes use (see "What it costs"). Both need AVX-512F
/// and FMA; 256-bit ones also AVX-512VL, for 32 of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Registers {
    /// 512-bit.
    Zmm,
    /// 256-bit.
    Ymm,
}

impl Registers {
    /// The ones the check uses on this CPU, if any: 256-bit on Intel's (see "What it
    /// costs"), 512-bit on others'.
    fn here() -> Option<Registers> {
        #[cfg(target_arch = "x86_64")]
        {
            static HERE: std::sync::OnceLock<Option<Registers>> = std::sync::OnceLock::new();
            *HERE.get_or_init(|| {
                // The vendor, "GenuineIntel", in leaf 0's EBX, EDX, ECX.
                let id = std::arch::x86_64::__cpuid(0);
                let intel = [id.ebx, id.edx, id.ecx] == [0x756e_6547, 0x4965_6e69, 0x6c65_746e];
                let preferred = if intel {
                    Registers::Ymm
                } else {
                    Registers::Zmm
                };
                [preferred, Registers::Zmm]
                    .into_iter()
                    .find(|registers| registers.here_too())
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    }

    /// Whether this CPU has what these registers need.
    fn here_too(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let base = std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma");
            match self {
                Registers::Zmm => base,
                Registers::Ymm => base && std::arch::is_x86_feature_detected!("avx512vl"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = self;
            false
        }
    }

    fn name(self) -> &'static str {
        match self {
            Registers::Zmm => "512-bit registers",
            Registers::Ymm => "256-bit registers",
        }
    }

    /// f32 lanes a vector holds.
    fn f32_lanes(self) -> usize {
        match self {
            Registers::Zmm => 16,
            Registers::Ymm => 8,
        }
    }
}

/// What the check's passes run in on this CPU: "512-bit registers", "256-bit registers"
/// or "portable loops" (see "What it costs").
pub fn passes_here() -> &'static str {
    Registers::here().map_or("portable loops", Registers::name)
}

/// How a job's check runs its passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Passes {
    /// `None`: the portable loops (AVX2 where the CPU has it), in f64.
    registers: Option<Registers>,
    /// An f32 job's passes in f32 arithmetic (with registers only; see "f32 passes").
    narrow: bool,
}

impl Passes {
    /// The fastest this CPU has for `dtype`.
    fn here(dtype: Dtype) -> Passes {
        let registers = Registers::here();
        Passes {
            registers,
            narrow: dtype == Dtype::F32 && registers.is_some(),
        }
    }

    /// Every way this CPU can run a `dtype` job's passes: the portable loops, then each
    /// kind of registers it has, in f64 and (for f32) in f32.
    #[cfg(test)]
    fn all(dtype: Dtype) -> Vec<Passes> {
        let mut all = vec![Passes {
            registers: None,
            narrow: false,
        }];
        for registers in [Registers::Zmm, Registers::Ymm] {
            if !registers.here_too() {
                continue;
            }
            let narrow: &[bool] = match dtype {
                Dtype::F32 => &[false, true],
                Dtype::F64 => &[false],
            };
            all.extend(narrow.iter().map(|&narrow| Passes {
                registers: Some(registers),
                narrow,
            }));
        }
        all
    }
}

/// `out[c] = Σ_l x_l·w[c·k + l]` for every column `c` of `w` (`out.len()` columns of
/// `x.len()` entries each).
fn dots(x: &[f64], w: &[f64], out: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA, checked just above.
        return unsafe { dots_fma(x, w, out) };
    }
    dots_lanes::<{ cfg!(target_arch = "aarch64") }>(x, w, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_fma(x: &[f64], w: &[f64], out: &mut [f64]) {
    dots_lanes::<true>(x, w, out)
}

/// Four columns at a time (each element of `x` loaded once for four products), eight
/// independent lanes each, so the loop vectorises without reassociating a sum.
#[inline(always)]
fn dots_lanes<const FMA: bool>(x: &[f64], w: &[f64], out: &mut [f64]) {
    const LANES: usize = 8;
    let k = x.len();
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
                    acc[g][l] = madd::<FMA>(acc[g][l], xs[l], ws[l]);
                }
            }
        }
        for g in 0..group {
            let mut sum: f64 = acc[g].iter().sum();
            for l in full..k {
                sum = madd::<FMA>(sum, x[l], columns[g][l]);
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
    #[derive(Clone)]
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

        /// The same case with its result computed again (after a change to A or B).
        fn recomputed(mut self) -> Case {
            fn product<T>(case: &Case, alpha: T, beta: T) -> Vec<u8>
            where
                T: tabgrid_shared::kernels::Element + bytemuck::Pod,
            {
                let (m, n, k) = (case.m, case.n, case.k);
                let values = |bytes: &[u8]| bytemuck::pod_collect_to_vec::<u8, T>(bytes);
                let (a, b) = (values(&case.a), values(&case.b));
                let mut out = case.c.as_deref().map_or(vec![T::ZERO; m * n], values);
                gemm::<T>(
                    alpha,
                    MatRef::row_major(&a, m, k).unwrap(),
                    MatRef::row_major(&b, k, n).unwrap(),
                    beta,
                    MatMut::row_major(&mut out, m, n).unwrap(),
                )
                .unwrap();
                bytemuck::cast_slice(&out).to_vec()
            }
            self.result = match self.dtype {
                Dtype::F32 => product(&self, self.alpha as f32, self.beta as f32),
                Dtype::F64 => product(&self, self.alpha, self.beta),
            };
            self
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
                        for passes in Passes::all(dtype) {
                            assert_eq!(
                                check_on(&case.tile(), &case.result, &mut rng, passes),
                                Ok(()),
                                "{dtype} {shape:?} seed {seed} portable {portable} {passes:?}"
                            );
                        }
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
            for passes in Passes::all(dtype) {
                let check = JobCheck::from_panels_on(
                    dtype,
                    case.alpha,
                    0.0,
                    plan,
                    Panels {
                        a: &[&case.a],
                        b: &[&case.b],
                        c: None,
                    },
                    &mut rng,
                    passes,
                );
                assert!(check.columns.balanced.is_none());
                assert_eq!(check.check((0, 0), &case.result), Ok(()), "{dtype}");
                let mut wrong = case.clone();
                wrong.corrupt(7, 9, if dtype == Dtype::F32 { 0.1 } else { 1e-6 });
                let err = check
                    .check((0, 0), &wrong.result)
                    .expect_err("a wrong element");
                assert_eq!(err.row, 7, "{err}");
            }
        }
        // Random rows are balanced: the shortcut is what most jobs take.
        let case = Case::new(Dtype::F32, (8, 256, 512), 1, false);
        let plan = TilePlan::new(8, 256, 512, 8, 256);
        let check = JobCheck::from_panels(
            Dtype::F32,
            1.0,
            0.0,
            plan,
            Panels {
                a: &[&case.a],
                b: &[&case.b],
                c: None,
            },
            &mut rng,
        );
        assert!(check.columns.balanced.is_some());
    }

    /// The vectorised passes against plain sums, for every remainder of their blocking
    /// (rows of 4, columns of 4 and 6, lanes of 8, 16, 32 and 64, f32 sums widened every
    /// stretch), both element types, read in place and from a misaligned copy, on this
    /// CPU's path, the portable one and (f32, where the CPU has AVX-512F) the f32 one
    /// within its documented bound.
    #[test]
    fn the_vectorised_passes_match_plain_sums() {
        let mut rng = StdRng::seed_from_u64(3);
        for (rows, k, columns) in [
            (1, 1, 1),
            (3, 7, 2),
            (4, 8, 4),
            (5, 33, 5),
            (9, 100, 7),
            (6, 64, 13),
            (5, 4200, 3),
        ] {
            let a = random(&mut rng, rows * k, 3.0);
            let w = random(&mut rng, k * columns, 1.0);
            for f32s in [false, true] {
                let bytes = if f32s {
                    f32_bytes(&a.iter().map(|&v| v as f32).collect::<Vec<f32>>())
                } else {
                    f64_bytes(&a)
                };
                let mut shifted = vec![0u8; bytes.len() + 1];
                shifted[1..].copy_from_slice(&bytes);
                // `w` rounded to f32 for the f32 path; `r` of the row passes is its first
                // column, exactly an f32 as the check draws it.
                let w32: Vec<f32> = w.iter().map(|&v| v as f32).collect();
                let mut w = w.clone();
                w[..k].iter_mut().for_each(|v| *v = f64::from(*v as f32));
                let w = &w;
                #[derive(Clone, Copy, Debug, PartialEq)]
                enum Path {
                    /// The plain loops, with no vector unit in mind.
                    Portable,
                    Passes(Passes),
                }
                // The plain loops, and every way this CPU can run the passes (the f32 one
                // for f32 rows), each from aligned and misaligned bytes.
                let dtype = if f32s { Dtype::F32 } else { Dtype::F64 };
                let mut inputs = vec![(&bytes[..], Path::Portable)];
                for passes in Passes::all(dtype) {
                    inputs.push((&bytes[..], Path::Passes(passes)));
                    inputs.push((&shifted[1..], Path::Passes(passes)));
                }
                for (input, path) in inputs {
                    // The f32 path's lanes, if it is that one.
                    let narrow = match path {
                        Path::Passes(passes) if f32s && passes.narrow => passes.registers,
                        _ => None,
                    };
                    let width = 2 * columns + 1;
                    let mut out = vec![0.0; rows * width];
                    let mut stats = Vec::new();
                    fn run<T: Element>(
                        path: Path,
                        a: &[T],
                        (k, w, w32, columns, width): (usize, &[f64], &[f32], usize, usize),
                        out: &mut [f64],
                        stats: &mut Vec<Stats>,
                    ) {
                        match path {
                            Path::Portable => {
                                let (sums, bounds) = ((width, 0), (width, columns));
                                times_portable::<T, false>(a, k, w, out, sums, Some(2 * columns));
                                times_portable::<T, true>(a, k, w, out, bounds, None);
                                row_stats_lanes::<T, false, 8, false>(a, k, &w[..k], stats);
                            }
                            Path::Passes(Passes { registers, narrow }) => {
                                let (w32, r32) = match narrow {
                                    true => (Some(w32), Some(&w32[..k])),
                                    false => (None, None),
                                };
                                let ws = (w, w32);
                                let (sums, bounds) = ((width, 0), (width, columns));
                                times::<T, false>(
                                    registers,
                                    a,
                                    k,
                                    ws,
                                    out,
                                    sums,
                                    Some(2 * columns),
                                );
                                times::<T, true>(registers, a, k, ws, out, bounds, None);
                                row_stats::<T, false>(registers, a, k, &w[..k], r32, stats);
                            }
                        }
                    }
                    let shape = (k, &w[..], &w32[..], columns, width);
                    if f32s {
                        run(path, &elements::<f32>(input), shape, &mut out, &mut stats);
                    } else {
                        run(path, &elements::<f64>(input), shape, &mut out, &mut stats);
                    }
                    // f32 input: compare with the sums of the rounded values; the f32
                    // path within its bound, the others to f64 rounding.
                    let a: Vec<f64> = if f32s {
                        a.iter().map(|&v| f64::from(v as f32)).collect()
                    } else {
                        a.clone()
                    };
                    let unit = f64::from(f32::EPSILON) / 2.0;
                    let close = |got: f64, want: f64, scale: f64, chain: usize| {
                        let bound = if narrow.is_some() {
                            1.01 * (chain + 1) as f64 * unit * scale
                        } else {
                            1e-12 * scale
                        };
                        assert!(
                            (got - want).abs() <= bound,
                            "{path:?} {rows}x{k}x{columns}: {got} vs {want}"
                        );
                    };
                    let lanes = narrow.map_or(1, Registers::f32_lanes);
                    let (row_chain, times_chain) =
                        (narrow_chain(k, 4 * lanes) + 2, narrow_chain(k, lanes));
                    let plain = |t: usize, c: usize, abs: bool| -> (f64, f64) {
                        (0..k).fold((0.0, 0.0), |(sum, scale), l| {
                            let v = if abs {
                                a[t * k + l].abs()
                            } else {
                                a[t * k + l]
                            };
                            let w = if narrow.is_some() {
                                f64::from(w32[c * k + l])
                            } else {
                                w[c * k + l]
                            };
                            let p = v * w;
                            (sum + p, scale + p.abs())
                        })
                    };
                    for t in 0..rows {
                        let row = &a[t * k..(t + 1) * k];
                        for c in 0..columns {
                            let (want, scale) = plain(t, c, false);
                            close(out[t * width + c], want, scale, times_chain);
                            let (want, scale) = plain(t, c, true);
                            close(out[t * width + columns + c], want, scale, times_chain);
                        }
                        let abs: f64 = row.iter().map(|v| v.abs()).sum();
                        close(out[t * width + 2 * columns], abs, abs, times_chain);
                        let (dot, scale) = plain(t, 0, false);
                        close(stats[t].0, dot, scale, row_chain);
                        close(stats[t].1, abs, abs, row_chain);
                        let max = row.iter().fold(0.0f64, |m, v| m.max(v.abs()));
                        assert_eq!(stats[t].2, max);
                    }
                }
            }
        }
    }

    /// A job of many tiles, cut unevenly (bands of every width the passes block by), with
    /// and without the balanced shortcut: every honest tile passes, and a wrong element
    /// in any tile is found in its row.
    #[test]
    fn every_tile_of_a_job_is_judged_right() {
        let mut rng = StdRng::seed_from_u64(21);
        for (dtype, passes) in [Dtype::F32, Dtype::F64].into_iter().flat_map(|dtype| {
            Passes::all(dtype)
                .into_iter()
                .map(move |passes| (dtype, passes))
        }) {
            for balanced in [true, false] {
                // Balanced needs bands wide enough for their row sums to agree: 7 of 64.
                let (m, n, k, edge) = if balanced {
                    (45, 448, 130, 64)
                } else {
                    (45, 97, 130, 8)
                };
                let mut case = Case::new(dtype, (m, n, k), 4, false);
                if !balanced {
                    let b: Vec<f64> = match dtype {
                        Dtype::F32 => tabgrid_shared::matrix::f32s(&case.b)
                            .iter()
                            .map(|&v| f64::from(v))
                            .collect(),
                        Dtype::F64 => tabgrid_shared::matrix::f64s(&case.b),
                    };
                    let b: Vec<f64> = b
                        .chunks_exact(n)
                        .enumerate()
                        .flat_map(|(l, row)| {
                            let scale = if l % 4 == 0 { 500.0 } else { 1.0 };
                            row.iter().map(move |v| v * scale)
                        })
                        .collect();
                    case.b = match dtype {
                        Dtype::F32 => f32_bytes(&b.iter().map(|&v| v as f32).collect::<Vec<f32>>()),
                        Dtype::F64 => f64_bytes(&b),
                    };
                    case = case.recomputed();
                }
                // Tiles 5 high (the last row band 5 too: 9 bands), 64 wide (7 bands) or 8
                // wide (13 bands, the last one 1 wide).
                let plan = TilePlan::new(m as u32, n as u32, k as u32, 5, edge);
                let size = dtype.size();
                let block = |bytes: &[u8],
                             rows: std::ops::Range<u32>,
                             cols: std::ops::Range<u32>,
                             width: usize| {
                    let mut out = Vec::new();
                    for r in rows {
                        let start = (r as usize * width + cols.start as usize) * size;
                        out.extend_from_slice(&bytes[start..start + cols.len() * size]);
                    }
                    out
                };
                // Built as the grid builds it, fed while hashing: B's panels a piece at a
                // time, then A's a row at a time, then C's tiles.
                let beta = if case.c.is_some() { case.beta } else { 0.0 };
                let mut from_b =
                    JobCheck::begin_on(dtype, case.alpha, beta, plan, &mut rng, passes);
                for j in 0..plan.tiles_j() {
                    let panel = block(&case.b, 0..k as u32, plan.cols(j), n);
                    let mut hasher = blake3::Hasher::new();
                    let row_bytes = plan.cols(j).len() * size;
                    let mut pieces = 0;
                    hash_rows_by(4096, &mut hasher, &panel, row_bytes, |first, rows| {
                        pieces += 1;
                        from_b.rows_of_b(j, first, rows);
                    });
                    assert_eq!(hasher.finalize(), blake3::hash(&panel));
                    assert!(edge == 8 || pieces > 1, "{pieces} pieces");
                }
                let mut from_a = from_b.then_a();
                for i in 0..plan.tiles_i() {
                    for (t, row) in plan.rows(i).enumerate() {
                        let start = row as usize * k * size;
                        from_a.rows_of_a(i, t, &case.a[start..start + k * size]);
                    }
                }
                if let Some(c) = &case.c {
                    for (i, j) in plan.tiles() {
                        let tile = block(c, plan.rows(i), plan.cols(j), n);
                        let row_bytes = plan.cols(j).len() * size;
                        hash_rows(
                            &mut blake3::Hasher::new(),
                            &tile,
                            row_bytes,
                            |first, rows| from_a.rows_of_c((i, j), first, rows),
                        );
                    }
                }
                let check = from_a.finish();
                assert_eq!(check.columns.balanced.is_some(), balanced, "{dtype}");
                assert_eq!(check.registers, passes.registers);
                assert_eq!(check.narrow, passes.narrow && dtype == Dtype::F32);
                for (i, j) in plan.tiles() {
                    let (rows, cols) = (plan.rows(i), plan.cols(j));
                    let tile = block(&case.result, rows.clone(), cols.clone(), n);
                    let sum = tabgrid_shared::protocol::checksum(&tile);
                    assert_eq!(
                        check.check_hashed((i, j), &tile, sum),
                        (true, Some(Ok(()))),
                        "{dtype} tile ({i}, {j})"
                    );
                    assert_eq!(check.check_hashed((i, j), &tile, sum ^ 1), (false, None));
                    let (row, col) = (
                        (i + j) as usize % rows.len(),
                        (i * 3 + j) as usize % cols.len(),
                    );
                    // As in `a_wrong_element_fails`: a share of the tile's largest value.
                    let mut wrong = Case {
                        result: tile,
                        n: cols.len(),
                        ..case.clone()
                    };
                    wrong.corrupt(row, col, if dtype == Dtype::F32 { 0.1 } else { 1e-6 });
                    let tile = wrong.result;
                    let err = check.check((i, j), &tile).expect_err("a wrong element");
                    assert_eq!(err.row, row, "{dtype} tile ({i}, {j}): {err}");
                    let sum = tabgrid_shared::protocol::checksum(&tile);
                    // Hashed whole, and a row at a time.
                    assert_eq!(
                        check.check_hashed_by(1, (i, j), &tile, sum),
                        (true, Some(Err(err.clone())))
                    );
                    assert_eq!(
                        check.check_hashed((i, j), &tile, sum),
                        (true, Some(Err(err)))
                    );
                }
            }
        }
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
                for passes in Passes::all(dtype) {
                    let err = check_on(&case.tile(), &case.result, &mut rng, passes)
                        .expect_err(&format!("{dtype} seed {seed} {passes:?}"));
                    assert_eq!(err.row, (seed as usize * 7) % 40, "{err}");
                }
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

    /// Magnitudes near f32's largest, where the check's f32 sums overflow though the
    /// product does not: the f32 passes give way to f64 for those rows, and the check still
    /// judges (an infinite bound would let every row through).
    #[test]
    fn sums_that_overflow_f32_are_checked_in_f64() {
        let mut rng = StdRng::seed_from_u64(13);
        let (m, n, k) = (6, 256, 2);
        // A, B, and the element made wrong with what is added to it: far above the
        // tolerance, far below the values.
        let cases: [(Vec<f32>, Vec<f32>, usize, f32); 2] = [
            // Σ_q |B_lq| is 2.56e38 per row: near f32's largest (tolerance about 4·10³¹).
            (
                vec![1.0; m * k],
                (0..k * n)
                    .map(|i| if i % 3 == 0 { -1e36 } else { 1e36 })
                    .collect(),
                3 * n + 100,
                1e35,
            ),
            // Entries of B near f32's largest: a lane's sum over a row of B, and W,
            // overflow f32, though A·B does not: the rows of A are (1, -1) (tolerance
            // about 2·10³⁴).
            (
                (0..m * k)
                    .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
                    .collect(),
                vec![2e38; k * n],
                2 * n + 7,
                1e36,
            ),
        ];
        for (a, b, at, bump) in cases {
            let mut out = vec![0.0f32; m * n];
            gemm_portable(
                1.0,
                MatRef::row_major(&a, m, k).unwrap(),
                MatRef::row_major(&b, k, n).unwrap(),
                0.0,
                MatMut::row_major(&mut out, m, n).unwrap(),
            )
            .unwrap();
            assert!(out.iter().all(|v| v.is_finite()));
            let (a, b) = (f32_bytes(&a), f32_bytes(&b));
            let tile = Tile {
                dtype: Dtype::F32,
                m,
                n,
                k,
                alpha: 1.0,
                beta: 0.0,
                a: &a,
                b: &b,
                c: None,
            };
            for passes in Passes::all(Dtype::F32) {
                assert_eq!(check_on(&tile, &f32_bytes(&out), &mut rng, passes), Ok(()));
                let mut wrong = out.clone();
                wrong[at] += bump;
                let err = check_on(&tile, &f32_bytes(&wrong), &mut rng, passes)
                    .expect_err("a wrong element");
                assert_eq!(err.row, at / n, "{err}");
            }
        }
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
