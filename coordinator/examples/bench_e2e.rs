//! End-to-end benchmark (`cargo xtask bench e2e`): an f32 job submitted over HTTP as
//! `.npy`, computed by one in-process native worker over loopback WebSocket, result
//! downloaded as `.npy` — as a ratio to the same kernel computing the same product in one
//! process with the same threads. Then the per-tile overhead: a job of many tiny tiles,
//! in tiles per second.
//!
//! Options: `--size N` (2048), `--threads T` (2), `--runs R` (5), `--edge E` (the tile
//! policy's), `--tiny-edge E` (8).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tabgrid_coordinator::auth::Secret;
use tabgrid_coordinator::scheduler::SchedulerConfig;
use tabgrid_coordinator::store::MemoryStore;
use tabgrid_coordinator::{Coordinator, ServeConfig};
use tabgrid_shared::claims::Role;
use tabgrid_shared::kernels::{MatMut, MatRef, par_gemm};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn npy(rows: usize, cols: usize, data: &[f32]) -> Vec<u8> {
    use ndarray_npy::WriteNpyExt;
    let mut out = Vec::new();
    ndarray::Array2::from_shape_vec((rows, cols), data.to_vec())
        .unwrap()
        .write_npy(&mut out)
        .unwrap();
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Grid {
    url: String,
    token: String,
    http: reqwest::Client,
}

/// A coordinator and one worker with `threads` threads, in this process.
async fn start_grid(threads: usize, tile_edge: u32, slots: u32) -> Grid {
    let secret = Secret::generate();
    let config = ServeConfig {
        tile_edge,
        ..ServeConfig::default()
    };
    let coordinator = Coordinator::new(
        Arc::new(MemoryStore::new()),
        &secret,
        config,
        SchedulerConfig::default(),
    );
    let keys = coordinator.state.keys.clone();
    let grid = coordinator.state.grid.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(coordinator.serve(listener, None, std::future::pending()));
    let volunteer = keys.mint("bench-worker", Role::Volunteer, Duration::from_secs(3600));
    let mut worker = tabgrid_worker::WorkerConfig::new(vec![url.clone()], Some(volunteer), threads);
    worker.slots = slots;
    tokio::spawn(tabgrid_worker::run(worker, std::future::pending()));
    // A benchmark, not a test: poll until the worker has joined.
    while grid.workers().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Grid {
        url,
        token: keys.mint("bench", Role::Submitter, Duration::from_secs(3600)),
        http: reqwest::Client::new(),
    }
}

impl Grid {
    /// Submit → wait (SSE) → download; returns seconds and the result bytes.
    async fn run(&self, a: &[u8], b: &[u8]) -> (f64, Vec<u8>, u64) {
        let start = Instant::now();
        let form = reqwest::multipart::Form::new()
            .part(
                "spec",
                reqwest::multipart::Part::text(json!({"op": "gemm", "dtype": "f32"}).to_string()),
            )
            .part("a", reqwest::multipart::Part::bytes(a.to_vec()))
            .part("b", reqwest::multipart::Part::bytes(b.to_vec()));
        let reply: Value = self
            .http
            .post(format!("{}/api/v1/jobs", self.url))
            .bearer_auth(&self.token)
            .multipart(form)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = reply["id"].as_str().expect("job id").to_owned();
        let submitted = start.elapsed().as_secs_f64();
        let tiles = reply["tiles_total"].as_u64().unwrap();
        let events = self
            .http
            .get(format!("{}/api/v1/jobs/{id}/events", self.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        let mut stream = events.bytes_stream();
        let mut seen = String::new();
        while let Some(chunk) = stream.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if seen.contains("\"state\":\"done\"") {
                break;
            }
            if let Some(i) = seen.rfind("\n\n") {
                seen.drain(..i);
            }
        }
        let computed = start.elapsed().as_secs_f64();
        let result = self
            .http
            .get(format!("{}/api/v1/jobs/{id}/result", self.url))
            .bearer_auth(&self.token)
            .header("accept", "application/x-npy")
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();
        let seconds = start.elapsed().as_secs_f64();
        if std::env::var_os("BENCH_PHASES").is_some() {
            eprintln!(
                "phases: submit {submitted:.3} s, compute {:.3} s, download {:.3} s",
                computed - submitted,
                seconds - computed
            );
        }
        // Free the job's memory before the next run.
        self.http
            .delete(format!("{}/api/v1/jobs/{id}", self.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        (seconds, result, tiles)
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let n = arg("--size", 2048);
    let threads = arg("--threads", 2);
    let runs = arg("--runs", 5);
    let tiny = arg("--tiny-edge", 8);
    let edge = arg("--edge", tabgrid_shared::tiling::PREFERRED_EDGE as usize) as u32;
    println!(
        "command: cargo xtask bench e2e --size {n} --threads {threads} --runs {runs} --tiny-edge {tiny}"
    );
    let a = random(n * n, 1);
    let b = random(n * n, 2);
    let (a_npy, b_npy) = (npy(n, n, &a), npy(n, n, &b));

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let local = |out: &mut Vec<f32>| {
        let start = Instant::now();
        pool.install(|| {
            par_gemm(
                1.0,
                MatRef::row_major(&a, n, n).unwrap(),
                MatRef::row_major(&b, n, n).unwrap(),
                0.0,
                MatMut::row_major(out, n, n).unwrap(),
            )
            .unwrap()
        });
        start.elapsed().as_secs_f64()
    };

    let grid = start_grid(threads, edge, tabgrid_worker::DEFAULT_SLOTS).await;
    let mut reference = vec![0f32; n * n];
    local(&mut reference);
    let (_, warm, _) = grid.run(&a_npy, &b_npy).await;
    let ((rows, cols), got) = {
        use ndarray_npy::ReadNpyExt;
        let array = ndarray::Array2::<f32>::read_npy(&warm[..]).unwrap();
        (array.dim(), array.iter().copied().collect::<Vec<f32>>())
    };
    assert_eq!((rows, cols), (n, n));
    let worst = got
        .iter()
        .zip(&reference)
        .map(|(g, r)| (g - r).abs())
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-3,
        "grid result differs from the local product by {worst}"
    );

    let (mut local_s, mut grid_s, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut tiles = 0;
    for _ in 0..runs {
        let l = local(&mut reference);
        let (g, _, t) = grid.run(&a_npy, &b_npy).await;
        tiles = t;
        ratios.push(l / g);
        local_s.push(l);
        grid_s.push(g);
    }
    let gflops = |s: f64| 2.0 * (n as f64).powi(3) / s / 1e9;
    println!("\nf32 {n}x{n}x{n}, {threads} threads, {tiles} tiles, median of {runs}");
    println!(
        "  one process (same kernel): {:.3} s  {:.1} GFLOP/s",
        median(local_s.clone()),
        gflops(median(local_s))
    );
    println!(
        "  grid end to end:           {:.3} s  {:.1} GFLOP/s",
        median(grid_s.clone()),
        gflops(median(grid_s))
    );
    println!(
        "  ratio grid/one-process:    {:.2}  (median of per-run ratios)",
        median(ratios)
    );

    // Per-tile overhead: many tiny tiles over loopback WebSocket.
    let slots = tabgrid_shared::protocol::MAX_SLOTS;
    let grid = start_grid(threads, tiny as u32, slots).await;
    let m = 1024;
    let k = 8;
    let (ta, tb) = (npy(m, k, &random(m * k, 3)), npy(k, m, &random(k * m, 4)));
    let mut rates = Vec::new();
    let mut tiles = 0;
    for _ in 0..runs {
        let (s, _, t) = grid.run(&ta, &tb).await;
        tiles = t;
        rates.push(t as f64 / s);
    }
    let rate = median(rates);
    println!(
        "\ntiny tiles: {m}x{k}x{m} f32 cut into {tiles} tiles of {tiny}x{tiny}, one worker with {slots} slots, median of {runs}"
    );
    println!(
        "  {rate:.0} tiles/s end to end over loopback WebSocket ({:.0}x Dask's ~500 tasks/s)",
        rate / 500.0
    );
}
