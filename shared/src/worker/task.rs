//! Computing one tile, `C = alpha·A·B + beta·C`, from operands already in the cache: the
//! part of the worker that the native worker and the browser client share. Where it runs
//! (a rayon pool beside an async runtime, or a web worker) is theirs to decide.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use crate::Dtype;
use crate::kernels::{Element, MatMut, MatRef};
use crate::matrix::{f32_bytes, f64_bytes};
use crate::protocol::LeaseId;
use crate::worker::cache::{Panel, Values};

/// One accepted assignment with its operands resolved from the cache. Shapes were checked
/// against the panels when it was accepted: A is `m x k`, B is `k x n`, C is `m x n`.
#[derive(Debug, Clone)]
pub struct Task {
    pub lease: LeaseId,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f64,
    /// Already 0 when there is no C: the tile is then `alpha·A·B`.
    pub beta: f64,
    pub a: Arc<Panel>,
    pub b: Arc<Panel>,
    pub c: Option<Arc<Panel>>,
}

impl Task {
    /// Multiply-adds in this tile, `m·n·k`.
    pub fn work(&self) -> f64 {
        self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// What came of a task.
#[derive(Debug, Clone, PartialEq)]
pub struct Computed {
    pub lease: LeaseId,
    /// The job's element type, which the payload holds.
    pub dtype: Dtype,
    /// The tile as little-endian bytes of the job's dtype, or why it could not be computed.
    pub outcome: Result<Vec<u8>, String>,
    /// Time inside the kernel only, for the coordinator's speed estimate.
    pub compute_micros: u64,
}

/// Computes a task with every thread of the current rayon pool (feature `rayon`) or on
/// this thread. `now_ms` is a monotonic clock in milliseconds (`Instant` natively,
/// `performance.now()` in a browser, where `Instant` does not exist) that times the kernel
/// alone. Never panics where panics unwind: a panic in the kernel becomes a failed lease
/// instead of aborting the worker.
pub fn compute(task: &Task, now_ms: &dyn Fn() -> f64) -> Computed {
    let outcome = catch_unwind(AssertUnwindSafe(|| tile(task, now_ms)))
        .unwrap_or_else(|_| Err("the GEMM kernel panicked".to_owned()));
    let (outcome, compute_micros) = match outcome {
        Ok((bytes, micros)) => (Ok(bytes), micros),
        Err(reason) => (Err(reason), 0),
    };
    Computed {
        lease: task.lease,
        dtype: task.a.dtype(),
        outcome,
        compute_micros,
    }
}

fn tile(task: &Task, now_ms: &dyn Fn() -> f64) -> Result<(Vec<u8>, u64), String> {
    let Task { m, n, k, .. } = *task;
    let c = task.c.as_ref().map(|c| &c.values);
    match (&task.a.values, &task.b.values, c) {
        (Values::F32(a), Values::F32(b), None | Some(Values::F32(_))) => {
            let c = match c {
                Some(Values::F32(c)) => c.clone(),
                _ => vec![0.0; m * n],
            };
            let (alpha, beta) = (task.alpha as f32, task.beta as f32);
            let (c, micros) = gemm(alpha, a, b, beta, c, (m, n, k), now_ms)?;
            Ok((f32_bytes(&c), micros))
        }
        (Values::F64(a), Values::F64(b), None | Some(Values::F64(_))) => {
            let c = match c {
                Some(Values::F64(c)) => c.clone(),
                _ => vec![0.0; m * n],
            };
            let (c, micros) = gemm(task.alpha, a, b, task.beta, c, (m, n, k), now_ms)?;
            Ok((f64_bytes(&c), micros))
        }
        _ => Err("operands of different dtypes".to_owned()),
    }
}

/// `alpha·A·B + beta·C` into `c`, timing only the kernel.
fn gemm<T: Element>(
    alpha: T,
    a: &[T],
    b: &[T],
    beta: T,
    mut c: Vec<T>,
    (m, n, k): (usize, usize, usize),
    now_ms: &dyn Fn() -> f64,
) -> Result<(Vec<T>, u64), String> {
    let a = MatRef::row_major(a, m, k).map_err(|e| format!("A panel: {e}"))?;
    let b = MatRef::row_major(b, k, n).map_err(|e| format!("B panel: {e}"))?;
    let started = now_ms();
    {
        let c = MatMut::row_major(&mut c, m, n).map_err(|e| format!("C tile: {e}"))?;
        kernel(alpha, a, b, beta, c).map_err(|e| format!("GEMM: {e}"))?;
    }
    // Saturating float-to-int cast: a clock that went backwards reads as 0.
    let micros = ((now_ms() - started) * 1000.0) as u64;
    Ok((c, micros))
}

#[cfg(feature = "rayon")]
use crate::kernels::par_gemm as kernel;

#[cfg(not(feature = "rayon"))]
use crate::kernels::gemm as kernel;

/// A monotonic clock in milliseconds for [`compute`] where `std::time::Instant` exists.
#[cfg(not(all(target_family = "wasm", target_os = "unknown")))]
pub fn instant_ms() -> f64 {
    use std::sync::OnceLock;
    use std::time::Instant;
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use crate::matrix::{f32s, f64s};

    use super::*;

    fn panel(rows: usize, cols: usize, values: Values) -> Arc<Panel> {
        Arc::new(Panel { rows, cols, values })
    }

    fn task(values: fn(Vec<f64>) -> Values, with_c: bool) -> Task {
        // A = [[1, 2, 3], [4, 5, 6]], B = [[1, 0], [0, 1], [1, 1]], C = [[1, 1], [1, 1]]
        Task {
            lease: 3,
            m: 2,
            n: 2,
            k: 3,
            alpha: 2.0,
            beta: if with_c { 0.5 } else { 0.0 },
            a: panel(2, 3, values(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])),
            b: panel(3, 2, values(vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0])),
            c: with_c.then(|| panel(2, 2, values(vec![1.0; 4]))),
        }
    }

    fn f32_values(v: Vec<f64>) -> Values {
        Values::F32(v.into_iter().map(|x| x as f32).collect())
    }

    #[test]
    fn computes_alpha_ab_plus_beta_c_in_both_dtypes() {
        // A·B = [[4, 5], [10, 11]]
        let done = compute(&task(Values::F64, true), &instant_ms);
        assert_eq!(done.lease, 3);
        assert_eq!(f64s(&done.outcome.unwrap()), [8.5, 10.5, 20.5, 22.5]);

        let done = compute(&task(f32_values, false), &instant_ms);
        assert_eq!(f32s(&done.outcome.unwrap()), [8.0, 10.0, 20.0, 22.0]);
    }

    #[test]
    fn mixed_dtypes_fail_instead_of_panicking() {
        let mut mixed = task(Values::F64, true);
        mixed.b = panel(3, 2, f32_values(vec![0.0; 6]));
        let done = compute(&mixed, &instant_ms);
        assert_eq!(done.outcome, Err("operands of different dtypes".to_owned()));
    }
}
