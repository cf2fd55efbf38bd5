//! Verification overhead (`cargo xtask bench verify`): what Freivalds' check of every tile
//! costs the coordinator, as a share of the job's compute, for square jobs of n = 1024,
//! 2048, 4096 in f32 and f64 cut with the tile policy. The compute is the shared kernel on
//! one thread (what one worker core spends); the check is `verify::check` on one thread
//! (what one coordinator core spends), both timed in this run. Replication, the usual
//! alternative, would cost one extra copy of the compute: 100 %.
//!
//! Options: `--sizes 1024,2048,4096`, `--reps R` (3; medians).

use std::time::Instant;

use bytes::Bytes;

use tabgrid_coordinator::verify;
use tabgrid_shared::kernels::{MatMut, MatRef, gemm};
use tabgrid_shared::tiling::{PREFERRED_EDGE, TilePlan};
use tabgrid_shared::{Dtype, Matrix};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn random(len: usize, seed: u64) -> Vec<f64> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `A·B` with the shared kernel on this thread; returns it and the seconds it took.
fn compute(dtype: Dtype, n: usize, a: &Matrix, b: &Matrix) -> (Matrix, f64) {
    let mut c = Matrix::zeros(dtype, n, n).unwrap();
    let start = Instant::now();
    match dtype {
        Dtype::F32 => {
            let (a, b): (&[f32], &[f32]) =
                (bytemuck::cast_slice(&a.data), bytemuck::cast_slice(&b.data));
            let out: &mut [f32] = bytemuck::cast_slice_mut(&mut c.data);
            gemm(
                1.0,
                MatRef::row_major(a, n, n).unwrap(),
                MatRef::row_major(b, n, n).unwrap(),
                0.0,
                MatMut::row_major(out, n, n).unwrap(),
            )
            .unwrap();
        }
        Dtype::F64 => {
            let (a, b): (&[f64], &[f64]) =
                (bytemuck::cast_slice(&a.data), bytemuck::cast_slice(&b.data));
            let out: &mut [f64] = bytemuck::cast_slice_mut(&mut c.data);
            gemm(
                1.0,
                MatRef::row_major(a, n, n).unwrap(),
                MatRef::row_major(b, n, n).unwrap(),
                0.0,
                MatMut::row_major(out, n, n).unwrap(),
            )
            .unwrap();
        }
    }
    (c, start.elapsed().as_secs_f64())
}

/// Checks every tile of `c` as the coordinator does (one `JobCheck` for the job); returns
/// the seconds it took.
fn verify_all(dtype: Dtype, plan: TilePlan, a: &Matrix, b: &Matrix, c: &Matrix) -> f64 {
    let k = plan.k as usize;
    let row_bytes = k * dtype.size();
    // Panels as workers get them (cut once per job, not timed: the grid cuts them anyway).
    let a_panels: Vec<Bytes> = (0..plan.tiles_i())
        .map(|i| {
            let rows = plan.rows(i);
            Bytes::copy_from_slice(
                &a.data[rows.start as usize * row_bytes..rows.end as usize * row_bytes],
            )
        })
        .collect();
    let b_panels: Vec<Bytes> = (0..plan.tiles_j())
        .map(|j| {
            let cols = plan.cols(j);
            Bytes::from(b.block(0, cols.start as usize, k, cols.len()))
        })
        .collect();
    let tiles: Vec<((u32, u32), Vec<u8>)> = plan
        .tiles()
        .map(|(i, j)| {
            let (rows, cols) = (plan.rows(i), plan.cols(j));
            let block = c.block(
                rows.start as usize,
                cols.start as usize,
                rows.len(),
                cols.len(),
            );
            ((i, j), block)
        })
        .collect();
    let start = Instant::now();
    let check = verify::JobCheck::new(dtype, 1.0, 0.0, plan, a_panels, b_panels, &mut rand::rng());
    for (tile, result) in &tiles {
        check
            .check(*tile, None, result)
            .expect("an honest tile passes");
    }
    start.elapsed().as_secs_f64()
}

fn main() {
    let sizes: Vec<usize> = arg("--sizes")
        .unwrap_or_else(|| "1024,2048,4096".into())
        .split(',')
        .map(|s| s.trim().parse().expect("--sizes takes numbers"))
        .collect();
    let reps: usize = arg("--reps").and_then(|r| r.parse().ok()).unwrap_or(3);
    println!(
        "command: cargo xtask bench verify --sizes {} --reps {reps}",
        sizes
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    println!(
        "\n| n | dtype | tiles | compute, 1 thread (s) | check of every tile, 1 thread (s) | overhead | replication |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &n in &sizes {
        for dtype in [Dtype::F32, Dtype::F64] {
            let values = |seed| {
                let v = random(n * n, seed);
                match dtype {
                    Dtype::F32 => {
                        Matrix::from_f32(n, n, &v.iter().map(|&x| x as f32).collect::<Vec<_>>())
                    }
                    Dtype::F64 => Matrix::from_f64(n, n, &v),
                }
                .unwrap()
            };
            let (a, b) = (values(1), values(2));
            let plan =
                TilePlan::with_edge(n as u32, n as u32, n as u32, dtype, PREFERRED_EDGE).unwrap();
            let (mut computes, mut checks) = (Vec::new(), Vec::new());
            for _ in 0..reps {
                let (c, seconds) = compute(dtype, n, &a, &b);
                computes.push(seconds);
                checks.push(verify_all(dtype, plan, &a, &b, &c));
            }
            let (compute, check) = (median(computes), median(checks));
            println!(
                "| {n} | {} | {} | {compute:.3} | {check:.4} | **{:.2} %** | 100 % |",
                dtype.name(),
                plan.tile_count(),
                100.0 * check / compute
            );
        }
    }
}
