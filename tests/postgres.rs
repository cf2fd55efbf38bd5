//! A throwaway PostgreSQL server for tests and benchmarks: `initdb` in a temp dir (as a
//! non-root user when run as root, as PostgreSQL requires), a free port on 127.0.0.1, its
//! socket in the temp dir, stopped and removed when dropped. No test depends on a server
//! already running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::Lines;

/// A running PostgreSQL server of its own.
pub struct Postgres {
    child: Child,
    bin: PathBuf,
    port: u16,
    /// Removed after the server stops (declared after `child`, dropped in `Drop`).
    dir: Option<tempfile::TempDir>,
    _log: Lines,
}

/// The folder holding `initdb`, `postgres` and `psql`: `TABGRID_PG_BIN`, else the newest
/// Debian install (`/usr/lib/postgresql/N/bin`, not on PATH), else PATH.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TABGRID_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .find(|dir| dir.join("initdb").exists())
        .expect("PostgreSQL is not installed: `apt-get install postgresql` (`.ci/run` does)")
}

/// The user and group to run PostgreSQL as: ourselves, or when we are root (which
/// PostgreSQL refuses) the `postgres` user Debian's package creates, else `nobody`.
fn run_as() -> Option<(u32, u32)> {
    let id = |args: &[&str]| -> Option<u32> {
        let out = Command::new("id").args(args).output().ok()?;
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    };
    if id(&["-u"])? != 0 {
        return None;
    }
    match (id(&["-u", "postgres"]), id(&["-g", "postgres"])) {
        (Some(uid), Some(gid)) => Some((uid, gid)),
        _ => Some((65534, 65534)),
    }
}

fn command(program: &Path, user: Option<(u32, u32)>) -> Command {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(program);
    if let Some((uid, gid)) = user {
        command.uid(uid).gid(gid);
    }
    command.env("LC_ALL", "C").env_remove("PGDATA");
    command
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Postgres {
    /// Creates a cluster in a fresh temp dir and starts it; returns once it accepts
    /// connections. Durability settings are PostgreSQL's defaults unless `fast` (tests:
    /// no fsync, as nothing outlives them).
    pub async fn start(fast: bool) -> Postgres {
        let bin = bin_dir();
        let user = run_as();
        let dir = tempfile::Builder::new()
            .prefix("tabgrid-pg-")
            .tempdir()
            .expect("a temp dir");
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown temp dir");
        }
        let data = dir.path().join("data");
        let out = command(&bin.join("initdb"), user)
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "tabgrid",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-instructions",
            ])
            .args(fast.then_some("--no-sync"))
            .output()
            .expect("running initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let mut server = command(&bin.join("postgres"), user);
        server
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=200",
            ]);
        if fast {
            server.args(["-c", "fsync=off", "-c", "full_page_writes=off"]);
        }
        let mut child = server
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting postgres");
        let log = Lines::follow(child.stderr.take().unwrap(), "postgres");
        log.wait_for("ready to accept connections", 1).await;
        Postgres {
            child,
            bin,
            port,
            dir: Some(dir),
            _log: log,
        }
    }

    /// The URL coordinators take (`--database-url`).
    pub fn url(&self) -> String {
        format!("postgres://tabgrid@127.0.0.1:{}/postgres", self.port)
    }

    /// Creates database `name` and returns its URL (separate grids on one server).
    pub fn create_database(&self, name: &str) -> String {
        self.query(&format!("CREATE DATABASE {name}"));
        format!("postgres://tabgrid@127.0.0.1:{}/{name}", self.port)
    }

    /// Runs `sql` with psql; returns its rows, `|`-separated, one per line.
    pub fn query(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-U",
                "tabgrid",
                "-d",
                "postgres",
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .expect("running psql");
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_owned()
    }

    /// A one-number answer of `sql`.
    pub fn number(&self, sql: &str) -> i64 {
        let out = self.query(sql);
        out.parse()
            .unwrap_or_else(|_| panic!("{sql:?} answered {out:?}, not a number"))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown, then the folder goes.
        let _ = Command::new("kill")
            .args(["-QUIT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        drop(self.dir.take());
    }
}
