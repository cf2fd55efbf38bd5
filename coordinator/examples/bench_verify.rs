//! Verification overhead (`cargo xtask bench verify`): what Freivalds' check of every tile
//! costs the coordinator, as a share of the job's compute, for square jobs of n = 1024,
//! 2048, 4096 in f32 and f64 cut with the tile policy. The compute is the shared kernel on
//! one thread (what one worker core spends). The coordinator hashes every operand panel
//! (content keys) and every result (checksums) whether or not it checks; the check's
//! passes run on the same bytes as they are hashed. Its cost is the difference between
//! that work with and without the check, on one thread (what one coordinator core
//! spends), timed in this run, and split by pass (B's panels, A's, the results); the check
//! on its own (from panels in memory, sharing no pass) is shown beside it. Replication, the usual alternative, would cost one extra
//! copy of the compute: 100 %.
//!
//! Options: `--sizes 1024,2048,4096`, `--dtypes f32,f64`, `--reps R` (3; medians).

use std::time::Instant;

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

/// A job's panels and result tiles, cut as the grid cuts them (not timed: the grid cuts
/// them whether or not it checks).
struct Cut {
    plan: TilePlan,
    a: Vec<Vec<u8>>,
    b: Vec<Vec<u8>>,
    /// Each with its checksum, as the worker sent it.
    tiles: Vec<((u32, u32), Vec<u8>, u64)>,
}

fn cut(dtype: Dtype, plan: TilePlan, a: &Matrix, b: &Matrix, c: &Matrix) -> Cut {
    let k = plan.k as usize;
    let row_bytes = k * dtype.size();
    Cut {
        plan,
        a: (0..plan.tiles_i())
            .map(|i| {
                let rows = plan.rows(i);
                a.data[rows.start as usize * row_bytes..rows.end as usize * row_bytes].to_vec()
            })
            .collect(),
        b: (0..plan.tiles_j())
            .map(|j| {
                let cols = plan.cols(j);
                b.block(0, cols.start as usize, k, cols.len())
            })
            .collect(),
        tiles: plan
            .tiles()
            .map(|(i, j)| {
                let block = c.tile(&plan, (i, j));
                let sum = tabgrid_shared::protocol::checksum(&block);
                ((i, j), block, sum)
            })
            .collect(),
    }
}

/// What the coordinator does to a job's bytes with or without checking: hashes every
/// panel (content keys) and every result (checksums); with `check`, builds the job's
/// `JobCheck` from the panels as they are hashed and checks every result as it is hashed,
/// as `grid::PreparedJob` and the socket task do. Returns the seconds each part took: B's
/// panels, A's, the results.
fn handle(dtype: Dtype, job: &Cut, check: bool) -> [f64; 3] {
    let plan = job.plan;
    let size = dtype.size();
    let k = plan.k as usize;
    let mut from_b =
        check.then(|| verify::JobCheck::begin(dtype, 1.0, 0.0, plan, &mut rand::rng()));
    let start = Instant::now();
    for (j, panel) in job.b.iter().enumerate() {
        let mut hasher = blake3::Hasher::new();
        let row_bytes = plan.cols(j as u32).len() * size;
        verify::hash_rows(&mut hasher, panel, row_bytes, |first, rows| {
            if let Some(check) = from_b.as_mut() {
                check.rows_of_b(j as u32, first, rows)
            }
        });
        std::hint::black_box(hasher.finalize());
    }
    let b = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut from_a = from_b.map(verify::FromB::then_a);
    for (i, panel) in job.a.iter().enumerate() {
        let mut hasher = blake3::Hasher::new();
        verify::hash_rows(&mut hasher, panel, k * size, |first, rows| {
            if let Some(check) = from_a.as_mut() {
                check.rows_of_a(i as u32, first, rows)
            }
        });
        std::hint::black_box(hasher.finalize());
    }
    let check = from_a.map(verify::FromA::finish);
    let a = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for (tile, result, sum) in &job.tiles {
        match &check {
            Some(check) => {
                let (ok, verdict) = check.check_hashed(*tile, result, *sum);
                assert!(ok && verdict == Some(Ok(())), "an honest tile passes");
            }
            None => assert_eq!(tabgrid_shared::protocol::checksum(result), *sum),
        }
    }
    [b, a, start.elapsed().as_secs_f64()]
}

/// The check on its own, from the panels in memory (no hashing to share its passes with):
/// what it would cost a coordinator that did not hash.
fn alone(dtype: Dtype, job: &Cut) -> f64 {
    let start = Instant::now();
    let a: Vec<&[u8]> = job.a.iter().map(Vec::as_slice).collect();
    let b: Vec<&[u8]> = job.b.iter().map(Vec::as_slice).collect();
    let panels = verify::Panels {
        a: &a,
        b: &b,
        c: None,
    };
    let check = verify::JobCheck::from_panels(dtype, 1.0, 0.0, job.plan, panels, &mut rand::rng());
    for (tile, result, _) in &job.tiles {
        check.check(*tile, result).expect("an honest tile passes");
    }
    start.elapsed().as_secs_f64()
}

fn main() {
    let sizes: Vec<usize> = arg("--sizes")
        .unwrap_or_else(|| "1024,2048,4096".into())
        .split(',')
        .map(|s| s.trim().parse().expect("--sizes takes numbers"))
        .collect();
    let dtypes = arg("--dtypes").unwrap_or_else(|| "f32,f64".into());
    let dtypes: Vec<&str> = dtypes.split(',').map(str::trim).collect();
    let reps: usize = arg("--reps").and_then(|r| r.parse().ok()).unwrap_or(3);
    println!(
        "command: cargo xtask bench verify --sizes {} --dtypes {} --reps {reps}",
        sizes
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(","),
        dtypes.join(",")
    );
    println!("check's passes in {}", verify::passes_here());
    println!(
        "\n| n | dtype | tiles | compute, 1 thread (s) | hashing alone (s) | hashing + check (s) | **overhead** | of which B / A / results | check alone, unshared (s) | its overhead | replication |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for &n in &sizes {
        for dtype in [Dtype::F32, Dtype::F64] {
            if !dtypes.contains(&dtype.name()) {
                continue;
            }
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
            let (mut computes, mut plain, mut checked, mut extra, mut unshared) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut parts = [Vec::new(), Vec::new(), Vec::new()];
            for _ in 0..reps {
                let (c, seconds) = compute(dtype, n, &a, &b);
                computes.push(seconds);
                let job = cut(dtype, plan, &a, &b, &c);
                let without = handle(dtype, &job, false);
                let with = handle(dtype, &job, true);
                let total = |parts: [f64; 3]| parts.iter().sum::<f64>();
                plain.push(total(without));
                checked.push(total(with));
                extra.push((total(with) - total(without)) / seconds);
                for (part, (with, without)) in parts.iter_mut().zip(with.iter().zip(without)) {
                    part.push((with - without) / seconds);
                }
                unshared.push(alone(dtype, &job) / seconds);
            }
            let parts = parts.map(|part| format!("{:.2}", 100.0 * median(part)));
            println!(
                "| {n} | {} | {} | {:.3} | {:.4} | {:.4} | **{:.2} %** | {} % | {:.4} | {:.2} % | 100 % |",
                dtype.name(),
                plan.tile_count(),
                median(computes.clone()),
                median(plain),
                median(checked),
                100.0 * median(extra),
                parts.join(" / "),
                median(unshared.clone()) * median(computes),
                100.0 * median(unshared),
            );
        }
    }
}
