//! How a GEMM job `C = alpha·A·B + beta·C` is cut into output tiles.
//!
//! Tile `(i, j)` covers rows `rows(i)` and columns `cols(j)` of C and needs row panel
//! `A[i]` (`tile rows x k`) and column panel `B[j]` (`k x tile cols`). Panels are what
//! travel to workers and what they cache, so the policy keeps every panel inside one frame
//! and tiles large enough that the kernel runs near its large-matrix speed.

use core::ops::Range;

use crate::matrix::Dtype;
use crate::protocol::MAX_FRAME_BYTES;

/// Largest operand panel the policy cuts, leaving room in a frame for the header.
pub const MAX_PANEL_BYTES: usize = MAX_FRAME_BYTES / 2;

/// Edge of the square tiles the policy prefers. The kernel needs tiles this big to run
/// within 10 % of its large-matrix speed on one thread (`cargo run --release -p
/// tabgrid-shared --features rayon --example tile_speed`, AVX-512 on Zen 5: f32 at
/// 0.92–0.95 of its 2048³ speed with k = 1024..4096, f64 0.98; at 256 only 0.84–0.87 and
/// 0.88–0.95).
pub const PREFERRED_EDGE: u32 = 512;

/// Edges above this are halved (down to it) while a job would have fewer than
/// [`MIN_TILES`] tiles, so that smaller jobs still spread over several workers.
pub const SMALL_JOB_EDGE: u32 = 256;

/// Fewest tiles a job is cut into when shrinking the edge (see [`SMALL_JOB_EDGE`]) can
/// give it that many.
pub const MIN_TILES: u64 = 16;

/// Why a job cannot be tiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TilingError {
    #[error(
        "inner dimension k = {k} is too large: one row of A ({bytes} bytes) exceeds the panel limit of {limit} bytes"
    )]
    InnerTooLarge { k: u32, bytes: u64, limit: usize },
}

/// The tiling of one job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TilePlan {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub tile_m: u32,
    pub tile_n: u32,
}

impl TilePlan {
    /// A plan with explicit tile sizes (both at least 1).
    pub fn new(m: u32, n: u32, k: u32, tile_m: u32, tile_n: u32) -> TilePlan {
        TilePlan {
            m,
            n,
            k,
            tile_m: tile_m.max(1),
            tile_n: tile_n.max(1),
        }
    }

    /// The policy: square tiles of [`PREFERRED_EDGE`], shrunk where a panel of that many
    /// rows (or columns) of length `k` would not fit in a frame, and halved towards
    /// [`SMALL_JOB_EDGE`] while the job would have fewer than [`MIN_TILES`] tiles.
    pub fn for_job(m: u32, n: u32, k: u32, dtype: Dtype) -> Result<TilePlan, TilingError> {
        TilePlan::with_edge(m, n, k, dtype, PREFERRED_EDGE)
    }

    /// The policy with another preferred edge (benchmarks and tests use small tiles).
    pub fn with_edge(
        m: u32,
        n: u32,
        k: u32,
        dtype: Dtype,
        edge: u32,
    ) -> Result<TilePlan, TilingError> {
        // In u64: on wasm32 a usize holds 4 GiB, less than k·8 can be.
        let line = u64::from(k) * dtype.size() as u64;
        if line > MAX_PANEL_BYTES as u64 {
            return Err(TilingError::InnerTooLarge {
                k,
                bytes: line,
                limit: MAX_PANEL_BYTES,
            });
        }
        // line <= MAX_PANEL_BYTES, so it fits a usize on every target.
        let fit = (MAX_PANEL_BYTES / (line as usize).max(1)).min(u32::MAX as usize) as u32;
        let mut edge = edge.max(1).min(fit);
        let plan = |edge: u32| TilePlan::new(m, n, k, edge.min(m.max(1)), edge.min(n.max(1)));
        while edge > SMALL_JOB_EDGE && plan(edge).tile_count() < MIN_TILES {
            edge = (edge / 2).max(SMALL_JOB_EDGE);
        }
        Ok(plan(edge))
    }

    /// Number of tile rows.
    pub fn tiles_i(&self) -> u32 {
        self.m.div_ceil(self.tile_m)
    }

    /// Number of tile columns.
    pub fn tiles_j(&self) -> u32 {
        self.n.div_ceil(self.tile_n)
    }

    pub fn tile_count(&self) -> u64 {
        u64::from(self.tiles_i()) * u64::from(self.tiles_j())
    }

    /// Rows of C (and of A) covered by tile row `i`.
    pub fn rows(&self, i: u32) -> Range<u32> {
        let start = i * self.tile_m;
        start..(start + self.tile_m).min(self.m)
    }

    /// Columns of C (and of B) covered by tile column `j`.
    pub fn cols(&self, j: u32) -> Range<u32> {
        let start = j * self.tile_n;
        start..(start + self.tile_n).min(self.n)
    }

    /// Floating-point operations of tile `(i, j)`: a multiply and an add per term.
    pub fn tile_flops(&self, i: u32, j: u32) -> f64 {
        2.0 * self.rows(i).len() as f64 * self.cols(j).len() as f64 * f64::from(self.k)
    }

    /// Tiles in row-major order.
    pub fn tiles(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        (0..self.tiles_i()).flat_map(move |i| (0..self.tiles_j()).map(move |j| (i, j)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_every_element_once() {
        for (m, n, k) in [(1, 1, 1), (37, 29, 53), (600, 257, 9), (256, 512, 3)] {
            let plan = TilePlan::for_job(m, n, k, Dtype::F32).unwrap();
            let mut seen = vec![0u8; (m * n) as usize];
            for (i, j) in plan.tiles() {
                for r in plan.rows(i) {
                    for c in plan.cols(j) {
                        seen[(r * n + c) as usize] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&s| s == 1), "{m}x{n}");
            assert_eq!(plan.tile_count(), plan.tiles().count() as u64);
        }
    }

    #[test]
    fn big_jobs_get_big_tiles_and_small_ones_enough_tiles() {
        let edge = |m, n| {
            let plan = TilePlan::for_job(m, n, 1024, Dtype::F32).unwrap();
            (plan.tile_m, plan.tile_n, plan.tile_count())
        };
        assert_eq!(edge(4096, 4096), (512, 512, 64));
        assert_eq!(edge(2048, 2048), (512, 512, 16));
        // 512 would give 4 tiles: halved to 256 for 16.
        assert_eq!(edge(1024, 1024), (256, 256, 16));
        // Never below 256 for the sake of the count, nor above the matrix.
        assert_eq!(edge(300, 200), (256, 200, 2));
        assert_eq!(edge(8192, 100), (512, 100, 16));
        // Explicit small edges are kept.
        let small = TilePlan::with_edge(1000, 1000, 10, Dtype::F64, 32).unwrap();
        assert_eq!((small.tile_m, small.tile_count()), (32, 32 * 32));
    }

    #[test]
    fn panels_fit_in_a_frame() {
        let k = 4 << 20;
        let plan = TilePlan::for_job(1000, 1000, k, Dtype::F64).unwrap();
        assert!(plan.tile_m as usize * k as usize * 8 <= MAX_PANEL_BYTES);
        assert!(plan.tile_m >= 1);
        let err = TilePlan::for_job(1, 1, u32::MAX, Dtype::F64).unwrap_err();
        assert!(err.to_string().contains("k = 4294967295"));
    }
}
