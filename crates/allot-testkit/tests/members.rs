//! Fifty member pods allocate from one `block`-durability pool: remote
//! members through one `allot serve` (on its embedded default store), then
//! embedded members on one shared store (PostgreSQL, then etcd, no server
//! in between). Ten are killed
//! with SIGKILL at random moments and one is frozen with SIGSTOP past its
//! lease. Every block of the dead is taken over by exactly one survivor
//! (one owner per epoch); the frozen pod, resumed, finds itself fenced; and
//! across all histories no value was ever handed out twice.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use std::time::{Duration, Instant};

use allot::{Allot, Durability, OwnerMap, PoolKind, PoolSpec};
use allot_testkit::history::Line;
use rand::seq::SliceRandom;
use rand::Rng;

const PODS: usize = 50;
const KILLED: usize = 10;
const TTL_MS: u64 = 3000;
const POOL: &str = "teid";

struct Pod {
    name: String,
    child: Child,
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(url: &str, name: &str, dir: &Path) -> Pod {
    let child = Command::new(env!("CARGO_BIN_EXE_member-child"))
        .args([
            url,
            name,
            POOL,
            dir.to_str().unwrap(),
            "20",
            &TTL_MS.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start member-child");
    Pod {
        name: name.to_string(),
        child,
    }
}

fn signal(pod: &Pod, sig: i32) {
    let pid = i32::try_from(pod.child.id()).unwrap();
    // SAFETY: kill(2) on our own child process.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

/// (value, block, epoch, incarnation) of every `V` line of a history, and
/// how many `F` (fenced) lines it has.
fn history(dir: &Path, name: &str) -> (Vec<(u64, u64, u64, u64)>, usize) {
    let text = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
    let mut values = Vec::new();
    let mut fenced = 0;
    for line in text.lines() {
        match line.parse() {
            Ok(Line::Value {
                value,
                block,
                epoch,
                incarnation,
            }) => values.push((value, block, epoch, incarnation)),
            Ok(Line::Fenced { .. }) => fenced += 1,
            Err(err) => panic!("{name}: {err}"),
        }
    }
    (values, fenced)
}

async fn wait_for(what: &str, within: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < within, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

/// One scenario at a time: fifty pods each already fill this machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The scenario on a store opened from `url` by this test, the pods
/// embedding the engine on the same store.
async fn on_store(url: &str) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let backend = allot_backends::Backend::open(&url.parse().unwrap(), dir.path())
        .await
        .unwrap();
    let engine = Allot::new(backend.store());
    scenario(&engine, url, dir.path()).await;
    engine.close().await;
    backend.close().await.unwrap();
}

/// Runs the scenario with `engine` watching and the pods joining at
/// `url` (a store URL, or a server's `http://` URL), their histories
/// in `dir`.
async fn scenario(engine: &Allot, url: &str, dir: &Path) {
    let mut spec = PoolSpec::new(PoolKind::Range {
        lo: 0,
        hi: (1 << 20) - 1,
    });
    spec.block_size = 64;
    spec.member_blocks = Some(Durability::Block);
    engine
        .create_pool(POOL, spec, Default::default())
        .await
        .unwrap();
    let map: OwnerMap = engine.owner_map().await.unwrap();

    let mut pods: Vec<Pod> = (0..PODS)
        .map(|i| spawn(url, &format!("pod-{i:02}"), dir))
        .collect();
    wait_for(
        "every pod joined and allocates",
        Duration::from_secs(120),
        || pods.iter().all(|p| history(dir, &p.name).0.len() >= 5),
    )
    .await;

    // Ten SIGKILLs at random moments over about two seconds.
    let mut rng = rand::rng();
    pods.shuffle(&mut rng);
    let mut dead = Vec::new();
    for _ in 0..KILLED {
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
        let mut pod = pods.pop().unwrap();
        pod.child.kill().unwrap();
        pod.child.wait().unwrap();
        dead.push(pod.name.clone());
    }
    // The blocks the dead held: taken over, each by one live member.
    let dead_set: BTreeSet<&str> = dead.iter().map(String::as_str).collect();
    let mut dead_blocks = BTreeSet::new();
    for name in &dead {
        for (_, block, _, _) in history(dir, name).0 {
            dead_blocks.insert(block);
        }
    }
    let took = wait_for(
        "every block of the dead taken over by a live member",
        Duration::from_millis(TTL_MS) * 10,
        || {
            dead_blocks.iter().all(|b| {
                map.block_owner(POOL, *b)
                    .is_some_and(|o| o.live && !dead_set.contains(o.member.as_str()))
            })
        },
    )
    .await;
    eprintln!(
        "{} blocks of {KILLED} killed pods taken over within {took:?} of the last kill \
         (lease TTL {TTL_MS} ms)",
        dead_blocks.len()
    );

    // One pod frozen past its lease (a partition it cannot see), then
    // resumed: it must find itself fenced and never use its old blocks.
    let frozen = pods.pop().unwrap();
    let before = history(dir, &frozen.name);
    signal(&frozen, libc::SIGSTOP);
    let frozen_blocks: BTreeSet<u64> = before.0.iter().map(|v| v.1).collect();
    wait_for(
        "the frozen pod's blocks taken over",
        Duration::from_millis(TTL_MS) * 10,
        || {
            frozen_blocks.iter().all(|b| {
                map.block_owner(POOL, *b)
                    .is_some_and(|o| o.live && o.member != frozen.name)
            })
        },
    )
    .await;
    signal(&frozen, libc::SIGCONT);
    wait_for(
        "the resumed pod reports itself fenced",
        Duration::from_secs(30),
        || history(dir, &frozen.name).1 > before.1,
    )
    .await;
    pods.push(frozen);
    // Everyone goes on a little longer, then stops dead.
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(pods);

    // No value handed out twice; one member per (block, epoch).
    let mut seen: BTreeMap<u64, (String, u64, u64)> = BTreeMap::new();
    let mut epoch_owner: BTreeMap<(u64, u64), (String, u64)> = BTreeMap::new();
    let mut total = 0;
    for i in 0..PODS {
        let name = format!("pod-{i:02}");
        for (value, block, epoch, inc) in history(dir, &name).0 {
            total += 1;
            if let Some(first) = seen.insert(value, (name.clone(), epoch, inc)) {
                let mut lines = String::new();
                for j in 0..PODS {
                    let n = format!("pod-{j:02}");
                    let text =
                        std::fs::read_to_string(dir.join(format!("{n}.log"))).unwrap_or_default();
                    for l in text.lines() {
                        let shown = match l.parse() {
                            Ok(Line::Value { block: b, .. }) => b == block,
                            _ => true,
                        };
                        if shown {
                            lines.push_str(&format!("{n}: {l}\n"));
                        }
                    }
                }
                panic!(
                    "value {value} handed out by {first:?} and by {name} (epoch {epoch}, \
                     incarnation {inc}); block {block} and fenced lines:\n{lines}"
                );
            }
            assert_eq!(value / 64, block, "value {value} outside its block");
            let owner = epoch_owner
                .entry((block, epoch))
                .or_insert_with(|| (name.clone(), inc));
            assert_eq!(
                *owner,
                (name.clone(), inc),
                "block {block} epoch {epoch} used by two owners"
            );
        }
    }
    eprintln!("{total} values handed out by {PODS} pods, none twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_pods_on_postgres_kill_9_and_freeze() {
    let pg = allot_store_postgres::testing::start_server().await;
    // Fifty processes on one server: a few connections each.
    on_store(&format!("{}?pool_size=3", pg.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_pods_on_etcd_kill_9_and_freeze() {
    let etcd = allot_store_etcd::testing::start_server().await;
    on_store(&format!("etcd://{}", etcd.endpoint())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_remote_pods_through_one_server_kill_9_and_freeze() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let data = tempfile::tempdir().unwrap();
    let histories = tempfile::tempdir().unwrap();
    let mut config = allot_server::Config::new(data.path());
    config.listen = "127.0.0.1:0".into();
    let server = allot_server::Server::bind(config).await.unwrap();
    let (engine, addr) = (server.engine(), server.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    scenario(&engine, &format!("http://{addr}"), histories.path()).await;
    let _ = stop.send(());
    serving.await.unwrap().unwrap();
}
