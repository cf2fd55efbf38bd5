//! Harness for the end-to-end tests: real `tabgrid` and `tabgrid-worker` processes on
//! 127.0.0.1 with free ports and fresh data dirs, real JWTs, and matrices checked against
//! an independent reference (`matrixmultiply`).
//!
//! Tests wait on events — a line a process logs, a progress event over SSE — never on
//! a fixed sleep. Every process is killed when its handle drops.

use std::io::{BufRead, BufReader};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use jsonwebtoken::{EncodingKey, Header};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tabgrid_shared::claims::{Claims, Role};
use tokio::sync::broadcast;

pub mod browser;
pub mod postgres;

/// The secret every test coordinator signs with, so tests mint tokens themselves.
pub const SECRET: &str = "tabgrid-test-secret";

/// How long any single awaited event may take before the test fails.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Path of a binary built in the same target dir as this test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/it-<hash> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo xtask test` does)",
        path.display()
    );
    path
}

/// Mints a real HS256 token signed with [`SECRET`].
pub fn token(subject: &str, role: Role) -> String {
    token_with(subject, role, now() + 3600, SECRET)
}

pub fn token_with(subject: &str, role: Role, exp: u64, secret: &str) -> String {
    let claims = Claims {
        sub: subject.into(),
        role,
        exp,
        iat: now(),
    };
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("signing")
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Lines a child process writes, as they come.
#[derive(Clone)]
pub struct Lines {
    seen: Arc<Mutex<Vec<String>>>,
    tx: broadcast::Sender<String>,
}

impl Lines {
    pub fn follow(stream: impl std::io::Read + Send + 'static, echo: &'static str) -> Lines {
        let (tx, _) = broadcast::channel(4096);
        let lines = Lines {
            seen: Arc::default(),
            tx,
        };
        let out = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if std::env::var_os("TABGRID_TEST_ECHO").is_some() {
                    eprintln!("[{echo}] {line}");
                }
                out.seen.lock().unwrap().push(line.clone());
                let _ = out.tx.send(line);
            }
        });
        lines
    }

    /// Waits until `count` lines containing `needle` have been written (counting earlier ones).
    pub async fn wait_for(&self, needle: &str, count: usize) -> String {
        let mut rx = self.tx.subscribe();
        let matching = |seen: &Vec<String>| {
            seen.iter()
                .filter(|l| l.contains(needle))
                .cloned()
                .collect::<Vec<_>>()
        };
        let found = matching(&self.seen.lock().unwrap());
        if found.len() >= count {
            return found[count - 1].clone();
        }
        let mut have = found.len();
        let wait = async {
            loop {
                match rx.recv().await {
                    Ok(line) if line.contains(needle) => {
                        have += 1;
                        if have >= count {
                            return line;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let found = matching(&self.seen.lock().unwrap());
                        if found.len() >= count {
                            return found[count - 1].clone();
                        }
                        have = found.len();
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        panic!("process exited before logging {needle:?}")
                    }
                }
            }
        };
        tokio::time::timeout(EVENT_TIMEOUT, wait)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {needle:?} x{count}"))
    }

    pub fn count(&self, needle: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }
}

/// Requests to one coordinator's HTTP API, by base URL. Tests reach it through a
/// [`Coordinator`] (which derefs to it), or build one for a coordinator they did not start
/// (`tabgrid cluster`). The helpers unwrap transport errors: a test only checks what the
/// API answers.
pub struct ApiClient {
    pub http: reqwest::Client,
    /// `http://host:port`, no trailing slash.
    pub url: String,
}

impl ApiClient {
    pub fn new(url: String) -> ApiClient {
        ApiClient {
            http: reqwest::Client::new(),
            url,
        }
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.url)
    }

    /// A request to `/api/v1{path}` as `bearer`.
    pub fn request(&self, method: Method, path: &str, bearer: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.api(path))
            .bearer_auth(bearer)
    }

    pub async fn get(&self, path: &str, bearer: &str) -> reqwest::Response {
        self.request(Method::GET, path, bearer)
            .send()
            .await
            .unwrap()
    }

    /// The body as JSON, whatever the status: an error reply is JSON too, and the
    /// caller's checks on it say what went wrong.
    pub async fn get_json(&self, path: &str, bearer: &str) -> Value {
        self.get(path, bearer).await.json().await.unwrap()
    }

    /// A GET that asks for `.npy`.
    pub async fn get_npy(&self, path: &str, bearer: &str) -> reqwest::Response {
        self.request(Method::GET, path, bearer)
            .header("accept", "application/x-npy")
            .send()
            .await
            .unwrap()
    }

    pub async fn delete(&self, path: &str, bearer: &str) -> StatusCode {
        let response = self.request(Method::DELETE, path, bearer).send().await;
        response.unwrap().status()
    }

    pub async fn post_json(&self, path: &str, bearer: &str, body: &Value) -> (StatusCode, Value) {
        status_and_json(self.request(Method::POST, path, bearer).json(body)).await
    }

    /// A multipart POST: a `spec` part and `.npy` parts, as the CLI submits.
    pub async fn post_form(
        &self,
        path: &str,
        bearer: &str,
        form: reqwest::multipart::Form,
    ) -> (StatusCode, Value) {
        status_and_json(self.request(Method::POST, path, bearer).multipart(form)).await
    }

    /// A job's result as JSON: the values of its `data`, row-major.
    pub async fn result_values(&self, id: &str, bearer: &str) -> Vec<f64> {
        let body = self.get_json(&format!("/jobs/{id}/result"), bearer).await;
        values(&body["data"])
    }

    /// A job's result as `.npy` (which must come back 200): its shape and values.
    pub async fn result_npy(&self, id: &str, bearer: &str) -> ((usize, usize), Vec<f64>) {
        let response = self.get_npy(&format!("/jobs/{id}/result"), bearer).await;
        assert_eq!(response.status(), 200);
        read_npy(&response.bytes().await.unwrap())
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Follows a job's SSE stream until `stop` says so for an event; returns that event.
    pub async fn follow(
        &self,
        id: &str,
        bearer: &str,
        mut stop: impl FnMut(&Value) -> bool,
    ) -> Value {
        let response = self.get(&format!("/jobs/{id}/events"), bearer).await;
        assert_eq!(response.status(), 200);
        let mut stream = response.bytes_stream();
        let mut buffer = String::new();
        let wait = async {
            while let Some(chunk) = stream.next().await {
                buffer.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
                while let Some(end) = buffer.find("\n\n") {
                    let event: String = buffer.drain(..end + 2).collect();
                    for line in event.lines() {
                        if let Some(data) = line.strip_prefix("data:") {
                            let value: Value = serde_json::from_str(data.trim()).unwrap();
                            if stop(&value) {
                                return value;
                            }
                        }
                    }
                }
            }
            panic!("event stream ended before the awaited event");
        };
        tokio::time::timeout(EVENT_TIMEOUT, wait)
            .await
            .expect("timed out following job events")
    }

    /// Waits for a job to reach a final state; returns its last progress event.
    pub async fn wait_job(&self, id: &str, bearer: &str) -> Value {
        self.follow(id, bearer, |e| {
            matches!(e["state"].as_str(), Some("done" | "failed" | "cancelled"))
        })
        .await
    }
}

/// Sends a request; returns its status and JSON body (`Null` when the body is not JSON, so
/// that the caller's status check is what fails).
pub async fn status_and_json(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The value of the first sample of `name` in Prometheus text (0 when absent).
pub fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|line| line.starts_with(name))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The numbers of a JSON array (a result's `data`).
pub fn values(array: &Value) -> Vec<f64> {
    array
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

/// A `tabgrid serve` process, and (through `Deref`) the [`ApiClient`] for it.
pub struct Coordinator {
    child: Child,
    pub addr: String,
    pub data_dir: tempfile::TempDir,
    stderr: Lines,
    args: Vec<String>,
    client: ApiClient,
}

impl Deref for Coordinator {
    type Target = ApiClient;

    fn deref(&self) -> &ApiClient {
        &self.client
    }
}

impl Coordinator {
    /// Starts a coordinator on a free port with a fresh data dir.
    pub async fn start(extra: &[&str]) -> Coordinator {
        let data_dir = tempfile::tempdir().unwrap();
        let args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Coordinator::spawn("127.0.0.1:0", data_dir, args).await
    }

    /// Starts a coordinator on a free port on an existing data dir (a restored backup).
    pub async fn start_in(data_dir: tempfile::TempDir, extra: &[&str]) -> Coordinator {
        let args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Coordinator::spawn("127.0.0.1:0", data_dir, args).await
    }

    async fn spawn(listen: &str, data_dir: tempfile::TempDir, args: Vec<String>) -> Coordinator {
        let mut child = Command::new(bin("tabgrid"))
            .arg("serve")
            .args(["--listen", listen])
            .arg("--data-dir")
            .arg(data_dir.path())
            .args(&args)
            .env("TABGRID_JWT_SECRET", SECRET)
            .env(
                "RUST_LOG",
                std::env::var("TABGRID_TEST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tabgrid serve");
        let stdout = Lines::follow(child.stdout.take().unwrap(), "coordinator out");
        let stderr = Lines::follow(child.stderr.take().unwrap(), "coordinator");
        let line = stdout.wait_for("listening on ", 1).await;
        let url = line
            .split("listening on ")
            .nth(1)
            .unwrap()
            .trim()
            .to_owned();
        let addr = url
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .to_owned();
        Coordinator {
            child,
            addr,
            data_dir,
            stderr,
            args,
            client: ApiClient::new(url),
        }
    }

    /// Kills this coordinator with SIGKILL and starts a new one on the same address and
    /// data dir.
    pub async fn restart(self) -> Coordinator {
        let mut this = self;
        this.child.kill().unwrap();
        this.child.wait().unwrap();
        let addr = this.addr.clone();
        let args = std::mem::take(&mut this.args);
        let data_dir = tempfile::TempDir::new().unwrap();
        let data_dir = std::mem::replace(&mut this.data_dir, data_dir);
        drop(this);
        Coordinator::spawn(&addr, data_dir, args).await
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `count` workers have connected since this coordinator started.
    pub async fn wait_workers_connected(&self, count: usize) {
        self.stderr.wait_for("worker connected", count).await;
    }

    /// Waits until `count` worker connections have ended (any reason).
    pub async fn wait_log(&self, needle: &str, count: usize) -> String {
        self.stderr.wait_for(needle, count).await
    }

    pub fn log_count(&self, needle: &str) -> usize {
        self.stderr.count(needle)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/api/v1/worker", self.addr)
    }

    /// Starts a native worker process with `threads` threads and a fresh volunteer token.
    pub fn worker(&self, name: &str, threads: usize) -> Worker {
        Worker::start(&self.url, &token(name, Role::Volunteer), threads)
    }

    /// SIGTERM, as a service manager stops it; waits for it to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success());
        self.child.wait().unwrap()
    }

    /// SIGKILL: no goodbye, nothing flushed.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `tabgrid-worker` process.
pub struct Worker {
    child: Child,
    stderr: Lines,
}

impl Worker {
    pub fn start(url: &str, token: &str, threads: usize) -> Worker {
        Worker::start_with(url, token, threads, &[])
    }

    /// A worker with extra arguments (`--chaos …`).
    pub fn start_with(url: &str, token: &str, threads: usize, extra: &[&str]) -> Worker {
        let mut child = Command::new(bin("tabgrid-worker"))
            .args(["--coordinator", url, "--threads", &threads.to_string()])
            .args(extra)
            .env("TABGRID_TOKEN", token)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tabgrid-worker");
        let stderr = Lines::follow(child.stderr.take().unwrap(), "worker");
        Worker { child, stderr }
    }

    /// SIGKILL: no goodbye, no flushing.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGINT, as Ctrl-C in a terminal sends.
    pub fn interrupt(&mut self) {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success());
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn wait_log(&self, needle: &str, count: usize) -> String {
        self.stderr.wait_for(needle, count).await
    }

    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An f64 job with C, alpha and beta submitted as JSON, and what its result must be.
pub struct GemmJob {
    pub id: String,
    pub k: usize,
    pub tiles: u64,
    pub want: Vec<f64>,
}

impl GemmJob {
    /// Submits an `m×k · k×n` job with random operands from `seed`.
    pub async fn submit(
        c: &ApiClient,
        bearer: &str,
        (m, k, n): (usize, usize, usize),
        seed: u64,
    ) -> GemmJob {
        let (alpha, beta) = (1.5, -0.5);
        let a = random_matrix(m, k, seed);
        let b = random_matrix(k, n, seed + 1);
        let cm = random_matrix(m, n, seed + 2);
        let body = serde_json::json!({
            "op": "gemm", "dtype": "f64", "alpha": alpha, "beta": beta,
            "a": {"shape": [m, k], "data": a}, "b": {"shape": [k, n], "data": b},
            "c": {"shape": [m, n], "data": cm},
        });
        let (status, reply) = c.post_json("/jobs", bearer, &body).await;
        assert_eq!(status, 201, "{reply}");
        GemmJob {
            id: reply["id"].as_str().unwrap().to_owned(),
            k,
            tiles: reply["tiles_total"].as_u64().unwrap(),
            want: reference((m, k, n), alpha, &a, &b, beta, Some(&cm)),
        }
    }

    /// The job is done on `c` and its result (as JSON) is right.
    pub async fn assert_right(&self, c: &ApiClient, bearer: &str) {
        let job = c.get_json(&format!("/jobs/{}", self.id), bearer).await;
        assert_eq!(job["state"], "done", "{job}");
        let got = c.result_values(&self.id, bearer).await;
        assert_close(&got, &self.want, self.k, false);
    }
}

/// A deterministic pseudo-random matrix, row-major, values in [-1, 1).
pub fn random_matrix(rows: usize, cols: usize, seed: u64) -> Vec<f64> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..rows * cols)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}

/// The reference: `alpha·A·B + beta·C` with `matrixmultiply` in f64.
pub fn reference(
    (m, k, n): (usize, usize, usize),
    alpha: f64,
    a: &[f64],
    b: &[f64],
    beta: f64,
    c: Option<&[f64]>,
) -> Vec<f64> {
    let mut out = c.map_or_else(|| vec![0.0; m * n], <[f64]>::to_vec);
    let beta = if c.is_some() { beta } else { 0.0 };
    // SAFETY: the slices hold m×k, k×n and m×n row-major elements as the strides say.
    unsafe {
        matrixmultiply::dgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            n as isize,
            1,
            beta,
            out.as_mut_ptr(),
            n as isize,
            1,
        );
    }
    out
}

/// Asserts `got` matches `want` within a tolerance scaled to the dtype and k.
pub fn assert_close(got: &[f64], want: &[f64], k: usize, f32_job: bool) {
    assert_eq!(
        got.len(),
        want.len(),
        "result has the wrong number of elements"
    );
    let eps = if f32_job {
        f32::EPSILON as f64
    } else {
        f64::EPSILON
    };
    let tolerance = 4.0 * (k.max(1) as f64) * eps;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let scale = w.abs().max(1.0);
        assert!(
            (g - w).abs() <= tolerance * scale * 4.0,
            "element {i}: got {g}, want {w} (tolerance {tolerance})"
        );
    }
}

/// `.npy` bytes of a row-major matrix.
pub fn npy_f64(rows: usize, cols: usize, data: &[f64]) -> Vec<u8> {
    npy(rows, cols, data)
}

/// `.npy` bytes of a row-major matrix, rounded to f32.
pub fn npy_f32(rows: usize, cols: usize, data: &[f64]) -> Vec<u8> {
    let data: Vec<f32> = data.iter().map(|&v| v as f32).collect();
    npy(rows, cols, &data)
}

fn npy<T: ndarray_npy::WritableElement>(rows: usize, cols: usize, data: &[T]) -> Vec<u8> {
    use ndarray_npy::WriteNpyExt;
    let view = ndarray::ArrayView2::from_shape((rows, cols), data).expect("rows×cols values");
    let mut out = Vec::new();
    view.write_npy(&mut out).expect("writing to memory");
    out
}

/// Reads a 2-D `.npy` of f32 or f64 as f64 values with its shape.
pub fn read_npy(bytes: &[u8]) -> ((usize, usize), Vec<f64>) {
    use ndarray_npy::ReadNpyExt;
    if let Ok(a) = ndarray::Array2::<f64>::read_npy(bytes) {
        return (a.dim(), a.iter().copied().collect());
    }
    let a = ndarray::Array2::<f32>::read_npy(bytes).expect("result is a 2-D f32 or f64 .npy");
    (a.dim(), a.iter().map(|&v| f64::from(v)).collect())
}

/// Rounds values through f32 (what an f32 job computes on).
pub fn as_f32(values: &[f64]) -> Vec<f64> {
    values.iter().map(|&v| f64::from(v as f32)).collect()
}
