//! The tabgrid coordinator: cuts jobs into tiles, leases them to volunteer workers over
//! WebSocket, checks and assembles what comes back, and serves the HTTP API users submit
//! to. Also the `tabgrid` command-line client.
//!
//! The key design choice is the split between [`scheduler`], a synchronous state machine
//! that makes every decision, and [`grid`], which owns sockets' outboxes, bytes, the clock
//! and the store. Scheduling rules are unit-tested without a socket or a clock; the IO
//! around them stays thin.

pub mod api;
pub mod auth;
pub mod client;
pub mod cluster;
pub mod error;
pub mod files;
pub mod grid;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod npy;
pub mod scheduler;
pub mod server;
pub mod store;
pub mod tls;
pub mod verify;
pub mod volunteers;
pub mod www;

#[cfg(test)]
mod fuzz_tests;

use std::sync::Arc;

pub use server::{AppState, ServeConfig, app, run};

/// A coordinator ready to serve: its state and the switch that stops worker sessions.
pub struct Coordinator {
    pub state: AppState,
    pub stop: tokio::sync::watch::Sender<bool>,
}

impl Coordinator {
    /// Builds a coordinator on `store` with tokens signed by `secret`.
    pub fn new(
        store: Arc<dyn store::Store>,
        secret: &auth::Secret,
        config: ServeConfig,
        scheduler: scheduler::SchedulerConfig,
    ) -> Coordinator {
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let grid = grid::Grid::new(store, metrics::Metrics::new(), scheduler);
        let connection_limits = limits::ConnectionLimits::new(
            config.max_conns_per_address,
            config.max_conns_per_subject,
        );
        Coordinator {
            state: AppState {
                grid,
                keys: Arc::new(auth::Keys::new(secret)),
                config: Arc::new(config),
                site: Arc::new(www::Site::default()),
                volunteer_limiter: Arc::new(volunteers::RateLimiter::default()),
                connection_limits,
                shutdown,
            },
            stop,
        }
    }

    /// Serves `site` at `/` (the volunteer page; empty by default).
    pub fn with_site(mut self, site: www::Site) -> Coordinator {
        self.state.site = Arc::new(site);
        self
    }

    /// Serves on `listener` until `shutdown` resolves, over TLS when `tls` is given.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        run(listener, tls, self.state, self.stop, shutdown).await
    }
}
