//! Is a tile big enough? The kernel's speed on the shapes the scheduler hands out (an
//! `edge × k` panel of A times a `k × edge` panel of B) as a share of its speed on a
//! large square product, measured in the same run, on 1 and 2 threads.
//!
//! `cargo run --release -p tabgrid-shared --features rayon --example tile_speed`

use std::time::Instant;

use tabgrid_shared::kernels::{Element, MatMut, MatRef, par_gemm};

fn fill<T: Element>(len: usize, salt: usize) -> Vec<T> {
    (0..len)
        .map(|i| T::from_f64(((i * 7919 + salt) % 2003) as f64 / 1001.5 - 1.0))
        .collect()
}

/// Median GFLOP/s of `m × k · k × n` on the current pool over `reps` runs after a warm-up.
fn speed<T: Element>(m: usize, k: usize, n: usize, reps: usize) -> f64 {
    let (a, b) = (fill::<T>(m * k, 1), fill::<T>(k * n, 2));
    let mut c = vec![T::ZERO; m * n];
    let mut run = || {
        let start = Instant::now();
        par_gemm(
            T::ONE,
            MatRef::row_major(&a, m, k).unwrap(),
            MatRef::row_major(&b, k, n).unwrap(),
            T::ZERO,
            MatMut::row_major(&mut c, m, n).unwrap(),
        )
        .unwrap();
        start.elapsed().as_secs_f64()
    };
    run();
    let mut times: Vec<f64> = (0..reps).map(|_| run()).collect();
    times.sort_by(f64::total_cmp);
    2.0 * (m * n * k) as f64 / times[reps / 2] / 1e9
}

fn table<T: Element>(name: &str, threads: usize) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let large = speed::<T>(2048, 2048, 2048, 5);
        println!("\n{name}, {threads} thread(s): 2048³ runs at {large:.1} GFLOP/s");
        println!("| edge | k = 1024 | k = 2048 | k = 4096 |");
        println!("|---|---|---|---|");
        for edge in [128, 192, 256, 384, 512] {
            let cells: Vec<String> = [1024, 2048, 4096]
                .iter()
                .map(|&k| {
                    let reps = (2usize << 30) / (edge * edge * k).max(1);
                    let share = speed::<T>(edge, k, edge, reps.clamp(5, 201)) / large;
                    format!("{:.2}", share)
                })
                .collect();
            println!("| {edge} | {} |", cells.join(" | "));
        }
    });
}

fn main() {
    println!(
        "kernel path: {}; each cell is a tile's GFLOP/s over the 2048³ product's, medians",
        tabgrid_shared::kernels::active_path()
    );
    for threads in [1, 2] {
        table::<f32>("f32", threads);
        table::<f64>("f64", threads);
    }
}
