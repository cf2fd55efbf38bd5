//! A scripted stand-in for the coordinator: accepts the worker's WebSocket on port 0 and
//! lets a test send and expect frames one at a time.

// reason: tungstenite's upgrade `Callback` fixes the closure's return type, a Result whose
// error is a whole HTTP response.
#![allow(clippy::result_large_err)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tabgrid_shared::protocol::{
    self, Hello, Limits, MAX_FRAME_BYTES, MAX_SLOTS, ToCoordinator, ToWorker, Welcome,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{StatusCode, header::AUTHORIZATION};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{WebSocketStream, accept_hdr_async_with_config};

/// Longest any single step may take before the test fails instead of hanging.
pub const STEP: Duration = Duration::from_secs(10);

pub struct Fake {
    listener: TcpListener,
    /// The base URL a worker is given (`http://127.0.0.1:PORT`).
    pub url: String,
}

/// One accepted worker connection.
pub struct Conn {
    ws: WebSocketStream<TcpStream>,
    pub authorization: Option<String>,
    pub path: String,
}

impl Fake {
    pub async fn start() -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        Fake { listener, url }
    }

    /// Accepts the next connection and its WebSocket upgrade.
    pub async fn accept(&self) -> Conn {
        let (stream, _) = timeout(STEP, self.listener.accept())
            .await
            .expect("worker connects")
            .unwrap();
        let mut seen = None;
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_FRAME_BYTES))
            .max_frame_size(Some(MAX_FRAME_BYTES));
        let ws = accept_hdr_async_with_config(
            stream,
            |request: &Request, response: Response| {
                let authorization = request
                    .headers()
                    .get(AUTHORIZATION)
                    .map(|value| value.to_str().unwrap().to_owned());
                seen = Some((authorization, request.uri().path().to_owned()));
                Ok(response)
            },
            Some(config),
        )
        .await
        .unwrap();
        let (authorization, path) = seen.unwrap();
        Conn {
            ws,
            authorization,
            path,
        }
    }

    /// Accepts the next connection and answers its upgrade with an HTTP error.
    pub async fn refuse_upgrade(&self, status: StatusCode, body: &str) {
        let (stream, _) = timeout(STEP, self.listener.accept())
            .await
            .expect("worker connects")
            .unwrap();
        let result = tokio_tungstenite::accept_hdr_async(stream, |_: &Request, _| {
            let mut refusal = ErrorResponse::new(Some(body.to_owned()));
            *refusal.status_mut() = status;
            Err(refusal)
        })
        .await;
        assert!(matches!(result, Err(WsError::Http(_))), "{result:?}");
    }
}

impl Conn {
    /// The next protocol frame, skipping pings and pongs.
    pub async fn recv(&mut self) -> ToCoordinator {
        loop {
            let message = timeout(STEP, self.ws.next())
                .await
                .expect("worker sends a frame")
                .expect("connection open")
                .unwrap();
            match message {
                Message::Binary(bytes) => return protocol::decode(&bytes).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a binary frame, got {other:?}"),
            }
        }
    }

    pub async fn send(&mut self, frame: &ToWorker) {
        self.send_raw(protocol::encode(frame)).await;
    }

    pub async fn send_raw(&mut self, bytes: Vec<u8>) {
        self.ws.send(Message::binary(bytes)).await.unwrap();
    }

    /// Expects `Hello`, answers `Welcome`, expects the first `Ready`; returns the `Hello`.
    pub async fn welcome(&mut self, heartbeat_secs: u32) -> Hello {
        let ToCoordinator::Hello(hello) = self.recv().await else {
            panic!("expected Hello first");
        };
        self.send(&ToWorker::Welcome(Welcome {
            worker_id: 1,
            limits: Limits {
                max_frame_bytes: MAX_FRAME_BYTES as u32,
                max_slots: MAX_SLOTS,
                heartbeat_secs,
            },
        }))
        .await;
        assert!(matches!(
            self.recv().await,
            ToCoordinator::Ready { slots: 2 }
        ));
        hello
    }

    /// Reads until the worker's Close frame.
    pub async fn closed(&mut self) -> Option<CloseFrame> {
        loop {
            let message = timeout(STEP, self.ws.next())
                .await
                .expect("worker closes")
                .expect("a close frame before the end")
                .unwrap();
            if let Message::Close(frame) = message {
                // Send the queued reply, as a real server does, so the worker is not left
                // waiting for it.
                let _ = self.ws.flush().await;
                return frame;
            }
        }
    }

    /// Closes from the coordinator's side.
    pub async fn close(&mut self, frame: CloseFrame) {
        self.ws.close(Some(frame)).await.unwrap();
    }
}
