//! The browser volunteer: the worker protocol, operand cache and GEMM kernels of
//! `tabgrid_shared::worker`, driven by a WebSocket inside a DedicatedWorker.
//!
//! The page (`www/app.js`) starts `www/volunteer.js` as a module worker; that script loads
//! this module, starts the rayon pool (`initThreadPool`, threaded bundle only) and drives
//! one [`Volunteer`]. Everything here runs on that worker's thread: socket callbacks and
//! timers feed the shared `Session`, whose commands are carried out here, exactly as the
//! native worker's socket loop does with tokio. A tile computes synchronously with every
//! pool thread (the calling thread blocks on the pool, which a worker may do); between two
//! tiles the event loop runs, so frames, heartbeats, pause and the duty cycle are served
//! within one tile's time.
//!
//! Leaving: `pause` and `stop` close the socket with a reason, so the coordinator returns
//! this tab's leases at once; a closed tab's socket closes the same way. A dropped
//! connection is retried with the shared full-jitter backoff; a refusal on policy grounds
//! (code 1008: bad or expired token) is final and shown to the volunteer.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use js_sys::{Function, Object, Reflect, Uint8Array};
use tabgrid_shared::kernels::{self, MatMut, MatRef};
use tabgrid_shared::protocol::{
    self, Hello, PROTOCOL_VERSION, ToCoordinator, ToWorker, Welcome, WorkerKind,
};
use tabgrid_shared::worker::{Backoff, Command, Session, Task, compute};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use web_sys::{BinaryType, CloseEvent, MessageEvent, WebSocket, WorkerGlobalScope};

#[cfg(feature = "threads")]
pub use wasm_bindgen_rayon::init_thread_pool;

/// Bytes of operands a tab caches. The threaded module's memory is capped at 1 GiB (a
/// link argument of `cargo xtask wasm`); this leaves room for tiles and the kernel's
/// packing buffers.
const CACHE_BYTES: u64 = 256 << 20;
/// Tiles in flight: one computing, one arriving.
const SLOTS: u32 = 2;
/// WebSocket close codes this client sends or interprets. A page may only send 1000 or
/// 3000-4999 (`WebSocket.close` throws on anything else), so a protocol error found here
/// goes out as 4002, the application-range twin of RFC 6455's 1002.
const NORMAL: u16 = 1000;
const PROTOCOL_ERROR: u16 = 4002;
const POLICY: u16 = 1008;
/// Tiles the "current GFLOP/s" figure averages over.
const SPEED_WINDOW: usize = 8;

/// Which bundle this is: the page shows it, and the coordinator sees it in `Hello`.
#[wasm_bindgen(js_name = bundleInfo)]
pub fn bundle_info() -> JsValue {
    let info = Object::new();
    set(&info, "threaded", cfg!(feature = "threads"));
    set(&info, "simd128", cfg!(target_feature = "simd128"));
    set(&info, "kernel", kernels::active_path());
    info.into()
}

/// The kernel's speed in this tab: the median GFLOP/s of `reps` products of two `n x n`
/// matrices of `dtype` ("f32" or "f64"), on every pool thread (the threaded bundle) or on
/// this one. For `cargo xtask bench browser`, against the same kernel natively.
#[wasm_bindgen]
pub fn bench(dtype: &str, n: u32, reps: u32) -> Result<f64, JsError> {
    let n = n.clamp(1, 4096) as usize;
    let gflops = match dtype {
        "f32" => bench_typed::<f32>(n, reps),
        "f64" => bench_typed::<f64>(n, reps),
        other => return Err(JsError::new(&format!("unknown dtype {other:?}"))),
    };
    gflops.map_err(|err| JsError::new(&err.to_string()))
}

fn bench_typed<T: kernels::Element>(n: usize, reps: u32) -> Result<f64, kernels::ShapeError> {
    let a: Vec<T> = (0..n * n)
        .map(|i| T::from_f64((i % 7) as f64 * 0.25))
        .collect();
    let b: Vec<T> = (0..n * n)
        .map(|i| T::from_f64((i % 5) as f64 * 0.5))
        .collect();
    let mut c = vec![T::from_f64(0.0); n * n];
    let run = |c: &mut [T]| -> Result<f64, kernels::ShapeError> {
        let started = now_ms();
        let (a, b) = (MatRef::row_major(&a, n, n)?, MatRef::row_major(&b, n, n)?);
        multiply(a, b, MatMut::row_major(c, n, n)?)?;
        Ok(now_ms() - started)
    };
    // Warm-up until two products agree within 10 % (at most five): V8 first runs the
    // baseline compiler's code and swaps in the optimised kernel once it is hot.
    let mut last = run(&mut c)?;
    for _ in 0..5 {
        let next = run(&mut c)?;
        let settled = (next - last).abs() <= 0.1 * last;
        last = next;
        if settled {
            break;
        }
    }
    let mut times = Vec::new();
    for _ in 0..reps.max(1) {
        times.push(run(&mut c)?);
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2].max(0.001);
    Ok(2.0 * (n * n * n) as f64 / median / 1e6)
}

/// `C = A·B` with every thread this bundle has.
fn multiply<T: kernels::Element>(
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    c: MatMut<'_, T>,
) -> Result<(), kernels::ShapeError> {
    #[cfg(feature = "threads")]
    return kernels::par_gemm(T::from_f64(1.0), a, b, T::from_f64(0.0), c);
    #[cfg(not(feature = "threads"))]
    return kernels::gemm(T::from_f64(1.0), a, b, T::from_f64(0.0), c);
}

/// One tab's membership in the grid.
#[wasm_bindgen]
pub struct Volunteer {
    inner: Rc<Inner>,
}

struct Inner {
    url: String,
    token: Option<String>,
    threads: u32,
    agent: String,
    /// Called with a plain object describing the tab's state after every change.
    report: Function,
    state: RefCell<State>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Connecting,
    Connected,
    /// Waiting to reconnect after a lost connection.
    Retrying,
    Paused,
    /// Refused for good (bad token) or stopped by the page.
    Stopped,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::Connected => "connected",
            Phase::Retrying => "retrying",
            Phase::Paused => "paused",
            Phase::Stopped => "stopped",
        }
    }
}

struct State {
    phase: Phase,
    /// Plain words for the page: why the tab is in this phase.
    detail: String,
    /// Bumped on every new socket: callbacks and timers of an older one are ignored.
    generation: u64,
    socket: Option<Socket>,
    session: Option<Session>,
    worker_id: Option<u64>,
    /// The task the session asked to compute, waiting for its timer (duty cycle).
    pending: Option<Task>,
    backoff: Backoff,
    bench_gflops: f64,
    /// CPU share the volunteer allows, 1..=100 percent.
    duty: u32,
    tiles_done: u64,
    /// (flops, milliseconds) of the last tiles, for the current speed.
    recent: VecDeque<(f64, f64)>,
}

/// A socket with the callbacks that must live as long as it does.
struct Socket {
    ws: WebSocket,
    heartbeat: Option<i32>,
    _callbacks: Vec<Closure<dyn FnMut(JsValue)>>,
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.ws.set_onopen(None);
        self.ws.set_onmessage(None);
        self.ws.set_onclose(None);
        self.ws.set_onerror(None);
        if let Some(id) = self.heartbeat.take() {
            scope().clear_interval_with_handle(id);
        }
    }
}

#[wasm_bindgen]
impl Volunteer {
    /// `url`: the coordinator's worker endpoint (`ws[s]://host/api/v1/worker`); `token`: a
    /// volunteer token; `threads`: the pool size (1 in the non-threaded bundle); `report`:
    /// called with the state object on every change.
    #[wasm_bindgen(constructor)]
    pub fn new(
        url: String,
        token: Option<String>,
        threads: u32,
        agent: String,
        report: Function,
    ) -> Volunteer {
        let bench_gflops = measure_speed();
        Volunteer {
            inner: Rc::new(Inner {
                url,
                token,
                threads: threads.max(1),
                agent,
                report,
                state: RefCell::new(State {
                    phase: Phase::Connecting,
                    detail: String::new(),
                    generation: 0,
                    socket: None,
                    session: None,
                    worker_id: None,
                    pending: None,
                    backoff: Backoff::default(),
                    bench_gflops,
                    duty: 100,
                    tiles_done: 0,
                    recent: VecDeque::new(),
                }),
            }),
        }
    }

    /// Joins the grid.
    pub fn start(&self) {
        connect(&self.inner);
    }

    /// Stops computing at once: the socket closes, so the coordinator hands this tab's
    /// leases to others without waiting for a deadline.
    pub fn pause(&self) {
        leave(
            &self.inner,
            Phase::Paused,
            NORMAL,
            "paused by the volunteer",
        );
    }

    /// Comes back after `pause`.
    pub fn resume(&self) {
        let phase = self.inner.state.borrow().phase;
        if phase == Phase::Paused {
            connect(&self.inner);
        }
    }

    /// Leaves for good (the page is closing or restarting the worker).
    pub fn stop(&self) {
        leave(
            &self.inner,
            Phase::Stopped,
            NORMAL,
            "the volunteer closed the tab",
        );
    }

    /// The share of CPU time to use, in percent (clamped to 1..=100): after a tile that
    /// took `t`, the tab rests `t·(100 − duty)/duty` before the next.
    #[wasm_bindgen(js_name = setDuty)]
    pub fn set_duty(&self, percent: u32) {
        self.inner.state.borrow_mut().duty = percent.clamp(1, 100);
        report(&self.inner);
    }

    /// The state object, as passed to `report`.
    pub fn stats(&self) -> JsValue {
        stats(&self.inner)
    }
}

fn connect(inner: &Rc<Inner>) {
    let generation = {
        let mut state = inner.state.borrow_mut();
        state.generation += 1;
        state.socket = None;
        state.session = None;
        state.pending = None;
        state.worker_id = None;
        state.phase = Phase::Connecting;
        state.detail = format!("connecting to {}", inner.url);
        state.generation
    };
    report(inner);
    let ws = match WebSocket::new(&inner.url) {
        Ok(ws) => ws,
        Err(err) => {
            // A malformed URL never gets better by retrying.
            stop_with(
                inner,
                format!("cannot open {}: {}", inner.url, describe(&err)),
            );
            return;
        }
    };
    ws.set_binary_type(BinaryType::Arraybuffer);

    let on_open = {
        let inner = Rc::clone(inner);
        Closure::<dyn FnMut(JsValue)>::new(move |_| {
            if current(&inner, generation) {
                send(&inner, &hello(&inner));
            }
        })
    };
    let on_message = {
        let inner = Rc::clone(inner);
        Closure::<dyn FnMut(JsValue)>::new(move |event: JsValue| {
            if current(&inner, generation) {
                let event: MessageEvent = event.unchecked_into();
                on_frame(&inner, generation, event.data());
            }
        })
    };
    let on_close = {
        let inner = Rc::clone(inner);
        Closure::<dyn FnMut(JsValue)>::new(move |event: JsValue| {
            if current(&inner, generation) {
                let event: CloseEvent = event.unchecked_into();
                on_closed(&inner, event.code(), event.reason());
            }
        })
    };
    // Errors are always followed by a close event, which carries what can be known.
    let on_error = Closure::<dyn FnMut(JsValue)>::new(|_| {});
    ws.set_onopen(Some(on_open.as_ref().unchecked_ref()));
    ws.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    ws.set_onclose(Some(on_close.as_ref().unchecked_ref()));
    ws.set_onerror(Some(on_error.as_ref().unchecked_ref()));
    inner.state.borrow_mut().socket = Some(Socket {
        ws,
        heartbeat: None,
        _callbacks: vec![on_open, on_message, on_close, on_error],
    });
}

fn current(inner: &Inner, generation: u64) -> bool {
    inner.state.borrow().generation == generation
}

fn hello(inner: &Inner) -> ToCoordinator {
    let mut features = vec!["wasm32".to_owned()];
    if cfg!(target_feature = "simd128") {
        features.push("simd128".to_owned());
    }
    if cfg!(feature = "threads") {
        features.push("threads".to_owned());
    }
    ToCoordinator::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        kind: WorkerKind::Browser,
        threads: inner.threads,
        features,
        bench_gflops: inner.state.borrow().bench_gflops,
        cache_bytes: CACHE_BYTES,
        token: inner.token.clone(),
        agent: inner.agent.clone(),
    })
}

fn on_frame(inner: &Rc<Inner>, generation: u64, data: JsValue) {
    let Ok(buffer) = data.dyn_into::<js_sys::ArrayBuffer>() else {
        close(
            inner,
            PROTOCOL_ERROR,
            "text frames are not part of the protocol",
        );
        return;
    };
    let bytes = Uint8Array::new(&buffer).to_vec();
    let frame = match protocol::decode::<ToWorker>(&bytes) {
        Ok(frame) => frame,
        Err(err) => {
            close(inner, PROTOCOL_ERROR, &format!("undecodable frame: {err}"));
            return;
        }
    };
    let (commands, changed) = {
        let mut state = inner.state.borrow_mut();
        match (frame, state.session.as_mut()) {
            (ToWorker::Welcome(welcome), None) => {
                drop(state);
                return welcomed(inner, generation, welcome);
            }
            (ToWorker::Close { reason }, _) => {
                // The coordinator closes the socket next; keep its words for the page.
                state.detail = reason;
                return;
            }
            (_, None) => {
                drop(state);
                close(inner, PROTOCOL_ERROR, "expected Welcome first");
                return;
            }
            (frame, Some(session)) => {
                let held = session.leases().len();
                let commands = session.handle(frame);
                // New work or work taken away: the page says whether it is computing.
                let changed = held != session.leases().len();
                (commands, changed)
            }
        }
    };
    carry_out(inner, generation, commands);
    if changed {
        report(inner);
    }
}

fn welcomed(inner: &Rc<Inner>, generation: u64, welcome: Welcome) {
    let every_ms = i32::try_from(welcome.limits.heartbeat_secs.max(1))
        .unwrap_or(i32::MAX / 1000)
        .saturating_mul(1000);
    let beat = {
        let inner = Rc::clone(inner);
        Closure::<dyn FnMut(JsValue)>::new(move |_| {
            if current(&inner, generation) {
                send(&inner, &ToCoordinator::Heartbeat);
            }
        })
    };
    let id = scope()
        .set_interval_with_callback_and_timeout_and_arguments_0(
            beat.as_ref().unchecked_ref(),
            every_ms,
        )
        .ok();
    let commands = {
        let mut state = inner.state.borrow_mut();
        let mut session = Session::new(CACHE_BYTES, SLOTS);
        let commands = session.start();
        state.session = Some(session);
        state.worker_id = Some(welcome.worker_id);
        state.phase = Phase::Connected;
        state.detail = format!("connected as worker {}", welcome.worker_id);
        state.backoff.reset();
        if let Some(socket) = state.socket.as_mut() {
            socket.heartbeat = id;
            socket._callbacks.push(beat);
        }
        commands
    };
    report(inner);
    carry_out(inner, generation, commands);
}

fn carry_out(inner: &Rc<Inner>, generation: u64, commands: Vec<Command>) {
    for command in commands {
        match command {
            Command::Send(frame) => send(inner, &frame),
            Command::Compute(task) => {
                // The session starts one task at a time; it waits here for its turn.
                let delay = rest_before_next(&inner.state.borrow());
                inner.state.borrow_mut().pending = Some(task);
                let inner = Rc::clone(inner);
                after(delay, move || run_pending(&inner, generation));
            }
            Command::Close(reason) => close(inner, PROTOCOL_ERROR, &reason),
        }
    }
}

/// How long to rest before the next tile so that computing takes `duty` percent of the
/// time, judged by the last tile.
fn rest_before_next(state: &State) -> i32 {
    let Some(&(_, last_ms)) = state.recent.back() else {
        return 0;
    };
    let duty = f64::from(state.duty);
    (last_ms * (100.0 - duty) / duty)
        .round()
        .clamp(0.0, 60_000.0) as i32
}

fn run_pending(inner: &Rc<Inner>, generation: u64) {
    let task = {
        let mut state = inner.state.borrow_mut();
        if state.generation != generation {
            return;
        }
        match state.pending.take() {
            Some(task) => task,
            None => return,
        }
    };
    let flops = 2.0 * task.work();
    let started = now_ms();
    let done = compute(&task, &now_ms);
    let took = (now_ms() - started).max(0.001);
    let commands = {
        let mut state = inner.state.borrow_mut();
        if state.generation != generation {
            return;
        }
        if done.outcome.is_ok() {
            state.tiles_done += 1;
            state.recent.push_back((flops, took));
            if state.recent.len() > SPEED_WINDOW {
                state.recent.pop_front();
            }
        }
        match state.session.as_mut() {
            Some(session) => session.computed(done),
            None => return,
        }
    };
    carry_out(inner, generation, commands);
    report(inner);
}

fn send(inner: &Inner, frame: &ToCoordinator) {
    let state = inner.state.borrow();
    let Some(socket) = &state.socket else {
        return;
    };
    // `WebSocket.send` refuses views of shared memory, and the threaded module's memory
    // is shared: the frame is copied into a fresh buffer of the page's own.
    let bytes = protocol::encode(frame);
    let Ok(len) = u32::try_from(bytes.len()) else {
        return;
    };
    let out = Uint8Array::new_with_length(len);
    out.copy_from(&bytes);
    if let Err(err) = socket.ws.send_with_array_buffer(&out.buffer()) {
        // Only a socket that is not open refuses; its close event follows.
        web_sys::console::warn_1(&format!("tabgrid: send failed: {}", describe(&err)).into());
    }
}

fn close(inner: &Inner, code: u16, reason: &str) {
    let state = inner.state.borrow();
    if let Some(socket) = &state.socket {
        // The reason must fit a control frame (123 bytes).
        let _ = socket
            .ws
            .close_with_code_and_reason(code, truncate(reason, 120));
    }
}

/// Closes on purpose (pause, stop): no reconnect follows.
fn leave(inner: &Rc<Inner>, phase: Phase, code: u16, reason: &str) {
    {
        let mut state = inner.state.borrow_mut();
        if let Some(socket) = state.socket.take() {
            let _ = socket
                .ws
                .close_with_code_and_reason(code, truncate(reason, 120));
        }
        state.generation += 1;
        state.session = None;
        state.pending = None;
        state.worker_id = None;
        state.phase = phase;
        state.detail = reason.to_owned();
    }
    report(inner);
}

fn stop_with(inner: &Rc<Inner>, detail: String) {
    {
        let mut state = inner.state.borrow_mut();
        state.generation += 1;
        state.socket = None;
        state.session = None;
        state.pending = None;
        state.worker_id = None;
        state.phase = Phase::Stopped;
        state.detail = detail;
    }
    report(inner);
}

fn on_closed(inner: &Rc<Inner>, code: u16, reason: String) {
    let said = inner.state.borrow().detail.clone();
    let why = if !reason.is_empty() {
        reason
    } else if code == 1006 {
        "the connection to the coordinator was lost".to_owned()
    } else {
        said
    };
    if code == POLICY {
        stop_with(inner, format!("refused by the coordinator: {why}"));
        return;
    }
    let (delay, generation) = {
        let mut state = inner.state.borrow_mut();
        state.generation += 1;
        state.socket = None;
        state.session = None;
        state.pending = None;
        state.worker_id = None;
        let delay = state.backoff.next_delay(js_sys::Math::random());
        state.phase = Phase::Retrying;
        state.detail = format!("{why}; retrying in {:.1} s", delay.as_secs_f64().max(0.05));
        (delay, state.generation)
    };
    report(inner);
    let inner = Rc::clone(inner);
    let ms = i32::try_from(delay.as_millis()).unwrap_or(i32::MAX);
    after(ms, move || {
        if current(&inner, generation) {
            connect(&inner);
        }
    });
}

fn report(inner: &Inner) {
    let _ = inner.report.call1(&JsValue::NULL, &stats(inner));
}

fn stats(inner: &Inner) -> JsValue {
    let state = inner.state.borrow();
    let info = Object::new();
    set(&info, "phase", state.phase.name());
    set(&info, "detail", state.detail.as_str());
    set(
        &info,
        "workerId",
        state
            .worker_id
            .map_or(JsValue::NULL, |id| JsValue::from(id as f64)),
    );
    set(&info, "tiles", state.tiles_done as f64);
    let leases = state.session.as_ref().map_or(0, |s| s.leases().len());
    set(&info, "leases", leases as f64);
    let (flops, ms) = state
        .recent
        .iter()
        .fold((0.0, 0.0), |(f, t), &(flops, ms)| (f + flops, t + ms));
    set(
        &info,
        "gflops",
        if ms > 0.0 { flops / ms / 1e6 } else { 0.0 },
    );
    set(&info, "benchGflops", state.bench_gflops);
    set(&info, "threads", inner.threads);
    set(&info, "duty", state.duty);
    set(&info, "threaded", cfg!(feature = "threads"));
    set(&info, "kernel", kernels::active_path());
    info.into()
}

fn set(object: &Object, key: &str, value: impl Into<JsValue>) {
    // Setting a property on a plain object cannot fail.
    let _ = Reflect::set(object, &JsValue::from_str(key), &value.into());
}

fn describe(value: &JsValue) -> String {
    value
        .dyn_ref::<js_sys::Error>()
        .map(|err| String::from(err.message()))
        .or_else(|| value.as_string())
        .unwrap_or_else(|| format!("{value:?}"))
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn scope() -> WorkerGlobalScope {
    js_sys::global().unchecked_into()
}

fn now_ms() -> f64 {
    scope().performance().map_or(0.0, |p| p.now())
}

fn after(ms: i32, then: impl FnOnce() + 'static) {
    let callback = Closure::once_into_js(then);
    // Only fails for a non-callable argument, which this is not.
    let _ =
        scope().set_timeout_with_callback_and_timeout_and_arguments_0(callback.unchecked_ref(), ms);
}

/// The kernel's speed on this tab, GFLOP/s, for the coordinator's lease deadlines: best of
/// a few 256³ products (a few milliseconds).
fn measure_speed() -> f64 {
    const N: usize = 256;
    let a = vec![1.0f32; N * N];
    let b = vec![0.5f32; N * N];
    let mut c = vec![0.0f32; N * N];
    let mut best = f64::MAX;
    for _ in 0..4 {
        let started = now_ms();
        let (Ok(a), Ok(b), Ok(c)) = (
            MatRef::row_major(&a, N, N),
            MatRef::row_major(&b, N, N),
            MatMut::row_major(&mut c, N, N),
        ) else {
            return 0.0;
        };
        if multiply(a, b, c).is_err() {
            return 0.0;
        }
        best = best.min(now_ms() - started);
    }
    let flops = 2.0 * (N * N * N) as f64;
    flops / best.max(0.01) / 1e6
}
