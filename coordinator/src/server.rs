//! The HTTP server: shared state, the router, and `run` on a bound listener.
//!
//! `app(state)` builds the router without sockets (for `oneshot` tests); `run` serves it
//! on a real listener until `shutdown` resolves, with the lease reaper ticking beside it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::api;
use crate::auth::Keys;
use crate::error::ApiError;
use crate::grid::Grid;
use crate::hub;
use crate::volunteers::{self, RateLimiter, VolunteerMode};
use crate::www::Site;

/// Settings of a running coordinator.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Largest request body, bytes.
    pub max_body: usize,
    /// Largest job: its operands and result together, bytes.
    pub max_job_bytes: u64,
    /// Seconds between worker heartbeats; three missed ones drop the worker.
    pub heartbeat_secs: u32,
    /// How often expired leases are reaped.
    pub tick: Duration,
    /// Preferred tile edge (benchmarks shrink it to measure per-tile overhead).
    pub tile_edge: u32,
    /// Whether anonymous tabs get volunteer tokens at `POST /api/v1/volunteers`.
    pub volunteers: VolunteerMode,
    /// Most worker connections from one client address (0: no limit).
    pub max_conns_per_address: u32,
    /// Most worker connections with one token subject (0: no limit).
    pub max_conns_per_subject: u32,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            max_body: 1 << 30,
            max_job_bytes: 4 << 30,
            heartbeat_secs: 5,
            tick: Duration::from_millis(200),
            tile_edge: tabgrid_shared::tiling::PREFERRED_EDGE,
            volunteers: VolunteerMode::Open,
            max_conns_per_address: 64,
            max_conns_per_subject: 16,
        }
    }
}

/// What every handler and socket task shares.
#[derive(Clone)]
pub struct AppState {
    pub grid: Arc<Grid>,
    pub keys: Arc<Keys>,
    pub config: Arc<ServeConfig>,
    /// The volunteer page and its bundles.
    pub site: Arc<Site>,
    pub volunteer_limiter: Arc<RateLimiter>,
    /// Worker connections per address and per subject.
    pub connection_limits: Arc<crate::limits::ConnectionLimits>,
    /// Turns true when the coordinator shuts down, so worker sessions close with a reason
    /// instead of being cut.
    pub shutdown: watch::Receiver<bool>,
}

/// The whole API under `/api/v1`, and the volunteer page at `/`.
pub fn app(state: AppState) -> Router {
    let api = Router::new()
        .route("/jobs", get(api::list_jobs).post(api::submit))
        .route("/jobs/{id}", get(api::job).delete(api::delete_job))
        .route("/jobs/{id}/result", get(api::result))
        .route("/jobs/{id}/events", get(api::events))
        .route("/workers", get(api::workers))
        .route("/healthz", get(api::healthz))
        .route("/metrics", get(api::metrics))
        .route("/worker", get(hub::worker_socket))
        .route("/volunteers", post(volunteers::issue))
        .fallback(api::not_found);
    Router::new()
        .nest("/api/v1", api)
        .route("/healthz", get(api::healthz))
        .route("/metrics", get(api::metrics))
        .fallback(page)
        // Bodies are streamed through the limit, and a declared length over it is refused
        // before a byte is read.
        .layer(DefaultBodyLimit::max(state.config.max_body))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            refuse_oversized,
        ))
        .with_state(state)
}

/// Files of the volunteer page; anything else is the API's JSON 404.
async fn page(State(state): State<AppState>, request: Request) -> Response {
    match state
        .site
        .respond(request.method(), request.uri(), request.headers())
    {
        Some(response) => response,
        None => api::not_found().await.into_response(),
    }
}

async fn refuse_oversized(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(length) = declared
        && length > state.config.max_body as u64
    {
        return ApiError::TooLarge(format!(
            "request body of {length} bytes is over the limit of {} bytes (serve --max-body)",
            state.config.max_body
        ))
        .into_response();
    }
    next.run(request).await
}

/// Serves `state` on `listener` until `shutdown` resolves, over TLS when `tls` is given.
pub async fn run(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    state: AppState,
    stop: watch::Sender<bool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grid = state.grid.clone();
    let tick = state.config.tick;
    let ticker = tokio::spawn(async move {
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            interval.tick().await;
            grid.tick();
        }
    });
    let router = app(state);
    let shutdown = async move {
        shutdown.await;
        let _ = stop.send(true);
    };
    let served = match tls {
        Some(acceptor) => crate::tls::serve(listener, acceptor, router, shutdown).await,
        None => {
            // Worker frames are small and latency-bound (a result, then the next
            // assignment): Nagle's algorithm would hold them back waiting for ACKs.
            let listener = listener.tap_io(|tcp| {
                if let Err(err) = tcp.set_nodelay(true) {
                    tracing::warn!(error = %err, "could not set TCP_NODELAY");
                }
            });
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .with_graceful_shutdown(shutdown)
            .await
        }
    };
    ticker.abort();
    served
}
