//! Untrusted workers: every tile is checked (Freivalds) before it is accepted, so a worker
//! that sends wrong results never gets one into an answer, is dropped after a few, and its
//! subject is refused for a while; honest workers finish the job.

use tabgrid_shared::claims::Role;
use tabgrid_tests::*;

use crate::compute::{Case, run_case};

#[tokio::test]
async fn a_cheater_beside_an_honest_worker_is_caught_and_every_answer_is_right() {
    // Small tiles: many results, so the cheater soon reaches the strike limit.
    let c = Coordinator::start(&["--tile-edge", "32"]).await;
    let cheater = Worker::start_with(
        &c.url,
        &token("mallory", Role::Volunteer),
        1,
        &["--chaos", "wrong=0.5"],
    );
    let _honest = c.worker("honest", 1);
    c.wait_workers_connected(2).await;
    let t = token("ada", Role::Submitter);
    let cases = [
        Case {
            f32: true,
            ..Case::new(200, 300, 150)
        },
        Case {
            alpha: -1.5,
            beta: 0.5,
            with_c: true,
            ..Case::new(97, 61, 131)
        },
        Case {
            f32: true,
            npy: true,
            with_c: true,
            beta: 2.0,
            ..Case::new(160, 45, 250)
        },
        Case::new(128, 400, 96),
    ];
    for (i, case) in cases.iter().enumerate() {
        run_case(&c, &t, case, 300 + i as u64).await;
    }
    cheater.wait_log("chaos: sending a wrong result", 3).await;
    c.wait_log("refused for", 1).await;
    let metrics = c.metrics().await;
    assert!(
        metric(
            &metrics,
            "tabgrid_results_refused_total{reason=\"verification\"}"
        ) >= 3.0,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "tabgrid_workers_banned_total") >= 1.0,
        "{metrics}"
    );
    // A corrupted result is told apart from a wrong one: none of these came garbled.
    assert_eq!(
        metric(
            &metrics,
            "tabgrid_results_refused_total{reason=\"checksum\"}"
        ),
        0.0
    );
}

#[tokio::test]
async fn only_a_cheater_never_finishes_a_job_and_an_honest_worker_does() {
    let c = Coordinator::start(&["--tile-edge", "32"]).await;
    let cheater = Worker::start_with(
        &c.url,
        &token("mallory", Role::Volunteer),
        1,
        &["--chaos", "wrong=1"],
    );
    c.wait_workers_connected(1).await;
    let t = token("ada", Role::Submitter);
    let (m, k, n) = (96, 50, 64);
    let a = random_matrix(m, k, 1);
    let b = random_matrix(k, n, 2);
    let body = serde_json::json!({
        "op": "gemm", "dtype": "f64",
        "a": {"shape": [m, k], "data": a}, "b": {"shape": [k, n], "data": b},
    });
    let (status, reply) = c.post_json("/jobs", &t, &body).await;
    assert_eq!(status, 201, "{reply}");
    let id = reply["id"].as_str().unwrap().to_owned();

    // Three wrong results: dropped with a policy close, which the worker takes as final.
    c.wait_log("refused for", 1).await;
    cheater.wait_log("refused", 1).await;
    // Its subject stays out for the cooldown, whatever process it comes back with.
    let _again = Worker::start(&c.url, &token("mallory", Role::Volunteer), 1);
    c.wait_log("refused a banned subject", 1).await;
    let job = c.get_json(&format!("/jobs/{id}"), &t).await;
    assert_ne!(job["state"], "done", "{job}");
    assert_eq!(job["tiles_done"], 0, "{job}");

    let _honest = c.worker("honest", 1);
    let last = c.wait_job(&id, &t).await;
    assert_eq!(last["state"], "done", "{last}");
    let got = c.result_values(&id, &t).await;
    assert_close(
        &got,
        &reference((m, k, n), 1.0, &a, &b, 0.0, None),
        k,
        false,
    );
}

#[tokio::test]
async fn honest_tabs_and_native_workers_are_never_refused() {
    use tabgrid_tests::browser::Browser;
    // Small tiles: hundreds of checks of two kernels' summation orders (simd128 in the
    // tab, AVX2+FMA natively), in f32, where rounding is largest.
    let c = Coordinator::start(&["--tile-edge", "24"]).await;
    let _native = c.worker("native", 1);
    let browser = Browser::launch(&[]).await;
    let page = browser.open(&format!("{}/?threads=1", c.url), false).await;
    page.joined().await;
    c.wait_workers_connected(2).await;
    let t = token("ada", Role::Submitter);
    for (i, case) in [
        Case {
            f32: true,
            npy: true,
            ..Case::new(480, 700, 480)
        },
        Case {
            f32: true,
            alpha: 3.0,
            beta: -2.0,
            with_c: true,
            ..Case::new(240, 2000, 240)
        },
    ]
    .iter()
    .enumerate()
    {
        run_case(&c, &t, case, 900 + i as u64).await;
    }
    let tab_tiles = page.eval("tabgrid.state.tiles").await.as_u64().unwrap();
    assert!(tab_tiles > 0, "the tab computed nothing");
    let metrics = c.metrics().await;
    let accepted = metric(&metrics, "tabgrid_tiles_accepted_total");
    assert!(accepted >= 500.0, "{metrics}");
    assert_eq!(
        metric(
            &metrics,
            "tabgrid_results_refused_total{reason=\"verification\"}"
        ),
        0.0,
        "{metrics}"
    );
    page.assert_no_errors().await;
}

#[tokio::test]
async fn late_dropped_and_garbled_results_cost_only_retries() {
    // Short leases, so that held-back results expire.
    let c = Coordinator::start(&["--tile-edge", "32", "--lease-floor-ms", "300"]).await;
    let _slow = Worker::start_with(
        &c.url,
        &token("slow", Role::Volunteer),
        1,
        &["--chaos", "slow=0.5"],
    );
    let _dropper = Worker::start_with(
        &c.url,
        &token("dropper", Role::Volunteer),
        1,
        &["--chaos", "drop=0.3"],
    );
    let garbler = Worker::start_with(
        &c.url,
        &token("garbler", Role::Volunteer),
        1,
        &["--chaos", "garbage=0.3"],
    );
    c.wait_workers_connected(3).await;
    let t = token("ada", Role::Submitter);
    for (i, case) in [
        Case::new(200, 64, 200),
        Case {
            f32: true,
            with_c: true,
            beta: 1.0,
            ..Case::new(150, 90, 170)
        },
    ]
    .iter()
    .enumerate()
    {
        run_case(&c, &t, case, 700 + i as u64).await;
    }
    garbler.wait_log("chaos: sending garbage", 1).await;
    let metrics = c.metrics().await;
    assert!(
        metric(&metrics, "tabgrid_protocol_violations_total") >= 1.0,
        "{metrics}"
    );
    let reassigned: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("tabgrid_tiles_reassigned_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(reassigned >= 1.0, "{metrics}");
    assert!(c.get("/healthz", "").await.status().is_success());
}

#[tokio::test]
async fn a_replicated_job_needs_agreeing_copies_and_outvotes_a_cheater() {
    let c = Coordinator::start(&["--tile-edge", "32"]).await;
    let t = token("ada", Role::Submitter);
    let (m, k, n) = (70, 50, 90);
    let a = random_matrix(m, k, 1);
    let b = random_matrix(k, n, 2);
    let spec = |replicas: serde_json::Value| {
        serde_json::json!({
            "op": "gemm", "dtype": "f64", "replicas": replicas,
            "a": {"shape": [m, k], "data": a}, "b": {"shape": [k, n], "data": b},
        })
    };
    let (status, reply) = c
        .post_json("/jobs", &t, &spec(serde_json::json!({"agree": 1, "of": 3})))
        .await;
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply["detail"]
            .as_str()
            .unwrap()
            .contains("agree must be 2 to 16"),
        "{reply}"
    );

    // The cheater is alone when the job arrives, so it gets copies first.
    let _cheater = Worker::start_with(
        &c.url,
        &token("mallory", Role::Volunteer),
        1,
        &["--chaos", "wrong=1"],
    );
    c.wait_workers_connected(1).await;
    let (status, reply) = c
        .post_json("/jobs", &t, &spec(serde_json::json!({"agree": 2, "of": 3})))
        .await;
    assert_eq!(status, 201, "{reply}");
    let id = reply["id"].as_str().unwrap().to_owned();
    let job = c.get_json(&format!("/jobs/{id}"), &t).await;
    assert_eq!(job["replicas"], serde_json::json!({"agree": 2, "of": 3}));
    let _honest1 = c.worker("honest-1", 1);
    let _honest2 = c.worker("honest-2", 1);
    let last = c.wait_job(&id, &t).await;
    assert_eq!(last["state"], "done", "{last}");
    let got = c.result_values(&id, &t).await;
    assert_close(
        &got,
        &reference((m, k, n), 1.0, &a, &b, 0.0, None),
        k,
        false,
    );
    // The cheater's copies disagreed with the honest ones and counted against it.
    let metrics = c.metrics().await;
    assert!(
        metric(
            &metrics,
            "tabgrid_results_refused_total{reason=\"replication\"}"
        ) >= 1.0,
        "{metrics}"
    );
    // No Freivalds check ran on a replicated job.
    assert_eq!(
        metric(
            &metrics,
            "tabgrid_results_refused_total{reason=\"verification\"}"
        ),
        0.0
    );
}
