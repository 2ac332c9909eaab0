//! Several `allot serve` processes on one shared store (PostgreSQL, etcd),
//! local commands on it, and the store itself going away under load.
//!
//! The scenarios are written once, over the store URL and a handle that
//! kills and restarts the store, and run on every shared backend.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use allot_store_etcd::testing::EtcdServer;
use allot_store_postgres::testing::PgServer;
use serde_json::{json, Value};
use tempfile::TempDir;

use common::served::{all_claims, check_acked, create_ids_pool, get, post, serve, Served};

/// A throw-away store server the scenarios can crash and bring back.
trait StoreServer: Send {
    /// The `--store` URL.
    fn url(&self) -> String;
    /// SIGKILL, as a crash would.
    fn kill(&mut self);
    /// Starts again on the same data and port; blocking until it answers.
    fn restart(&mut self);
}

impl StoreServer for PgServer {
    fn url(&self) -> String {
        PgServer::url(self)
    }
    fn kill(&mut self) {
        PgServer::kill(self);
    }
    fn restart(&mut self) {
        PgServer::restart(self).unwrap_or_else(|e| panic!("restarting PostgreSQL: {e}"));
    }
}

impl StoreServer for EtcdServer {
    fn url(&self) -> String {
        format!("etcd://{}/shared-test", self.endpoint())
    }
    fn kill(&mut self) {
        EtcdServer::kill(self);
    }
    fn restart(&mut self) {
        EtcdServer::restart(self).unwrap_or_else(|e| panic!("restarting etcd: {e}"));
    }
}

async fn start_postgres() -> PgServer {
    allot_store_postgres::testing::start_server().await
}

/// `allot serve` on `url`, its data dir in `dir` (unused by shared stores,
/// which must not create it).
async fn serve_on(dir: &TempDir, url: &str, client: &reqwest::Client) -> Served {
    let s = serve(dir.path(), &["--store", url], &[], &[]);
    let masked = url.split('?').next().unwrap();
    assert!(s.line.contains(masked), "{}", s.line);
    s.ready(client).await;
    s
}

async fn claim(client: &reqwest::Client, base: &str, key: &str) -> reqwest::Result<(u16, Value)> {
    post(
        client,
        format!("{base}/v1/pools/ids/allocate"),
        json!({"key": key, "owner": "shared"}),
    )
    .await
}

/// Two servers on one store act as one: a pool created through one is
/// served by both, a key gets the same value through either, concurrent
/// clients spread over both never get a value twice; after `kill -9` of one,
/// the other serves everything and nothing acknowledged is lost.
async fn two_servers_scenario(store: &dyn StoreServer) {
    const CLIENTS: usize = 12;
    let dir = TempDir::new().unwrap();
    let client = reqwest::Client::new();
    let url = store.url();
    let mut a = serve_on(&dir, &url, &client).await;
    let b = serve_on(&dir, &url, &client).await;
    assert!(
        !dir.path().join("allot-data").exists(),
        "a shared store needs no data dir"
    );

    let (st, r) = post(&client, format!("{}/v1/pools", a.base), create_ids_pool())
        .await
        .unwrap();
    assert_eq!(st, 201, "{r}");
    let (st, r) = get(&client, format!("{}/v1/pools/ids", b.base)).await;
    assert_eq!(st, 200, "the pool created through A is served by B: {r}");

    let (st, first) = claim(&client, &a.base, "same").await.unwrap();
    assert_eq!(st, 200, "{first}");
    let (st, again) = claim(&client, &b.base, "same").await.unwrap();
    assert_eq!(st, 200, "{again}");
    assert_eq!(first["values"], again["values"], "one key, one value");

    // B caches a pool, A claims from it: B's counters follow A's writes
    // (B never writes to this pool, so only following can tell it).
    let (st, r) = post(
        &client,
        format!("{}/v1/pools", b.base),
        json!({"name": "quiet", "kind": {"type": "range", "lo": 1, "hi": 100}}),
    )
    .await
    .unwrap();
    assert_eq!(st, 201, "{r}");
    let (_, r) = get(&client, format!("{}/v1/pools/quiet", b.base)).await;
    assert_eq!(r["stats"]["allocated"], 0, "{r}");
    let (st, r) = post(
        &client,
        format!("{}/v1/pools/quiet/allocate", a.base),
        json!({"count": 5}),
    )
    .await
    .unwrap();
    assert_eq!(st, 200, "{r}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, r) = get(&client, format!("{}/v1/pools/quiet", b.base)).await;
        if r["stats"]["allocated"] == 5 {
            break;
        }
        assert!(Instant::now() < deadline, "B never saw A's claims: {r}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Clients alternate between the servers; a client whose server died
    // goes on through the survivor. Every third claim made through A is
    // released through B.
    let acked: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    acked.lock().unwrap().insert(
        "same".into(),
        first["values"][0].as_str().unwrap().to_string(),
    );
    let a_dead = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let through_a = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (acked, a_dead, stop, through_a) = (
            acked.clone(),
            a_dead.clone(),
            stop.clone(),
            through_a.clone(),
        );
        let (base_a, base_b) = (a.base.clone(), b.base.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for i in 0.. {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let key = format!("c{c}-{i}");
                let use_a = (c + i) % 2 == 0 && !a_dead.load(Ordering::Relaxed);
                let base = if use_a { &base_a } else { &base_b };
                match claim(&client, base, &key).await {
                    Ok((200, r)) => {
                        let v = r["values"][0].as_str().unwrap().to_string();
                        if use_a {
                            through_a.fetch_add(1, Ordering::Relaxed);
                        }
                        if use_a && i % 3 == 0 {
                            let (st, r) = post(
                                &client,
                                format!("{base_b}/v1/pools/ids/release"),
                                json!({"key": key}),
                            )
                            .await
                            .unwrap();
                            assert_eq!(st, 200, "release through B: {r}");
                        } else {
                            acked.lock().unwrap().insert(key, v);
                        }
                    }
                    Ok((status, r)) => panic!("unexpected answer {status}: {r}"),
                    Err(e) => {
                        // Only A is ever killed; its answer is then unknown.
                        assert!(use_a, "the surviving server failed: {e}");
                        a_dead.store(true, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let wait_for = |n: usize| {
        let acked = acked.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while acked.lock().unwrap().len() < n {
                assert!(Instant::now() < deadline, "load too slow");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    wait_for(400).await;
    a.kill9();
    a_dead.store(true, Ordering::Relaxed);
    let at_kill = acked.lock().unwrap().len();
    wait_for(at_kill + 200).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert!(through_a.load(Ordering::Relaxed) > 50, "A took its share");

    let acked = acked.lock().unwrap().clone();
    eprintln!(
        "{} acknowledged claims kept, {} through A before its kill",
        acked.len(),
        through_a.load(Ordering::Relaxed)
    );
    check_acked(&client, &b.base, &acked).await;
    // Nothing is held that was not acknowledged, except claims whose answer
    // died with A.
    let held: HashSet<String> = all_claims(&client, &b.base, "ids")
        .await
        .iter()
        .map(|c| c["key"].as_str().unwrap().to_string())
        .collect();
    let unknown = held.iter().filter(|k| !acked.contains_key(*k)).count();
    assert!(
        unknown <= CLIENTS,
        "{unknown} claims held but never answered"
    );
    // B's counters include what A claimed.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (st, r) = get(&client, format!("{}/v1/pools/ids", b.base)).await;
        assert_eq!(st, 200, "{r}");
        if r["stats"]["allocated"] == json!(held.len()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B counts {} claims, {} are held",
            r["stats"]["allocated"],
            held.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The survivor still answers keys claimed through the dead server.
    for (k, v) in acked.iter().take(20) {
        let (st, r) = claim(&client, &b.base, k).await.unwrap();
        assert_eq!((st, r["values"][0].as_str()), (200, Some(v.as_str())));
    }
    b.stop();
}

/// The store crashes under load: requests fail fast with 503 `unavailable`
/// (no hang, no busy loop), the server serves again within 5 s of the store
/// coming back, and nothing it acknowledged is lost.
async fn store_restart_scenario(store: &mut dyn StoreServer) {
    const CLIENTS: usize = 8;
    let dir = TempDir::new().unwrap();
    let client = reqwest::Client::new();
    let s = serve_on(&dir, &store.url(), &client).await;
    let (st, r) = post(&client, format!("{}/v1/pools", s.base), create_ids_pool())
        .await
        .unwrap();
    assert_eq!(st, 201, "{r}");

    let acked: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    // Slowest failed answer, in milliseconds.
    let slowest_failure = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (acked, slowest_failure, failures, stop) = (
            acked.clone(),
            slowest_failure.clone(),
            failures.clone(),
            stop.clone(),
        );
        let base = s.base.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for i in 0.. {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let key = format!("c{c}-{i}");
                let started = Instant::now();
                let (st, r) = claim(&client, &base, &key).await.unwrap();
                match st {
                    200 => {
                        let v = r["values"][0].as_str().unwrap().to_string();
                        acked.lock().unwrap().insert(key, v);
                    }
                    503 => {
                        assert_eq!(r["error"]["code"], "unavailable", "{r}");
                        let ms = started.elapsed().as_millis() as usize;
                        slowest_failure.fetch_max(ms, Ordering::Relaxed);
                        failures.fetch_add(1, Ordering::Relaxed);
                        // A client backs off; the server must not spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    _ => panic!("unexpected answer {st}: {r}"),
                }
            }
        }));
    }
    let acked_count = || acked.lock().unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked_count() < 300 {
        assert!(Instant::now() < deadline, "load too slow");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    store.kill();
    let down = acked_count();
    let cpu_before = cpu_ticks(&s);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu_used = cpu_ticks(&s) - cpu_before;
    let failed = failures.load(Ordering::Relaxed);
    assert!(failed > 0, "no request failed while the store was down");
    // Claims answered after the kill can only be those already committed
    // when it happened, answered late.
    assert!(
        acked_count() - down <= CLIENTS,
        "claims acknowledged with the store down"
    );
    // Over 3 s, a spinning thread would burn 300 ticks.
    assert!(
        cpu_used < 150,
        "the server used {cpu_used} ticks of CPU in 3 s while the store was down"
    );

    let ws = &mut *store;
    tokio::task::block_in_place(|| ws.restart());
    let back = Instant::now();
    let before = acked_count();
    while acked_count() <= before + CLIENTS {
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "not serving 5 s after the store came back"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let recovered = back.elapsed();
    // And it keeps serving.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked_count() < before + 200 {
        assert!(Instant::now() < deadline, "load too slow after the restart");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let slowest = slowest_failure.load(Ordering::Relaxed);
    eprintln!(
        "{failed} fast failures while down (slowest {slowest} ms, server CPU {cpu_used} ticks \
         in 3 s); serving again {recovered:?} after the store came back; {} acknowledged",
        acked_count()
    );
    // Failures are bounded by the store's call timeout (5 s), not hangs.
    assert!(slowest < 10_000, "a failed request took {slowest} ms");
    let acked = acked.lock().unwrap().clone();
    check_acked(&client, &s.base, &acked).await;
    s.stop();
}

/// User plus system CPU time of the server process, in clock ticks.
fn cpu_ticks(s: &Served) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", s.pid())).unwrap();
    // Fields after the command name (which may hold spaces): utime is the
    // 12th and stime the 13th of them.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_postgres() {
    let pg = start_postgres().await;
    two_servers_scenario(&pg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_under_load() {
    let mut pg = start_postgres().await;
    store_restart_scenario(&mut pg).await;
}

/// Local commands work on a shared store too, next to a server on it.
async fn local_commands_scenario(store: &dyn StoreServer) {
    let dir = TempDir::new().unwrap();
    let url = store.url();
    let run = |args: &[&str]| {
        let out = common::output(
            common::allot(dir.path())
                .args(["--store", &url, "--output", "json"])
                .args(args),
        );
        assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
        serde_json::from_str::<Value>(&out.stdout).unwrap()
    };
    run(&["pool", "create", "vlans", "--range", "100-199"]);
    let first = run(&["alloc", "vlans", "--key", "site-a"]);
    let client = reqwest::Client::new();
    let s = serve_on(&dir, &url, &client).await;
    let (st, r) = post(
        &client,
        format!("{}/v1/pools/vlans/allocate", s.base),
        json!({"key": "site-a"}),
    )
    .await
    .unwrap();
    assert_eq!(st, 200, "{r}");
    assert_eq!(common::values(&first), common::values(&r));
    // While the server runs: no file lock to fight over.
    run(&["alloc", "vlans", "--key", "site-b"]);
    let (st, r) = get(&client, format!("{}/v1/pools/vlans/claims", s.base)).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["claims"].as_array().unwrap().len(), 2, "{r}");
    assert!(!dir.path().join("allot-data").exists());
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_commands_on_postgres() {
    let pg = start_postgres().await;
    local_commands_scenario(&pg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_etcd() {
    let etcd = allot_store_etcd::testing::start_server().await;
    two_servers_scenario(&etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_under_load() {
    let mut etcd = allot_store_etcd::testing::start_server().await;
    store_restart_scenario(&mut etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_commands_on_etcd() {
    let etcd = allot_store_etcd::testing::start_server().await;
    local_commands_scenario(&etcd).await;
}

/// Members and owners, through local commands on the shared store and
/// through a server on it: a member pod embeds the engine on the same store.
async fn members_scenario(store: &dyn StoreServer) {
    let dir = TempDir::new().unwrap();
    let url = store.url();
    let run = |args: &[&str]| {
        common::output(common::allot(dir.path()).args(["--store", &url]).args(args))
    };
    let out = run(&[
        "pool",
        "create",
        "teid",
        "--range",
        "0-65535",
        "--block-size",
        "256",
        "--member-blocks",
        "block",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = run(&["pool", "show", "teid"]);
    assert!(out.stdout.contains("members:     block"), "{}", out.stdout);
    let out = run(&["alloc", "teid"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("through a member"), "{}", out.stderr);

    let backend = allot_backends::Backend::open(&url.parse().unwrap(), dir.path())
        .await
        .unwrap();
    let engine = allot::Allot::new(backend.store());
    let options = allot::MemberOptions {
        address: Some("10.9.9.9:2152".into()),
        ..allot::MemberOptions::default()
    };
    let m = engine.join("upf-1", options).await.unwrap();
    let v = m.allocate("teid").await.unwrap();

    let out = run(&["members"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let lines = common::lines(&out.stdout);
    assert!(lines[0].starts_with("NAME"), "{}", out.stdout);
    assert!(
        lines[1].starts_with("upf-1") && lines[1].contains("10.9.9.9:2152"),
        "{}",
        out.stdout
    );
    let out = run(&["owner", "teid", &v.value, "--output", "json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let owner: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(owner["member"], "upf-1");
    assert_eq!(owner["epoch"], v.epoch);
    // The first block is one of the lowest free ones, never the last.
    assert_ne!(v.block, 255);
    let out = run(&["owner", "teid", "65535"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("no member owns"), "{}", out.stderr);

    // The same through a server: byte for byte.
    let client = reqwest::Client::new();
    let s = serve_on(&dir, &url, &client).await;
    let local = run(&["owner", "teid", &v.value]);
    let remote = run(&["--server", &s.base, "owner", "teid", &v.value]);
    assert_eq!(local, remote);
    let remote = run(&["--server", &s.base, "members", "--output", "json"]);
    let list: Value = serde_json::from_str(&remote.stdout).unwrap();
    assert_eq!(list[0]["name"], "upf-1");
    assert_eq!(list[0]["blocks"], 1);
    s.stop();
    m.leave().await.unwrap();
    engine.close().await;
    backend.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_on_postgres() {
    let pg = start_postgres().await;
    members_scenario(&pg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_on_etcd() {
    let etcd = allot_store_etcd::testing::start_server().await;
    members_scenario(&etcd).await;
}
