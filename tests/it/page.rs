//! What the coordinator serves to browsers, checked with a plain HTTP client: the page and
//! bundles with the headers a threaded tab needs, and volunteer tokens for anonymous tabs.

use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use serde_json::Value;
use tabgrid_tests::*;

async fn get(c: &Coordinator, path: &str) -> reqwest::Response {
    reqwest::get(format!("{}{path}", c.url)).await.unwrap()
}

#[tokio::test]
async fn page_scripts_and_bundles_are_isolated_typed_and_cached_by_content() {
    let c = Coordinator::start(&[]).await;
    let manifest: Value = get(&c, "/pkg/manifest.json").await.json().await.unwrap();
    let threaded = manifest["bundles"]["threaded"]["script"].as_str().unwrap();
    let wasm = threaded.replace(".js", "_bg.wasm");
    for (path, content_type) in [
        ("/", "text/html; charset=utf-8"),
        ("/app.js", "text/javascript; charset=utf-8"),
        ("/volunteer.js", "text/javascript; charset=utf-8"),
        (&format!("/{threaded}"), "text/javascript; charset=utf-8"),
        (&format!("/{wasm}"), "application/wasm"),
    ] {
        let response = get(&c, path).await;
        assert_eq!(response.status(), 200, "{path}");
        let headers = response.headers();
        assert_eq!(headers[CONTENT_TYPE], content_type, "{path}");
        assert_eq!(
            headers["cross-origin-opener-policy"], "same-origin",
            "{path}"
        );
        assert_eq!(
            headers["cross-origin-embedder-policy"], "require-corp",
            "{path}"
        );
        assert_eq!(headers["cache-control"], "no-cache", "{path}");

        // Revalidation by content hash: unchanged bytes cost a 304.
        let etag = headers[ETAG].clone();
        let again = reqwest::Client::new()
            .get(format!("{}{path}", c.url))
            .header(IF_NONE_MATCH, etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{path}");
    }
    let wasm_bytes = get(&c, &format!("/{wasm}")).await.bytes().await.unwrap();
    assert_eq!(&wasm_bytes[..4], b"\0asm");
    // Unknown paths are the API's JSON 404, not a page.
    let missing = get(&c, "/nope.js").await;
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.headers()[CONTENT_TYPE], "application/json");
}

#[tokio::test]
async fn a_coordinator_without_its_page_says_so() {
    let empty = tempfile::tempdir().unwrap();
    let c = Coordinator::start(&["--www", empty.path().to_str().unwrap()]).await;
    let page = get(&c, "/").await;
    assert_eq!(page.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(page.text().await.unwrap().contains("cargo xtask"));
    c.wait_log("no volunteer page there", 1).await;
}

#[tokio::test]
async fn open_mode_hands_out_volunteer_tokens_rate_limited_per_address() {
    let c = Coordinator::start(&[]).await;
    let client = reqwest::Client::new();
    let url = c.api("/volunteers");
    let mut tokens = Vec::new();
    for _ in 0..10 {
        let response = client.post(&url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["expires_in"], 3600);
        tokens.push(body["token"].as_str().unwrap().to_owned());
    }
    let refused = client.post(&url).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = refused.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("try again"),
        "{body}"
    );

    // A volunteer token lends compute and nothing else.
    let (status, _) = c
        .post_json("/jobs", &tokens[0], &serde_json::json!({}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        c.get("/jobs", &tokens[0]).await.status(),
        StatusCode::FORBIDDEN
    );
    let mut worker = Worker::start(&c.url, &tokens[1], 1);
    worker.wait_log("connected", 1).await;
    c.wait_workers_connected(1).await;
    worker.interrupt();
}

#[tokio::test]
async fn token_mode_refuses_anonymous_tabs() {
    let c = Coordinator::start(&["--volunteers", "token"]).await;
    let response = reqwest::Client::new()
        .post(c.api("/volunteers"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("#token="),
        "{body}"
    );
}
