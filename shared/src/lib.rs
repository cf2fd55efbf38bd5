//! What every tabgrid part agrees on: the worker protocol, how a job is cut into tiles,
//! the GEMM kernels, the claims inside a token, and the worker side of the protocol
//! (session, operand cache, tile computation) that native and browser workers share.
//!
//! This crate does no IO and knows nothing of tokio, axum or web-sys, so the native
//! worker, the coordinator and the browser client (compiled to `wasm32-unknown-unknown`)
//! all run the *same* protocol and kernel code. A result computed in a tab and one computed
//! natively differ only by the kernel's summation order, never by a second implementation.

pub mod claims;
pub mod kernels;
pub mod matrix;
pub mod protocol;
pub mod tiling;
pub mod worker;

pub use matrix::{Dtype, Matrix, MatrixError};
