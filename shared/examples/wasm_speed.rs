//! Single-thread GEMM speed of the dispatched path and the portable path, in GFLOP/s, for
//! comparing the wasm32 `simd128` kernels (run under Node through `xtask/wasi-runner.mjs`)
//! with the native ones. Prints the median of several timed runs after one warm-up.
//!
//! `cargo run --release -p tabgrid-shared --example wasm_speed [N...]` natively; for wasm,
//! add `--target wasm32-wasip1` with the runner and `+simd128` flags shown in the runner.

use std::time::Instant;

use tabgrid_shared::kernels::{self, Element, MatMut, MatRef, ShapeError};

type GemmFn<T> = fn(T, MatRef<'_, T>, MatRef<'_, T>, T, MatMut<'_, T>) -> Result<(), ShapeError>;

/// A closure that runs `gemm` once on fresh `n x n` operands and returns the seconds taken.
fn timed<T: Element>(gemm: GemmFn<T>, n: usize) -> Box<dyn FnMut() -> f64> {
    // Deterministic values in [-1, 1), so no run hits denormals or infinities.
    let fill = |salt: usize| -> Vec<T> {
        (0..n * n)
            .map(|i| T::from_f64(((i * 7919 + salt) % 2003) as f64 / 1001.5 - 1.0))
            .collect()
    };
    let (a, b) = (fill(1), fill(2));
    let mut c = vec![T::ZERO; n * n];
    Box::new(move || {
        let start = Instant::now();
        gemm(
            T::ONE,
            MatRef::row_major(&a, n, n).expect("n x n"),
            MatRef::row_major(&b, n, n).expect("n x n"),
            T::ZERO,
            MatMut::row_major(&mut c, n, n).expect("n x n"),
        )
        .expect("square shapes agree");
        start.elapsed().as_secs_f64()
    })
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|n| n.parse().expect("sizes are integers"))
        .collect();
    let sizes = if sizes.is_empty() {
        vec![512, 1024]
    } else {
        sizes
    };
    let active = kernels::active_path();
    for n in sizes {
        let mut contestants = [
            timed::<f32>(kernels::gemm, n),
            timed::<f32>(kernels::gemm_portable, n),
            timed::<f64>(kernels::gemm, n),
            timed::<f64>(kernels::gemm_portable, n),
        ];
        // One warm-up each (under V8 it also lets the optimizing compiler take over), then
        // rounds that take turns, so a machine that speeds up or slows down part-way
        // through affects every contestant alike.
        contestants.iter_mut().for_each(|run| {
            run();
        });
        let rounds = if n <= 512 { 9 } else { 5 };
        let mut seconds = vec![Vec::with_capacity(rounds); contestants.len()];
        for _ in 0..rounds {
            for (run, seconds) in contestants.iter_mut().zip(&mut seconds) {
                seconds.push(run());
            }
        }
        let gflops: Vec<f64> = seconds
            .iter_mut()
            .map(|s| {
                s.sort_by(f64::total_cmp);
                2.0 * (n as f64).powi(3) / s[s.len() / 2] / 1e9
            })
            .collect();
        println!(
            "n={n:5}  f32 {active} {:6.2}  portable {:6.2}  |  f64 {active} {:6.2}  portable {:6.2}  GFLOP/s (median of {rounds})",
            gflops[0], gflops[1], gflops[2], gflops[3],
        );
    }
}
