//! The `tabgrid` CLI's HTTP client: submit `.npy` files, follow progress over SSE with a
//! progress bar, fetch status and results. Server errors are shown as the server's
//! message, never as a stack trace.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

/// A client of one coordinator, authenticated with one token.
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

/// What the user asked to submit.
#[derive(Debug, Clone)]
pub struct Submission<'a> {
    pub a: &'a Path,
    pub b: &'a Path,
    pub c: Option<&'a Path>,
    pub dtype: Option<String>,
    pub alpha: f64,
    pub beta: f64,
    pub priority: i32,
    pub name: Option<String>,
}

/// Guesses a `.npy` file's dtype from its header (`'descr': '<f4'` or `'<f8'`).
fn npy_dtype(bytes: &[u8]) -> Option<&'static str> {
    // The header is ASCII and at most 64 KiB; the data after it is not looked at.
    let header = &bytes[..bytes.len().min(65_536)];
    let text = String::from_utf8_lossy(header);
    let start = text.find("'descr'")?;
    let rest = &text[start..];
    if rest.contains("f4'") && rest.find("f4'") < rest.find('}') {
        Some("f32")
    } else if rest.contains("f8'") && rest.find("f8'") < rest.find('}') {
        Some("f64")
    } else {
        None
    }
}

impl Client {
    pub fn new(base: &str, token: &str) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?;
        Ok(Client {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    /// Sends a request and turns an error status into the server's message.
    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach the coordinator at {}", self.base))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        let detail = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v.get("detail").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or(body);
        bail!(
            "{} {}: {detail}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        );
    }

    /// Submits `.npy` files; returns the server's reply (`id`, `state`, `tiles_total`).
    pub async fn submit(&self, job: &Submission<'_>) -> anyhow::Result<Value> {
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let a = read(job.a)?;
        let b = read(job.b)?;
        let c = job.c.map(read).transpose()?;
        let dtype = match &job.dtype {
            Some(d) => d.clone(),
            None => npy_dtype(&a)
                .with_context(|| {
                    format!(
                        "{} is not float32 or float64; pass --dtype",
                        job.a.display()
                    )
                })?
                .to_owned(),
        };
        let spec = json!({
            "op": "gemm", "dtype": dtype, "alpha": job.alpha, "beta": job.beta,
            "priority": job.priority, "name": job.name,
        });
        let npy = |bytes: Vec<u8>, name: &str| {
            Part::bytes(bytes)
                .file_name(format!("{name}.npy"))
                .mime_str(crate::api::NPY)
                .expect("static media type parses")
        };
        let mut form = Form::new()
            .part(
                "spec",
                Part::text(spec.to_string()).mime_str("application/json")?,
            )
            .part("a", npy(a, "a"))
            .part("b", npy(b, "b"));
        if let Some(c) = c {
            form = form.part("c", npy(c, "c"));
        }
        let response = self
            .send(self.http.post(self.url("/jobs")).multipart(form))
            .await?;
        Ok(response.json().await?)
    }

    pub async fn status(&self, id: &str) -> anyhow::Result<Value> {
        Ok(self
            .send(self.http.get(self.url(&format!("/jobs/{id}"))))
            .await?
            .json()
            .await?)
    }

    pub async fn list(&self) -> anyhow::Result<Value> {
        Ok(self
            .send(self.http.get(self.url("/jobs")))
            .await?
            .json()
            .await?)
    }

    pub async fn delete(&self, id: &str) -> anyhow::Result<()> {
        self.send(self.http.delete(self.url(&format!("/jobs/{id}"))))
            .await?;
        Ok(())
    }

    /// The result as `.npy` bytes.
    pub async fn result_npy(&self, id: &str) -> anyhow::Result<Vec<u8>> {
        let request = self
            .http
            .get(self.url(&format!("/jobs/{id}/result")))
            .header(reqwest::header::ACCEPT, crate::api::NPY);
        Ok(self.send(request).await?.bytes().await?.to_vec())
    }

    /// The result as JSON.
    pub async fn result_json(&self, id: &str) -> anyhow::Result<Value> {
        Ok(self
            .send(self.http.get(self.url(&format!("/jobs/{id}/result"))))
            .await?
            .json()
            .await?)
    }

    /// Follows a job's progress events until it finishes, drawing a progress bar when
    /// `show` is set. Returns the final event.
    pub async fn wait(&self, id: &str, show: bool) -> anyhow::Result<Value> {
        let response = self
            .send(self.http.get(self.url(&format!("/jobs/{id}/events"))))
            .await?;
        let bar = if show {
            ProgressBar::new(0)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} tiles {msg}",
            )
            .expect("static template parses"),
        );
        let mut events = eventsource_stream::EventStream::new(response.bytes_stream());
        let mut last = Value::Null;
        while let Some(event) = events.next().await {
            let event = event.context("reading progress events")?;
            if event.event != "progress" {
                continue;
            }
            let progress: Value =
                serde_json::from_str(&event.data).context("progress event is not JSON")?;
            bar.set_length(progress["tiles_total"].as_u64().unwrap_or(0));
            bar.set_position(progress["tiles_done"].as_u64().unwrap_or(0));
            let state = progress["state"].as_str().unwrap_or("").to_owned();
            bar.set_message(state.clone());
            last = progress;
            if matches!(state.as_str(), "done" | "failed" | "cancelled") {
                break;
            }
        }
        bar.finish();
        if last.is_null() {
            bail!("the coordinator ended the progress stream before the job finished");
        }
        Ok(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guesses_npy_dtype() {
        let header =
            b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
        assert_eq!(npy_dtype(header), Some("f32"));
        let header =
            b"\x93NUMPY\x01\x00v\x00{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }";
        assert_eq!(npy_dtype(header), Some("f64"));
        assert_eq!(npy_dtype(b"\x93NUMPY{'descr': '<i8', 'shape': (2,)}"), None);
    }
}
