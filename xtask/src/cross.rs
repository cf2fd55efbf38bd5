//! CI for the kernels of an architecture this machine is not: `shared` linted for
//! aarch64-unknown-linux-gnu, where the NEON path is the one compiled in, and its kernel tests
//! run as aarch64 under qemu user-mode emulation, against the same reference as native.
//!
//! Emulation makes them slow (tens of times native), so the property tests run fewer cases
//! here; the fixed-shape tests still cross every blocking boundary.

use std::process::Command;

use anyhow::Context;

use crate::{root, run};

const TARGET: &str = "aarch64-unknown-linux-gnu";

/// The Debian packages `test_aarch64` needs: the emulator, and a cross linker with the
/// aarch64 C library, which the test binary links against and qemu loads it with.
const PACKAGES: &str = "qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross";

/// Property-test cases under emulation; about 30 s on two x86_64 cores.
const EMULATED_CASES: &str = "32";

/// Cargo with its own target directory, so cross builds do not evict the native ones.
fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.env("CARGO_TARGET_DIR", root().join("target/aarch64"));
    command
}

/// clippy `-D warnings` of `shared` (all targets, rayon on) for aarch64, which type-checks
/// the NEON kernels; it needs only the Rust target, no linker.
pub fn check_aarch64() -> anyhow::Result<()> {
    run(Command::new("rustup").args(["target", "add", TARGET]))?;
    run(cargo().args([
        "clippy",
        "-p",
        "tabgrid-shared",
        "--target",
        TARGET,
        "--all-targets",
        "--features",
        "rayon",
        "--",
        "-D",
        "warnings",
    ]))
}

/// [`check_aarch64`], then the kernel tests built for aarch64 and run under `qemu-aarch64`.
pub fn test_aarch64() -> anyhow::Result<()> {
    check_aarch64()?;
    for tool in ["aarch64-linux-gnu-gcc", "qemu-aarch64"] {
        Command::new(tool)
            .arg("--version")
            .output()
            .with_context(|| format!("{tool} is missing; on Debian: apt-get install {PACKAGES}"))?;
    }
    run(cargo()
        .args([
            "test",
            "-p",
            "tabgrid-shared",
            "--target",
            TARGET,
            "--features",
            "rayon",
            "--test",
            "kernels",
        ])
        .env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER",
            "aarch64-linux-gnu-gcc",
        )
        // `-L`: where the aarch64 dynamic loader and C library are, as Debian installs them.
        .env(
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER",
            "qemu-aarch64 -L /usr/aarch64-linux-gnu",
        )
        .env("PROPTEST_CASES", EMULATED_CASES))
}
