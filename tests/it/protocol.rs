//! Raw WebSocket peers that break the protocol are closed with a reason; the coordinator
//! stays healthy and real workers and jobs carry on.

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tabgrid_shared::claims::Role;
use tabgrid_shared::protocol::{
    self, Hello, PROTOCOL_VERSION, TileResult, ToCoordinator, ToWorker, WorkerKind,
};
use tabgrid_tests::*;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn hello(token: Option<String>, version: u16) -> Vec<u8> {
    protocol::encode(&ToCoordinator::Hello(Hello {
        protocol: version,
        kind: WorkerKind::Native,
        threads: 1,
        features: vec![],
        bench_gflops: 1.0,
        cache_bytes: 1 << 30,
        token,
        agent: "raw-test-peer".into(),
    }))
}

async fn connect(c: &Coordinator) -> Socket {
    let config = WebSocketConfig::default()
        .max_message_size(Some(1 << 30))
        .max_frame_size(Some(1 << 30));
    let (socket, _) = tokio_tungstenite::connect_async_with_config(c.ws_url(), Some(config), false)
        .await
        .unwrap();
    socket
}

/// Connects and completes the handshake as a volunteer.
async fn join(c: &Coordinator, name: &str) -> Socket {
    let mut socket = connect(c).await;
    socket
        .send(Message::binary(hello(
            Some(token(name, Role::Volunteer)),
            PROTOCOL_VERSION,
        )))
        .await
        .unwrap();
    match next_frame(&mut socket).await {
        Some(ToWorker::Welcome(_)) => socket,
        other => panic!("expected Welcome, got {other:?}"),
    }
}

/// The next protocol frame, or None when the connection closed.
async fn next_frame(socket: &mut Socket) -> Option<ToWorker> {
    loop {
        match socket.next().await? {
            Ok(Message::Binary(bytes)) => return Some(protocol::decode(&bytes).unwrap()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// Reads until the coordinator closes; returns the WebSocket close code and reason.
async fn closed(socket: &mut Socket) -> (u16, String) {
    let wait = async {
        let mut reason = String::new();
        while let Some(message) = socket.next().await {
            match message {
                Ok(Message::Binary(bytes)) => {
                    if let Ok(ToWorker::Close { reason: r }) = protocol::decode(&bytes) {
                        reason = r;
                    }
                }
                Ok(Message::Close(Some(frame))) => {
                    return (u16::from(frame.code), frame.reason.to_string());
                }
                Ok(Message::Close(None)) => return (0, reason),
                Ok(_) => {}
                Err(_) => return (0, reason),
            }
        }
        (0, reason)
    };
    tokio::time::timeout(EVENT_TIMEOUT, wait)
        .await
        .expect("timed out waiting for the close")
}

async fn submit(
    c: &Coordinator,
    bearer: &str,
    m: usize,
    k: usize,
    n: usize,
) -> (String, Vec<f64>, Vec<f64>) {
    let a = random_matrix(m, k, 3);
    let b = random_matrix(k, n, 4);
    let body = json!({"op": "gemm", "dtype": "f64", "a": {"shape": [m, k], "data": a}, "b": {"shape": [k, n], "data": b}});
    let (_, reply) = c.post_json("/jobs", bearer, &body).await;
    (reply["id"].as_str().unwrap().to_owned(), a, b)
}

#[tokio::test]
async fn bad_peers_are_closed_with_a_reason_and_harm_no_one() {
    let c = Coordinator::start(&[]).await;
    let t = token("ada", Role::Submitter);

    // Refused at the handshake: bad token, wrong version, no Hello first.
    let mut s = connect(&c).await;
    s.send(Message::binary(hello(
        Some(token_with("x", Role::Volunteer, now() + 60, "wrong")),
        PROTOCOL_VERSION,
    )))
    .await
    .unwrap();
    let (code, reason) = closed(&mut s).await;
    assert_eq!(code, 1008);
    assert!(reason.contains("invalid token"), "{reason}");

    let mut s = connect(&c).await;
    s.send(Message::binary(hello(
        Some(token("x", Role::Volunteer)),
        999,
    )))
    .await
    .unwrap();
    let (code, reason) = closed(&mut s).await;
    assert_eq!(code, 1008);
    assert!(reason.contains("protocol version 999"), "{reason}");

    let mut s = connect(&c).await;
    s.send(Message::binary(hello(
        Some(token("x", Role::Submitter)),
        PROTOCOL_VERSION,
    )))
    .await
    .unwrap();
    let (code, reason) = closed(&mut s).await;
    assert_eq!(code, 1008);
    assert!(reason.contains("submitter"), "{reason}");

    // After the handshake: garbage, text, oversized, Ready abuse.
    let mut s = join(&c, "garbage").await;
    s.send(Message::binary(vec![0xff, 0xfe, 0x01]))
        .await
        .unwrap();
    let (code, reason) = closed(&mut s).await;
    assert_eq!(code, 1002);
    assert!(reason.contains("does not decode"), "{reason}");

    let mut s = join(&c, "text").await;
    s.send(Message::text("hello")).await.unwrap();
    let (code, reason) = closed(&mut s).await;
    assert_eq!(code, 1002);
    assert!(reason.contains("text frames"), "{reason}");

    let mut s = join(&c, "huge").await;
    let _ = s
        .send(Message::binary(vec![0u8; protocol::MAX_FRAME_BYTES + 1]))
        .await;
    let (code, _) = closed(&mut s).await;
    assert!(
        code == 1009 || code == 0,
        "oversized frame closes the connection (code {code})"
    );

    let mut s = join(&c, "greedy").await;
    s.send(Message::binary(protocol::encode(&ToCoordinator::Ready {
        slots: 1000,
    })))
    .await
    .unwrap();
    let (code, reason) = closed(&mut s).await;
    assert_eq!(code, 1002);
    assert!(reason.contains("over the limit"), "{reason}");

    // Results for leases that are not the peer's: never issued, or another worker's.
    let mut s = join(&c, "liar").await;
    let forged = TileResult {
        lease: 424_242,
        checksum: protocol::checksum(&[]),
        compute_micros: 1,
        payload: vec![],
    };
    s.send(Message::binary(protocol::encode(&ToCoordinator::Result(
        forged,
    ))))
    .await
    .unwrap();
    let (code, reason) = closed(&mut s).await;
    assert_eq!(code, 1002);
    assert!(
        reason.contains("lease 424242 was never given to this worker"),
        "{reason}"
    );

    let (id, _, _) = submit(&c, &t, 8, 8, 8).await;
    let mut holder = join(&c, "holder").await;
    holder
        .send(Message::binary(protocol::encode(&ToCoordinator::Ready {
            slots: 1,
        })))
        .await
        .unwrap();
    let assign = loop {
        match next_frame(&mut holder).await.expect("assignment") {
            ToWorker::Assign(assign) => break assign,
            _ => continue,
        }
    };
    assert_eq!(assign.job, id);
    let mut thief = join(&c, "thief").await;
    let payload = vec![0u8; 8 * 8 * 8];
    let stolen = TileResult {
        lease: assign.lease,
        checksum: protocol::checksum(&payload),
        compute_micros: 1,
        payload,
    };
    thief
        .send(Message::binary(protocol::encode(&ToCoordinator::Result(
            stolen,
        ))))
        .await
        .unwrap();
    let (code, reason) = closed(&mut thief).await;
    assert_eq!(code, 1002);
    assert!(reason.contains("never given to this worker"), "{reason}");

    // The rightful holder sends a result of the wrong size.
    let short = vec![0u8; 7];
    let wrong = TileResult {
        lease: assign.lease,
        checksum: protocol::checksum(&short),
        compute_micros: 1,
        payload: short,
    };
    holder
        .send(Message::binary(protocol::encode(&ToCoordinator::Result(
            wrong,
        ))))
        .await
        .unwrap();
    let (code, reason) = closed(&mut holder).await;
    assert_eq!(code, 1002);
    assert!(
        reason.contains("has 7 bytes; the tile needs 512"),
        "{reason}"
    );

    // Through all that, a real worker computes the job (its lease came back) and another.
    let _worker = c.worker("honest", 1);
    let last = c.wait_job(&id, &t).await;
    assert_eq!(last["state"], "done");
    let (id2, a, b) = submit(&c, &t, 33, 44, 55).await;
    assert_eq!(c.wait_job(&id2, &t).await["state"], "done");
    let got = c.result_values(&id2, &t).await;
    assert_close(
        &got,
        &reference((33, 44, 55), 1.0, &a, &b, 0.0, None),
        44,
        false,
    );

    let health = c.http.get(c.api("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let metrics = c.metrics().await;
    let violations: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tabgrid_protocol_violations_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(violations >= 6, "{metrics}");
}

#[tokio::test]
async fn connections_over_the_per_address_and_per_subject_limits_are_refused() {
    let c = Coordinator::start(&[
        "--max-conns-per-address",
        "3",
        "--max-conns-per-subject",
        "1",
    ])
    .await;
    let first = join(&c, "twin").await;
    let other = join(&c, "other").await;
    let _third = join(&c, "third").await;

    // Three connections from this address are the limit: the fourth is refused before
    // the upgrade, as a 429 naming the limit.
    let refused = tokio_tungstenite::connect_async(c.ws_url())
        .await
        .unwrap_err();
    match refused {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            assert_eq!(response.status(), 429);
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default());
            assert!(body.contains("limit per address"), "{body}");
        }
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }

    // A second connection with the same subject: told to come back later, with why.
    drop(other);
    c.wait_log("worker disconnected", 1).await;
    let mut second = connect(&c).await;
    second
        .send(Message::binary(hello(
            Some(token("twin", Role::Volunteer)),
            PROTOCOL_VERSION,
        )))
        .await
        .unwrap();
    let (code, reason) = closed(&mut second).await;
    assert_eq!(code, 1013, "{reason}");
    assert!(
        reason.contains("\"twin\" already has 1 worker connections"),
        "{reason}"
    );
    let metrics = c.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "tabgrid_connections_refused_total{reason=\"subject\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "tabgrid_connections_refused_total{reason=\"address\"}"
        ),
        1.0
    );

    // A place given back is free again, for the subject too.
    drop(first);
    c.wait_log("worker disconnected", 2).await;
    let _again = join(&c, "twin").await;
    assert_eq!(c.get("/healthz", "").await.status(), 200);
}
