//! `tabgrid`: run a coordinator (`serve`), a laptop grid (`cluster`), mint tokens, and
//! submit and follow jobs as a client.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tabgrid_coordinator::auth::{Keys, Secret};
use tabgrid_coordinator::client::{Client, Submission};
use tabgrid_coordinator::cluster::{ClaimConfig, Claims};
use tabgrid_coordinator::scheduler::SchedulerConfig;
use tabgrid_coordinator::store::postgres::{self, PgStore};
use tabgrid_coordinator::store::sqlite::{SqliteOptions, SqliteStore};
use tabgrid_coordinator::store::{MemoryStore, Store};
use tabgrid_coordinator::volunteers::VolunteerMode;
use tabgrid_coordinator::www::Site;
use tabgrid_coordinator::{Coordinator, ServeConfig};
use tabgrid_shared::claims::Role;

/// tabgrid: a volunteer compute grid for dense matrix multiplication.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator.
    Serve(ServeArgs),
    /// Run a coordinator and N native workers in this process (a grid on one machine).
    Cluster(ClusterArgs),
    /// Mint a token signed with this coordinator's secret.
    Token(TokenArgs),
    /// Copy the embedded store (while it serves) to one tar file; restore with
    /// `tar -xf FILE -C NEW_DATA_DIR`.
    Backup(BackupArgs),
    /// Submit a job: C = alpha·A·B + beta·C from .npy files.
    Submit(SubmitArgs),
    /// Show a job's state and progress.
    Status(JobArgs),
    /// Download a job's result (.npy with -o, JSON otherwise).
    Result(ResultArgs),
    /// List your jobs (all jobs for an admin).
    Jobs(ClientArgs),
    /// Cancel and delete a job.
    Cancel(JobArgs),
}

#[derive(Args)]
struct ServerArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "TABGRID_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory for the coordinator's state (JWT secret, store).
    #[arg(long, env = "TABGRID_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// Largest request body, bytes (suffixes K, M, G, KiB, MiB, GiB accepted).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    max_body: u64,
    /// Largest job: its operands and result together (a bigger one is refused with 413).
    #[arg(long, default_value = "4GiB", value_parser = parse_size)]
    max_job_size: u64,
    /// Most disk the jobs' files in the data dir may take together (a submission that
    /// would pass it is refused with 507); unlimited when not given.
    #[arg(long, env = "TABGRID_DISK_QUOTA", value_parser = parse_size)]
    disk_quota: Option<u64>,
    /// Most worker connections (native workers and tabs) from one client address; 0 for no
    /// limit. Behind a reverse proxy every worker has the proxy's address: raise it.
    #[arg(long, default_value_t = 64)]
    max_conns_per_address: u32,
    /// Most worker connections with one token subject; 0 for no limit.
    #[arg(long, default_value_t = 16)]
    max_conns_per_subject: u32,
    /// `sqlite`: jobs survive restarts (a database and files in --data-dir); `memory`:
    /// nothing is kept (throwaway grids, benchmarks).
    #[arg(long, env = "TABGRID_STORE", default_value = "sqlite")]
    store: StoreKind,
    /// A PostgreSQL database shared by several coordinators (`postgres://USER@HOST/DB`;
    /// replaces --store). Jobs, operands, tiles, leases and the JWT secret live there,
    /// so any coordinator serves any job and takes over a dead one's tiles.
    #[arg(long, env = "TABGRID_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// With --database-url: how long a coordinator's claim on tiles lasts unrenewed, so
    /// how long a dead coordinator's tiles wait before another takes them.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    claim_ttl: Duration,
    /// Seconds between worker heartbeats; a worker silent for three is dropped.
    #[arg(long, default_value_t = 5, hide = true)]
    heartbeat_secs: u32,
    /// Shortest lease, milliseconds (tests shorten it to exercise expiry).
    #[arg(long, default_value_t = 15_000, hide = true)]
    lease_floor_ms: u64,
    /// Preferred tile edge (benchmarks shrink it to measure per-tile overhead).
    #[arg(long, default_value_t = tabgrid_shared::tiling::PREFERRED_EDGE, hide = true)]
    tile_edge: u32,
    /// `open`: any tab that opens the page gets a short-lived volunteer token (rate-limited
    /// per address); `token`: a tab needs a volunteer token in its URL (`/#token=JWT`).
    #[arg(long, env = "TABGRID_VOLUNTEERS", default_value = "open")]
    volunteers: VolunteerMode,
    /// The volunteer page's folder (`www/` of a checkout, with bundles from `cargo xtask wasm`).
    #[arg(long, env = "TABGRID_WWW", default_value_os_t = tabgrid_coordinator::www::default_dir())]
    www: PathBuf,
    /// PEM certificate chain: serve HTTPS/WSS (browsers give threads only to secure pages;
    /// plain http is one only on localhost).
    #[arg(long, env = "TABGRID_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "TABGRID_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Send the cross-origin isolation headers (`off` only shows the one-thread fallback).
    #[arg(long, default_value = "on", value_parser = parse_on_off, action = clap::ArgAction::Set, hide = true)]
    isolation: bool,
}

/// Where the coordinator keeps jobs.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum StoreKind {
    Sqlite,
    Memory,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Args)]
struct ClusterArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Native workers to run in this process.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Threads per worker (default: the machine's cores shared between the workers).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
struct TokenArgs {
    #[arg(long, value_parser = parse_role)]
    role: Role,
    /// Who the token is for; submitters own the jobs they submit.
    #[arg(long)]
    subject: String,
    /// Validity, e.g. 30m, 24h, 7days.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Data dir of the coordinator whose secret signs the token.
    #[arg(long, env = "TABGRID_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// The shared database of coordinators started with --database-url (its secret signs
    /// the token instead).
    #[arg(long, env = "TABGRID_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

#[derive(Args)]
struct BackupArgs {
    /// Data dir of the coordinator to back up.
    #[arg(long, env = "TABGRID_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// The tar file to write (replaced whole when the copy is complete).
    #[arg(long)]
    to: PathBuf,
}

#[derive(Args)]
struct ClientArgs {
    /// Coordinator URL.
    #[arg(long, env = "TABGRID_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Your token (submitter or admin).
    #[arg(long, env = "TABGRID_TOKEN", hide_env_values = true)]
    token: String,
}

#[derive(Args)]
struct SubmitArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// A, an m×k matrix (.npy, C order, float32 or float64).
    a: PathBuf,
    /// B, a k×n matrix (.npy).
    b: PathBuf,
    /// C, an m×n matrix (.npy) scaled by beta and added.
    #[arg(long)]
    c: Option<PathBuf>,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    alpha: f64,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    beta: f64,
    /// f32 or f64 (default: the dtype of A's file).
    #[arg(long)]
    dtype: Option<String>,
    /// Higher runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    #[arg(long)]
    name: Option<String>,
    /// Wait for the job with a progress bar.
    #[arg(long)]
    wait: bool,
    /// Where to write the result (.npy); implies --wait.
    #[arg(short, long)]
    output: Option<PathBuf>,
}

#[derive(Args)]
struct JobArgs {
    #[command(flatten)]
    client: ClientArgs,
    id: String,
}

#[derive(Args)]
struct ResultArgs {
    #[command(flatten)]
    client: ClientArgs,
    id: String,
    /// Write the result as .npy here instead of JSON to stdout.
    #[arg(short, long)]
    output: Option<PathBuf>,
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s)
        .ok_or_else(|| format!("unknown role {s:?}: expected admin, submitter or volunteer"))
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("expected on or off, not {other:?}")),
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 512MiB"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?}")),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(err) = dispatch(cli.command).await {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => serve(args.server, 0, None).await,
        Command::Cluster(args) => serve(args.server, args.workers, args.threads).await,
        Command::Token(args) => {
            let secret = std::env::var("TABGRID_JWT_SECRET").ok();
            let (secret, created) = match &args.database_url {
                Some(url) => database_secret(url, secret)
                    .await
                    .context("reading the secret from the database")?,
                None => Secret::load_or_create(secret, &args.data_dir)?,
            };
            if created {
                match &args.database_url {
                    Some(_) => eprintln!("created a new secret in the database"),
                    None => eprintln!("created a new secret in {}", args.data_dir.display()),
                }
            }
            println!(
                "{}",
                Keys::new(&secret).mint(&args.subject, args.role, args.ttl)
            );
            Ok(())
        }
        Command::Backup(args) => {
            let summary = tabgrid_coordinator::store::sqlite::backup(&args.data_dir, &args.to)
                .with_context(|| format!("backing up {}", args.data_dir.display()))?;
            println!(
                "wrote {} ({} jobs, {} bytes); restore with: mkdir NEW_DIR && tar -xf {} -C NEW_DIR",
                args.to.display(),
                summary.jobs,
                summary.bytes,
                args.to.display()
            );
            Ok(())
        }
        Command::Submit(args) => submit(args).await,
        Command::Status(args) => {
            let client = Client::new(&args.client.url, &args.client.token)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&client.status(&args.id).await?)?
            );
            Ok(())
        }
        Command::Jobs(args) => {
            let client = Client::new(&args.url, &args.token)?;
            println!("{}", serde_json::to_string_pretty(&client.list().await?)?);
            Ok(())
        }
        Command::Cancel(args) => {
            let client = Client::new(&args.client.url, &args.client.token)?;
            client.delete(&args.id).await?;
            println!("job {} cancelled and deleted", args.id);
            Ok(())
        }
        Command::Result(args) => {
            let client = Client::new(&args.client.url, &args.client.token)?;
            match args.output {
                Some(path) => {
                    let bytes = client.result_npy(&args.id).await?;
                    write_file(&path, &bytes)?;
                    println!("wrote {}", path.display());
                }
                None => println!("{}", client.result_json(&args.id).await?),
            }
            Ok(())
        }
    }
}

fn write_file(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

async fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client.url, &args.client.token)?;
    let reply = client
        .submit(&Submission {
            a: &args.a,
            b: &args.b,
            c: args.c.as_deref(),
            dtype: args.dtype,
            alpha: args.alpha,
            beta: args.beta,
            priority: args.priority,
            name: args.name,
        })
        .await?;
    let id = reply["id"]
        .as_str()
        .context("the coordinator's reply has no job id")?
        .to_owned();
    if !(args.wait || args.output.is_some()) {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(());
    }
    eprintln!("job {id}: {} tiles", reply["tiles_total"]);
    let last = client.wait(&id, true).await?;
    let state = last["state"].as_str().unwrap_or("unknown");
    if state != "done" {
        anyhow::bail!(
            "job {id} ended {state}: {}",
            last["error"].as_str().unwrap_or("no reason given")
        );
    }
    match args.output {
        Some(path) => {
            let bytes = client.result_npy(&id).await?;
            write_file(&path, &bytes)?;
            println!("job {id} done; wrote {}", path.display());
        }
        None => println!("job {id} done"),
    }
    Ok(())
}

/// Runs a coordinator, plus `workers` native workers in-process for `cluster`.
async fn serve(args: ServerArgs, workers: usize, threads: Option<usize>) -> anyhow::Result<()> {
    let env_secret = std::env::var("TABGRID_JWT_SECRET").ok();
    let (secret, created) = match &args.database_url {
        Some(url) => database_secret(url, env_secret)
            .await
            .context("connecting to the database (--database-url)")?,
        None => Secret::load_or_create(env_secret, &args.data_dir)?,
    };
    let config = ServeConfig {
        max_body: usize::try_from(args.max_body).unwrap_or(usize::MAX),
        max_job_bytes: args.max_job_size,
        max_conns_per_address: args.max_conns_per_address,
        max_conns_per_subject: args.max_conns_per_subject,
        heartbeat_secs: args.heartbeat_secs.max(1),
        tile_edge: args.tile_edge.max(1),
        volunteers: args.volunteers,
        ..ServeConfig::default()
    };
    let site = Site::load(&args.www, args.isolation)?;
    if !site.has_page() {
        tracing::warn!(
            www = %args.www.display(),
            "no volunteer page there: browsers get an explanation instead (see --www)"
        );
    } else if !site.has_bundles() {
        tracing::warn!(
            www = %args.www.display(),
            "the volunteer page has no WebAssembly bundles: run `cargo xtask wasm` and restart"
        );
    }
    let scheduler = SchedulerConfig {
        lease_floor_ms: args.lease_floor_ms,
        ..SchedulerConfig::default()
    };
    let mut shared = None;
    let store: Arc<dyn Store> = match (&args.database_url, args.store) {
        (Some(url), _) => {
            let name = format!(
                "coordinator-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            );
            let (url, named) = (url.clone(), name.clone());
            let store = Arc::new(
                tokio::task::spawn_blocking(move || PgStore::open(&url, &named))
                    .await?
                    .context("opening the store in the database")?,
            );
            tracing::info!("sharing the database with other coordinators as {name}");
            shared = Some(store.clone());
            store
        }
        (None, StoreKind::Sqlite) => Arc::new(
            SqliteStore::open(
                &args.data_dir,
                SqliteOptions {
                    quota: args.disk_quota,
                },
            )
            .with_context(|| format!("opening the store in {}", args.data_dir.display()))?,
        ),
        (None, StoreKind::Memory) => Arc::new(MemoryStore::new()),
    };
    let coordinator = Coordinator::new(store.clone(), &secret, config, scheduler).with_site(site);
    let claims = match shared {
        // Jobs are taken up from the database as their tiles are claimed.
        Some(store) => Some(
            Claims::start(
                coordinator.state.grid.clone(),
                store,
                ClaimConfig {
                    ttl: args.claim_ttl.max(Duration::from_millis(200)),
                    ..ClaimConfig::default()
                },
            )
            .context("starting the claims loop")?,
        ),
        None => {
            let (jobs, tiles) = coordinator
                .state
                .grid
                .resume()
                .context("resuming unfinished jobs")?;
            if jobs > 0 {
                tracing::info!(jobs, tiles, "resumed unfinished jobs");
            }
            None
        }
    };
    let keys = coordinator.state.keys.clone();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(_), Some(_)) if workers > 0 => anyhow::bail!(
            "cluster's own workers connect over plain ws; use `serve` for --tls-cert/--tls-key"
        ),
        (Some(cert), Some(key)) => Some(tabgrid_coordinator::tls::acceptor(cert, key)?),
        _ => None,
    };
    let url = format!("{}://{addr}", if tls.is_some() { "https" } else { "http" });
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "tabgrid listening on {url}")?;
        if created || workers > 0 {
            let token = keys.mint("admin", Role::Admin, Duration::from_secs(24 * 3600));
            let why = if created {
                "new secret; shown once"
            } else {
                "valid 24h"
            };
            writeln!(out, "admin token ({why}):\n{token}")?;
            writeln!(out, "try: export TABGRID_URL={url} TABGRID_TOKEN={token}")?;
        }
        out.flush()?;
    }
    let (stop_workers, _) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    if workers > 0 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = threads.unwrap_or(cores.checked_div(workers).unwrap_or(1).max(1));
        for n in 0..workers {
            let token = keys.mint(
                &format!("cluster-worker-{n}"),
                Role::Volunteer,
                Duration::from_secs(365 * 24 * 3600),
            );
            let config = tabgrid_worker::WorkerConfig::new(vec![url.clone()], Some(token), threads);
            let mut stop = stop_workers.subscribe();
            tasks.push(tokio::spawn(async move {
                let shutdown = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                if let Err(err) = tabgrid_worker::run(config, shutdown).await {
                    tracing::error!(error = format!("{err:#}"), "worker stopped");
                }
            }));
        }
        tracing::info!(workers, threads, "native workers started");
    }
    coordinator
        .serve(listener, tls, shutdown_signal())
        .await
        .context("serving")?;
    let _ = stop_workers.send(true);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    store.flush().context("writing the store's last changes")?;
    if let Some(claims) = claims {
        // Other coordinators take the unfinished tiles at once instead of after the TTL.
        tokio::task::spawn_blocking(move || claims.stop()).await?;
    }
    Ok(())
}

/// The JWT secret of coordinators sharing the database at `url` (the client blocks: off
/// the async runtime).
async fn database_secret(url: &str, env: Option<String>) -> anyhow::Result<(Secret, bool)> {
    let url = url.to_owned();
    Ok(tokio::task::spawn_blocking(move || postgres::shared_secret(&url, env)).await??)
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}
