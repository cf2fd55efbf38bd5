use std::time::Instant;
use tabgrid_shared::kernels::*;

type F<T> = fn(T, MatRef<'_, T>, MatRef<'_, T>, T, MatMut<'_, T>) -> Result<(), ShapeError>;

fn run<T: Element>(name: &str, n: usize, f: F<T>) {
    let a: Vec<T> = (0..n * n)
        .map(|i| T::from_f64(((i * 7 % 13) as f64) / 13.0 - 0.5))
        .collect();
    let b: Vec<T> = (0..n * n)
        .map(|i| T::from_f64(((i * 5 % 11) as f64) / 11.0 - 0.5))
        .collect();
    let mut c = vec![T::ZERO; n * n];
    let mut best = f64::MAX;
    for _ in 0..12 {
        let t = Instant::now();
        f(
            T::ONE,
            MatRef::row_major(&a, n, n).unwrap(),
            MatRef::row_major(&b, n, n).unwrap(),
            T::ZERO,
            MatMut::row_major(&mut c, n, n).unwrap(),
        )
        .unwrap();
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "{name:>24} n={n}: {:.1} GFLOP/s ({:.1} ms)",
        2.0 * (n as f64).powi(3) / best / 1e9,
        best * 1e3
    );
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(1024);
    println!("active path: {}", active_path());
    if let Some(which) = std::env::args().nth(2) {
        for _ in 0..5 {
            match which.as_str() {
                "f32" => run::<f32>("gemm f32", n, gemm),
                "f64" => run::<f64>("gemm f64", n, gemm),
                "pf32" => run::<f32>("gemm_portable f32", n, gemm_portable),
                _ => run::<f64>("gemm_portable f64", n, gemm_portable),
            }
        }
        return;
    }
    run::<f32>("gemm f32", n, gemm);
    run::<f64>("gemm f64", n, gemm);
    run::<f32>("gemm_portable f32", n, gemm_portable);
    run::<f64>("gemm_portable f64", n, gemm_portable);
    run::<f32>("par_gemm f32", n, par_gemm);
    run::<f64>("par_gemm f64", n, par_gemm);
}
