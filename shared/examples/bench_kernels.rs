//! `cargo xtask bench kernels`: our GEMM beside `matrixmultiply`, the `gemm` crate and
//! numpy/OpenBLAS on the same square products (f32 and f64, 1 and 2 threads), printed as a
//! markdown table of median GFLOP/s.
//!
//! Within a table cell the implementations take turns, one timed sample each per round and
//! a different one first in each round, so a slow spell of this shared machine lands on all
//! of them rather than on whichever ran during it. Numpy therefore runs in a long-lived
//! `python3` child per thread count that takes one request per sample over stdin, instead
//! of a subprocess that times a whole cell by itself. Each implementation's first product in
//! a cell is checked against ours (numpy's through a weighted checksum of C, computed from
//! the same operands), so a mistaken stride cannot pass for a fast multiply.
//!
//! `matrixmultiply` is measured on one thread only: its `threading` feature is chosen at
//! build time and would be unified into the test crate's `matrixmultiply`, turning the
//! reference multiply of other tests threaded.
//!
//! `cargo run --release -p tabgrid-shared --features rayon --example bench_kernels [N...]`;
//! the sizes default to 256, 512, 1024, 2048 and 4096.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tabgrid_shared::kernels::{self, Element, MatMut, MatRef};

const SIZES: [usize; 5] = [256, 512, 1024, 2048, 4096];
const THREADS: [usize; 2] = [1, 2];

/// OpenBLAS's idle workers spin (`sched_yield` in a loop) for about 2^28 cycles after each
/// call before they sleep, which on two cores would eat into whatever runs next; the bench
/// waits this long after a threaded numpy sample so that spinning is over.
const OPENBLAS_SPIN: Duration = Duration::from_millis(250);

/// What the comparison needs beyond [`Element`]: numpy's name for the type, how closely
/// two checksums must agree, and `matrixmultiply`'s entry point.
trait Float: Element {
    /// The table's name for the type.
    const NAME: &'static str;
    /// numpy's.
    const DTYPE: &'static str;
    /// Checksums of two correct results differ by less than this fraction of their scale.
    const TOLERANCE: f64;
    /// `C = A·B` with `matrixmultiply`, all three `n x n` and row-major.
    fn matrixmultiply(n: usize, a: &[Self], b: &[Self], c: &mut [Self]);
}

impl Float for f32 {
    const NAME: &'static str = "f32";
    const DTYPE: &'static str = "float32";
    const TOLERANCE: f64 = 1e-3;
    fn matrixmultiply(n: usize, a: &[Self], b: &[Self], c: &mut [Self]) {
        assert!(a.len() == n * n && b.len() == n * n && c.len() == n * n);
        let s = n as isize;
        // SAFETY: each buffer holds n·n elements, exactly what strides (n, 1) address.
        unsafe {
            matrixmultiply::sgemm(
                n,
                n,
                n,
                1.0,
                a.as_ptr(),
                s,
                1,
                b.as_ptr(),
                s,
                1,
                0.0,
                c.as_mut_ptr(),
                s,
                1,
            );
        }
    }
}

impl Float for f64 {
    const NAME: &'static str = "f64";
    const DTYPE: &'static str = "float64";
    const TOLERANCE: f64 = 1e-8;
    fn matrixmultiply(n: usize, a: &[Self], b: &[Self], c: &mut [Self]) {
        assert!(a.len() == n * n && b.len() == n * n && c.len() == n * n);
        let s = n as isize;
        // SAFETY: each buffer holds n·n elements, exactly what strides (n, 1) address.
        unsafe {
            matrixmultiply::dgemm(
                n,
                n,
                n,
                1.0,
                a.as_ptr(),
                s,
                1,
                b.as_ptr(),
                s,
                1,
                0.0,
                c.as_mut_ptr(),
                s,
                1,
            );
        }
    }
}

/// `C = A·B` with the `gemm` crate, all three `n x n` and row-major.
fn gemm_crate<T: Float>(n: usize, a: &[T], b: &[T], c: &mut [T], threads: usize) {
    assert!(a.len() == n * n && b.len() == n * n && c.len() == n * n);
    let s = n as isize;
    let parallelism = if threads == 1 {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(threads)
    };
    // SAFETY: each buffer holds n·n elements, exactly what strides (n, 1) address. The crate
    // computes `dst = alpha·dst + beta·lhs·rhs`, and with `read_dst = false` ignores dst's
    // old contents and alpha.
    unsafe {
        gemm::gemm(
            n,
            n,
            n,
            c.as_mut_ptr(),
            1,
            s,
            false,
            a.as_ptr(),
            1,
            s,
            b.as_ptr(),
            1,
            s,
            T::ZERO,
            T::ONE,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The operands' values, `i` counting elements in row-major order; the numpy child computes
/// the same ones so its result can be checked against ours. In [-1, 1), so no product
/// meets denormals or infinities.
fn operand<T: Element>(n: usize, salt: usize) -> Vec<T> {
    (0..n * n)
        .map(|i| T::from_f64(((i * 7919 + salt) % 2003) as f64 / 1001.5 - 1.0))
        .collect()
}

/// A weighted sum of C whose signed, position-dependent weights make a transposed or
/// shifted result differ, and the scale its rounding error is measured against.
fn checksum<T: Element>(n: usize, c: &[T]) -> (f64, f64) {
    let (mut sum, mut scale) = (0.0, 0.0);
    for (i, v) in c.iter().enumerate() {
        let w = ((i / n * 3 + i % n * 7) % 11) as f64 - 5.0;
        sum += w * v.to_f64();
        scale += (w * v.to_f64()).abs();
    }
    (sum, scale)
}

/// Times `a @ b` for one request per line (`dtype n calls check`), answering with the
/// seconds per call and, when asked, the checksum of C. The operands are made as in
/// `operand` and kept while requests ask for the same dtype and size.
const NUMPY_SERVER: &str = r#"
import sys, time
try:
    import numpy as np
except ImportError:
    print("missing", flush=True)
    sys.exit(0)
core = "unknown"
try:
    import ctypes, glob, os
    for lib in glob.glob(os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs", "*openblas*")):
        dll = ctypes.CDLL(lib)
        for name in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename"):
            if hasattr(dll, name):
                getattr(dll, name).restype = ctypes.c_char_p
                core = getattr(dll, name)().decode()
                break
except Exception:
    pass
print("ready", np.__version__, core, flush=True)

def operand(n, salt, dtype):
    i = np.arange(n * n, dtype=np.int64)
    return (((i * 7919 + salt) % 2003) / 1001.5 - 1.0).astype(dtype).reshape(n, n)

key = None
for line in sys.stdin:
    dtype, n, calls, check = line.split()
    n, calls = int(n), int(calls)
    if key != (dtype, n):
        a = b = c = None
        a, b = operand(n, 1, dtype), operand(n, 2, dtype)
        c = np.zeros((n, n), dtype=dtype)
        key = (dtype, n)
    start = time.perf_counter()
    for _ in range(calls):
        np.matmul(a, b, out=c)
    seconds = (time.perf_counter() - start) / calls
    total = float("nan")
    if check == "1":
        rows, cols = np.arange(n)[:, None], np.arange(n)[None, :]
        total = float((c.astype(np.float64) * (((rows * 3 + cols * 7) % 11) - 5.0)).sum())
    print(seconds, total, flush=True)
"#;

/// A `python3` child running [`NUMPY_SERVER`] on a fixed number of OpenBLAS threads.
struct Numpy {
    child: Child,
    requests: ChildStdin,
    replies: BufReader<ChildStdout>,
    threads: usize,
}

impl Numpy {
    /// The child and its `numpy <version>, OpenBLAS core <name>` line, or why there is none.
    fn spawn(threads: usize) -> anyhow::Result<Result<(Self, String), String>> {
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let spawned = Command::new(&python)
            .args(["-c", NUMPY_SERVER])
            // Set in this environment for other tools; they slow a current numpy here (the
            // Haswell core type keeps OpenBLAS off its AVX-512 kernels).
            .env_remove("OPENBLAS_CORETYPE")
            .env_remove("OPENBLAS_L2_SIZE")
            .env("OPENBLAS_NUM_THREADS", threads.to_string())
            .env("OMP_NUM_THREADS", threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(error) => return Ok(Err(format!("{python}: {error}"))),
        };
        let requests = child.stdin.take().context("python's stdin")?;
        let replies = BufReader::new(child.stdout.take().context("python's stdout")?);
        let mut numpy = Self {
            child,
            requests,
            replies,
            threads,
        };
        let hello = numpy.reply()?;
        match hello.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["ready", version, core] => Ok(Ok((
                numpy,
                format!("numpy {version}, OpenBLAS core {core}"),
            ))),
            _ => Ok(Err(format!("{python} has no numpy ({hello})"))),
        }
    }

    fn reply(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        self.replies
            .read_line(&mut line)
            .context("reading from the numpy child")?;
        if line.is_empty() {
            bail!("the numpy child exited");
        }
        Ok(line.trim().to_owned())
    }

    /// Seconds per call over `calls` back-to-back products, and the checksum if asked for.
    fn sample(
        &mut self,
        dtype: &str,
        n: usize,
        calls: usize,
        check: bool,
    ) -> anyhow::Result<(f64, Option<f64>)> {
        writeln!(self.requests, "{dtype} {n} {calls} {}", u8::from(check))
            .and_then(|()| self.requests.flush())
            .context("writing to the numpy child")?;
        let reply = self.reply()?;
        let parsed = reply
            .split_once(' ')
            .and_then(|(s, t)| Some((s.parse::<f64>().ok()?, t.parse::<f64>().ok()?)));
        let Some((seconds, total)) = parsed else {
            bail!("unexpected reply from the numpy child: {reply:?}");
        };
        if self.threads > 1 {
            std::thread::sleep(OPENBLAS_SPIN);
        }
        Ok((seconds, check.then_some(total)))
    }
}

impl Drop for Numpy {
    fn drop(&mut self) {
        // Only this child, by its handle; it holds up to three 4096² matrices.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Contender {
    Ours,
    MatrixMultiply,
    GemmCrate,
    Numpy,
}

const CONTENDERS: [Contender; 4] = [
    Contender::Ours,
    Contender::MatrixMultiply,
    Contender::GemmCrate,
    Contender::Numpy,
];

/// One cell's operands, shared by the in-process contenders (each overwrites C).
struct Operands<T> {
    n: usize,
    a: Vec<T>,
    b: Vec<T>,
    c: Vec<T>,
}

impl<T: Float> Operands<T> {
    fn new(n: usize) -> Self {
        Self {
            n,
            a: operand(n, 1),
            b: operand(n, 2),
            c: vec![T::ZERO; n * n],
        }
    }

    fn ours(&mut self, threads: usize) {
        let n = self.n;
        let a = MatRef::row_major(&self.a, n, n).expect("n x n");
        let b = MatRef::row_major(&self.b, n, n).expect("n x n");
        let c = MatMut::row_major(&mut self.c, n, n).expect("n x n");
        if threads == 1 {
            kernels::gemm(T::ONE, a, b, T::ZERO, c).expect("square shapes agree");
        } else {
            kernels::par_gemm(T::ONE, a, b, T::ZERO, c).expect("square shapes agree");
        }
    }

    /// Seconds per call of `who` over `calls` back-to-back products; threaded runs go to
    /// `pool` (which the `gemm` crate's `Parallelism::Rayon` also runs on).
    fn time(
        &mut self,
        who: Contender,
        threads: usize,
        pool: &rayon::ThreadPool,
        calls: usize,
    ) -> f64 {
        let mut run = || {
            let start = Instant::now();
            for _ in 0..calls {
                match who {
                    Contender::Ours => self.ours(threads),
                    Contender::MatrixMultiply => {
                        T::matrixmultiply(self.n, &self.a, &self.b, &mut self.c)
                    }
                    Contender::GemmCrate => {
                        gemm_crate(self.n, &self.a, &self.b, &mut self.c, threads)
                    }
                    Contender::Numpy => unreachable!("numpy runs in its child"),
                }
            }
            start.elapsed().as_secs_f64() / calls as f64
        };
        if threads == 1 {
            run()
        } else {
            pool.install(run)
        }
    }
}

/// Timed rounds per cell: fewer where one product takes seconds.
fn rounds(n: usize) -> usize {
    match n {
        0..=512 => 11,
        513..=1024 => 7,
        1025..=2048 => 5,
        _ => 3,
    }
}

/// Products per sample, so that a small one is not timed alone (about 2^29 multiply-adds).
fn calls(n: usize) -> usize {
    ((1usize << 29) / n.pow(3)).max(1)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let mid = xs.len() / 2;
    if xs.len() % 2 == 1 {
        xs[mid]
    } else {
        (xs[mid - 1] + xs[mid]) / 2.0
    }
}

/// Median GFLOP/s of each contender in one cell; `None` where one does not take part.
fn measure<T: Float>(
    operands: &mut Operands<T>,
    threads: usize,
    pool: &rayon::ThreadPool,
    mut numpy: Option<&mut Numpy>,
) -> anyhow::Result<[Option<f64>; 4]> {
    let n = operands.n;
    let playing: Vec<Contender> = CONTENDERS
        .into_iter()
        .filter(|who| match who {
            Contender::MatrixMultiply => threads == 1,
            Contender::Numpy => numpy.is_some(),
            _ => true,
        })
        .collect();
    let mut sample = |who: Contender, calls: usize, check: bool| -> anyhow::Result<_> {
        match (who, numpy.as_deref_mut()) {
            (Contender::Numpy, Some(numpy)) => {
                let (seconds, total) = numpy.sample(T::DTYPE, n, calls, check)?;
                Ok((seconds, total.map(|total| (total, f64::NAN))))
            }
            _ => {
                let seconds = operands.time(who, threads, pool, calls);
                Ok((seconds, check.then(|| checksum(n, &operands.c))))
            }
        }
    };

    // The warm-up round: ours first, as the result the others are checked against.
    let mut expected = None;
    for &who in &playing {
        let (_, checked) = sample(who, 1, true)?;
        let (total, scale) = checked.expect("asked for a checksum");
        match expected {
            None => expected = Some((total, scale)),
            Some((want, scale)) if (total - want).abs() > T::TOLERANCE * scale => bail!(
                "{who:?} disagrees with ours on {} n={n} threads={threads}: checksum {total} vs {want}",
                T::NAME
            ),
            Some(_) => {}
        }
    }

    let mut seconds = vec![Vec::new(); playing.len()];
    for round in 0..rounds(n) {
        for turn in 0..playing.len() {
            let i = (round + turn) % playing.len();
            seconds[i].push(sample(playing[i], calls(n), false)?.0);
        }
    }
    let flops = 2.0 * (n as f64).powi(3);
    let mut gflops = [None; 4];
    for (who, seconds) in playing.iter().zip(seconds) {
        let slot = CONTENDERS
            .iter()
            .position(|c| c == who)
            .expect("a contender");
        gflops[slot] = Some(flops / median(seconds) / 1e9);
    }
    Ok(gflops)
}

fn cell(gflops: Option<f64>, absent: &str) -> String {
    gflops.map_or_else(|| absent.to_owned(), |g| format!("{g:.1}"))
}

fn ratio(ours: Option<f64>, theirs: Option<f64>) -> String {
    match (ours, theirs) {
        (Some(ours), Some(theirs)) => format!("{:.2}", ours / theirs),
        _ => "—".to_owned(),
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// One row of the table: median GFLOP/s by contender, in the order of [`CONTENDERS`].
struct Row {
    n: usize,
    threads: usize,
    gflops: [Option<f64>; 4],
}

/// One dtype's rows of the table, printed as they are measured and kept for the scaling
/// line.
fn bench_dtype<T: Float>(
    sizes: &[usize],
    pools: &[rayon::ThreadPool],
    numpy: &mut [Option<Numpy>],
) -> anyhow::Result<Vec<Row>> {
    let mut results = Vec::new();
    for &n in sizes {
        let mut operands = Operands::<T>::new(n);
        for (t, &threads) in THREADS.iter().enumerate() {
            let g = measure(&mut operands, threads, &pools[t], numpy[t].as_mut())?;
            let numpy_cell = if numpy[t].is_some() {
                cell(g[3], "—")
            } else {
                "numpy not available".to_owned()
            };
            println!(
                "| {} | {n} | {threads} | {} | {} | {} | {numpy_cell} | {} | {} |",
                T::NAME,
                cell(g[0], "—"),
                cell(g[1], "(1 thread only)"),
                cell(g[2], "—"),
                ratio(g[0], g[3]),
                ratio(g[0], g[2]),
            );
            results.push(Row {
                n,
                threads,
                gflops: g,
            });
        }
    }
    Ok(results)
}

/// `2-thread / 1-thread` of one contender at each n ≥ 1024.
fn scaling(rows: &[Row], slot: usize) -> String {
    let at = |n: usize, threads: usize| {
        rows.iter()
            .find(|r| r.n == n && r.threads == threads)
            .and_then(|r| r.gflops[slot])
    };
    let mut parts = Vec::new();
    for row in rows {
        if row.n >= 1024
            && row.threads == 1
            && let (Some(one), Some(two)) = (at(row.n, 1), at(row.n, 2))
        {
            parts.push(format!("{:.2}× (n={})", two / one, row.n));
        }
    }
    if parts.is_empty() {
        "—".to_owned()
    } else {
        parts.join(", ")
    }
}

fn main() -> anyhow::Result<()> {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().with_context(|| format!("{a:?} is not a size")))
        .collect::<anyhow::Result<_>>()?;
    let sizes = if sizes.is_empty() {
        SIZES.to_vec()
    } else {
        sizes
    };

    let pools = THREADS
        .iter()
        .map(|&t| rayon::ThreadPoolBuilder::new().num_threads(t).build())
        .collect::<Result<Vec<_>, _>>()
        .context("building the rayon pools")?;
    let mut numpy = Vec::new();
    let mut numpy_about = String::new();
    for &threads in &THREADS {
        match Numpy::spawn(threads)? {
            Ok((child, about)) => {
                numpy_about = about;
                numpy.push(Some(child));
            }
            Err(why) => {
                numpy_about = format!("numpy not available: {why}");
                numpy.push(None);
            }
        }
    }

    println!(
        "ours: {}; matrixmultiply (default features: AVX-512 kernels where the CPU has them, \
         1 thread); gemm crate 0.19 (default x86 level, no `x86-v4`); {numpy_about} \
         (OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset for it). Median GFLOP/s (2n³ / median \
         seconds) over {} rounds by n, after one warm-up round; load average at start {}.",
        kernels::active_path(),
        sizes
            .iter()
            .map(|&n| format!("{}@{n}", rounds(n)))
            .collect::<Vec<_>>()
            .join(" "),
        load_average(),
    );
    println!();
    println!(
        "| dtype | n | threads | ours | matrixmultiply | gemm | numpy | ours/numpy | ours/gemm |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let f32s = bench_dtype::<f32>(&sizes, &pools, &mut numpy)?;
    let f64s = bench_dtype::<f64>(&sizes, &pools, &mut numpy)?;
    println!();
    for (dtype, results) in [("f32", &f32s), ("f64", &f64s)] {
        println!(
            "{dtype} 2-thread / 1-thread: ours {}; gemm crate {}; numpy {}",
            scaling(results, 0),
            scaling(results, 2),
            scaling(results, 3),
        );
    }
    println!("load average at end {}", load_average());
    Ok(())
}
