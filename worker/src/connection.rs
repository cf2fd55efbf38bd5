//! The socket loop: dial a coordinator, say `Hello`, carry out what the [`Session`] asks
//! for until the connection ends, and dial again — with backoff, failing over across the
//! coordinator list — until shut down or refused for good.
//!
//! Everything that decides *what* to do lives in `session`; this module only moves frames,
//! keeps time (heartbeats, silence, timeouts) and interprets how connections end.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rayon::ThreadPool;
use tabgrid_shared::protocol::{
    self, Hello, MAX_FRAME_BYTES, MAX_SLOTS, ToCoordinator, ToWorker, Welcome,
};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::{Instant, MissedTickBehavior, sleep_until, timeout, timeout_at};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async_with_config};
use tracing::{Instrument, debug, info, info_span, warn};

use tabgrid_shared::worker::{Backoff, Command, Computed, Session};

use crate::chaos::{self, Chaos, Fault};
use crate::compute;
use crate::{WorkerError, endpoint};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Reason sent with the Close frame when the worker stops; the coordinator returns the
/// worker's leases at once.
pub const SHUTDOWN_REASON: &str = "worker shutting down";

/// Longest wait for TCP connect plus the WebSocket upgrade.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for `Welcome` after `Hello`.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the other side's part of a closing handshake.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// A close reason must fit a control frame (125 bytes) with its 2-byte code.
const MAX_CLOSE_REASON: usize = 123;

/// What stays the same across reconnects.
pub struct Worker {
    /// Normalised WebSocket URLs, tried in order.
    pub endpoints: Vec<String>,
    /// `Authorization: Bearer …`, marked sensitive.
    pub auth: Option<HeaderValue>,
    /// Sent as is on every connection; carries the startup speed measurement.
    pub hello: Hello,
    pub slots: u32,
    pub cache_bytes: u64,
    /// Built once: every connection computes on the same threads.
    pub pool: ThreadPool,
    /// Fault injection for testing (`--chaos`).
    pub chaos: Chaos,
}

/// How one connection ended.
#[derive(Debug, PartialEq)]
enum Ended {
    /// The shutdown future resolved; the Close frame is sent.
    Shutdown,
    /// The coordinator refused this worker for good (bad token, protocol version).
    Refused(String),
    /// Anything else: reconnect. `welcomed` resets the backoff.
    Lost { welcomed: bool, reason: String },
}

fn lost(welcomed: bool, reason: impl Into<String>) -> Ended {
    Ended::Lost {
        welcomed,
        reason: reason.into(),
    }
}

/// Serves coordinators until `shutdown` resolves or one refuses this worker.
pub async fn run<F: Future<Output = ()>>(worker: Worker, shutdown: F) -> Result<(), WorkerError> {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut backoff = Backoff::default();
    for url in worker.endpoints.iter().cycle() {
        info!(%url, "connecting to coordinator");
        match worker.connect(url, shutdown.as_mut()).await {
            Ended::Shutdown => return Ok(()),
            Ended::Refused(reason) => {
                warn!(%url, %reason, "coordinator refused this worker");
                return Err(WorkerError::Refused { reason });
            }
            Ended::Lost { welcomed, reason } => {
                if welcomed {
                    backoff.reset();
                }
                let delay = backoff.next_delay(rand::random());
                warn!(
                    %url,
                    %reason,
                    retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "connection to coordinator ended; reconnecting"
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.as_mut() => return Ok(()),
                }
            }
        }
    }
    // Only reachable with no endpoints, which `crate::run` refuses before getting here.
    Err(WorkerError::NoCoordinator)
}

impl Worker {
    /// One connection: dial, handshake, serve.
    async fn connect<F: Future<Output = ()>>(&self, url: &str, mut shutdown: Pin<&mut F>) -> Ended {
        let request = match endpoint::request(url, self.auth.as_ref()) {
            Ok(request) => request,
            Err(err) => return lost(false, err.to_string()),
        };
        // Tiles and panels are cut to fit MAX_FRAME_BYTES; tungstenite's defaults are smaller.
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_FRAME_BYTES))
            .max_frame_size(Some(MAX_FRAME_BYTES));
        // Nagle off: `Ready` and `Heartbeat` are tiny and should not wait for company.
        let dial = timeout(
            CONNECT_TIMEOUT,
            connect_async_with_config(request, Some(config), true),
        );
        let mut socket = tokio::select! {
            dialled = dial => match dialled {
                Ok(Ok((socket, _response))) => socket,
                Ok(Err(err)) => return dial_failed(err),
                Err(_) => return lost(false, format!("no connection within {CONNECT_TIMEOUT:?}")),
            },
            () = shutdown.as_mut() => return Ended::Shutdown,
        };
        let welcome = match handshake(&mut socket, &self.hello, shutdown.as_mut()).await {
            Ok(welcome) => welcome,
            Err(ended) => return ended,
        };
        let span = info_span!("session", worker_id = welcome.worker_id);
        self.serve(&mut socket, welcome, shutdown)
            .instrument(span)
            .await
    }

    /// The connection after `Welcome`.
    async fn serve<F: Future<Output = ()>>(
        &self,
        socket: &mut Socket,
        welcome: Welcome,
        mut shutdown: Pin<&mut F>,
    ) -> Ended {
        let limits = welcome.limits;
        let slots = self.slots.min(limits.max_slots).clamp(1, MAX_SLOTS);
        let every = Duration::from_secs(limits.heartbeat_secs.max(1).into());
        let silence = every * 3;
        info!(slots, heartbeat_secs = every.as_secs(), "connected");

        let mut session = Session::new(self.cache_bytes, slots);
        // The tile on the pool, if any; the session starts at most one at a time.
        let mut computing: Option<oneshot::Receiver<Computed>> = None;
        let mut heartbeat = tokio::time::interval_at(Instant::now() + every, every);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();

        let start = session.start();
        if let Err(ended) = self.execute(socket, &mut computing, start).await {
            return ended;
        }
        loop {
            let commands = tokio::select! {
                () = shutdown.as_mut() => {
                    close(socket, CloseCode::Normal, SHUTDOWN_REASON).await;
                    return Ended::Shutdown;
                }
                message = socket.next() => {
                    last_heard = Instant::now();
                    match message {
                        None => return lost(true, "connection ended without a close frame"),
                        Some(Err(err)) => return lost(true, err.to_string()),
                        Some(Ok(message)) => match incoming(message) {
                            Incoming::Frame(ToWorker::Close { reason }) => {
                                return await_close(socket, reason, true).await;
                            }
                            Incoming::Frame(frame) => session.handle(frame),
                            Incoming::Closed(frame) => {
                                finish(socket).await;
                                return closed_by_coordinator(frame, None, true);
                            }
                            Incoming::Violation(reason) => {
                                return violation(socket, reason, true).await;
                            }
                            Incoming::Control => continue,
                        },
                    }
                }
                done = finished(&mut computing) => {
                    computing = None;
                    match done {
                        // Fault injection (`--chaos`): between the kernel and the session,
                        // so a faulty result takes the same path as a real one.
                        Ok(mut done) => {
                            match self.chaos.pick(rand::random()) {
                                Some(Fault::Wrong) => {
                                    warn!(lease = done.lease, "chaos: sending a wrong result");
                                    chaos::corrupt(&mut done, &mut rand::rng());
                                }
                                Some(Fault::Slow) => {
                                    warn!(lease = done.lease, "chaos: holding the result back");
                                    tokio::time::sleep(chaos::SLOW_DELAY).await;
                                }
                                Some(Fault::Drop) => {
                                    warn!(lease = done.lease, "chaos: dropping the connection mid-tile");
                                    return lost(true, "chaos: dropped the connection mid-tile");
                                }
                                Some(Fault::Garbage) => {
                                    warn!(lease = done.lease, "chaos: sending garbage");
                                    let garbage = Message::binary(vec![0xff; 32]);
                                    if let Err(err) = socket.send(garbage).await {
                                        return lost(true, format!("cannot send: {err}"));
                                    }
                                }
                                None => {}
                            }
                            session.computed(done)
                        }
                        // compute::spawn catches panics, so the sender is never dropped
                        // unsent; if it were, the lease is lost and a fresh start is safest.
                        Err(_) => return lost(true, "the compute pool lost a tile"),
                    }
                }
                _ = heartbeat.tick() => {
                    debug!(
                        leases = ?session.leases(),
                        credits = session.credits(),
                        cached_panels = session.cache().len(),
                        cached_bytes = session.cache().bytes(),
                        "heartbeat"
                    );
                    // The Ping's Pong proves the coordinator still reads, so an idle but
                    // healthy coordinator is never mistaken for a silent one.
                    let beat = send(socket, &ToCoordinator::Heartbeat).await;
                    let ping = socket.send(Message::Ping(Default::default())).await;
                    if let Err(err) = beat.and(ping) {
                        return lost(true, format!("cannot send heartbeat: {err}"));
                    }
                    continue;
                }
                () = sleep_until(last_heard + silence) => {
                    // A dead coordinator would not answer a close handshake either.
                    return lost(true, format!("nothing heard from the coordinator for {silence:?}"));
                }
            };
            if let Err(ended) = self.execute(socket, &mut computing, commands).await {
                return ended;
            }
        }
    }

    /// Carries out the session's commands in order.
    async fn execute(
        &self,
        socket: &mut Socket,
        computing: &mut Option<oneshot::Receiver<Computed>>,
        commands: Vec<Command>,
    ) -> Result<(), Ended> {
        // Frames of one step (a result and the freed slot) leave in one flush.
        let mut fed = false;
        for command in commands {
            match command {
                Command::Send(frame) => {
                    let message = Message::binary(protocol::encode(&frame));
                    if let Err(err) = socket.feed(message).await {
                        return Err(lost(true, format!("cannot send: {err}")));
                    }
                    fed = true;
                }
                Command::Compute(task) => {
                    debug!(
                        lease = task.lease,
                        m = task.m,
                        n = task.n,
                        k = task.k,
                        "computing"
                    );
                    *computing = Some(compute::spawn(&self.pool, task));
                }
                Command::Close(reason) => return Err(violation(socket, reason, true).await),
            }
        }
        if fed && let Err(err) = socket.flush().await {
            return Err(lost(true, format!("cannot send: {err}")));
        }
        Ok(())
    }
}

/// Sends `Hello` and waits for `Welcome`.
async fn handshake<F: Future<Output = ()>>(
    socket: &mut Socket,
    hello: &Hello,
    mut shutdown: Pin<&mut F>,
) -> Result<Welcome, Ended> {
    if let Err(err) = send(socket, &ToCoordinator::Hello(hello.clone())).await {
        return Err(lost(false, format!("cannot send Hello: {err}")));
    }
    let deadline = Instant::now() + WELCOME_TIMEOUT;
    loop {
        let message = tokio::select! {
            message = timeout_at(deadline, socket.next()) => message,
            () = shutdown.as_mut() => {
                close(socket, CloseCode::Normal, SHUTDOWN_REASON).await;
                return Err(Ended::Shutdown);
            }
        };
        let message = match message {
            Err(_) => {
                return Err(lost(
                    false,
                    format!("no Welcome within {WELCOME_TIMEOUT:?}"),
                ));
            }
            Ok(None) => return Err(lost(false, "connection ended before Welcome")),
            Ok(Some(Err(err))) => return Err(lost(false, err.to_string())),
            Ok(Some(Ok(message))) => message,
        };
        let ended = match incoming(message) {
            Incoming::Frame(ToWorker::Welcome(welcome)) => return Ok(welcome),
            Incoming::Frame(ToWorker::Close { reason }) => await_close(socket, reason, false).await,
            Incoming::Frame(other) => {
                let reason = format!("expected Welcome, got {}", frame_name(&other));
                violation(socket, reason, false).await
            }
            Incoming::Closed(frame) => {
                finish(socket).await;
                closed_by_coordinator(frame, None, false)
            }
            Incoming::Violation(reason) => violation(socket, reason, false).await,
            Incoming::Control => continue,
        };
        return Err(ended);
    }
}

/// A WebSocket message, sorted by what the loop does with it.
#[derive(Debug)]
enum Incoming {
    Frame(ToWorker),
    /// The coordinator closed the WebSocket.
    Closed(Option<CloseFrame>),
    /// Not part of the protocol: close the connection with this reason.
    Violation(String),
    /// Ping or pong: answered by tungstenite, counts only as a sign of life.
    Control,
}

fn incoming(message: Message) -> Incoming {
    match message {
        Message::Binary(bytes) => match protocol::decode::<ToWorker>(&bytes) {
            Ok(frame) => Incoming::Frame(frame),
            Err(err) => Incoming::Violation(err.to_string()),
        },
        Message::Text(_) => Incoming::Violation("text frames are not part of the protocol".into()),
        Message::Close(frame) => Incoming::Closed(frame),
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Incoming::Control,
    }
}

/// The variant name of a frame, for messages (never its contents).
fn frame_name(frame: &ToWorker) -> &'static str {
    match frame {
        ToWorker::Welcome(_) => "Welcome",
        ToWorker::Operand(_) => "Operand",
        ToWorker::Forget { .. } => "Forget",
        ToWorker::Assign(_) => "Assign",
        ToWorker::Cancel { .. } => "Cancel",
        ToWorker::Close { .. } => "Close",
    }
}

/// How a close by the coordinator ends the connection: code 1008 (policy) is its
/// permanent refusal — bad token, protocol version — and anything else is worth a retry.
/// `told` is the reason from a `Close` frame of the protocol, fuller than the
/// WebSocket's 123 bytes.
fn closed_by_coordinator(frame: Option<CloseFrame>, told: Option<String>, welcomed: bool) -> Ended {
    let code = frame.as_ref().map(|frame| frame.code);
    let reason = told
        .or_else(|| {
            frame
                .as_ref()
                .map(|frame| frame.reason.as_str().to_owned())
                .filter(|reason| !reason.is_empty())
        })
        .unwrap_or_else(|| match code {
            Some(code) => format!("closed by the coordinator with code {}", u16::from(code)),
            None => "closed by the coordinator".to_owned(),
        });
    if code == Some(CloseCode::Policy) {
        Ended::Refused(reason)
    } else {
        lost(welcomed, reason)
    }
}

/// The upgrade failed. 401 and 403 are refusals of the token: retrying cannot help.
fn dial_failed(err: WsError) -> Ended {
    let WsError::Http(response) = &err else {
        return lost(false, err.to_string());
    };
    let status = response.status();
    let body = response
        .body()
        .as_deref()
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let reason = format!("HTTP {status}: {}", truncate(body.trim(), 200));
    if status.as_u16() == 401 || status.as_u16() == 403 {
        Ended::Refused(reason)
    } else {
        lost(false, reason)
    }
}

/// The coordinator sent `Close{reason}`: wait briefly for the WebSocket close, whose code
/// tells a refusal from a goodbye.
async fn await_close(socket: &mut Socket, reason: String, welcomed: bool) -> Ended {
    info!(%reason, "coordinator is closing the connection");
    let frame = timeout(CLOSE_TIMEOUT, async {
        while let Some(Ok(message)) = socket.next().await {
            if let Message::Close(frame) = message {
                return Some(frame);
            }
        }
        None
    })
    .await;
    match frame {
        Ok(Some(frame)) => {
            finish(socket).await;
            closed_by_coordinator(frame, Some(reason), welcomed)
        }
        _ => lost(welcomed, reason),
    }
}

/// Closes because the coordinator broke the protocol.
async fn violation(socket: &mut Socket, reason: String, welcomed: bool) -> Ended {
    warn!(%reason, "closing the connection: the coordinator broke the protocol");
    close(socket, CloseCode::Protocol, &reason).await;
    lost(welcomed, reason)
}

async fn send(socket: &mut Socket, frame: &ToCoordinator) -> Result<(), WsError> {
    socket.send(Message::binary(protocol::encode(frame))).await
}

/// Starts the closing handshake and waits (briefly) for the coordinator's reply, so the
/// coordinator sees a clean close with our reason rather than a reset.
async fn close(socket: &mut Socket, code: CloseCode, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: truncate(reason, MAX_CLOSE_REASON).into(),
    };
    let _ = timeout(CLOSE_TIMEOUT, async {
        if socket.close(Some(frame)).await.is_ok() {
            // The handshake is complete with the reply; waiting on for the server to drop
            // TCP would only delay the reconnect.
            while let Some(Ok(message)) = socket.next().await {
                if let Message::Close(_) = message {
                    break;
                }
            }
        }
    })
    .await;
}

/// After the coordinator's Close: send tungstenite's queued reply, which completes the
/// closing handshake.
async fn finish(socket: &mut Socket) {
    let _ = timeout(CLOSE_TIMEOUT, socket.flush()).await;
}

/// Resolves when the computing tile is done; never while none is.
async fn finished(
    computing: &mut Option<oneshot::Receiver<Computed>>,
) -> Result<Computed, oneshot::error::RecvError> {
    match computing {
        Some(result) => result.await,
        None => std::future::pending().await,
    }
}

/// The longest prefix of `text` of at most `max` bytes that ends on a char boundary.
fn truncate(text: &str, max: usize) -> &str {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use tabgrid_shared::protocol::encode;

    use super::*;

    fn close_frame(code: CloseCode, reason: &str) -> Option<CloseFrame> {
        Some(CloseFrame {
            code,
            reason: reason.into(),
        })
    }

    #[test]
    fn policy_closes_are_permanent_refusals() {
        assert_eq!(
            closed_by_coordinator(close_frame(CloseCode::Policy, "invalid token"), None, false),
            Ended::Refused("invalid token".into())
        );
        // The protocol-level reason is fuller than the WebSocket's.
        assert_eq!(
            closed_by_coordinator(
                close_frame(CloseCode::Policy, "protocol"),
                Some("protocol version 1 refused; this coordinator speaks 2".into()),
                false
            ),
            Ended::Refused("protocol version 1 refused; this coordinator speaks 2".into())
        );
    }

    #[test]
    fn other_closes_are_retried() {
        assert_eq!(
            closed_by_coordinator(close_frame(CloseCode::Away, "restarting"), None, true),
            lost(true, "restarting")
        );
        assert_eq!(
            closed_by_coordinator(close_frame(CloseCode::Normal, ""), None, false),
            lost(false, "closed by the coordinator with code 1000")
        );
        assert_eq!(
            closed_by_coordinator(None, None, true),
            lost(true, "closed by the coordinator")
        );
    }

    #[test]
    fn incoming_messages_are_sorted_without_panicking() {
        let cancel = Message::binary(encode(&ToWorker::Cancel { lease: 3 }));
        assert!(matches!(
            incoming(cancel),
            Incoming::Frame(ToWorker::Cancel { lease: 3 })
        ));
        assert!(matches!(
            incoming(Message::binary(vec![0xff, 0x01])),
            Incoming::Violation(_)
        ));
        assert!(matches!(
            incoming(Message::binary(Vec::new())),
            Incoming::Violation(_)
        ));
        assert!(matches!(
            incoming(Message::text("hello")),
            Incoming::Violation(_)
        ));
        assert!(matches!(
            incoming(Message::Ping(Default::default())),
            Incoming::Control
        ));
        assert!(matches!(
            incoming(Message::Close(None)),
            Incoming::Closed(None)
        ));
    }

    #[test]
    fn close_reasons_are_cut_on_char_boundaries() {
        assert_eq!(truncate("short", MAX_CLOSE_REASON), "short");
        let long = "é".repeat(100); // 200 bytes
        let cut = truncate(&long, MAX_CLOSE_REASON);
        assert_eq!(cut.len(), 122);
        assert!(long.starts_with(cut));
    }
}
