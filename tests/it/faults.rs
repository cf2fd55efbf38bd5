//! Faults with real processes: a worker killed mid-job, a coordinator restarted under its
//! workers, a running job deleted.

use serde_json::{Value, json};
use tabgrid_shared::claims::Role;
use tabgrid_tests::*;

/// Submits an f32 job big enough to take a while on one thread; returns (id, a, b).
async fn submit_big(
    c: &Coordinator,
    bearer: &str,
    m: usize,
    k: usize,
    n: usize,
) -> (String, Vec<f64>, Vec<f64>) {
    let a = as_f32(&random_matrix(m, k, 7));
    let b = as_f32(&random_matrix(k, n, 8));
    let form = reqwest::multipart::Form::new()
        .part(
            "spec",
            reqwest::multipart::Part::text(json!({"op": "gemm", "dtype": "f32"}).to_string()),
        )
        .part("a", reqwest::multipart::Part::bytes(npy_f32(m, k, &a)))
        .part("b", reqwest::multipart::Part::bytes(npy_f32(k, n, &b)));
    let response = c
        .http
        .post(c.api("/jobs"))
        .bearer_auth(bearer)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let reply: Value = response.json().await.unwrap();
    (reply["id"].as_str().unwrap().to_owned(), a, b)
}

async fn result_npy(c: &Coordinator, bearer: &str, id: &str) -> Vec<f64> {
    let response = c
        .http
        .get(c.api(&format!("/jobs/{id}/result")))
        .bearer_auth(bearer)
        .header("accept", "application/x-npy")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    read_npy(&response.bytes().await.unwrap()).1
}

#[tokio::test]
async fn a_worker_killed_mid_job_costs_only_a_retry() {
    let c = Coordinator::start(&[]).await;
    let mut doomed = c.worker("doomed", 1);
    let _survivor = c.worker("survivor", 1);
    c.wait_workers_connected(2).await;
    let t = token("ada", Role::Submitter);
    let (m, k, n) = (1280, 1024, 1280);
    let (id, a, b) = submit_big(&c, &t, m, k, n).await;

    // Kill one worker as soon as the job is under way (25 tiles in all).
    let event = c
        .follow(&id, &t, |e| e["tiles_done"].as_u64().unwrap_or(0) >= 1)
        .await;
    doomed.kill9();
    assert_ne!(event["state"], "done", "the kill must land mid-job");
    c.wait_log("worker disconnected", 1).await;

    let last = c.wait_job(&id, &t).await;
    assert_eq!(last["state"], "done");
    let got = result_npy(&c, &t, &id).await;
    assert_close(&got, &reference((m, k, n), 1.0, &a, &b, 0.0, None), k, true);

    let admin = token("root", Role::Admin);
    let workers: Value = c
        .http
        .get(c.api("/workers"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
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
async fn workers_reconnect_to_a_restarted_coordinator() {
    let c = Coordinator::start(&[]).await;
    let mut worker = c.worker("w", 1);
    c.wait_workers_connected(1).await;
    let c = c.restart().await;
    c.wait_workers_connected(1).await;
    assert!(worker.try_wait().is_none(), "the worker kept running");

    let t = token("ada", Role::Submitter);
    let (id, a, b) = submit_big(&c, &t, 300, 40, 300).await;
    let last = c.wait_job(&id, &t).await;
    assert_eq!(last["state"], "done");
    let got = result_npy(&c, &t, &id).await;
    assert_close(
        &got,
        &reference((300, 40, 300), 1.0, &a, &b, 0.0, None),
        40,
        true,
    );
}

#[tokio::test]
async fn deleting_a_running_job_cancels_its_leases() {
    let c = Coordinator::start(&[]).await;
    let _worker = c.worker("w", 1);
    c.wait_workers_connected(1).await;
    let t = token("ada", Role::Submitter);
    let (id, _, _) = submit_big(&c, &t, 2048, 1024, 2048).await;
    c.follow(&id, &t, |e| e["state"] == "running").await;

    let response = c
        .http
        .delete(c.api(&format!("/jobs/{id}")))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let response = c
        .http
        .get(c.api(&format!("/jobs/{id}")))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
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
    let (next, a, b) = submit_big(&c, &t, 64, 64, 64).await;
    let last = c.wait_job(&next, &t).await;
    assert_eq!(last["state"], "done");
    let got = result_npy(&c, &t, &next).await;
    assert_close(
        &got,
        &reference((64, 64, 64), 1.0, &a, &b, 0.0, None),
        64,
        true,
    );
}
