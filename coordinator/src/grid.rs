//! The grid: the scheduler state machine plus everything around it that it must not
//! know — connected workers' outboxes, operand bytes, results being assembled, the clock,
//! the store and the metrics.
//!
//! One mutex guards it all. Every operation under it is bounded work on in-memory maps
//! (no IO, no `.await`): a socket task decodes a frame, takes the lock, applies the event,
//! queues outgoing frames on per-worker channels and lets go. Hashing and encoding large
//! buffers happen outside the lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tabgrid_shared::protocol::{self, LeaseId, OperandKey, TileResult, ToWorker, WorkerKind};
use tabgrid_shared::tiling::TilePlan;
use tabgrid_shared::{Dtype, Matrix};
use tokio::sync::{mpsc, watch};

use crate::metrics::Metrics;
use crate::scheduler::{
    Command, JobId, JobTiles, LeaseStatus, Millis, Panel, Quorum, Scheduler, SchedulerConfig,
    Violation, WorkerId,
};
use crate::store::{JobOperands, JobRecord, JobState, LeaseIssued, Store, StoreError, TileWrite};
use crate::verify;

/// An operand panel ready to send: shared by every worker that needs it.
#[derive(Debug)]
pub struct OperandData {
    pub key: OperandKey,
    pub dtype: Dtype,
    pub rows: u32,
    pub cols: u32,
    pub bytes: Bytes,
}

/// What a worker's socket task sends, in order.
#[derive(Debug)]
pub enum Outbound {
    Frame(ToWorker),
    /// Encoded by the socket task, outside the grid lock.
    Operand(Arc<OperandData>),
    /// Close the connection with a WebSocket close code and reason.
    Close {
        code: u16,
        reason: String,
    },
}

/// A job's progress as users see it.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    pub state: JobState,
    pub tiles_done: u64,
    pub tiles_total: u64,
    pub error: Option<String>,
}

/// A connected worker, as `/workers` lists it.
#[derive(Clone, Debug)]
pub struct WorkerInfo {
    pub id: WorkerId,
    pub kind: WorkerKind,
    pub subject: String,
    pub threads: u32,
    pub tiles_done: u64,
    pub gflops: f64,
    pub connected_at: SystemTime,
    pub agent: String,
}

/// A job ready to enter the grid: validated inputs and its tiling.
#[derive(Debug)]
pub struct NewJob {
    pub owner: String,
    pub name: Option<String>,
    pub alpha: f64,
    pub beta: f64,
    pub priority: i32,
    /// Replication instead of Freivalds' check.
    pub quorum: Option<Quorum>,
    pub operands: JobOperands,
    pub plan: TilePlan,
}

impl NewJob {
    /// The job a stored record describes, with its operands (a restart, a takeover).
    fn recorded(record: &JobRecord, operands: JobOperands) -> NewJob {
        NewJob {
            owner: record.owner.clone(),
            name: record.name.clone(),
            alpha: record.alpha,
            beta: record.beta,
            priority: record.priority,
            quorum: record.quorum,
            operands,
            plan: record.plan(),
        }
    }
}

/// A job cut into panels (the slow part of a submission, done before taking the lock).
#[derive(Debug)]
pub struct PreparedJob {
    job: NewJob,
    a_panels: Vec<Arc<OperandData>>,
    b_panels: Vec<Arc<OperandData>>,
    c_tiles: Option<Vec<Arc<OperandData>>>,
    /// `None` for a replicated job.
    check: Option<Arc<verify::JobCheck>>,
}

/// Lets a `Bytes` borrow a matrix's buffer without copying it (A's row panels; a result
/// sent as `.npy`, after its header).
pub(crate) struct MatrixBytes(pub(crate) Arc<Matrix>);

impl AsRef<[u8]> for MatrixBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0.data
    }
}

/// An operand panel with its content key, hashed a few rows at a time; `rows` sees each
/// piece right after it is hashed (see [`verify::hash_rows`]).
fn operand(
    dtype: Dtype,
    (rows, cols): (usize, usize),
    bytes: Bytes,
    each: impl FnMut(usize, &[u8]),
) -> Arc<OperandData> {
    let (rows, cols) = (rows as u32, cols as u32);
    let mut hasher = OperandKey::hasher(dtype, rows, cols);
    verify::hash_rows(&mut hasher, &bytes, cols as usize * dtype.size(), each);
    Arc::new(OperandData {
        key: OperandKey::from_hasher(&hasher),
        dtype,
        rows,
        cols,
        bytes,
    })
}

impl PreparedJob {
    /// Cuts the operands into row panels of A, column panels of B and tiles of C, and
    /// computes their content keys; the job's check ([`verify::JobCheck`]) is built from
    /// the same bytes as they are hashed, B first. CPU-bound: call it off the async
    /// runtime.
    pub fn new(job: NewJob) -> PreparedJob {
        let plan = job.plan;
        let a = &job.operands.a;
        let dtype = a.dtype;
        let k = plan.k as usize;
        let row_bytes = k * dtype.size();
        let c = job.operands.c.as_ref().filter(|_| job.beta != 0.0);
        let beta = if c.is_some() { job.beta } else { 0.0 };
        let mut from_b = job
            .quorum
            .is_none()
            .then(|| verify::JobCheck::begin(dtype, job.alpha, beta, plan, &mut rand::rng()));
        let b_panels = (0..plan.tiles_j())
            .map(|j| {
                let cols = plan.cols(j);
                let block = job.operands.b.block(0, cols.start as usize, k, cols.len());
                operand(dtype, (k, cols.len()), Bytes::from(block), |first, rows| {
                    if let Some(check) = from_b.as_mut() {
                        check.rows_of_b(j, first, rows);
                    }
                })
            })
            .collect();
        let mut from_a = from_b.map(verify::FromB::then_a);
        let a_all = Bytes::from_owner(MatrixBytes(a.clone()));
        let a_panels = (0..plan.tiles_i())
            .map(|i| {
                let rows = plan.rows(i);
                let bytes =
                    a_all.slice(rows.start as usize * row_bytes..rows.end as usize * row_bytes);
                operand(dtype, (rows.len(), k), bytes, |first, rows| {
                    if let Some(check) = from_a.as_mut() {
                        check.rows_of_a(i, first, rows);
                    }
                })
            })
            .collect();
        let c_tiles = c.map(|c| {
            plan.tiles()
                .map(|(i, j)| {
                    let (rows, cols) = (plan.rows(i), plan.cols(j));
                    let block = c.tile(&plan, (i, j));
                    operand(
                        dtype,
                        (rows.len(), cols.len()),
                        Bytes::from(block),
                        |first, rows| {
                            if let Some(check) = from_a.as_mut() {
                                check.rows_of_c((i, j), first, rows);
                            }
                        },
                    )
                })
                .collect()
        });
        PreparedJob {
            job,
            a_panels,
            b_panels,
            c_tiles,
            check: from_a.map(|check| Arc::new(check.finish())),
        }
    }
}

/// A returned copy of a replicated tile.
struct Replica {
    worker: WorkerId,
    digest: [u8; 32],
    payload: Vec<u8>,
}

struct LiveJob {
    record: JobRecord,
    /// Replicated jobs: copies returned per open tile, until enough agree.
    copies: HashMap<(u32, u32), Vec<Replica>>,
    /// The secret of its results' checks and the work they share (`None`: replicated).
    check: Option<Arc<verify::JobCheck>>,
    plan: TilePlan,
    /// The result being assembled; `None` on a shared store, where the tiles live.
    result: Option<Matrix>,
    keys: Vec<OperandKey>,
    progress: watch::Sender<Progress>,
    has_c: bool,
}

impl LiveJob {
    /// An accepted tile: into the result being assembled (if any) and the store, and
    /// counted in the progress subscribers see.
    fn keep(&mut self, store: &dyn Store, tile: (u32, u32), payload: Vec<u8>) {
        let (rows, cols) = (self.plan.rows(tile.0), self.plan.cols(tile.1));
        let (row, col) = (rows.start as usize, cols.start as usize);
        if let Some(result) = &mut self.result {
            result.write_block(row, col, rows.len(), cols.len(), &payload);
        }
        let kept = store.tile_accepted(TileWrite {
            job: self.record.id.clone(),
            tile,
            row,
            col,
            rows: rows.len(),
            cols: cols.len(),
            width: self.plan.n as usize,
            payload,
        });
        if let Err(err) = kept {
            tracing::error!(job = self.record.id, error = %err, "storing a tile failed");
        }
        self.record.tiles_done += 1;
        let progress = self.progress();
        self.progress.send_replace(progress);
    }

    fn progress(&self) -> Progress {
        Progress {
            state: self.record.state,
            tiles_done: self.record.tiles_done,
            tiles_total: self.record.tiles_total,
            error: self.record.error.clone(),
        }
    }
}

struct WorkerConn {
    outbox: mpsc::UnboundedSender<Outbound>,
    info: WorkerInfo,
    /// When each live lease was handed out, for the lease latency histogram.
    lease_started: HashMap<LeaseId, Instant>,
    /// Results of this connection that failed verification.
    strikes: u32,
}

struct Inner {
    /// Subjects refused until then, for sending wrong results.
    banned: HashMap<String, Instant>,
    scheduler: Scheduler,
    jobs: HashMap<JobId, LiveJob>,
    by_name: HashMap<String, JobId>,
    workers: HashMap<WorkerId, WorkerConn>,
    /// Operand bytes by key, with the number of live jobs using each.
    operands: HashMap<OperandKey, (Arc<OperandData>, usize)>,
    next_job: JobId,
    next_worker: WorkerId,
    /// Coordinators sharing one database: a job's tiles are handed out only once claimed
    /// there ([`Grid::offer`]), accepted tiles live in the store alone, and a job ends when
    /// the store says so.
    shared: bool,
    /// Jobs that ended here lately (a shared store may still list them as running for a
    /// moment; they must not be taken up again).
    ended: std::collections::VecDeque<String>,
}

/// Wakes the claims loop of a shared grid when its workers run short of tiles.
#[derive(Debug, Default)]
pub struct Nudge {
    pending: Mutex<bool>,
    signal: std::sync::Condvar,
}

impl Nudge {
    fn notify(&self) {
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.signal.notify_one();
    }

    /// Waits until notified or `timeout` passes; returns whether it was notified.
    pub fn wait(&self, timeout: Duration) -> bool {
        let guard = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let (mut guard, _) = self
            .signal
            .wait_timeout_while(guard, timeout, |pending| !*pending)
            .unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *guard)
    }
}

/// How a job leaves the grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// It ended here: the store records its final state (and result).
    Recorded,
    /// The store never recorded it (a failed submission): it leaves no trace.
    Withdrawn,
    /// The shared store says it ended (`finished_here`: by this coordinator's write).
    Observed { finished_here: bool },
}

/// Jobs remembered in [`Inner::ended`].
const ENDED_REMEMBERED: usize = 1024;

/// Why a result was refused in a way that ends the worker's connection.
#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    #[error(transparent)]
    Violation(#[from] Violation),
    #[error("result for lease {lease} has {actual} bytes; the tile needs {expected}")]
    WrongSize {
        lease: LeaseId,
        actual: usize,
        expected: usize,
    },
    /// Too many results failed verification: the connection is refused and its subject
    /// kept out for [`BAN_COOLDOWN`].
    #[error("{strikes} results failed verification; refused for {} s", BAN_COOLDOWN.as_secs())]
    Banned { strikes: u32 },
}

/// Results failing verification that a connection may send before it is dropped.
pub const STRIKE_LIMIT: u32 = 3;
/// How long a subject whose worker was dropped for wrong results stays refused.
pub const BAN_COOLDOWN: Duration = Duration::from_secs(600);

/// What a worker's tile is checked against, held by `Arc` so that the check runs
/// outside the grid lock.
#[derive(Debug)]
pub struct CheckInputs {
    check: Arc<verify::JobCheck>,
    tile: (u32, u32),
    /// Bytes the result must have.
    pub expected: usize,
}

impl CheckInputs {
    /// Multiply-adds the check costs (to run it inline or on a blocking thread).
    pub fn cost(&self) -> usize {
        self.check.cost(self.tile)
    }

    /// Whether `checksum` is `result`'s, and if so the verdict of Freivalds' check on it,
    /// in one pass over `result` (whose size is `expected`).
    pub fn verify(
        &self,
        result: &[u8],
        checksum: u64,
    ) -> (bool, Option<Result<(), verify::Mismatch>>) {
        self.check.check_hashed(self.tile, result, checksum)
    }
}

/// The running grid. Shared by request handlers, socket tasks and the ticker.
pub struct Grid {
    inner: Mutex<Inner>,
    nudge: Arc<Nudge>,
    store: Arc<dyn Store>,
    metrics: Metrics,
    started: Instant,
}

impl Grid {
    pub fn new(store: Arc<dyn Store>, metrics: Metrics, config: SchedulerConfig) -> Arc<Grid> {
        Arc::new(Grid {
            inner: Mutex::new(Inner {
                banned: HashMap::new(),
                scheduler: Scheduler::new(config),
                jobs: HashMap::new(),
                by_name: HashMap::new(),
                workers: HashMap::new(),
                operands: HashMap::new(),
                next_job: 1,
                next_worker: 1,
                shared: false,
                ended: std::collections::VecDeque::new(),
            }),
            nudge: Arc::default(),
            store,
            metrics,
            started: Instant::now(),
        })
    }

    /// Makes this grid one of several coordinators on a shared store: jobs' tiles are
    /// handed out only when claimed ([`Grid::offer`]). Call before any job is admitted.
    pub fn share_tiles(&self) {
        self.lock().shared = true;
    }

    /// Whether this grid shares its store with other coordinators.
    pub fn is_shared(&self) -> bool {
        self.lock().shared
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn now(&self) -> Millis {
        self.started.elapsed().as_millis() as Millis
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state under the lock is kept consistent between statements that can panic;
        // a poisoned lock would otherwise stop the whole grid.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a new job in the store and schedules it; idle workers start on it at once.
    /// Returns once the job is durable. The store's write (durable stores put the
    /// operands on disk), the cutting of panels and the first tiles run side by side; if
    /// the write fails, the job is withdrawn and leaves no trace. Blocking: call it off
    /// the async runtime.
    pub fn submit(&self, job: NewJob) -> Result<JobRecord, StoreError> {
        let plan = job.plan;
        let record = JobRecord {
            id: uuid::Uuid::new_v4().to_string(),
            owner: job.owner.clone(),
            name: job.name.clone(),
            dtype: job.operands.a.dtype,
            m: plan.m,
            n: plan.n,
            k: plan.k,
            tile_m: plan.tile_m,
            tile_n: plan.tile_n,
            alpha: job.alpha,
            beta: job.beta,
            priority: job.priority,
            quorum: job.quorum,
            state: JobState::Queued,
            tiles_done: 0,
            tiles_total: plan.tile_count(),
            created_at: SystemTime::now(),
            finished_at: None,
            error: None,
        };
        let durable = self.store.insert_job(&record, &job.operands)?;
        let prepared = PreparedJob::new(job);
        let result = self.result_buffer(&record);
        let id = self.admit(record.clone(), prepared, Vec::new(), result);
        if let Err(err) = durable.wait() {
            tracing::error!(job = record.id, error = %err, "recording a job failed; withdrawn");
            let mut inner = self.lock();
            self.end(&mut inner, id, JobState::Cancelled, None, Ending::Withdrawn);
            self.apply(&mut inner);
            return Err(err);
        }
        if self.lock().shared {
            // Its tiles can be claimed now that its row is committed.
            self.nudge.notify();
        }
        self.metrics.job_submitted();
        Ok(record)
    }

    /// Resumes the store's unfinished jobs (after a restart): tiles accepted before are
    /// kept, the rest are scheduled. Returns how many jobs and kept tiles there were.
    pub fn resume(&self) -> Result<(usize, u64), StoreError> {
        let jobs = self.store.unfinished_jobs()?;
        let mut kept = 0;
        let count = jobs.len();
        for job in jobs {
            let record = job.record;
            kept += job.done.len() as u64;
            tracing::info!(
                job = record.id,
                tiles_done = job.done.len(),
                tiles_total = record.tiles_total,
                "resuming job"
            );
            self.metrics.tiles_resumed(job.done.len() as u64);
            let prepared = PreparedJob::new(NewJob::recorded(&record, job.operands));
            self.admit(record, prepared, job.done, Some(job.partial));
        }
        Ok((count, kept))
    }

    /// Where a job's accepted tiles are assembled: the whole result, or nothing on a
    /// shared store (the tiles live there).
    fn result_buffer(&self, record: &JobRecord) -> Option<Matrix> {
        (!self.lock().shared).then(|| {
            Matrix::zeros(record.dtype, record.m as usize, record.n as usize)
                .expect("shape checked at submission")
        })
    }

    /// Takes up a job another coordinator recorded in the shared store: its panels are
    /// cut here, and its tiles are handed out as they are claimed. Blocking: call it off
    /// the async runtime.
    pub fn adopt(&self, record: JobRecord, operands: JobOperands) {
        if self.has_job(&record.id) {
            return;
        }
        let prepared = PreparedJob::new(NewJob::recorded(&record, operands));
        let result = self.result_buffer(&record);
        self.admit(record, prepared, Vec::new(), result);
    }

    /// Whether a job is live here, or ended here lately.
    pub fn has_job(&self, id: &str) -> bool {
        let inner = self.lock();
        inner.by_name.contains_key(id) || inner.ended.iter().any(|e| e == id)
    }

    /// Ids of the live jobs.
    pub fn job_ids(&self) -> Vec<String> {
        let inner = self.lock();
        let mut ids: Vec<String> = inner.by_name.keys().cloned().collect();
        ids.sort_unstable();
        ids
    }

    /// Tiles this grid could hand out now beyond those it holds, with `ahead` more queued.
    pub fn tiles_wanted(&self, ahead: u64) -> u64 {
        self.lock().scheduler.wanted(ahead)
    }

    /// Tiles handed out since start (speculative copies included).
    pub fn assigned_total(&self) -> u64 {
        self.lock().scheduler.stats().assigned
    }

    /// What wakes the claims loop when this grid's workers run short of tiles.
    pub fn nudge(&self) -> Arc<Nudge> {
        self.nudge.clone()
    }

    /// Claimed tiles of job `id` become available to this grid's workers.
    pub fn offer(&self, id: &str, tiles: &[(u32, u32)]) {
        let mut inner = self.lock();
        let Some(&job) = inner.by_name.get(id) else {
            return;
        };
        let now = self.now();
        self.step(&mut inner, |s| s.offer(job, tiles, now));
    }

    /// Tiles of job `id` this grid may no longer hand out (their claim was lost): running
    /// copies are cancelled. Returns the tiles that were held.
    pub fn release(&self, id: &str, tiles: &[(u32, u32)]) -> Vec<(u32, u32)> {
        let mut inner = self.lock();
        let Some(&job) = inner.by_name.get(id) else {
            return Vec::new();
        };
        let mut released = Vec::new();
        self.step(&mut inner, |s| released = s.release(job, tiles));
        released
    }

    /// Every live job's held tiles (pending or running), by job id.
    pub fn held(&self) -> Vec<(String, Vec<(u32, u32)>)> {
        tiles_by_job(&self.lock(), Scheduler::held_of)
    }

    /// Pending tiles nobody here can compute (no worker is connected), by job id: a
    /// shared grid gives their claims back.
    pub fn idle_claims(&self) -> Vec<(String, Vec<(u32, u32)>)> {
        let inner = self.lock();
        if inner.scheduler.worker_count() > 0 {
            return Vec::new();
        }
        tiles_by_job(&inner, Scheduler::pending_of)
    }

    /// Progress of a live job as the shared store counts it (tiles accepted by every
    /// coordinator).
    pub fn set_progress(&self, id: &str, state: JobState, tiles_done: u64) {
        let mut inner = self.lock();
        let Some(&job) = inner.by_name.get(id) else {
            return;
        };
        let job = inner.jobs.get_mut(&job).expect("named jobs are live");
        let state = if state == JobState::Running {
            state
        } else {
            job.record.state
        };
        if job.record.tiles_done != tiles_done || job.record.state != state {
            job.record.tiles_done = tiles_done;
            job.record.state = state;
            let progress = job.progress();
            job.progress.send_replace(progress);
            self.update_job_gauges(&inner);
        }
    }

    /// A live job ended in the shared store (by this coordinator's own write of its last
    /// tile when `finished_here`, else on another coordinator, or it was deleted there):
    /// it stops here without writing to the store.
    pub fn ended_elsewhere(
        &self,
        id: &str,
        state: JobState,
        tiles_done: u64,
        error: Option<String>,
        finished_here: bool,
    ) {
        let mut inner = self.lock();
        let Some(&job) = inner.by_name.get(id) else {
            return;
        };
        if let Some(live) = inner.jobs.get_mut(&job) {
            live.record.tiles_done = tiles_done;
        }
        self.end(
            &mut inner,
            job,
            state,
            error,
            Ending::Observed { finished_here },
        );
        self.apply(&mut inner);
    }

    /// Makes a recorded job live: its panels are registered and the scheduler takes it.
    fn admit(
        &self,
        record: JobRecord,
        prepared: PreparedJob,
        done: Vec<(u32, u32)>,
        result: Option<Matrix>,
    ) -> JobId {
        let PreparedJob {
            job,
            a_panels,
            b_panels,
            c_tiles,
            check,
        } = prepared;
        let plan = job.plan;
        let mut inner = self.lock();
        let id = inner.next_job;
        inner.next_job += 1;
        let panel = |d: &Arc<OperandData>| Panel {
            key: d.key,
            bytes: d.bytes.len() as u64,
        };
        let tiles = JobTiles {
            id,
            priority: job.priority,
            plan,
            a_panels: a_panels.iter().map(panel).collect(),
            b_panels: b_panels.iter().map(panel).collect(),
            c_tiles: c_tiles.as_ref().map(|c| c.iter().map(panel).collect()),
            done,
            quorum: job.quorum,
            held: inner.shared.then(Vec::new),
        };
        let mut keys = Vec::new();
        for data in a_panels
            .into_iter()
            .chain(b_panels)
            .chain(c_tiles.into_iter().flatten())
        {
            keys.push(data.key);
            inner.operands.entry(data.key).or_insert((data, 0)).1 += 1;
        }
        let (progress, _) = watch::channel(Progress {
            state: record.state,
            tiles_done: record.tiles_done,
            tiles_total: record.tiles_total,
            error: None,
        });
        inner.by_name.insert(record.id.clone(), id);
        inner.jobs.insert(
            id,
            LiveJob {
                record,
                copies: HashMap::new(),
                check,
                plan,
                result,
                keys,
                progress,
                has_c: tiles.c_tiles.is_some(),
            },
        );
        let now = self.now();
        self.step(&mut inner, |s| s.add_job(tiles, now));
        self.update_job_gauges(&inner);
        if inner.shared {
            self.nudge.notify();
        }
        id
    }

    /// The live view of a job (progress more recent than the store's), if it is running.
    pub fn live_job(&self, id: &str) -> Option<JobRecord> {
        let inner = self.lock();
        let job = inner.by_name.get(id)?;
        inner.jobs.get(job).map(|j| j.record.clone())
    }

    /// Follows a live job's progress; `None` once it has finished.
    pub fn subscribe(&self, id: &str) -> Option<watch::Receiver<Progress>> {
        let inner = self.lock();
        let job = inner.by_name.get(id)?;
        inner.jobs.get(job).map(|j| j.progress.subscribe())
    }

    /// Cancels a live job: its leases are cancelled on the workers and its memory freed.
    /// Returns false when the job was not live.
    pub fn cancel(&self, id: &str) -> bool {
        let mut inner = self.lock();
        let Some(&job) = inner.by_name.get(id) else {
            return false;
        };
        self.finish(&mut inner, job, JobState::Cancelled, None);
        self.apply(&mut inner);
        true
    }

    /// A worker finished its handshake; returns its id and the receiving end of its outbox.
    pub fn register_worker(
        &self,
        kind: WorkerKind,
        subject: String,
        threads: u32,
        gflops: f64,
        cache_bytes: u64,
        agent: String,
    ) -> Result<(WorkerId, mpsc::UnboundedReceiver<Outbound>), Duration> {
        let (outbox, rx) = mpsc::unbounded_channel();
        let mut inner = self.lock();
        let now = Instant::now();
        inner.banned.retain(|_, until| *until > now);
        if let Some(until) = inner.banned.get(&subject) {
            return Err(until.duration_since(now));
        }
        let id = inner.next_worker;
        inner.next_worker += 1;
        inner.workers.insert(
            id,
            WorkerConn {
                outbox,
                info: WorkerInfo {
                    id,
                    kind,
                    subject,
                    threads,
                    tiles_done: 0,
                    gflops,
                    connected_at: SystemTime::now(),
                    agent,
                },
                lease_started: HashMap::new(),
                strikes: 0,
            },
        );
        inner.scheduler.worker_joined(id, gflops, cache_bytes);
        self.update_worker_gauges(&inner);
        Ok((id, rx))
    }

    /// A worker's connection ended: its leases return to the queue at once.
    pub fn unregister_worker(&self, worker: WorkerId) {
        let mut inner = self.lock();
        if inner.workers.remove(&worker).is_none() {
            return;
        }
        let now = self.now();
        self.step(&mut inner, |s| s.worker_left(worker, now));
        self.update_worker_gauges(&inner);
    }

    pub fn workers(&self) -> Vec<WorkerInfo> {
        let inner = self.lock();
        let mut list: Vec<WorkerInfo> = inner
            .workers
            .values()
            .map(|w| WorkerInfo {
                // The scheduler's estimate: the worker's own bench, then its results.
                gflops: inner
                    .scheduler
                    .worker_gflops(w.info.id)
                    .unwrap_or(w.info.gflops),
                ..w.info.clone()
            })
            .collect();
        list.sort_by_key(|w| w.id);
        list
    }

    pub fn ready(&self, worker: WorkerId, slots: u32) -> Result<(), Violation> {
        let mut inner = self.lock();
        let now = self.now();
        let mut outcome = Ok(());
        self.step(&mut inner, |s| outcome = s.ready(worker, slots, now));
        if inner.shared && inner.scheduler.wanted(0) > 0 {
            self.nudge.notify();
        }
        outcome
    }

    pub fn failed(&self, worker: WorkerId, lease: LeaseId, reason: &str) -> Result<(), Violation> {
        let mut inner = self.lock();
        tracing::warn!(worker, lease, reason, "worker could not compute a tile");
        if let Some(conn) = inner.workers.get_mut(&worker) {
            conn.lease_started.remove(&lease);
        }
        let now = self.now();
        let mut outcome = Ok(());
        self.step(&mut inner, |s| outcome = s.failed(worker, lease, now));
        outcome
    }

    /// What a result for `lease` must be checked against, or `None` when no check is
    /// needed (the tile is done already or the lease is not this worker's: `result` sorts
    /// those out).
    pub fn check_inputs(&self, worker: WorkerId, lease: LeaseId) -> Option<CheckInputs> {
        let inner = self.lock();
        let (job_id, tile) = match inner.scheduler.lease(worker, lease).ok()? {
            LeaseStatus::Active { job, tile } | LeaseStatus::Retired { job, tile } => (job, tile),
        };
        if !inner.scheduler.tile_open(job_id, tile) {
            return None;
        }
        let job = inner.jobs.get(&job_id)?;
        // Replicated (no check): copies are compared with each other instead.
        let check = job.check.clone()?;
        let plan = job.plan;
        Some(CheckInputs {
            check,
            tile,
            expected: plan.rows(tile.0).len() * plan.cols(tile.1).len() * job.record.dtype.size(),
        })
    }

    /// A tile result arrived. `checksum_ok` and `verdict` (Freivalds' check against
    /// [`Grid::check_inputs`], `None` when there was nothing to check) were worked out by
    /// the caller, outside the lock.
    pub fn result(
        &self,
        worker: WorkerId,
        result: TileResult,
        checksum_ok: bool,
        verdict: Option<Result<(), verify::Mismatch>>,
    ) -> Result<(), ResultError> {
        let mut inner = self.lock();
        let now = self.now();
        let (job_id, tile) = match inner.scheduler.lease(worker, result.lease)? {
            LeaseStatus::Active { job, tile } | LeaseStatus::Retired { job, tile } => (job, tile),
        };
        let started = inner
            .workers
            .get_mut(&worker)
            .and_then(|w| w.lease_started.remove(&result.lease));
        if !inner.scheduler.tile_open(job_id, tile) {
            // Someone else was first, or the job is gone: not wanted, not a fault.
            self.step(&mut inner, |s| {
                let _ = s.accept(worker, result.lease, 0, now);
            });
            return Ok(());
        }
        let job = inner
            .jobs
            .get(&job_id)
            .expect("open tiles belong to live jobs");
        let (rows, cols) = (job.plan.rows(tile.0), job.plan.cols(tile.1));
        let expected = rows.len() * cols.len() * job.record.dtype.size();
        if result.payload.len() != expected {
            self.metrics.result_refused("size");
            return Err(ResultError::WrongSize {
                lease: result.lease,
                actual: result.payload.len(),
                expected,
            });
        }
        if !checksum_ok {
            // Corrupted on the way: not the worker's arithmetic. Compute it again.
            self.metrics.result_refused("checksum");
            tracing::warn!(
                worker,
                lease = result.lease,
                "result checksum mismatch; tile re-queued"
            );
            let mut outcome = Ok(());
            self.step(&mut inner, |s| {
                outcome = s.failed(worker, result.lease, now)
            });
            return outcome.map_err(Into::into);
        }
        if let Some(Err(mismatch)) = verdict {
            // Wrong arithmetic: never written. The tile goes back to the queue for another
            // worker, and the connection collects a strike.
            self.metrics.result_refused("verification");
            let strikes = self.strike(&mut inner, worker);
            tracing::warn!(
                worker,
                lease = result.lease,
                strikes,
                %mismatch,
                "result failed verification; tile re-queued"
            );
            let mut outcome = Ok(());
            self.step(&mut inner, |s| {
                outcome = s.rejected(worker, result.lease, now)
            });
            outcome?;
            if strikes >= STRIKE_LIMIT {
                return Err(ResultError::Banned { strikes });
            }
            return Ok(());
        }
        if inner.jobs[&job_id].record.quorum.is_some() {
            return self.replica(&mut inner, worker, job_id, result, started, now);
        }
        let (lease, compute_micros) = (result.lease, result.compute_micros);
        let job = inner.jobs.get_mut(&job_id).expect("checked above");
        job.keep(self.store.as_ref(), tile, result.payload);
        if let Some(conn) = inner.workers.get_mut(&worker) {
            conn.info.tiles_done += 1;
        }
        self.metrics
            .tile_accepted(started.map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0));
        let mut outcome = Ok(false);
        self.step(&mut inner, |s| {
            outcome = s.accept(worker, lease, compute_micros, now)
        });
        outcome?;
        Ok(())
    }

    /// A copy of a replicated tile: kept until `agree` copies are equal, then written;
    /// copies that differ from the agreed one count as wrong results for their workers.
    fn replica(
        &self,
        inner: &mut Inner,
        worker: WorkerId,
        job_id: JobId,
        result: TileResult,
        started: Option<Instant>,
        now: Millis,
    ) -> Result<(), ResultError> {
        let mut outcome = Ok(None);
        self.step(inner, |s| {
            outcome = s.returned(worker, result.lease, result.compute_micros, now)
        });
        let Some((_, tile)) = outcome? else {
            return Ok(());
        };
        let job = inner
            .jobs
            .get_mut(&job_id)
            .expect("open tiles belong to live jobs");
        let quorum = job.record.quorum.expect("a replicated job");
        let digest = *blake3::hash(&result.payload).as_bytes();
        let copies = job.copies.entry(tile).or_default();
        copies.push(Replica {
            worker,
            digest,
            payload: result.payload,
        });
        let agreed = copies
            .iter()
            .map(|c| c.digest)
            .find(|d| copies.iter().filter(|c| c.digest == *d).count() >= quorum.agree as usize);
        let Some(agreed) = agreed else {
            let returned = copies.len() as u32;
            let wanted = inner
                .scheduler
                .copies_wanted(job_id, tile)
                .unwrap_or(quorum.agree);
            if returned >= wanted {
                let mut more = false;
                self.step(inner, |s| more = s.more_copies(job_id, tile, now));
                if !more {
                    let error = format!(
                        "no {} of {} copies of tile ({}, {}) agreed",
                        quorum.agree, quorum.of, tile.0, tile.1
                    );
                    tracing::warn!(job = job_id, error, "replicated job failed");
                    self.finish(inner, job_id, JobState::Failed, Some(error));
                    self.apply(inner);
                }
            }
            return Ok(());
        };
        let copies = job.copies.remove(&tile).unwrap_or_default();
        let payload = copies
            .iter()
            .find(|c| c.digest == agreed)
            .expect("the agreed digest is a copy's")
            .payload
            .clone();
        job.keep(self.store.as_ref(), tile, payload);
        self.metrics
            .tile_accepted(started.map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0));
        let mut banned_here = None;
        for copy in &copies {
            if copy.digest == agreed {
                if let Some(conn) = inner.workers.get_mut(&copy.worker) {
                    conn.info.tiles_done += 1;
                }
                continue;
            }
            self.metrics.result_refused("replication");
            let strikes = self.strike(inner, copy.worker);
            tracing::warn!(
                worker = copy.worker,
                strikes,
                "copy differs from the agreed result"
            );
            if strikes >= STRIKE_LIMIT {
                if copy.worker == worker {
                    banned_here = Some(strikes);
                } else if let Some(conn) = inner.workers.get(&copy.worker) {
                    let _ = conn.outbox.send(Outbound::Close {
                        code: 1008,
                        reason: ResultError::Banned { strikes }.to_string(),
                    });
                }
            }
        }
        self.step(inner, |s| {
            s.complete(job_id, tile, now);
        });
        match banned_here {
            Some(strikes) => Err(ResultError::Banned { strikes }),
            None => Ok(()),
        }
    }

    /// Counts a wrong result against a connection; at the limit its subject is refused
    /// for [`BAN_COOLDOWN`]. Returns the connection's strikes.
    fn strike(&self, inner: &mut Inner, worker: WorkerId) -> u32 {
        let Some(conn) = inner.workers.get_mut(&worker) else {
            return 0;
        };
        conn.strikes += 1;
        let strikes = conn.strikes;
        if strikes == STRIKE_LIMIT {
            let subject = conn.info.subject.clone();
            inner.banned.insert(subject, Instant::now() + BAN_COOLDOWN);
            self.metrics.worker_banned();
        }
        strikes
    }

    /// Advances the clock: expired leases are reassigned, stragglers duplicated.
    pub fn tick(&self) {
        let mut inner = self.lock();
        let now = self.now();
        self.step(&mut inner, |s| s.tick(now));
    }

    /// Runs one scheduler event and carries out its decisions.
    fn step(&self, inner: &mut Inner, event: impl FnOnce(&mut Scheduler)) {
        let before = inner.scheduler.stats();
        event(&mut inner.scheduler);
        self.apply(inner);
        self.metrics.scheduler_step(before, inner.scheduler.stats());
    }

    /// Carries out the scheduler's decisions until it has none left (finishing a job
    /// makes more: cancels and forgets).
    fn apply(&self, inner: &mut Inner) {
        loop {
            let commands = inner.scheduler.drain();
            if commands.is_empty() {
                return;
            }
            for command in commands {
                self.carry_out(inner, command);
            }
        }
    }

    fn carry_out(&self, inner: &mut Inner, command: Command) {
        match command {
            Command::SendOperand { worker, key } => {
                if let (Some(conn), Some((data, _))) =
                    (inner.workers.get(&worker), inner.operands.get(&key))
                {
                    let _ = conn.outbox.send(Outbound::Operand(data.clone()));
                }
            }
            Command::Forget { worker, keys } => send(inner, worker, ToWorker::Forget { keys }),
            Command::Cancel { worker, lease } => {
                if let Some(conn) = inner.workers.get_mut(&worker) {
                    conn.lease_started.remove(&lease);
                }
                send(inner, worker, ToWorker::Cancel { lease });
            }
            Command::Assign(a) => {
                let shared = inner.shared;
                let Some(job) = inner.jobs.get_mut(&a.job) else {
                    return;
                };
                let (rows, cols) = (job.plan.rows(a.tile.0), job.plan.cols(a.tile.1));
                let frame = ToWorker::Assign(protocol::Assign {
                    lease: a.lease,
                    job: job.record.id.clone(),
                    tile: a.tile,
                    dtype: job.record.dtype,
                    m: rows.len() as u32,
                    n: cols.len() as u32,
                    k: job.plan.k,
                    alpha: job.record.alpha,
                    beta: if job.has_c { job.record.beta } else { 0.0 },
                    a: a.a,
                    b: a.b,
                    c: a.c,
                    deadline_ms: a.deadline_ms,
                });
                if shared {
                    self.store.lease_issued(LeaseIssued {
                        job: job.record.id.clone(),
                        tile: a.tile,
                        lease: a.lease,
                        worker: a.worker,
                        speculative: a.speculative,
                        deadline_ms: a.deadline_ms,
                    });
                }
                if job.record.state == JobState::Queued {
                    job.record.state = JobState::Running;
                    let progress = job.progress();
                    job.progress.send_replace(progress);
                    if let Err(err) = self.store.update_job(&job.record) {
                        tracing::error!(job = job.record.id, error = %err, "store update failed");
                    }
                    self.update_job_gauges(inner);
                }
                if let Some(conn) = inner.workers.get_mut(&a.worker) {
                    conn.lease_started.insert(a.lease, Instant::now());
                }
                send(inner, a.worker, frame);
            }
            // Sharing a database, a job is done when the database says so: the write of its
            // last tile ends it here (and on the others at their next poll), so nobody
            // reads "done" here before the database has every tile.
            Command::JobComplete { .. } if inner.shared => {}
            Command::JobComplete { job } => self.finish(inner, job, JobState::Done, None),
        }
    }

    /// Ends a live job: its record reaches its final state in the store (with the result
    /// when done), its leases are cancelled and its operands released.
    fn finish(&self, inner: &mut Inner, job_id: JobId, state: JobState, error: Option<String>) {
        self.end(inner, job_id, state, error, Ending::Recorded);
    }

    /// [`Grid::finish`], telling the store only when the job ended here (`Recorded`).
    fn end(
        &self,
        inner: &mut Inner,
        job_id: JobId,
        state: JobState,
        error: Option<String>,
        ending: Ending,
    ) {
        let Some(mut job) = inner.jobs.remove(&job_id) else {
            return;
        };
        inner.by_name.remove(&job.record.id);
        inner.ended.push_back(job.record.id.clone());
        if inner.ended.len() > ENDED_REMEMBERED {
            inner.ended.pop_front();
        }
        inner.scheduler.remove_job(job_id);
        for key in &job.keys {
            if let Some(entry) = inner.operands.get_mut(key) {
                entry.1 -= 1;
                if entry.1 == 0 {
                    inner.operands.remove(key);
                }
            }
        }
        job.record.state = state;
        job.record.finished_at = Some(SystemTime::now());
        job.record.error = error;
        let stored = ending == Ending::Recorded;
        let LiveJob {
            record,
            result,
            progress,
            ..
        } = job;
        if stored
            && state == JobState::Done
            && let Some(result) = result
            && let Err(err) = self.store.put_result(&record.id, Arc::new(result))
        {
            tracing::error!(job = record.id, error = %err, "storing result failed");
        }
        if stored && let Err(err) = self.store.update_job(&record) {
            tracing::error!(job = record.id, error = %err, "store update failed");
        }
        progress.send_replace(Progress {
            state,
            tiles_done: record.tiles_done,
            tiles_total: record.tiles_total,
            error: record.error.clone(),
        });
        if matches!(
            ending,
            Ending::Recorded
                | Ending::Observed {
                    finished_here: true
                }
        ) {
            // Counted once across coordinators sharing a store: where it ended.
            self.metrics.job_finished(state.name());
        }
        tracing::info!(job = record.id, state = state.name(), "job finished");
        self.update_job_gauges(inner);
    }

    fn update_job_gauges(&self, inner: &Inner) {
        for state in [JobState::Queued, JobState::Running] {
            let count = inner
                .jobs
                .values()
                .filter(|j| j.record.state == state)
                .count();
            self.metrics.set_jobs_active(state.name(), count as i64);
        }
    }

    fn update_worker_gauges(&self, inner: &Inner) {
        for kind in [WorkerKind::Native, WorkerKind::Browser] {
            let count = inner
                .workers
                .values()
                .filter(|w| w.info.kind == kind)
                .count();
            self.metrics.set_workers(kind.name(), count as i64);
        }
    }
}

/// `tiles` of each live job that has any, by job id.
fn tiles_by_job(
    inner: &Inner,
    tiles: impl Fn(&Scheduler, JobId) -> Vec<(u32, u32)>,
) -> Vec<(String, Vec<(u32, u32)>)> {
    inner
        .by_name
        .iter()
        .map(|(name, &job)| (name.clone(), tiles(&inner.scheduler, job)))
        .filter(|(_, tiles)| !tiles.is_empty())
        .collect()
}

fn send(inner: &Inner, worker: WorkerId, frame: ToWorker) {
    if let Some(conn) = inner.workers.get(&worker) {
        // A closed outbox means the socket task is ending; it unregisters the worker.
        let _ = conn.outbox.send(Outbound::Frame(frame));
    }
}
