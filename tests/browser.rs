//! A real headless Chromium for the browser tests, driven over the Chrome DevTools Protocol
//! on one WebSocket: open a tab, evaluate JavaScript in it, wait for a condition, collect
//! every uncaught exception and console error, close the tab.
//!
//! Chromium comes from Debian (`/usr/bin/chromium`, or `TABGRID_CHROMIUM`); each browser
//! gets a fresh profile in a temporary directory and is killed when its handle drops.
//! Waiting is polling a page expression until it holds, bounded by `EVENT_TIMEOUT`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::EVENT_TIMEOUT;

type Sink = SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>;
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, String>>>>>;

/// Errors seen per CDP session (one per tab).
type Errors = Arc<Mutex<HashMap<String, Vec<String>>>>;

/// The Chromium binary: `TABGRID_CHROMIUM` or Debian's.
pub fn chromium_path() -> PathBuf {
    std::env::var_os("TABGRID_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// One headless Chromium process and the DevTools connection to it.
pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    sink: tokio::sync::Mutex<Sink>,
    next_id: AtomicU64,
    pending: Pending,
    errors: Errors,
}

/// One tab, attached with its own CDP session.
pub struct Page<'b> {
    browser: &'b Browser,
    target_id: String,
    session: String,
}

impl Browser {
    /// Starts Chromium with the flags this machine needs (no sandbox as root, no GPU, no
    /// background network to closed hosts) plus `extra`.
    pub async fn launch(extra: &[&str]) -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let mut child = Command::new(chromium_path())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot start {} ({err}); install Debian's chromium (`.ci/run` does)",
                    chromium_path().display()
                )
            });
        let stderr = child.stderr.take().expect("piped stderr");
        let (found, url) = oneshot::channel();
        std::thread::spawn(move || {
            let mut found = Some(found);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ")
                    && let Some(found) = found.take()
                {
                    let _ = found.send(url.trim().to_owned());
                }
                if std::env::var_os("TABGRID_TEST_ECHO").is_some() {
                    eprintln!("[chromium] {line}");
                }
            }
        });
        let url = tokio::time::timeout(EVENT_TIMEOUT, url)
            .await
            .expect("Chromium did not print its DevTools address in time")
            .expect("Chromium exited before printing its DevTools address");
        let (socket, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("connect to Chromium's DevTools socket");
        let (sink, mut stream) = socket.split();
        let pending: Pending = Arc::default();
        let errors: Errors = Arc::default();
        {
            let pending = pending.clone();
            let errors = errors.clone();
            tokio::spawn(async move {
                while let Some(Ok(message)) = stream.next().await {
                    let Message::Text(text) = message else {
                        continue;
                    };
                    let Ok(value) = serde_json::from_str::<Value>(&text) else {
                        continue;
                    };
                    if let Some(id) = value.get("id").and_then(Value::as_u64) {
                        let reply = match value.get("error") {
                            Some(error) => Err(error.to_string()),
                            None => Ok(value.get("result").cloned().unwrap_or(Value::Null)),
                        };
                        if let Some(waiter) = pending.lock().unwrap().remove(&id) {
                            let _ = waiter.send(reply);
                        }
                    } else {
                        record_error(&errors, &value);
                    }
                }
            });
        }
        Browser {
            child,
            _profile: profile,
            sink: tokio::sync::Mutex::new(sink),
            next_id: AtomicU64::new(1),
            pending,
            errors,
        }
    }

    /// Sends one command (to the browser, or to a tab's session) and awaits its result.
    pub async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.try_call(session, method, params)
            .await
            .unwrap_or_else(|err| panic!("CDP {method} failed: {err}"))
    }

    pub async fn try_call(
        &self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        let (reply, result) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, reply);
        self.sink
            .lock()
            .await
            .send(Message::text(message.to_string()))
            .await
            .map_err(|err| format!("sending to Chromium: {err}"))?;
        tokio::time::timeout(EVENT_TIMEOUT, result)
            .await
            .map_err(|_| format!("no reply to {method} in {EVENT_TIMEOUT:?}"))?
            .map_err(|_| "Chromium closed the DevTools socket".to_owned())?
    }

    /// Opens `url` in a new tab (`background`: not the focused one) and attaches to it.
    pub async fn open(&self, url: &str, background: bool) -> Page<'_> {
        let created = self
            .call(
                None,
                "Target.createTarget",
                json!({"url": "about:blank", "background": background}),
            )
            .await;
        let target_id = created["targetId"].as_str().expect("targetId").to_owned();
        let attached = self
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target_id, "flatten": true}),
            )
            .await;
        let session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_owned();
        self.errors
            .lock()
            .unwrap()
            .insert(session.clone(), Vec::new());
        let page = Page {
            browser: self,
            target_id,
            session,
        };
        page.send("Runtime.enable", json!({})).await;
        page.send("Log.enable", json!({})).await;
        page.send("Page.enable", json!({})).await;
        page.send("Page.navigate", json!({"url": url})).await;
        page
    }
}

/// Keeps what counts as an error in a tab: uncaught exceptions, `console.error`, and
/// error-level log entries (failed loads, blocked resources).
fn record_error(errors: &Errors, event: &Value) {
    let Some(session) = event.get("sessionId").and_then(Value::as_str) else {
        return;
    };
    let params = &event["params"];
    let text = match event.get("method").and_then(Value::as_str) {
        Some("Runtime.exceptionThrown") => {
            let details = &params["exceptionDetails"];
            let description = details["exception"]["description"]
                .as_str()
                .or(details["text"].as_str())
                .unwrap_or("exception");
            format!("uncaught: {description}")
        }
        Some("Runtime.consoleAPICalled") if params["type"] == "error" => {
            let args: Vec<String> = params["args"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|arg| {
                    arg["value"]
                        .as_str()
                        .map(str::to_owned)
                        .or_else(|| arg["description"].as_str().map(str::to_owned))
                        .unwrap_or_else(|| arg.to_string())
                })
                .collect();
            format!("console.error: {}", args.join(" "))
        }
        Some("Log.entryAdded") if params["entry"]["level"] == "error" => {
            let entry = &params["entry"];
            format!(
                "log ({}): {} {}",
                entry["source"].as_str().unwrap_or("?"),
                entry["text"].as_str().unwrap_or(""),
                entry["url"].as_str().unwrap_or("")
            )
        }
        _ => return,
    };
    if let Some(list) = errors.lock().unwrap().get_mut(session) {
        list.push(text);
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Page<'_> {
    pub async fn send(&self, method: &str, params: Value) -> Value {
        self.browser.call(Some(&self.session), method, params).await
    }

    /// Evaluates `expression` (awaiting a promise) and returns its value as JSON.
    pub async fn eval(&self, expression: &str) -> Value {
        let reply = self
            .send(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(details) = reply.get("exceptionDetails") {
            panic!("evaluating {expression:?} threw: {details}");
        }
        reply["result"]["value"].clone()
    }

    /// Polls `expression` until it is truthy and returns its value; panics after
    /// `EVENT_TIMEOUT`, showing `what` and the page's last state.
    pub async fn wait_for(&self, expression: &str, what: &str) -> Value {
        let started = Instant::now();
        loop {
            let reply = self
                .send(
                    "Runtime.evaluate",
                    json!({"expression": expression, "returnByValue": true}),
                )
                .await;
            let value = reply["result"]["value"].clone();
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy && reply.get("exceptionDetails").is_none() {
                return value;
            }
            if started.elapsed() > EVENT_TIMEOUT {
                let state = self.eval("JSON.stringify(window.tabgrid ?? null)").await;
                panic!(
                    "waited {EVENT_TIMEOUT:?} for {what}; page state: {state}; errors: {:?}",
                    self.errors()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the volunteer page says it is connected; returns its worker id.
    pub async fn joined(&self) -> u64 {
        let id = self
            .wait_for(
                "tabgrid.state?.phase === 'connected' && tabgrid.state.workerId",
                "the tab to join the grid",
            )
            .await;
        id.as_u64().expect("worker id")
    }

    /// Uncaught exceptions and console errors in this tab so far, plus the errors the page
    /// itself recorded (`tabgrid.errors`, which includes its worker's).
    pub fn errors(&self) -> Vec<String> {
        self.browser
            .errors
            .lock()
            .unwrap()
            .get(&self.session)
            .cloned()
            .unwrap_or_default()
    }

    /// Asserts that neither Chromium nor the page saw an error.
    pub async fn assert_no_errors(&self) {
        self.assert_no_errors_but(&[]).await;
    }

    /// [`Page::assert_no_errors`], except Chromium's own log entries containing one of
    /// `expected` (a refused connection while the test had the coordinator down).
    pub async fn assert_no_errors_but(&self, expected: &[&str]) {
        let page = self
            .eval("JSON.stringify(window.tabgrid?.errors ?? [])")
            .await;
        let page: Vec<String> = serde_json::from_str(page.as_str().unwrap_or("[]")).unwrap();
        let browser = self
            .errors()
            .into_iter()
            .filter(|e| !(e.starts_with("log (") && expected.iter().any(|x| e.contains(x))));
        let all: Vec<String> = browser.chain(page).collect();
        assert!(all.is_empty(), "errors in the page: {all:#?}");
    }

    /// Closes the tab the way a volunteer does.
    pub async fn close(self) {
        self.browser
            .call(
                None,
                "Target.closeTarget",
                json!({"targetId": self.target_id}),
            )
            .await;
    }
}
