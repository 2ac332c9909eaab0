//! `allot --server URL`: every command through a child `allot serve`, with
//! output identical to the same command on a local data dir (compared
//! byte for byte, timestamps aside), the same one-line errors and exit
//! codes for bad input (which change nothing), the new flags
//! (--request-id, --parent-pool/--parent-value, pool list --label), and
//! `allot watch` printing events live and resuming across a server restart.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;

use common::{allot, assert_one_error_line, claim_values, lines, output, values, Out};

/// Lines of a child's stdout, read on a thread.
fn lines_of(child: &mut Child) -> Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A child `allot serve`.
struct Served {
    child: Child,
    base: String,
}

impl Served {
    /// Starts `allot serve` on `data` at `listen` (with `token` required if
    /// given) and waits for its listening line.
    fn start(dir: &Path, data: &Path, listen: &str, token: Option<&str>) -> Served {
        let mut cmd = allot(dir);
        cmd.args(["--data-dir", data.to_str().expect("utf-8")])
            .args(["serve", "--listen", listen])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(t) = token {
            cmd.env("ALLOT_TOKEN", t);
        }
        let mut child = cmd.spawn().expect("spawn allot serve");
        let rx = lines_of(&mut child);
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(e) => {
                let _ = child.kill();
                panic!("allot serve printed no listening line: {e}");
            }
        };
        let addr = line
            .strip_prefix("allot serving on http://")
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line: {line}"))
            .to_string();
        Served {
            child,
            base: format!("http://{addr}"),
        }
    }

    /// SIGTERM, then waits for a clean exit.
    fn stop(mut self) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: sending a signal to our own child process.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert_eq!(status.code(), Some(0));
                return;
            }
            assert!(Instant::now() < deadline, "allot serve did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        // A failed test must not leave a server behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch dir with a served data dir, and a local data dir to compare.
struct Env {
    dir: TempDir,
    served: Option<Served>,
    token: Option<String>,
}

impl Env {
    fn new() -> Env {
        Self::with_token(None)
    }

    fn with_token(token: Option<&str>) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let served = Served::start(dir.path(), &dir.path().join("served"), "127.0.0.1:0", token);
        Env {
            dir,
            served: Some(served),
            token: token.map(str::to_string),
        }
    }

    fn base(&self) -> String {
        self.served.as_ref().expect("a server").base.clone()
    }

    /// Runs `allot --server BASE args...` (the token from ALLOT_TOKEN), with
    /// a --data-dir that must stay untouched.
    fn remote(&self, args: &[&str]) -> Out {
        let mut cmd = allot(self.dir.path());
        cmd.args(["--server", &self.base(), "--data-dir", "untouched"])
            .args(args);
        if let Some(t) = &self.token {
            cmd.env("ALLOT_TOKEN", t);
        }
        let out = output(&mut cmd);
        assert!(
            !self.dir.path().join("untouched").exists(),
            "allot --server {args:?} touched the local data dir"
        );
        out
    }

    /// Runs `allot --data-dir LOCAL args...`.
    fn local(&self, args: &[&str]) -> Out {
        let data = self.dir.path().join("local");
        output(
            allot(self.dir.path())
                .args(["--data-dir", data.to_str().expect("utf-8")])
                .args(args),
        )
    }

    /// Runs `args` locally and remotely; asserts the same exit code,
    /// stdout (JSON timestamps aside) and stderr; returns the remote run.
    fn both(&self, args: &[&str]) -> Out {
        let local = self.local(args);
        let remote = self.remote(args);
        assert_eq!(
            (local.code, normalize(&local.stdout), &local.stderr),
            (remote.code, normalize(&remote.stdout), &remote.stderr),
            "allot {args:?}: local and remote differ"
        );
        remote
    }

    /// [`Env::both`], asserting success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.both(args);
        assert_eq!(out.code, 0, "allot {args:?} failed: {}", out.stderr);
        out.stdout
    }

    /// [`Env::ok`] with `--output json`, parsed.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--output", "json"]);
        let stdout = self.ok(&all);
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("allot {args:?}: not one JSON document ({e}): {stdout}"))
    }

    /// Every pool and claim through the server, as JSON text.
    fn snapshot(&self) -> String {
        let list = self.remote(&["pool", "list", "--output", "json"]);
        assert_eq!(list.code, 0, "{}", list.stderr);
        let pools: Value = serde_json::from_str(&list.stdout).expect("json");
        let mut snap = vec![pools.clone()];
        for p in pools.as_array().expect("array") {
            let name = p["name"].as_str().expect("name");
            let page = self.remote(&["claims", name, "--limit", "10000", "--output", "json"]);
            snap.push(serde_json::from_str(&page.stdout).expect("json"));
        }
        serde_json::to_string(&snap).expect("snapshot")
    }

    /// Asserts that `args` fails the same way locally and remotely: exit
    /// code 1, nothing on stdout, one `error:` line containing `needle`;
    /// and that nothing changed on the server.
    fn refused(&self, args: &[&str], needle: &str) -> String {
        let before = self.snapshot();
        let out = self.both(args);
        assert_eq!(out.code, 1, "allot {args:?} should fail: {out:?}");
        assert_one_error_line(&out);
        assert!(
            out.stderr.contains(needle),
            "allot {args:?}: expected '{needle}' in: {}",
            out.stderr
        );
        assert_eq!(before, self.snapshot(), "allot {args:?} changed state");
        out.stderr.trim_end().to_string()
    }

    /// Two pools with claims, on both sides.
    fn fixture() -> Env {
        let env = Env::new();
        env.ok(&[
            "pool",
            "create",
            "vlans",
            "--range",
            "100-199",
            "--reserve",
            "150-159",
        ]);
        env.ok(&["alloc", "vlans", "--count", "3"]);
        env.ok(&[
            "alloc",
            "vlans",
            "--key",
            "site-a",
            "--owner",
            "agent-1",
            "--meta",
            r#"{"site":"a"}"#,
        ]);
        env.ok(&["pool", "create", "hosts", "--cidr", "10.0.0.0/30"]);
        env.ok(&["alloc", "hosts"]);
        env
    }
}

/// Stdout with JSON creation timestamps blanked (they differ between the
/// two sides by construction).
fn normalize(stdout: &str) -> String {
    let mut out = String::new();
    for line in stdout.lines() {
        match line.trim_start().strip_prefix("\"created_ms\": ") {
            Some(_) => out.push_str("\"created_ms\": _"),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[test]
fn tour_matches_local_output() {
    let env = Env::new();
    let out = env.ok(&[
        "pool", "create", "vlans", "--range", "100-199", "--label", "team=net",
    ]);
    assert_eq!(
        out.trim(),
        "created pool vlans: integers 100-199 (100 values)"
    );
    assert_eq!(lines(&env.ok(&["alloc", "vlans"])), ["100"]);
    assert_eq!(
        lines(&env.ok(&["alloc", "vlans", "--count", "2"])),
        ["101", "102"]
    );
    assert_eq!(
        lines(&env.ok(&["alloc", "vlans", "--key", "k1", "--owner", "me"])),
        ["103"]
    );
    let show = env.ok(&["pool", "show", "vlans"]);
    for want in [
        "integers 100-199",
        "allocated:   4",
        "free:        96",
        "4.0%",
        "team=net",
    ] {
        assert!(show.contains(want), "pool show lacks '{want}':\n{show}");
    }
    let list = env.ok(&["pool", "list"]);
    let row: Vec<&str> = lines(&list)[1].split_whitespace().collect();
    assert_eq!(
        row,
        ["vlans", "integers", "100-199", "100", "4", "96", "4.0%"]
    );
    let lookup = env.ok(&["lookup", "vlans", "--key", "k1"]);
    assert!(
        lookup.contains("value:  103") && lookup.contains("owner:  me"),
        "{lookup}"
    );
    assert_eq!(
        env.ok(&["release", "vlans", "--value", "100"]).trim(),
        "released 100"
    );
    assert_eq!(
        env.ok(&["release", "vlans", "--key", "k1"]).trim(),
        "released 103 (key k1)"
    );
    let claims = env.ok(&["claims", "vlans", "--limit", "1"]);
    assert!(
        claims.contains("more: allot claims vlans --after 101"),
        "{claims}"
    );

    // JSON, and the other kinds.
    let info = env.json(&[
        "pool",
        "create",
        "hosts",
        "--cidr",
        "10.0.0.0/30",
        "--strategy",
        "next",
    ]);
    assert_eq!(info["spec"]["strategy"], "next");
    assert_eq!(values(&env.json(&["alloc", "hosts"])), ["10.0.0.1"]);
    assert_eq!(values(&env.json(&["alloc", "hosts"])), ["10.0.0.2"]);
    env.refused(&["alloc", "hosts"], "exhausted");
    let sub = env.json(&[
        "pool",
        "create",
        "subnets",
        "--cidr",
        "10.0.0.0/16",
        "--prefix-len",
        "24",
    ]);
    assert_eq!(sub["spec"]["kind"]["max_prefix_len"], 32);
    assert_eq!(values(&env.json(&["alloc", "subnets"])), ["10.0.0.0/24"]);
    assert_eq!(
        values(&env.json(&["alloc", "subnets", "--prefix-len", "26"])),
        ["10.0.1.0/26"]
    );
    env.ok(&["pool", "create", "colors", "--values", "red,green,blue"]);
    assert_eq!(
        values(&env.json(&["alloc", "colors", "--value", "blue"])),
        ["blue"]
    );
    let v6 = env.both(&[
        "pool",
        "create",
        "v6",
        "--cidr",
        "2001:db8::/64",
        "--output",
        "json",
    ]);
    assert!(
        v6.stdout.contains("\"size\": 18446744073709551616"),
        "{}",
        v6.stdout
    );

    // Keys are idempotent; lookups by value and key agree.
    let first = env.json(&[
        "alloc",
        "vlans",
        "--key",
        "site-a",
        "--owner",
        "agent-1",
        "--meta",
        r#"{"site":"a"}"#,
    ]);
    assert_eq!(values(&first), ["100"]);
    assert_eq!(
        values(&env.json(&["alloc", "vlans", "--key", "site-a"])),
        ["100"]
    );
    let c = env.json(&["lookup", "vlans", "--key", "site-a"]);
    assert_eq!(
        c,
        json!({"value": "100", "key": "site-a", "owner": "agent-1", "meta": {"site": "a"}, "stale": false})
    );
    assert_eq!(env.json(&["lookup", "vlans", "--value", "100"]), c);
    let page = env.json(&["claims", "vlans", "--limit", "2"]);
    assert_eq!(claim_values(&page), ["100", "101"]);
    assert_eq!(page["next"], "101");

    // Resync.
    env.ok(&["alloc", "vlans", "--key", "b", "--owner", "agent-1"]);
    let begun = env.json(&["resync", "begin", "vlans", "--owner", "agent-1"]);
    assert_eq!(begun["count"], 2);
    env.ok(&["alloc", "vlans", "--key", "site-a", "--owner", "agent-1"]);
    let human = env.ok(&["resync", "end", "vlans", "--owner", "agent-1"]);
    assert!(human.contains("released 1 stale claim(s)"), "{human}");
    assert!(human.contains("103 (key b)"), "{human}");
    env.refused(&["resync", "end", "vlans"], "no resync in progress");

    // Labels filter the list; delete needs --force while claims exist.
    let net = env.json(&["pool", "list", "--label", "team=net"]);
    assert_eq!(net.as_array().map(Vec::len), Some(1));
    assert_eq!(net[0]["name"], "vlans");
    assert_eq!(
        env.ok(&["pool", "list", "--label", "team=none"]).trim(),
        "no pools"
    );
    env.refused(&["pool", "delete", "vlans"], "--force");
    assert_eq!(
        env.ok(&["pool", "delete", "vlans", "--force"]).trim(),
        "deleted pool vlans"
    );
    assert_eq!(
        env.json(&["pool", "delete", "colors", "--force"]),
        json!({"deleted": "colors"})
    );
    // The whole state ends up the same on both sides.
    let list = |out: Out| normalize(&out.stdout);
    let args = ["pool", "list", "--output", "json"];
    assert_eq!(list(env.local(&args)), list(env.remote(&args)));
}

#[test]
fn bad_input_fails_the_same_way_and_changes_nothing() {
    let env = Env::fixture();
    let cases: &[(&[&str], &str)] = &[
        (
            &["pool", "create", "net", "--cidr", "10.0.0.300/24"],
            "is not a CIDR",
        ),
        (
            &["pool", "create", "net", "--cidr", "10.0.0.1/24"],
            "host bits",
        ),
        (&["pool", "create", "r", "--range", "200-100"], "inverted"),
        (&["pool", "create", "r", "--range", "a-b"], "expected LO-HI"),
        (
            &["pool", "create", "vlans", "--range", "1-10"],
            "already exists",
        ),
        (
            &[
                "pool",
                "create",
                "b",
                "--range",
                "1-10",
                "--block-size",
                "1000",
            ],
            "power of two",
        ),
        (
            &[
                "pool", "create", "l", "--range", "1-10", "--label", "novalue",
            ],
            "KEY=VALUE",
        ),
        (
            &["pool", "create", "l", "--range", "1-10", "--reserve", "20"],
            "outside",
        ),
        (&["pool", "list", "--label", "=x"], "KEY=VALUE"),
        (&["alloc", "nope"], "pool 'nope' not found"),
        (
            &["release", "nope", "--value", "1"],
            "pool 'nope' not found",
        ),
        (&["lookup", "nope", "--key", "k"], "pool 'nope' not found"),
        (&["claims", "nope"], "pool 'nope' not found"),
        (&["pool", "show", "nope"], "pool 'nope' not found"),
        (
            &["pool", "delete", "nope", "--force"],
            "pool 'nope' not found",
        ),
        (&["resync", "begin", "nope"], "pool 'nope' not found"),
        (&["alloc", "bad/name"], "invalid pool name"),
        (&["alloc", "hosts", "--count", "2"], "exhausted"),
        (&["alloc", "vlans", "--count", "87"], "exhausted"),
        (
            &["alloc", "vlans", "--value", "200"],
            "200 is outside the pool's range 100-199",
        ),
        (
            &["alloc", "vlans", "--value", "abc"],
            "'abc' is not an integer",
        ),
        (&["alloc", "vlans", "--value", "155"], "reserved"),
        (&["alloc", "hosts", "--value", "10.0.0.3"], "reserved"),
        (&["alloc", "vlans", "--meta", "{site:a}"], "--meta"),
        (&["alloc", "vlans", "--key", "k", "--count", "2"], "key"),
        (
            &["alloc", "vlans", "--key", "site-a", "--value", "105"],
            "key 'site-a' already holds 103",
        ),
        (
            &["alloc", "vlans", "--key", "new", "--value", "101"],
            "101 is already allocated",
        ),
        (&["alloc", "vlans", "--request-id", ""], "--request-id"),
        (&["release", "vlans", "--value", "120"], "not allocated"),
        (
            &["release", "vlans", "--key", "no-such-key"],
            "key 'no-such-key' is not claimed",
        ),
        (
            &[
                "release",
                "vlans",
                "--value",
                "100",
                "--request-id",
                "\u{7}",
            ],
            "--request-id",
        ),
        (&["pool", "delete", "vlans"], "--force"),
        (&["resync", "end", "vlans"], "no resync in progress"),
        (
            &[
                "pool",
                "create",
                "n",
                "--range",
                "1-5",
                "--parent-pool",
                "vlans",
                "--parent-value",
                "120",
            ],
            "not claimed in pool 'vlans'",
        ),
    ];
    for (args, needle) in cases {
        env.refused(args, needle);
    }
    // Usage errors keep clap's exit code 2 and one line, on both sides.
    for args in [
        &["pool", "create", "x"][..],
        &["alloc", "vlans", "--output", "yaml"],
        &["release", "vlans", "--value", "100", "--key", "site-a"],
        &[
            "pool",
            "create",
            "x",
            "--range",
            "1-2",
            "--parent-pool",
            "vlans",
        ],
    ] {
        let out = env.both(args);
        assert_eq!(out.code, 2, "{args:?}");
        assert_one_error_line(&out);
    }
}

#[test]
fn request_ids_and_nested_pools() {
    let env = Env::new();
    env.ok(&["pool", "create", "ids", "--range", "1-100"]);
    let first = env.json(&["alloc", "ids", "--count", "2", "--request-id", "req-1"]);
    assert_eq!(values(&first), ["1", "2"]);
    // A retry answers the same and claims nothing more.
    assert_eq!(
        env.json(&["alloc", "ids", "--count", "2", "--request-id", "req-1"]),
        first
    );
    assert_eq!(env.json(&["pool", "show", "ids"])["stats"]["allocated"], 2);
    env.refused(
        &["alloc", "ids", "--request-id", "req-1"],
        "request id 'req-1' was already used for a different request",
    );
    assert_eq!(
        env.ok(&["release", "ids", "--value", "1", "--request-id", "rel-1"])
            .trim(),
        "released 1"
    );
    assert_eq!(
        env.ok(&["release", "ids", "--value", "1", "--request-id", "rel-1"])
            .trim(),
        "released 1"
    );
    env.refused(&["release", "ids", "--value", "1"], "not allocated");

    env.ok(&[
        "pool",
        "create",
        "supernets",
        "--cidr",
        "10.0.0.0/16",
        "--prefix-len",
        "24",
    ]);
    assert_eq!(values(&env.json(&["alloc", "supernets"])), ["10.0.0.0/24"]);
    let lan = env.json(&[
        "pool",
        "create",
        "lan",
        "--cidr",
        "10.0.0.0/24",
        "--parent-pool",
        "supernets",
        "--parent-value",
        "10.0.0.0/24",
    ]);
    assert_eq!(
        lan["parent"],
        json!({"pool": "supernets", "value": "10.0.0.0/24"})
    );
    let show = env.ok(&["pool", "show", "lan"]);
    assert!(
        show.contains("parent:      10.0.0.0/24 in pool supernets"),
        "{show}"
    );
    env.refused(
        &["release", "supernets", "--value", "10.0.0.0/24"],
        "holds nested pool(s) lan",
    );
    env.refused(
        &[
            "pool",
            "create",
            "wan",
            "--cidr",
            "10.1.0.0/24",
            "--parent-pool",
            "supernets",
            "--parent-value",
            "10.0.0.0/24",
        ],
        "does not lie within",
    );
    env.ok(&["pool", "delete", "lan"]);
    env.ok(&["release", "supernets", "--value", "10.0.0.0/24"]);
}

#[test]
fn server_side_errors_are_one_line() {
    let env = Env::with_token(Some("s3cret"));
    let dir = env.dir.path();
    let base = env.base();
    let run = |args: &[&str], token: Option<&str>| {
        let mut cmd = allot(dir);
        cmd.args(args);
        if let Some(t) = token {
            cmd.env("ALLOT_TOKEN", t);
        }
        output(&mut cmd)
    };
    let list = ["--server", base.as_str(), "pool", "list"];
    assert_eq!(run(&list, Some("s3cret")).stdout.trim(), "no pools");
    for (token, needle) in [
        (None, "Authorization"),
        (Some("wrong"), "invalid bearer token"),
    ] {
        let out = run(&list, token);
        assert_eq!(out.code, 1);
        assert_one_error_line(&out);
        assert!(out.stderr.contains(needle), "{}", out.stderr);
    }
    // --token on the command line works too.
    let out = run(
        &["--server", &base, "--token", "s3cret", "pool", "list"],
        None,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    // ALLOT_SERVER in the environment.
    let out = output(
        allot(dir)
            .args(["pool", "list", "--output", "json"])
            .env("ALLOT_SERVER", &base)
            .env("ALLOT_TOKEN", "s3cret"),
    );
    assert_eq!((out.code, out.stdout.trim()), (0, "[]"), "{}", out.stderr);

    // Nobody listening, a malformed URL, watch without a server, and
    // client flags on `serve`.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let gone = format!("http://127.0.0.1:{port}");
    let out = run(&["--server", &gone, "alloc", "vlans"], None);
    assert_eq!(out.code, 1);
    assert_one_error_line(&out);
    assert!(
        out.stderr
            .contains(&format!("cannot reach the allot server at {gone}/")),
        "{}",
        out.stderr
    );
    let out = run(&["--server", "localhost:7070", "pool", "list"], None);
    assert_eq!(out.code, 1);
    assert_one_error_line(&out);
    assert!(
        out.stderr.contains("invalid server URL 'localhost:7070'"),
        "{}",
        out.stderr
    );
    let out = run(&["watch"], None);
    assert_eq!(out.code, 1);
    assert_one_error_line(&out);
    assert!(
        out.stderr.contains("watch needs --server"),
        "{}",
        out.stderr
    );
    let out = run(&["serve", "--token", "x", "--listen", "127.0.0.1:0"], None);
    assert_eq!(out.code, 1);
    assert_one_error_line(&out);
    assert!(
        out.stderr.contains("--token-file or ALLOT_TOKEN"),
        "{}",
        out.stderr
    );
    assert!(!dir.join("allot-data").exists());
}

/// A running `allot watch`.
struct Watcher {
    child: Child,
    lines: Receiver<String>,
}

impl Watcher {
    fn start(dir: &Path, base: &str, args: &[&str]) -> Watcher {
        let mut child = allot(dir)
            .args(["--server", base, "watch"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn allot watch");
        let lines = lines_of(&mut child);
        Watcher { child, lines }
    }

    /// The next `n` lines (at most 15 s each).
    fn take(&self, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| match self.lines.recv_timeout(Duration::from_secs(15)) {
                Ok(l) => l,
                Err(RecvTimeoutError::Timeout) => panic!("allot watch printed nothing for 15 s"),
                Err(e) => panic!("allot watch ended: {e}"),
            })
            .collect()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn revision(line: &str) -> u64 {
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
    v["revision"].as_u64().expect("revision")
}

#[test]
fn watch_prints_events_and_resumes_across_a_restart() {
    let mut env = Env::new();
    let dir: PathBuf = env.dir.path().to_path_buf();
    let base = env.base();
    env.remote(&["pool", "create", "ids", "--range", "1-9"]);
    env.remote(&["alloc", "ids", "--key", "k", "--owner", "o"]);

    let json_watch = Watcher::start(&dir, &base, &["--from", "1", "--output", "json"]);
    let human_watch = Watcher::start(&dir, &base, &["--from", "1"]);
    let first = json_watch.take(2);
    let parsed: Vec<Value> = first
        .iter()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(parsed[0]["type"], "pool_created");
    assert_eq!(
        parsed[1]["allocated"],
        json!([{"value": "1", "key": "k", "owner": "o"}])
    );
    let r0 = revision(&first[0]);
    assert_eq!(revision(&first[1]), r0 + 1);
    assert_eq!(
        human_watch.take(2),
        [
            format!("{r0} ids: created (integers 1-9)"),
            format!("{} ids: allocated 1 (key k, owner o)", r0 + 1),
        ]
    );

    // Live changes arrive as they happen.
    env.remote(&["alloc", "ids", "--count", "2"]);
    let live = json_watch.take(1);
    assert_eq!(revision(&live[0]), r0 + 2);

    // The server restarts on the same address; the watch reconnects and
    // goes on from where it was, without gaps or repeats.
    let listen = base.trim_start_matches("http://").to_string();
    if let Some(s) = env.served.take() {
        s.stop();
    }
    env.served = Some(Served::start(&dir, &dir.join("served"), &listen, None));
    env.remote(&["release", "ids", "--key", "k"]);
    env.remote(&["resync", "begin", "ids", "--owner", "o"]);
    env.remote(&["pool", "delete", "ids", "--force"]);
    let after = json_watch.take(3);
    let revs: Vec<u64> = after.iter().map(|l| revision(l)).collect();
    assert_eq!(revs, [r0 + 3, r0 + 4, r0 + 5]);
    assert_eq!(
        human_watch.take(4)[1..],
        [
            format!("{} ids: released 1 (key k, owner o)", r0 + 3),
            format!("{} ids: resync begun for owner o", r0 + 4),
            format!("{} ids: deleted", r0 + 5),
        ]
    );
}
