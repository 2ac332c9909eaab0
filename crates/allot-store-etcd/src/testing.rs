//! A throw-away etcd server for tests (feature `testing`).
//!
//! [`EtcdServer::start`] runs the installed `etcd` (Debian's `etcd-server`
//! package puts it in `/usr/bin`; `ALLOT_ETCD_BIN` names another binary) as
//! a single-member cluster in a temporary directory, on free loopback client
//! and peer ports, and waits until it answers `/health`. A missing binary is
//! an error saying how to install it: tests that need etcd fail, they never
//! skip.
//!
//! For outage tests, [`EtcdServer::kill`] stops it with SIGKILL and
//! [`EtcdServer::restart`] starts it again on the same ports and data
//! directory.
//!
//! Cleanup: dropping an [`EtcdServer`] kills the server and removes its
//! directory. A small guardian shell process also waits on a pipe from the
//! test process and does the same when the pipe closes, so that a server
//! whose test process died does not outlive it.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{EtcdOptions, EtcdStore};

const INSTALL_HINT: &str = "install etcd with `apt-get install etcd-server` \
     (or point ALLOT_ETCD_BIN at an etcd binary)";

/// How long a server may take to start answering.
const STARTUP: Duration = Duration::from_secs(60);

/// The most operations one transaction may hold on the test server: the
/// conformance suite writes 1,001 keys in one transaction (etcd's default
/// is 128).
pub const MAX_TXN_OPS: u32 = 10_000;

/// An etcd server running in a temporary directory.
#[derive(Debug)]
pub struct EtcdServer {
    root: PathBuf,
    bin: PathBuf,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    guardian: Option<Child>,
}

impl EtcdServer {
    /// Starts a new single-member cluster with an empty data directory
    /// (revision 1). Blocking (a second or so).
    pub fn start() -> Result<EtcdServer, String> {
        let bin = find_bin()?;
        let root = tempfile::Builder::new()
            .prefix("allot-etcd-")
            .tempdir()
            .map_err(|e| format!("creating a temporary directory: {e}"))?
            .keep();
        let mut server = EtcdServer {
            root,
            bin,
            client_port: 0,
            peer_port: 0,
            child: None,
            guardian: None,
        };
        // From here on, dropping `server` cleans up.
        server.guardian = Some(spawn_guardian(&server.root)?);
        // A free port can be taken by someone else before etcd binds it:
        // try a few, each time with a fresh data directory.
        let mut last_error = String::new();
        for _ in 0..3 {
            server.client_port = free_port()?;
            server.peer_port = free_port()?;
            let _ = std::fs::remove_dir_all(server.data_dir());
            match server.spawn_and_wait() {
                Ok(()) => return Ok(server),
                Err(err) => last_error = err,
            }
        }
        Err(last_error)
    }

    /// The client endpoint, `127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// The client endpoints, as [`EtcdStore::connect`] takes them.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }

    /// Kills the server with SIGKILL, as a crash or a `kill -9` would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same data directory and ports (after
    /// [`EtcdServer::kill`]), waiting until it answers.
    pub fn restart(&mut self) -> Result<(), String> {
        if self.child.is_some() {
            return Err("the server is still running".into());
        }
        let deadline = Instant::now() + STARTUP;
        // The killed server's ports may take a moment to be free again.
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return Ok(()),
                Err(err) if Instant::now() > deadline => return Err(err),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("etcd.log")).unwrap_or_default()
    }

    fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("etcd.log"))
            .map_err(|e| format!("opening the server log: {e}"))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("opening the server log: {e}"))?;
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--name=allot-test")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=allot-test={peer}"))
            .arg("--initial-cluster-state=new")
            .arg(format!("--max-txn-ops={MAX_TXN_OPS}"))
            // A single member elects itself quickly after a restart.
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Not in the test's process group: a Ctrl-C of the tests is
            // handled by the guardian.
            .process_group(0);
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.bin.display()))?;
        let _ = std::fs::write(self.root.join("etcd.pid"), child.id().to_string());
        self.child = Some(child);
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "etcd exited during startup ({status}); its log:\n{}",
                        self.log()
                    ));
                }
            }
            if healthy(self.client_port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!(
                    "etcd did not answer within {STARTUP:?}; its log:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        // Killed first, so it does not race us at the cleanup below.
        if let Some(mut guardian) = self.guardian.take() {
            let _ = guardian.kill();
            let _ = guardian.wait();
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// True if etcd on `port` reports itself healthy (it has a leader).
fn healthy(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.contains("\"health\":\"true\"")
}

/// A shell that waits for its standard input (a pipe from this process) to
/// close, then kills the server and removes the directory: the cleanup of
/// last resort when this process exits without dropping the server.
fn spawn_guardian(root: &Path) -> Result<Child, String> {
    const SCRIPT: &str = r#"trap '' INT TERM HUP
read _ignored
pid=$(cat "$1/etcd.pid" 2>/dev/null)
if [ -n "$pid" ]; then kill -9 "$pid" 2>/dev/null; sleep 0.2; fi
rm -rf "$1""#;
    Command::new("sh")
        .args(["-c", SCRIPT, "allot-etcd-guardian"])
        .arg(root)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting the cleanup guardian (sh): {e}"))
}

fn find_bin() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("ALLOT_ETCD_BIN") {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!(
                "ALLOT_ETCD_BIN={} is not a file: {INSTALL_HINT}",
                bin.display()
            ))
        };
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join("etcd"))
        .find(|bin| bin.is_file())
        .ok_or_else(|| format!("the etcd server binary was not found: {INSTALL_HINT}"))
}

fn free_port() -> Result<u16, String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("finding a free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port: {e}"))
}

/// Starts a server off the async runtime's threads, panicking with the
/// reason if it cannot.
pub async fn start_server() -> EtcdServer {
    match tokio::task::spawn_blocking(EtcdServer::start).await {
        Ok(Ok(server)) => server,
        Ok(Err(err)) => panic!("no etcd server for the tests: {err}"),
        Err(err) => panic!("starting etcd: {err}"),
    }
}

/// A fresh, empty store (revision 1) on a server of its own, with the given
/// history bounds; the server lives as long as the returned guard. Panics,
/// with the reason, if no server can be started.
pub async fn fresh_store(revisions: u64, events: u64) -> (EtcdStore, EtcdServer) {
    let server = start_server().await;
    let options = EtcdOptions {
        history_revisions: revisions,
        history_events: events,
        ..EtcdOptions::default()
    };
    match EtcdStore::connect(&server.endpoints(), options).await {
        Ok(store) => (store, server),
        Err(err) => panic!(
            "connecting to the test server at {}: {err}",
            server.endpoint()
        ),
    }
}

/// The shared outage scenario (`allot_store::conformance::outage_and_reconnect`)
/// crashes and restarts this server.
impl allot_store::conformance::Crashable for EtcdServer {
    fn kill(&mut self) {
        EtcdServer::kill(self);
    }
    fn restart(&mut self) -> Result<(), String> {
        EtcdServer::restart(self)
    }
}
