//! Where jobs live: the [`Store`] trait and its in-memory implementation.
//!
//! The grid keeps what a running job needs in memory (operand panels, the result being
//! assembled); the store is the record users read (job list, states, results) and what a
//! restart resumes from. The trait is shaped for the durable stores that follow (SQLite
//! embedded, PostgreSQL shared): every call is one short transaction, tile acceptances
//! arrive in batches so commits can be grouped, and large matrices are whole values the
//! implementation may keep as files.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tabgrid_shared::Matrix;

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
    pub alpha: f64,
    pub beta: f64,
    pub priority: i32,
    pub state: JobState,
    pub tiles_done: u64,
    pub tiles_total: u64,
    pub created_at: SystemTime,
    pub finished_at: Option<SystemTime>,
    pub error: Option<String>,
}

/// The inputs of a job.
#[derive(Clone, Debug)]
pub struct JobOperands {
    pub a: Arc<Matrix>,
    pub b: Arc<Matrix>,
    pub c: Option<Arc<Matrix>>,
}

/// Why the store failed. Durable stores add their own causes.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job {0} not found")]
    NotFound(String),
    #[error("store backend: {0}")]
    Backend(String),
}

/// Job persistence. Implementations are shared between request handlers and the grid, so
/// they synchronise internally; every method is short and never waits on the network.
pub trait Store: Send + Sync + 'static {
    /// Records a new job and its operands, all or nothing.
    fn insert_job(&self, job: &JobRecord, operands: &JobOperands) -> Result<(), StoreError>;
    /// Replaces a job's mutable fields (state, progress, timestamps, error).
    fn update_job(&self, job: &JobRecord) -> Result<(), StoreError>;
    /// Stores the finished result of a job.
    fn put_result(&self, id: &str, result: Arc<Matrix>) -> Result<(), StoreError>;
    fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError>;
    /// All jobs, or those of one owner, oldest first.
    fn list_jobs(&self, owner: Option<&str>) -> Result<Vec<JobRecord>, StoreError>;
    fn result(&self, id: &str) -> Result<Option<Arc<Matrix>>, StoreError>;
    /// Deletes a job with its operands and result; false when there was none.
    fn delete_job(&self, id: &str) -> Result<bool, StoreError>;
    /// Jobs to resume after a restart, with their operands.
    fn unfinished_jobs(&self) -> Result<Vec<(JobRecord, JobOperands)>, StoreError>;
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
    fn insert_job(&self, job: &JobRecord, operands: &JobOperands) -> Result<(), StoreError> {
        self.lock().insert(
            job.id.clone(),
            MemoryJob {
                record: Some(job.clone()),
                operands: Some(operands.clone()),
                result: None,
            },
        );
        Ok(())
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

    fn unfinished_jobs(&self) -> Result<Vec<(JobRecord, JobOperands)>, StoreError> {
        Ok(self
            .lock()
            .values()
            .filter_map(|j| match (&j.record, &j.operands) {
                (Some(r), Some(o)) if !r.state.is_terminal() => Some((r.clone(), o.clone())),
                _ => None,
            })
            .collect())
    }
}
