//! The native tabgrid worker: lends this machine's cores to a coordinator, computing the
//! GEMM tiles it hands out, and measures them (`bench`).
//!
//! The key design choice is the split between *deciding* and *doing*.
//! `tabgrid_shared::worker::Session` is a state machine without IO: it holds the operand
//! cache, the queue of assigned tiles and the `Ready` credits, and turns each frame or
//! finished computation into commands. The socket loop in `connection` only carries those
//! out and keeps time; the browser client wraps the same session in its own loop. So every protocol rule —
//! what a `Cancel` does to a queued or a computing tile, when a credit comes back — is a
//! deterministic unit test, with no sockets, no clock and no coordinator.
//!
//! The kernel runs on a rayon pool of its own, built once, never on the async runtime:
//! a tile takes all cores for up to seconds, and heartbeats must keep flowing meanwhile.
//! Tiles run one at a time in arrival order; the second slot (`slots`, default 2) only
//! keeps the next tile's assignment in flight, so the pool never idles between tiles.
//!
//! The coordinator's `tabgrid cluster` runs several workers in one process through
//! [`run`]; the `tabgrid-worker` binary is a thin CLI over [`run`] and [`bench`].

mod bench;
pub mod chaos;
mod compute;
mod connection;
pub mod endpoint;

use std::fmt;
use std::future::Future;

use tabgrid_shared::kernels;
use tabgrid_shared::protocol::{Hello, PROTOCOL_VERSION, WorkerKind};
use tokio::sync::oneshot;

pub use crate::bench::{BenchReport, bench};
pub use crate::connection::SHUTDOWN_REASON;

/// `tabgrid-worker/<version>`, the default `agent`.
pub const AGENT: &str = concat!("tabgrid-worker/", env!("CARGO_PKG_VERSION"));

/// Default operand cache: 2 GiB holds dozens of 256-row panels of a 16k-wide job.
pub const DEFAULT_CACHE_BYTES: u64 = 2048 << 20;

/// Default pipeline depth: one tile computing while the next one's assignment arrives.
pub const DEFAULT_SLOTS: u32 = 2;

/// How a worker connects and computes.
#[derive(Clone)]
pub struct WorkerConfig {
    /// Coordinator URLs, tried in order (failover). `ws://` or `http://` base URLs;
    /// see [`endpoint::normalise`].
    pub coordinators: Vec<String>,
    /// Volunteer token; sent in the upgrade request and in `Hello`, never logged.
    pub token: Option<String>,
    /// Compute threads; 0 means one per core.
    pub threads: usize,
    /// Bytes of operands the coordinator may keep cached here.
    pub cache_bytes: u64,
    /// Tiles held at once (queued plus computing), at most `MAX_SLOTS`.
    pub slots: u32,
    /// Free-form description sent in `Hello`.
    pub agent: String,
    /// Fault injection for testing (`--chaos`); off by default.
    pub chaos: chaos::Chaos,
}

impl WorkerConfig {
    /// A configuration with the default cache, slots and agent.
    pub fn new(coordinators: Vec<String>, token: Option<String>, threads: usize) -> Self {
        WorkerConfig {
            coordinators,
            token,
            threads,
            cache_bytes: DEFAULT_CACHE_BYTES,
            slots: DEFAULT_SLOTS,
            agent: AGENT.to_owned(),
            chaos: chaos::Chaos::default(),
        }
    }
}

impl fmt::Debug for WorkerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerConfig")
            .field("coordinators", &self.coordinators)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("threads", &self.threads)
            .field("cache_bytes", &self.cache_bytes)
            .field("slots", &self.slots)
            .field("agent", &self.agent)
            .finish()
    }
}

/// Why a worker could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("no coordinator URL given")]
    NoCoordinator,
    #[error("invalid coordinator URL {url:?}: {why}")]
    InvalidUrl { url: String, why: String },
    #[error("the token holds characters an HTTP header cannot carry")]
    InvalidToken,
    #[error("cannot start {threads} compute threads: {source}")]
    Pool {
        threads: usize,
        source: rayon::ThreadPoolBuildError,
    },
    /// The coordinator refused this worker for good (authentication, protocol version);
    /// `reason` is the coordinator's own.
    #[error("coordinator refused this worker: {reason}")]
    Refused { reason: String },
}

/// Lends this machine to the coordinators until `shutdown` resolves, then closes the
/// connection with [`SHUTDOWN_REASON`] (the coordinator returns the leases at once) and
/// returns `Ok`.
///
/// Reconnects by itself, with backoff and failover, whenever a connection ends — except
/// when a coordinator refuses the worker for good (bad token, protocol version), which
/// returns [`WorkerError::Refused`] with the coordinator's reason. Configuration errors
/// (bad URL, no URL, unusable token) are returned before any connection is tried.
pub async fn run(config: WorkerConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let endpoints = config
        .coordinators
        .iter()
        .map(|url| endpoint::normalise(url))
        .collect::<Result<Vec<_>, _>>()?;
    if endpoints.is_empty() {
        return Err(WorkerError::NoCoordinator.into());
    }
    if let Some(url) = endpoints.iter().find(|url| url.starts_with("wss://")) {
        return Err(WorkerError::InvalidUrl {
            url: url.clone(),
            why: "this worker is built without TLS; use ws:// or http://".to_owned(),
        }
        .into());
    }
    let auth = config.token.as_deref().map(endpoint::bearer).transpose()?;
    let threads = resolve_threads(config.threads);
    let pool = compute::build_pool(threads)?;

    // Measured once, not per connection: it describes the machine, and every reconnect
    // would otherwise cost ~100 ms of all cores.
    let (measured, measurement) = oneshot::channel();
    pool.spawn(move || {
        let _ = measured.send(bench::quick_gflops());
    });
    let bench_gflops = measurement.await.unwrap_or(0.0);
    tracing::info!(
        threads,
        kernel = kernels::active_path(),
        bench_gflops = format!("{bench_gflops:.1}"),
        "worker starting"
    );

    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        kind: WorkerKind::Native,
        threads: u32::try_from(threads).unwrap_or(u32::MAX),
        features: cpu_features(),
        bench_gflops,
        cache_bytes: config.cache_bytes,
        token: config.token,
        agent: config.agent,
    };
    let worker = connection::Worker {
        endpoints,
        auth,
        hello,
        slots: config.slots,
        cache_bytes: config.cache_bytes,
        pool,
        chaos: config.chaos,
    };
    if !config.chaos.is_off() {
        tracing::warn!(chaos = %config.chaos, "fault injection on: this worker misbehaves on purpose");
    }
    connection::run(worker, shutdown).await?;
    Ok(())
}

/// Threads to use: `threads`, or one per core when 0.
fn resolve_threads(threads: usize) -> usize {
    if threads > 0 {
        threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// CPU features the kernels care about, for the coordinator's worker list.
fn cpu_features() -> Vec<String> {
    #[allow(unused_mut)] // reason: nothing is pushed on architectures without a check below
    let mut features = Vec::new();
    #[cfg(target_arch = "x86_64")]
    for (name, present) in [
        ("avx2", std::arch::is_x86_feature_detected!("avx2")),
        ("fma", std::arch::is_x86_feature_detected!("fma")),
        ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
    ] {
        if present {
            features.push(name.to_owned());
        }
    }
    #[cfg(target_arch = "aarch64")]
    if std::arch::is_aarch64_feature_detected!("neon") {
        features.push("neon".to_owned());
    }
    features
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_debug_hide_the_token() {
        let config = WorkerConfig::new(vec!["http://h:1".into()], Some("s3cret".into()), 0);
        assert_eq!((config.slots, config.cache_bytes), (2, 2048 << 20));
        assert!(config.agent.starts_with("tabgrid-worker/"));
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("s3cret") && debug.contains("<redacted>"),
            "{debug}"
        );
    }

    #[test]
    fn run_is_send_so_cluster_can_spawn_it() {
        fn assert_send<T: Send>(_: T) {}
        let config = WorkerConfig::new(vec!["http://h:1".into()], None, 1);
        assert_send(run(config, std::future::pending()));
    }

    #[tokio::test]
    async fn configuration_errors_come_before_any_connection() {
        let refuse = |coordinators: Vec<&str>, token: Option<&str>| {
            let coordinators = coordinators.into_iter().map(String::from).collect();
            run(
                WorkerConfig::new(coordinators, token.map(String::from), 1),
                std::future::pending(),
            )
        };
        let err = refuse(vec![], None).await.unwrap_err();
        assert!(matches!(
            err.downcast_ref(),
            Some(WorkerError::NoCoordinator)
        ));
        let err = refuse(vec!["http://ok:1", "ftp://bad"], None)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("ftp://bad"), "{err}");
        let err = refuse(vec!["https://tls:1"], None).await.unwrap_err();
        assert!(err.to_string().contains("without TLS"), "{err}");
        let err = refuse(vec!["http://ok:1"], Some("bad\ntoken"))
            .await
            .unwrap_err();
        assert!(matches!(
            err.downcast_ref(),
            Some(WorkerError::InvalidToken)
        ));
    }

    #[test]
    fn threads_default_to_the_cores() {
        assert_eq!(resolve_threads(3), 3);
        assert!(resolve_threads(0) >= 1);
    }
}
