//! Throughput of the scheduling state machine alone: assignments per second when 64
//! simulated workers return every tile at once, compared with Dask's ~500 tasks/s.
//!
//! No sockets, no clock but a counter, no compute: what is measured is the cost of the
//! scheduler's decisions (job and tile choice, leases, operand bookkeeping), the ceiling
//! it puts on a grid of fast workers.

use std::collections::VecDeque;
use std::time::Instant;

use tabgrid_coordinator::scheduler::{Command, JobTiles, Panel, Scheduler, SchedulerConfig};
use tabgrid_shared::protocol::OperandKey;
use tabgrid_shared::tiling::TilePlan;

const COMMAND: &str = "cargo bench -p tabgrid-coordinator --bench scheduler";
/// Dask's scheduler on this machine, in tasks per second: the reference figure.
const DASK_TASKS_PER_SEC: f64 = 500.0;
const WORKERS: u64 = 64;
const RUNS: usize = 5;
const EDGE: u32 = 10;
const DEPTH: u32 = 256;

fn key(job: u64, side: u8, index: u32) -> OperandKey {
    let mut bytes = [0; 16];
    bytes[..8].copy_from_slice(&job.to_le_bytes());
    bytes[8] = side;
    bytes[12..].copy_from_slice(&index.to_le_bytes());
    OperandKey(bytes)
}

/// A job of `tiles_i x tiles_j` tiles of `EDGE x EDGE`, with distinct panels.
fn job(id: u64, tiles_i: u32, tiles_j: u32) -> JobTiles {
    let plan = TilePlan::new(tiles_i * EDGE, tiles_j * EDGE, DEPTH, EDGE, EDGE);
    let bytes = u64::from(EDGE * DEPTH) * 4;
    let panels = |side, count| {
        (0..count)
            .map(|i| Panel {
                key: key(id, side, i),
                bytes,
            })
            .collect()
    };
    JobTiles {
        id,
        priority: 0,
        plan,
        a_panels: panels(b'a', tiles_i),
        b_panels: panels(b'b', tiles_j),
        c_tiles: None,
        done: Vec::new(),
        quorum: None,
        held: None,
    }
}

struct Run {
    assignments: u64,
    per_sec: f64,
}

/// Feeds `jobs` to 64 workers (`Ready{2}`, then `Ready{1}` after each result, every
/// result accepted at once) until every job completes.
fn run(jobs: &[JobTiles]) -> Run {
    let tiles: u64 = jobs.iter().map(|j| j.plan.tile_count()).sum();
    let jobs = jobs.to_vec();
    let start = Instant::now();
    let mut sched = Scheduler::new(SchedulerConfig::default());
    let mut now = 0;
    for worker in 1..=WORKERS {
        sched.worker_joined(worker, 100.0, 1 << 40);
    }
    let mut open = jobs.len();
    for job in jobs {
        sched.add_job(job, now);
    }
    for worker in 1..=WORKERS {
        sched.ready(worker, 2, now).expect("a valid Ready");
    }
    let mut leases = VecDeque::new();
    let mut events = 0u64;
    loop {
        for command in sched.drain() {
            match command {
                Command::Assign(a) => leases.push_back((a.worker, a.lease)),
                Command::JobComplete { .. } => open -= 1,
                _ => {}
            }
        }
        if open == 0 {
            break;
        }
        let (worker, lease) = leases.pop_front().expect("work in flight");
        sched
            .accept(worker, lease, 500, now)
            .expect("a lease of this worker");
        sched.ready(worker, 1, now).expect("a valid Ready");
        // One millisecond per round of results.
        events += 1;
        if events.is_multiple_of(WORKERS) {
            now += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let stats = sched.stats();
    assert!(stats.assigned >= tiles);
    Run {
        assignments: stats.assigned,
        per_sec: stats.assigned as f64 / secs,
    }
}

fn main() {
    println!("$ {COMMAND}");
    println!(
        "scheduler state machine alone: {WORKERS} workers, Ready{{2}} then Ready{{1}} per result, \
         every result accepted at once; {RUNS} runs each"
    );
    println!("reference: Dask, {DASK_TASKS_PER_SEC} tasks/s on this machine");
    println!();
    let scenarios: [(&str, Vec<JobTiles>); 2] = [
        ("1 job x 102400 tiles", vec![job(1, 320, 320)]),
        (
            "10 jobs x 10000 tiles",
            (1..=10).map(|id| job(id, 100, 100)).collect(),
        ),
    ];
    println!(
        "{:<24}{:>13}{:>16}{:>16}{:>16}{:>12}",
        "scenario", "assignments", "median /s", "min /s", "max /s", "x vs Dask"
    );
    for (name, jobs) in &scenarios {
        let mut runs: Vec<Run> = (0..RUNS).map(|_| run(jobs)).collect();
        runs.sort_by(|a, b| a.per_sec.total_cmp(&b.per_sec));
        let median = &runs[RUNS / 2];
        println!(
            "{:<24}{:>13}{:>16.0}{:>16.0}{:>16.0}{:>11.0}x",
            name,
            median.assignments,
            median.per_sec,
            runs[0].per_sec,
            runs[RUNS - 1].per_sec,
            median.per_sec / DASK_TASKS_PER_SEC
        );
    }
}
