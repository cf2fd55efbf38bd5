//! Computing one tile, `C = alpha·A·B + beta·C`, on the worker's own rayon pool.
//!
//! The kernel runs for milliseconds to seconds and uses every thread it is given, so it
//! never runs on the async runtime: a task is spawned on the pool and its result comes
//! back through a oneshot channel, leaving the runtime free for heartbeats and frames.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use rayon::ThreadPool;
use tabgrid_shared::kernels::{Element, MatMut, MatRef, par_gemm};
use tabgrid_shared::matrix::{f32_bytes, f64_bytes};
use tabgrid_shared::protocol::LeaseId;
use tokio::sync::oneshot;

use crate::WorkerError;
use crate::cache::{Panel, Values};

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

/// What came of a task.
#[derive(Debug, Clone, PartialEq)]
pub struct Computed {
    pub lease: LeaseId,
    /// The tile as little-endian bytes of the job's dtype, or why it could not be computed.
    pub outcome: Result<Vec<u8>, String>,
    /// Time inside the kernel only, for the coordinator's speed estimate.
    pub compute_micros: u64,
}

/// The compute pool, built once per worker: rebuilding it on every reconnect would spawn
/// and join all its threads for nothing.
pub fn build_pool(threads: usize) -> Result<ThreadPool, WorkerError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("tabgrid-compute-{i}"))
        .build()
        .map_err(|source| WorkerError::Pool { threads, source })
}

/// Starts a task on the pool; the receiver yields its result.
///
/// A tile too small for the kernel to thread is computed right here instead: handing it
/// to the pool and back costs two thread wake-ups, more than the arithmetic.
pub fn spawn(pool: &ThreadPool, task: Task) -> oneshot::Receiver<Computed> {
    let (done, result) = oneshot::channel();
    let work = task.m as f64 * task.n as f64 * task.k as f64;
    if work < tabgrid_shared::kernels::MIN_PARALLEL_WORK {
        let _ = done.send(compute(&task));
        return result;
    }
    pool.spawn(move || {
        // The receiver is gone when the connection dropped meanwhile; the coordinator has
        // already taken the lease back, so the result is simply not wanted.
        let _ = done.send(compute(&task));
    });
    result
}

/// Computes a task on the current thread's rayon pool. Never panics: a panic in the kernel
/// becomes a failed lease instead of aborting the worker (rayon aborts on panics in
/// `spawn`ed closures).
pub fn compute(task: &Task) -> Computed {
    let outcome = catch_unwind(AssertUnwindSafe(|| tile(task)))
        .unwrap_or_else(|_| Err("the GEMM kernel panicked".to_owned()));
    let (outcome, compute_micros) = match outcome {
        Ok((bytes, micros)) => (Ok(bytes), micros),
        Err(reason) => (Err(reason), 0),
    };
    Computed {
        lease: task.lease,
        outcome,
        compute_micros,
    }
}

fn tile(task: &Task) -> Result<(Vec<u8>, u64), String> {
    let Task { m, n, k, .. } = *task;
    let c = task.c.as_ref().map(|c| &c.values);
    match (&task.a.values, &task.b.values, c) {
        (Values::F32(a), Values::F32(b), None | Some(Values::F32(_))) => {
            let c = match c {
                Some(Values::F32(c)) => c.clone(),
                _ => vec![0.0; m * n],
            };
            let (alpha, beta) = (task.alpha as f32, task.beta as f32);
            let (c, micros) = gemm(alpha, a, b, beta, c, m, n, k)?;
            Ok((f32_bytes(&c), micros))
        }
        (Values::F64(a), Values::F64(b), None | Some(Values::F64(_))) => {
            let c = match c {
                Some(Values::F64(c)) => c.clone(),
                _ => vec![0.0; m * n],
            };
            let (c, micros) = gemm(task.alpha, a, b, task.beta, c, m, n, k)?;
            Ok((f64_bytes(&c), micros))
        }
        _ => Err("operands of different dtypes".to_owned()),
    }
}

/// `alpha·A·B + beta·C` into `c`, timing only the kernel.
#[allow(clippy::too_many_arguments)] // reason: the GEMM signature itself, spelled out once
fn gemm<T: Element>(
    alpha: T,
    a: &[T],
    b: &[T],
    beta: T,
    mut c: Vec<T>,
    m: usize,
    n: usize,
    k: usize,
) -> Result<(Vec<T>, u64), String> {
    let a = MatRef::row_major(a, m, k).map_err(|e| format!("A panel: {e}"))?;
    let b = MatRef::row_major(b, k, n).map_err(|e| format!("B panel: {e}"))?;
    let started = Instant::now();
    {
        let c = MatMut::row_major(&mut c, m, n).map_err(|e| format!("C tile: {e}"))?;
        par_gemm(alpha, a, b, beta, c).map_err(|e| format!("GEMM: {e}"))?;
    }
    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    Ok((c, micros))
}

#[cfg(test)]
mod tests {
    use tabgrid_shared::matrix::{f32s, f64s};

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
        let pool = build_pool(2).unwrap();
        let done = pool.install(|| compute(&task(Values::F64, true)));
        assert_eq!(done.lease, 3);
        assert_eq!(f64s(&done.outcome.unwrap()), [8.5, 10.5, 20.5, 22.5]);

        let done = pool.install(|| compute(&task(f32_values, false)));
        assert_eq!(f32s(&done.outcome.unwrap()), [8.0, 10.0, 20.0, 22.0]);
    }

    #[tokio::test]
    async fn spawned_tasks_report_back_through_the_channel() {
        let pool = build_pool(1).unwrap();
        let done = spawn(&pool, task(Values::F64, false)).await.unwrap();
        assert_eq!(f64s(&done.outcome.unwrap()), [8.0, 10.0, 20.0, 22.0]);
    }

    #[test]
    fn mixed_dtypes_fail_instead_of_panicking() {
        let mut mixed = task(Values::F64, true);
        mixed.b = panel(3, 2, f32_values(vec![0.0; 6]));
        let done = compute(&mixed);
        assert_eq!(done.outcome, Err("operands of different dtypes".to_owned()));
    }
}
