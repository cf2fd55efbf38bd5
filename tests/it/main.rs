//! End-to-end tests: real coordinator and worker processes, real sockets, real tokens.

mod api;
mod browser;
mod cli;
mod cluster;
mod compute;
mod faults;
mod page;
mod protocol;
mod store;
mod verify;
