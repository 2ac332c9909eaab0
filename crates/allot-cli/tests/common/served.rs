//! `allot serve` as a child process, and the REST calls tests make on it.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::allot;

/// A running `allot serve` child.
pub struct Served {
    child: Child,
    /// `http://ADDR` of the server.
    pub base: String,
    /// The listening line.
    pub line: String,
    stderr: PathBuf,
}

/// Starts `allot serve` (args after `serve`, `--listen 127.0.0.1:0` added
/// unless given) and waits for its listening line.
pub fn serve(dir: &Path, global: &[&str], args: &[&str], envs: &[(&str, &str)]) -> Served {
    let stderr = dir.join(format!(
        "serve-{}.log",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let mut cmd = allot(dir);
    cmd.args(global).arg("serve").args(args);
    if !args.contains(&"--listen") && !envs.iter().any(|(k, _)| *k == "ALLOT_LISTEN") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(line)) => line,
        other => {
            let _ = child.kill();
            panic!(
                "no listening line ({other:?}); stderr: {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
    };
    let addr = line
        .strip_prefix("allot serving on http://")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line: {line}"));
    Served {
        base: format!("http://{addr}"),
        child,
        line,
        stderr,
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // A failed test must not leave a server behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: sending a signal to our own child process.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// Waits (at most 30 s) for the process to exit; returns its code.
    pub fn wait(mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let log = std::fs::read_to_string(&self.stderr).unwrap_or_default();
                return (status.code(), log);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("allot serve did not exit in time");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then asserts a clean exit 0.
    pub fn stop(self) {
        self.signal(libc::SIGTERM);
        let (code, log) = self.wait();
        assert_eq!(code, Some(0), "stderr: {log}");
        assert!(log.contains("stopped"), "{log}");
    }

    /// Waits for /readyz to answer 200.
    pub async fn ready(&self, client: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(format!("{}/readyz", self.base)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "never ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub async fn post(
    client: &reqwest::Client,
    url: String,
    body: Value,
) -> reqwest::Result<(u16, Value)> {
    let r = client.post(url).json(&body).send().await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await?))
}

pub async fn get(client: &reqwest::Client, url: String) -> (u16, Value) {
    let r = client.get(url).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Every claim of a pool, all pages.
pub async fn all_claims(client: &reqwest::Client, base: &str, pool: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = String::new();
    loop {
        let url = if after.is_empty() {
            format!("{base}/v1/pools/{pool}/claims?limit=1000")
        } else {
            format!("{base}/v1/pools/{pool}/claims?limit=1000&after={after}")
        };
        let (status, page) = get(client, url).await;
        assert_eq!(status, 200, "{page}");
        out.extend(page["claims"].as_array().unwrap().iter().cloned());
        match page["next"].as_str() {
            Some(n) => after = n.to_string(),
            None => return out,
        }
    }
}

/// Checks that every acknowledged (key, value) is held with that value and
/// that no value or key appears twice.
pub async fn check_acked(client: &reqwest::Client, base: &str, acked: &HashMap<String, String>) {
    let claims = all_claims(client, base, "ids").await;
    let mut values = HashSet::new();
    let mut by_key = HashMap::new();
    for c in &claims {
        let v = c["value"].as_str().unwrap().to_string();
        assert!(values.insert(v.clone()), "value {v} held twice");
        let k = c["key"].as_str().unwrap().to_string();
        assert!(by_key.insert(k.clone(), v).is_none(), "key {k} twice");
    }
    for (k, v) in acked {
        assert_eq!(by_key.get(k), Some(v), "acknowledged claim {k}={v} lost");
    }
}

pub fn create_ids_pool() -> Value {
    json!({"name": "ids", "kind": {"type": "range", "lo": 1, "hi": 1000000}})
}
