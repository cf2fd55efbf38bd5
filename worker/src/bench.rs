//! Measuring this machine: the `bench` command, and the quick self-measurement a worker
//! reports in `Hello` so that the coordinator can size its first lease deadlines.

use std::time::{Duration, Instant};

use serde::{Serialize, Serializer};
use tabgrid_shared::Dtype;
use tabgrid_shared::kernels::{Element, MatMut, MatRef, par_gemm};

use crate::compute::build_pool;

/// One measurement. Serializes to the line `bench` prints:
/// `{"dtype":"f32","size":1024,"threads":2,"gflops":12.3}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BenchReport {
    #[serde(serialize_with = "dtype_name")]
    pub dtype: Dtype,
    pub size: usize,
    pub threads: usize,
    /// Median speed of the timed runs, in 10⁹ floating-point operations per second
    /// (a multiply-add counts as two).
    #[serde(serialize_with = "two_decimals")]
    pub gflops: f64,
}

fn dtype_name<S: Serializer>(dtype: &Dtype, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(dtype.name())
}

/// Digits past the second decimal are noise between runs; printing them suggests
/// precision the measurement does not have.
fn two_decimals<S: Serializer>(gflops: &f64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64((gflops * 100.0).round() / 100.0)
}

/// Fewest timed runs `bench` takes the median of.
const MIN_RUNS: usize = 3;
/// Most timed runs `bench` makes.
const MAX_RUNS: usize = 10;
/// `bench` keeps timing runs (up to `MAX_RUNS`) until this much time is spent.
const BENCH_BUDGET: Duration = Duration::from_secs(1);

/// Multiplies two `size x size` matrices with `par_gemm` on `threads` threads (0: one per
/// core): one warm-up run, then at least three timed runs, reporting the median.
///
/// # Panics
/// When the operating system refuses to start the threads.
pub fn bench(dtype: Dtype, size: usize, threads: usize) -> BenchReport {
    let threads = crate::resolve_threads(threads);
    let pool = build_pool(threads).unwrap_or_else(|err| panic!("{err}"));
    let gflops = match dtype {
        Dtype::F32 => pool.install(|| median_gflops::<f32>(size)),
        Dtype::F64 => pool.install(|| median_gflops::<f64>(size)),
    };
    BenchReport {
        dtype,
        size,
        threads,
        gflops,
    }
}

/// Edge of the quick measurement: large enough for the blocked kernel to reach most of
/// its speed, small enough (~34 MFLOP) for many runs in its time budget.
const QUICK_SIZE: usize = 256;
/// Time the quick measurement may take at worker start.
const QUICK_BUDGET: Duration = Duration::from_millis(100);

/// The quick f32 measurement reported in `Hello`: best of as many 256³ runs as fit in
/// ~100 ms on the current rayon pool (call it from inside the worker's own). Best, not
/// median: on a busy machine the best run is the closest to what a tile will see once it
/// has the cores.
pub fn quick_gflops() -> f64 {
    let mut operands = Operands::<f32>::new(QUICK_SIZE);
    operands.run(); // warm-up: page in the buffers, wake the threads
    let started = Instant::now();
    let mut best = 0.0f64;
    while started.elapsed() < QUICK_BUDGET {
        best = best.max(operands.gflops());
    }
    best
}

fn median_gflops<T: Element>(size: usize) -> f64 {
    if size == 0 {
        return 0.0;
    }
    let mut operands = Operands::<T>::new(size);
    operands.run();
    let started = Instant::now();
    let mut runs = Vec::new();
    while runs.len() < MIN_RUNS || (runs.len() < MAX_RUNS && started.elapsed() < BENCH_BUDGET) {
        runs.push(operands.gflops());
    }
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

/// Square operands for repeated timing.
struct Operands<T> {
    size: usize,
    a: Vec<T>,
    b: Vec<T>,
    c: Vec<T>,
}

impl<T: Element> Operands<T> {
    fn new(size: usize) -> Self {
        // Small non-zero values, so that no run meets denormals or infinities (which would
        // be slower and measure the wrong thing); varying, so no kernel shortcut applies.
        let fill = |seed: usize| -> Vec<T> {
            (0..size * size)
                .map(|i| T::from_f64(((i * 7 + seed) % 17) as f64 / 16.0 - 0.5))
                .collect()
        };
        Operands {
            size,
            a: fill(1),
            b: fill(5),
            c: vec![T::ZERO; size * size],
        }
    }

    fn run(&mut self) {
        let n = self.size;
        // The buffers were made for this shape, so neither the views nor the product fail.
        let (Ok(a), Ok(b), Ok(c)) = (
            MatRef::row_major(&self.a, n, n),
            MatRef::row_major(&self.b, n, n),
            MatMut::row_major(&mut self.c, n, n),
        ) else {
            return;
        };
        let _ = par_gemm(T::ONE, a, b, T::ZERO, c);
    }

    /// One timed run.
    fn gflops(&mut self) -> f64 {
        let started = Instant::now();
        self.run();
        let seconds = started.elapsed().as_secs_f64().max(1e-9);
        2.0 * (self.size as f64).powi(3) / seconds / 1e9
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_serializes_to_the_documented_line() {
        let report = BenchReport {
            dtype: Dtype::F32,
            size: 1024,
            threads: 2,
            gflops: 12.3456,
        };
        assert_eq!(
            serde_json::to_string(&report).unwrap(),
            r#"{"dtype":"f32","size":1024,"threads":2,"gflops":12.35}"#
        );
    }

    #[test]
    fn bench_measures_something() {
        let report = bench(Dtype::F64, 64, 1);
        assert_eq!(
            (report.dtype, report.size, report.threads),
            (Dtype::F64, 64, 1)
        );
        assert!(report.gflops > 0.0, "{report:?}");
        assert_eq!(bench(Dtype::F32, 0, 1).gflops, 0.0);
    }

    #[test]
    fn quick_measurement_is_quick_and_positive() {
        let pool = build_pool(1).unwrap();
        let started = Instant::now();
        assert!(pool.install(quick_gflops) > 0.0);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
