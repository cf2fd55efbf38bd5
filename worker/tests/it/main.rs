//! The worker's socket loop against a scripted fake coordinator on a real port: what the
//! session's unit tests cannot see — the upgrade header, the handshake, close codes,
//! reconnects and silence detection. End-to-end tests with the real coordinator live in
//! the workspace's `tests` crate.

mod fake;
mod socket;
