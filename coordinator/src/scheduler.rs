//! The scheduler: a plain state machine that decides which worker computes which tile.
//!
//! Events go in as method calls (a job added, a worker ready, a result accepted, a
//! disconnect, a tick with the current time); decisions come out as [`Command`]s drained
//! with [`Scheduler::drain`]. There is no IO, no clock and no `async` here: sockets, time
//! and the store live around it in `grid`, so every rule below is a fast, deterministic
//! unit test.
//!
//! Rules:
//! - Workers pull: `Ready { slots }` adds credits, each credit gets one tile.
//! - Job choice: highest priority first (a job that got nothing for `aging` gains one
//!   level per period, so none starves), then the job with the fewest active leases (fair
//!   share between equals), then the oldest.
//! - Tile choice inside a job: a tile whose row and column panels the worker already
//!   holds, then one with one of them, then the first pending tile.
//! - Every assignment is a lease with a deadline from the worker's measured speed; a
//!   disconnect returns its leases at once, [`Scheduler::tick`] returns expired ones.
//! - When nothing is pending, an idle worker takes a duplicate of a straggling tile (at
//!   most `max_copies` copies); the first accepted result wins and the others are cancelled.
//! - The coordinator mirrors each worker's operand cache exactly: it sends a panel only
//!   when the worker lacks it and tells the worker what to forget when its cache is full.
//! - A job with a [`Quorum`] (for work with no cheap check) has each tile computed by
//!   `agree` distinct workers; the grid compares their results ([`Scheduler::returned`])
//!   and either completes the tile ([`Scheduler::complete`]) or asks for one more copy
//!   ([`Scheduler::more_copies`]), up to `of` copies.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};

use tabgrid_shared::protocol::{LeaseId, MAX_SLOTS, OperandKey};
use tabgrid_shared::tiling::TilePlan;

/// Milliseconds on the caller's clock.
pub type Millis = u64;
pub type WorkerId = u64;
pub type JobId = u64;
pub type TileIndex = (u32, u32);

/// Tunables, with defaults suited to real workers.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Shortest lease, whatever the worker's speed: covers transfer and start-up.
    pub lease_floor_ms: Millis,
    /// A lease lasts this many times the tile's expected compute time (plus the floor).
    pub lease_factor: f64,
    /// Most concurrent copies of one tile (1 disables speculation).
    pub max_copies: usize,
    /// A job given nothing for this long gains one priority level per period.
    pub aging_ms: Millis,
    /// Retired leases remembered per worker (so a late result is recognised, not a fault).
    pub retired_per_worker: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            lease_floor_ms: 15_000,
            lease_factor: 4.0,
            max_copies: 2,
            aging_ms: 30_000,
            retired_per_worker: 1024,
        }
    }
}

/// An operand as the scheduler sees it: its key and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Panel {
    pub key: OperandKey,
    pub bytes: u64,
}

/// Replication instead of a check: a tile is done when `agree` results from distinct
/// workers are equal, out of at most `of` copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quorum {
    pub agree: u32,
    pub of: u32,
}

/// What the scheduler needs to know of a job.
#[derive(Clone, Debug)]
pub struct JobTiles {
    pub id: JobId,
    pub priority: i32,
    pub plan: TilePlan,
    /// Row panel of A for each tile row.
    pub a_panels: Vec<Panel>,
    /// Column panel of B for each tile column.
    pub b_panels: Vec<Panel>,
    /// Tile of C for each tile, row-major, when `beta != 0` and C was given.
    pub c_tiles: Option<Vec<Panel>>,
    /// Tiles already accepted (a resumed job), row-major.
    pub done: Vec<TileIndex>,
    /// Replication, for jobs whose results cannot be checked.
    pub quorum: Option<Quorum>,
    /// Tiles this scheduler may hand out (`None`: every open tile). Coordinators sharing
    /// one database hand out only the tiles they claimed there; more come with
    /// [`Scheduler::offer`].
    pub held: Option<Vec<TileIndex>>,
}

/// A decision for the IO layer to carry out, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Send operand `key` to `worker` (it will cache it).
    SendOperand { worker: WorkerId, key: OperandKey },
    /// Tell `worker` to drop these operands.
    Forget {
        worker: WorkerId,
        keys: Vec<OperandKey>,
    },
    /// Send the assignment of a lease.
    Assign(Assignment),
    /// Tell `worker` a lease is no longer wanted.
    Cancel { worker: WorkerId, lease: LeaseId },
    /// Every tile of the job is accepted.
    JobComplete { job: JobId },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    pub worker: WorkerId,
    pub lease: LeaseId,
    pub job: JobId,
    pub tile: TileIndex,
    pub a: OperandKey,
    pub b: OperandKey,
    pub c: Option<OperandKey>,
    /// Time the worker has, from now.
    pub deadline_ms: Millis,
    /// A duplicate of a tile someone else is computing.
    pub speculative: bool,
}

/// A worker broke the protocol; the IO layer closes its connection with this reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("unknown worker {0}")]
    UnknownWorker(WorkerId),
    #[error(
        "Ready with {slots} slots would leave {total} tiles outstanding, over the limit of {limit}"
    )]
    TooManySlots { slots: u32, total: u32, limit: u32 },
    #[error("Ready with 0 slots")]
    ZeroSlots,
    #[error("lease {0} was never given to this worker")]
    ForeignLease(LeaseId),
}

/// What a lease a worker reports on refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseStatus {
    /// A live lease of this worker.
    Active { job: JobId, tile: TileIndex },
    /// This worker's lease that expired or was cancelled: its result may still be useful
    /// (if the tile is not done) and is never a fault.
    Retired { job: JobId, tile: TileIndex },
}

/// Counters the coordinator exports as metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub assigned: u64,
    pub speculative: u64,
    pub expired: u64,
    /// Leases returned because their worker disconnected.
    pub returned: u64,
    /// Leases the worker reported as failed, or whose result was rejected.
    pub failed: u64,
    pub operands_sent: u64,
    pub operand_bytes_sent: u64,
}

impl Stats {
    /// Tiles handed out again after their lease ended without a result.
    pub fn reassignments(&self) -> u64 {
        self.expired + self.returned + self.failed
    }
}

#[derive(Clone, Copy, Debug)]
struct Lease {
    worker: WorkerId,
    job: JobId,
    tile: TileIndex,
    issued: Millis,
    expected_ms: Millis,
    deadline: Millis,
}

struct JobState {
    tiles: JobTiles,
    seq: u64,
    /// Pending tiles by row and by column, so locality lookups are cheap.
    pending_rows: Vec<BTreeSet<u32>>,
    pending_cols: Vec<BTreeSet<u32>>,
    nonempty_rows: BTreeSet<u32>,
    pending: u64,
    /// Active leases per tile.
    active: HashMap<TileIndex, Vec<LeaseId>>,
    active_count: usize,
    /// Expired leases per open tile: their workers may still be computing them, and are
    /// told to stop once another copy is accepted.
    expired: HashMap<TileIndex, Vec<LeaseId>>,
    done: Vec<bool>,
    done_count: u64,
    last_assigned: Millis,
    /// Workers whose result for an open tile failed verification: the tile is never
    /// theirs again.
    refused: HashMap<TileIndex, Vec<WorkerId>>,
    /// Replicated jobs: copies wanted per open tile (when more than `agree`), and the
    /// workers computing or done computing a copy (one copy each).
    wanted: HashMap<TileIndex, u32>,
    replicas: HashMap<TileIndex, Vec<WorkerId>>,
    /// Replicated jobs: results returned per open tile, awaiting agreement.
    returned: HashMap<TileIndex, u32>,
}

impl JobState {
    fn tile_slot(&self, (i, j): TileIndex) -> usize {
        i as usize * self.tiles.plan.tiles_j() as usize + j as usize
    }

    fn make_pending(&mut self, (i, j): TileIndex) {
        if self.pending_rows[i as usize].insert(j) {
            self.pending_cols[j as usize].insert(i);
            self.nonempty_rows.insert(i);
            self.pending += 1;
        }
    }

    fn take_pending(&mut self, (i, j): TileIndex) {
        if self.pending_rows[i as usize].remove(&j) {
            self.pending_cols[j as usize].remove(&i);
            if self.pending_rows[i as usize].is_empty() {
                self.nonempty_rows.remove(&i);
            }
            self.pending -= 1;
        }
    }

    /// Whether `worker` may compute `tile` (it has not sent a wrong result for it, nor
    /// holds a copy of a replicated tile).
    fn allowed(&self, tile: TileIndex, worker: WorkerId) -> bool {
        (self.refused.is_empty() || self.refused.get(&tile).is_none_or(|w| !w.contains(&worker)))
            && (self.replicas.is_empty()
                || self
                    .replicas
                    .get(&tile)
                    .is_none_or(|w| !w.contains(&worker)))
    }

    /// Whether an open tile needs another copy handed out: none is running, or for a
    /// replicated job, fewer are running or returned than wanted.
    fn short(&self, tile: TileIndex) -> bool {
        let active = self.active.get(&tile).map_or(0, Vec::len) as u32;
        match self.tiles.quorum {
            None => active == 0,
            Some(q) => {
                let wanted = self.wanted.get(&tile).copied().unwrap_or(q.agree);
                active + self.returned.get(&tile).copied().unwrap_or(0) < wanted
            }
        }
    }

    fn keys(&self, (i, j): TileIndex) -> (Panel, Panel, Option<Panel>) {
        let c = self
            .tiles
            .c_tiles
            .as_ref()
            .map(|c| c[self.tile_slot((i, j))]);
        (
            self.tiles.a_panels[i as usize],
            self.tiles.b_panels[j as usize],
            c,
        )
    }
}

struct WorkerState {
    credits: u32,
    /// GFLOP/s, from the worker's own bench and then from its results.
    gflops: f64,
    cache_bytes: u64,
    /// Operands this worker holds: size and last use, for LRU eviction. Ordered, so the
    /// locality scan in `pick_tile` (and so every decision) is deterministic.
    held: BTreeMap<OperandKey, (u64, u64)>,
    held_bytes: u64,
    leases: HashSet<LeaseId>,
    retired: VecDeque<LeaseId>,
}

/// Where a panel is used, so a worker's cache can be read as rows and columns of jobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Side {
    Row(u32),
    Col(u32),
    C,
}

/// The scheduling state machine. See the module docs for its rules.
pub struct Scheduler {
    config: SchedulerConfig,
    jobs: HashMap<JobId, JobState>,
    job_seq: u64,
    workers: HashMap<WorkerId, WorkerState>,
    /// Workers with credits left, in id order (deterministic tests).
    idle: BTreeSet<WorkerId>,
    leases: HashMap<LeaseId, Lease>,
    retired: HashMap<LeaseId, Lease>,
    deadlines: BinaryHeap<Reverse<(Millis, LeaseId)>>,
    next_lease: LeaseId,
    /// Uses of each operand key by live jobs.
    panels: HashMap<OperandKey, Vec<(JobId, Side)>>,
    use_clock: u64,
    stats: Stats,
    out: Vec<Command>,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Scheduler {
        Scheduler {
            config,
            jobs: HashMap::new(),
            job_seq: 0,
            workers: HashMap::new(),
            idle: BTreeSet::new(),
            leases: HashMap::new(),
            retired: HashMap::new(),
            deadlines: BinaryHeap::new(),
            next_lease: 1,
            panels: HashMap::new(),
            use_clock: 0,
            stats: Stats::default(),
            out: Vec::new(),
        }
    }

    /// Takes the decisions made since the last call.
    pub fn drain(&mut self) -> Vec<Command> {
        std::mem::take(&mut self.out)
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// `(tiles done, tiles total)` of a job.
    pub fn progress(&self, job: JobId) -> Option<(u64, u64)> {
        self.jobs
            .get(&job)
            .map(|j| (j.done_count, j.tiles.plan.tile_count()))
    }

    /// A worker's speed estimate, GFLOP/s: its bench, then learnt from its results.
    pub fn worker_gflops(&self, worker: WorkerId) -> Option<f64> {
        self.workers.get(&worker).map(|w| w.gflops)
    }

    pub fn active_leases(&self) -> usize {
        self.leases.len()
    }

    pub fn pending_tiles(&self) -> u64 {
        self.jobs.values().map(|j| j.pending).sum()
    }

    /// Adds a job; idle workers get its tiles at once.
    pub fn add_job(&mut self, tiles: JobTiles, now: Millis) {
        let id = tiles.id;
        let (ti, tj) = (tiles.plan.tiles_i(), tiles.plan.tiles_j());
        for (i, panel) in tiles.a_panels.iter().enumerate() {
            self.panels
                .entry(panel.key)
                .or_default()
                .push((id, Side::Row(i as u32)));
        }
        for (j, panel) in tiles.b_panels.iter().enumerate() {
            self.panels
                .entry(panel.key)
                .or_default()
                .push((id, Side::Col(j as u32)));
        }
        for panel in tiles.c_tiles.iter().flatten() {
            self.panels
                .entry(panel.key)
                .or_default()
                .push((id, Side::C));
        }
        self.job_seq += 1;
        let total = tiles.plan.tile_count() as usize;
        let mut job = JobState {
            seq: self.job_seq,
            pending_rows: vec![BTreeSet::new(); ti as usize],
            pending_cols: vec![BTreeSet::new(); tj as usize],
            nonempty_rows: BTreeSet::new(),
            pending: 0,
            active: HashMap::new(),
            expired: HashMap::new(),
            active_count: 0,
            done: vec![false; total],
            done_count: 0,
            last_assigned: now,
            refused: HashMap::new(),
            wanted: HashMap::new(),
            replicas: HashMap::new(),
            returned: HashMap::new(),
            tiles,
        };
        for &tile in &job.tiles.done.clone() {
            let slot = job.tile_slot(tile);
            if !job.done[slot] {
                job.done[slot] = true;
                job.done_count += 1;
            }
        }
        match job.tiles.held.take() {
            None => {
                for i in 0..ti {
                    for j in 0..tj {
                        if !job.done[job.tile_slot((i, j))] {
                            job.make_pending((i, j));
                        }
                    }
                }
            }
            Some(held) => {
                for tile in held {
                    if tile.0 < ti && tile.1 < tj && !job.done[job.tile_slot(tile)] {
                        job.make_pending(tile);
                    }
                }
            }
        }
        let complete = job.done_count == total as u64;
        self.jobs.insert(id, job);
        if complete {
            self.out.push(Command::JobComplete { job: id });
        }
        self.dispatch_idle(now);
    }

    /// Removes a job (finished, cancelled or deleted): its leases are cancelled and its
    /// operands forgotten by every worker that holds them and needs them for nothing else.
    pub fn remove_job(&mut self, job: JobId) {
        let Some(state) = self.jobs.remove(&job) else {
            return;
        };
        let mut leases: Vec<LeaseId> = state.active.values().flatten().copied().collect();
        leases.sort_unstable();
        for lease in leases {
            self.retire(lease, true);
        }
        let mut orphaned = Vec::new();
        for key in state
            .tiles
            .a_panels
            .iter()
            .chain(&state.tiles.b_panels)
            .chain(state.tiles.c_tiles.iter().flatten())
            .map(|p| p.key)
        {
            if let Some(uses) = self.panels.get_mut(&key) {
                uses.retain(|(j, _)| *j != job);
                if uses.is_empty() {
                    self.panels.remove(&key);
                    orphaned.push(key);
                }
            }
        }
        if orphaned.is_empty() {
            return;
        }
        let orphaned: HashSet<OperandKey> = orphaned.into_iter().collect();
        let mut ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let worker = self.workers.get_mut(&id).expect("listed above");
            let mut keys: Vec<OperandKey> = worker
                .held
                .keys()
                .filter(|k| orphaned.contains(k))
                .copied()
                .collect();
            if keys.is_empty() {
                continue;
            }
            keys.sort_unstable();
            for key in &keys {
                if let Some((bytes, _)) = worker.held.remove(key) {
                    worker.held_bytes -= bytes;
                }
            }
            self.out.push(Command::Forget { worker: id, keys });
        }
    }

    /// Tiles claimed for this scheduler (a job added with [`JobTiles::held`]): they are
    /// handed out like any pending tile. The claim says the tile has no result in the
    /// shared store, so one done here (its write was lost) is open again. Tiles running or
    /// unknown are skipped.
    pub fn offer(&mut self, job: JobId, tiles: &[TileIndex], now: Millis) {
        let Some(state) = self.jobs.get_mut(&job) else {
            return;
        };
        let (ti, tj) = (state.tiles.plan.tiles_i(), state.tiles.plan.tiles_j());
        for &tile in tiles {
            if tile.0 >= ti || tile.1 >= tj || state.active.contains_key(&tile) {
                continue;
            }
            let slot = state.tile_slot(tile);
            if state.done[slot] {
                state.done[slot] = false;
                state.done_count -= 1;
            }
            state.make_pending(tile);
        }
        self.dispatch_idle(now);
    }

    /// Tiles this scheduler may no longer hand out (their claim was lost or given back):
    /// running copies are cancelled and the tiles leave the queue. Returns the tiles that
    /// were held (pending or running).
    pub fn release(&mut self, job: JobId, tiles: &[TileIndex]) -> Vec<TileIndex> {
        let mut released = Vec::new();
        for &tile in tiles {
            let Some(state) = self.jobs.get_mut(&job) else {
                break;
            };
            if tile.0 >= state.tiles.plan.tiles_i()
                || tile.1 >= state.tiles.plan.tiles_j()
                || state.done[state.tile_slot(tile)]
            {
                continue;
            }
            let running = state.active.get(&tile).cloned().unwrap_or_default();
            let was_pending = state.pending_rows[tile.0 as usize].contains(&tile.1);
            for lease in running.iter().copied() {
                self.retire(lease, true);
            }
            let state = self.jobs.get_mut(&job).expect("checked above");
            state.take_pending(tile);
            if was_pending || !running.is_empty() {
                released.push(tile);
            }
        }
        released
    }

    /// Pending tiles (held, not running) of a job.
    pub fn pending_of(&self, job: JobId) -> Vec<TileIndex> {
        self.jobs.get(&job).map_or_else(Vec::new, |j| {
            j.nonempty_rows
                .iter()
                .flat_map(|&i| j.pending_rows[i as usize].iter().map(move |&c| (i, c)))
                .collect()
        })
    }

    /// Tiles a job holds: pending or running.
    pub fn held_of(&self, job: JobId) -> Vec<TileIndex> {
        let mut tiles = self.pending_of(job);
        if let Some(j) = self.jobs.get(&job) {
            tiles.extend(j.active.keys().copied());
        }
        tiles.sort_unstable();
        tiles.dedup();
        tiles
    }

    /// Tiles this scheduler could hand out now beyond those pending: the credits of idle
    /// workers plus one queued tile per worker and `ahead` more, less what is pending.
    pub fn wanted(&self, ahead: u64) -> u64 {
        let credits: u64 = self.workers.values().map(|w| u64::from(w.credits)).sum();
        (credits + self.workers.len() as u64 + ahead).saturating_sub(self.pending_tiles())
    }

    /// Connected workers.
    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// A worker completed its handshake. It gets work when it sends `Ready`.
    pub fn worker_joined(&mut self, worker: WorkerId, gflops: f64, cache_bytes: u64) {
        self.workers.insert(
            worker,
            WorkerState {
                credits: 0,
                gflops: sane_gflops(gflops),
                cache_bytes,
                held: BTreeMap::new(),
                held_bytes: 0,
                leases: HashSet::new(),
                retired: VecDeque::new(),
            },
        );
    }

    /// A worker disconnected: its leases return to the queue at once.
    pub fn worker_left(&mut self, worker: WorkerId, now: Millis) {
        let Some(state) = self.workers.remove(&worker) else {
            return;
        };
        self.idle.remove(&worker);
        for lease in state.retired {
            self.retired.remove(&lease);
        }
        let mut leases: Vec<LeaseId> = state.leases.into_iter().collect();
        leases.sort_unstable();
        for id in leases {
            if let Some(lease) = self.leases.remove(&id) {
                self.stats.returned += 1;
                self.unlink(id, &lease);
            }
        }
        self.dispatch_idle(now);
    }

    /// The worker can take `slots` more tiles.
    pub fn ready(&mut self, worker: WorkerId, slots: u32, now: Millis) -> Result<(), Violation> {
        let state = self
            .workers
            .get_mut(&worker)
            .ok_or(Violation::UnknownWorker(worker))?;
        if slots == 0 {
            return Err(Violation::ZeroSlots);
        }
        let total = state.credits.saturating_add(slots);
        let outstanding = total as usize + state.leases.len();
        if outstanding > MAX_SLOTS as usize {
            return Err(Violation::TooManySlots {
                slots,
                total: outstanding as u32,
                limit: MAX_SLOTS,
            });
        }
        state.credits = total;
        self.idle.insert(worker);
        self.dispatch(worker, now);
        Ok(())
    }

    /// What `lease`, reported by `worker`, refers to. A lease that was never this worker's
    /// is a violation.
    pub fn lease(&self, worker: WorkerId, lease: LeaseId) -> Result<LeaseStatus, Violation> {
        if let Some(l) = self.leases.get(&lease).filter(|l| l.worker == worker) {
            return Ok(LeaseStatus::Active {
                job: l.job,
                tile: l.tile,
            });
        }
        if let Some(l) = self.retired.get(&lease).filter(|l| l.worker == worker) {
            return Ok(LeaseStatus::Retired {
                job: l.job,
                tile: l.tile,
            });
        }
        Err(Violation::ForeignLease(lease))
    }

    /// Whether a tile still needs a result.
    pub fn tile_open(&self, job: JobId, tile: TileIndex) -> bool {
        self.jobs.get(&job).is_some_and(|j| {
            tile.0 < j.tiles.plan.tiles_i()
                && tile.1 < j.tiles.plan.tiles_j()
                && !j.done[j.tile_slot(tile)]
        })
    }

    /// A verified result for `lease` was accepted: the tile is done, other copies are
    /// cancelled, and the worker's speed estimate learns from `compute_micros`.
    /// Returns whether the tile was newly completed (false: someone else was first).
    pub fn accept(
        &mut self,
        worker: WorkerId,
        lease: LeaseId,
        compute_micros: u64,
        now: Millis,
    ) -> Result<bool, Violation> {
        let status = self.lease(worker, lease)?;
        let (job_id, tile) = match status {
            LeaseStatus::Active { job, tile } | LeaseStatus::Retired { job, tile } => (job, tile),
        };
        self.forget_lease(worker, lease);
        let Some(flops) = self.finish_tile(job_id, tile, Some(lease), now) else {
            return Ok(false);
        };
        if let Some(w) = self.workers.get_mut(&worker)
            && compute_micros > 0
        {
            let measured = flops / compute_micros as f64 / 1e3;
            w.gflops = sane_gflops(0.7 * w.gflops + 0.3 * measured);
        }
        Ok(true)
    }

    /// A copy of a replicated tile came back (the grid keeps it until enough agree): the
    /// lease ends, and the worker's speed estimate learns from `compute_micros`. Returns
    /// the job and tile, or `None` when the tile is done or its job gone.
    pub fn returned(
        &mut self,
        worker: WorkerId,
        lease: LeaseId,
        compute_micros: u64,
        now: Millis,
    ) -> Result<Option<(JobId, TileIndex)>, Violation> {
        let (job_id, tile) = match self.lease(worker, lease)? {
            LeaseStatus::Active { job, tile } | LeaseStatus::Retired { job, tile } => (job, tile),
        };
        self.forget_lease(worker, lease);
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return Ok(None);
        };
        if job.done[job.tile_slot(tile)] {
            return Ok(None);
        }
        let flops = job.tiles.plan.tile_flops(tile.0, tile.1);
        if let Some(copies) = job.active.get_mut(&tile) {
            let before = copies.len();
            copies.retain(|&l| l != lease);
            job.active_count -= before - copies.len();
            if copies.is_empty() {
                job.active.remove(&tile);
            }
        }
        *job.returned.entry(tile).or_default() += 1;
        self.leases.remove(&lease);
        if let Some(w) = self.workers.get_mut(&worker)
            && compute_micros > 0
        {
            let measured = flops / compute_micros as f64 / 1e3;
            w.gflops = sane_gflops(0.7 * w.gflops + 0.3 * measured);
        }
        self.dispatch_idle(now);
        Ok(Some((job_id, tile)))
    }

    /// Copies wanted of an open tile of a replicated job.
    pub fn copies_wanted(&self, job: JobId, tile: TileIndex) -> Option<u32> {
        let job = self.jobs.get(&job)?;
        let quorum = job.tiles.quorum?;
        Some(job.wanted.get(&tile).copied().unwrap_or(quorum.agree))
    }

    /// Enough copies of a replicated tile agree: it is done, other copies are cancelled.
    pub fn complete(&mut self, job: JobId, tile: TileIndex, now: Millis) -> bool {
        self.finish_tile(job, tile, None, now).is_some()
    }

    /// The copies of a replicated tile returned so far do not agree: one more is handed
    /// out. False when the quorum's `of` copies were all tried (the grid fails the job).
    pub fn more_copies(&mut self, job_id: JobId, tile: TileIndex, now: Millis) -> bool {
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return false;
        };
        let Some(quorum) = job.tiles.quorum else {
            return false;
        };
        let wanted = job.wanted.entry(tile).or_insert(quorum.agree);
        if *wanted >= quorum.of {
            return false;
        }
        *wanted += 1;
        if job.short(tile) {
            job.make_pending(tile);
        }
        self.dispatch_idle(now);
        true
    }

    /// Marks a tile done, cancels its other copies and completes the job after its last
    /// tile. Returns the tile's flops, or `None` when it was done already.
    fn finish_tile(
        &mut self,
        job_id: JobId,
        tile: TileIndex,
        lease: Option<LeaseId>,
        now: Millis,
    ) -> Option<f64> {
        let job = self.jobs.get_mut(&job_id)?;
        let slot = job.tile_slot(tile);
        if job.done[slot] {
            return None;
        }
        let lease = lease.unwrap_or(0);
        job.done[slot] = true;
        job.done_count += 1;
        job.take_pending(tile);
        if !job.refused.is_empty() {
            job.refused.remove(&tile);
        }
        if job.tiles.quorum.is_some() {
            job.wanted.remove(&tile);
            job.replicas.remove(&tile);
            job.returned.remove(&tile);
        }
        let flops = job.tiles.plan.tile_flops(tile.0, tile.1);
        let others = job.active.remove(&tile).unwrap_or_default();
        job.active_count -= others.len();
        // Almost always empty: skip hashing the tile on the hot path.
        let expired = if job.expired.is_empty() {
            Vec::new()
        } else {
            job.expired.remove(&tile).unwrap_or_default()
        };
        let complete = job.done_count == job.tiles.plan.tile_count();
        // Workers still computing an expired copy stop; their lease stays remembered, so a
        // result already on its way is recognised, not taken for a fault.
        for id in expired {
            if let Some(l) = self.retired.get(&id).filter(|_| id != lease) {
                self.out.push(Command::Cancel {
                    worker: l.worker,
                    lease: id,
                });
            }
        }
        for other in others {
            if let Some(l) = self.leases.remove(&other) {
                // The accepted lease itself is among the copies: it is done, not cancelled.
                if other == lease {
                    continue;
                }
                if let Some(w) = self.workers.get_mut(&l.worker) {
                    w.leases.remove(&other);
                }
                self.remember_retired(other, l);
                self.out.push(Command::Cancel {
                    worker: l.worker,
                    lease: other,
                });
            }
        }
        if complete {
            self.out.push(Command::JobComplete { job: job_id });
        }
        self.dispatch_idle(now);
        Some(flops)
    }

    /// The worker could not compute `lease`, or its result was refused: the tile goes back
    /// to the queue.
    pub fn failed(
        &mut self,
        worker: WorkerId,
        lease: LeaseId,
        now: Millis,
    ) -> Result<(), Violation> {
        self.lease(worker, lease)?;
        self.forget_lease(worker, lease);
        if let Some(l) = self.leases.remove(&lease) {
            self.stats.failed += 1;
            self.unlink(lease, &l);
        }
        self.dispatch_idle(now);
        Ok(())
    }

    /// The result for `lease` failed verification: the tile goes back to the queue for
    /// any worker but this one.
    pub fn rejected(
        &mut self,
        worker: WorkerId,
        lease: LeaseId,
        now: Millis,
    ) -> Result<(), Violation> {
        let (job_id, tile) = match self.lease(worker, lease)? {
            LeaseStatus::Active { job, tile } | LeaseStatus::Retired { job, tile } => (job, tile),
        };
        if let Some(job) = self.jobs.get_mut(&job_id)
            && !job.done[job.tile_slot(tile)]
        {
            job.refused.entry(tile).or_default().push(worker);
        }
        self.failed(worker, lease, now)
    }

    /// Advances time: expired leases return to the queue and idle workers may take
    /// duplicates of stragglers.
    pub fn tick(&mut self, now: Millis) {
        while let Some(&Reverse((deadline, id))) = self.deadlines.peek() {
            if deadline > now {
                break;
            }
            self.deadlines.pop();
            let Some(lease) = self.leases.get(&id).copied() else {
                continue;
            };
            if lease.deadline != deadline {
                continue;
            }
            self.stats.expired += 1;
            self.retire(id, false);
            if let Some(job) = self.jobs.get_mut(&lease.job) {
                job.expired.entry(lease.tile).or_default().push(id);
            }
        }
        self.dispatch_idle(now);
    }

    /// Drops a lease from the live set, remembers it as retired for its worker and puts
    /// its tile back in the queue. `cancel` also tells the worker.
    fn retire(&mut self, id: LeaseId, cancel: bool) {
        let Some(lease) = self.leases.remove(&id) else {
            return;
        };
        self.unlink(id, &lease);
        if let Some(w) = self.workers.get_mut(&lease.worker) {
            w.leases.remove(&id);
        }
        self.remember_retired(id, lease);
        if cancel {
            self.out.push(Command::Cancel {
                worker: lease.worker,
                lease: id,
            });
        }
    }

    fn remember_retired(&mut self, id: LeaseId, lease: Lease) {
        let Some(w) = self.workers.get_mut(&lease.worker) else {
            return;
        };
        w.retired.push_back(id);
        if w.retired.len() > self.config.retired_per_worker
            && let Some(old) = w.retired.pop_front()
        {
            self.retired.remove(&old);
        }
        self.retired.insert(id, lease);
    }

    /// Removes a lease of `worker` from its bookkeeping (active or retired).
    fn forget_lease(&mut self, worker: WorkerId, id: LeaseId) {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.leases.remove(&id);
            if self.retired.remove(&id).is_some() {
                w.retired.retain(|&l| l != id);
            }
        }
    }

    /// Detaches a removed lease from its job; the tile is pending again when no other copy
    /// is running and it is not done.
    fn unlink(&mut self, id: LeaseId, lease: &Lease) {
        if let Some(w) = self.workers.get_mut(&lease.worker) {
            w.leases.remove(&id);
        }
        let Some(job) = self.jobs.get_mut(&lease.job) else {
            return;
        };
        if let Some(copies) = job.active.get_mut(&lease.tile) {
            let before = copies.len();
            copies.retain(|&l| l != id);
            job.active_count -= before - copies.len();
            if copies.is_empty() {
                job.active.remove(&lease.tile);
            }
        }
        if job.tiles.quorum.is_some()
            && let Some(holders) = job.replicas.get_mut(&lease.tile)
        {
            // Its copy never came back: the worker may take the tile again.
            if let Some(at) = holders.iter().position(|&w| w == lease.worker) {
                holders.remove(at);
            }
        }
        if !job.done[job.tile_slot(lease.tile)] && job.short(lease.tile) {
            job.make_pending(lease.tile);
        }
    }

    fn dispatch_idle(&mut self, now: Millis) {
        let idle: Vec<WorkerId> = self.idle.iter().copied().collect();
        for worker in idle {
            self.dispatch(worker, now);
        }
    }

    /// Spends the worker's credits on tiles.
    fn dispatch(&mut self, worker: WorkerId, now: Millis) {
        loop {
            let Some(state) = self.workers.get(&worker) else {
                self.idle.remove(&worker);
                return;
            };
            if state.credits == 0 {
                self.idle.remove(&worker);
                return;
            }
            let choice = self
                .pick_pending(worker, now)
                .map(|(j, t)| (j, t, false))
                .or_else(|| self.pick_straggler(worker, now).map(|(j, t)| (j, t, true)));
            let Some((job, tile, speculative)) = choice else {
                return;
            };
            self.assign(worker, job, tile, speculative, now);
        }
    }

    /// A pending tile for `worker`: from the job [`Scheduler::pick_job`] picks, or, when
    /// every pending tile there was refused from this worker, from any other job.
    fn pick_pending(&self, worker: WorkerId, now: Millis) -> Option<(JobId, TileIndex)> {
        let job = self.pick_job(now)?;
        if let Some(tile) = self.pick_tile(job, worker) {
            return Some((job, tile));
        }
        let mut others: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|&(&id, j)| id != job && j.pending > 0)
            .map(|(&id, _)| id)
            .collect();
        others.sort_unstable();
        others
            .into_iter()
            .find_map(|other| self.pick_tile(other, worker).map(|tile| (other, tile)))
    }

    fn pick_job(&self, now: Millis) -> Option<JobId> {
        let aging = self.config.aging_ms.max(1);
        self.jobs
            .iter()
            .filter(|(_, j)| j.pending > 0)
            .max_by_key(|(_, j)| {
                let boost = now.saturating_sub(j.last_assigned) / aging;
                let priority = i64::from(j.tiles.priority).saturating_add(boost as i64);
                (priority, Reverse(j.active_count), Reverse(j.seq))
            })
            .map(|(&id, _)| id)
    }

    fn pick_tile(&self, job_id: JobId, worker: WorkerId) -> Option<TileIndex> {
        /// Bounds each scan, so one assignment costs O(SCAN log n) however big the job.
        const SCAN: usize = 64;
        let job = &self.jobs[&job_id];
        let state = &self.workers[&worker];
        let holds = |panel: &Panel| state.held.contains_key(&panel.key);
        let mut half: Option<TileIndex> = None;
        // Rows with pending tiles whose A panel the worker holds: a tile there whose B panel
        // it holds too moves no bytes at all.
        for &i in job.nonempty_rows.iter().take(SCAN) {
            if !holds(&job.tiles.a_panels[i as usize]) {
                continue;
            }
            for &j in job.pending_rows[i as usize].iter().take(SCAN) {
                if !job.allowed((i, j), worker) {
                    continue;
                }
                if holds(&job.tiles.b_panels[j as usize]) {
                    return Some((i, j));
                }
                half.get_or_insert((i, j));
            }
        }
        if half.is_some() {
            return half;
        }
        // Otherwise a pending tile in a column whose B panel the worker holds.
        for key in state.held.keys().take(SCAN) {
            for &(j, side) in self.panels.get(key).into_iter().flatten() {
                if let (true, Side::Col(col)) = (j == job_id, side)
                    && let Some(&i) = job.pending_cols[col as usize]
                        .iter()
                        .find(|&&i| job.allowed((i, col), worker))
                {
                    return Some((i, col));
                }
            }
        }
        if job.refused.is_empty() && job.replicas.is_empty() {
            let &i = job.nonempty_rows.first()?;
            let &j = job.pending_rows[i as usize].first()?;
            return Some((i, j));
        }
        // A wrong result was sent for this job, or it is replicated: scan for a tile this
        // worker may take.
        job.nonempty_rows
            .iter()
            .flat_map(|&i| job.pending_rows[i as usize].iter().map(move |&j| (i, j)))
            .find(|&tile| job.allowed(tile, worker))
    }

    /// A tile worth duplicating for an idle worker: running longer than its expected time
    /// on its worker, held by fewer than `max_copies` workers, none of them this one.
    fn pick_straggler(&self, worker: WorkerId, now: Millis) -> Option<(JobId, TileIndex)> {
        if self.config.max_copies < 2 {
            return None;
        }
        let mut best: Option<(Reverse<i32>, Millis, JobId, TileIndex)> = None;
        for (&job_id, job) in self.jobs.iter().filter(|(_, j)| j.tiles.quorum.is_none()) {
            for (&tile, copies) in &job.active {
                if copies.len() >= self.config.max_copies {
                    continue;
                }
                let mut oldest = Millis::MAX;
                let mut late = false;
                let mut mine = false;
                for id in copies {
                    let lease = &self.leases[id];
                    mine |= lease.worker == worker;
                    oldest = oldest.min(lease.issued);
                    late |= now.saturating_sub(lease.issued) >= lease.expected_ms.max(1);
                }
                if mine || !late || !job.allowed(tile, worker) {
                    continue;
                }
                let key = (Reverse(job.tiles.priority), oldest, job_id, tile);
                if best.is_none_or(|b| key < b) {
                    best = Some(key);
                }
            }
        }
        best.map(|(_, _, job, tile)| (job, tile))
    }

    fn assign(
        &mut self,
        worker: WorkerId,
        job_id: JobId,
        tile: TileIndex,
        speculative: bool,
        now: Millis,
    ) {
        let job = self.jobs.get_mut(&job_id).expect("picked from live jobs");
        job.last_assigned = now;
        let flops = job.tiles.plan.tile_flops(tile.0, tile.1);
        let (a, b, c) = job.keys(tile);
        let id = self.next_lease;
        self.next_lease += 1;
        job.active.entry(tile).or_default().push(id);
        job.active_count += 1;
        if job.tiles.quorum.is_some() {
            job.replicas.entry(tile).or_default().push(worker);
        }
        if job.short(tile) {
            job.make_pending(tile);
        } else {
            job.take_pending(tile);
        }

        let state = self
            .workers
            .get_mut(&worker)
            .expect("dispatching a live worker");
        state.credits -= 1;
        let expected_ms = (flops / (state.gflops * 1e6)).ceil() as Millis;
        let deadline_ms =
            self.config.lease_floor_ms + (expected_ms as f64 * self.config.lease_factor) as Millis;
        state.leases.insert(id);
        let needed: Vec<Panel> = [Some(a), Some(b), c].into_iter().flatten().collect();
        self.provide(worker, &needed);
        let lease = Lease {
            worker,
            job: job_id,
            tile,
            issued: now,
            expected_ms,
            deadline: now + deadline_ms,
        };
        self.leases.insert(id, lease);
        self.deadlines.push(Reverse((lease.deadline, id)));
        self.stats.assigned += 1;
        if speculative {
            self.stats.speculative += 1;
        }
        self.out.push(Command::Assign(Assignment {
            worker,
            lease: id,
            job: job_id,
            tile,
            a: a.key,
            b: b.key,
            c: c.map(|c| c.key),
            deadline_ms,
            speculative,
        }));
    }

    /// Makes sure `worker` holds `needed`, sending what it lacks and evicting its least
    /// recently used panels (none needed by its live leases) to stay within its cache.
    fn provide(&mut self, worker: WorkerId, needed: &[Panel]) {
        self.use_clock += 1;
        let clock = self.use_clock;
        let missing: Vec<Panel> = {
            let state = self.workers.get_mut(&worker).expect("live worker");
            for p in needed {
                if let Some(entry) = state.held.get_mut(&p.key) {
                    entry.1 = clock;
                }
            }
            // Deduplicated: equal content (say, zero panels of A and B) has equal keys.
            let mut missing: Vec<Panel> = Vec::new();
            for p in needed {
                if !state.held.contains_key(&p.key) && !missing.iter().any(|m| m.key == p.key) {
                    missing.push(*p);
                }
            }
            missing
        };
        if missing.is_empty() {
            return;
        }
        let incoming: u64 = missing.iter().map(|p| p.bytes).sum();
        let state = &self.workers[&worker];
        if state.held_bytes + incoming > state.cache_bytes {
            // The lease being assigned is not in `self.leases` yet: keep its own panels too.
            let mut in_use = self.keys_in_use(worker);
            in_use.extend(needed.iter().map(|p| p.key));
            let state = self.workers.get_mut(&worker).expect("live worker");
            let mut candidates: Vec<(u64, OperandKey, u64)> = state
                .held
                .iter()
                .filter(|(k, _)| !in_use.contains(k))
                .map(|(k, &(bytes, used))| (used, *k, bytes))
                .collect();
            candidates.sort_unstable();
            let mut evicted = Vec::new();
            for (_, key, bytes) in candidates {
                if state.held_bytes + incoming <= state.cache_bytes {
                    break;
                }
                state.held.remove(&key);
                state.held_bytes -= bytes;
                evicted.push(key);
            }
            if !evicted.is_empty() {
                self.out.push(Command::Forget {
                    worker,
                    keys: evicted,
                });
            }
        }
        let state = self.workers.get_mut(&worker).expect("live worker");
        for p in missing {
            state.held.insert(p.key, (p.bytes, clock));
            state.held_bytes += p.bytes;
            self.stats.operands_sent += 1;
            self.stats.operand_bytes_sent += p.bytes;
            self.out.push(Command::SendOperand { worker, key: p.key });
        }
    }

    /// Operand keys the worker's live leases still need.
    fn keys_in_use(&self, worker: WorkerId) -> HashSet<OperandKey> {
        let mut keys = HashSet::new();
        for id in &self.workers[&worker].leases {
            if let Some(lease) = self.leases.get(id)
                && let Some(job) = self.jobs.get(&lease.job)
            {
                let (a, b, c) = job.keys(lease.tile);
                keys.insert(a.key);
                keys.insert(b.key);
                if let Some(c) = c {
                    keys.insert(c.key);
                }
            }
        }
        keys
    }
}

fn sane_gflops(gflops: f64) -> f64 {
    if gflops.is_finite() {
        gflops.clamp(0.05, 10_000.0)
    } else {
        1.0
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
