//! `cargo xtask wasm`: the browser bundles. Three builds of `client-wasm` — threaded
//! (atomics + shared memory + simd128, for cross-origin isolated pages), the same with
//! relaxed-simd (its FMA; for browsers that validate it, which the page tests with a tiny
//! probe module) and single-threaded (simd128 only, for pages that are not isolated) —
//! each run through wasm-bindgen's library into `www/pkg/<bundle>/`, plus
//! `www/pkg/manifest.json` that the page reads to pick one.
//!
//! The facts behind the flags are in DESIGN.md: the pinned nightly rebuilds std with
//! atomics (`-Z build-std`), and the link arguments export the TLS symbols that
//! wasm-bindgen-rayon's workers need (without them the pool fails with `DataCloneError`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::{root, run};

/// One bundle: its name (the folder under `www/pkg`), cargo features and RUSTFLAGS, and
/// whether clippy checks it (a bundle differing only in a target feature of `shared`'s
/// kernels adds nothing to clippy on `client-wasm`).
struct Bundle {
    name: &'static str,
    features: &'static [&'static str],
    rustflags: &'static str,
    lint: bool,
}

const BUNDLES: [Bundle; 3] = [
    Bundle {
        name: "threaded",
        features: &["threads"],
        rustflags: "-C target-feature=+atomics,+bulk-memory,+mutable-globals,+simd128 \
                    -C link-arg=--shared-memory -C link-arg=--max-memory=1073741824 \
                    -C link-arg=--import-memory -C link-arg=--export=__wasm_init_tls \
                    -C link-arg=--export=__tls_size -C link-arg=--export=__tls_align \
                    -C link-arg=--export=__tls_base",
        lint: true,
    },
    Bundle {
        name: "threaded-relaxed",
        features: &["threads"],
        rustflags: "-C target-feature=+atomics,+bulk-memory,+mutable-globals,+simd128,+relaxed-simd \
                    -C link-arg=--shared-memory -C link-arg=--max-memory=1073741824 \
                    -C link-arg=--import-memory -C link-arg=--export=__wasm_init_tls \
                    -C link-arg=--export=__tls_size -C link-arg=--export=__tls_align \
                    -C link-arg=--export=__tls_base",
        lint: false,
    },
    Bundle {
        name: "single",
        features: &[],
        rustflags: "-C target-feature=+bulk-memory,+mutable-globals,+simd128",
        lint: true,
    },
];

/// The crate's name as wasm-bindgen spells its output files.
const STEM: &str = "tabgrid_client_wasm";

pub fn wasm() -> anyhow::Result<()> {
    let toolchain = pinned_toolchain()?;
    install(&toolchain)?;
    let root = root();
    let pkg = root.join("www/pkg");
    let mut manifest = Vec::new();
    for bundle in &BUNDLES {
        let wasm = build(&root, &toolchain, bundle)?;
        let out = pkg.join(bundle.name);
        if out.exists() {
            fs::remove_dir_all(&out).with_context(|| format!("clearing {}", out.display()))?;
        }
        fs::create_dir_all(&out)?;
        wasm_bindgen_cli_support::Bindgen::new()
            .input_path(&wasm)
            .web(true)?
            .typescript(false)
            .omit_default_module_path(false)
            .generate(&out)
            .with_context(|| format!("wasm-bindgen on {}", wasm.display()))?;
        let wasm_bytes = fs::metadata(out.join(format!("{STEM}_bg.wasm")))?.len();
        eprintln!("bundle {}: {wasm_bytes} bytes of wasm", bundle.name);
        manifest.push(format!(
            "    \"{}\": {{\"script\": \"pkg/{}/{STEM}.js\", \"wasm_bytes\": {wasm_bytes}}}",
            bundle.name, bundle.name
        ));
    }
    fs::write(
        pkg.join("manifest.json"),
        format!(
            "{{\n  \"version\": \"{}\",\n  \"bundles\": {{\n{}\n  }}\n}}\n",
            env!("CARGO_PKG_VERSION"),
            manifest.join(",\n")
        ),
    )?;
    eprintln!("browser bundles written to {}", pkg.display());
    Ok(())
}

/// The channel named in `client-wasm/rust-toolchain.toml`, so the pin lives in one place.
fn pinned_toolchain() -> anyhow::Result<String> {
    let path = root().join("client-wasm/rust-toolchain.toml");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"').to_owned())
        .next()
        .with_context(|| format!("no channel in {}", path.display()))
}

/// Installs the pinned nightly with `rust-src` unless it is there (rustup does not
/// install toolchains by itself here: `RUSTUP_AUTO_INSTALL=0`). The wasm32 standard
/// library is rebuilt from `rust-src`, so the target's prebuilt component is not needed.
fn install(toolchain: &str) -> anyhow::Result<()> {
    let listed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", toolchain])
        .output()
        .context("running rustup")?;
    let installed = String::from_utf8_lossy(&listed.stdout);
    let has = |name: &str| installed.lines().any(|l| l.starts_with(name));
    if listed.status.success() && has("rust-src") && has("clippy") && has("rustfmt") {
        return Ok(());
    }
    run(Command::new("rustup").args([
        "toolchain",
        "install",
        toolchain,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
        "--component",
        "clippy",
        "--component",
        "rustfmt",
    ]))
}

/// fmt and clippy (`-D warnings`) of `client-wasm` with its own toolchain, for each bundle's
/// features and flags.
pub fn lint() -> anyhow::Result<()> {
    let toolchain = pinned_toolchain()?;
    install(&toolchain)?;
    let root = root();
    let mut fmt = nightly_cargo(&toolchain);
    fmt.args(["fmt", "--check"]);
    run_in(&root.join("client-wasm"), &mut fmt, "fmt")?;
    for bundle in BUNDLES.iter().filter(|b| b.lint) {
        let mut clippy = bundle_cargo(&root, &toolchain, bundle, "clippy");
        clippy.args(["--", "-D", "warnings"]);
        run_in(&root.join("client-wasm"), &mut clippy, bundle.name)?;
    }
    Ok(())
}

fn nightly_cargo(toolchain: &str) -> Command {
    let mut command = Command::new("cargo");
    command
        .arg(format!("+{toolchain}"))
        // The outer `cargo xtask` runs on stable; its variables would leak into the
        // nightly build.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    command
}

/// `cargo <verb>` for one bundle: target, std rebuilt, features, flags, target dir.
fn bundle_cargo(root: &Path, toolchain: &str, bundle: &Bundle, verb: &str) -> Command {
    let mut command = nightly_cargo(toolchain);
    command
        .args([
            verb,
            "--release",
            "--target",
            "wasm32-unknown-unknown",
            "-Z",
            "build-std=panic_abort,std",
            "--features",
        ])
        .arg(bundle.features.join(","))
        .env("RUSTFLAGS", bundle.rustflags)
        .env("CARGO_TARGET_DIR", target_dir(root, bundle));
    command
}

fn target_dir(root: &Path, bundle: &Bundle) -> PathBuf {
    root.join("target/client-wasm").join(bundle.name)
}

fn run_in(dir: &Path, command: &mut Command, what: &str) -> anyhow::Result<()> {
    eprintln!("$ (client-wasm, {what}) {command:?}");
    let status = command
        .current_dir(dir)
        .status()
        .context("running cargo for client-wasm")?;
    if !status.success() {
        bail!("client-wasm ({what}) failed: {status}");
    }
    Ok(())
}

/// Builds one bundle's `.wasm` and returns its path.
fn build(root: &Path, toolchain: &str, bundle: &Bundle) -> anyhow::Result<PathBuf> {
    let mut command = bundle_cargo(root, toolchain, bundle, "build");
    run_in(&root.join("client-wasm"), &mut command, bundle.name)?;
    Ok(target_dir(root, bundle).join(format!("wasm32-unknown-unknown/release/{STEM}.wasm")))
}
