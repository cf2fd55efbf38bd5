//! `cargo xtask`: the one build tool for what cargo alone cannot do — the whole test
//! suite with its binaries, the browser bundles, the CI checks, and benchmarks.

mod cross;
mod wasm;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

const USAGE: &str = "\
usage: cargo xtask <command>

  cluster [ARGS]  build the browser bundles, then run `tabgrid cluster` (default: --workers 1)
  wasm            build the browser bundles (threaded and single-threaded) into www/pkg
  test            build the binaries and bundles, then run every test (unit, integration,
                  end-to-end, browser)
  test-wasi       shared's tests (the kernels' proptests) as wasm32 + simd128, then with
                  relaxed-simd too, under Node's WASI
  ci              what CI runs: fmt check, clippy -D warnings (native and client-wasm),
                  wasm32 build of shared, shared's tests under wasm32-wasip1 (Node), test
  bench e2e       end-to-end 2048² f32 job on `cluster --workers 1` vs the same kernel in one process
  bench scheduler scheduler state machine throughput (100k tiles)
  bench verify    Freivalds' check of every tile as a share of the job's compute (n = 1024..4096)
  bench browser   the kernel in headless Chromium vs natively, first tile, hidden tab, bundle sizes
  bench kernels   our GEMM vs matrixmultiply, the gemm crate and numpy/OpenBLAS, f32 and f64,
                  1 and 2 threads, n = 256 to 4096 (or the sizes given after it)
";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["cluster", rest @ ..] => cluster(rest),
        ["wasm"] => wasm::wasm(),
        ["test", rest @ ..] => test(rest),
        ["test-wasi"] => test_wasi(),
        ["ci"] => ci(),
        ["bench", "e2e", rest @ ..] => bench_e2e(rest),
        ["bench", "browser"] => {
            wasm::wasm()?;
            cargo(&["build", "--release", "--bins"])?;
            cargo(&[
                "run",
                "--release",
                "-p",
                "tabgrid-tests",
                "--example",
                "bench_browser",
            ])
        }
        ["bench", "kernels", sizes @ ..] => {
            let mut args = vec![
                "run",
                "--release",
                "-p",
                "tabgrid-shared",
                "--features",
                "rayon",
                "--example",
                "bench_kernels",
                "--",
            ];
            args.extend_from_slice(sizes);
            cargo(&args)
        }
        ["bench", "verify", rest @ ..] => {
            let mut args = vec![
                "run",
                "--release",
                "-p",
                "tabgrid-coordinator",
                "--example",
                "bench_verify",
                "--",
            ];
            args.extend_from_slice(rest);
            cargo(&args)
        }
        ["bench", "scheduler"] => {
            cargo(&["bench", "-p", "tabgrid-coordinator", "--bench", "scheduler"])
        }
        _ => {
            eprint!("{USAGE}");
            bail!("unknown command {:?}", args.join(" "))
        }
    }
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

pub(crate) fn run(command: &mut Command) -> anyhow::Result<()> {
    eprintln!("$ {command:?}");
    let status = command
        .current_dir(root())
        .status()
        .with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).args(args))
}

fn has_nextest() -> bool {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// End-to-end tests run the real `tabgrid` and `tabgrid-worker` binaries, which a plain
/// `cargo test` of another package does not build: build them first.
fn test(extra: &[&str]) -> anyhow::Result<()> {
    wasm::wasm()?;
    cargo(&["build", "--workspace", "--bins"])?;
    if has_nextest() {
        let mut args = vec!["nextest", "run", "--workspace", "--no-fail-fast"];
        args.extend_from_slice(extra);
        cargo(&args)
    } else {
        let mut args = vec!["test", "--workspace", "--no-fail-fast"];
        args.extend_from_slice(extra);
        cargo(&args)
    }
}

/// The README's first command: a grid whose page works, from a fresh clone.
fn cluster(extra: &[&str]) -> anyhow::Result<()> {
    let extra = extra.strip_prefix(&["--"]).unwrap_or(extra);
    wasm::wasm()?;
    let mut args = vec!["run", "--release", "--bin", "tabgrid", "--", "cluster"];
    if extra.is_empty() {
        args.extend(["--workers", "1"]);
    }
    args.extend_from_slice(extra);
    cargo(&args)
}

fn ci() -> anyhow::Result<()> {
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    wasm::lint()?;
    run(Command::new("rustup").args(["target", "add", "wasm32-unknown-unknown"]))?;
    cargo(&[
        "build",
        "-p",
        "tabgrid-shared",
        "--target",
        "wasm32-unknown-unknown",
    ])?;
    test_wasi()?;
    cross::test_aarch64()?;
    test(&[])
}

/// `shared`'s tests (kernel proptests included) compiled to wasm32 with simd128 and run
/// under Node's WASI: the browser kernels checked against the same reference as native.
fn test_wasi() -> anyhow::Result<()> {
    run(Command::new("rustup").args(["target", "add", "wasm32-wasip1"]))?;
    let root = root();
    let runner = format!("node {}", root.join("xtask/wasi-runner.mjs").display());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Both browser kernels: simd128, then relaxed-simd (Node 20's V8 validates it only
    // behind a flag; browsers ship it). Separate target dirs keep both builds cached.
    for (features, node_flags, dir) in [
        ("+simd128", "", "target/wasi"),
        (
            "+simd128,+relaxed-simd",
            "--experimental-wasm-relaxed-simd ",
            "target/wasi-relaxed",
        ),
    ] {
        let runner = runner.replacen("node ", &format!("node {node_flags}"), 1);
        run(Command::new(&cargo)
            .args(["test", "-p", "tabgrid-shared", "--target", "wasm32-wasip1"])
            .env("CARGO_TARGET_WASM32_WASIP1_RUNNER", runner)
            .env(
                "CARGO_TARGET_WASM32_WASIP1_RUSTFLAGS",
                format!("-C target-feature={features}"),
            )
            .env("CARGO_TARGET_DIR", root.join(dir)))?;
    }
    Ok(())
}

fn bench_e2e(extra: &[&str]) -> anyhow::Result<()> {
    let mut args = vec![
        "run",
        "--release",
        "-p",
        "tabgrid-coordinator",
        "--example",
        "bench_e2e",
        "--",
    ];
    args.extend_from_slice(extra);
    cargo(&args)
}
