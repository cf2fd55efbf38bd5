//! The worker's side of the protocol, without IO: the session state machine, the operand
//! cache, computing a tile, and reconnect backoff. The native worker (`tabgrid-worker`,
//! tokio + a rayon pool) and the browser client (`client-wasm`, a web worker + a
//! wasm-bindgen-rayon pool) each wrap these in their own socket loop, so a tab and a
//! native worker follow exactly the same rules.

pub mod backoff;
pub mod cache;
pub mod session;
pub mod task;

pub use backoff::Backoff;
pub use cache::{CacheError, OperandCache, Panel, Values};
pub use session::{Command, Session};
#[cfg(not(all(target_family = "wasm", target_os = "unknown")))]
pub use task::instant_ms;
pub use task::{Computed, Task, compute};
