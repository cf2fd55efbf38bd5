//! Where jobs live: the [`Store`] trait, its in-memory implementation, and the embedded
//! SQLite store ([`sqlite`]).
//!
//! The grid keeps what a running job needs in memory (operand panels, the result being
//! assembled); the store is the record users read (job list, states, results) and what a
//! restart resumes from: every accepted tile is handed to it, so a restart computes only
//! the tiles that were not. A submission is durable once the [`Durable`] that
//! `insert_job` returns has been waited on; the writes that follow (progress, tiles, results) may be write-behind and batched, and the
//! store answers reads with them at once.

pub mod postgres;
pub mod sqlite;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tabgrid_shared::Matrix;
use tabgrid_shared::tiling::TilePlan;

/// Lifecycle of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Done,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// The state named `name` (as [`JobState::name`] writes it).
    pub fn parse(name: &str) -> Result<JobState, StoreError> {
        JobState::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown job state {name:?} in the store")))
    }

    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }
}

/// What is known of a job, without its matrices.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRecord {
    pub id: String,
    pub owner: String,
    pub name: Option<String>,
    pub dtype: tabgrid_shared::Dtype,
    pub m: u32,
    pub n: u32,
    pub k: u32,
    /// The tile shape the job was cut with (a restart must cut it the same way).
    pub tile_m: u32,
    pub tile_n: u32,
    pub alpha: f64,
    pub beta: f64,
    pub priority: i32,
    /// Replication instead of Freivalds' check (`None`: every tile checked).
    pub quorum: Option<crate::scheduler::Quorum>,
    pub state: JobState,
    pub tiles_done: u64,
    pub tiles_total: u64,
    pub created_at: SystemTime,
    pub finished_at: Option<SystemTime>,
    pub error: Option<String>,
}

impl JobRecord {
    pub fn plan(&self) -> TilePlan {
        TilePlan::new(self.m, self.n, self.k, self.tile_m, self.tile_n)
    }
}

/// The inputs of a job.
#[derive(Clone, Debug)]
pub struct JobOperands {
    pub a: Arc<Matrix>,
    pub b: Arc<Matrix>,
    pub c: Option<Arc<Matrix>>,
}

/// An unfinished job as a restart finds it.
#[derive(Debug)]
pub struct ResumedJob {
    pub record: JobRecord,
    pub operands: JobOperands,
    /// Tiles whose accepted results are in `partial` (checked against their checksums).
    pub done: Vec<(u32, u32)>,
    /// The result so far: the `done` tiles are filled in.
    pub partial: Matrix,
}

/// An accepted tile handed to the store.
#[derive(Debug)]
pub struct TileWrite {
    pub job: String,
    /// The tile's index in the job's plan.
    pub tile: (u32, u32),
    /// Its first row and column in the result.
    pub row: usize,
    pub col: usize,
    pub rows: usize,
    pub cols: usize,
    /// Columns of the whole result.
    pub width: usize,
    /// `rows × cols` elements, row-major little-endian.
    pub payload: Vec<u8>,
}

/// A lease handed to a worker, for the store's record of who computed what.
#[derive(Clone, Debug)]
pub struct LeaseIssued {
    pub job: String,
    pub tile: (u32, u32),
    pub lease: u64,
    pub worker: u64,
    /// A deliberate duplicate of a straggling tile.
    pub speculative: bool,
    /// Time the worker was given, from now.
    pub deadline_ms: u64,
}

/// A write on its way to disk: [`Durable::wait`] returns once it is there (or why not).
#[derive(Debug)]
#[must_use = "a submission is durable only once waited on"]
pub struct Durable(Option<std::sync::mpsc::Receiver<Result<(), StoreError>>>);

impl Durable {
    /// Nothing to wait for (stores that keep nothing on disk).
    pub fn done() -> Durable {
        Durable(None)
    }

    pub(crate) fn pending(rx: std::sync::mpsc::Receiver<Result<(), StoreError>>) -> Durable {
        Durable(Some(rx))
    }

    /// Blocks until the write is durable.
    pub fn wait(self) -> Result<(), StoreError> {
        match self.0 {
            None => Ok(()),
            Some(rx) => rx
                .recv()
                .unwrap_or_else(|_| Err(StoreError::Backend("the store writer stopped".into()))),
        }
    }
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job {0} not found")]
    NotFound(String),
    /// The data dir holds no store.
    #[error("{0}")]
    NoStore(String),
    /// The data dir's quota cannot hold a new job.
    #[error(
        "the coordinator's storage is full: this job needs {needed} bytes and {free} of the {quota}-byte quota are free"
    )]
    Quota { needed: u64, free: u64, quota: u64 },
    /// A stored file no longer matches its checksum.
    #[error("{0}")]
    Corrupt(String),
    #[error("store backend: {0}")]
    Backend(String),
}

impl From<std::io::Error> for StoreError {
    fn from(err: std::io::Error) -> Self {
        StoreError::Backend(format!("file: {err}"))
    }
}

/// Job persistence. Implementations are shared between request handlers and the grid, so
/// they synchronise internally; every method is short and never waits on the network.
pub trait Store: Send + Sync + 'static {
    /// Records a new job and its operands, all or nothing. Refusals that need no IO
    /// ([`StoreError::Quota`]) come at once; the write itself may go on in the background
    /// (so the job can be prepared meanwhile) and is durable when the returned
    /// [`Durable`] has been waited on. Writes for the job handed over after this call are
    /// carried out after it.
    fn insert_job(&self, job: &JobRecord, operands: &JobOperands) -> Result<Durable, StoreError>;
    /// Replaces a job's mutable fields (state, progress, timestamps, error).
    fn update_job(&self, job: &JobRecord) -> Result<(), StoreError>;
    /// Keeps an accepted tile so that a restart does not compute it again. Called under
    /// the grid's lock: it must not wait on IO (durable stores queue it).
    fn tile_accepted(&self, tile: TileWrite) -> Result<(), StoreError>;
    /// Stores the finished result of a job.
    fn put_result(&self, id: &str, result: Arc<Matrix>) -> Result<(), StoreError>;
    fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError>;
    /// All jobs, or those of one owner, oldest first.
    fn list_jobs(&self, owner: Option<&str>) -> Result<Vec<JobRecord>, StoreError>;
    fn result(&self, id: &str) -> Result<Option<Arc<Matrix>>, StoreError>;
    /// Deletes a job with its operands and result; false when there was none.
    fn delete_job(&self, id: &str) -> Result<bool, StoreError>;
    /// Jobs to resume after a restart, with their operands and accepted tiles.
    fn unfinished_jobs(&self) -> Result<Vec<ResumedJob>, StoreError>;
    /// Records a lease handed out (stores shared by several coordinators keep them, so
    /// who computed what can be checked across coordinators). Called under the grid's
    /// lock: it must not wait on IO.
    fn lease_issued(&self, _lease: LeaseIssued) {}
    /// Waits until every write handed over so far is durable.
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[derive(Default)]
struct MemoryJob {
    record: Option<JobRecord>,
    operands: Option<JobOperands>,
    result: Option<Arc<Matrix>>,
}

/// Everything in process memory: gone with the process. For tests, benchmarks and
/// `tabgrid cluster` on a laptop.
#[derive(Default)]
pub struct MemoryStore {
    /// One lock: every operation is a few map lookups, never IO.
    jobs: Mutex<HashMap<String, MemoryJob>>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, MemoryJob>> {
        // A panic elsewhere while holding the lock leaves plain data behind; keep serving.
        self.jobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Store for MemoryStore {
    fn insert_job(&self, job: &JobRecord, operands: &JobOperands) -> Result<Durable, StoreError> {
        self.lock().insert(
            job.id.clone(),
            MemoryJob {
                record: Some(job.clone()),
                operands: Some(operands.clone()),
                result: None,
            },
        );
        Ok(Durable::done())
    }

    fn update_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        let mut jobs = self.lock();
        let entry = jobs
            .get_mut(&job.id)
            .ok_or_else(|| StoreError::NotFound(job.id.clone()))?;
        if job.state.is_terminal() {
            // Operands are only needed to compute; drop them with the job's last tile.
            entry.operands = None;
        }
        entry.record = Some(job.clone());
        Ok(())
    }

    fn tile_accepted(&self, _tile: TileWrite) -> Result<(), StoreError> {
        // The grid's own copy of the result is all there is: nothing survives the process.
        Ok(())
    }

    fn put_result(&self, id: &str, result: Arc<Matrix>) -> Result<(), StoreError> {
        let mut jobs = self.lock();
        let entry = jobs
            .get_mut(id)
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        entry.result = Some(result);
        Ok(())
    }

    fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        Ok(self.lock().get(id).and_then(|j| j.record.clone()))
    }

    fn list_jobs(&self, owner: Option<&str>) -> Result<Vec<JobRecord>, StoreError> {
        let mut jobs: Vec<JobRecord> = self
            .lock()
            .values()
            .filter_map(|j| j.record.clone())
            .filter(|r| owner.is_none_or(|o| r.owner == o))
            .collect();
        jobs.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(jobs)
    }

    fn result(&self, id: &str) -> Result<Option<Arc<Matrix>>, StoreError> {
        Ok(self.lock().get(id).and_then(|j| j.result.clone()))
    }

    fn delete_job(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.lock().remove(id).is_some())
    }

    fn unfinished_jobs(&self) -> Result<Vec<ResumedJob>, StoreError> {
        let mut jobs = Vec::new();
        for job in self.lock().values() {
            if let (Some(record), Some(operands)) = (&job.record, &job.operands)
                && !record.state.is_terminal()
            {
                let partial = Matrix::zeros(record.dtype, record.m as usize, record.n as usize)
                    .map_err(|e| StoreError::Backend(e.to_string()))?;
                jobs.push(ResumedJob {
                    record: JobRecord {
                        tiles_done: 0,
                        ..record.clone()
                    },
                    operands: operands.clone(),
                    done: Vec::new(),
                    partial,
                });
            }
        }
        Ok(jobs)
    }
}
