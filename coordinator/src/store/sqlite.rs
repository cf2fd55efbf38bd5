//! The embedded store: job records in SQLite (WAL), matrices as files beside it.
//!
//! Layout of a data dir:
//!
//! ```text
//! tabgrid.db            jobs and accepted tiles (WAL: also -wal and -shm)
//! jobs/<id>/a.npy       operands, written atomically at submission (b.npy, c.npy)
//! jobs/<id>/partial.npy the result while it is computed, each accepted tile written in
//!                       place before its row commits; renamed to result.npy when done
//! jobs/<id>/result.npy  the finished result
//! secret                the JWT secret (see `auth`)
//! ```
//!
//! A submission is durable when [`Store::insert_job`] returns: files first (flushed),
//! then the row (`synchronous=FULL`), so a crash in between leaves a directory without a
//! row, which the next start removes. Everything after that is write-behind: one writer
//! thread takes what the grid hands over (tiles, progress, results), writes a batch of it
//! to the files and commits the batch in one transaction. Reads see pending writes at once
//! through an overlay kept until they are committed.
//!
//! Tiles are written and committed without flushing (`synchronous=NORMAL`): that
//! survives the process being killed, and a power cut can only lose recent tiles, because
//! a tile's row carries the BLAKE3 of its bytes and a restart keeps only tiles whose bytes
//! in `partial.npy` still match. A job's end (its result, its final state) is flushed.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Row, params};
use tabgrid_shared::{Dtype, Matrix};

use super::{Durable, JobOperands, JobRecord, JobState, ResumedJob, Store, StoreError, TileWrite};
use crate::files::{sync_dir, write_atomic_parts};
use crate::npy;

/// The database file in the data dir.
pub const DB_FILE: &str = "tabgrid.db";
/// Locked while a store has the data dir open: two coordinators on one data dir would
/// both resume its jobs.
const LOCK_FILE: &str = "tabgrid.lock";
/// The folder of per-job files in the data dir.
pub const JOBS_DIR: &str = "jobs";
const PARTIAL: &str = "partial.npy";
const RESULT: &str = "result.npy";
const OPERANDS: [&str; 3] = ["a.npy", "b.npy", "c.npy"];
/// Most writes the writer commits in one transaction.
const MAX_BATCH: usize = 512;

/// Schema migrations, applied in order; `PRAGMA user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE jobs (
    id          TEXT PRIMARY KEY NOT NULL,
    owner       TEXT NOT NULL,
    name        TEXT,
    dtype       TEXT NOT NULL,
    m           INTEGER NOT NULL,
    n           INTEGER NOT NULL,
    k           INTEGER NOT NULL,
    tile_m      INTEGER NOT NULL,
    tile_n      INTEGER NOT NULL,
    alpha       REAL NOT NULL,
    beta        REAL NOT NULL,
    priority    INTEGER NOT NULL,
    state       TEXT NOT NULL,
    tiles_done  INTEGER NOT NULL,
    tiles_total INTEGER NOT NULL,
    created_at  INTEGER NOT NULL, -- microseconds since the Unix epoch
    finished_at INTEGER,
    error       TEXT,
    has_c       INTEGER NOT NULL,
    a_sum       BLOB NOT NULL,    -- BLAKE3 of a.npy, b.npy, c.npy, result.npy
    b_sum       BLOB NOT NULL,
    c_sum       BLOB,
    result_sum  BLOB,
    bytes       INTEGER NOT NULL  -- disk held by the job's files, for the quota
) STRICT;
CREATE INDEX jobs_by_created ON jobs (created_at, id);
CREATE INDEX jobs_by_owner ON jobs (owner, created_at);
CREATE TABLE tiles (
    job_id TEXT NOT NULL,
    ti     INTEGER NOT NULL,
    tj     INTEGER NOT NULL,
    sum    BLOB NOT NULL,         -- BLAKE3 of the tile's bytes in partial.npy
    PRIMARY KEY (job_id, ti, tj)
) STRICT, WITHOUT ROWID;
"#,
    r#"
-- Replication instead of Freivalds' check: agree of `of` copies (NULL: checked).
ALTER TABLE jobs ADD COLUMN quorum_agree INTEGER;
ALTER TABLE jobs ADD COLUMN quorum_of INTEGER;
"#,
];

/// Settings of the embedded store.
#[derive(Clone, Copy, Debug, Default)]
pub struct SqliteOptions {
    /// Most bytes the jobs' files may hold together; a submission that would pass it is
    /// refused with [`StoreError::Quota`].
    pub quota: Option<u64>,
}

/// A new job for the writer thread.
struct Insert {
    record: JobRecord,
    operands: JobOperands,
    /// Disk it takes, reserved against the quota until its row counts.
    bytes: u64,
    ack: mpsc::SyncSender<Result<(), StoreError>>,
}

/// A write handed to the writer thread.
enum Write {
    Insert(Box<Insert>),
    Tile(TileWrite),
    Record {
        seq: u64,
        record: JobRecord,
    },
    Result {
        seq: u64,
        id: String,
        matrix: Arc<Matrix>,
    },
    Flush(mpsc::SyncSender<Result<(), String>>),
}

/// Writes handed over and not yet committed: reads answer with them.
#[derive(Default)]
struct Overlay {
    seq: u64,
    records: HashMap<String, (u64, JobRecord)>,
    results: HashMap<String, (u64, Arc<Matrix>)>,
    /// The last batch that failed, reported by `flush`.
    failed: Option<String>,
}

struct Shared {
    dir: PathBuf,
    overlay: Mutex<Overlay>,
    /// Held while a job's folder is written to or removed.
    files: Mutex<()>,
    /// Bytes of submissions on their way to disk.
    reserved: Mutex<u64>,
}

/// The SQLite store. See the module docs for what is where.
pub struct SqliteStore {
    shared: Arc<Shared>,
    /// Held (an exclusive lock) as long as the store is open.
    _lock: File,
    /// Reads, submissions and deletions (the writer thread has its own connection).
    conn: Mutex<Connection>,
    /// Serialises submissions, so that two cannot both pass the quota.
    inserting: Mutex<()>,
    writes: Mutex<Option<mpsc::Sender<Write>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    options: SqliteOptions,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn backend(err: rusqlite::Error) -> StoreError {
    StoreError::Backend(format!("sqlite: {err}"))
}

fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

fn from_micros(us: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(us.max(0) as u64)
}

fn hash(bytes: &[u8]) -> Vec<u8> {
    blake3::hash(bytes).as_bytes().to_vec()
}

/// Opens a connection with the settings every connection of the store uses.
fn connect(path: &Path) -> Result<Connection, StoreError> {
    connect_with(path, "FULL")
}

fn connect_with(path: &Path, synchronous: &str) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(backend)?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(backend)?;
    // WAL: readers never wait for the writer. FULL: a commit is on disk when it returns.
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(backend)?;
    conn.pragma_update(None, "synchronous", synchronous)
        .map_err(backend)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(backend)?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::Backend(format!(
            "the database has schema version {version}, newer than this tabgrid knows ({known}); \
             use a newer tabgrid"
        )));
    }
    for (n, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction().map_err(backend)?;
        tx.execute_batch(sql).map_err(backend)?;
        tx.pragma_update(None, "user_version", (n + 1) as i64)
            .map_err(backend)?;
        tx.commit().map_err(backend)?;
    }
    Ok(())
}

const COLUMNS: &str = "id, owner, name, dtype, m, n, k, tile_m, tile_n, alpha, beta, priority, \
                       state, tiles_done, tiles_total, created_at, finished_at, error, \
                       quorum_agree, quorum_of";

fn record_from(row: &Row<'_>) -> rusqlite::Result<Result<JobRecord, StoreError>> {
    let dtype: String = row.get(3)?;
    let state: String = row.get(12)?;
    let finished: Option<i64> = row.get(16)?;
    let dtype = match Dtype::parse(&dtype) {
        Ok(d) => d,
        Err(e) => return Ok(Err(StoreError::Corrupt(e.to_string()))),
    };
    let state = match JobState::parse(&state) {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    Ok(Ok(JobRecord {
        id: row.get(0)?,
        owner: row.get(1)?,
        name: row.get(2)?,
        dtype,
        m: row.get(4)?,
        n: row.get(5)?,
        k: row.get(6)?,
        tile_m: row.get(7)?,
        tile_n: row.get(8)?,
        alpha: row.get(9)?,
        beta: row.get(10)?,
        priority: row.get(11)?,
        state,
        tiles_done: row.get::<_, i64>(13)? as u64,
        tiles_total: row.get::<_, i64>(14)? as u64,
        created_at: from_micros(row.get(15)?),
        finished_at: finished.map(from_micros),
        error: row.get(17)?,
        quorum: match (
            row.get::<_, Option<u32>>(18)?,
            row.get::<_, Option<u32>>(19)?,
        ) {
            (Some(agree), Some(of)) => Some(crate::scheduler::Quorum { agree, of }),
            _ => None,
        },
    }))
}

impl Shared {
    fn job_dir(&self, id: &str) -> PathBuf {
        self.dir.join(JOBS_DIR).join(id)
    }
}

/// A job id is a UUID from the grid; anything else must never become a path.
fn safe_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

impl SqliteStore {
    /// Opens (or creates) the store in `dir`: applies migrations, removes what a crash
    /// left half-written, and starts the writer thread.
    pub fn open(dir: &Path, options: SqliteOptions) -> Result<SqliteStore, StoreError> {
        std::fs::create_dir_all(dir.join(JOBS_DIR))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))?;
        if let Err(err) = lock.try_lock() {
            return Err(StoreError::Backend(match err {
                std::fs::TryLockError::WouldBlock => format!(
                    "{} is in use by another tabgrid coordinator; give each its own --data-dir",
                    dir.display()
                ),
                std::fs::TryLockError::Error(err) => {
                    format!("cannot lock {}: {err}", dir.join(LOCK_FILE).display())
                }
            }));
        }
        let db = dir.join(DB_FILE);
        let mut conn = connect(&db)?;
        migrate(&mut conn)?;
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            overlay: Mutex::new(Overlay::default()),
            files: Mutex::new(()),
            reserved: Mutex::new(0),
        });
        clean_up(&conn, &shared)?;
        let writer_conn = connect_with(&db, "NORMAL")?;
        let (tx, rx) = mpsc::channel();
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("store-writer".into())
                .spawn(move || writer(writer_conn, shared, rx))?
        };
        Ok(SqliteStore {
            shared,
            _lock: lock,
            conn: Mutex::new(conn),
            inserting: Mutex::new(()),
            writes: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            options,
        })
    }

    fn send(&self, write: Write) -> Result<(), StoreError> {
        lock(&self.writes)
            .as_ref()
            .and_then(|tx| tx.send(write).ok())
            .ok_or_else(|| StoreError::Backend("the store is closed".into()))
    }

    /// Bytes the jobs' files hold, as the quota counts them.
    pub fn used_bytes(&self) -> Result<u64, StoreError> {
        let used: i64 = lock(&self.conn)
            .query_row("SELECT COALESCE(SUM(bytes), 0) FROM jobs", [], |r| r.get(0))
            .map_err(backend)?;
        Ok(used.max(0) as u64)
    }

    /// Waits for pending writes and stops the writer thread.
    pub fn close(&self) -> Result<(), StoreError> {
        let flushed = self.flush();
        drop(lock(&self.writes).take());
        if let Some(handle) = lock(&self.writer).take() {
            let _ = handle.join();
        }
        flushed
    }

    fn load_record(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let conn = lock(&self.conn);
        let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1");
        conn.query_row(&sql, [id], record_from)
            .optional()
            .map_err(backend)?
            .transpose()
    }

    /// Reads one of a job's `.npy` files and checks it against its checksum.
    fn read_npy(
        &self,
        id: &str,
        file: &str,
        dtype: Dtype,
        sum: &[u8],
    ) -> Result<Matrix, StoreError> {
        let path = self.shared.job_dir(id).join(file);
        let bytes = std::fs::read(&path)
            .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display())))?;
        if hash(&bytes) != sum {
            return Err(StoreError::Corrupt(format!(
                "{} does not match its checksum",
                path.display()
            )));
        }
        npy::read(file, &bytes, dtype)
            .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display())))
    }

    fn resume(&self, record: JobRecord) -> Result<ResumedJob, StoreError> {
        let id = record.id.clone();
        let (sums, tiles) = {
            let conn = lock(&self.conn);
            let sums: (Vec<u8>, Vec<u8>, Option<Vec<u8>>) = conn
                .query_row(
                    "SELECT a_sum, b_sum, c_sum FROM jobs WHERE id = ?1",
                    [&id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .map_err(backend)?;
            let mut stmt = conn
                .prepare("SELECT ti, tj, sum FROM tiles WHERE job_id = ?1")
                .map_err(backend)?;
            let tiles = stmt
                .query_map([&id], |r| {
                    Ok((
                        r.get::<_, u32>(0)?,
                        r.get::<_, u32>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                    ))
                })
                .map_err(backend)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)?;
            (sums, tiles)
        };
        let dtype = record.dtype;
        let a = self.read_npy(&id, OPERANDS[0], dtype, &sums.0)?;
        let b = self.read_npy(&id, OPERANDS[1], dtype, &sums.1)?;
        let c = match &sums.2 {
            Some(sum) => Some(Arc::new(self.read_npy(&id, OPERANDS[2], dtype, sum)?)),
            None => None,
        };
        let (m, n) = (record.m as usize, record.n as usize);
        let path = self.shared.job_dir(&id).join(PARTIAL);
        let read = std::fs::read(&path)
            .ok()
            .and_then(|bytes| npy::read(PARTIAL, &bytes, dtype).ok())
            .filter(|p| (p.rows, p.cols) == (m, n));
        let partial = match read {
            Some(partial) => partial,
            None => {
                // Without its partial result the job starts over; the file is made anew.
                tracing::warn!(
                    job = id,
                    "partial result missing or damaged; recomputing all tiles"
                );
                create_partial(&path, dtype, m, n)?;
                Matrix::zeros(dtype, m, n).map_err(|e| StoreError::Corrupt(e.to_string()))?
            }
        };
        let plan = record.plan();
        let mut done = Vec::new();
        let mut stale = Vec::new();
        for (ti, tj, sum) in tiles {
            let valid = ti < plan.tiles_i() && tj < plan.tiles_j() && {
                hash(&partial.tile(&plan, (ti, tj))) == sum
            };
            if valid {
                done.push((ti, tj));
            } else {
                stale.push((ti, tj));
            }
        }
        if !stale.is_empty() {
            tracing::warn!(
                job = id,
                tiles = stale.len(),
                "tiles do not match their checksums; recomputing them"
            );
            let conn = lock(&self.conn);
            for (ti, tj) in &stale {
                conn.execute(
                    "DELETE FROM tiles WHERE job_id = ?1 AND ti = ?2 AND tj = ?3",
                    params![id, ti, tj],
                )
                .map_err(backend)?;
            }
        }
        Ok(ResumedJob {
            record: JobRecord {
                tiles_done: done.len() as u64,
                ..record
            },
            operands: JobOperands {
                a: Arc::new(a),
                b: Arc::new(b),
                c,
            },
            done,
            partial,
        })
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        if let Err(err) = self.close() {
            tracing::error!(error = %err, "store writes lost at close");
        }
    }
}

/// Creates a job's partial result: an `.npy` of zeros (sparse on disk), flushed.
fn create_partial(path: &Path, dtype: Dtype, rows: usize, cols: usize) -> std::io::Result<()> {
    use std::io::Write;
    let header = npy::header(dtype, rows, cols);
    let mut file = File::create(path)?;
    file.write_all(&header)?;
    file.set_len((header.len() + rows * cols * dtype.size()) as u64)?;
    file.sync_all()
}

/// Opens a partial result for writing tiles; returns it with where its data starts.
fn open_partial(path: &Path) -> Option<(File, usize)> {
    use std::os::unix::fs::FileExt;
    let file = OpenOptions::new().read(true).write(true).open(path).ok()?;
    let mut first = [0u8; 10];
    file.read_exact_at(&mut first, 0).ok()?;
    let offset = npy::data_offset(&first)?;
    Some((file, offset))
}

/// Disk a job takes: its operands and its result, as `.npy`.
fn job_bytes(job: &JobRecord, operands: &JobOperands) -> u64 {
    let npy = |m: &Matrix| (npy::header(m.dtype, m.rows, m.cols).len() + m.data.len()) as u64;
    let result = npy::header(job.dtype, job.m as usize, job.n as usize).len() as u64
        + u64::from(job.m) * u64::from(job.n) * job.dtype.size() as u64;
    npy(&operands.a) + npy(&operands.b) + operands.c.as_deref().map_or(0, npy) + result
}

/// Writes a new job's files, flushed: its operands and an empty partial result. Returns
/// the operands' checksums.
fn write_job_files(dir: &Path, insert: &Insert) -> Result<Vec<Vec<u8>>, StoreError> {
    let (job, operands) = (&insert.record, &insert.operands);
    std::fs::create_dir(dir)?;
    let mut sums = Vec::new();
    for (name, matrix) in OPERANDS
        .iter()
        .zip([Some(&operands.a), Some(&operands.b), operands.c.as_ref()])
        .filter_map(|(name, m)| m.map(|m| (name, m)))
    {
        let header = npy::header(matrix.dtype, matrix.rows, matrix.cols);
        write_atomic_parts(&dir.join(name), &[&header, &matrix.data], false)?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(&header);
        hasher.update(&matrix.data);
        sums.push(hasher.finalize().as_bytes().to_vec());
    }
    create_partial(
        &dir.join(PARTIAL),
        job.dtype,
        job.m as usize,
        job.n as usize,
    )?;
    sync_dir(dir)?;
    if let Some(jobs) = dir.parent() {
        sync_dir(jobs)?;
    }
    Ok(sums)
}

fn insert_row(
    tx: &rusqlite::Transaction<'_>,
    insert: &Insert,
    sums: &[Vec<u8>],
) -> Result<(), StoreError> {
    let job = &insert.record;
    tx.prepare_cached(
        "INSERT INTO jobs (id, owner, name, dtype, m, n, k, tile_m, tile_n, alpha, beta, \
         priority, state, tiles_done, tiles_total, created_at, finished_at, error, has_c, \
         a_sum, b_sum, c_sum, result_sum, bytes, quorum_agree, quorum_of) VALUES (?1, ?2, \
         ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, \
         ?22, NULL, ?23, ?24, ?25)",
    )?
    .execute(params![
        job.id,
        job.owner,
        job.name,
        job.dtype.name(),
        job.m,
        job.n,
        job.k,
        job.tile_m,
        job.tile_n,
        job.alpha,
        job.beta,
        job.priority,
        job.state.name(),
        job.tiles_done as i64,
        job.tiles_total as i64,
        micros(job.created_at),
        job.finished_at.map(micros),
        job.error,
        insert.operands.c.is_some(),
        sums[0],
        sums[1],
        sums.get(2),
        insert.bytes as i64,
        job.quorum.map(|q| q.agree),
        job.quorum.map(|q| q.of),
    ])?;
    Ok(())
}

/// Removes what a crash can leave: folders of submissions that never committed, and
/// files that finished jobs no longer need.
fn clean_up(conn: &Connection, shared: &Shared) -> Result<(), StoreError> {
    let mut stmt = conn
        .prepare("SELECT id, state FROM jobs")
        .map_err(backend)?;
    let jobs: HashMap<String, String> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(backend)?
        .collect::<Result<_, _>>()
        .map_err(backend)?;
    for entry in std::fs::read_dir(shared.dir.join(JOBS_DIR))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        match jobs.get(&name) {
            None => {
                tracing::info!(job = name, "removing an uncommitted submission");
                std::fs::remove_dir_all(entry.path())?;
            }
            Some(state) if JobState::parse(state)?.is_terminal() => {
                remove_work_files(&entry.path())
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Removes a finished job's operands and partial result (its result stays).
fn remove_work_files(dir: &Path) {
    for name in OPERANDS.iter().chain([&PARTIAL]) {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %dir.display(), file = name, error = %e, "cannot remove")
            }
        }
    }
}

fn writer(mut conn: Connection, shared: Arc<Shared>, rx: mpsc::Receiver<Write>) {
    // Jobs whose partial file missed a tile: their result is written whole.
    let mut damaged = HashSet::new();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(write) => batch.push(write),
                Err(_) => break,
            }
        }
        let mut acks = Vec::new();
        let outcome = write_batch(&mut conn, &shared, batch, &mut acks, &mut damaged);
        let mut overlay = lock(&shared.overlay);
        match outcome {
            Ok(()) => overlay.failed = None,
            Err(err) => {
                tracing::error!(error = %err, "store write failed");
                overlay.failed = Some(err.to_string());
            }
        }
        let reply = overlay.failed.clone().map_or(Ok(()), Err);
        drop(overlay);
        for ack in acks {
            let _ = ack.send(reply.clone());
        }
    }
}

fn write_batch(
    conn: &mut Connection,
    shared: &Shared,
    batch: Vec<Write>,
    acks: &mut Vec<mpsc::SyncSender<Result<(), String>>>,
    damaged: &mut HashSet<String>,
) -> Result<(), StoreError> {
    let _files = lock(&shared.files);
    // Files first: a row commits only after the bytes it vouches for are written.
    let mut open: HashMap<String, Option<(File, usize)>> = HashMap::new();
    let mut inserts = Vec::new();
    let mut tiles = Vec::new();
    let mut results = Vec::new();
    let mut records: HashMap<String, (u64, JobRecord)> = HashMap::new();
    for write in batch {
        match write {
            Write::Insert(insert) => {
                let dir = shared.job_dir(&insert.record.id);
                match write_job_files(&dir, &insert) {
                    Ok(sums) => inserts.push((insert, sums)),
                    Err(err) => {
                        let _ = std::fs::remove_dir_all(&dir);
                        *lock(&shared.reserved) -= insert.bytes;
                        let _ = insert.ack.send(Err(err));
                    }
                }
            }
            Write::Tile(tile) => {
                let partial = open
                    .entry(tile.job.clone())
                    .or_insert_with(|| open_partial(&shared.job_dir(&tile.job).join(PARTIAL)));
                // No partial file: the job was deleted or has finished meanwhile.
                let Some((file, offset)) = partial else {
                    continue;
                };
                if let Err(err) = write_tile(file, *offset, &tile) {
                    // Not recorded: a restart computes it again.
                    tracing::error!(job = tile.job, tile = ?tile.tile, error = %err, "writing a tile failed");
                    damaged.insert(tile.job);
                    continue;
                }
                tiles.push((tile.job, tile.tile, hash(&tile.payload)));
            }
            Write::Result { seq, id, matrix } => {
                // The file closes before it is renamed.
                open.remove(&id);
                let whole = damaged.remove(&id);
                if let Some(sum) = finish_result(&shared.job_dir(&id), &matrix, whole)? {
                    results.push((seq, id, sum));
                }
            }
            Write::Record { seq, record } => {
                records.insert(record.id.clone(), (seq, record));
            }
            Write::Flush(ack) => acks.push(ack),
        }
    }
    drop(open);
    // A job's end is flushed; tiles alone are not (see the module docs).
    let ending = !inserts.is_empty()
        || !results.is_empty()
        || records.values().any(|(_, r)| r.state.is_terminal());
    conn.pragma_update(None, "synchronous", if ending { "FULL" } else { "NORMAL" })
        .map_err(backend)?;
    let committed = commit_batch(conn, shared, &inserts, &tiles, &results, &records);
    // A submission's row counts in the quota from now on (or it failed): either way its
    // reservation ends, and its submitter hears how it went.
    for (insert, _) in inserts {
        *lock(&shared.reserved) -= insert.bytes;
        let outcome = match &committed {
            Ok(()) => Ok(()),
            Err(err) => {
                let _ = std::fs::remove_dir_all(shared.job_dir(&insert.record.id));
                Err(StoreError::Backend(err.to_string()))
            }
        };
        let _ = insert.ack.send(outcome);
    }
    committed?;
    for (id, (_, r)) in &records {
        if r.state.is_terminal() {
            remove_work_files(&shared.job_dir(id));
        }
    }
    let mut overlay = lock(&shared.overlay);
    for (id, (seq, _)) in records {
        if overlay.records.get(&id).is_some_and(|(s, _)| *s == seq) {
            overlay.records.remove(&id);
        }
    }
    for (seq, id, _) in results {
        if overlay.results.get(&id).is_some_and(|(s, _)| *s == seq) {
            overlay.results.remove(&id);
        }
    }
    Ok(())
}

type Tiles = [(String, (u32, u32), Vec<u8>)];
type Results = [(u64, String, Vec<u8>)];

/// One transaction for a batch: new jobs first, then tiles, results and states.
fn commit_batch(
    conn: &mut Connection,
    shared: &Shared,
    inserts: &[(Box<Insert>, Vec<Vec<u8>>)],
    tiles: &Tiles,
    results: &Results,
    records: &HashMap<String, (u64, JobRecord)>,
) -> Result<(), StoreError> {
    let tx = conn.transaction().map_err(backend)?;
    for (insert, sums) in inserts {
        insert_row(&tx, insert, sums)?;
    }
    {
        let mut insert = tx
            .prepare_cached(
                "INSERT OR IGNORE INTO tiles (job_id, ti, tj, sum) \
                 SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM jobs WHERE id = ?1)",
            )
            .map_err(backend)?;
        for (job, (ti, tj), sum) in tiles {
            insert.execute(params![job, ti, tj, sum]).map_err(backend)?;
        }
        for (_, id, sum) in results {
            tx.execute(
                "UPDATE jobs SET result_sum = ?2 WHERE id = ?1",
                params![id, sum],
            )
            .map_err(backend)?;
        }
        for (id, (_, r)) in records {
            let bytes: Option<i64> = if r.state.is_terminal() {
                // What stays once the operands go: the result, if there is one.
                Some(
                    std::fs::metadata(shared.job_dir(id).join(RESULT))
                        .map_or(0, |m| m.len() as i64),
                )
            } else {
                None
            };
            tx.execute(
                "UPDATE jobs SET state = ?2, tiles_done = ?3, finished_at = ?4, error = ?5, \
                 bytes = COALESCE(?6, bytes) WHERE id = ?1",
                params![
                    id,
                    r.state.name(),
                    r.tiles_done as i64,
                    r.finished_at.map(micros),
                    r.error,
                    bytes,
                ],
            )
            .map_err(backend)?;
        }
    }
    tx.commit().map_err(backend)?;
    Ok(())
}

/// Turns a job's partial result into its result file; returns the file's checksum, or
/// `None` when the job's folder is gone (deleted meanwhile). The partial file holds every
/// tile already: it is flushed and renamed, not written again, unless a tile write failed
/// (`whole`) or it differs from `matrix`, in which case the result is written whole.
fn finish_result(dir: &Path, matrix: &Matrix, whole: bool) -> Result<Option<Vec<u8>>, StoreError> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let header = npy::header(matrix.dtype, matrix.rows, matrix.cols);
    let want = {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&header);
        hasher.update(&matrix.data);
        hasher.finalize().as_bytes().to_vec()
    };
    let partial = dir.join(PARTIAL);
    let result = dir.join(RESULT);
    // Read back rather than trusted: a partial file that differs from the grid's result
    // in any way is replaced.
    if !whole && std::fs::read(&partial).is_ok_and(|bytes| hash(&bytes) == want) {
        File::open(&partial)?.sync_all()?;
        std::fs::rename(&partial, &result)?;
        sync_dir(dir)?;
    } else {
        tracing::warn!(dir = %dir.display(), "partial result incomplete; writing the result whole");
        write_atomic_parts(&result, &[&header, &matrix.data], false)?;
    }
    Ok(Some(want))
}

/// Writes a tile's rows at their places in the partial result (row-major, `width`
/// elements a row, from byte `offset`).
fn write_tile(file: &File, offset: usize, tile: &TileWrite) -> Result<(), StoreError> {
    use std::os::unix::fs::FileExt;
    let row_bytes = tile.payload.len() / tile.rows.max(1);
    if row_bytes * tile.rows != tile.payload.len() || tile.cols == 0 {
        return Err(StoreError::Backend(format!(
            "tile {:?} of job {} has {} bytes for {}×{} elements",
            tile.tile,
            tile.job,
            tile.payload.len(),
            tile.rows,
            tile.cols
        )));
    }
    let elem = row_bytes / tile.cols;
    for r in 0..tile.rows {
        let at = offset + ((tile.row + r) * tile.width + tile.col) * elem;
        file.write_all_at(&tile.payload[r * row_bytes..(r + 1) * row_bytes], at as u64)?;
    }
    Ok(())
}

impl Store for SqliteStore {
    fn insert_job(&self, job: &JobRecord, operands: &JobOperands) -> Result<Durable, StoreError> {
        if !safe_id(&job.id) {
            return Err(StoreError::Backend(format!(
                "job id {:?} is not a UUID",
                job.id
            )));
        }
        let needed = job_bytes(job, operands);
        // Checked against what is on disk plus what is on its way, so that submissions
        // in flight cannot pass the quota together.
        {
            let _inserting = lock(&self.inserting);
            let used = self.used_bytes()?;
            let mut reserved = lock(&self.shared.reserved);
            if let Some(quota) = self.options.quota {
                let taken = used.saturating_add(*reserved);
                if taken.saturating_add(needed) > quota {
                    return Err(StoreError::Quota {
                        needed,
                        free: quota.saturating_sub(taken),
                        quota,
                    });
                }
            }
            *reserved += needed;
        }
        let (ack, rx) = mpsc::sync_channel(1);
        let sent = self.send(Write::Insert(Box::new(Insert {
            record: job.clone(),
            operands: operands.clone(),
            bytes: needed,
            ack,
        })));
        if let Err(err) = sent {
            *lock(&self.shared.reserved) -= needed;
            return Err(err);
        }
        Ok(Durable::pending(rx))
    }

    fn update_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        let seq = {
            let mut overlay = lock(&self.shared.overlay);
            overlay.seq += 1;
            let seq = overlay.seq;
            overlay.records.insert(job.id.clone(), (seq, job.clone()));
            seq
        };
        self.send(Write::Record {
            seq,
            record: job.clone(),
        })
    }

    fn tile_accepted(&self, tile: TileWrite) -> Result<(), StoreError> {
        self.send(Write::Tile(tile))
    }

    fn put_result(&self, id: &str, result: Arc<Matrix>) -> Result<(), StoreError> {
        let seq = {
            let mut overlay = lock(&self.shared.overlay);
            overlay.seq += 1;
            let seq = overlay.seq;
            overlay.results.insert(id.to_owned(), (seq, result.clone()));
            seq
        };
        self.send(Write::Result {
            seq,
            id: id.to_owned(),
            matrix: result,
        })
    }

    fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        if let Some((_, record)) = lock(&self.shared.overlay).records.get(id) {
            return Ok(Some(record.clone()));
        }
        self.load_record(id)
    }

    fn list_jobs(&self, owner: Option<&str>) -> Result<Vec<JobRecord>, StoreError> {
        let mut jobs = {
            let conn = lock(&self.conn);
            let sql = format!(
                "SELECT {COLUMNS} FROM jobs WHERE ?1 IS NULL OR owner = ?1 ORDER BY created_at, id"
            );
            let mut stmt = conn.prepare_cached(&sql).map_err(backend)?;
            let rows = stmt
                .query_map([owner], record_from)
                .map_err(backend)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)?;
            rows.into_iter().collect::<Result<Vec<_>, _>>()?
        };
        let overlay = lock(&self.shared.overlay);
        for job in &mut jobs {
            if let Some((_, record)) = overlay.records.get(&job.id) {
                *job = record.clone();
            }
        }
        Ok(jobs)
    }

    fn result(&self, id: &str) -> Result<Option<Arc<Matrix>>, StoreError> {
        if let Some((_, matrix)) = lock(&self.shared.overlay).results.get(id) {
            return Ok(Some(matrix.clone()));
        }
        let row: Option<(String, Option<Vec<u8>>)> = lock(&self.conn)
            .query_row(
                "SELECT dtype, result_sum FROM jobs WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(backend)?;
        let Some((dtype, Some(sum))) = row else {
            return Ok(None);
        };
        let dtype = Dtype::parse(&dtype).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.read_npy(id, RESULT, dtype, &sum)
            .map(|m| Some(Arc::new(m)))
    }

    fn delete_job(&self, id: &str) -> Result<bool, StoreError> {
        let _files = lock(&self.shared.files);
        {
            let mut overlay = lock(&self.shared.overlay);
            overlay.records.remove(id);
            overlay.results.remove(id);
        }
        let deleted = {
            let mut conn = lock(&self.conn);
            let tx = conn.transaction().map_err(backend)?;
            let deleted = tx
                .execute("DELETE FROM jobs WHERE id = ?1", [id])
                .map_err(backend)?;
            tx.execute("DELETE FROM tiles WHERE job_id = ?1", [id])
                .map_err(backend)?;
            tx.commit().map_err(backend)?;
            deleted > 0
        };
        if safe_id(id) {
            match std::fs::remove_dir_all(self.shared.job_dir(id)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(deleted)
    }

    fn unfinished_jobs(&self) -> Result<Vec<ResumedJob>, StoreError> {
        let records = {
            let conn = lock(&self.conn);
            let sql = format!(
                "SELECT {COLUMNS} FROM jobs WHERE state IN ('queued', 'running') \
                 ORDER BY created_at, id"
            );
            let mut stmt = conn.prepare(&sql).map_err(backend)?;
            let rows = stmt
                .query_map([], record_from)
                .map_err(backend)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)?;
            rows.into_iter().collect::<Result<Vec<_>, _>>()?
        };
        let mut resumed = Vec::new();
        for record in records {
            let id = record.id.clone();
            match self.resume(record.clone()) {
                Ok(job) => resumed.push(job),
                Err(err) => {
                    // A job whose inputs are damaged cannot be computed: it fails, with
                    // the reason, instead of stopping the coordinator.
                    tracing::error!(job = id, error = %err, "cannot resume job");
                    let failed = JobRecord {
                        state: JobState::Failed,
                        finished_at: Some(SystemTime::now()),
                        error: Some(format!("lost in a restart: {err}")),
                        ..record
                    };
                    self.update_job(&failed)?;
                }
            }
        }
        Ok(resumed)
    }

    fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Write::Flush(tx))?;
        rx.recv()
            .map_err(|_| StoreError::Backend("the store writer stopped".into()))?
            .map_err(StoreError::Backend)
    }
}

/// What [`backup`] wrote.
#[derive(Debug)]
pub struct BackupSummary {
    pub jobs: usize,
    pub bytes: u64,
}

/// Writes a consistent copy of the store in `data_dir` to the tar file `to`, while a
/// coordinator may be serving from it: a snapshot of the database (`VACUUM INTO`), the
/// files its jobs need, and the JWT secret. Restore with `tar -xf FILE -C NEW_DATA_DIR`.
///
/// Files are immutable once their row commits, except `partial.npy`, where every tile the
/// snapshot names was written before its row committed and is never written again. A job
/// that finishes or is deleted between the snapshot and the copy of its files makes the
/// copy start over (three times at most).
pub fn backup(data_dir: &Path, to: &Path) -> Result<BackupSummary, StoreError> {
    let db = data_dir.join(DB_FILE);
    if !db.is_file() {
        return Err(StoreError::NoStore(format!(
            "{}: no tabgrid store there",
            db.display()
        )));
    }
    let mut last = None;
    for _ in 0..3 {
        match backup_once(data_dir, to) {
            Ok(summary) => return Ok(summary),
            Err(BackupError::Moved(what)) => last = Some(what),
            Err(BackupError::Store(err)) => return Err(err),
        }
    }
    Err(StoreError::Backend(format!(
        "the store kept changing under the backup ({}); try again",
        last.unwrap_or_default()
    )))
}

enum BackupError {
    /// A file the snapshot needs changed meanwhile: take a new snapshot.
    Moved(String),
    Store(StoreError),
}

impl<E: Into<StoreError>> From<E> for BackupError {
    fn from(err: E) -> Self {
        BackupError::Store(err.into())
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        backend(err)
    }
}

fn backup_once(data_dir: &Path, to: &Path) -> Result<BackupSummary, BackupError> {
    let mut name = to.file_name().unwrap_or_default().to_owned();
    name.push(".snapshot.db");
    let snapshot = to.with_file_name(name);
    let _ = std::fs::remove_file(&snapshot);
    let outcome = (|| {
        {
            let live = connect(&data_dir.join(DB_FILE))?;
            live.execute("VACUUM INTO ?1", [snapshot.to_string_lossy()])?;
        }
        let jobs: Vec<(String, String, bool, bool)> = {
            let conn = Connection::open(&snapshot)?;
            let mut stmt = conn.prepare(
                "SELECT id, state, has_c, result_sum IS NOT NULL FROM jobs ORDER BY created_at",
            )?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<Result<_, _>>()?
        };
        let mut tmp_name = to.file_name().unwrap_or_default().to_owned();
        tmp_name.push(".tmp");
        let tmp = to.with_file_name(tmp_name);
        let written = (|| {
            let mut tar = tar::Builder::new(File::create(&tmp)?);
            let secret = data_dir.join(crate::auth::SECRET_FILE);
            if secret.is_file() {
                tar.append_path_with_name(&secret, crate::auth::SECRET_FILE)?;
            }
            for (id, state, has_c, has_result) in &jobs {
                let mut files = Vec::new();
                if JobState::parse(state)?.is_terminal() {
                    if *has_result {
                        files.push(RESULT);
                    }
                } else {
                    files.extend(&OPERANDS[..if *has_c { 3 } else { 2 }]);
                    files.push(PARTIAL);
                }
                let dir = format!("{JOBS_DIR}/{id}");
                tar.append_dir(&dir, data_dir.join(JOBS_DIR).join(id))
                    .map_err(|e| BackupError::Moved(format!("job {id}: {e}")))?;
                for file in files {
                    let path = data_dir.join(JOBS_DIR).join(id).join(file);
                    let mut f = File::open(&path)
                        .map_err(|e| BackupError::Moved(format!("{}: {e}", path.display())))?;
                    tar.append_file(format!("{dir}/{file}"), &mut f)?;
                }
            }
            tar.append_path_with_name(&snapshot, DB_FILE)?;
            let file = tar.into_inner()?;
            file.sync_all()?;
            std::fs::rename(&tmp, to)?;
            Ok::<_, BackupError>(file.metadata()?.len())
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        Ok(BackupSummary {
            jobs: jobs.len(),
            bytes: written?,
        })
    })();
    let _ = std::fs::remove_file(&snapshot);
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, m: u32, n: u32, tile: u32) -> JobRecord {
        JobRecord {
            id: id.to_owned(),
            owner: "ada".into(),
            name: Some("test".into()),
            dtype: Dtype::F64,
            m,
            n,
            k: 3,
            tile_m: tile,
            tile_n: tile,
            alpha: 2.0,
            beta: 0.5,
            priority: 1,
            quorum: None,
            state: JobState::Queued,
            tiles_done: 0,
            tiles_total: (m.div_ceil(tile) * n.div_ceil(tile)) as u64,
            created_at: SystemTime::now(),
            finished_at: None,
            error: None,
        }
    }

    fn operands(m: usize, n: usize) -> JobOperands {
        let values =
            |len: usize, seed: f64| -> Vec<f64> { (0..len).map(|i| i as f64 + seed).collect() };
        JobOperands {
            a: Arc::new(Matrix::from_f64(m, 3, &values(m * 3, 0.5)).unwrap()),
            b: Arc::new(Matrix::from_f64(3, n, &values(3 * n, 1.5)).unwrap()),
            c: Some(Arc::new(
                Matrix::from_f64(m, n, &values(m * n, 2.5)).unwrap(),
            )),
        }
    }

    const ID: &str = "0a1b2c3d-0000-4000-8000-000000000001";

    /// The tile (i, j) of a 4×4 result cut into 2×2 tiles, filled with `value`.
    fn tile(i: u32, j: u32, value: f64) -> TileWrite {
        TileWrite {
            job: ID.into(),
            tile: (i, j),
            row: 2 * i as usize,
            col: 2 * j as usize,
            rows: 2,
            cols: 2,
            width: 4,
            payload: tabgrid_shared::matrix::f64_bytes(&[value; 4]),
        }
    }

    #[test]
    fn jobs_tiles_and_results_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
        let job = record(ID, 4, 4, 2);
        store
            .insert_job(&job, &operands(4, 4))
            .unwrap()
            .wait()
            .unwrap();
        store
            .update_job(&JobRecord {
                state: JobState::Running,
                ..job.clone()
            })
            .unwrap();
        // Reads see the update before it is committed.
        assert_eq!(store.job(ID).unwrap().unwrap().state, JobState::Running);
        store.tile_accepted(tile(0, 1, 7.0)).unwrap();
        store.tile_accepted(tile(1, 0, 9.0)).unwrap();
        drop(store);

        let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
        let listed = store.list_jobs(Some("ada")).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].state, JobState::Running);
        assert_eq!(listed[0].name.as_deref(), Some("test"));
        assert!(store.list_jobs(Some("bob")).unwrap().is_empty());
        let mut resumed = store.unfinished_jobs().unwrap();
        assert_eq!(resumed.len(), 1);
        let job = resumed.pop().unwrap();
        let mut done = job.done.clone();
        done.sort();
        assert_eq!(done, [(0, 1), (1, 0)]);
        assert_eq!(job.record.tiles_done, 2);
        assert_eq!(*job.operands.a, *operands(4, 4).a);
        assert_eq!(*job.operands.c.unwrap(), *operands(4, 4).c.unwrap());
        let values = tabgrid_shared::matrix::f64s(&job.partial.data);
        assert_eq!(values[2..4], [7.0, 7.0]);
        assert_eq!(values[8..10], [9.0, 9.0]);
        assert_eq!(values[0], 0.0);

        // Finishing keeps the result and drops the operands.
        let result = Arc::new(Matrix::from_f64(4, 4, &[3.0; 16]).unwrap());
        store.put_result(ID, result.clone()).unwrap();
        let finished = JobRecord {
            state: JobState::Done,
            tiles_done: 4,
            finished_at: Some(SystemTime::now()),
            ..job.record
        };
        store.update_job(&finished).unwrap();
        assert_eq!(store.result(ID).unwrap().unwrap(), result);
        store.flush().unwrap();
        let files: Vec<String> = std::fs::read_dir(dir.path().join(JOBS_DIR).join(ID))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files, [RESULT]);
        drop(store);

        let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
        assert!(store.unfinished_jobs().unwrap().is_empty());
        assert_eq!(store.job(ID).unwrap().unwrap().state, JobState::Done);
        assert_eq!(store.result(ID).unwrap().unwrap(), result);
        assert!(store.delete_job(ID).unwrap());
        assert!(!store.delete_job(ID).unwrap());
        assert!(store.job(ID).unwrap().is_none());
        assert!(!dir.path().join(JOBS_DIR).join(ID).exists());
    }

    #[test]
    fn damaged_files_are_found_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
        store
            .insert_job(&record(ID, 4, 4, 2), &operands(4, 4))
            .unwrap()
            .wait()
            .unwrap();
        store.tile_accepted(tile(0, 0, 1.0)).unwrap();
        store.tile_accepted(tile(1, 1, 2.0)).unwrap();
        drop(store);

        // One tile's bytes change on disk: that tile is computed again, the other kept.
        let partial = dir.path().join(JOBS_DIR).join(ID).join(PARTIAL);
        let mut bytes = std::fs::read(&partial).unwrap();
        bytes[npy::header(Dtype::F64, 4, 4).len()] ^= 1;
        std::fs::write(&partial, bytes).unwrap();
        let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
        assert_eq!(store.unfinished_jobs().unwrap()[0].done, [(1, 1)]);
        drop(store);

        // A damaged operand fails the job with the reason instead of computing garbage.
        let a = dir.path().join(JOBS_DIR).join(ID).join(OPERANDS[0]);
        let mut bytes = std::fs::read(&a).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        std::fs::write(&a, bytes).unwrap();
        let store = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
        assert!(store.unfinished_jobs().unwrap().is_empty());
        store.flush().unwrap();
        let job = store.job(ID).unwrap().unwrap();
        assert_eq!(job.state, JobState::Failed);
        assert!(job.error.unwrap().contains("checksum"));
    }

    #[test]
    fn uncommitted_submissions_are_removed_and_quota_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        // What a crash between writing the operands and committing the row leaves.
        let orphan = dir.path().join(JOBS_DIR).join(ID);
        std::fs::create_dir_all(&orphan).unwrap();
        std::fs::write(orphan.join(OPERANDS[0]), b"half").unwrap();
        let store = SqliteStore::open(dir.path(), SqliteOptions { quota: Some(1500) }).unwrap();
        assert!(!orphan.exists());

        // 4×3 + 3×4 + 4×4 f64 and the 4×4 result, as .npy with 128-byte headers.
        store
            .insert_job(&record(ID, 4, 4, 2), &operands(4, 4))
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(store.used_bytes().unwrap(), 960);
        let other = "0a1b2c3d-0000-4000-8000-000000000002";
        let err = store
            .insert_job(&record(other, 4, 4, 2), &operands(4, 4))
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Quota { quota: 1500, .. }),
            "{err}"
        );
        assert!(!dir.path().join(JOBS_DIR).join(other).exists());
        assert_eq!(store.list_jobs(None).unwrap().len(), 1);
        // Ids never become paths unless they are UUIDs.
        let err = store
            .insert_job(&record("../x", 4, 4, 2), &operands(4, 4))
            .unwrap_err();
        assert!(err.to_string().contains("not a UUID"), "{err}");
    }

    #[test]
    fn one_data_dir_serves_one_store_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
        let err = SqliteStore::open(dir.path(), SqliteOptions::default())
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .contains("in use by another tabgrid coordinator"),
            "{err}"
        );
        drop(first);
        SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap();
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap());
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = SqliteStore::open(dir.path(), SqliteOptions::default())
            .err()
            .unwrap();
        assert!(err.to_string().contains("newer than this tabgrid"), "{err}");
    }
}
