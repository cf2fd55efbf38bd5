// Cargo runner for wasm32-wasip1: runs a test or example .wasm under Node's WASI with the
// working directory preopened, and exits with the program's exit code.
//
// Usage (from the workspace root; the script path must be absolute because cargo runs
// tests from the package directory):
//
//   CARGO_TARGET_WASM32_WASIP1_RUNNER="node $PWD/xtask/wasi-runner.mjs" \
//   CARGO_TARGET_WASM32_WASIP1_RUSTFLAGS="-C target-feature=+simd128" \
//   CARGO_TARGET_DIR=target/wasi \
//   cargo test -p tabgrid-shared --target wasm32-wasip1
//
// Node 20 marks `node:wasi` experimental and warns on every run; only that warning is
// silenced, so the test output stays readable.

import { readFile } from "node:fs/promises";
import process from "node:process";

const emitWarning = process.emitWarning;
process.emitWarning = (warning, ...rest) => {
  const type = typeof rest[0] === "string" ? rest[0] : rest[0]?.type;
  if (type === "ExperimentalWarning" && String(warning).includes("WASI")) {
    return;
  }
  emitWarning.call(process, warning, ...rest);
};
const { WASI } = await import("node:wasi");

const [wasmPath, ...args] = process.argv.slice(2);
if (wasmPath === undefined) {
  process.stderr.write("usage: node wasi-runner.mjs PROGRAM.wasm [ARGS...]\n");
  process.exit(2);
}

const wasi = new WASI({
  version: "preview1",
  args: [wasmPath, ...args],
  // wasm32-wasip1 aborts on panic, so a failing test ends the whole binary before libtest
  // prints what it captured; without capture the panic message reaches the terminal.
  env: { RUST_TEST_NOCAPTURE: "1", ...process.env },
  // Tests may read fixtures relative to the package directory (cargo's working directory
  // for `cargo test`), and proptest looks for its regression files there.
  preopens: { ".": process.cwd() },
  returnOnExit: true,
});

const module = await WebAssembly.compile(await readFile(wasmPath));
const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
let code;
try {
  code = wasi.start(instance);
} catch (error) {
  // A panic aborts (wasm32-wasip1 has no unwinding) and surfaces as a trap; the panic
  // message is already on stderr. 134 is what a native abort would give.
  process.stderr.write(`wasi-runner: ${error}\n`);
  code = 134;
}
process.exitCode = code;
