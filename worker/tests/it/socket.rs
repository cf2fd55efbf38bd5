//! The socket loop: handshake, a tile end to end, refusals, reconnects, shutdown.

use tabgrid_shared::Dtype;
use tabgrid_shared::matrix::{f64_bytes, f64s};
use tabgrid_shared::protocol::{
    Assign, Operand, OperandKey, PROTOCOL_VERSION, ToCoordinator, ToWorker, WorkerKind, checksum,
};
use tabgrid_worker::{SHUTDOWN_REASON, WorkerConfig, WorkerError, run};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::fake::{Fake, STEP};

/// A running worker and the switch that stops it.
struct Worker {
    task: JoinHandle<anyhow::Result<()>>,
    stop: oneshot::Sender<()>,
}

fn start(coordinators: Vec<String>) -> Worker {
    let config = WorkerConfig::new(coordinators, Some("volunteer-token".into()), 1);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(run(config, async {
        let _ = stopped.await;
    }));
    Worker { task, stop }
}

impl Worker {
    async fn result(self) -> anyhow::Result<()> {
        timeout(STEP, self.task)
            .await
            .expect("run returns")
            .unwrap()
    }
}

fn operand(rows: u32, cols: u32, values: &[f64]) -> Operand {
    let bytes = f64_bytes(values);
    Operand {
        key: OperandKey::of(Dtype::F64, rows, cols, &bytes),
        dtype: Dtype::F64,
        rows,
        cols,
        bytes,
    }
}

fn refusal(result: anyhow::Result<()>) -> String {
    match result.unwrap_err().downcast::<WorkerError>() {
        Ok(WorkerError::Refused { reason }) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn computes_a_tile_and_closes_cleanly_on_shutdown() {
    let fake = Fake::start().await;
    let worker = start(vec![fake.url.clone()]);
    let mut conn = fake.accept().await;
    assert_eq!(conn.path, "/api/v1/worker");
    assert_eq!(
        conn.authorization.as_deref(),
        Some("Bearer volunteer-token")
    );

    let hello = conn.welcome(30).await;
    assert_eq!(hello.protocol, PROTOCOL_VERSION);
    assert_eq!(hello.kind, WorkerKind::Native);
    assert_eq!(hello.threads, 1);
    assert_eq!(hello.token.as_deref(), Some("volunteer-token"));
    assert!(hello.agent.starts_with("tabgrid-worker/"));
    assert!(hello.bench_gflops > 0.0);

    let a = operand(2, 3, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let b = operand(3, 2, &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
    let assign = Assign {
        lease: 41,
        job: "job".into(),
        tile: (0, 0),
        dtype: Dtype::F64,
        m: 2,
        n: 2,
        k: 3,
        alpha: 2.0,
        beta: 0.0,
        a: a.key,
        b: b.key,
        c: None,
        deadline_ms: 10_000,
    };
    conn.send(&ToWorker::Operand(a)).await;
    conn.send(&ToWorker::Operand(b)).await;
    conn.send(&ToWorker::Assign(assign)).await;
    let ToCoordinator::Result(result) = conn.recv().await else {
        panic!("expected the tile");
    };
    assert_eq!(result.lease, 41);
    assert_eq!(result.checksum, checksum(&result.payload));
    assert_eq!(f64s(&result.payload), [8.0, 10.0, 20.0, 22.0]);
    assert_eq!(conn.recv().await, ToCoordinator::Ready { slots: 1 });

    worker.stop.send(()).unwrap();
    let frame = conn.closed().await.expect("a close frame with a reason");
    assert_eq!(frame.code, CloseCode::Normal);
    assert_eq!(frame.reason.as_str(), SHUTDOWN_REASON);
    timeout(STEP, worker.task).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn a_policy_close_is_a_permanent_refusal_with_the_coordinators_reason() {
    let fake = Fake::start().await;
    let worker = start(vec![fake.url.clone()]);
    let mut conn = fake.accept().await;
    assert!(matches!(conn.recv().await, ToCoordinator::Hello(_)));
    let reason = "protocol version 1 is not spoken here".to_owned();
    conn.send(&ToWorker::Close {
        reason: reason.clone(),
    })
    .await;
    conn.close(CloseFrame {
        code: CloseCode::Policy,
        reason: "refused".into(),
    })
    .await;
    assert_eq!(refusal(worker.result().await), reason);
}

#[tokio::test]
async fn an_unauthorized_upgrade_is_a_permanent_refusal() {
    let fake = Fake::start().await;
    let worker = start(vec![fake.url.clone()]);
    fake.refuse_upgrade(StatusCode::UNAUTHORIZED, "invalid token")
        .await;
    let reason = refusal(worker.result().await);
    assert!(
        reason.contains("401") && reason.contains("invalid token"),
        "{reason}"
    );
}

#[tokio::test]
async fn fails_over_past_a_dead_coordinator_and_reconnects_after_a_close() {
    // A port nobody listens on: bound, then released.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("ws://{}", dead.local_addr().unwrap());
    drop(dead);
    let fake = Fake::start().await;
    let worker = start(vec![dead_url, fake.url.clone()]);

    let mut conn = fake.accept().await;
    conn.welcome(30).await;
    conn.close(CloseFrame {
        code: CloseCode::Away,
        reason: "coordinator restarting".into(),
    })
    .await;

    // Back through the dead one, then here again.
    let mut conn = fake.accept().await;
    conn.welcome(30).await;
    worker.stop.send(()).unwrap();
    assert_eq!(conn.closed().await.unwrap().code, CloseCode::Normal);
    timeout(STEP, worker.task).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn an_undecodable_frame_closes_with_a_reason_and_reconnects() {
    let fake = Fake::start().await;
    let worker = start(vec![fake.url.clone()]);
    let mut conn = fake.accept().await;
    conn.welcome(30).await;
    conn.send_raw(vec![0xff, 0xff, 0xff]).await;
    let frame = conn.closed().await.unwrap();
    assert_eq!(frame.code, CloseCode::Protocol);
    assert!(
        frame.reason.as_str().contains("does not decode"),
        "{frame:?}"
    );

    let mut conn = fake.accept().await;
    conn.welcome(30).await;
    worker.stop.send(()).unwrap();
    conn.closed().await;
    timeout(STEP, worker.task).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn heartbeats_flow_and_a_silent_coordinator_is_left() {
    let fake = Fake::start().await;
    let worker = start(vec![fake.url.clone()]);
    let mut conn = fake.accept().await;
    conn.welcome(1).await;
    assert_eq!(conn.recv().await, ToCoordinator::Heartbeat);
    // Stop reading: no pong answers the worker's pings, so after 3 s of silence it must
    // give up on this connection and dial again.
    let _silent = conn;
    let mut conn = fake.accept().await;
    conn.welcome(30).await;
    worker.stop.send(()).unwrap();
    conn.closed().await;
    timeout(STEP, worker.task).await.unwrap().unwrap().unwrap();
}
