//! Unit tests of the scheduler, driven through a small simulated grid of volunteers.
//!
//! The [`Harness`] plays the IO layer: it feeds events to the [`Scheduler`], applies every
//! [`Command`] it drains to simulated volunteers (what each holds, its leases, its
//! credits) and checks after every step that no volunteer is sent an operand twice, gets
//! an assignment whose operands it lacks, or loses an operand a live lease needs. Tests
//! then assert outcomes on the drained commands, in the spirit of raft-rs's `harness/`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::*;

/// Tile edge and inner dimension of the small jobs most tests use: 20 000 flops a tile,
/// so every lease is expected to take 1 ms on any worker.
const EDGE: u32 = 10;
const DEPTH: u32 = 100;
/// Bytes of every panel; only ratios to cache sizes matter.
const PANEL: u64 = 100;
const BIG_CACHE: u64 = 1 << 40;

/// A distinct synthetic operand key for panel `index` of `side` of `job`.
fn key(job: JobId, side: u8, index: u32) -> OperandKey {
    // Readable in `Debug` (first six bytes): job, side, index.
    let mut bytes = [0; 16];
    bytes[0] = job as u8;
    bytes[1] = side;
    bytes[2..6].copy_from_slice(&index.to_be_bytes());
    bytes[6..14].copy_from_slice(&job.to_be_bytes());
    OperandKey(bytes)
}

/// A job over `plan` with distinct panels derived from its id.
fn job_with(id: JobId, priority: i32, plan: TilePlan) -> JobTiles {
    JobTiles {
        id,
        priority,
        plan,
        a_panels: (0..plan.tiles_i())
            .map(|i| Panel {
                key: key(id, b'a', i),
                bytes: PANEL,
            })
            .collect(),
        b_panels: (0..plan.tiles_j())
            .map(|j| Panel {
                key: key(id, b'b', j),
                bytes: PANEL,
            })
            .collect(),
        c_tiles: None,
        done: Vec::new(),
        quorum: None,
        held: None,
    }
}

/// A job of `rows x cols` small tiles.
fn job(id: JobId, priority: i32, rows: u32, cols: u32) -> JobTiles {
    job_with(
        id,
        priority,
        TilePlan::new(rows * EDGE, cols * EDGE, DEPTH, EDGE, EDGE),
    )
}

/// A job of `cols` tiles of 2·10⁷ flops each: 20 ms at 1 GFLOP/s.
fn heavy_job(id: JobId, cols: u32) -> JobTiles {
    job_with(id, 0, TilePlan::new(100, cols * 100, 1000, 100, 100))
}

fn config() -> SchedulerConfig {
    SchedulerConfig {
        lease_floor_ms: 1000,
        lease_factor: 4.0,
        max_copies: 2,
        aging_ms: 30_000,
        retired_per_worker: 1024,
    }
}

fn no_speculation() -> SchedulerConfig {
    SchedulerConfig {
        max_copies: 1,
        ..config()
    }
}

fn job_tile(status: LeaseStatus) -> (JobId, TileIndex) {
    match status {
        LeaseStatus::Active { job, tile } | LeaseStatus::Retired { job, tile } => (job, tile),
    }
}

fn assignments(commands: &[Command]) -> Vec<Assignment> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Assign(a) => Some(a.clone()),
            _ => None,
        })
        .collect()
}

fn sends(commands: &[Command]) -> Vec<(WorkerId, OperandKey)> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::SendOperand { worker, key } => Some((*worker, *key)),
            _ => None,
        })
        .collect()
}

fn forgets(commands: &[Command]) -> Vec<(WorkerId, Vec<OperandKey>)> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Forget { worker, keys } => Some((*worker, keys.clone())),
            _ => None,
        })
        .collect()
}

fn cancels(commands: &[Command]) -> Vec<(WorkerId, LeaseId)> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Cancel { worker, lease } => Some((*worker, *lease)),
            _ => None,
        })
        .collect()
}

fn completions(commands: &[Command]) -> Vec<JobId> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::JobComplete { job } => Some(*job),
            _ => None,
        })
        .collect()
}

/// The one assignment in `commands`.
fn only_assignment(commands: &[Command]) -> Assignment {
    let all = assignments(commands);
    assert_eq!(all.len(), 1, "expected one assignment in {commands:?}");
    all.into_iter().next().expect("one")
}

/// A volunteer as the harness sees it: what the commands sent to it left it with.
#[derive(Default)]
struct Volunteer {
    cache_bytes: u64,
    /// Operands held, with their size.
    held: BTreeMap<OperandKey, u64>,
    /// Operands received since its last assignment.
    fresh: Vec<OperandKey>,
    /// Leases it is computing (including ones the scheduler let expire).
    leases: BTreeMap<LeaseId, Assignment>,
    /// Ready slots not yet spent on an assignment.
    credits: u32,
}

impl Volunteer {
    fn held_bytes(&self) -> u64 {
        self.held.values().sum()
    }

    fn holds_operands_of(&self, a: &Assignment) -> bool {
        [Some(a.a), Some(a.b), a.c]
            .into_iter()
            .flatten()
            .all(|k| self.held.contains_key(&k))
    }
}

/// The IO layer around the scheduler, simulated: feeds events in and applies commands.
struct Harness {
    sched: Scheduler,
    now: Millis,
    volunteers: BTreeMap<WorkerId, Volunteer>,
    sizes: HashMap<OperandKey, u64>,
    totals: BTreeMap<JobId, u64>,
    removed: BTreeSet<JobId>,
    /// Tiles for which `accept` returned true.
    accepted: BTreeSet<(JobId, TileIndex)>,
    completed: BTreeSet<JobId>,
    /// Every command drained, in order.
    log: Vec<Command>,
}

impl Harness {
    fn new(config: SchedulerConfig) -> Harness {
        Harness {
            sched: Scheduler::new(config),
            now: 0,
            volunteers: BTreeMap::new(),
            sizes: HashMap::new(),
            totals: BTreeMap::new(),
            removed: BTreeSet::new(),
            accepted: BTreeSet::new(),
            completed: BTreeSet::new(),
            log: Vec::new(),
        }
    }

    fn add_job(&mut self, tiles: JobTiles) -> Vec<Command> {
        for p in tiles
            .a_panels
            .iter()
            .chain(&tiles.b_panels)
            .chain(tiles.c_tiles.iter().flatten())
        {
            self.sizes.insert(p.key, p.bytes);
        }
        self.totals.insert(tiles.id, tiles.plan.tile_count());
        for &tile in &tiles.done {
            self.accepted.insert((tiles.id, tile));
        }
        self.sched.add_job(tiles, self.now);
        self.apply()
    }

    fn remove_job(&mut self, job: JobId) -> Vec<Command> {
        self.removed.insert(job);
        self.sched.remove_job(job);
        self.apply()
    }

    fn join(&mut self, worker: WorkerId, gflops: f64, cache_bytes: u64) {
        self.sched.worker_joined(worker, gflops, cache_bytes);
        self.volunteers.insert(
            worker,
            Volunteer {
                cache_bytes,
                ..Volunteer::default()
            },
        );
        assert!(self.apply().is_empty(), "joining alone assigns nothing");
    }

    fn leave(&mut self, worker: WorkerId) -> Vec<Command> {
        self.volunteers.remove(&worker);
        self.sched.worker_left(worker, self.now);
        self.apply()
    }

    fn try_ready(&mut self, worker: WorkerId, slots: u32) -> Result<Vec<Command>, Violation> {
        self.sched.ready(worker, slots, self.now)?;
        self.volunteers
            .get_mut(&worker)
            .expect("ready from a volunteer")
            .credits += slots;
        Ok(self.apply())
    }

    fn ready(&mut self, worker: WorkerId, slots: u32) -> Vec<Command> {
        self.try_ready(worker, slots).expect("a valid Ready")
    }

    /// `worker` reports a verified result for `lease`.
    fn accept(&mut self, worker: WorkerId, lease: LeaseId) -> (bool, Vec<Command>) {
        let status = self
            .sched
            .lease(worker, lease)
            .expect("a lease of this worker");
        let fresh = self
            .sched
            .accept(worker, lease, 1000, self.now)
            .expect("a lease of this worker");
        if let Some(v) = self.volunteers.get_mut(&worker) {
            v.leases.remove(&lease);
        }
        let (job, tile) = job_tile(status);
        if fresh {
            assert!(
                self.accepted.insert((job, tile)),
                "tile {tile:?} of job {job} accepted twice"
            );
        } else {
            assert!(
                self.accepted.contains(&(job, tile)) || self.removed.contains(&job),
                "a result for open tile {tile:?} of job {job} was ignored"
            );
        }
        (fresh, self.apply())
    }

    fn fail(&mut self, worker: WorkerId, lease: LeaseId) -> Vec<Command> {
        self.sched
            .failed(worker, lease, self.now)
            .expect("a lease of this worker");
        if let Some(v) = self.volunteers.get_mut(&worker) {
            v.leases.remove(&lease);
        }
        self.apply()
    }

    /// `worker`'s result for `lease` failed verification.
    fn reject(&mut self, worker: WorkerId, lease: LeaseId) -> Vec<Command> {
        self.sched
            .rejected(worker, lease, self.now)
            .expect("a lease of this worker");
        if let Some(v) = self.volunteers.get_mut(&worker) {
            v.leases.remove(&lease);
        }
        self.apply()
    }

    /// `worker` returns its copy of a replicated tile.
    fn give_back(&mut self, worker: WorkerId, lease: LeaseId) -> Vec<Command> {
        self.sched
            .returned(worker, lease, 1000, self.now)
            .expect("a lease of this worker");
        if let Some(v) = self.volunteers.get_mut(&worker) {
            v.leases.remove(&lease);
        }
        self.apply()
    }

    /// The grid found enough agreeing copies of a replicated tile.
    fn complete(&mut self, job: JobId, tile: TileIndex) -> (bool, Vec<Command>) {
        let fresh = self.sched.complete(job, tile, self.now);
        if fresh {
            assert!(
                self.accepted.insert((job, tile)),
                "tile {tile:?} of job {job} accepted twice"
            );
        }
        (fresh, self.apply())
    }

    fn tick(&mut self, now: Millis) -> Vec<Command> {
        self.now = now;
        self.sched.tick(now);
        self.apply()
    }

    /// Drains the scheduler, applies each command to its volunteer and checks invariants.
    fn apply(&mut self) -> Vec<Command> {
        let commands = self.sched.drain();
        for command in &commands {
            match command {
                Command::SendOperand { worker, key } => {
                    let bytes = self.sizes[key];
                    let v = self.volunteer(*worker);
                    assert!(
                        v.held.insert(*key, bytes).is_none(),
                        "{key:?} sent again to worker {worker}, which holds it"
                    );
                    v.fresh.push(*key);
                }
                Command::Forget { worker, keys } => {
                    let v = self.volunteer(*worker);
                    assert!(!keys.is_empty(), "empty Forget");
                    for key in keys {
                        assert!(
                            v.held.remove(key).is_some(),
                            "worker {worker} told to forget {key:?}, which it lacks"
                        );
                    }
                }
                Command::Assign(a) => {
                    let v = self.volunteer(a.worker);
                    assert!(v.credits > 0, "assignment beyond the worker's credits");
                    v.credits -= 1;
                    assert!(
                        v.holds_operands_of(a),
                        "worker {} assigned {a:?} without its operands",
                        a.worker
                    );
                    let needed: BTreeSet<OperandKey> =
                        [Some(a.a), Some(a.b), a.c].into_iter().flatten().collect();
                    let sent_any = !v.fresh.is_empty();
                    for key in v.fresh.drain(..) {
                        assert!(
                            needed.contains(&key),
                            "{key:?} sent to worker {} for nothing",
                            a.worker
                        );
                    }
                    assert!(v.leases.insert(a.lease, a.clone()).is_none());
                    // Making room for what it sends, the scheduler goes over the cap only
                    // when the live leases need more than fits. (It forgets lazily: an
                    // earlier, unavoidable excess stays until room is needed again.)
                    if sent_any {
                        let live: BTreeSet<OperandKey> = v
                            .leases
                            .values()
                            .flat_map(|l| [Some(l.a), Some(l.b), l.c])
                            .flatten()
                            .collect();
                        let live_bytes: u64 =
                            live.iter().map(|k| v.held.get(k).unwrap_or(&0)).sum();
                        assert!(
                            v.held_bytes() <= v.cache_bytes.max(live_bytes),
                            "worker {} holds {} bytes over its cap of {} (live leases need {live_bytes})",
                            a.worker,
                            v.held_bytes(),
                            v.cache_bytes
                        );
                    }
                }
                Command::Cancel { worker, lease } => {
                    let v = self.volunteer(*worker);
                    assert!(
                        v.leases.remove(lease).is_some(),
                        "Cancel of lease {lease}, which worker {worker} is not computing"
                    );
                }
                Command::JobComplete { job } => {
                    assert!(self.completed.insert(*job), "job {job} completed twice");
                    let (done, total) = self.sched.progress(*job).expect("a live job");
                    assert_eq!(done, total, "job {job} complete before its last tile");
                    let accepted = self.accepted.iter().filter(|(j, _)| j == job).count();
                    assert_eq!(accepted as u64, total, "job {job}");
                }
            }
        }
        self.check();
        self.log.extend(commands.iter().cloned());
        commands
    }

    fn volunteer(&mut self, worker: WorkerId) -> &mut Volunteer {
        self.volunteers
            .get_mut(&worker)
            .unwrap_or_else(|| panic!("command for worker {worker}, which is gone"))
    }

    /// What must hold between any two events.
    fn check(&self) {
        let mut active = 0;
        for (&worker, v) in &self.volunteers {
            for (&lease, a) in &v.leases {
                let status = self
                    .sched
                    .lease(worker, lease)
                    .expect("every lease a volunteer computes is known");
                assert_eq!(job_tile(status), (a.job, a.tile));
                if matches!(status, LeaseStatus::Active { .. }) {
                    active += 1;
                    assert!(
                        v.holds_operands_of(a),
                        "worker {worker} lost an operand of its live lease {a:?}"
                    );
                }
            }
        }
        assert_eq!(active, self.sched.active_leases());
    }

    /// Accepts every lease `worker` computes, then asks for `slots` more, until the job
    /// completes. Returns the tiles in the order they were assigned.
    fn run_to_completion(&mut self, worker: WorkerId, slots: u32) -> Vec<TileIndex> {
        let mut order: Vec<TileIndex> = assignments(&self.ready(worker, slots))
            .iter()
            .map(|a| a.tile)
            .collect();
        while let Some((&lease, _)) = self.volunteers[&worker].leases.first_key_value() {
            self.accept(worker, lease);
            let more = self.ready(worker, 1);
            order.extend(assignments(&more).iter().map(|a| a.tile));
        }
        order
    }
}

#[test]
fn a_worker_gets_exactly_its_slots_and_each_operand_once() {
    let mut h = Harness::new(config());
    h.add_job(job(1, 0, 3, 3));
    h.join(1, 10.0, BIG_CACHE);
    let first = h.ready(1, 2);
    let given = assignments(&first);
    assert_eq!(given.len(), 2);
    // The first tile needs two new panels, the second shares one of them.
    assert!(matches!(
        &first[..3],
        [
            Command::SendOperand { .. },
            Command::SendOperand { .. },
            Command::Assign(_)
        ]
    ));
    assert!(matches!(
        &first[3..],
        [Command::SendOperand { .. }, Command::Assign(_)]
    ));
    assert_eq!(h.sched.pending_tiles(), 7);
    assert_eq!(h.sched.active_leases(), 2);

    let mut complete = Vec::new();
    let mut leases = given.iter().map(|a| a.lease).collect::<Vec<_>>();
    let mut tiles: BTreeSet<TileIndex> = given.iter().map(|a| a.tile).collect();
    while let Some(lease) = leases.pop() {
        let (fresh, commands) = h.accept(1, lease);
        assert!(fresh);
        assert!(cancels(&commands).is_empty(), "{commands:?}");
        complete.extend(completions(&commands));
        if h.sched.pending_tiles() > 0 {
            let a = only_assignment(&h.ready(1, 1));
            assert!(tiles.insert(a.tile), "tile {:?} assigned twice", a.tile);
            leases.push(a.lease);
        }
    }
    assert_eq!(tiles.len(), 9);
    assert_eq!(complete, vec![1]);
    assert_eq!(h.sched.progress(1), Some((9, 9)));
    let stats = h.sched.stats();
    assert_eq!(stats.assigned, 9);
    assert_eq!(stats.reassignments(), 0);
    // Three row panels and three column panels, each sent once.
    assert_eq!(stats.operands_sent, 6);
    assert_eq!(stats.operand_bytes_sent, 6 * PANEL);
    assert_eq!(h.sched.active_leases(), 0);
    assert!(completions(&h.log).len() == 1);
    // A worker with credits and nothing to do gets nothing.
    assert!(h.ready(1, 1).is_empty());
}

#[test]
fn a_worker_is_given_tiles_whose_panels_it_holds() {
    let mut h = Harness::new(config());
    let big = job(2, 0, 3, 3);
    // Job 1 has one tile whose panels have the content of job 2's row 1 and column 1.
    let mut small = job(1, 0, 1, 1);
    small.a_panels = vec![big.a_panels[1]];
    small.b_panels = vec![big.b_panels[1]];
    h.add_job(small);
    h.join(1, 10.0, BIG_CACHE);
    h.join(2, 10.0, BIG_CACHE);
    let a = only_assignment(&h.ready(1, 1));
    h.accept(1, a.lease);
    h.add_job(big.clone());

    // Worker 1 holds row panel 1 and column panel 1: tile (1, 1), nothing to send.
    let local = h.ready(1, 1);
    let a = only_assignment(&local);
    assert_eq!((a.job, a.tile), (2, (1, 1)));
    assert!(sends(&local).is_empty());
    // Next, a tile sharing one of its panels before one needing two new ones.
    let half = h.ready(1, 1);
    let a = only_assignment(&half);
    assert!(a.tile.0 == 1 || a.tile.1 == 1, "{:?}", a.tile);
    assert_eq!(sends(&half).len(), 1);
    // Worker 2 holds nothing: the first pending tile, two panels sent.
    let cold = h.ready(2, 1);
    assert_eq!(only_assignment(&cold).tile, (0, 0));
    assert_eq!(sends(&cold).len(), 2);
}

#[test]
fn a_worker_covering_a_job_alone_needs_each_panel_once() {
    let mut h = Harness::new(config());
    h.add_job(job(1, 0, 4, 5));
    h.join(1, 10.0, BIG_CACHE);
    let order = h.run_to_completion(1, 3);
    assert_eq!(order.len(), 20);
    assert_eq!(h.sched.stats().operands_sent, 4 + 5);
    assert!(h.completed.contains(&1));
}

#[test]
fn higher_priority_first_then_age() {
    let mut h = Harness::new(config());
    h.add_job(job(1, 0, 2, 2));
    h.add_job(job(2, 5, 1, 3));
    h.join(1, 10.0, BIG_CACHE);
    let jobs: Vec<JobId> = assignments(&h.ready(1, 5)).iter().map(|a| a.job).collect();
    // All three tiles of the urgent job, then the other.
    assert_eq!(jobs, vec![2, 2, 2, 1, 1]);

    // Equal priority and equal load: the older job first.
    let mut h = Harness::new(config());
    h.add_job(job(7, 1, 2, 2));
    h.add_job(job(3, 1, 2, 2));
    h.join(1, 10.0, BIG_CACHE);
    assert_eq!(only_assignment(&h.ready(1, 1)).job, 7);
}

#[test]
fn equal_jobs_share_the_workers() {
    let mut h = Harness::new(config());
    h.add_job(job(1, 0, 2, 2));
    h.add_job(job(2, 0, 2, 2));
    h.join(1, 10.0, BIG_CACHE);
    h.join(2, 10.0, BIG_CACHE);
    // Fewest active leases first: each worker starts on its own job.
    assert_eq!(only_assignment(&h.ready(1, 1)).job, 1);
    assert_eq!(only_assignment(&h.ready(2, 1)).job, 2);
    // And a worker with many slots alternates between them.
    let jobs: Vec<JobId> = assignments(&h.ready(1, 4)).iter().map(|a| a.job).collect();
    assert_eq!(jobs, vec![1, 2, 1, 2]);
}

#[test]
fn a_starved_job_ages_into_its_turn() {
    let aging = 1000;
    let mut h = Harness::new(SchedulerConfig {
        aging_ms: aging,
        ..no_speculation()
    });
    h.add_job(job(1, 1, 1, 100));
    h.add_job(job(2, 0, 1, 3));
    h.join(1, 10.0, BIG_CACHE);
    let mut lease = only_assignment(&h.ready(1, 1)).lease;
    let mut low = Vec::new();
    let step = 100;
    while !h.completed.contains(&2) {
        assert!(h.now < 100 * step, "job 2 starves");
        h.tick(h.now + step);
        h.accept(1, lease);
        let a = only_assignment(&h.ready(1, 1));
        if a.job == 2 {
            low.push(h.now);
        }
        lease = a.lease;
    }
    assert_eq!(low.len(), 3);
    // Not before one aging period, and at most two apart (one to tie, one to win the
    // tie against the older job).
    assert!(low[0] >= aging, "{low:?}");
    let mut previous = 0;
    for &at in &low {
        assert!(at - previous <= 2 * aging + step, "{low:?}");
        previous = at;
    }
    assert!(h.sched.pending_tiles() > 0, "job 1 still has tiles");
}

#[test]
fn lease_deadlines_follow_the_worker_speed() {
    let mut h = Harness::new(config());
    h.add_job(heavy_job(1, 6));
    // 2·10⁷ flops a tile: 20 ms at 1 GFLOP/s; deadline = floor + 4 x expected.
    let speeds = [
        (1, 1.0, 1080),
        (2, 0.1, 1800),
        (3, 1000.0, 1004),
        (4, 0.0, 2600), // clamped to 0.05 GFLOP/s: 400 ms
        (5, f64::NAN, 1080),
    ];
    for (worker, gflops, deadline) in speeds {
        h.join(worker, gflops, BIG_CACHE);
        let a = only_assignment(&h.ready(worker, 1));
        assert_eq!(
            a.deadline_ms, deadline,
            "worker {worker} at {gflops} GFLOP/s"
        );
        assert!(a.deadline_ms >= config().lease_floor_ms);
    }
}

#[test]
fn an_expired_lease_goes_to_another_worker_and_a_late_result_still_counts() {
    for late_first in [true, false] {
        let mut h = Harness::new(no_speculation());
        h.add_job(job(1, 0, 1, 1));
        h.join(1, 1.0, BIG_CACHE);
        h.join(2, 1.0, BIG_CACHE);
        let first = only_assignment(&h.ready(1, 1));
        // 20 000 flops at 1 GFLOP/s: 1 ms expected, so 1004 ms.
        assert_eq!(first.deadline_ms, 1004);
        assert!(h.ready(2, 1).is_empty());
        assert!(h.tick(1003).is_empty());
        assert_eq!(h.sched.stats().expired, 0);

        // At the deadline the tile goes back, and the idle worker takes it in that step.
        let second = only_assignment(&h.tick(1004));
        assert_eq!((second.worker, second.tile), (2, (0, 0)));
        assert_eq!(h.sched.stats().expired, 1);
        assert_eq!(
            h.sched.lease(1, first.lease),
            Ok(LeaseStatus::Retired {
                job: 1,
                tile: (0, 0)
            })
        );
        assert!(h.sched.tile_open(1, (0, 0)));

        if late_first {
            // The tile is still open: the late result is taken and the copy cancelled.
            let (fresh, commands) = h.accept(1, first.lease);
            assert!(fresh);
            assert_eq!(cancels(&commands), vec![(2, second.lease)]);
            assert_eq!(completions(&commands), vec![1]);
            assert_eq!(
                h.sched.accept(2, second.lease, 1000, h.now),
                Ok(false),
                "a result for a cancelled copy is no fault"
            );
        } else {
            let (fresh, commands) = h.accept(2, second.lease);
            assert!(fresh);
            assert_eq!(completions(&commands), vec![1]);
            // The slow worker is still computing the expired copy: it is told to stop.
            assert_eq!(cancels(&commands), vec![(1, first.lease)]);
            let (fresh, _) = h.accept(1, first.lease);
            assert!(!fresh, "the tile was done");
        }
        assert!(!h.sched.tile_open(1, (0, 0)));
        assert_eq!(h.sched.progress(1), Some((1, 1)));
        assert_eq!(h.sched.stats().reassignments(), 1);
    }
}

#[test]
fn a_disconnect_returns_leases_to_an_idle_worker_at_once() {
    let mut h = Harness::new(config());
    h.add_job(job(1, 0, 1, 3));
    h.join(1, 1.0, BIG_CACHE);
    h.join(2, 1.0, BIG_CACHE);
    let gone = assignments(&h.ready(1, 2));
    assert_eq!(gone.len(), 2);
    let other = only_assignment(&h.ready(2, 3));
    assert_eq!(h.sched.pending_tiles(), 0);

    let commands = h.leave(1);
    let taken = assignments(&commands);
    assert_eq!(h.sched.stats().returned, 2);
    assert_eq!(taken.len(), 2);
    assert!(taken.iter().all(|a| a.worker == 2 && !a.speculative));
    let mut tiles: Vec<TileIndex> = taken.iter().map(|a| a.tile).collect();
    tiles.sort_unstable();
    let mut expected: Vec<TileIndex> = gone.iter().map(|a| a.tile).collect();
    expected.sort_unstable();
    assert_eq!(tiles, expected);
    assert!(!tiles.contains(&other.tile));
    // Anything the gone worker still sends is foreign.
    assert_eq!(
        h.sched.accept(1, gone[0].lease, 1000, h.now),
        Err(Violation::ForeignLease(gone[0].lease))
    );
    assert_eq!(h.sched.ready(1, 1, h.now), Err(Violation::UnknownWorker(1)));
    h.run_to_completion(2, 1);
    assert!(h.completed.contains(&1));
}

#[test]
fn idle_workers_duplicate_stragglers_up_to_max_copies() {
    let mut h = Harness::new(config());
    h.add_job(heavy_job(1, 2));
    for worker in 1..=4 {
        h.join(worker, 1.0, BIG_CACHE);
    }
    // Worker 1 takes both tiles (20 ms expected each) and keeps a spare credit.
    let own = assignments(&h.ready(1, 3));
    assert_eq!(own.len(), 2);
    for worker in 2..=4 {
        assert!(h.ready(worker, 1).is_empty(), "nothing is late yet");
    }
    assert!(h.tick(19).is_empty());

    let copies = assignments(&h.tick(20));
    assert!(copies.iter().all(|a| a.speculative));
    assert_eq!(
        copies
            .iter()
            .map(|a| (a.worker, a.tile))
            .collect::<Vec<_>>(),
        vec![(2, (0, 0)), (3, (0, 1))],
        "one copy per tile: max_copies is 2"
    );
    assert_eq!(h.sched.stats().speculative, 2);
    // Worker 1's spare credit is never spent on a copy of its own tile, and worker 4
    // finds every straggler at max_copies.
    assert!(h.tick(500).is_empty());
    assert_eq!(h.volunteers[&1].credits, 1);
    assert_eq!(h.volunteers[&4].credits, 1);

    // The copy wins: the original is cancelled and its late result ignored.
    let (fresh, commands) = h.accept(2, copies[0].lease);
    assert!(fresh);
    assert_eq!(cancels(&commands), vec![(1, own[0].lease)]);
    assert!(
        assignments(&commands).is_empty(),
        "tile (0, 1) already has two copies"
    );
    assert_eq!(
        h.sched.accept(1, own[0].lease, 1000, h.now),
        Ok(false),
        "a late result of a cancelled copy"
    );
    // The original wins the other tile: the copy is cancelled.
    let (fresh, commands) = h.accept(1, own[1].lease);
    assert!(fresh);
    assert_eq!(cancels(&commands), vec![(3, copies[1].lease)]);
    assert_eq!(completions(&commands), vec![1]);
    assert_eq!(h.sched.active_leases(), 0);
}

#[test]
fn protocol_violations_are_refused() {
    let mut h = Harness::new(config());
    h.add_job(job(1, 0, 4, 4));
    h.join(1, 1.0, BIG_CACHE);
    h.join(2, 1.0, BIG_CACHE);
    assert_eq!(h.try_ready(1, 0), Err(Violation::ZeroSlots));
    assert_eq!(h.try_ready(9, 1), Err(Violation::UnknownWorker(9)));

    // Credits and live leases together are capped.
    let mine = assignments(&h.ready(1, 10));
    assert_eq!(mine.len(), 10);
    assert_eq!(
        h.try_ready(1, MAX_SLOTS - 9),
        Err(Violation::TooManySlots {
            slots: MAX_SLOTS - 9,
            total: MAX_SLOTS + 1,
            limit: MAX_SLOTS
        })
    );
    assert_eq!(assignments(&h.ready(1, MAX_SLOTS - 10)).len(), 6);
    assert_eq!(
        h.try_ready(1, 1),
        Err(Violation::TooManySlots {
            slots: 1,
            total: MAX_SLOTS + 1,
            limit: MAX_SLOTS
        })
    );
    assert_eq!(
        h.try_ready(2, MAX_SLOTS + 1),
        Err(Violation::TooManySlots {
            slots: MAX_SLOTS + 1,
            total: MAX_SLOTS + 1,
            limit: MAX_SLOTS
        })
    );

    // Results and failures for leases that are not the worker's.
    let lease = mine[0].lease;
    assert_eq!(
        h.sched.accept(2, lease, 1000, 0),
        Err(Violation::ForeignLease(lease))
    );
    assert_eq!(
        h.sched.failed(2, lease, 0),
        Err(Violation::ForeignLease(lease))
    );
    assert_eq!(
        h.sched.accept(1, 999_999, 1000, 0),
        Err(Violation::ForeignLease(999_999))
    );
    assert_eq!(
        h.sched.failed(1, 999_999, 0),
        Err(Violation::ForeignLease(999_999))
    );
    assert_eq!(h.sched.lease(9, lease), Err(Violation::ForeignLease(lease)));
    // None of it changed anything.
    assert_eq!(h.sched.active_leases(), 16);
    assert_eq!(h.sched.progress(1), Some((0, 16)));
    assert_eq!(h.sched.stats().failed, 0);
    assert!(h.sched.drain().is_empty());
}

#[test]
fn a_failed_tile_goes_back_to_the_queue() {
    let mut h = Harness::new(no_speculation());
    h.add_job(job(1, 0, 1, 1));
    h.join(1, 1.0, BIG_CACHE);
    h.join(2, 1.0, BIG_CACHE);
    let first = only_assignment(&h.ready(1, 1));
    assert!(h.ready(2, 1).is_empty());
    let again = only_assignment(&h.fail(1, first.lease));
    assert_eq!((again.worker, again.tile), (2, (0, 0)));
    assert_eq!(h.sched.stats().failed, 1);
    let (fresh, commands) = h.accept(2, again.lease);
    assert!(fresh);
    assert_eq!(completions(&commands), vec![1]);
}

#[test]
fn only_held_tiles_are_handed_out_and_offers_add_more() {
    let mut h = Harness::new(no_speculation());
    h.add_job(JobTiles {
        held: Some(vec![(0, 1)]),
        ..job(1, 0, 1, 3)
    });
    h.join(1, 1.0, BIG_CACHE);
    assert_eq!(
        h.sched.wanted(0),
        0,
        "one queued tile per worker, less the one held"
    );
    let first = only_assignment(&h.ready(1, 2));
    assert_eq!(first.tile, (0, 1));
    // One credit left and nothing held: the worker waits instead of taking (0, 0).
    assert!(h.apply().is_empty());
    assert_eq!(h.sched.wanted(0), 2);
    assert_eq!(h.sched.wanted(5), 7);
    h.sched.offer(1, &[(0, 0), (0, 1), (9, 9)], h.now);
    let second = only_assignment(&h.apply());
    assert_eq!(second.tile, (0, 0), "the running tile is not offered twice");
    let (fresh, commands) = h.accept(1, first.lease);
    assert!(fresh);
    assert!(
        completions(&commands).is_empty(),
        "(0, 2) is still open elsewhere"
    );
    // Claimed again: the store lost the result written for (0, 1), so it is open again.
    h.sched.offer(1, &[(0, 1)], h.now);
    assert!(h.sched.tile_open(1, (0, 1)));
    assert_eq!(h.sched.pending_of(1), vec![(0, 1)]);
}

#[test]
fn released_tiles_are_cancelled_and_leave_the_queue() {
    let mut h = Harness::new(no_speculation());
    h.add_job(JobTiles {
        held: Some(vec![(0, 0), (0, 1), (0, 2)]),
        ..job(1, 0, 1, 3)
    });
    h.join(1, 1.0, BIG_CACHE);
    let running = only_assignment(&h.ready(1, 1));
    assert_eq!(running.tile, (0, 0));
    let released = h.sched.release(1, &[(0, 0), (0, 2)]);
    assert_eq!(released, vec![(0, 0), (0, 2)]);
    assert_eq!(cancels(&h.apply()), vec![(1, running.lease)]);
    assert_eq!(h.sched.pending_of(1), vec![(0, 1)]);
    let next = only_assignment(&h.ready(1, 1));
    assert_eq!(next.tile, (0, 1));
    assert!(h.sched.release(1, &[(0, 0)]).is_empty(), "released already");
}

#[test]
fn a_rejected_tile_goes_to_another_worker() {
    let mut h = Harness::new(no_speculation());
    h.add_job(job(1, 0, 1, 2));
    h.join(1, 1.0, BIG_CACHE);
    let first = only_assignment(&h.ready(1, 1));
    assert_eq!(first.tile, (0, 0));
    assert!(h.reject(1, first.lease).is_empty());
    // The worker that sent a wrong result gets the other tile, not the refused one again.
    let next = only_assignment(&h.ready(1, 1));
    assert_eq!((next.worker, next.tile), (1, (0, 1)));
    let (fresh, _) = h.accept(1, next.lease);
    assert!(fresh);
    // With nothing else pending it waits; a second worker takes the refused tile.
    assert!(h.ready(1, 1).is_empty());
    h.join(2, 1.0, BIG_CACHE);
    let again = only_assignment(&h.ready(2, 1));
    assert_eq!((again.worker, again.tile), (2, (0, 0)));
    let (fresh, commands) = h.accept(2, again.lease);
    assert!(fresh);
    assert_eq!(completions(&commands), vec![1]);
    assert_eq!(h.sched.stats().failed, 1);
}

#[test]
fn a_refused_worker_takes_tiles_of_another_job() {
    let mut h = Harness::new(no_speculation());
    h.add_job(job(1, 5, 1, 1));
    h.add_job(job(2, 0, 1, 1));
    h.join(1, 1.0, BIG_CACHE);
    let first = only_assignment(&h.ready(1, 1));
    assert_eq!(first.job, 1);
    assert!(h.reject(1, first.lease).is_empty());
    // Job 1 comes first by priority, but its only tile is refused to worker 1.
    let next = only_assignment(&h.ready(1, 1));
    assert_eq!((next.worker, next.job), (1, 2));
}

#[test]
fn a_replicated_tile_goes_to_distinct_workers_until_copies_agree() {
    let mut h = Harness::new(config());
    let mut replicated = job(1, 0, 1, 1);
    replicated.quorum = Some(Quorum { agree: 2, of: 3 });
    h.add_job(replicated);
    for w in 1..=4 {
        h.join(w, 1.0, BIG_CACHE);
    }
    // Two copies on two workers; the first worker gets no second copy.
    let first = only_assignment(&h.ready(1, 2));
    assert_eq!(first.tile, (0, 0));
    let second = only_assignment(&h.ready(2, 1));
    assert_eq!(second.worker, 2);
    // Nothing more is handed out, not even a speculative copy.
    assert!(h.ready(3, 1).is_empty());
    assert_eq!(h.sched.copies_wanted(1, (0, 0)), Some(2));
    h.give_back(1, first.lease);
    h.give_back(2, second.lease);
    // The grid finds they differ: a third copy goes to a third worker.
    assert!(h.sched.more_copies(1, (0, 0), h.now));
    let third = only_assignment(&h.apply());
    assert_eq!(third.worker, 3);
    assert_eq!(h.sched.copies_wanted(1, (0, 0)), Some(3));
    // No fourth copy: `of` is three.
    assert!(!h.sched.more_copies(1, (0, 0), h.now));
    h.give_back(3, third.lease);
    // Two of the three agree: the tile and the job are done.
    let (fresh, commands) = h.complete(1, (0, 0));
    assert!(fresh);
    assert_eq!(completions(&commands), vec![1]);
}

#[test]
fn a_replica_that_never_returns_is_handed_out_again() {
    let mut h = Harness::new(config());
    let mut replicated = job(1, 0, 1, 1);
    replicated.quorum = Some(Quorum { agree: 2, of: 2 });
    h.add_job(replicated);
    h.join(1, 1.0, BIG_CACHE);
    h.join(2, 1.0, BIG_CACHE);
    let first = only_assignment(&h.ready(1, 1));
    let second = only_assignment(&h.ready(2, 1));
    h.give_back(1, first.lease);
    // Worker 2 fails its copy: the tile is short of a copy again, and only worker 2
    // (worker 1 has returned one) may take it.
    h.fail(2, second.lease);
    assert!(h.ready(1, 1).is_empty());
    let again = only_assignment(&h.ready(2, 1));
    assert_eq!((again.worker, again.tile), (2, (0, 0)));
}

#[test]
fn removing_a_job_cancels_its_leases_and_forgets_its_own_panels() {
    let mut h = Harness::new(config());
    let doomed = job(1, 1, 2, 2);
    // Job 2 has the content of job 1's row panel 0 as its own row panel.
    let mut sharing = job(2, 0, 1, 1);
    sharing.a_panels[0] = doomed.a_panels[0];
    h.add_job(doomed.clone());
    h.add_job(sharing.clone());
    h.join(1, 1.0, BIG_CACHE);
    h.join(2, 1.0, BIG_CACHE);
    let leases: Vec<LeaseId> = assignments(&h.ready(1, 4))
        .iter()
        .map(|a| a.lease)
        .collect();
    assert_eq!(leases.len(), 4);
    assert!(h.volunteers[&1].leases.values().all(|a| a.job == 1));

    let commands = h.remove_job(1);
    assert_eq!(
        cancels(&commands),
        leases.iter().map(|&l| (1, l)).collect::<Vec<_>>()
    );
    let mut own: Vec<OperandKey> = doomed.a_panels[1..]
        .iter()
        .chain(&doomed.b_panels)
        .map(|p| p.key)
        .collect();
    own.sort_unstable();
    assert_eq!(forgets(&commands), vec![(1, own)]);
    assert!(h.volunteers[&1].held.contains_key(&doomed.a_panels[0].key));
    assert!(completions(&commands).is_empty());
    assert_eq!(h.sched.progress(1), None);
    assert_eq!(h.sched.active_leases(), 0);
    assert!(!h.sched.tile_open(1, (0, 0)));
    // A result still in flight is no fault, and changes nothing.
    assert!(matches!(
        h.sched.lease(1, leases[0]),
        Ok(LeaseStatus::Retired { job: 1, .. })
    ));
    assert_eq!(h.sched.accept(1, leases[0], 1000, h.now), Ok(false));

    // Job 2 still runs, and worker 1 still has the shared panel.
    let commands = h.ready(1, 1);
    assert_eq!(only_assignment(&commands).job, 2);
    assert_eq!(sends(&commands), vec![(1, sharing.b_panels[0].key)]);
    // Removing an unknown job is a no-op.
    assert!(h.remove_job(42).is_empty());
}

#[test]
fn a_resumed_job_schedules_only_the_remaining_tiles() {
    let mut h = Harness::new(config());
    let mut resumed = job(1, 0, 2, 2);
    resumed.done = vec![(0, 0), (1, 1)];
    h.add_job(resumed);
    assert_eq!(h.sched.progress(1), Some((2, 4)));
    assert_eq!(h.sched.pending_tiles(), 2);
    h.join(1, 1.0, BIG_CACHE);
    let given = assignments(&h.ready(1, 4));
    let mut tiles: Vec<TileIndex> = given.iter().map(|a| a.tile).collect();
    tiles.sort_unstable();
    assert_eq!(tiles, vec![(0, 1), (1, 0)]);
    h.accept(1, given[0].lease);
    let (_, commands) = h.accept(1, given[1].lease);
    assert_eq!(completions(&commands), vec![1]);
    assert_eq!(h.sched.progress(1), Some((4, 4)));
}

#[test]
fn an_empty_job_completes_at_once() {
    let mut h = Harness::new(config());
    h.join(1, 1.0, BIG_CACHE);
    h.ready(1, 1);
    let empty = job_with(1, 0, TilePlan::new(0, 50, 10, EDGE, EDGE));
    assert_eq!(h.add_job(empty), vec![Command::JobComplete { job: 1 }]);
    assert_eq!(h.sched.progress(1), Some((0, 0)));
    let mut all_done = job(2, 0, 1, 2);
    all_done.done = vec![(0, 0), (0, 1)];
    assert_eq!(h.add_job(all_done), vec![Command::JobComplete { job: 2 }]);
    assert_eq!(h.sched.active_leases(), 0);
}

#[test]
fn a_full_cache_forgets_least_recently_used_panels_first() {
    let mut h = Harness::new(config());
    let row = job(1, 0, 1, 4);
    h.add_job(row.clone());
    h.join(1, 1.0, 3 * PANEL);
    let b = |j: usize| row.b_panels[j].key;
    let mut forgotten = Vec::new();
    let order = {
        let mut order = Vec::new();
        let mut commands = h.ready(1, 1);
        loop {
            forgotten.extend(forgets(&commands));
            let a = only_assignment(&commands);
            order.push(a.tile);
            // A Forget, when any, comes before the operand it makes room for.
            if let Some(at) = commands
                .iter()
                .position(|c| matches!(c, Command::Forget { .. }))
            {
                assert!(
                    at < commands
                        .iter()
                        .position(|c| matches!(c, Command::SendOperand { .. }))
                        .expect("a send")
                );
            }
            assert!(h.volunteers[&1].held_bytes() <= 3 * PANEL);
            h.accept(1, a.lease);
            if h.sched.pending_tiles() == 0 {
                break;
            }
            commands = h.ready(1, 1);
        }
        order
    };
    assert_eq!(order, vec![(0, 0), (0, 1), (0, 2), (0, 3)]);
    // The row panel is used by every tile; the column panels age out in order.
    assert_eq!(forgotten, vec![(1, vec![b(0)]), (1, vec![b(1)])]);
    assert_eq!(h.sched.stats().operands_sent, 5);
}

#[test]
fn a_full_cache_keeps_what_live_leases_need() {
    let mut h = Harness::new(config());
    let row = job(1, 0, 1, 4);
    h.add_job(row.clone());
    h.join(1, 1.0, 2 * PANEL);
    let first = assignments(&h.ready(1, 2));
    // Both tiles' three panels are needed: over the cap, but unavoidably.
    assert!(forgets(&h.log).is_empty());
    assert_eq!(h.volunteers[&1].held_bytes(), 3 * PANEL);
    h.accept(1, first[0].lease);
    let commands = h.ready(1, 1);
    // Only the panel of the finished tile can go.
    assert_eq!(forgets(&commands), vec![(1, vec![row.b_panels[0].key])]);
    assert_eq!(h.volunteers[&1].held_bytes(), 3 * PANEL);
}

#[test]
fn a_cache_smaller_than_one_tile_never_drops_the_tiles_own_panels() {
    let mut h = Harness::new(config());
    let row = job(1, 0, 1, 3);
    h.add_job(row.clone());
    h.join(1, 1.0, PANEL + PANEL / 2);
    let a = only_assignment(&h.ready(1, 1));
    h.accept(1, a.lease);
    // Tile (0, 1) needs the row panel the worker holds and a new column panel.
    let commands = h.ready(1, 1);
    assert_eq!(only_assignment(&commands).tile, (0, 1));
    assert_eq!(forgets(&commands), vec![(1, vec![row.b_panels[0].key])]);
    assert_eq!(sends(&commands), vec![(1, row.b_panels[1].key)]);
    assert!(h.volunteers[&1].held.contains_key(&row.a_panels[0].key));
}

#[test]
fn equal_panels_in_one_tile_are_sent_once() {
    let mut h = Harness::new(config());
    let mut square = job(1, 0, 1, 1);
    // A and B panels with equal content (say, both zero) have equal keys.
    square.b_panels[0] = square.a_panels[0];
    h.add_job(square);
    h.join(1, 1.0, 3 * PANEL);
    let commands = h.ready(1, 1);
    assert_eq!(sends(&commands).len(), 1);
    assert_eq!(h.sched.stats().operand_bytes_sent, PANEL);
    let (_, commands) = h.accept(1, only_assignment(&commands).lease);
    assert_eq!(completions(&commands), vec![1]);
    // Its size counted once: a second job's two panels fit beside it without eviction.
    h.add_job(job(2, 0, 1, 1));
    let commands = h.ready(1, 1);
    assert_eq!(sends(&commands).len(), 2);
    assert!(forgets(&commands).is_empty(), "{commands:?}");
}

/// A tiny xorshift64 generator: seeded, so each run of the simulation is reproducible.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Runs a random grid (joins, departures, results, failures, expiries) until every job
/// completes; the harness checks its invariants after every event.
fn simulate(seed: u64) -> Harness {
    let mut rng = XorShift::new(seed);
    let mut h = Harness::new(SchedulerConfig {
        lease_floor_ms: 40,
        lease_factor: 2.0,
        max_copies: 1 + rng.below(3) as usize,
        aging_ms: 100,
        retired_per_worker: 1024,
    });
    let mut jobs: Vec<JobTiles> = (1..=5)
        .map(|id| {
            job(
                id,
                rng.below(3) as i32,
                1 + rng.below(5) as u32,
                1 + rng.below(5) as u32,
            )
        })
        .collect();
    // Content shared across jobs: job 5 uses job 1's row panels.
    let rows = jobs[0].plan.tiles_i();
    jobs[4] = job_with(
        5,
        0,
        TilePlan::new(rows * EDGE, 3 * EDGE, DEPTH, EDGE, EDGE),
    );
    jobs[4].a_panels = jobs[0].a_panels.clone();
    // A resumed job and an empty one.
    let mut resumed = job(6, 1, 3, 3);
    resumed.done = resumed.plan.tiles().filter(|_| rng.below(2) == 0).collect();
    jobs.push(resumed);
    jobs.push(job_with(7, 0, TilePlan::new(0, 0, DEPTH, EDGE, EDGE)));
    let arrivals: Vec<u64> = (0..jobs.len())
        .map(|i| if i < 2 { 0 } else { rng.below(300) })
        .collect();
    let mut waiting: Vec<(u64, JobTiles)> = arrivals.into_iter().zip(jobs).collect();

    let mut next_worker: WorkerId = 1;
    let mut join = |h: &mut Harness, rng: &mut XorShift| {
        let gflops = rng.pick(&[0.01, 1.0, 50.0]);
        let cache = rng.pick(&[2 * PANEL, 3 * PANEL, 5 * PANEL, BIG_CACHE]);
        h.join(next_worker, gflops, cache);
        next_worker += 1;
    };
    for _ in 0..3 {
        join(&mut h, &mut rng);
    }

    let mut step = 0;
    while !waiting.is_empty() || h.completed.len() < h.totals.len() {
        step += 1;
        assert!(
            step < 100_000,
            "seed {seed}: no progress after {step} steps"
        );
        let (due, later): (Vec<_>, Vec<_>) = waiting.into_iter().partition(|(at, _)| *at <= step);
        waiting = later;
        for (_, tiles) in due {
            h.add_job(tiles);
        }
        let workers: Vec<WorkerId> = h.volunteers.keys().copied().collect();
        let worker = rng.pick(&workers);
        let leases: Vec<LeaseId> = h.volunteers[&worker].leases.keys().copied().collect();
        match rng.below(100) {
            0..30 => {
                let v = &h.volunteers[&worker];
                let room = MAX_SLOTS.saturating_sub(v.credits + v.leases.len() as u32);
                if room > 0 {
                    let slots = 1 + rng.below(u64::from(room.min(4))) as u32;
                    h.ready(worker, slots);
                }
            }
            30..65 if !leases.is_empty() => {
                h.accept(worker, rng.pick(&leases));
            }
            65..69 if !leases.is_empty() => {
                h.fail(worker, rng.pick(&leases));
            }
            69..72 if !leases.is_empty() => {
                h.reject(worker, rng.pick(&leases));
            }
            72..75 if workers.len() > 1 => {
                h.leave(worker);
            }
            75..78 if workers.len() < 8 => join(&mut h, &mut rng),
            78..100 => {
                let now = h.now + rng.below(50);
                h.tick(now);
            }
            _ => {}
        }
    }
    for (&job, &total) in &h.totals {
        assert_eq!(h.sched.progress(job), Some((total, total)), "seed {seed}");
        let accepted = h.accepted.iter().filter(|(j, _)| *j == job).count() as u64;
        assert_eq!(
            accepted, total,
            "seed {seed}: every tile accepted exactly once"
        );
    }
    assert_eq!(completions(&h.log).len(), h.totals.len());
    h
}

#[test]
fn random_grids_complete_every_job_exactly_once() {
    let mut reassigned = 0;
    let mut speculative = 0;
    let mut forgotten = 0;
    for seed in 1..=40 {
        let h = simulate(seed);
        let stats = h.sched.stats();
        reassigned += stats.reassignments();
        speculative += stats.speculative;
        forgotten += forgets(&h.log).len();
    }
    // The runs did exercise the interesting paths.
    assert!(reassigned > 0 && speculative > 0 && forgotten > 0);
}

#[test]
fn the_same_events_give_the_same_decisions() {
    for seed in [3, 17] {
        assert_eq!(simulate(seed).log, simulate(seed).log, "seed {seed}");
    }
}
