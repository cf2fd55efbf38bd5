//! Running tiles on the worker's own rayon pool. The kernel runs for milliseconds to
//! seconds and uses every thread it is given, so it never runs on the async runtime: a task
//! is spawned on the pool and its result comes back through a oneshot channel, leaving the
//! runtime free for heartbeats and frames.

use rayon::ThreadPool;
use tabgrid_shared::worker::{Computed, Task, compute, instant_ms};
use tokio::sync::oneshot;

use crate::WorkerError;

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
    if task.work() < tabgrid_shared::kernels::MIN_PARALLEL_WORK {
        let _ = done.send(compute(&task, &instant_ms));
        return result;
    }
    pool.spawn(move || {
        // The receiver is gone when the connection dropped meanwhile; the coordinator has
        // already taken the lease back, so the result is simply not wanted.
        let _ = done.send(compute(&task, &instant_ms));
    });
    result
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tabgrid_shared::matrix::f64s;
    use tabgrid_shared::worker::{Panel, Values};

    use super::*;

    #[tokio::test]
    async fn spawned_tasks_report_back_through_the_channel() {
        // A = [[1, 2, 3], [4, 5, 6]], B = [[1, 0], [0, 1], [1, 1]]: 2·A·B = [[8, 10], [20, 22]]
        let panel = |rows, cols, v: Vec<f64>| {
            Arc::new(Panel {
                rows,
                cols,
                values: Values::F64(v),
            })
        };
        let task = Task {
            lease: 3,
            m: 2,
            n: 2,
            k: 3,
            alpha: 2.0,
            beta: 0.0,
            a: panel(2, 3, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            b: panel(3, 2, vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0]),
            c: None,
        };
        let pool = build_pool(1).unwrap();
        let done = spawn(&pool, task).await.unwrap();
        assert_eq!(done.lease, 3);
        assert_eq!(f64s(&done.outcome.unwrap()), [8.0, 10.0, 20.0, 22.0]);
    }
}
