//! The WebSocket hub: one task per connected worker, turning frames into grid events and
//! grid decisions into frames.
//!
//! A connection that sends anything undecodable, oversized or out of protocol is closed
//! with a reason; the grid only ever sees well-formed events, so one bad peer never
//! touches other workers or jobs.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::SinkExt;
use tabgrid_shared::claims::{Claims, Role};
use tabgrid_shared::protocol::{
    self, FrameError, Hello, Limits, MAX_FRAME_BYTES, MAX_SLOTS, PROTOCOL_VERSION, TileResult,
    ToCoordinator, ToWorker, Welcome,
};
use tokio::time::Instant;

use crate::auth::TokenError;
use crate::error::ApiError;
use crate::grid::{CheckInputs, Grid, Outbound, ResultError};
use crate::scheduler::WorkerId;
use crate::server::AppState;
use crate::verify;

/// WebSocket close codes this hub uses. 1008 means "do not come back with these
/// credentials or this version"; workers reconnect after any other code.
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    /// Too many connections for now; the worker retries later with backoff.
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// How long a new connection has to send `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET /api/v1/worker`: upgrades to the worker protocol. A token in the `Authorization`
/// header is checked before the upgrade (native workers get a plain 401); browsers, which
/// cannot set headers, send theirs in `Hello`.
pub async fn worker_socket(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    // Before anything else: an address over its limit costs no token check or upgrade.
    let address_slot = match state.connection_limits.address(peer.ip()) {
        Ok(slot) => slot,
        Err(limit) => {
            state.grid.metrics().connection_refused("address");
            return ApiError::RateLimited(format!(
                "{} already has {limit} worker connections, this coordinator's limit per address",
                peer.ip()
            ))
            .into_response();
        }
    };
    let header_claims = match crate::auth::bearer(&headers) {
        None => None,
        Some(token) => match state.keys.verify(token) {
            Ok(claims) => Some(claims),
            Err(err) => {
                state.grid.metrics().auth_failure();
                return ApiError::Unauthorized(err.to_string()).into_response();
            }
        },
    };
    ws.max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| async move {
            Session {
                state,
                socket,
                peer,
                slots: vec![address_slot],
            }
            .run(header_claims)
            .await;
        })
}

/// Why a connection ends early: a close code and a reason for the peer.
struct Refusal {
    code: u16,
    reason: String,
}

impl Refusal {
    fn protocol(reason: impl Into<String>) -> Refusal {
        Refusal {
            code: close_code::PROTOCOL,
            reason: reason.into(),
        }
    }

    fn policy(reason: impl Into<String>) -> Refusal {
        Refusal {
            code: close_code::POLICY,
            reason: reason.into(),
        }
    }
}

impl From<FrameError> for Refusal {
    fn from(err: FrameError) -> Refusal {
        match err {
            FrameError::TooLarge { .. } => Refusal {
                code: close_code::TOO_BIG,
                reason: err.to_string(),
            },
            other => Refusal::protocol(other.to_string()),
        }
    }
}

struct Session {
    state: AppState,
    socket: WebSocket,
    peer: std::net::SocketAddr,
    /// Places under the connection limits, given back as the worker leaves.
    slots: Vec<crate::limits::Slot>,
}

impl Session {
    async fn run(mut self, header_claims: Option<Claims>) {
        let hello = match self.hello().await {
            Ok(hello) => hello,
            Err(refusal) => return self.close(refusal).await,
        };
        let claims = match self.authorize(header_claims, &hello) {
            Ok(claims) => claims,
            Err(refusal) => {
                self.state.grid.metrics().auth_failure();
                return self.close(refusal).await;
            }
        };
        match self.state.connection_limits.subject(&claims.sub) {
            Ok(slot) => self.slots.push(slot),
            Err(limit) => {
                self.state.grid.metrics().connection_refused("subject");
                return self
                    .close(Refusal {
                        code: close_code::TRY_AGAIN_LATER,
                        reason: format!(
                            "subject {:?} already has {limit} worker connections, the limit",
                            claims.sub
                        ),
                    })
                    .await;
            }
        }
        let grid = self.state.grid.clone();
        let registered = grid.register_worker(
            hello.kind,
            claims.sub.clone(),
            hello.threads,
            hello.bench_gflops,
            hello.cache_bytes,
            hello.agent.chars().take(200).collect(),
        );
        let (worker, outbox) = match registered {
            Ok(registered) => registered,
            Err(left) => {
                tracing::warn!(subject = claims.sub, "refused a banned subject");
                return self
                    .close(Refusal::policy(format!(
                        "banned for results that failed verification; try again in {} s",
                        left.as_secs().max(1)
                    )))
                    .await;
            }
        };
        tracing::info!(
            worker,
            peer = %self.peer,
            subject = claims.sub,
            kind = hello.kind.name(),
            threads = hello.threads,
            "worker connected"
        );
        let end = self.serve(&grid, worker, outbox).await;
        grid.unregister_worker(worker);
        self.slots.clear();
        match end {
            Some(refusal) => {
                if refusal.code != close_code::GOING_AWAY {
                    grid.metrics().protocol_violation();
                }
                tracing::warn!(worker, reason = refusal.reason, "closing worker connection");
                self.close(refusal).await;
            }
            None => tracing::info!(worker, "worker disconnected"),
        }
    }

    /// Waits for the first frame, which must be a `Hello` of our protocol version.
    async fn hello(&mut self) -> Result<Hello, Refusal> {
        let frame = match tokio::time::timeout(HELLO_TIMEOUT, self.socket.recv()).await {
            Err(_) => return Err(Refusal::protocol("no Hello within 10 s")),
            Ok(None) => return Err(Refusal::protocol("closed before Hello")),
            Ok(Some(Err(err))) => return Err(socket_error(err)),
            Ok(Some(Ok(Message::Binary(bytes)))) => bytes,
            Ok(Some(Ok(_))) => return Err(Refusal::protocol("first frame must be a binary Hello")),
        };
        self.state.grid.metrics().bytes_received(frame.len());
        let hello = match protocol::decode::<ToCoordinator>(&frame)? {
            ToCoordinator::Hello(hello) => hello,
            _ => return Err(Refusal::protocol("first frame must be Hello")),
        };
        if hello.protocol != PROTOCOL_VERSION {
            return Err(Refusal::policy(format!(
                "protocol version {} is not supported; this coordinator speaks {PROTOCOL_VERSION}",
                hello.protocol
            )));
        }
        if hello.threads == 0 || hello.threads > 4096 {
            return Err(Refusal::protocol(format!(
                "Hello claims {} threads; expected 1 to 4096",
                hello.threads
            )));
        }
        Ok(hello)
    }

    fn authorize(&self, header_claims: Option<Claims>, hello: &Hello) -> Result<Claims, Refusal> {
        let claims = match (header_claims, &hello.token) {
            (Some(claims), _) => claims,
            (None, Some(token)) => self
                .state
                .keys
                .verify(token)
                .map_err(|err| Refusal::policy(format!("invalid token: {err}")))?,
            (None, None) => {
                return Err(Refusal::policy(format!(
                    "invalid token: {}",
                    TokenError::Missing
                )));
            }
        };
        match claims.role {
            Role::Volunteer | Role::Admin => Ok(claims),
            other => Err(Refusal::policy(format!(
                "role {} may not lend compute; use a volunteer token",
                other.name()
            ))),
        }
    }

    /// The connection's main loop. Returns why it must close, or `None` when the peer
    /// left by itself.
    async fn serve(
        &mut self,
        grid: &Grid,
        worker: WorkerId,
        mut outbox: tokio::sync::mpsc::UnboundedReceiver<Outbound>,
    ) -> Option<Refusal> {
        let heartbeat = self.state.config.heartbeat_secs;
        let welcome = ToWorker::Welcome(Welcome {
            worker_id: worker,
            limits: Limits {
                max_frame_bytes: MAX_FRAME_BYTES as u32,
                max_slots: MAX_SLOTS,
                heartbeat_secs: heartbeat,
            },
        });
        if self.send(protocol::encode(&welcome)).await.is_err() {
            return None;
        }
        let silence = Duration::from_secs(u64::from(heartbeat) * 3);
        let mut deadline = Instant::now() + silence;
        let mut shutdown = self.state.shutdown.clone();
        loop {
            tokio::select! {
                frame = self.socket.recv() => {
                    deadline = Instant::now() + silence;
                    match frame {
                        None | Some(Ok(Message::Close(_))) => return None,
                        // A peer that vanished (reset, killed) just left; only an
                        // oversized frame is the peer's fault.
                        Some(Err(err)) => return oversized(&err),
                        Some(Ok(Message::Binary(bytes))) => {
                            grid.metrics().bytes_received(bytes.len());
                            if let Err(refusal) = self.handle(grid, worker, &bytes).await {
                                return Some(refusal);
                            }
                        }
                        Some(Ok(Message::Text(_))) => {
                            return Some(Refusal::protocol("text frames are not part of the protocol"));
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    }
                }
                out = outbox.recv() => {
                    // Whatever else is already queued goes out in the same flush: a result
                    // often frees a slot and brings an operand and an assignment at once.
                    let mut next = out;
                    let mut fed = 0;
                    while let Some(item) = next.take() {
                        let frame = match item {
                            Outbound::Frame(frame) => protocol::encode(&frame),
                            Outbound::Operand(data) => {
                                protocol::encode_operand(data.key, data.dtype, data.rows, data.cols, &data.bytes)
                            }
                            Outbound::Close { code, reason } => {
                                let _ = self.socket.flush().await;
                                return Some(Refusal { code, reason });
                            }
                        };
                        grid.metrics().bytes_sent(frame.len());
                        if self.socket.feed(Message::Binary(frame.into())).await.is_err() {
                            return None;
                        }
                        fed += 1;
                        if fed < 64 {
                            next = outbox.try_recv().ok();
                        }
                    }
                    if fed == 0 {
                        return None;
                    }
                    if self.socket.flush().await.is_err() {
                        return None;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Some(Refusal::protocol(format!(
                        "no frame for {} s (heartbeat every {heartbeat} s expected)",
                        silence.as_secs()
                    )));
                }
                _ = stopped(&mut shutdown) => {
                    return Some(Refusal { code: close_code::GOING_AWAY, reason: "coordinator shutting down".into() });
                }
            }
        }
    }

    async fn handle(&mut self, grid: &Grid, worker: WorkerId, frame: &[u8]) -> Result<(), Refusal> {
        let violation = |v: crate::scheduler::Violation| Refusal::protocol(v.to_string());
        match protocol::decode::<ToCoordinator>(frame)? {
            ToCoordinator::Hello(_) => Err(Refusal::protocol("Hello sent twice")),
            ToCoordinator::Ready { slots } => grid.ready(worker, slots).map_err(violation),
            ToCoordinator::Heartbeat => Ok(()),
            ToCoordinator::Failed { lease, reason } => {
                let reason: String = reason.chars().take(200).collect();
                grid.failed(worker, lease, &reason).map_err(violation)
            }
            ToCoordinator::Result(result) => {
                let (result, checksum_ok, verdict) = match grid.check_inputs(worker, result.lease) {
                    Some(inputs) => verify_result(inputs, result).await,
                    None => {
                        let ok = protocol::checksum(&result.payload) == result.checksum;
                        (result, ok, None)
                    }
                };
                grid.result(worker, result, checksum_ok, verdict)
                    .map_err(|err| match err {
                        ResultError::Violation(v) => violation(v),
                        ResultError::Banned { .. } => Refusal::policy(err.to_string()),
                        other => Refusal::protocol(other.to_string()),
                    })
            }
        }
    }

    async fn send(&mut self, frame: Vec<u8>) -> Result<(), axum::Error> {
        self.state.grid.metrics().bytes_sent(frame.len());
        self.socket.send(Message::Binary(frame.into())).await
    }

    /// Tells the peer why (a `Close` frame of the protocol and a WebSocket close with the
    /// same reason), then drops the connection.
    async fn close(mut self, refusal: Refusal) {
        let reason: String = refusal.reason.chars().take(120).collect();
        let _ = self
            .socket
            .send(Message::Binary(
                protocol::encode(&ToWorker::Close {
                    reason: reason.clone(),
                })
                .into(),
            ))
            .await;
        let _ = self
            .socket
            .send(Message::Close(Some(CloseFrame {
                code: refusal.code,
                reason: reason.into(),
            })))
            .await;
    }
}

/// A result's checksum and Freivalds' check, in one pass over it (see
/// [`CheckInputs::verify`]); on a blocking thread when it is big enough to hold up this
/// socket's other frames (the result goes there and back, not copied). A result of the
/// wrong size is only hashed, and left for `Grid::result` to refuse.
async fn verify_result(
    inputs: CheckInputs,
    result: TileResult,
) -> (TileResult, bool, Option<Result<(), verify::Mismatch>>) {
    if result.payload.len() != inputs.expected {
        let ok = protocol::checksum(&result.payload) == result.checksum;
        return (result, ok, None);
    }
    if inputs.cost() < INLINE_CHECK_COST {
        let (ok, verdict) = inputs.verify(&result.payload, result.checksum);
        return (result, ok, verdict);
    }
    let lease = result.lease;
    let failed = || verify::Mismatch {
        row: 0,
        got: f64::NAN,
        want: f64::NAN,
        tolerance: f64::NAN,
    };
    let checked = tokio::task::spawn_blocking(move || {
        let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            inputs.verify(&result.payload, result.checksum)
        }));
        (result, verdict)
    })
    .await;
    match checked {
        Ok((result, Ok((ok, verdict)))) => (result, ok, verdict),
        // Never accepted unchecked: the tile is computed again.
        Ok((result, Err(_))) => {
            tracing::error!(lease, "the check of a result panicked");
            (result, true, Some(Err(failed())))
        }
        // Only when the runtime shuts down, and the connection with it.
        Err(err) => {
            tracing::error!(error = %err, lease, "the check of a result did not run");
            let result = TileResult {
                lease,
                checksum: 0,
                compute_micros: 0,
                payload: Vec::new(),
            };
            (result, true, Some(Err(failed())))
        }
    }
}

/// Multiply-adds below which a check runs on the socket task (tens of microseconds).
const INLINE_CHECK_COST: usize = 1 << 16;

/// Resolves once the coordinator starts shutting down.
async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    // An error means the sender is gone, which also means shutdown.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

fn oversized(err: &axum::Error) -> Option<Refusal> {
    let text = err.to_string();
    (text.contains("too long") || text.contains("too big") || text.contains("Space limit")).then(
        || Refusal {
            code: close_code::TOO_BIG,
            reason: format!("frame over the limit of {MAX_FRAME_BYTES} bytes"),
        },
    )
}

fn socket_error(err: axum::Error) -> Refusal {
    oversized(&err).unwrap_or_else(|| Refusal::protocol(format!("websocket error: {err}")))
}
