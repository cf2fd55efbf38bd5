//! Freivalds' check: is a tile a worker sent really `alpha·A_i·B_j + beta·C_ij`?
//!
//! With a random vector `r` the coordinator draws and never sends, the tile `T` passes
//! when `T·r` equals `alpha·A_i·(B_j·r) + beta·C_ij·r` row by row, within a rounding
//! tolerance. That costs `O(m·k + k·n + m·n)` multiply-adds against the `O(m·n·k)` of
//! computing the tile: about 1 % for a 256×256 tile with k = 2048, done twice.
//!
//! # The tolerance
//!
//! An honest worker's element `T_ij` differs from the exact value by at most `γ·P_ij`,
//! where `P_ij = |alpha|·Σ_l |A_il|·|B_lj| + |beta|·|C_ij|` and `γ ≈ (k + 2)·u`, `u` the
//! unit roundoff of the job's dtype (2⁻²⁴ for f32, 2⁻⁵³ for f64), whatever the kernel's
//! summation order or use of FMA (the classic worst-case bound for dot products; blocked
//! sums only do better). The check allows `γ = 2·(k + 2)·u`.
//!
//! Row `i` of `T·r − z` is `Σ_j e_ij·r_j` with honest errors `|e_ij| ≤ γ·P_ij` and signs
//! `r_j` the worker never saw, so it is a sum of independent, bounded, zero-mean terms, and
//! Hoeffding's inequality bounds it by `8·γ·√(Σ_j P_ij²)` except with probability
//! `2·e⁻³² ≈ 3·10⁻¹⁴`. `Σ_j P_ij² ≤ max_j P_ij · Σ_j P_ij`, and both factors have cheap
//! upper bounds: `Σ_j P_ij ≤ S_i = |alpha|·Σ_l |A_il|·(Σ_j |B_lj|) + |beta|·Σ_j |C_ij|`
//! and `max_j P_ij ≤ M_i = |alpha|·Σ_l |A_il|·(max_j |B_lj|) + |beta|·max_j |C_ij|`. The
//! check's own f64 rounding adds at most `2·(k + n + 2)·2⁻⁵³·S_i`. So a row passes when
//!
//! ```text
//! |(T·r)_i − z_i| ≤ 8·γ·√(M_i·S_i) + 2·(k + n + 2)·2⁻⁵³·S_i
//! ```
//!
//! An honest tile is refused with probability below 10⁻¹³ per row and round (tested over
//! many random tiles, with both kernels' summation orders). What gets through: an error
//! in one element smaller than that tolerance — about `16·(k + 2)·u·√(2n)` times the
//! typical `P_ij` of the row; for an f32 tile 256 wide with k = 2048 that is about 2 % of
//! `Σ_l |A_il|·|B_lj|`, for f64 about 10⁻¹¹ of it.
//!
//! Rows whose inputs hold Inf or NaN (so `S_i` is not finite) are not checked: their exact
//! result is itself Inf or NaN. A non-finite `T·r` in a row with finite inputs fails,
//! unless the row's magnitude is near the dtype's overflow threshold.

use rand::RngExt;
use tabgrid_shared::Dtype;

/// Independent random vectors per tile.
pub const ROUNDS: usize = 2;

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

/// Multiply-adds the check costs, to decide whether it runs inline or on a blocking
/// thread.
pub fn cost(tile: &Tile<'_>) -> usize {
    ROUNDS * (tile.m * tile.k + tile.k * tile.n + 2 * tile.m * tile.n)
}

/// Checks `result` (the worker's tile) against the operands. Lengths must match the
/// shapes (the caller checked the result's size; operands come from the coordinator).
pub fn check(tile: &Tile<'_>, result: &[u8], rng: &mut impl rand::Rng) -> Result<(), Mismatch> {
    let Tile { m, n, k, .. } = *tile;
    let width = tile.dtype.size();
    let row = |bytes: &[u8], i: usize, len: usize, out: &mut Vec<f64>| {
        out.clear();
        let bytes = &bytes[i * len * width..(i + 1) * len * width];
        match tile.dtype {
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
    };
    let unit = match tile.dtype {
        Dtype::F32 => f64::from(f32::EPSILON) / 2.0,
        Dtype::F64 => f64::EPSILON / 2.0,
    };
    let overflow = match tile.dtype {
        Dtype::F32 => f64::from(f32::MAX),
        Dtype::F64 => f64::MAX,
    };
    let gamma = 2.0 * (k + 2) as f64 * unit;
    let own = 2.0 * (k + n + 2) as f64 * (f64::EPSILON / 2.0);
    let beta = tile.c.map_or(0.0, |_| tile.beta);

    let signs: Vec<Vec<f64>> = (0..ROUNDS)
        .map(|_| {
            (0..n)
                .map(|_| if rng.random::<bool>() { 1.0 } else { -1.0 })
                .collect()
        })
        .collect();

    // B·r for every round, and the row sums and row maxima of |B|.
    let mut br = vec![vec![0.0; k]; ROUNDS];
    let mut b_abs = vec![0.0; k];
    let mut b_max = vec![0.0f64; k];
    let mut buf = Vec::with_capacity(n.max(k));
    for l in 0..k {
        row(tile.b, l, n, &mut buf);
        b_abs[l] = buf.iter().map(|v| v.abs()).sum();
        b_max[l] = buf.iter().fold(0.0, |m, v| m.max(v.abs()));
        for (round, r) in signs.iter().enumerate() {
            br[round][l] = dot(&buf, r);
        }
    }

    let mut want = [0.0; ROUNDS];
    let mut got = [0.0; ROUNDS];
    for i in 0..m {
        row(tile.a, i, k, &mut buf);
        let mut scale = tile.alpha.abs() * dot_abs(&buf, &b_abs);
        let mut peak = tile.alpha.abs() * dot_abs(&buf, &b_max);
        for round in 0..ROUNDS {
            want[round] = tile.alpha * dot(&buf, &br[round]);
        }
        if let Some(c) = tile.c.filter(|_| beta != 0.0) {
            row(c, i, n, &mut buf);
            scale += beta.abs() * buf.iter().map(|v| v.abs()).sum::<f64>();
            peak += beta.abs() * buf.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for (round, r) in signs.iter().enumerate() {
                want[round] += beta * dot(&buf, r);
            }
        }
        row(result, i, n, &mut buf);
        for (round, r) in signs.iter().enumerate() {
            got[round] = dot(&buf, r);
        }
        if !scale.is_finite() || !peak.is_finite() {
            continue;
        }
        let tolerance = 8.0 * gamma * (peak * scale).sqrt() + own * scale + f64::MIN_POSITIVE;
        for round in 0..ROUNDS {
            let (g, w) = (got[round], want[round]);
            let fine = if g.is_finite() && w.is_finite() {
                (g - w).abs() <= tolerance
            } else {
                // An overflow the worker's dtype could not avoid.
                scale >= overflow / 2.0
            };
            if !fine {
                return Err(Mismatch {
                    row: i,
                    got: g,
                    want: w,
                    tolerance,
                });
            }
        }
    }
    Ok(())
}

fn dot(x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

fn dot_abs(x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).map(|(a, b)| a.abs() * b).sum()
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
