//! HTTP handlers of API v1: jobs (submit as JSON or multipart `.npy`, list, status,
//! result as JSON or `.npy`, cancel, progress as Server-Sent Events), workers, health and
//! metrics.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tabgrid_shared::claims::Role;
use tabgrid_shared::tiling::TilePlan;
use tabgrid_shared::{Dtype, Matrix};

use crate::auth::Caller;
use crate::error::{ApiError, body_error};
use crate::grid::{NewJob, Progress};
use crate::npy;
use crate::scheduler::Quorum;
use crate::server::{AppState, ServeConfig};
use crate::store::{JobOperands, JobRecord, JobState};

/// Media type of NumPy `.npy` bodies.
pub const NPY: &str = "application/x-npy";

/// A job as submitted, JSON (the spec part of a multipart submission has no matrices).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobSpec {
    op: String,
    dtype: String,
    #[serde(default = "one")]
    alpha: f64,
    #[serde(default)]
    beta: f64,
    #[serde(default)]
    a: Option<MatrixJson>,
    #[serde(default)]
    b: Option<MatrixJson>,
    #[serde(default)]
    c: Option<MatrixJson>,
    #[serde(default)]
    priority: i32,
    #[serde(default)]
    name: Option<String>,
    /// Replication instead of Freivalds' check: each tile computed by `of` workers at
    /// most, done when `agree` results are equal (for testing the replication path that
    /// ops without a cheap check use).
    #[serde(default)]
    replicas: Option<ReplicasJson>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplicasJson {
    agree: u32,
    of: u32,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MatrixJson {
    shape: Vec<usize>,
    data: Vec<f64>,
}

impl MatrixJson {
    fn into_matrix(self, part: &str, dtype: Dtype) -> Result<Matrix, ApiError> {
        let [rows, cols] = self.shape[..] else {
            return Err(ApiError::bad_request(format!(
                "{part}: shape {:?} must have two dimensions [rows, cols]",
                self.shape
            )));
        };
        let needed = rows.checked_mul(cols).ok_or_else(|| {
            ApiError::bad_request(format!("{part}: shape [{rows}, {cols}] is too large"))
        })?;
        if self.data.len() != needed {
            return Err(ApiError::bad_request(format!(
                "{part}: data has {} values but shape [{rows}, {cols}] needs {needed}",
                self.data.len()
            )));
        }
        let matrix = match dtype {
            Dtype::F32 => {
                let values: Vec<f32> = self.data.iter().map(|&v| v as f32).collect();
                Matrix::from_f32(rows, cols, &values)
            }
            Dtype::F64 => Matrix::from_f64(rows, cols, &self.data),
        };
        matrix.map_err(|e| ApiError::bad_request(format!("{part}: {e}")))
    }
}

/// A JSON submission's spec and matrices.
fn json_parts(body: &[u8]) -> Result<(JobSpec, Matrix, Matrix, Option<Matrix>), ApiError> {
    let mut spec = parse_spec(body, "body")?;
    let dtype = Dtype::parse(&spec.dtype).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let a = spec
        .a
        .take()
        .ok_or_else(|| ApiError::bad_request("matrix `a` is missing"))?
        .into_matrix("a", dtype)?;
    let b = spec
        .b
        .take()
        .ok_or_else(|| ApiError::bad_request("matrix `b` is missing"))?
        .into_matrix("b", dtype)?;
    let c = spec
        .c
        .take()
        .map(|c| c.into_matrix("c", dtype))
        .transpose()?;
    Ok((spec, a, b, c))
}

/// Everything a JSON body goes through before it becomes a job (for the fuzz tests).
#[cfg(test)]
pub(crate) fn parse_json_job(body: &[u8], tile_edge: u32) -> Result<NewJob, ApiError> {
    let (spec, a, b, c) = json_parts(body)?;
    let config = ServeConfig {
        tile_edge,
        ..ServeConfig::default()
    };
    validate("fuzz".to_owned(), spec, a, b, c, &config)
}

fn parse_spec(bytes: &[u8], what: &str) -> Result<JobSpec, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("{what} is not valid job JSON: {e}")))
}

/// `POST /api/v1/jobs`: JSON with inline matrices, or `multipart/form-data` with a `spec`
/// part and `.npy` parts `a`, `b` and optionally `c`.
pub async fn submit(
    State(state): State<AppState>,
    caller: Caller,
    request: Request,
) -> Result<Response, ApiError> {
    caller.require(&[Role::Submitter, Role::Admin], "submit jobs")?;
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let (spec, a, b, c) = if content_type.starts_with("multipart/form-data") {
        let multipart = Multipart::from_request(request, &state)
            .await
            .map_err(|e| ApiError::bad_request(format!("multipart body: {}", e.body_text())))?;
        read_multipart(multipart).await?
    } else if content_type.starts_with("application/json") || content_type.is_empty() {
        let body = Bytes::from_request(request, &state)
            .await
            .map_err(|e: BytesRejection| body_error(e))?;
        json_parts(&body)?
    } else {
        return Err(ApiError::bad_request(format!(
            "unsupported content type {content_type:?}: send application/json or multipart/form-data"
        )));
    };
    let job = validate(caller.0.sub.clone(), spec, a, b, c, &state.config)?;
    let grid = state.grid.clone();
    // Cutting panels and writing operands to disk are CPU and IO: off the runtime.
    let record = tokio::task::spawn_blocking(move || grid.submit(job))
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("recording job: {e}")))??;
    tracing::info!(
        job = record.id,
        owner = record.owner,
        m = record.m,
        n = record.n,
        k = record.k,
        "job submitted"
    );
    let body =
        json!({ "id": record.id, "state": record.state.name(), "tiles_total": record.tiles_total });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn read_multipart(
    mut multipart: Multipart,
) -> Result<(JobSpec, Matrix, Matrix, Option<Matrix>), ApiError> {
    let mut spec_bytes = None;
    let mut parts: [Option<npy::Streaming>; 3] = [None, None, None];
    while let Some(mut field) = multipart.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or("").to_owned();
        let slot = match name.as_str() {
            "spec" => None,
            "a" => Some(0),
            "b" => Some(1),
            "c" => Some(2),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown part `{other}`: expected spec, a, b and optionally c"
                )));
            }
        };
        match slot {
            None => spec_bytes = Some(field.bytes().await.map_err(multipart_error)?),
            Some(i) => {
                // Read as it arrives: the data goes straight into the matrix's buffer.
                let mut part = npy::Streaming::default();
                while let Some(piece) = field.chunk().await.map_err(multipart_error)? {
                    part.push(&piece);
                }
                parts[i] = Some(part);
            }
        }
    }
    let spec_bytes = spec_bytes.ok_or_else(|| ApiError::bad_request("part `spec` is missing"))?;
    let spec = parse_spec(&spec_bytes, "part `spec`")?;
    if spec.a.is_some() || spec.b.is_some() || spec.c.is_some() {
        return Err(ApiError::bad_request(
            "part `spec` must not hold matrices in a multipart submission; send them as .npy parts",
        ));
    }
    let dtype = Dtype::parse(&spec.dtype).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let [a, b, c] = parts;
    let read = |name: &str, part: Option<npy::Streaming>| -> Result<Option<Matrix>, ApiError> {
        part.map(|p| {
            p.finish(name, dtype)
                .map_err(|e| ApiError::bad_request(e.to_string()))
        })
        .transpose()
    };
    let a = read("a", a)?.ok_or_else(|| ApiError::bad_request("part `a` is missing"))?;
    let b = read("b", b)?.ok_or_else(|| ApiError::bad_request("part `b` is missing"))?;
    let c = read("c", c)?;
    Ok((spec, a, b, c))
}

fn multipart_error(err: axum::extract::multipart::MultipartError) -> ApiError {
    if err.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge(format!(
            "request body is over the coordinator's limit: {}",
            err.body_text()
        ))
    } else {
        ApiError::bad_request(format!("multipart body: {}", err.body_text()))
    }
}

/// Checks a submission and tiles it.
fn validate(
    owner: String,
    spec: JobSpec,
    a: Matrix,
    b: Matrix,
    c: Option<Matrix>,
    config: &ServeConfig,
) -> Result<NewJob, ApiError> {
    if spec.op != "gemm" {
        return Err(ApiError::bad_request(format!(
            "unsupported op {:?}: expected \"gemm\"",
            spec.op
        )));
    }
    let dtype = Dtype::parse(&spec.dtype).map_err(|e| ApiError::bad_request(e.to_string()))?;
    for (name, value) in [("alpha", spec.alpha), ("beta", spec.beta)] {
        if !value.is_finite() {
            return Err(ApiError::bad_request(format!(
                "{name} must be a finite number"
            )));
        }
    }
    if a.cols != b.rows {
        return Err(ApiError::bad_request(format!(
            "shapes do not fit: A is {}x{} and B is {}x{}; A's columns must equal B's rows",
            a.rows, a.cols, b.rows, b.cols
        )));
    }
    if let Some(c) = &c
        && (c.rows, c.cols) != (a.rows, b.cols)
    {
        return Err(ApiError::bad_request(format!(
            "shapes do not fit: C is {}x{} but A·B is {}x{}",
            c.rows, c.cols, a.rows, b.cols
        )));
    }
    let dims = [a.rows, a.cols, b.cols];
    if dims.iter().any(|&d| d > u32::MAX as usize) {
        return Err(ApiError::bad_request("a dimension is over 4294967295"));
    }
    let plan = TilePlan::with_edge(
        a.rows as u32,
        b.cols as u32,
        a.cols as u32,
        dtype,
        config.tile_edge,
    )
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let size = dtype.size() as u64;
    let result = a.rows as u64 * b.cols as u64 * size;
    let job_bytes =
        (a.data.len() + b.data.len() + c.as_ref().map_or(0, |c| c.data.len())) as u64 + result;
    if job_bytes > config.max_job_bytes {
        return Err(ApiError::TooLarge(format!(
            "the job's matrices (operands and result) take {job_bytes} bytes; this coordinator \
             takes jobs up to {} bytes",
            config.max_job_bytes
        )));
    }
    let quorum = match spec.replicas {
        None => None,
        Some(ReplicasJson { agree, of })
            if (2..=16).contains(&agree) && (agree..=16).contains(&of) =>
        {
            Some(Quorum { agree, of })
        }
        Some(ReplicasJson { agree, of }) => {
            return Err(ApiError::bad_request(format!(
                "replicas {{agree: {agree}, of: {of}}}: agree must be 2 to 16 and of from agree to 16"
            )));
        }
    };
    if let Some(name) = &spec.name
        && name.len() > 200
    {
        return Err(ApiError::bad_request("name is longer than 200 bytes"));
    }
    Ok(NewJob {
        owner,
        name: spec.name,
        alpha: spec.alpha,
        beta: spec.beta,
        priority: spec.priority,
        quorum,
        operands: JobOperands {
            a: Arc::new(a),
            b: Arc::new(b),
            c: c.map(Arc::new),
        },
        plan,
    })
}

fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn job_json(r: &JobRecord) -> Value {
    json!({
        "id": r.id,
        "name": r.name,
        "owner": r.owner,
        "state": r.state.name(),
        "tiles_done": r.tiles_done,
        "tiles_total": r.tiles_total,
        "dtype": r.dtype.name(),
        "m": r.m, "n": r.n, "k": r.k,
        "alpha": r.alpha, "beta": r.beta,
        "priority": r.priority,
        "replicas": r.quorum.map(|q| json!({"agree": q.agree, "of": q.of})),
        "created_at": timestamp(r.created_at),
        "finished_at": r.finished_at.map(timestamp),
        "error": r.error,
    })
}

/// Finds a job the caller may see: admins see all, submitters their own.
fn find_job(state: &AppState, caller: &Caller, id: &str) -> Result<JobRecord, ApiError> {
    caller.require(&[Role::Submitter, Role::Admin], "read jobs")?;
    let stored = || {
        state
            .grid
            .store()
            .job(id)
            .map_err(|e| ApiError::Internal(e.into()))
    };
    let record = match state.grid.live_job(id) {
        // Sharing a database, another coordinator may have finished (or deleted) the job
        // a moment before this one's claims loop notices: the database is the truth.
        Some(live) if state.grid.is_shared() => match stored()? {
            Some(record) if record.state.is_terminal() => {
                state.grid.ended_elsewhere(
                    id,
                    record.state,
                    record.tiles_done,
                    record.error.clone(),
                    false,
                );
                record
            }
            Some(_) => live,
            None => return Err(ApiError::NotFound(format!("job {id} not found"))),
        },
        Some(live) => live,
        None => stored()?.ok_or_else(|| ApiError::NotFound(format!("job {id} not found")))?,
    };
    if !caller.is_admin() && record.owner != caller.0.sub {
        return Err(ApiError::Forbidden(format!(
            "job {id} belongs to another user"
        )));
    }
    Ok(record)
}

/// `GET /api/v1/jobs`
pub async fn list_jobs(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Role::Submitter, Role::Admin], "list jobs")?;
    let owner = (!caller.is_admin()).then_some(caller.0.sub.as_str());
    let jobs = state
        .grid
        .store()
        .list_jobs(owner)
        .map_err(|e| ApiError::Internal(e.into()))?;
    let jobs: Vec<Value> = jobs
        .into_iter()
        .map(|r| match state.grid.live_job(&r.id) {
            // A final state in the store is final (another coordinator may have ended it).
            Some(live) if !r.state.is_terminal() => job_json(&live),
            _ => job_json(&r),
        })
        .collect();
    Ok(Json(json!({ "jobs": jobs })))
}

/// `GET /api/v1/jobs/{id}`
pub async fn job(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(job_json(&find_job(&state, &caller, &id)?)))
}

/// `GET /api/v1/jobs/{id}/result`: JSON, or `.npy` with `Accept: application/x-npy`.
pub async fn result(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let record = find_job(&state, &caller, &id)?;
    if record.state != JobState::Done {
        return Err(ApiError::Conflict(format!(
            "job {id} is {} ({} of {} tiles done); its result is not ready",
            record.state.name(),
            record.tiles_done,
            record.tiles_total
        )));
    }
    let matrix = state
        .grid
        .store()
        .result(&id)
        .map_err(|e| ApiError::Internal(e.into()))?
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("job {id} is done but has no result")))?;
    let wants_npy = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(NPY));
    if wants_npy {
        // The header, then the result's bytes as the store holds them: no copy of the
        // matrix (a 16 MB result took a fresh 16 MB buffer and its page faults before).
        let header = npy::header(matrix.dtype, matrix.rows, matrix.cols);
        let length = header.len() + matrix.data.len();
        let chunks = [
            Bytes::from(header),
            Bytes::from_owner(crate::grid::MatrixBytes(matrix)),
        ];
        let body = axum::body::Body::from_stream(futures_util::stream::iter(
            chunks.map(Ok::<_, Infallible>),
        ));
        let disposition = format!("attachment; filename=\"{id}.npy\"");
        return Ok((
            [
                (header::CONTENT_TYPE, NPY.to_owned()),
                (header::CONTENT_LENGTH, length.to_string()),
                (header::CONTENT_DISPOSITION, disposition),
            ],
            body,
        )
            .into_response());
    }
    let data: Value = match matrix.dtype {
        Dtype::F32 => json!(tabgrid_shared::matrix::f32s(&matrix.data)),
        Dtype::F64 => json!(tabgrid_shared::matrix::f64s(&matrix.data)),
    };
    Ok(Json(json!({
        "id": id,
        "dtype": matrix.dtype.name(),
        "shape": [matrix.rows, matrix.cols],
        "data": data,
    }))
    .into_response())
}

/// `DELETE /api/v1/jobs/{id}`: cancels a running job (its leases are cancelled on the
/// workers) and deletes it with its result.
pub async fn delete_job(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    find_job(&state, &caller, &id)?;
    state.grid.cancel(&id);
    state
        .grid
        .store()
        .delete_job(&id)
        .map_err(|e| ApiError::Internal(e.into()))?;
    tracing::info!(job = id, by = caller.0.sub, "job deleted");
    Ok(StatusCode::NO_CONTENT)
}

fn progress_event(id: &str, p: &Progress) -> Event {
    let data = json!({
        "id": id,
        "state": p.state.name(),
        "tiles_done": p.tiles_done,
        "tiles_total": p.tiles_total,
        "error": p.error,
    });
    Event::default().event("progress").data(data.to_string())
}

/// How often a job's events follow the store while the job is not running here.
const STORE_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// `GET /api/v1/jobs/{id}/events`: one `progress` event per change, ending after the job
/// reaches a final state.
pub async fn events(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let record = find_job(&state, &caller, &id)?;
    let receiver = state.grid.subscribe(&id);
    let first = Progress {
        state: record.state,
        tiles_done: record.tiles_done,
        tiles_total: record.tiles_total,
        error: record.error.clone(),
    };
    let grid = state.grid.clone();
    // (next progress to send, receiver, last progress sent, finished)
    let stream = futures_util::stream::unfold(
        (Some(first), receiver, None::<Progress>, false),
        move |(next, mut rx, mut last, done)| {
            let (id, grid) = (id.clone(), grid.clone());
            async move {
                if done {
                    return None;
                }
                if let Some(p) = next {
                    let finished = p.state.is_terminal();
                    return Some((Ok(progress_event(&id, &p)), (None, rx, Some(p), finished)));
                }
                if rx.is_none() {
                    // Not running here: on a shared store another coordinator runs it (this
                    // one takes it up within a poll); follow the store meanwhile.
                    loop {
                        tokio::time::sleep(STORE_POLL).await;
                        rx = grid.subscribe(&id);
                        if rx.is_some() {
                            break;
                        }
                        let lookup = grid.clone();
                        let key = id.clone();
                        let record = tokio::task::spawn_blocking(move || lookup.store().job(&key))
                            .await
                            .ok()?
                            .ok()??;
                        let p = Progress {
                            state: record.state,
                            tiles_done: record.tiles_done,
                            tiles_total: record.tiles_total,
                            error: record.error,
                        };
                        if last.as_ref() != Some(&p) {
                            let finished = p.state.is_terminal();
                            return Some((
                                Ok(progress_event(&id, &p)),
                                (None, None, Some(p), finished),
                            ));
                        }
                    }
                }
                let receiver = rx.as_mut()?;
                let p = match receiver.changed().await {
                    Ok(()) => receiver.borrow_and_update().clone(),
                    // The job left the grid; its last value was already marked changed.
                    Err(_) => receiver.borrow().clone(),
                };
                last = Some(p.clone());
                let finished = p.state.is_terminal();
                Some((Ok(progress_event(&id, &p)), (None, rx, last, finished)))
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// `GET /api/v1/workers` (admin).
pub async fn workers(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    caller.require(&[Role::Admin], "list workers")?;
    let workers: Vec<Value> = state
        .grid
        .workers()
        .into_iter()
        .map(|w| {
            json!({
                "id": w.id,
                "kind": w.kind.name(),
                "subject": w.subject,
                "threads": w.threads,
                "tiles_done": w.tiles_done,
                "gflops": w.gflops,
                "connected_at": timestamp(w.connected_at),
                "agent": w.agent,
            })
        })
        .collect();
    Ok(Json(json!({ "workers": workers })))
}

/// `GET /healthz`: liveness.
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.grid.metrics().render(),
    )
        .into_response()
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint; the API lives under /api/v1".into())
}
