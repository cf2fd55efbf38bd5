//! One connection's worth of worker state as a state machine without IO: frames from the
//! coordinator and finished computations go in, commands (send this, compute that, drop
//! the connection) come out. The socket loop in `connection` carries them out, so every
//! rule here — the cache, the queue, cancellation, `Ready` credits — is a plain unit test.
//!
//! # Ready credits
//!
//! The worker opens with `Ready{slots}`. Each `Assign` uses one credit, and every way an
//! assignment leaves the worker returns exactly one with `Ready{1}`: after its `Result`,
//! after a `Failed`, when a `Cancel` removes it from the queue, or — for a cancelled tile
//! that was already computing — when the kernel finishes and its result is thrown away
//! (the kernel cannot be interrupted, so the thread stays busy until then). So
//! `credits + queued + computing == slots` holds at every step, and the coordinator's
//! view of free slots never drifts from the worker's.

use std::collections::VecDeque;

use crate::matrix;
use crate::protocol::{
    Assign, LeaseId, MAX_FRAME_BYTES, OperandKey, TileResult, ToCoordinator, ToWorker, checksum,
};

use crate::worker::cache::OperandCache;
use crate::worker::task::{Computed, Task};

/// What the socket loop must do next.
#[derive(Debug)]
pub enum Command {
    /// Send this frame.
    Send(ToCoordinator),
    /// Start this task on the compute pool; its `Computed` comes back through
    /// [`Session::computed`]. At most one is computing at a time.
    Compute(Task),
    /// The coordinator broke the protocol: close the connection with this reason.
    Close(String),
}

/// The assignment on the pool right now.
#[derive(Debug)]
struct Computing {
    lease: LeaseId,
    /// A `Cancel` came while the kernel ran: throw its result away when it finishes.
    cancelled: bool,
}

/// The state of one connection after `Welcome`.
#[derive(Debug)]
pub struct Session {
    cache: OperandCache,
    /// Bytes of operands the worker promised to hold (from `Hello`).
    cache_limit: u64,
    /// Warn once per connection when the coordinator overfills the cache.
    warned_over_limit: bool,
    /// Pipeline depth announced in the first `Ready`.
    slots: u32,
    /// Tiles the coordinator may still assign without waiting for a `Ready`.
    credits: u32,
    /// Accepted tiles waiting for the pool, in arrival order: each one computes with all
    /// threads, so running them one at a time finishes the first soonest.
    queue: VecDeque<Task>,
    computing: Option<Computing>,
}

impl Session {
    /// `slots` is clamped to at least 1.
    pub fn new(cache_limit: u64, slots: u32) -> Session {
        Session {
            cache: OperandCache::new(),
            cache_limit,
            warned_over_limit: false,
            slots: slots.max(1),
            credits: 0,
            queue: VecDeque::new(),
            computing: None,
        }
    }

    /// The first commands after `Welcome`: offer every slot.
    pub fn start(&mut self) -> Vec<Command> {
        self.credits = self.slots;
        vec![Command::Send(ToCoordinator::Ready { slots: self.slots })]
    }

    /// Handles one frame from the coordinator. `Welcome` is refused (it belongs to the
    /// handshake) and `Close` is ignored here (the socket loop handles it).
    pub fn handle(&mut self, frame: ToWorker) -> Vec<Command> {
        match frame {
            ToWorker::Welcome(_) => vec![Command::Close("unexpected Welcome".to_owned())],
            ToWorker::Operand(operand) => match self.cache.insert(operand) {
                Ok(()) => {
                    if self.cache.bytes() > self.cache_limit && !self.warned_over_limit {
                        self.warned_over_limit = true;
                        tracing::warn!(
                            cached = self.cache.bytes(),
                            limit = self.cache_limit,
                            "coordinator sent more operands than the promised cache holds"
                        );
                    }
                    Vec::new()
                }
                Err(err) => vec![Command::Close(err.to_string())],
            },
            ToWorker::Forget { keys } => {
                for key in &keys {
                    self.cache.forget(key);
                }
                Vec::new()
            }
            ToWorker::Assign(assign) => self.assign(assign),
            ToWorker::Cancel { lease } => self.cancel(lease),
            ToWorker::Close { .. } => Vec::new(),
        }
    }

    fn assign(&mut self, assign: Assign) -> Vec<Command> {
        let lease = assign.lease;
        if self.holds(lease) {
            return vec![Command::Close(format!("lease {lease} assigned twice"))];
        }
        match self.credits.checked_sub(1) {
            Some(left) => self.credits = left,
            // Still computed: the work is valid, and refusing it would only lose time.
            None => tracing::warn!(
                lease,
                "coordinator assigned a tile beyond the Ready credits"
            ),
        }
        match self.resolve(&assign) {
            Ok(task) => {
                tracing::debug!(lease, job = %assign.job, tile = ?assign.tile, "tile assigned");
                self.queue.push_back(task);
                self.next_task().into_iter().collect()
            }
            Err(reason) => {
                tracing::warn!(lease, %reason, "cannot compute assigned tile");
                self.give_back(vec![Command::Send(ToCoordinator::Failed { lease, reason })])
            }
        }
    }

    /// Looks up an assignment's operands and checks them against its shape, so that the
    /// kernel only ever sees consistent inputs.
    fn resolve(&self, assign: &Assign) -> Result<Task, String> {
        let panel = |key: OperandKey| {
            self.cache
                .get(&key)
                .ok_or_else(|| format!("missing operand {key:?}"))
        };
        let a = panel(assign.a)?;
        let b = panel(assign.b)?;
        let c = assign.c.map(panel).transpose()?;
        let (m, n, k) = (assign.m as usize, assign.n as usize, assign.k as usize);
        let shaped = |name: &str, panel: &crate::worker::cache::Panel, rows: usize, cols: usize| {
            if panel.dtype() != assign.dtype {
                Err(format!(
                    "operand {name} is {} but the job is {}",
                    panel.dtype(),
                    assign.dtype
                ))
            } else if (panel.rows, panel.cols) != (rows, cols) {
                Err(format!(
                    "operand {name} is {}x{} but the tile needs {rows}x{cols}",
                    panel.rows, panel.cols
                ))
            } else {
                Ok(())
            }
        };
        shaped("A", &a, m, k)?;
        shaped("B", &b, k, n)?;
        if let Some(c) = &c {
            shaped("C", c, m, n)?;
        }
        // A and B were checked against bytes that really arrived, but an m x 1 and a 1 x n
        // panel still describe an m x n tile: refuse to allocate one that could not be sent.
        let tile_bytes = matrix::byte_len(assign.dtype, m, n).map_err(|e| e.to_string())?;
        if tile_bytes > MAX_FRAME_BYTES - 64 {
            return Err(format!(
                "a {m}x{n} {} tile ({tile_bytes} bytes) does not fit in one frame",
                assign.dtype
            ));
        }
        Ok(Task {
            lease: assign.lease,
            m,
            n,
            k,
            alpha: assign.alpha,
            beta: if c.is_some() { assign.beta } else { 0.0 },
            a,
            b,
            c,
        })
    }

    fn cancel(&mut self, lease: LeaseId) -> Vec<Command> {
        if let Some(computing) = self.computing.as_mut().filter(|c| c.lease == lease) {
            // Its credit comes back when the kernel is done with the threads.
            computing.cancelled = true;
            tracing::debug!(lease, "cancelled while computing");
            return Vec::new();
        }
        if let Some(at) = self.queue.iter().position(|task| task.lease == lease) {
            self.queue.remove(at);
            tracing::debug!(lease, "cancelled while queued");
            return self.give_back(Vec::new());
        }
        // Already sent: the result and its Ready crossed the Cancel on the wire.
        tracing::debug!(lease, "cancel for a lease no longer held");
        Vec::new()
    }

    /// A computation finished: report it (unless cancelled), return its credit, and start
    /// the next queued task.
    pub fn computed(&mut self, done: Computed) -> Vec<Command> {
        let Some(computing) = self.computing.take_if(|c| c.lease == done.lease) else {
            // Not ours (cannot happen with one pool task at a time; harmless if it does).
            tracing::warn!(lease = done.lease, "result for a lease not computing");
            return Vec::new();
        };
        // The next queued tile starts first, so that the pool computes while this result
        // is hashed, encoded and sent.
        let mut commands: Vec<Command> = self.next_task().into_iter().collect();
        if computing.cancelled {
            tracing::debug!(
                lease = done.lease,
                "dropping the result of a cancelled tile"
            );
        } else {
            commands.push(Command::Send(match done.outcome {
                Ok(payload) => ToCoordinator::Result(TileResult {
                    lease: done.lease,
                    checksum: checksum(&payload),
                    compute_micros: done.compute_micros,
                    payload,
                }),
                Err(reason) => {
                    tracing::warn!(lease = done.lease, %reason, "tile failed");
                    ToCoordinator::Failed {
                        lease: done.lease,
                        reason,
                    }
                }
            }));
        }
        self.give_back(commands)
    }

    /// Appends the `Ready{1}` that returns one credit.
    fn give_back(&mut self, mut commands: Vec<Command>) -> Vec<Command> {
        self.credits = (self.credits + 1).min(self.slots);
        commands.push(Command::Send(ToCoordinator::Ready { slots: 1 }));
        commands
    }

    /// Starts the oldest queued task when the pool is idle.
    fn next_task(&mut self) -> Option<Command> {
        if self.computing.is_some() {
            return None;
        }
        let task = self.queue.pop_front()?;
        self.computing = Some(Computing {
            lease: task.lease,
            cancelled: false,
        });
        Some(Command::Compute(task))
    }

    fn holds(&self, lease: LeaseId) -> bool {
        self.computing.as_ref().is_some_and(|c| c.lease == lease)
            || self.queue.iter().any(|task| task.lease == lease)
    }

    /// Tiles the coordinator may assign before the next `Ready`.
    pub fn credits(&self) -> u32 {
        self.credits
    }

    /// Leases accepted and not yet answered, the computing one first.
    pub fn leases(&self) -> Vec<LeaseId> {
        self.computing
            .iter()
            .map(|c| c.lease)
            .chain(self.queue.iter().map(|task| task.lease))
            .collect()
    }

    pub fn cache(&self) -> &OperandCache {
        &self.cache
    }
}

#[cfg(test)]
mod tests {
    use crate::Dtype;
    use crate::matrix::f64s;
    use crate::protocol::{Limits, Welcome};

    use super::*;
    use crate::worker::cache::operand_f64;
    use crate::worker::task::{compute, instant_ms};

    /// A session with 2 slots holding A (2x3), B (3x2) and C (2x2), all f64.
    struct Fixture {
        session: Session,
        a: OperandKey,
        b: OperandKey,
        c: OperandKey,
    }

    fn fixture() -> Fixture {
        let mut session = Session::new(1 << 20, 2);
        let a = operand_f64(2, 3, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let b = operand_f64(3, 2, &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
        let c = operand_f64(2, 2, &[1.0; 4]);
        let keys = (a.key, b.key, c.key);
        assert_eq!(sends(session.start()), [ToCoordinator::Ready { slots: 2 }]);
        for operand in [a, b, c] {
            assert!(session.handle(ToWorker::Operand(operand)).is_empty());
        }
        Fixture {
            session,
            a: keys.0,
            b: keys.1,
            c: keys.2,
        }
    }

    impl Fixture {
        fn assign(&self, lease: LeaseId) -> ToWorker {
            ToWorker::Assign(Assign {
                lease,
                job: "job".into(),
                tile: (0, 0),
                dtype: Dtype::F64,
                m: 2,
                n: 2,
                k: 3,
                alpha: 1.0,
                beta: 1.0,
                a: self.a,
                b: self.b,
                c: Some(self.c),
                deadline_ms: 1000,
            })
        }

        /// Asserts the session is left with these leases and `slots - leases` credits.
        fn holds(&self, leases: &[LeaseId]) {
            assert_eq!(self.session.leases(), leases);
            assert_eq!(self.session.credits() as usize + leases.len(), 2);
        }
    }

    fn sends(commands: Vec<Command>) -> Vec<ToCoordinator> {
        commands
            .into_iter()
            .map(|command| match command {
                Command::Send(frame) => frame,
                other => panic!("expected only sends, got {other:?}"),
            })
            .collect()
    }

    /// The task a command list starts, asserting it starts exactly that.
    fn started(commands: Vec<Command>) -> Task {
        match <[Command; 1]>::try_from(commands) {
            Ok([Command::Compute(task)]) => task,
            other => panic!("expected one Compute, got {other:?}"),
        }
    }

    fn ready(slots: u32) -> ToCoordinator {
        ToCoordinator::Ready { slots }
    }

    #[test]
    fn assign_computes_and_reports_then_returns_the_credit() {
        let mut f = fixture();
        let task = started(f.session.handle(f.assign(7)));
        assert_eq!(
            (task.lease, task.m, task.n, task.k, task.beta),
            (7, 2, 2, 3, 1.0)
        );
        f.holds(&[7]);

        let done = compute(&task, &instant_ms);
        let payload = done.outcome.clone().unwrap();
        assert_eq!(f64s(&payload), [5.0, 6.0, 11.0, 12.0]);
        let replies = sends(f.session.computed(done));
        let [ToCoordinator::Result(result), again] = &replies[..] else {
            panic!("expected Result then Ready, got {replies:?}");
        };
        assert_eq!(again, &ready(1));
        assert_eq!(result.lease, 7);
        assert_eq!(result.checksum, checksum(&payload));
        assert_eq!(result.payload, payload);
        f.holds(&[]);
    }

    #[test]
    fn queued_tiles_run_one_at_a_time_in_arrival_order() {
        let mut f = fixture();
        let first = started(f.session.handle(f.assign(1)));
        assert!(f.session.handle(f.assign(2)).is_empty(), "second waits");
        f.holds(&[1, 2]);
        let mut commands = f.session.computed(compute(&first, &instant_ms)).into_iter();
        // The next tile starts before the result goes out: the pool is never idle while
        // the socket sends.
        assert!(matches!(commands.next(), Some(Command::Compute(task)) if task.lease == 2));
        assert!(matches!(
            commands.next(),
            Some(Command::Send(ToCoordinator::Result(_)))
        ));
        assert!(matches!(
            commands.next(),
            Some(Command::Send(ToCoordinator::Ready { slots: 1 }))
        ));
        assert!(commands.next().is_none());
        f.holds(&[2]);
    }

    #[test]
    fn cancel_of_a_queued_tile_drops_it_and_returns_its_credit() {
        let mut f = fixture();
        let first = started(f.session.handle(f.assign(1)));
        assert!(f.session.handle(f.assign(2)).is_empty());
        assert_eq!(
            sends(f.session.handle(ToWorker::Cancel { lease: 2 })),
            [ready(1)]
        );
        f.holds(&[1]);
        // The cancelled tile is never started.
        let replies = f.session.computed(compute(&first, &instant_ms));
        assert_eq!(replies.len(), 2);
        assert!(!replies.iter().any(|c| matches!(c, Command::Compute(_))));
        f.holds(&[]);
    }

    #[test]
    fn cancel_while_computing_sends_ready_instead_of_the_result() {
        let mut f = fixture();
        let first = started(f.session.handle(f.assign(1)));
        assert!(f.session.handle(f.assign(2)).is_empty());
        // The kernel cannot stop, so the slot stays busy until it finishes.
        assert!(f.session.handle(ToWorker::Cancel { lease: 1 }).is_empty());
        f.holds(&[1, 2]);
        let mut commands = f.session.computed(compute(&first, &instant_ms)).into_iter();
        assert!(matches!(commands.next(), Some(Command::Compute(task)) if task.lease == 2));
        assert!(matches!(
            commands.next(),
            Some(Command::Send(ToCoordinator::Ready { slots: 1 }))
        ));
        assert!(commands.next().is_none());
        f.holds(&[2]);
    }

    #[test]
    fn cancel_of_an_unknown_lease_is_ignored() {
        let mut f = fixture();
        let first = started(f.session.handle(f.assign(1)));
        assert_eq!(
            sends(f.session.computed(compute(&first, &instant_ms))).len(),
            2
        );
        // The Cancel crossed the Result on the wire.
        assert!(f.session.handle(ToWorker::Cancel { lease: 1 }).is_empty());
        assert!(f.session.handle(ToWorker::Cancel { lease: 99 }).is_empty());
        f.holds(&[]);
    }

    #[test]
    fn a_missing_operand_fails_the_lease_and_returns_the_credit() {
        let mut f = fixture();
        let key = f.b;
        f.session.handle(ToWorker::Forget { keys: vec![key] });
        let replies = sends(f.session.handle(f.assign(4)));
        assert_eq!(
            replies,
            [
                ToCoordinator::Failed {
                    lease: 4,
                    reason: format!("missing operand {key:?}")
                },
                ready(1)
            ]
        );
        f.holds(&[]);
    }

    #[test]
    fn forget_does_not_pull_operands_from_a_queued_tile() {
        let mut f = fixture();
        let first = started(f.session.handle(f.assign(1)));
        assert!(f.session.handle(f.assign(2)).is_empty());
        let keys = vec![f.a, f.b, f.c];
        f.session.handle(ToWorker::Forget { keys });
        assert_eq!((f.session.cache().len(), f.session.cache().bytes()), (0, 0));
        let commands = f.session.computed(compute(&first, &instant_ms));
        let Some(Command::Compute(second)) = commands.into_iter().next() else {
            panic!("second tile should start");
        };
        assert_eq!(
            f64s(&compute(&second, &instant_ms).outcome.unwrap()),
            [5.0, 6.0, 11.0, 12.0]
        );
    }

    #[test]
    fn shape_or_dtype_mismatches_fail_the_lease() {
        let mut f = fixture();
        let ToWorker::Assign(mut wrong) = f.assign(5) else {
            unreachable!()
        };
        wrong.k = 2;
        let replies = sends(f.session.handle(ToWorker::Assign(wrong.clone())));
        assert!(
            matches!(&replies[..], [ToCoordinator::Failed { lease: 5, reason }, _]
                if reason == "operand A is 2x3 but the tile needs 2x2"),
            "{replies:?}"
        );
        wrong.k = 3;
        wrong.dtype = Dtype::F32;
        let replies = sends(f.session.handle(ToWorker::Assign(wrong)));
        assert!(
            matches!(&replies[..], [ToCoordinator::Failed { reason, .. }, _]
                if reason == "operand A is f64 but the job is f32"),
            "{replies:?}"
        );
        f.holds(&[]);
    }

    #[test]
    fn without_c_beta_is_ignored() {
        let mut f = fixture();
        let ToWorker::Assign(mut assign) = f.assign(6) else {
            unreachable!()
        };
        assign.c = None;
        assign.beta = f64::NAN;
        let task = started(f.session.handle(ToWorker::Assign(assign)));
        assert_eq!(task.beta, 0.0);
        assert_eq!(
            f64s(&compute(&task, &instant_ms).outcome.unwrap()),
            [4.0, 5.0, 10.0, 11.0]
        );
    }

    #[test]
    fn a_huge_tile_from_thin_panels_is_refused_before_allocating() {
        let mut session = Session::new(1 << 30, 1);
        session.start();
        let a = operand_f64(1 << 14, 1, &vec![1.0; 1 << 14]);
        let b = operand_f64(1, 1 << 14, &vec![1.0; 1 << 14]);
        let assign = Assign {
            lease: 1,
            job: "j".into(),
            tile: (0, 0),
            dtype: Dtype::F64,
            m: 1 << 14,
            n: 1 << 14,
            k: 1,
            alpha: 1.0,
            beta: 0.0,
            a: a.key,
            b: b.key,
            c: None,
            deadline_ms: 1,
        };
        session.handle(ToWorker::Operand(a));
        session.handle(ToWorker::Operand(b));
        let replies = sends(session.handle(ToWorker::Assign(assign)));
        assert!(
            // 64-bit targets refuse it for the frame; wasm32 already for its address space.
            matches!(&replies[..], [ToCoordinator::Failed { reason, .. }, _]
                if reason.contains("does not fit") || reason.contains("too large")),
            "{replies:?}"
        );
    }

    #[test]
    fn protocol_violations_close_the_connection() {
        let mut f = fixture();
        let mut corrupted = operand_f64(1, 1, &[1.0]);
        corrupted.bytes[0] ^= 0xff;
        let commands = f.session.handle(ToWorker::Operand(corrupted));
        assert!(
            matches!(&commands[..], [Command::Close(reason)] if reason.starts_with("corrupted operand")),
            "{commands:?}"
        );

        started(f.session.handle(f.assign(1)));
        let commands = f.session.handle(f.assign(1));
        assert!(
            matches!(&commands[..], [Command::Close(reason)] if reason == "lease 1 assigned twice")
        );

        let welcome = ToWorker::Welcome(Welcome {
            worker_id: 1,
            limits: Limits {
                max_frame_bytes: 1,
                max_slots: 1,
                heartbeat_secs: 1,
            },
        });
        assert!(matches!(
            &f.session.handle(welcome)[..],
            [Command::Close(_)]
        ));
    }

    #[test]
    fn assignments_beyond_the_credits_are_still_computed() {
        let mut f = fixture();
        started(f.session.handle(f.assign(1)));
        assert!(f.session.handle(f.assign(2)).is_empty());
        assert!(f.session.handle(f.assign(3)).is_empty());
        assert_eq!(f.session.leases(), [1, 2, 3]);
        assert_eq!(f.session.credits(), 0);
    }

    #[test]
    fn a_failed_kernel_reports_failed_and_returns_the_credit() {
        let mut f = fixture();
        let task = started(f.session.handle(f.assign(8)));
        let replies = sends(f.session.computed(Computed {
            dtype: Dtype::F64,
            lease: task.lease,
            outcome: Err("out of memory".into()),
            compute_micros: 0,
        }));
        assert_eq!(
            replies,
            [
                ToCoordinator::Failed {
                    lease: 8,
                    reason: "out of memory".into()
                },
                ready(1)
            ]
        );
        f.holds(&[]);
        // A stray result for a lease not computing changes nothing.
        assert!(f.session.computed(compute(&task, &instant_ms)).is_empty());
        f.holds(&[]);
    }
}
