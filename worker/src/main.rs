//! `tabgrid-worker`: the command line over the `tabgrid_worker` library — lend this
//! machine to a coordinator until stopped, or measure it with `bench`.

use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tabgrid_shared::Dtype;
use tabgrid_shared::protocol::MAX_SLOTS;
use tabgrid_worker::{WorkerConfig, bench, run};
use tracing_subscriber::EnvFilter;

/// Lend this machine's cores to a tabgrid compute grid.
///
/// Connects to a coordinator over WebSocket, computes the matrix tiles it hands out, and
/// reconnects by itself (with backoff, failing over between coordinators) until stopped
/// with Ctrl-C or SIGTERM. Logs go to stderr; RUST_LOG sets the level (default info).
#[derive(Parser)]
#[command(
    version,
    about,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    lend: LendArgs,
}

#[derive(Args)]
struct LendArgs {
    /// Coordinator URL; several, comma-separated, fail over between coordinators that
    /// share one database. An http:// address as opened in a browser works.
    #[arg(
        long,
        env = "TABGRID_COORDINATOR",
        value_name = "URL[,URL...]",
        value_delimiter = ',',
        required = true
    )]
    coordinator: Vec<String>,

    /// Volunteer token (a JWT, e.g. from `tabgrid token --role volunteer`).
    #[arg(long, env = "TABGRID_TOKEN", hide_env_values = true)]
    token: Option<Token>,

    /// Compute threads [default: one per core].
    #[arg(long, env = "TABGRID_THREADS", value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,

    /// Operand cache size in MiB; the coordinator never sends more than this.
    #[arg(long, env = "TABGRID_CACHE_MB", default_value_t = 2048)]
    cache_mb: u64,

    /// Tiles held at once: one computing, the rest waiting so the cores never idle.
    #[arg(
        long,
        env = "TABGRID_SLOTS",
        default_value_t = tabgrid_worker::DEFAULT_SLOTS,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_SLOTS))
    )]
    slots: u32,

    /// TESTING ONLY: misbehave on purpose to test a grid — that fraction of tiles sent back
    /// wrong, held back past the deadline, lost by dropping the connection, or replaced by
    /// garbage. Example: --chaos wrong=0.5,drop=0.1
    #[arg(long, value_name = "wrong=P[,slow=P][,drop=P][,garbage=P]")]
    chaos: Option<tabgrid_worker::chaos::Chaos>,
}

#[derive(Subcommand)]
enum Command {
    /// Measure this machine's matrix-multiply speed and print one JSON line:
    /// {"dtype","size","threads","gflops"}.
    Bench(BenchArgs),
}

#[derive(Args)]
struct BenchArgs {
    /// Element type: f32 or f64.
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: Dtype,

    /// Edge of the square matrices multiplied.
    #[arg(long, default_value_t = 1024)]
    size: usize,

    /// Threads [default: one per core].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
}

/// A volunteer token, wrapped so that no `Debug` output ever shows it.
#[derive(Clone)]
struct Token(String);

impl FromStr for Token {
    type Err = Infallible;

    fn from_str(token: &str) -> Result<Token, Infallible> {
        Ok(Token(token.to_owned()))
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

fn parse_dtype(name: &str) -> Result<Dtype, String> {
    Dtype::parse(name).map_err(|err| err.to_string())
}

/// `None` (flag absent) is 0, which the library reads as one thread per core.
fn threads(threads: Option<u32>) -> usize {
    threads.map_or(0, |n| n as usize)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // stderr, so that `bench` leaves stdout to its one JSON line.
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Some(Command::Bench(args)) => {
            let report = bench(args.dtype, args.size, threads(args.threads));
            println!(
                "{}",
                serde_json::to_string(&report).context("cannot print the report")?
            );
            Ok(())
        }
        None => lend(cli.lend),
    }
}

fn lend(args: LendArgs) -> anyhow::Result<()> {
    let mut config = WorkerConfig::new(
        args.coordinator,
        args.token.map(|token| token.0),
        threads(args.threads),
    );
    config.cache_bytes = args.cache_mb.saturating_mul(1 << 20);
    config.slots = args.slots;
    config.chaos = args.chaos.unwrap_or_default();
    // One thread is plenty for the sockets: the kernels run on the library's own pool,
    // and a multi-threaded runtime would only add idle threads beside it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime
        .block_on(run(config, shutdown_signal()))
        .context("the worker stopped")
}

/// Resolves on Ctrl-C or SIGTERM (how service managers and containers stop a process).
async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // No handler could be installed: rely on the other signal.
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn coordinators_split_on_commas_and_bench_needs_none() {
        let cli = Cli::try_parse_from([
            "tabgrid-worker",
            "--coordinator",
            "http://a:1,http://b:2",
            "--token",
            "t",
            "--slots",
            "3",
        ])
        .unwrap();
        assert_eq!(cli.lend.coordinator, ["http://a:1", "http://b:2"]);
        assert_eq!(cli.lend.slots, 3);

        let cli = Cli::try_parse_from(["tabgrid-worker", "bench", "--dtype", "f64", "--size", "8"])
            .unwrap();
        let Some(Command::Bench(args)) = cli.command else {
            panic!("expected bench");
        };
        assert_eq!((args.dtype, args.size, args.threads), (Dtype::F64, 8, None));

        assert!(Cli::try_parse_from(["tabgrid-worker"]).is_err());
        assert!(
            Cli::try_parse_from(["tabgrid-worker", "--coordinator", "x", "--slots", "0"]).is_err()
        );
        assert!(Cli::try_parse_from(["tabgrid-worker", "bench", "--dtype", "i8"]).is_err());
    }

    #[test]
    fn tokens_never_print() {
        let token: Token = "s3cret".parse().unwrap();
        assert_eq!(format!("{token:?}"), "Token(<redacted>)");
    }
}
