//! Browser volunteers in a real headless Chromium: the page joins the grid as a threaded
//! WebAssembly worker, computes jobs right beside native workers, leaves without costing a
//! deadline, and falls back to one thread where the page is not cross-origin isolated.

use serde_json::Value;
use tabgrid_shared::claims::Role;
use tabgrid_tests::browser::Browser;
use tabgrid_tests::*;

use crate::compute::{Case, run_case};

async fn workers(c: &Coordinator) -> Vec<Value> {
    let admin = token("root", Role::Admin);
    let list = c.get_json("/workers", &admin).await;
    list["workers"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn one_tab_computes_jobs_on_threads() {
    let c = Coordinator::start(&[]).await;
    let browser = Browser::launch(&[]).await;
    let page = browser.open(&format!("{}/?threads=2", c.url), false).await;
    page.joined().await;
    assert_eq!(page.eval("self.crossOriginIsolated").await, true);
    // Chromium has relaxed-simd: the page picks the bundle whose kernel uses its FMA.
    assert_eq!(page.eval("tabgrid.bundle.name").await, "threaded-relaxed");
    assert_eq!(
        page.eval("tabgrid.state.kernel").await,
        "wasm32-relaxed-simd"
    );

    let listed = workers(&c).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["kind"], "browser");
    assert_eq!(listed[0]["threads"], 2);

    let t = token("ada", Role::Submitter);
    let cases = [
        Case {
            f32: true,
            ..Case::new(37, 53, 29)
        },
        Case {
            alpha: -0.5,
            beta: 2.0,
            with_c: true,
            ..Case::new(301, 67, 259)
        },
        Case {
            f32: true,
            npy: true,
            alpha: 1.5,
            beta: -1.0,
            with_c: true,
            ..Case::new(513, 130, 270)
        },
        Case::new(1, 1, 1),
    ];
    for (i, case) in cases.iter().enumerate() {
        run_case(&c, &t, case, 100 + 10 * i as u64).await;
    }
    let tiles = page.eval("tabgrid.state.tiles").await.as_u64().unwrap();
    assert!(tiles >= cases.len() as u64, "the tab did {tiles} tiles");
    page.assert_no_errors().await;
}

#[tokio::test]
async fn a_tab_and_a_native_worker_share_one_job() {
    // Tiles of 256 (the policy would cut this job into 16 of 512, which the native worker
    // can take all of before the tab has its first panels).
    let c = Coordinator::start(&["--tile-edge", "256"]).await;
    let _native = c.worker("native", 1);
    let browser = Browser::launch(&[]).await;
    let page = browser.open(&format!("{}/?threads=1", c.url), false).await;
    page.joined().await;
    c.wait_workers_connected(2).await;

    // 64 tiles of 256x256 with k = 1024: enough work that the faster native worker
    // cannot take them all while the tab receives its first panels.
    let t = token("ada", Role::Submitter);
    run_case(
        &c,
        &t,
        &Case {
            f32: true,
            npy: true,
            ..Case::new(2048, 1024, 2048)
        },
        7,
    )
    .await;
    let listed = workers(&c).await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    for worker in &listed {
        assert!(
            worker["tiles_done"].as_u64().unwrap() > 0,
            "every worker did tiles: {listed:?}"
        );
    }
    let kinds: Vec<&str> = listed.iter().filter_map(|w| w["kind"].as_str()).collect();
    assert!(
        kinds.contains(&"browser") && kinds.contains(&"native"),
        "{kinds:?}"
    );
    page.assert_no_errors().await;
}

#[tokio::test]
async fn a_tab_closed_mid_job_gives_its_leases_back_at_once() {
    // Leases last ten minutes: only the closing socket can return them in time.
    let c = Coordinator::start(&["--lease-floor-ms", "600000"]).await;
    let browser = Browser::launch(&[]).await;
    // Both tabs rest 49x each tile's time, so the job is still running when one closes.
    let leaving = browser
        .open(&format!("{}/?threads=1&duty=2", c.url), false)
        .await;
    let staying = browser
        .open(&format!("{}/?threads=1&duty=2", c.url), false)
        .await;
    let leaving_id = leaving.joined().await;
    staying.joined().await;

    let t = token("ada", Role::Submitter);
    let (m, k, n) = (2048, 200, 2048);
    let a = random_matrix(m, k, 1);
    let b = random_matrix(k, n, 2);
    let body = serde_json::json!({
        "op": "gemm", "dtype": "f64",
        "a": {"shape": [m, k], "data": a}, "b": {"shape": [k, n], "data": b},
    });
    let (status, reply) = c.post_json("/jobs", &t, &body).await;
    assert_eq!(status, 201, "{reply}");
    let id = reply["id"].as_str().unwrap().to_owned();

    leaving
        .wait_for("tabgrid.state.tiles >= 1", "the first tab's first tile")
        .await;
    leaving.assert_no_errors().await;
    leaving.close().await;
    c.wait_log("worker disconnected", 1).await;
    let listed = workers(&c).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_ne!(listed[0]["id"], leaving_id, "{listed:?}");
    let metrics = c.metrics().await;
    assert!(
        metrics.contains("tabgrid_tiles_reassigned_total{reason=\"disconnected\"}"),
        "{metrics}"
    );

    // The volunteer who stayed gives it full power; the job finishes right.
    staying
        .eval("document.querySelector('input[name=duty][value=\"100\"]').click()")
        .await;
    staying
        .wait_for(
            "tabgrid.state.duty === 100",
            "the duty cycle to reach the worker",
        )
        .await;
    let last = c.wait_job(&id, &t).await;
    assert_eq!(last["state"], "done", "{last}");
    let got = c.result_values(&id, &t).await;
    assert_close(
        &got,
        &reference((m, k, n), 1.0, &a, &b, 0.0, None),
        k,
        false,
    );
    assert!(!c.metrics().await.contains("reason=\"expired\""));
    staying.assert_no_errors().await;
}

#[tokio::test]
async fn pause_returns_leases_and_resume_rejoins() {
    let c = Coordinator::start(&[]).await;
    let browser = Browser::launch(&[]).await;
    let page = browser.open(&format!("{}/?threads=1", c.url), false).await;
    page.joined().await;
    page.eval("document.getElementById('pause').click()").await;
    page.wait_for("tabgrid.state.phase === 'paused'", "the tab to pause")
        .await;
    c.wait_log("worker disconnected", 1).await;
    assert!(workers(&c).await.is_empty());
    assert_eq!(
        page.eval("document.getElementById('headline').textContent")
            .await,
        "Paused"
    );
    page.eval("document.getElementById('pause').click()").await;
    page.joined().await;
    let t = token("ada", Role::Submitter);
    run_case(&c, &t, &Case::new(40, 30, 20), 3).await;
    page.assert_no_errors().await;
}

#[tokio::test]
async fn a_page_without_isolation_computes_on_one_thread() {
    let c = Coordinator::start(&["--isolation", "off"]).await;
    let browser = Browser::launch(&[]).await;
    let page = browser.open(&format!("{}/?threads=2", c.url), false).await;
    page.joined().await;
    assert_eq!(page.eval("self.crossOriginIsolated").await, false);
    assert_eq!(page.eval("tabgrid.bundle.name").await, "single");
    let notice = page
        .eval("document.getElementById('notice').textContent")
        .await;
    assert!(
        notice.as_str().unwrap().contains("one thread only"),
        "{notice}"
    );
    let listed = workers(&c).await;
    assert_eq!(listed[0]["threads"], 1, "{listed:?}");
    let t = token("ada", Role::Submitter);
    for (i, case) in [
        Case {
            f32: true,
            alpha: 2.0,
            beta: 0.5,
            with_c: true,
            ..Case::new(300, 41, 290)
        },
        Case::new(17, 300, 3),
    ]
    .iter()
    .enumerate()
    {
        run_case(&c, &t, case, 50 + i as u64).await;
    }
    page.assert_no_errors().await;
}

#[tokio::test]
async fn the_page_works_over_https_with_a_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let c = Coordinator::start(&[
        "--tls-cert",
        cert_path.to_str().unwrap(),
        "--tls-key",
        key_path.to_str().unwrap(),
    ])
    .await;
    assert!(c.url.starts_with("https://"), "{}", c.url);

    let browser = Browser::launch(&["--ignore-certificate-errors"]).await;
    // `simd=128`: the plain simd128 bundle, which browsers without relaxed-simd get.
    let page = browser
        .open(&format!("{}/?threads=2&simd=128", c.url), false)
        .await;
    page.joined().await;
    assert_eq!(page.eval("location.protocol").await, "https:");
    assert_eq!(page.eval("self.crossOriginIsolated").await, true);
    assert_eq!(page.eval("tabgrid.bundle.name").await, "threaded");
    assert_eq!(page.eval("tabgrid.state.kernel").await, "wasm32-simd128");

    // The test's own HTTP client speaks no TLS: the job goes through the page's fetch.
    let (m, k, n) = (129, 77, 65);
    let a = as_f32(&random_matrix(m, k, 11));
    let b = as_f32(&random_matrix(k, n, 12));
    let bearer = token("ada", Role::Submitter);
    let job = serde_json::json!({
        "op": "gemm", "dtype": "f32",
        "a": {"shape": [m, k], "data": a}, "b": {"shape": [k, n], "data": b},
    });
    let script = format!(
        r#"(async () => {{
            const auth = {{ authorization: 'Bearer {bearer}' }};
            const submitted = await fetch('/api/v1/jobs', {{
                method: 'POST',
                headers: {{ ...auth, 'content-type': 'application/json' }},
                body: JSON.stringify({job}),
            }}).then((r) => r.json());
            const job = `/api/v1/jobs/${{submitted.id}}`;
            for (;;) {{
                const status = await fetch(job, {{ headers: auth }}).then((r) => r.json());
                if (status.state !== 'queued' && status.state !== 'running') break;
                await new Promise((resolve) => setTimeout(resolve, 20));
            }}
            const result = await fetch(`${{job}}/result`, {{ headers: auth }});
            return result.ok ? JSON.stringify(await result.json()) : `HTTP ${{result.status}}`;
        }})()"#
    );
    let reply = page.eval(&script).await;
    let body: Value = serde_json::from_str(reply.as_str().unwrap()).expect("result JSON");
    assert_eq!(body["shape"], serde_json::json!([m, n]));
    assert_close(
        &values(&body["data"]),
        &reference((m, k, n), 1.0, &a, &b, 0.0, None),
        k,
        true,
    );
    page.assert_no_errors().await;
}

#[tokio::test]
async fn token_mode_needs_the_operators_link() {
    let c = Coordinator::start(&["--volunteers", "token"]).await;
    let browser = Browser::launch(&[]).await;
    let anonymous = browser.open(&c.url, false).await;
    let headline = anonymous
        .wait_for(
            "tabgrid.errors.length > 0 && document.getElementById('headline').textContent",
            "the page to explain it needs a token",
        )
        .await;
    assert_eq!(headline, "Cannot join the grid");
    let detail = anonymous
        .eval("document.getElementById('detail').textContent")
        .await;
    assert!(detail.as_str().unwrap().contains("#token="), "{detail}");

    let volunteer = token("lab-tab", Role::Volunteer);
    let invited = browser
        .open(&format!("{}/?threads=1#token={volunteer}", c.url), false)
        .await;
    invited.joined().await;
    assert_eq!(workers(&c).await[0]["subject"], "lab-tab");
    invited.assert_no_errors().await;
}

#[tokio::test]
async fn a_hidden_tab_keeps_computing() {
    let c = Coordinator::start(&[]).await;
    let browser = Browser::launch(&[]).await;
    let page = browser.open(&format!("{}/?threads=2", c.url), true).await;
    // A tab in front of it is what hides a background tab.
    let _cover = browser.open("about:blank", false).await;
    page.joined().await;
    assert_eq!(page.eval("document.visibilityState").await, "hidden");
    let t = token("ada", Role::Submitter);
    run_case(
        &c,
        &t,
        &Case {
            f32: true,
            npy: true,
            ..Case::new(700, 300, 600)
        },
        21,
    )
    .await;
    assert_eq!(page.eval("document.visibilityState").await, "hidden");
    page.assert_no_errors().await;
}

#[tokio::test]
async fn a_tab_rejoins_a_restarted_coordinator_by_itself() {
    let c = Coordinator::start(&[]).await;
    let browser = Browser::launch(&[]).await;
    let page = browser.open(&format!("{}/?threads=1", c.url), false).await;
    page.joined().await;
    // SIGKILL, then a new process on the same address: only the tab's own retry can
    // bring it back.
    let c = c.restart().await;
    c.wait_workers_connected(1).await;
    page.joined().await;
    assert_eq!(workers(&c).await.len(), 1);
    let t = token("ada", Role::Submitter);
    run_case(&c, &t, &Case::new(64, 64, 64), 5).await;
    // A retry that came while no coordinator listened is logged by Chromium itself.
    page.assert_no_errors_but(&["WebSocket connection to"])
        .await;
}

#[tokio::test]
async fn a_page_without_bundles_says_what_to_build() {
    let www = tempfile::tempdir().unwrap();
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../www");
    for file in ["index.html", "app.js", "volunteer.js", "style.css"] {
        std::fs::copy(source.join(file), www.path().join(file)).unwrap();
    }
    let c = Coordinator::start(&["--www", www.path().to_str().unwrap()]).await;
    c.wait_log("no WebAssembly bundles", 1).await;
    let browser = Browser::launch(&[]).await;
    let page = browser.open(&c.url, false).await;
    let detail = page
        .wait_for(
            "tabgrid.errors.length > 0 && document.getElementById('detail').textContent",
            "the page to explain the missing bundle",
        )
        .await;
    assert!(
        detail.as_str().unwrap().contains("cargo xtask wasm"),
        "{detail}"
    );
    assert_eq!(
        page.eval("document.getElementById('headline').textContent")
            .await,
        "Cannot join the grid"
    );
}

#[tokio::test]
async fn choosing_another_thread_count_restarts_the_tab_cleanly() {
    let c = Coordinator::start(&[]).await;
    let browser = Browser::launch(&[]).await;
    let page = browser.open(&format!("{}/?threads=2", c.url), false).await;
    page.joined().await;
    page.eval(
        "const select = document.getElementById('threads'); select.value = '1'; \
         select.dispatchEvent(new Event('change'))",
    )
    .await;
    // The old pool's socket closes before the new one opens.
    c.wait_log("worker disconnected", 1).await;
    c.wait_workers_connected(2).await;
    page.wait_for(
        "tabgrid.state?.threads === 1 && tabgrid.state.phase === 'connected'",
        "the new pool",
    )
    .await;
    let listed = workers(&c).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["threads"], 1);
    assert!(
        page.eval("location.search")
            .await
            .as_str()
            .unwrap()
            .contains("threads=1")
    );
    let t = token("ada", Role::Submitter);
    run_case(&c, &t, &Case::new(33, 44, 55), 77).await;
    page.assert_no_errors().await;
}
