//! Several coordinators on one PostgreSQL database: each one's claims loop.
//!
//! A coordinator's grid hands out only tiles it has claimed in the database. The loop,
//! on a thread of its own with its own connection:
//! - takes up every unfinished job in the database that this grid does not run yet
//!   (submitted through another coordinator, or left by a dead one), loading its
//!   operands from the database;
//! - follows the progress every coordinator makes on the jobs it runs, and ends them here
//!   when the database says they ended (done, failed, cancelled or deleted anywhere);
//! - claims pending tiles as this grid's workers can take them (`FOR UPDATE SKIP
//!   LOCKED`: a tile another coordinator is claiming is skipped, never waited for),
//!   highest priority first, shared between jobs of equal priority;
//! - renews its claims well before their deadline, and cancels the work of any claim it
//!   lost (it was cut off from the database for longer than the deadline);
//! - gives claims back when no worker is left here to compute them;
//! - puts back the claims of coordinators that died (past their deadline).
//!
//! There is no leader: every coordinator runs the same loop, and the database's row
//! locks decide every race.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::grid::Grid;
use crate::store::postgres::{JobStatus, PgStore, Session};
use crate::store::{Store, StoreError};

/// Timing of the claims loop.
#[derive(Clone, Debug)]
pub struct ClaimConfig {
    /// How long a claim lasts without renewal: how long a dead coordinator's tiles wait
    /// before another coordinator takes them.
    pub ttl: Duration,
    /// How often jobs' states and progress are read, and dead claims reaped.
    pub poll: Duration,
}

impl Default for ClaimConfig {
    fn default() -> Self {
        ClaimConfig {
            ttl: Duration::from_secs(30),
            poll: Duration::from_millis(200),
        }
    }
}

/// The running claims loop.
pub struct Claims {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Claims {
    /// Starts the claims loop of `grid` (made to hand out claimed tiles only) on `store`.
    pub fn start(
        grid: Arc<Grid>,
        store: Arc<PgStore>,
        config: ClaimConfig,
    ) -> std::io::Result<Claims> {
        grid.share_tiles();
        // A job whose last tile is written here ends here at once, not at the next poll
        // (weak: the grid owns the store).
        let weak = Arc::downgrade(&grid);
        store.on_finished(move |id, tiles| {
            if let Some(grid) = weak.upgrade() {
                grid.ended_elsewhere(id, crate::store::JobState::Done, tiles, None, true);
            }
        });
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("claims".into())
            .spawn(move || Loop::new(grid, store, config).run(&flag))?;
        Ok(Claims {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the loop and gives this coordinator's claims back (call once its workers
    /// are gone and its accepted tiles written).
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Claims {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Most tiles claimed ahead of the workers' free slots.
const MAX_AHEAD: u64 = 2048;

/// Claim loop rounds per poll: claims are made this much more often than states are read.
const CLAIM_ROUNDS: u32 = 10;

struct Loop {
    grid: Arc<Grid>,
    store: Arc<PgStore>,
    config: ClaimConfig,
    session: Option<Session>,
    /// Unfinished jobs running here, by priority then age, from the last poll.
    order: Vec<JobStatus>,
    /// The grid's jobs at the last poll.
    live: Vec<String>,
    /// Of those, the ones the database had.
    seen: std::collections::HashSet<String>,
    last_poll: Option<Instant>,
    last_renewal: Option<Instant>,
    /// A claim found nothing pending: wait for the next poll before trying again.
    starved: bool,
    /// Tiles handed out here at the last claim, and when: the workers' pace.
    assigned: u64,
    claimed_at: Option<Instant>,
}

impl Loop {
    fn new(grid: Arc<Grid>, store: Arc<PgStore>, config: ClaimConfig) -> Loop {
        Loop {
            grid,
            store,
            config,
            session: None,
            order: Vec::new(),
            live: Vec::new(),
            seen: std::collections::HashSet::new(),
            last_poll: None,
            last_renewal: None,
            starved: false,
            assigned: 0,
            claimed_at: None,
        }
    }

    fn run(mut self, stop: &AtomicBool) {
        let nudge = self.grid.nudge();
        let mut failures = 0u32;
        while !stop.load(Ordering::SeqCst) {
            match self.round() {
                Ok(()) => failures = 0,
                Err(err) => {
                    failures += 1;
                    tracing::error!(error = %err, failures, "claims loop: database unreachable");
                    self.session = None;
                    let backoff = Duration::from_millis(100 << failures.min(5));
                    std::thread::sleep(backoff.min(self.config.ttl / 4));
                    continue;
                }
            }
            if nudge.wait(self.config.poll / CLAIM_ROUNDS) {
                // Workers here ran short, or a job arrived: worth another claim.
                self.starved = false;
            }
        }
        let metrics = self.grid.metrics().clone();
        if let Ok(session) = self.connected() {
            match session.give_back_all() {
                Ok(n) if n > 0 => {
                    metrics.tile_claims("given_back", n);
                    tracing::info!(tiles = n, "gave claims back");
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(error = %err, "giving claims back failed; they expire"),
            }
        }
    }

    fn connected(&mut self) -> Result<&mut Session, StoreError> {
        if self.session.as_ref().is_none_or(Session::is_closed) {
            self.session = Some(self.store.session()?);
        }
        Ok(self.session.as_mut().expect("connected above"))
    }

    fn round(&mut self) -> Result<(), StoreError> {
        let due =
            |last: Option<Instant>, every: Duration| last.is_none_or(|t| t.elapsed() >= every);
        // A job submitted or ended here, or one whose row was not yet committed at the
        // last poll, is looked up at once rather than at the next poll.
        let ids = self.grid.job_ids();
        let changed = ids != self.live || ids.iter().any(|id| !self.seen.contains(id));
        if changed || due(self.last_poll, self.config.poll) {
            self.poll()?;
            self.last_poll = Some(Instant::now());
            self.starved = false;
        }
        if due(self.last_renewal, self.config.ttl / 4) {
            self.renew()?;
            self.last_renewal = Some(Instant::now());
        }
        if !self.starved {
            self.claim()?;
        }
        Ok(())
    }

    /// Reads the states of jobs: takes up new ones, follows progress, ends finished ones,
    /// and reaps dead coordinators' claims.
    fn poll(&mut self) -> Result<(), StoreError> {
        let live = self.grid.job_ids();
        self.live = live.clone();
        let reaped = self.connected()?.reap()?;
        self.grid.metrics().tile_claims("reaped", reaped);
        let session = self.connected()?;
        if reaped > 0 {
            tracing::info!(tiles = reaped, "took back claims past their deadline");
        }
        let statuses = session.statuses(&live)?;
        let by_id: HashMap<&str, &JobStatus> =
            statuses.iter().map(|s| (s.id.as_str(), s)).collect();
        for id in &live {
            match by_id.get(id.as_str()) {
                // A job submitted here is live before its row commits: only one seen in
                // the database before and gone now was deleted.
                None if !self.seen.contains(id) => {}
                None => self.grid.ended_elsewhere(
                    id,
                    crate::store::JobState::Cancelled,
                    0,
                    Some("deleted".into()),
                    false,
                ),
                Some(s) if s.state.is_terminal() => {
                    self.grid
                        .ended_elsewhere(id, s.state, s.tiles_done, s.error.clone(), false)
                }
                Some(s) => self.grid.set_progress(id, s.state, s.tiles_done),
            }
        }
        for status in statuses.iter().filter(|s| !s.state.is_terminal()) {
            if self.grid.has_job(&status.id) {
                continue;
            }
            let session = self.connected()?;
            match session.load(&status.id) {
                Ok(Some((mut record, operands))) => {
                    tracing::info!(job = record.id, "taking up job from the shared store");
                    record.tiles_done = status.tiles_done;
                    self.grid.adopt(record, operands);
                }
                Ok(None) => {}
                Err(StoreError::Corrupt(why)) => {
                    tracing::error!(job = status.id, why, "job cannot be taken up");
                }
                Err(err) => return Err(err),
            }
        }
        // Only jobs running here can take claims (one that could not be taken up cannot).
        let live: std::collections::HashSet<String> = self.grid.job_ids().into_iter().collect();
        // Jobs live now (including those just taken up) that the database has.
        self.seen = self
            .grid
            .job_ids()
            .into_iter()
            .filter(|id| by_id.contains_key(id.as_str()))
            .collect();
        let mut order: Vec<JobStatus> = statuses
            .into_iter()
            .filter(|s| !s.state.is_terminal() && live.contains(&s.id))
            .collect();
        order.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then(a.created_at.cmp(&b.created_at))
                .then(a.id.cmp(&b.id))
        });
        self.order = order;
        // Nobody here to compute held tiles: other coordinators may have workers.
        for (id, tiles) in self.grid.idle_claims() {
            let released = self.grid.release(&id, &tiles);
            let n = self.connected()?.give_back(&id, &released)?;
            self.grid.metrics().tile_claims("given_back", n);
        }
        Ok(())
    }

    /// Extends this coordinator's claims, stops work on any it lost, and gives back any
    /// it holds without a use here.
    fn renew(&mut self) -> Result<(), StoreError> {
        let ttl = self.config.ttl;
        // Tiles accepted here are in the database first, so they are not taken for
        // claims without a use.
        self.store.flush()?;
        let held = self.connected()?.renew(ttl)?;
        let local: HashMap<String, Vec<(u32, u32)>> = self.grid.held().into_iter().collect();
        for (id, tiles) in &held {
            let unused: Vec<(u32, u32)> = tiles
                .iter()
                .filter(|t| local.get(id).is_none_or(|l| !l.contains(t)))
                .copied()
                .collect();
            if !unused.is_empty() {
                let n = self.connected()?.give_back(id, &unused)?;
                self.grid.metrics().tile_claims("given_back", n);
            }
        }
        for (id, tiles) in local {
            let kept = held.get(&id);
            let lost: Vec<(u32, u32)> = tiles
                .into_iter()
                .filter(|t| kept.is_none_or(|k| !k.contains(t)))
                .collect();
            if !lost.is_empty() {
                tracing::warn!(
                    job = id,
                    tiles = lost.len(),
                    "claims lost; their work here is cancelled"
                );
                self.grid.release(&id, &lost);
                self.grid.metrics().tile_claims("lost", lost.len() as u64);
            }
        }
        Ok(())
    }

    /// Claims as many tiles as this grid's workers can take: the highest priority first,
    /// shared evenly between jobs of one priority.
    fn claim(&mut self) -> Result<(), StoreError> {
        // Beyond the workers' free slots, as many tiles as they take in one round at their
        // recent pace: fast workers on small tiles are not left waiting for the next
        // round, and no more is held back from other coordinators.
        let assigned = self.grid.assigned_total();
        let now = Instant::now();
        let elapsed = now
            .duration_since(self.claimed_at.unwrap_or(now))
            .max(Duration::from_millis(1));
        let round = (self.config.poll / CLAIM_ROUNDS).as_secs_f64();
        let taken = assigned.saturating_sub(self.assigned) as f64;
        let ahead = ((taken * round / elapsed.as_secs_f64()).ceil() as u64).min(MAX_AHEAD);
        self.assigned = assigned;
        self.claimed_at = Some(now);
        let mut wanted = self.grid.tiles_wanted(ahead);
        if wanted == 0 || self.order.is_empty() {
            return Ok(());
        }
        let ttl = self.config.ttl;
        let order = self.order.clone();
        let mut got_any = false;
        let mut at = 0;
        while at < order.len() && wanted > 0 {
            let priority = order[at].priority;
            let group: Vec<&JobStatus> = order[at..]
                .iter()
                .take_while(|s| s.priority == priority)
                .collect();
            at += group.len();
            let mut left = group.len() as u64;
            for status in group {
                let share = wanted.div_ceil(left);
                left -= 1;
                let tiles = self.connected()?.claim(&status.id, share, ttl)?;
                tracing::debug!(job = status.id, asked = share, got = tiles.len(), "claimed");
                if tiles.is_empty() {
                    continue;
                }
                got_any = true;
                self.grid
                    .metrics()
                    .tile_claims("claimed", tiles.len() as u64);
                wanted = wanted.saturating_sub(tiles.len() as u64);
                self.grid.offer(&status.id, &tiles);
            }
        }
        self.starved = !got_any;
        Ok(())
    }
}
