//! Faults with real processes: a worker killed mid-job or stopped with Ctrl-C, a
//! coordinator restarted under its workers, a running job deleted.

use reqwest::multipart::{Form, Part};
use serde_json::json;
use tabgrid_shared::claims::Role;
use tabgrid_tests::*;

/// An f32 job submitted as `.npy`, with the operands its result is checked against.
struct F32Job {
    id: String,
    dims: (usize, usize, usize),
    a: Vec<f64>,
    b: Vec<f64>,
}

impl F32Job {
    /// Waits for the job to end: it must be done, and equal to the reference.
    async fn assert_done_and_correct(&self, c: &Coordinator, bearer: &str) {
        let last = c.wait_job(&self.id, bearer).await;
        assert_eq!(last["state"], "done");
        let (_, got) = c.result_npy(&self.id, bearer).await;
        let (m, k, n) = self.dims;
        let want = reference((m, k, n), 1.0, &self.a, &self.b, 0.0, None);
        assert_close(&got, &want, k, true);
    }
}

/// Submits an f32 job big enough to take a while on one thread.
async fn submit_big(c: &Coordinator, bearer: &str, m: usize, k: usize, n: usize) -> F32Job {
    let a = as_f32(&random_matrix(m, k, 7));
    let b = as_f32(&random_matrix(k, n, 8));
    let spec = json!({"op": "gemm", "dtype": "f32"});
    let form = Form::new()
        .part("spec", Part::text(spec.to_string()))
        .part("a", Part::bytes(npy_f32(m, k, &a)))
        .part("b", Part::bytes(npy_f32(k, n, &b)));
    let (status, reply) = c.post_form("/jobs", bearer, form).await;
    assert_eq!(status, 201);
    F32Job {
        id: reply["id"].as_str().unwrap().to_owned(),
        dims: (m, k, n),
        a,
        b,
    }
}

#[tokio::test]
async fn a_worker_killed_mid_job_costs_only_a_retry() {
    let c = Coordinator::start(&[]).await;
    let mut doomed = c.worker("doomed", 1);
    let _survivor = c.worker("survivor", 1);
    c.wait_workers_connected(2).await;
    let t = token("ada", Role::Submitter);
    let job = submit_big(&c, &t, 1280, 1024, 1280).await;

    // Kill one worker as soon as the job is under way (25 tiles in all).
    let event = c
        .follow(&job.id, &t, |e| e["tiles_done"].as_u64().unwrap_or(0) >= 1)
        .await;
    doomed.kill9();
    assert_ne!(event["state"], "done", "the kill must land mid-job");
    c.wait_log("worker disconnected", 1).await;

    job.assert_done_and_correct(&c, &t).await;

    let admin = token("root", Role::Admin);
    let workers = c.get_json("/workers", &admin).await;
    let workers = workers["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 1, "the killed worker is gone: {workers:?}");
    assert_eq!(workers[0]["subject"], "survivor");
    let metrics = c.metrics().await;
    assert!(
        metrics.contains("tabgrid_tiles_reassigned_total{reason=\"disconnected\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_worker_stopped_with_ctrl_c_gives_its_leases_back() {
    let c = Coordinator::start(&[]).await;
    let mut leaving = c.worker("leaving", 1);
    c.wait_workers_connected(1).await;
    let t = token("ada", Role::Submitter);
    let job = submit_big(&c, &t, 2048, 1024, 2048).await;
    let event = c
        .follow(&job.id, &t, |e| e["tiles_done"].as_u64().unwrap_or(0) >= 1)
        .await;
    assert_ne!(event["state"], "done");
    leaving.interrupt();
    let status = tokio::task::spawn_blocking(move || leaving.wait_exit())
        .await
        .unwrap();
    assert!(status.success(), "Ctrl-C is a clean exit: {status}");
    c.wait_log("worker disconnected", 1).await;

    // Its leases came back on the close, not after a deadline.
    let metrics = c.metrics().await;
    assert!(
        metrics.contains("tabgrid_tiles_reassigned_total{reason=\"disconnected\"}"),
        "{metrics}"
    );
    assert!(!metrics.contains("reason=\"expired\""), "{metrics}");
    let _next = c.worker("next", 1);
    job.assert_done_and_correct(&c, &t).await;
}

#[tokio::test]
async fn workers_reconnect_to_a_restarted_coordinator() {
    let c = Coordinator::start(&[]).await;
    let mut worker = c.worker("w", 1);
    c.wait_workers_connected(1).await;
    let c = c.restart().await;
    c.wait_workers_connected(1).await;
    assert!(worker.try_wait().is_none(), "the worker kept running");

    let t = token("ada", Role::Submitter);
    let job = submit_big(&c, &t, 300, 40, 300).await;
    job.assert_done_and_correct(&c, &t).await;
}

#[tokio::test]
async fn deleting_a_running_job_cancels_its_leases() {
    let c = Coordinator::start(&[]).await;
    let _worker = c.worker("w", 1);
    c.wait_workers_connected(1).await;
    let t = token("ada", Role::Submitter);
    let id = submit_big(&c, &t, 2048, 1024, 2048).await.id;
    c.follow(&id, &t, |e| e["state"] == "running").await;

    let path = format!("/jobs/{id}");
    assert_eq!(c.delete(&path, &t).await, 204);
    assert_eq!(c.get(&path, &t).await.status(), 404);
    let metrics = c.metrics().await;
    assert!(
        metrics.contains("tabgrid_jobs{state=\"running\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tabgrid_jobs_finished_total{state=\"cancelled\"} 1"),
        "{metrics}"
    );

    // The worker was told to drop the job's leases: the next job runs at once, not after
    // the cancelled job's remaining tiles.
    let next = submit_big(&c, &t, 64, 64, 64).await;
    next.assert_done_and_correct(&c, &t).await;
}
