//! The shared store: PostgreSQL, for several coordinators on one database
//! (`serve --database-url postgres://…`).
//!
//! Everything a coordinator needs to take over any job lives in the database: job rows,
//! operands (bytea chunks with their BLAKE3), and one row per tile with its state
//! (`pending`, `claimed` by a coordinator until a deadline, `done` with the result bytes
//! and their BLAKE3). A coordinator hands out only tiles it claimed with
//! `SELECT … FOR UPDATE SKIP LOCKED`, so two coordinators never compute the same tile;
//! it renews its claims while it lives, and any coordinator puts the claims of a dead
//! one back ([`Session::reap`]). Each lease a coordinator hands to a worker is recorded in
//! `leases`, with the claim it was made under.
//!
//! Accepted tiles are written behind, in batches, by one writer thread per coordinator;
//! the transaction that writes a job's last tile also marks the job done, so "done" in
//! the database always means every tile is there. The result is assembled from the tile
//! rows when asked for. The `postgres` client is synchronous and never runs on the async
//! runtime: queries go to the store's own threads.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use ::postgres::{Client, NoTls, Row, Statement};
use tabgrid_shared::{Dtype, Matrix};

use super::{
    Durable, JobOperands, JobRecord, JobState, LeaseIssued, ResumedJob, Store, StoreError,
    TileWrite,
};
use crate::auth::Secret;
use crate::scheduler::Quorum;

/// The schema this build writes; a database with a newer one is refused.
const SCHEMA_VERSION: i64 = 1;

/// Operands are stored in chunks of this many bytes (far below bytea's 1 GB limit, and
/// small enough that no single message is huge).
const CHUNK: usize = 8 << 20;

/// Writes the writer thread commits in one transaction at most.
const BATCH: usize = 512;

/// Threads answering reads and submissions.
const READERS: usize = 4;

/// Serialises migrations of coordinators starting together (`pg_advisory_xact_lock`).
const MIGRATION_LOCK: i64 = 0x0074_6162_6772_6964; // "tabgrid" in ASCII

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tabgrid_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    name TEXT,
    dtype TEXT NOT NULL,
    m INTEGER NOT NULL,
    n INTEGER NOT NULL,
    k INTEGER NOT NULL,
    tile_m INTEGER NOT NULL,
    tile_n INTEGER NOT NULL,
    alpha DOUBLE PRECISION NOT NULL,
    beta DOUBLE PRECISION NOT NULL,
    priority INTEGER NOT NULL,
    quorum_agree INTEGER,
    quorum_of INTEGER,
    state TEXT NOT NULL,
    tiles_done BIGINT NOT NULL DEFAULT 0,
    tiles_total BIGINT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ,
    error TEXT,
    has_c BOOLEAN NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_open ON jobs (created_at) WHERE state IN ('queued', 'running');
CREATE TABLE IF NOT EXISTS operands (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    seq INTEGER NOT NULL,
    bytes BYTEA NOT NULL,
    digest BYTEA NOT NULL,
    PRIMARY KEY (job_id, name, seq)
);
CREATE TABLE IF NOT EXISTS tiles (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    i INTEGER NOT NULL,
    j INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    coordinator TEXT,
    deadline TIMESTAMPTZ,
    claims INTEGER NOT NULL DEFAULT 0,
    payload BYTEA,
    digest BYTEA,
    done_by TEXT,
    done_at TIMESTAMPTZ,
    PRIMARY KEY (job_id, i, j)
);
CREATE INDEX IF NOT EXISTS tiles_pending ON tiles (job_id, i, j) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS tiles_claimed ON tiles (coordinator) WHERE state = 'claimed';
CREATE INDEX IF NOT EXISTS tiles_deadline ON tiles (deadline) WHERE state = 'claimed';
CREATE TABLE IF NOT EXISTS leases (
    coordinator TEXT NOT NULL,
    lease BIGINT NOT NULL,
    job_id TEXT NOT NULL,
    i INTEGER NOT NULL,
    j INTEGER NOT NULL,
    claim INTEGER NOT NULL,
    worker BIGINT NOT NULL,
    speculative BOOLEAN NOT NULL,
    issued_at TIMESTAMPTZ NOT NULL,
    deadline TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (coordinator, lease)
);
CREATE INDEX IF NOT EXISTS leases_job ON leases (job_id);
-- Matrices are floating-point noise to a compressor: stored as they are, not compressed.
ALTER TABLE operands ALTER COLUMN bytes SET STORAGE EXTERNAL;
ALTER TABLE tiles ALTER COLUMN payload SET STORAGE EXTERNAL;
";

const JOB_COLUMNS: &str = "id, owner, name, dtype, m, n, k, tile_m, tile_n, alpha, beta, \
     priority, quorum_agree, quorum_of, state, tiles_done, tiles_total, created_at, \
     finished_at, error";

fn backend(err: ::postgres::Error) -> StoreError {
    StoreError::Backend(format!("postgres: {err}"))
}

fn hash(bytes: &[u8]) -> Vec<u8> {
    blake3::hash(bytes).as_bytes().to_vec()
}

/// Connects to `config` (one connection, no TLS: run the database on a trusted network
/// or a socket).
fn connect(config: &::postgres::Config) -> Result<Client, StoreError> {
    config.connect(NoTls).map_err(backend)
}

/// Creates the tables (once, whichever coordinator comes first) and refuses a database
/// written by a newer tabgrid. A database already at this version is left alone: no DDL
/// (and no table lock) while other coordinators serve.
fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let mut tx = client.transaction().map_err(backend)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(backend)?;
    let exists: bool = tx
        .query_one("SELECT to_regclass('tabgrid_meta') IS NOT NULL", &[])
        .map_err(backend)?
        .get(0);
    let version: Option<String> = if exists {
        tx.query_opt("SELECT value FROM tabgrid_meta WHERE key = 'schema'", &[])
            .map_err(backend)?
            .map(|row| row.get(0))
    } else {
        None
    };
    match version.map(|v| v.parse::<i64>()) {
        None => {
            tx.batch_execute(SCHEMA).map_err(backend)?;
            tx.execute(
                "INSERT INTO tabgrid_meta (key, value) VALUES ('schema', $1)",
                &[&SCHEMA_VERSION.to_string()],
            )
            .map_err(backend)?;
        }
        Some(Ok(v)) if v <= SCHEMA_VERSION => {}
        Some(v) => {
            return Err(StoreError::NoStore(format!(
                "the database's tabgrid schema ({v:?}) is newer than this build's ({SCHEMA_VERSION}): upgrade tabgrid"
            )));
        }
    }
    tx.commit().map_err(backend)
}

fn record_from(row: &Row) -> Result<JobRecord, StoreError> {
    let dtype: String = row.get(3);
    let state: String = row.get(14);
    let agree: Option<i32> = row.get(12);
    let of: Option<i32> = row.get(13);
    Ok(JobRecord {
        id: row.get(0),
        owner: row.get(1),
        name: row.get(2),
        dtype: Dtype::parse(&dtype).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        m: row.get::<_, i32>(4) as u32,
        n: row.get::<_, i32>(5) as u32,
        k: row.get::<_, i32>(6) as u32,
        tile_m: row.get::<_, i32>(7) as u32,
        tile_n: row.get::<_, i32>(8) as u32,
        alpha: row.get(9),
        beta: row.get(10),
        priority: row.get(11),
        quorum: match (agree, of) {
            (Some(agree), Some(of)) => Some(Quorum {
                agree: agree as u32,
                of: of as u32,
            }),
            _ => None,
        },
        state: JobState::parse(&state)?,
        tiles_done: row.get::<_, i64>(15) as u64,
        tiles_total: row.get::<_, i64>(16) as u64,
        created_at: row.get(17),
        finished_at: row.get(18),
        error: row.get(19),
    })
}

fn load_record(client: &mut Client, id: &str) -> Result<Option<JobRecord>, StoreError> {
    client
        .query_opt(
            &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"),
            &[&id],
        )
        .map_err(backend)?
        .map(|row| record_from(&row))
        .transpose()
}

/// A job's operand `name` (`a`, `b` or `c`), checked against its chunks' checksums.
fn load_operand(
    client: &mut Client,
    id: &str,
    name: &str,
    dtype: Dtype,
    rows: usize,
    cols: usize,
) -> Result<Option<Matrix>, StoreError> {
    let chunks = client
        .query(
            "SELECT bytes, digest FROM operands WHERE job_id = $1 AND name = $2 ORDER BY seq",
            &[&id, &name],
        )
        .map_err(backend)?;
    if chunks.is_empty() {
        return Ok(None);
    }
    let mut data = Vec::new();
    for row in chunks {
        let bytes: &[u8] = row.get(0);
        let digest: &[u8] = row.get(1);
        if hash(bytes) != digest {
            return Err(StoreError::Corrupt(format!(
                "job {id}: operand {name} does not match its checksum"
            )));
        }
        data.extend_from_slice(bytes);
    }
    Matrix::new(dtype, rows, cols, data)
        .map(Some)
        .map_err(|e| StoreError::Corrupt(format!("job {id}: operand {name}: {e}")))
}

/// A job's operands as stored at submission.
pub fn load_operands(client: &mut Client, record: &JobRecord) -> Result<JobOperands, StoreError> {
    let (m, n, k) = (record.m as usize, record.n as usize, record.k as usize);
    let missing = || StoreError::Corrupt(format!("job {}: operands missing", record.id));
    let a = load_operand(client, &record.id, "a", record.dtype, m, k)?.ok_or_else(missing)?;
    let b = load_operand(client, &record.id, "b", record.dtype, k, n)?.ok_or_else(missing)?;
    let c = load_operand(client, &record.id, "c", record.dtype, m, n)?;
    Ok(JobOperands {
        a: Arc::new(a),
        b: Arc::new(b),
        c: c.map(Arc::new),
    })
}

fn insert(client: &mut Client, job: &JobRecord, operands: &JobOperands) -> Result<(), StoreError> {
    let mut tx = client.transaction().map_err(backend)?;
    tx.execute(
        "INSERT INTO jobs (id, owner, name, dtype, m, n, k, tile_m, tile_n, alpha, beta, \
         priority, quorum_agree, quorum_of, state, tiles_done, tiles_total, created_at, \
         finished_at, error, has_c) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, 0, $16, \
         $17, NULL, NULL, $18)",
        &[
            &job.id,
            &job.owner,
            &job.name,
            &job.dtype.name(),
            &(job.m as i32),
            &(job.n as i32),
            &(job.k as i32),
            &(job.tile_m as i32),
            &(job.tile_n as i32),
            &job.alpha,
            &job.beta,
            &job.priority,
            &job.quorum.map(|q| q.agree as i32),
            &job.quorum.map(|q| q.of as i32),
            &job.state.name(),
            &(job.tiles_total as i64),
            &job.created_at,
            &operands.c.is_some(),
        ],
    )
    .map_err(backend)?;
    let chunk = tx
        .prepare(
            "INSERT INTO operands (job_id, name, seq, bytes, digest) VALUES ($1, $2, $3, $4, $5)",
        )
        .map_err(backend)?;
    let named = [
        ("a", Some(&operands.a)),
        ("b", Some(&operands.b)),
        ("c", operands.c.as_ref()),
    ];
    for (name, matrix) in named {
        let Some(matrix) = matrix else { continue };
        for (seq, bytes) in matrix.data.chunks(CHUNK).enumerate() {
            tx.execute(
                &chunk,
                &[&job.id, &name, &(seq as i32), &bytes, &hash(bytes)],
            )
            .map_err(backend)?;
        }
    }
    let plan = job.plan();
    tx.execute(
        "INSERT INTO tiles (job_id, i, j) \
         SELECT $1, i, j FROM generate_series(0, $2 - 1) AS i, generate_series(0, $3 - 1) AS j",
        &[&job.id, &(plan.tiles_i() as i32), &(plan.tiles_j() as i32)],
    )
    .map_err(backend)?;
    tx.commit().map_err(backend)
}

/// Shared-secret for JWTs: `TABGRID_JWT_SECRET` when given, else the database's, created
/// by the first coordinator. Returns whether it was just created.
pub fn shared_secret(url: &str, env: Option<String>) -> Result<(Secret, bool), StoreError> {
    if let Some(value) = env.filter(|v| !v.is_empty()) {
        return Ok((Secret::new(value.into_bytes()), false));
    }
    let config = parse_url(url)?;
    let mut client = connect(&config)?;
    migrate(&mut client)?;
    let fresh = Secret::generate();
    let created = client
        .execute(
            "INSERT INTO tabgrid_meta (key, value) VALUES ('jwt_secret', $1) ON CONFLICT DO NOTHING",
            &[&fresh.text()],
        )
        .map_err(backend)?
        == 1;
    let value: String = client
        .query_one(
            "SELECT value FROM tabgrid_meta WHERE key = 'jwt_secret'",
            &[],
        )
        .map_err(backend)?
        .get(0);
    Ok((Secret::new(value.into_bytes()), created))
}

fn parse_url(url: &str) -> Result<::postgres::Config, StoreError> {
    let mut config = ::postgres::Config::from_str(url)
        .map_err(|e| StoreError::NoStore(format!("--database-url: {e}")))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    if config.get_application_name().is_none() {
        config.application_name("tabgrid");
    }
    Ok(config)
}

/// A query run on one of the store's threads.
type Task = Box<dyn FnOnce(&mut Option<Client>, &::postgres::Config) + Send>;

/// Writes handed to the writer thread, carried out in order.
enum Write {
    Tile(TileWrite),
    Lease(LeaseIssued),
    Record(JobRecord, u64),
    Flush(mpsc::SyncSender<Result<(), StoreError>>),
}

/// Job records written but maybe not committed yet, with the write's sequence number.
type Overlay = Arc<Mutex<HashMap<String, (JobRecord, u64)>>>;

/// Told of each job whose last tile this coordinator committed, with its tiles.
type FinishedHook = Arc<Mutex<Option<Box<dyn Fn(&str, u64) + Send + Sync>>>>;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The PostgreSQL store of one coordinator.
pub struct PgStore {
    config: ::postgres::Config,
    coordinator: String,
    tasks: Mutex<Option<mpsc::Sender<Task>>>,
    writes: Mutex<Option<mpsc::Sender<Write>>>,
    overlay: Overlay,
    finished: FinishedHook,
    seq: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl PgStore {
    /// Connects to the database at `url` (creating tabgrid's tables on first use) as
    /// coordinator `coordinator` (a name unique among those sharing the database).
    pub fn open(url: &str, coordinator: &str) -> Result<PgStore, StoreError> {
        let config = parse_url(url)?;
        let mut client = connect(&config)?;
        migrate(&mut client)?;
        let (task_tx, task_rx) = mpsc::channel::<Task>();
        let task_rx = Arc::new(Mutex::new(task_rx));
        let mut threads = Vec::new();
        let mut first = Some(client);
        for n in 0..READERS {
            let rx = task_rx.clone();
            let config = config.clone();
            let mut client = if n == 0 { first.take() } else { None };
            let handle = std::thread::Builder::new()
                .name(format!("pg-reader-{n}"))
                .spawn(move || {
                    loop {
                        let task = match lock(&rx).recv() {
                            Ok(task) => task,
                            Err(_) => return,
                        };
                        task(&mut client, &config);
                    }
                })
                .map_err(StoreError::from)?;
            threads.push(handle);
        }
        let (write_tx, write_rx) = mpsc::channel();
        let overlay: Overlay = Arc::default();
        let finished: FinishedHook = Arc::default();
        let writer = Writer {
            config: config.clone(),
            client: None,
            statements: None,
            coordinator: coordinator.to_owned(),
            overlay: overlay.clone(),
            finished: finished.clone(),
        };
        threads.push(
            std::thread::Builder::new()
                .name("pg-writer".into())
                .spawn(move || writer.run(write_rx))
                .map_err(StoreError::from)?,
        );
        Ok(PgStore {
            config,
            coordinator: coordinator.to_owned(),
            tasks: Mutex::new(Some(task_tx)),
            writes: Mutex::new(Some(write_tx)),
            overlay,
            finished,
            seq: AtomicU64::new(1),
            threads: Mutex::new(threads),
        })
    }

    /// Calls `hook` with each job (and its tile count) whose last tile this coordinator
    /// wrote, once committed: the job is done everywhere.
    pub fn on_finished(&self, hook: impl Fn(&str, u64) + Send + Sync + 'static) {
        *lock(&self.finished) = Some(Box::new(hook));
    }

    /// This coordinator's name in the database.
    pub fn coordinator(&self) -> &str {
        &self.coordinator
    }

    /// A session of its own for the claims loop ([`Session`]).
    pub fn session(&self) -> Result<Session, StoreError> {
        Ok(Session {
            client: connect(&self.config)?,
            coordinator: self.coordinator.clone(),
        })
    }

    /// Runs `query` on one of the store's threads and waits for its answer.
    fn call<T: Send + 'static>(
        &self,
        query: impl FnOnce(&mut Client) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit_task(Box::new(move |client, config| {
            let _ = tx.send(with_client(client, config, query));
        }))?;
        rx.recv()
            .unwrap_or_else(|_| Err(StoreError::Backend("the store's threads stopped".into())))
    }

    fn submit_task(&self, task: Task) -> Result<(), StoreError> {
        lock(&self.tasks)
            .as_ref()
            .ok_or_else(|| StoreError::Backend("the store is closed".into()))?
            .send(task)
            .map_err(|_| StoreError::Backend("the store's threads stopped".into()))
    }

    fn write(&self, write: Write) -> Result<(), StoreError> {
        lock(&self.writes)
            .as_ref()
            .ok_or_else(|| StoreError::Backend("the store is closed".into()))?
            .send(write)
            .map_err(|_| StoreError::Backend("the store writer stopped".into()))
    }

    /// Applies records written but not yet committed.
    fn overlaid(&self, mut record: JobRecord) -> JobRecord {
        if let Some((pending, _)) = lock(&self.overlay).get(&record.id) {
            record.state = pending.state;
            record.finished_at = pending.finished_at;
            record.error = pending.error.clone();
        }
        record
    }
}

/// Runs `query` with the thread's connection, connecting (again) when needed.
fn with_client<T>(
    client: &mut Option<Client>,
    config: &::postgres::Config,
    query: impl FnOnce(&mut Client) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    if client.as_ref().is_none_or(Client::is_closed) {
        *client = Some(connect(config)?);
    }
    query(client.as_mut().expect("connected above"))
}

impl Drop for PgStore {
    fn drop(&mut self) {
        let _ = self.flush();
        lock(&self.tasks).take();
        lock(&self.writes).take();
        for handle in lock(&self.threads).drain(..) {
            let _ = handle.join();
        }
    }
}

struct Statements {
    tile: Statement,
    count: Statement,
    lease: Statement,
    record: Statement,
}

/// The writer thread: tiles, leases and job records, in order, batched.
struct Writer {
    config: ::postgres::Config,
    client: Option<Client>,
    statements: Option<Statements>,
    coordinator: String,
    overlay: Overlay,
    finished: FinishedHook,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Write>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(write) => batch.push(write),
                    Err(_) => break,
                }
            }
            let mut outcome = Err(StoreError::Backend("not written".into()));
            let mut finished = Vec::new();
            // Every write is idempotent: a batch cut off by a lost connection is retried.
            for attempt in 0..3 {
                outcome = self.commit(&batch).map(|done| finished = done);
                match &outcome {
                    Ok(()) => break,
                    Err(err) => {
                        tracing::error!(attempt, error = %err, "writing to the database failed");
                        self.client = None;
                        std::thread::sleep(Duration::from_millis(200 << attempt));
                    }
                }
            }
            let mut committed = 0;
            for write in batch {
                match write {
                    Write::Flush(reply) => {
                        let _ = reply.send(match &outcome {
                            Ok(()) => Ok(()),
                            Err(err) => Err(StoreError::Backend(err.to_string())),
                        });
                    }
                    Write::Record(_, seq) => committed = committed.max(seq),
                    _ => {}
                }
            }
            lock(&self.overlay).retain(|_, (_, seq)| *seq > committed);
            if let Some(hook) = lock(&self.finished).as_ref() {
                for (job, tiles) in finished {
                    hook(&job, tiles);
                }
            }
        }
    }

    fn connection(&mut self) -> Result<(&mut Client, &Statements), StoreError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            let mut client = connect(&self.config)?;
            let prepare = |client: &mut Client, sql: &str| client.prepare(sql).map_err(backend);
            self.statements = Some(Statements {
                tile: prepare(
                    &mut client,
                    "UPDATE tiles AS t SET state = 'done', payload = u.payload, digest = u.digest, \
                     done_by = $6, done_at = now(), coordinator = NULL, deadline = NULL \
                     FROM unnest($1::TEXT[], $2::INTEGER[], $3::INTEGER[], $4::BYTEA[], $5::BYTEA[]) \
                     AS u (job_id, i, j, payload, digest) \
                     WHERE t.job_id = u.job_id AND t.i = u.i AND t.j = u.j AND t.state <> 'done' \
                     RETURNING t.job_id",
                )?,
                count: prepare(
                    &mut client,
                    "UPDATE jobs SET tiles_done = tiles_done + $2, \
                     state = CASE WHEN tiles_done + $2 >= tiles_total THEN 'done' ELSE 'running' END, \
                     finished_at = CASE WHEN tiles_done + $2 >= tiles_total THEN now() ELSE finished_at END \
                     WHERE id = $1 AND state IN ('queued', 'running') \
                     RETURNING state, tiles_done",
                )?,
                lease: prepare(
                    &mut client,
                    "INSERT INTO leases (coordinator, lease, job_id, i, j, claim, worker, speculative, \
                     issued_at, deadline) \
                     SELECT $1, u.lease, u.job_id, u.i, u.j, t.claims, u.worker, u.speculative, now(), \
                     now() + make_interval(secs => u.secs) \
                     FROM unnest($2::BIGINT[], $3::TEXT[], $4::INTEGER[], $5::INTEGER[], $6::BIGINT[], \
                     $7::BOOLEAN[], $8::DOUBLE PRECISION[]) AS u (lease, job_id, i, j, worker, speculative, secs) \
                     JOIN tiles AS t ON t.job_id = u.job_id AND t.i = u.i AND t.j = u.j \
                     ON CONFLICT DO NOTHING",
                )?,
                record: prepare(
                    &mut client,
                    "UPDATE jobs SET state = $2, finished_at = $3, error = $4 \
                     WHERE id = $1 AND state IN ('queued', 'running') \
                     AND ($2 <> 'done' OR tiles_done >= tiles_total)",
                )?,
            });
            self.client = Some(client);
        }
        Ok((
            self.client.as_mut().expect("connected above"),
            self.statements
                .as_ref()
                .expect("prepared with the connection"),
        ))
    }

    /// Commits `batch`; returns the jobs it finished, with their tile counts. Runs of
    /// tiles and of leases each go in one statement (arrays unnested), so a batch costs
    /// a few round trips whatever its size.
    fn commit(&mut self, batch: &[Write]) -> Result<Vec<(String, u64)>, StoreError> {
        let me = self.coordinator.clone();
        let (client, st) = self.connection()?;
        let mut tx = client.transaction().map_err(backend)?;
        let mut tiles: Vec<&TileWrite> = Vec::new();
        let mut leases: Vec<&LeaseIssued> = Vec::new();
        let mut finished = Vec::new();
        for write in batch {
            match write {
                Write::Tile(tile) => tiles.push(tile),
                Write::Lease(lease) => leases.push(lease),
                Write::Record(record, _) => {
                    // Tiles first: a job marked done here needs its tiles counted.
                    write_tiles(&mut tx, st, &me, &mut tiles, &mut finished)?;
                    tx.execute(
                        &st.record,
                        &[
                            &record.id,
                            &record.state.name(),
                            &record.finished_at,
                            &record.error,
                        ],
                    )
                    .map_err(backend)?;
                }
                Write::Flush(_) => {}
            }
        }
        write_tiles(&mut tx, st, &me, &mut tiles, &mut finished)?;
        write_leases(&mut tx, st, &me, &mut leases)?;
        tx.commit().map_err(backend)?;
        Ok(finished)
    }
}

/// Writes `tiles` (and empties it), counts the newly done ones on their jobs, and adds the
/// jobs that became done to `finished`.
fn write_tiles(
    tx: &mut ::postgres::Transaction<'_>,
    st: &Statements,
    me: &str,
    tiles: &mut Vec<&TileWrite>,
    finished: &mut Vec<(String, u64)>,
) -> Result<(), StoreError> {
    if tiles.is_empty() {
        return Ok(());
    }
    let jobs: Vec<&str> = tiles.iter().map(|t| t.job.as_str()).collect();
    let is: Vec<i32> = tiles.iter().map(|t| t.tile.0 as i32).collect();
    let js: Vec<i32> = tiles.iter().map(|t| t.tile.1 as i32).collect();
    let payloads: Vec<&[u8]> = tiles.iter().map(|t| t.payload.as_slice()).collect();
    let digests: Vec<Vec<u8>> = tiles.iter().map(|t| hash(&t.payload)).collect();
    let written = tx
        .query(&st.tile, &[&jobs, &is, &js, &payloads, &digests, &me])
        .map_err(backend)?;
    let mut done: Vec<(String, i64)> = Vec::new();
    for row in written {
        let job: String = row.get(0);
        match done.iter_mut().find(|(j, _)| *j == job) {
            Some((_, n)) => *n += 1,
            None => done.push((job, 1)),
        }
    }
    tiles.clear();
    for (job, n) in done {
        for row in tx.query(&st.count, &[&job, &n]).map_err(backend)? {
            if row.get::<_, &str>(0) == JobState::Done.name() {
                finished.push((job.clone(), row.get::<_, i64>(1) as u64));
            }
        }
    }
    Ok(())
}

/// Records `leases` (and empties it).
fn write_leases(
    tx: &mut ::postgres::Transaction<'_>,
    st: &Statements,
    me: &str,
    leases: &mut Vec<&LeaseIssued>,
) -> Result<(), StoreError> {
    if leases.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = leases.iter().map(|l| l.lease as i64).collect();
    let jobs: Vec<&str> = leases.iter().map(|l| l.job.as_str()).collect();
    let is: Vec<i32> = leases.iter().map(|l| l.tile.0 as i32).collect();
    let js: Vec<i32> = leases.iter().map(|l| l.tile.1 as i32).collect();
    let workers: Vec<i64> = leases.iter().map(|l| l.worker as i64).collect();
    let speculative: Vec<bool> = leases.iter().map(|l| l.speculative).collect();
    let seconds: Vec<f64> = leases.iter().map(|l| l.deadline_ms as f64 / 1e3).collect();
    tx.execute(
        &st.lease,
        &[&me, &ids, &jobs, &is, &js, &workers, &speculative, &seconds],
    )
    .map_err(backend)?;
    leases.clear();
    Ok(())
}

impl Store for PgStore {
    fn insert_job(&self, job: &JobRecord, operands: &JobOperands) -> Result<Durable, StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let (job, operands) = (job.clone(), operands.clone());
        self.submit_task(Box::new(move |client, config| {
            let _ = tx.send(with_client(client, config, |c| insert(c, &job, &operands)));
        }))?;
        Ok(Durable::pending(rx))
    }

    fn update_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        lock(&self.overlay).insert(job.id.clone(), (job.clone(), seq));
        self.write(Write::Record(job.clone(), seq))
    }

    fn tile_accepted(&self, tile: TileWrite) -> Result<(), StoreError> {
        self.write(Write::Tile(tile))
    }

    fn lease_issued(&self, lease: LeaseIssued) {
        let _ = self.write(Write::Lease(lease));
    }

    fn put_result(&self, _id: &str, _result: Arc<Matrix>) -> Result<(), StoreError> {
        // The result is its tiles, written as they were accepted.
        Ok(())
    }

    fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let id = id.to_owned();
        let record = self.call(move |c| load_record(c, &id))?;
        Ok(record.map(|r| self.overlaid(r)))
    }

    fn list_jobs(&self, owner: Option<&str>) -> Result<Vec<JobRecord>, StoreError> {
        let owner = owner.map(str::to_owned);
        let records = self.call(move |c| {
            let rows = c
                .query(
                    &format!(
                        "SELECT {JOB_COLUMNS} FROM jobs WHERE $1::TEXT IS NULL OR owner = $1 \
                         ORDER BY created_at, id"
                    ),
                    &[&owner],
                )
                .map_err(backend)?;
            rows.iter().map(record_from).collect::<Result<Vec<_>, _>>()
        })?;
        Ok(records.into_iter().map(|r| self.overlaid(r)).collect())
    }

    fn result(&self, id: &str) -> Result<Option<Arc<Matrix>>, StoreError> {
        // Tiles this coordinator accepted last may still be on their way.
        self.flush()?;
        let id = id.to_owned();
        self.call(move |c| {
            let Some(record) = load_record(c, &id)? else {
                return Ok(None);
            };
            if record.state != JobState::Done {
                return Ok(None);
            }
            let plan = record.plan();
            let mut matrix = Matrix::zeros(record.dtype, record.m as usize, record.n as usize)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let rows = c
                .query(
                    "SELECT i, j, payload, digest FROM tiles WHERE job_id = $1 AND state = 'done'",
                    &[&id],
                )
                .map_err(backend)?;
            if rows.len() as u64 != plan.tile_count() {
                return Err(StoreError::Corrupt(format!(
                    "job {id}: {} of {} tiles stored",
                    rows.len(),
                    plan.tile_count()
                )));
            }
            for row in rows {
                let (i, j) = (row.get::<_, i32>(0) as u32, row.get::<_, i32>(1) as u32);
                let payload: &[u8] = row.get(2);
                let digest: &[u8] = row.get(3);
                let (r, cl) = (plan.rows(i), plan.cols(j));
                let expected = r.len() * cl.len() * record.dtype.size();
                if payload.len() != expected || hash(payload) != digest {
                    return Err(StoreError::Corrupt(format!(
                        "job {id}: tile ({i}, {j}) does not match its checksum"
                    )));
                }
                matrix.write_block(
                    r.start as usize,
                    cl.start as usize,
                    r.len(),
                    cl.len(),
                    payload,
                );
            }
            Ok(Some(Arc::new(matrix)))
        })
    }

    fn delete_job(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        lock(&self.overlay).remove(&id);
        self.call(move |c| {
            let mut tx = c.transaction().map_err(backend)?;
            tx.execute("DELETE FROM leases WHERE job_id = $1", &[&id])
                .map_err(backend)?;
            let gone = tx
                .execute("DELETE FROM jobs WHERE id = $1", &[&id])
                .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(gone > 0)
        })
    }

    fn unfinished_jobs(&self) -> Result<Vec<ResumedJob>, StoreError> {
        // Coordinators on a shared database take jobs up as they claim their tiles
        // (`cluster`), not at start.
        Ok(Vec::new())
    }

    fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.write(Write::Flush(tx))?;
        rx.recv()
            .unwrap_or_else(|_| Err(StoreError::Backend("the store writer stopped".into())))
    }
}

/// A job's state in the database, for coordinators following it.
#[derive(Clone, Debug)]
pub struct JobStatus {
    pub id: String,
    pub state: JobState,
    pub tiles_done: u64,
    pub error: Option<String>,
    pub priority: i32,
    pub created_at: SystemTime,
}

/// One coordinator's connection for claims: claiming, renewing, giving back and reaping
/// tiles, and finding jobs to take up.
pub struct Session {
    client: Client,
    coordinator: String,
}

impl Session {
    /// Claims up to `count` pending tiles of job `id` for `ttl`, row by row; tiles other
    /// coordinators are claiming at this moment are skipped, not waited for.
    pub fn claim(
        &mut self,
        id: &str,
        count: u64,
        ttl: Duration,
    ) -> Result<Vec<(u32, u32)>, StoreError> {
        let rows = self
            .client
            .query(
                "UPDATE tiles AS t SET state = 'claimed', coordinator = $1, \
                 deadline = now() + make_interval(secs => $2), claims = t.claims + 1 \
                 FROM (SELECT job_id, i, j FROM tiles \
                       WHERE job_id = $3 AND state = 'pending' \
                       ORDER BY i, j LIMIT $4 FOR UPDATE SKIP LOCKED) AS c \
                 WHERE t.job_id = c.job_id AND t.i = c.i AND t.j = c.j \
                 RETURNING t.i, t.j",
                &[&self.coordinator, &ttl.as_secs_f64(), &id, &(count as i64)],
            )
            .map_err(backend)?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i32>(0) as u32, r.get::<_, i32>(1) as u32))
            .collect())
    }

    /// Extends this coordinator's claims by `ttl`; returns the tiles it still holds.
    pub fn renew(&mut self, ttl: Duration) -> Result<HashMap<String, Vec<(u32, u32)>>, StoreError> {
        let rows = self
            .client
            .query(
                "UPDATE tiles SET deadline = now() + make_interval(secs => $2) \
                 WHERE state = 'claimed' AND coordinator = $1 RETURNING job_id, i, j",
                &[&self.coordinator, &ttl.as_secs_f64()],
            )
            .map_err(backend)?;
        let mut held: HashMap<String, Vec<(u32, u32)>> = HashMap::new();
        for row in rows {
            held.entry(row.get(0))
                .or_default()
                .push((row.get::<_, i32>(1) as u32, row.get::<_, i32>(2) as u32));
        }
        Ok(held)
    }

    /// Gives back this coordinator's claims on `tiles` of job `id`.
    pub fn give_back(&mut self, id: &str, tiles: &[(u32, u32)]) -> Result<u64, StoreError> {
        let is: Vec<i32> = tiles.iter().map(|t| t.0 as i32).collect();
        let js: Vec<i32> = tiles.iter().map(|t| t.1 as i32).collect();
        self.client
            .execute(
                "UPDATE tiles SET state = 'pending', coordinator = NULL, deadline = NULL \
                 WHERE job_id = $1 AND state = 'claimed' AND coordinator = $2 \
                 AND (i, j) IN (SELECT * FROM unnest($3::INTEGER[], $4::INTEGER[]))",
                &[&id, &self.coordinator, &is, &js],
            )
            .map_err(backend)
    }

    /// Gives back every claim of this coordinator (it is stopping).
    pub fn give_back_all(&mut self) -> Result<u64, StoreError> {
        self.client
            .execute(
                "UPDATE tiles SET state = 'pending', coordinator = NULL, deadline = NULL \
                 WHERE state = 'claimed' AND coordinator = $1",
                &[&self.coordinator],
            )
            .map_err(backend)
    }

    /// Puts claims past their deadline back (their coordinator died or lost the
    /// database); returns how many.
    pub fn reap(&mut self) -> Result<u64, StoreError> {
        self.client
            .execute(
                "UPDATE tiles SET state = 'pending', coordinator = NULL, deadline = NULL \
                 WHERE state = 'claimed' AND deadline < now()",
                &[],
            )
            .map_err(backend)
    }

    /// Unfinished jobs with tiles nobody holds, oldest first, with the states of `known`.
    pub fn statuses(&mut self, known: &[String]) -> Result<Vec<JobStatus>, StoreError> {
        let rows = self
            .client
            .query(
                "SELECT id, state, tiles_done, error, priority, created_at FROM jobs \
                 WHERE id = ANY($1) OR state IN ('queued', 'running') \
                 ORDER BY created_at, id",
                &[&known],
            )
            .map_err(backend)?;
        rows.iter()
            .map(|r| {
                Ok(JobStatus {
                    id: r.get(0),
                    state: JobState::parse(r.get(1))?,
                    tiles_done: r.get::<_, i64>(2) as u64,
                    error: r.get(3),
                    priority: r.get(4),
                    created_at: r.get(5),
                })
            })
            .collect()
    }

    /// A job's record and operands, to take it up.
    pub fn load(&mut self, id: &str) -> Result<Option<(JobRecord, JobOperands)>, StoreError> {
        let Some(record) = load_record(&mut self.client, id)? else {
            return Ok(None);
        };
        let operands = load_operands(&mut self.client, &record)?;
        Ok(Some((record, operands)))
    }

    /// Whether the connection broke (the caller opens a new session).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}
