//! Browser volunteers in a real headless Chromium: the page joins the grid as a threaded
//! WebAssembly worker, computes jobs right beside native workers, leaves without costing a
//! deadline, and falls back to one thread where the page is not cross-origin isolated.

use serde_json::Value;
use tabgrid_shared::claims::Role;
use tabgrid_tests::browser::{Browser, Page};
use tabgrid_tests::*;

use crate::compute::{Case, run_case};

/// Waits until the tab says it is connected and returns its worker id.
async fn joined(page: &Page<'_>) -> u64 {
    let id = page
        .wait_for(
            "tabgrid.state?.phase === 'connected' && tabgrid.state.workerId",
            "the tab to join the grid",
        )
        .await;
    id.as_u64().expect("worker id")
}

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
    joined(&page).await;
    assert_eq!(page.eval("self.crossOriginIsolated").await, true);
    assert_eq!(page.eval("tabgrid.bundle.name").await, "threaded");

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
