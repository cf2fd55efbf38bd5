//! Prometheus metrics: the grid's KPIs (jobs, tiles, workers, bytes moved, lease latency,
//! auth failures, reassignments), rendered at `GET /metrics` in the text format.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::scheduler::Stats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Every metric, cheap to clone (they share their values).
#[derive(Clone)]
pub struct Metrics {
    registry: std::sync::Arc<Registry>,
    jobs_submitted: Counter,
    jobs_finished: Family<StateLabel, Counter>,
    jobs_active: Family<StateLabel, Gauge>,
    tiles_assigned: Counter,
    tiles_speculative: Counter,
    tiles_accepted: Counter,
    tiles_resumed: Counter,
    tile_claims: Family<EventLabel, Counter>,
    tiles_reassigned: Family<ReasonLabel, Counter>,
    results_refused: Family<ReasonLabel, Counter>,
    connections_refused: Family<ReasonLabel, Counter>,
    workers_banned: Counter,
    workers_connected: Family<KindLabel, Gauge>,
    bytes_sent: Counter,
    bytes_received: Counter,
    operand_bytes_sent: Counter,
    lease_seconds: Histogram,
    auth_failures: Counter,
    protocol_violations: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tabgrid");
        let metrics = Metrics {
            registry: Default::default(),
            jobs_submitted: Counter::default(),
            jobs_finished: Family::default(),
            jobs_active: Family::default(),
            tiles_assigned: Counter::default(),
            tiles_speculative: Counter::default(),
            tiles_accepted: Counter::default(),
            tiles_resumed: Counter::default(),
            tile_claims: Family::default(),
            tiles_reassigned: Family::default(),
            results_refused: Family::default(),
            connections_refused: Family::default(),
            workers_banned: Counter::default(),
            workers_connected: Family::default(),
            bytes_sent: Counter::default(),
            bytes_received: Counter::default(),
            operand_bytes_sent: Counter::default(),
            // 1 ms .. ~65 s
            lease_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            auth_failures: Counter::default(),
            protocol_violations: Counter::default(),
        };
        let m = &metrics;
        registry.register(
            "jobs_submitted",
            "Jobs accepted by POST /jobs",
            m.jobs_submitted.clone(),
        );
        registry.register(
            "jobs_finished",
            "Jobs that reached a final state",
            m.jobs_finished.clone(),
        );
        registry.register("jobs", "Jobs queued or running now", m.jobs_active.clone());
        registry.register(
            "tiles_assigned",
            "Tile leases handed to workers",
            m.tiles_assigned.clone(),
        );
        registry.register(
            "tiles_speculative",
            "Leases that duplicate a straggling tile",
            m.tiles_speculative.clone(),
        );
        registry.register(
            "tiles_accepted",
            "Tile results accepted",
            m.tiles_accepted.clone(),
        );
        registry.register(
            "tiles_resumed",
            "Tiles accepted before a restart and kept, not computed again",
            m.tiles_resumed.clone(),
        );
        registry.register(
            "tile_claims",
            "Claims on tiles in a shared database (claimed; given_back; lost: taken over after its deadline; reaped: a dead coordinator's put back)",
            m.tile_claims.clone(),
        );
        registry.register(
            "tiles_reassigned",
            "Tiles handed out again after a lease ended without a result",
            m.tiles_reassigned.clone(),
        );
        registry.register(
            "results_refused",
            "Tile results refused (size: wrong size, checksum: corrupted on the way, verification: wrong arithmetic)",
            m.results_refused.clone(),
        );
        registry.register(
            "connections_refused",
            "Worker connections refused over a limit (address: per client address, subject: per token subject)",
            m.connections_refused.clone(),
        );
        registry.register(
            "workers_banned",
            "Worker connections dropped for results that failed verification",
            m.workers_banned.clone(),
        );
        registry.register(
            "workers",
            "Workers connected now",
            m.workers_connected.clone(),
        );
        registry.register(
            "ws_bytes_sent",
            "WebSocket payload bytes sent to workers",
            m.bytes_sent.clone(),
        );
        registry.register(
            "ws_bytes_received",
            "WebSocket payload bytes received from workers",
            m.bytes_received.clone(),
        );
        registry.register(
            "operand_bytes_sent",
            "Operand panel bytes sent (after cache hits)",
            m.operand_bytes_sent.clone(),
        );
        registry.register(
            "lease_seconds",
            "Time from a lease's assignment to its accepted result",
            m.lease_seconds.clone(),
        );
        registry.register(
            "auth_failures",
            "Requests or workers refused for their token",
            m.auth_failures.clone(),
        );
        registry.register(
            "protocol_violations",
            "Worker connections closed for breaking the protocol",
            m.protocol_violations.clone(),
        );
        Metrics {
            registry: std::sync::Arc::new(registry),
            ..metrics
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub fn job_submitted(&self) {
        self.jobs_submitted.inc();
    }

    pub fn job_finished(&self, state: &'static str) {
        self.jobs_finished
            .get_or_create(&StateLabel { state })
            .inc();
    }

    pub fn set_jobs_active(&self, state: &'static str, count: i64) {
        self.jobs_active
            .get_or_create(&StateLabel { state })
            .set(count);
    }

    pub fn tile_accepted(&self, lease_seconds: f64) {
        self.tiles_accepted.inc();
        self.lease_seconds.observe(lease_seconds);
    }

    /// Claims on tiles of a shared database: `claimed`, `given_back`, `lost`, `reaped`.
    pub fn tile_claims(&self, event: &'static str, tiles: u64) {
        if tiles > 0 {
            self.tile_claims
                .get_or_create(&EventLabel { event })
                .inc_by(tiles);
        }
    }

    pub fn tiles_resumed(&self, tiles: u64) {
        self.tiles_resumed.inc_by(tiles);
    }

    pub fn worker_banned(&self) {
        self.workers_banned.inc();
    }

    pub fn result_refused(&self, reason: &'static str) {
        self.results_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn connection_refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn set_workers(&self, kind: &'static str, count: i64) {
        self.workers_connected
            .get_or_create(&KindLabel { kind })
            .set(count);
    }

    pub fn bytes_sent(&self, bytes: usize) {
        self.bytes_sent.inc_by(bytes as u64);
    }

    pub fn bytes_received(&self, bytes: usize) {
        self.bytes_received.inc_by(bytes as u64);
    }

    pub fn auth_failure(&self) {
        self.auth_failures.inc();
    }

    pub fn protocol_violation(&self) {
        self.protocol_violations.inc();
    }

    /// Carries the scheduler's counters over, given their values before and after a step.
    pub fn scheduler_step(&self, before: Stats, after: Stats) {
        self.tiles_assigned.inc_by(after.assigned - before.assigned);
        self.tiles_speculative
            .inc_by(after.speculative - before.speculative);
        self.operand_bytes_sent
            .inc_by(after.operand_bytes_sent - before.operand_bytes_sent);
        for (reason, delta) in [
            ("expired", after.expired - before.expired),
            ("disconnected", after.returned - before.returned),
            ("failed", after.failed - before.failed),
        ] {
            if delta > 0 {
                self.tiles_reassigned
                    .get_or_create(&ReasonLabel { reason })
                    .inc_by(delta);
            }
        }
    }
}
