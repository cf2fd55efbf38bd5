//! `cargo xtask bench browser`: the browser volunteer measured in a real headless Chromium
//! against the same kernel natively, in one run — kernel GFLOP/s per thread (1 and 2
//! threads) with the simd128 bundle and the relaxed-simd one, time from opening the page
//! to its first finished tile, a hidden tab's throughput against a visible one's, and the
//! bundles' sizes.
//!
//! Every figure is a median over repeated, interleaved runs; ratios are taken within a
//! run so that the machine's drift cancels.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde_json::json;
use tabgrid_shared::claims::Role;
use tabgrid_shared::kernels::{Element, MatMut, MatRef, par_gemm, par_gemm_avx2};
use tabgrid_tests::browser::Browser;
use tabgrid_tests::*;

const ROUNDS: usize = 3;
const REPS: u32 = 5;

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The native side: the same `par_gemm` on a pool of `threads`, median of `REPS`; with
/// `avx2`, forced onto the 256-bit AVX2+FMA path (the widest most x86 volunteers have).
fn native_gflops<T: Element>(pool: &rayon::ThreadPool, n: usize, avx2: bool) -> f64 {
    let a: Vec<T> = (0..n * n)
        .map(|i| T::from_f64((i % 7) as f64 * 0.25))
        .collect();
    let b: Vec<T> = (0..n * n)
        .map(|i| T::from_f64((i % 5) as f64 * 0.5))
        .collect();
    let mut c = vec![T::from_f64(0.0); n * n];
    let mut times = Vec::new();
    for _ in 0..=REPS {
        let started = Instant::now();
        pool.install(|| {
            let a = MatRef::row_major(&a, n, n).unwrap();
            let b = MatRef::row_major(&b, n, n).unwrap();
            let c = MatMut::row_major(&mut c, n, n).unwrap();
            if avx2 {
                par_gemm_avx2(T::from_f64(1.0), a, b, T::from_f64(0.0), c).unwrap();
            } else {
                par_gemm(T::from_f64(1.0), a, b, T::from_f64(0.0), c).unwrap();
            }
        });
        times.push(started.elapsed().as_secs_f64());
    }
    times.remove(0);
    2.0 * (n * n * n) as f64 / median(&mut times) / 1e9
}

/// The page with a volunteer token in its URL: this run opens more tabs from one address
/// than open mode's per-address allowance.
fn page_url(c: &Coordinator, threads: usize) -> String {
    let volunteer = token("bench-tab", Role::Volunteer);
    format!("{}/?threads={threads}#token={volunteer}", c.url)
}

/// [`page_url`] with the plain simd128 bundle instead of relaxed-simd.
fn simd128_url(c: &Coordinator, threads: usize) -> String {
    page_url(c, threads).replacen("#token", "&simd=128#token", 1)
}

async fn kernels(c: &Coordinator, browser: &Browser) {
    println!(
        "\n## Kernel in a tab vs natively (median GFLOP/s of {REPS} products, {ROUNDS} rounds)\n"
    );
    println!(
        "| kernel | dtype | n | threads | tab | native | tab / native | native AVX2 | tab / AVX2 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (url, threads) in [
        (simd128_url(c, 1), 1usize),
        (simd128_url(c, 2), 2),
        (page_url(c, 1), 1),
        (page_url(c, 2), 2),
    ] {
        let page = browser.open(&url, false).await;
        page.joined().await;
        let kernel = page.eval("tabgrid.state.kernel").await;
        let kernel = kernel.as_str().unwrap_or("?").to_owned();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        for dtype in ["f32", "f64"] {
            for n in [512usize, 1024] {
                let (mut tab, mut native, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
                let (mut avx2, mut ratio2) = (Vec::new(), Vec::new());
                for _ in 0..ROUNDS {
                    let t = page
                        .eval(&format!("tabgrid.bench('{dtype}', {n}, {REPS})"))
                        .await
                        .as_f64()
                        .unwrap();
                    let native_at = |forced| {
                        if dtype == "f32" {
                            native_gflops::<f32>(&pool, n, forced)
                        } else {
                            native_gflops::<f64>(&pool, n, forced)
                        }
                    };
                    let (nat, nat2) = (native_at(false), native_at(true));
                    tab.push(t);
                    native.push(nat);
                    ratio.push(t / nat);
                    avx2.push(nat2);
                    ratio2.push(t / nat2);
                }
                println!(
                    "| {kernel} | {dtype} | {n} | {threads} | {:.1} | {:.1} | **{:.2}** | {:.1} | **{:.2}** |",
                    median(&mut tab),
                    median(&mut native),
                    median(&mut ratio),
                    median(&mut avx2),
                    median(&mut ratio2)
                );
            }
        }
        page.close().await;
    }
}

/// A job of `m x k x n` f32, submitted as `.npy`; returns its id.
async fn submit(c: &Coordinator, bearer: &str, (m, k, n): (usize, usize, usize)) -> String {
    let a = npy_f32(m, k, &random_matrix(m, k, 1));
    let b = npy_f32(k, n, &random_matrix(k, n, 2));
    let spec = json!({"op": "gemm", "dtype": "f32"});
    let form = reqwest::multipart::Form::new()
        .part("spec", reqwest::multipart::Part::text(spec.to_string()))
        .part("a", reqwest::multipart::Part::bytes(a).file_name("a.npy"))
        .part("b", reqwest::multipart::Part::bytes(b).file_name("b.npy"));
    let (status, reply) = c.post_form("/jobs", bearer, form).await;
    assert_eq!(status, 201, "{reply}");
    reply["id"].as_str().unwrap().to_owned()
}

async fn first_tile(c: &Coordinator, browser: &Browser, bearer: &str) {
    let mut times = Vec::new();
    for _ in 0..5 {
        let id = submit(c, bearer, (512, 512, 512)).await;
        let page = browser.open(&page_url(c, 2), false).await;
        let ms = page
            .wait_for("tabgrid.firstTileMs", "the first tile")
            .await
            .as_f64()
            .unwrap();
        times.push(ms);
        c.wait_job(&id, bearer).await;
        if times.len() == 5 {
            screenshot(&page).await;
        }
        page.close().await;
    }
    println!(
        "\n## From opening the page to its first tile done\n\nmedian of 5 fresh tabs (2 threads, a job waiting): **{:.0} ms** (runs: {:?})",
        median(&mut times),
        times.iter().map(|t| t.round()).collect::<Vec<_>>()
    );
}

/// What a volunteer sees after a job: `target/volunteer-page.png`.
async fn screenshot(page: &tabgrid_tests::browser::Page<'_>) {
    use base64::Engine;
    let shot = page
        .send("Page.captureScreenshot", json!({"format": "png"}))
        .await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().expect("a screenshot"))
        .expect("base64 from the DevTools protocol");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/volunteer-page.png");
    std::fs::write(&path, png).unwrap();
    println!("\nscreenshot of the last tab: {}", path.display());
}

async fn hidden_vs_visible(c: &Coordinator, browser: &Browser, bearer: &str) {
    let shape = (2048, 1024, 2048);
    let flops = 2.0 * (shape.0 * shape.1 * shape.2) as f64;
    let (mut visible, mut hidden, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let mut pair = [0.0; 2];
        for (slot, background) in [(0, false), (1, true)] {
            let page = browser.open(&page_url(c, 2), background).await;
            page.joined().await;
            // A tab in front of it is what hides a background tab.
            let cover = match background {
                true => Some(browser.open("about:blank", false).await),
                false => None,
            };
            let state = page.eval("document.visibilityState").await;
            assert_eq!(state, if background { "hidden" } else { "visible" });
            let started = Instant::now();
            let id = submit(c, bearer, shape).await;
            let done = c.wait_job(&id, bearer).await;
            assert_eq!(done["state"], "done");
            pair[slot] = flops / started.elapsed().as_secs_f64() / 1e9;
            assert_eq!(page.eval("document.visibilityState").await, state);
            page.close().await;
            if let Some(cover) = cover {
                cover.close().await;
            }
        }
        visible.push(pair[0]);
        hidden.push(pair[1]);
        ratio.push(pair[1] / pair[0]);
    }
    println!(
        "\n## Hidden vs visible tab\n\nf32 2048x1024x2048 job (tiles by the policy), one tab with 2 threads, submission to done, {ROUNDS} rounds:\n\n| | GFLOP/s (median) |\n|---|---|\n| visible | {:.1} |\n| hidden | {:.1} |\n| **hidden / visible** | **{:.2}** |",
        median(&mut visible),
        median(&mut hidden),
        median(&mut ratio)
    );
}

fn bundle_sizes() {
    let pkg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../www/pkg");
    println!("\n## Bundle sizes\n\n| bundle | file | bytes | gzip -9 |\n|---|---|---|---|");
    for bundle in ["threaded", "threaded-relaxed", "single"] {
        for file in ["tabgrid_client_wasm_bg.wasm", "tabgrid_client_wasm.js"] {
            let path = pkg.join(bundle).join(file);
            let raw = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let gzipped = Command::new("gzip")
                .args(["-9", "-c"])
                .arg(&path)
                .output()
                .map(|o| o.stdout.len())
                .unwrap_or(0);
            println!("| {bundle} | {file} | {raw} | {gzipped} |");
        }
    }
}

#[tokio::main]
async fn main() {
    let c = Coordinator::start(&[]).await;
    let browser = Browser::launch(&[]).await;
    let bearer = token("bench", Role::Submitter);
    println!("# cargo xtask bench browser");
    kernels(&c, &browser).await;
    first_tile(&c, &browser, &bearer).await;
    hidden_vs_visible(&c, &browser, &bearer).await;
    bundle_sizes();
}
