//! End-to-end benchmark (`cargo xtask bench e2e`): an f32 job submitted over HTTP as
//! `.npy`, computed by one in-process native worker over loopback WebSocket, result
//! downloaded as `.npy` — as a ratio to the same kernel computing the same product in one
//! process with the same threads. Then the per-tile overhead: a job of many tiny tiles,
//! in tiles per second. On the in-memory store, the SQLite store (in a temp dir) and the
//! PostgreSQL store (a throwaway server with its default durability, one database per
//! grid, the claims loop running), runs interleaved, as ratios to in-memory; then
//! submissions per second on each store, and the time a restart takes to resume a job of
//! 10 000 tiles.
//!
//! Options: `--size N` (2048), `--threads T` (2), `--runs R` (5), `--edge E` (the tile
//! policy's), `--tiny-edge E` (8), `--in-memory-only` (the first part on the in-memory
//! store alone: a quick look at the grid's own overhead).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tabgrid_coordinator::auth::Secret;
use tabgrid_coordinator::cluster::{ClaimConfig, Claims};
use tabgrid_coordinator::grid::Grid as LiveGrid;
use tabgrid_coordinator::metrics::Metrics;
use tabgrid_coordinator::scheduler::SchedulerConfig;
use tabgrid_coordinator::store::postgres::PgStore;
use tabgrid_coordinator::store::sqlite::{SqliteOptions, SqliteStore};
use tabgrid_coordinator::store::{JobOperands, JobRecord, JobState, MemoryStore, Store, TileWrite};
use tabgrid_coordinator::{Coordinator, ServeConfig};
use tabgrid_shared::claims::Role;
use tabgrid_shared::kernels::{MatMut, MatRef, par_gemm};
use tabgrid_tests::postgres::Postgres;

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
    _claims: Option<Claims>,
}

/// The stores compared.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Memory,
    Sqlite,
    Postgres,
}

const KINDS: [Kind; 3] = [Kind::Memory, Kind::Sqlite, Kind::Postgres];

/// A coordinator on a fresh store of `kind` (SQLite in a temp dir that lives as long as
/// the process, PostgreSQL in a new database on `pg`) and one worker with `threads`
/// threads, in this process.
async fn start_grid(kind: Kind, pg: &Postgres, threads: usize, tile_edge: u32, slots: u32) -> Grid {
    static DATABASES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let mut shared = None;
    let store: Arc<dyn Store> = match kind {
        Kind::Memory => Arc::new(MemoryStore::new()),
        Kind::Sqlite => {
            let dir = tempfile::tempdir().unwrap().keep();
            Arc::new(SqliteStore::open(&dir, SqliteOptions::default()).unwrap())
        }
        Kind::Postgres => {
            let n = DATABASES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let url = pg.create_database(&format!("bench{n}"));
            let store = tokio::task::spawn_blocking(move || PgStore::open(&url, "bench").unwrap())
                .await
                .unwrap();
            let store = Arc::new(store);
            shared = Some(store.clone());
            store
        }
    };
    let secret = Secret::generate();
    let config = ServeConfig {
        tile_edge,
        ..ServeConfig::default()
    };
    let coordinator = Coordinator::new(store, &secret, config, SchedulerConfig::default());
    let keys = coordinator.state.keys.clone();
    let grid = coordinator.state.grid.clone();
    let claims =
        shared.map(|store| Claims::start(grid.clone(), store, ClaimConfig::default()).unwrap());
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
        _claims: claims,
    }
}

impl Grid {
    /// Submits a job and returns its id, without waiting for it.
    async fn submit(&self, a: &[u8], b: &[u8]) -> Value {
        let form = reqwest::multipart::Form::new()
            .part(
                "spec",
                reqwest::multipart::Part::text(json!({"op": "gemm", "dtype": "f32"}).to_string()),
            )
            .part("a", reqwest::multipart::Part::bytes(a.to_vec()))
            .part("b", reqwest::multipart::Part::bytes(b.to_vec()));
        self.http
            .post(format!("{}/api/v1/jobs", self.url))
            .bearer_auth(&self.token)
            .multipart(form)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Submit → wait (SSE) → download; returns seconds and the result bytes.
    async fn run(&self, a: &[u8], b: &[u8]) -> (f64, Vec<u8>, u64) {
        let start = Instant::now();
        let reply = self.submit(a, b).await;
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

    let quick = std::env::args().any(|a| a == "--in-memory-only");
    let pg = Postgres::start(false).await;
    let kinds: &[Kind] = if quick { &KINDS[..1] } else { &KINDS };
    let mut grids = Vec::new();
    for &kind in kinds {
        grids.push(start_grid(kind, &pg, threads, edge, tabgrid_worker::DEFAULT_SLOTS).await);
    }
    let mut reference = vec![0f32; n * n];
    local(&mut reference);
    for grid in &grids {
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
    }

    let mut local_s = Vec::new();
    let mut grid_s = vec![Vec::new(); kinds.len()];
    let mut ratios = vec![Vec::new(); kinds.len()];
    let mut store_ratios = vec![Vec::new(); kinds.len()];
    let mut tiles = 0;
    for _ in 0..runs {
        let l = local(&mut reference);
        local_s.push(l);
        let mut times = Vec::new();
        for (i, grid) in grids.iter().enumerate() {
            let (g, _, t) = grid.run(&a_npy, &b_npy).await;
            tiles = t;
            ratios[i].push(l / g);
            grid_s[i].push(g);
            times.push(g);
        }
        for (i, t) in times.iter().enumerate() {
            store_ratios[i].push(times[0] / t);
        }
    }
    let gflops = |s: f64| 2.0 * (n as f64).powi(3) / s / 1e9;
    println!("\nf32 {n}x{n}x{n}, {threads} threads, {tiles} tiles, median of {runs}");
    println!(
        "  one process (same kernel):   {:.3} s  {:.1} GFLOP/s",
        median(local_s.clone()),
        gflops(median(local_s))
    );
    for (i, kind) in kinds.iter().enumerate() {
        let s = median(grid_s[i].clone());
        println!(
            "  grid end to end, {:<9} {s:.3} s  {:.1} GFLOP/s  ratio to one process {:.2}",
            format!("{kind:?}:"),
            gflops(s),
            median(ratios[i].clone())
        );
    }
    for (i, kind) in kinds.iter().enumerate().skip(1) {
        println!(
            "  {kind:?}/in-memory (job throughput): {:.2}",
            median(store_ratios[i].clone())
        );
    }
    if quick {
        return;
    }

    // Per-tile overhead: many tiny tiles over loopback WebSocket, each tile accepted
    // through the store.
    let slots = tabgrid_shared::protocol::MAX_SLOTS;
    let m = 1024;
    let k = 8;
    let (ta, tb) = (npy(m, k, &random(m * k, 3)), npy(k, m, &random(k * m, 4)));
    let mut grids = Vec::new();
    for kind in kinds {
        grids.push(start_grid(*kind, &pg, threads, tiny as u32, slots).await);
    }
    let mut rates = vec![Vec::new(); kinds.len()];
    let mut tiles = 0;
    for _ in 0..runs {
        for (i, grid) in grids.iter().enumerate() {
            let (s, _, t) = grid.run(&ta, &tb).await;
            tiles = t;
            rates[i].push(t as f64 / s);
        }
    }
    println!(
        "\ntiny tiles: {m}x{k}x{m} f32 cut into {tiles} tiles of {tiny}x{tiny}, one worker with {slots} slots, median of {runs}"
    );
    let memory_rate = median(rates[0].clone());
    for (i, kind) in kinds.iter().enumerate() {
        let rate = median(rates[i].clone());
        println!(
            "  {:<9} {rate:.0} tiles accepted/s end to end ({:.0}x Dask's ~500 tasks/s; {:.2}x in-memory)",
            format!("{kind:?}:"),
            rate / 500.0,
            rate / memory_rate
        );
    }

    // Submissions per second: 64×64 jobs, 8 at a time, nobody computing them.
    let (sa, sb) = (
        npy(64, 64, &random(64 * 64, 5)),
        npy(64, 64, &random(64 * 64, 6)),
    );
    let count = 400;
    let mut per_second = Vec::new();
    for kind in kinds {
        let grid = Arc::new(start_grid(*kind, &pg, 1, 64, 1).await);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for lane in 0..8 {
            let (grid, sa, sb) = (grid.clone(), sa.clone(), sb.clone());
            tasks.push(tokio::spawn(async move {
                for _ in (lane..count).step_by(8) {
                    let reply = grid.submit(&sa, &sb).await;
                    assert!(reply["id"].is_string(), "{reply}");
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        per_second.push(count as f64 / start.elapsed().as_secs_f64());
    }
    println!("\nsubmissions: {count} jobs of 64x64x64 f32 as .npy, 8 at a time");
    for (i, kind) in kinds.iter().enumerate() {
        println!(
            "  {:<9} {:.0} jobs/s ({:.2}x in-memory)",
            format!("{kind:?}:"),
            per_second[i],
            per_second[i] / per_second[0]
        );
    }

    resume_time();
    let url = pg.create_database("takeover");
    tokio::task::spawn_blocking(move || takeover_time(&url))
        .await
        .unwrap();
}

/// Records a job of 10 000 tiles (100 × 100 of 16², k = 64) in `store` with every other
/// tile accepted; returns its id and tile count.
fn half_done_job(store: &dyn Store) -> (String, u32) {
    let (edge, side) = (16u32, 1600u32);
    let k = 64;
    let id = uuid::Uuid::new_v4().to_string();
    let tiles_per_side = side / edge;
    let record = JobRecord {
        id: id.clone(),
        owner: "bench".into(),
        name: None,
        dtype: tabgrid_shared::Dtype::F32,
        m: side,
        n: side,
        k,
        tile_m: edge,
        tile_n: edge,
        alpha: 1.0,
        beta: 0.0,
        priority: 0,
        quorum: None,
        state: JobState::Running,
        tiles_done: 0,
        tiles_total: u64::from(tiles_per_side * tiles_per_side),
        created_at: std::time::SystemTime::now(),
        finished_at: None,
        error: None,
    };
    let matrix = |rows: u32, cols: u32, seed| {
        let values = random((rows * cols) as usize, seed);
        Arc::new(tabgrid_shared::Matrix::from_f32(rows as usize, cols as usize, &values).unwrap())
    };
    let operands = JobOperands {
        a: matrix(side, k, 7),
        b: matrix(k, side, 8),
        c: None,
    };
    store
        .insert_job(&record, &operands)
        .unwrap()
        .wait()
        .unwrap();
    let payload = vec![1u8; (edge * edge * 4) as usize];
    for i in 0..tiles_per_side {
        for j in (0..tiles_per_side).step_by(2) {
            store
                .tile_accepted(TileWrite {
                    job: id.clone(),
                    tile: (i, j),
                    row: (i * edge) as usize,
                    col: (j * edge) as usize,
                    rows: edge as usize,
                    cols: edge as usize,
                    width: side as usize,
                    payload: payload.clone(),
                })
                .unwrap();
        }
    }
    store.flush().unwrap();
    (id, tiles_per_side * tiles_per_side)
}

/// A restart resuming a job of 10 000 tiles with half of them accepted: the store is
/// opened, the job's operands read and checked, its kept tiles checked.
fn resume_time() {
    let dir = tempfile::tempdir().unwrap();
    let (_, total) =
        half_done_job(&SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap());
    let mut times = Vec::new();
    let mut kept = 0;
    for _ in 0..5 {
        let start = Instant::now();
        let store = Arc::new(SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap());
        let grid = LiveGrid::new(store, Metrics::new(), SchedulerConfig::default());
        let (jobs, tiles) = grid.resume().unwrap();
        times.push(start.elapsed().as_secs_f64());
        assert_eq!(jobs, 1);
        kept = tiles;
    }
    println!(
        "\nrestart: resuming a job of {total} tiles ({kept} kept) takes {:.3} s (median of 5)",
        median(times)
    );
}

/// On PostgreSQL, the same job taken over by a coordinator that never saw it (as when
/// its own coordinator died): connecting, loading and checking its operands, cutting its
/// panels, and claiming its 5 000 open tiles.
fn takeover_time(url: &str) {
    let first = PgStore::open(url, "first").unwrap();
    let (id, total) = half_done_job(&first);
    let mut times = Vec::new();
    let mut claimed = 0;
    for n in 0..5 {
        let start = Instant::now();
        let store = Arc::new(PgStore::open(url, &format!("next{n}")).unwrap());
        let grid = LiveGrid::new(store.clone(), Metrics::new(), SchedulerConfig::default());
        grid.share_tiles();
        let mut session = store.session().unwrap();
        let (record, operands) = session.load(&id).unwrap().unwrap();
        grid.adopt(record, operands);
        let tiles = session
            .claim(&id, u64::from(total), Duration::from_secs(30))
            .unwrap();
        grid.offer(&id, &tiles);
        times.push(start.elapsed().as_secs_f64());
        claimed = tiles.len();
        session.give_back_all().unwrap();
    }
    println!(
        "takeover (PostgreSQL): another coordinator taking up that job and claiming its {claimed} open tiles takes {:.3} s (median of 5)",
        median(times)
    );
}
