//! A throw-away PostgreSQL server for tests (feature `testing`).
//!
//! [`PgServer::start`] runs the installed `initdb` and `postgres` (the
//! newest under `/usr/lib/postgresql/*/bin`, or the directory named by
//! `ALLOT_PG_BIN`) in a temporary directory, on a free loopback port, with
//! fsync on, and waits until the server accepts connections. A missing
//! binary or user is an error saying how to install it: tests that need
//! PostgreSQL fail, they never skip.
//!
//! PostgreSQL refuses to run as root; when the tests do (as in CI
//! containers), the server runs as the `postgres` user, which owns the
//! temporary directory.
//!
//! Cleanup: dropping a [`PgServer`] stops the server and removes its
//! directory. A small guardian shell process also waits on a pipe from the
//! test process and does the same when the pipe closes, so that a server
//! shared by a whole test binary ([`shared_server`], never dropped) or one
//! whose test process was killed does not outlive it.

use std::fs::OpenOptions;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{PostgresOptions, PostgresStore};

const INSTALL_HINT: &str = "install PostgreSQL with `apt-get install postgresql-15` \
     (or point ALLOT_PG_BIN at a directory holding initdb and postgres)";

/// How long a server may take to start accepting connections.
const STARTUP: Duration = Duration::from_secs(60);

/// A PostgreSQL server running in a temporary directory.
#[derive(Debug)]
pub struct PgServer {
    root: PathBuf,
    data: PathBuf,
    bin: PathBuf,
    port: u16,
    /// `(uid, gid)` to run as, when the tests run as root.
    owner: Option<(u32, u32)>,
    postmaster: Option<Child>,
    guardian: Option<Child>,
}

impl PgServer {
    /// Initializes a new cluster in a temporary directory, starts it and
    /// creates the database `allot`. Blocking (a second or two).
    pub fn start() -> Result<PgServer, String> {
        let bin = find_bin_dir()?;
        let owner = server_owner()?;
        let root = tempfile::Builder::new()
            .prefix("allot-pg-")
            .tempdir()
            .map_err(|e| format!("creating a temporary directory: {e}"))?
            .keep();
        let mut server = PgServer {
            data: root.join("data"),
            root,
            bin,
            port: 0,
            owner,
            postmaster: None,
            guardian: None,
        };
        // From here on, dropping `server` cleans up.
        server.guardian = Some(spawn_guardian(&server.root)?);
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&server.root, Some(uid), Some(gid))
                .map_err(|e| format!("handing {} to postgres: {e}", server.root.display()))?;
        }
        let output = server
            .command("initdb")
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
            ])
            // Syncing the fresh files only slows tests down; the server
            // itself runs with fsync on.
            .args(["--no-sync", "--no-instructions", "-D"])
            .arg(&server.data)
            .output()
            .map_err(|e| format!("running initdb: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "initdb failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        // A free port can be taken by someone else before the server binds
        // it: try a few.
        let mut last_error = String::new();
        for _ in 0..3 {
            server.port = free_port()?;
            match server.spawn_and_wait() {
                Ok(()) => {
                    server.create_database()?;
                    return Ok(server);
                }
                Err(err) => last_error = err,
            }
        }
        Err(last_error)
    }

    /// The TCP port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of the database `allot`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/allot", self.port)
    }

    /// Kills the server and every one of its processes with SIGKILL, as a
    /// crash or an `kill -9` of the whole container would.
    ///
    /// PostgreSQL makes every child of the postmaster (backends, WAL writer,
    /// checkpointer, ...) the leader of its own session (`setsid`), so
    /// killing the postmaster's process group alone leaves them running:
    /// a backend fed requests back to back would go on committing for a
    /// while. So the postmaster is stopped first (it forks no more), then
    /// each child is killed, then the postmaster's group.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.postmaster.take() {
            let pid = child.id() as libc::pid_t;
            // SAFETY: kill(2) has no memory effects; `pid` is our child
            // (not reaped yet, so the id cannot have been reused), and the
            // others are its children, found just now while it is stopped.
            unsafe {
                libc::kill(pid, libc::SIGSTOP);
            }
            for grandchild in children_of(pid) {
                // SAFETY: as above.
                unsafe {
                    libc::kill(-grandchild, libc::SIGKILL);
                    libc::kill(grandchild, libc::SIGKILL);
                }
            }
            signal_group(&child, libc::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same data directory and port (after
    /// [`PgServer::kill`] or [`PgServer::stop`]), waiting until it accepts
    /// connections; after a kill it first recovers from its WAL.
    pub fn restart(&mut self) -> Result<(), String> {
        if self.postmaster.is_some() {
            return Err("the server is still running".into());
        }
        let deadline = Instant::now() + STARTUP;
        // The killed server's processes may take a moment to release the
        // port and shared memory.
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return Ok(()),
                Err(err) if Instant::now() > deadline => return Err(err),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Stops the server (fast shutdown: open sessions are disconnected).
    pub fn stop(&mut self) {
        let Some(mut child) = self.postmaster.take() else {
            return;
        };
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGINT);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        signal_group(&child, libc::SIGKILL);
        let _ = child.wait();
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("postgres.log")).unwrap_or_default()
    }

    /// A command running one of the server binaries, as the server's owner.
    fn command(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(name));
        // The owner may not be allowed into the test's working directory.
        cmd.current_dir(&self.root);
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("postgres.log"))
            .map_err(|e| format!("opening the server log: {e}"))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("opening the server log: {e}"))?;
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(&self.root)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=on"])
            .args(["-c", "max_connections=300"])
            .args(["-c", "shared_buffers=64MB"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Its own process group, so that kill() reaches every backend.
            .process_group(0);
        let child = cmd.spawn().map_err(|e| format!("starting postgres: {e}"))?;
        self.postmaster = Some(child);
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(child) = self.postmaster.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.postmaster = None;
                    return Err(format!(
                        "postgres exited during startup ({status}); its log:\n{}",
                        self.log()
                    ));
                }
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args([
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-t",
                    "1",
                    "-p",
                    &self.port.to_string(),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(|e| format!("running pg_isready: {e}"))?;
            if ready.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!(
                    "postgres did not accept connections within {STARTUP:?}; its log:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn create_database(&self) -> Result<(), String> {
        let output = Command::new(self.bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-p",
                &self.port.to_string(),
            ])
            .arg("allot")
            .output()
            .map_err(|e| format!("running createdb: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "createdb failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(())
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // Killed first, so it does not race us at the cleanup below.
        if let Some(mut guardian) = self.guardian.take() {
            let _ = guardian.kill();
            let _ = guardian.wait();
        }
        self.stop();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The processes whose parent is `pid`, from `/proc/*/stat`.
fn children_of(pid: libc::pid_t) -> Vec<libc::pid_t> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children = Vec::new();
    for entry in dir.flatten() {
        let Some(id) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<libc::pid_t>().ok());
        if ppid == Some(pid) {
            children.push(id);
        }
    }
    children
}

/// Sends `signal` to the process group led by `child`.
fn signal_group(child: &Child, signal: libc::c_int) {
    // SAFETY: kill(2) has no memory effects; the group is our child's own
    // (`process_group(0)`), so nothing else is hit.
    unsafe {
        libc::kill(-(child.id() as libc::pid_t), signal);
    }
}

/// A shell that waits for its standard input (a pipe from this process) to
/// close, then kills the server's process group and removes the directory:
/// the cleanup of last resort when this process exits without dropping the
/// server (a static, a panic that aborts, a SIGKILL).
fn spawn_guardian(root: &Path) -> Result<Child, String> {
    const SCRIPT: &str = r#"trap '' INT TERM HUP
read _ignored
pid=$(head -n 1 "$1/data/postmaster.pid" 2>/dev/null)
if [ -n "$pid" ]; then kill -9 "-$pid" 2>/dev/null; sleep 0.5; fi
rm -rf "$1""#;
    Command::new("sh")
        .args(["-c", SCRIPT, "allot-pg-guardian"])
        .arg(root)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Not in our group: a Ctrl-C of the tests must not skip cleanup.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting the cleanup guardian (sh): {e}"))
}

fn find_bin_dir() -> Result<PathBuf, String> {
    let has_binaries = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("ALLOT_PG_BIN") {
        let dir = PathBuf::from(dir);
        return if has_binaries(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "ALLOT_PG_BIN={} holds no initdb and postgres: {INSTALL_HINT}",
                dir.display()
            ))
        };
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            has_binaries(&bin).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).ok_or_else(|| {
        format!(
            "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: {INSTALL_HINT}"
        )
    })
}

/// The user the server runs as: `None` (ourselves) unless we are root,
/// whom PostgreSQL refuses; then the `postgres` user.
fn server_owner() -> Result<Option<(u32, u32)>, String> {
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let id = |flag: &str| -> Result<u32, String> {
        let output = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .map_err(|e| format!("running id: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "the tests run as root, which PostgreSQL refuses, and there is no `postgres` \
                 user to run it as: {INSTALL_HINT} (it creates that user)"
            ));
        }
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .map_err(|e| format!("reading the postgres user's id: {e}"))
    };
    Ok(Some((id("-u")?, id("-g")?)))
}

fn free_port() -> Result<u16, String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("finding a free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port: {e}"))
}

/// Starts a server of its own off the async runtime's threads, panicking
/// with the reason if it cannot.
pub async fn start_server() -> PgServer {
    match tokio::task::spawn_blocking(PgServer::start).await {
        Ok(Ok(server)) => server,
        Ok(Err(err)) => panic!("no PostgreSQL server for the tests: {err}"),
        Err(err) => panic!("starting PostgreSQL: {err}"),
    }
}

static SHARED: OnceLock<Result<PgServer, String>> = OnceLock::new();

/// One server for the whole test binary, started on first use (blocking)
/// and cleaned up by its guardian when the process exits.
pub fn shared_server() -> Result<&'static PgServer, String> {
    SHARED
        .get_or_init(PgServer::start)
        .as_ref()
        .map_err(Clone::clone)
}

/// The connection settings a store opened on `url` with default options
/// uses for each of its sessions (the same as [`PostgresStore::connect`]
/// builds), so that a test can open such a session and look at it.
pub fn session_config(url: &str) -> Result<tokio_postgres::Config, String> {
    crate::pg_config(url, PostgresOptions::default().timeout).map_err(|e| e.to_string())
}

/// A schema name no other test of this process uses.
pub fn unique_schema() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "t{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A fresh, empty store in its own schema of the shared server, with the
/// given history bounds; also returns the schema name (to open more stores
/// on the same data). Panics, with the reason, if no server can be started.
pub async fn fresh_store(revisions: u64, events: u64) -> (PostgresStore, String) {
    let url = match tokio::task::spawn_blocking(|| shared_server().map(PgServer::url)).await {
        Ok(Ok(url)) => url,
        Ok(Err(err)) => panic!("no PostgreSQL server for the tests: {err}"),
        Err(err) => panic!("starting PostgreSQL: {err}"),
    };
    let schema = unique_schema();
    let options = PostgresOptions {
        schema: schema.clone(),
        history_revisions: revisions,
        history_events: events,
        ..PostgresOptions::default()
    };
    match PostgresStore::connect(&url, options).await {
        Ok(store) => (store, schema),
        Err(err) => panic!("connecting to the test server at {url}: {err}"),
    }
}

/// The shared outage scenario (`allot_store::conformance::outage_and_reconnect`)
/// crashes and restarts this server.
impl allot_store::conformance::Crashable for PgServer {
    fn kill(&mut self) {
        PgServer::kill(self);
    }
    fn restart(&mut self) -> Result<(), String> {
        PgServer::restart(self)
    }
}
