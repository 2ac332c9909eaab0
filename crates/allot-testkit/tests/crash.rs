//! Crash test: a child process claims keys as fast as it can and prints each
//! acknowledged claim; it is killed with SIGKILL at random moments, many
//! rounds on one data dir. After every kill the store is reopened: every
//! acknowledged claim must be there with the same value, and no value may be
//! held twice.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use allot::{Allot, Target};
use allot_store::{RedbOptions, RedbStore};
use rand::Rng;

const ROUNDS: usize = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_claims_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    let mut rng = rand::rng();
    for round in 0..ROUNDS {
        let mut child = Command::new(env!("CARGO_BIN_EXE_crash-child"))
            .arg(dir.path())
            .arg(format!("r{round}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start crash-child");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Let it get going (first ack), then kill it at a random moment.
        let first = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("child acknowledged nothing");
        std::thread::sleep(Duration::from_millis(rng.random_range(5..250)));
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        reader.join().unwrap();
        let mut lines = vec![first];
        lines.extend(rx.try_iter());
        let before = acked.len();
        for line in lines {
            // Only complete lines were acknowledged; a torn last line cannot parse.
            if let Some((k, v)) = line.split_once(' ') {
                assert!(
                    acked.insert(k.to_string(), v.to_string()).is_none(),
                    "key {k} printed twice"
                );
            }
        }
        assert!(
            acked.len() > before,
            "round {round}: no claims acknowledged"
        );

        let store = RedbStore::open(dir.path().join("allot.redb"), RedbOptions::default()).unwrap();
        let allot = Allot::new(Arc::new(store));
        for (k, v) in &acked {
            let c = allot
                .lookup("crash", Target::Key(k.clone()))
                .await
                .unwrap_or_else(|e| panic!("round {round}: acknowledged claim {k}={v} lost: {e}"));
            assert_eq!(&c.value, v, "round {round}: key {k} changed value");
        }
        // No value held twice, and the bitmap agrees with the claim records.
        let mut values = BTreeSet::new();
        let mut after = None;
        loop {
            let page = allot
                .list_claims("crash", after.as_deref(), 5000)
                .await
                .unwrap();
            for c in &page.claims {
                assert!(
                    values.insert(c.value.clone()),
                    "value {} held twice",
                    c.value
                );
                assert!(
                    c.key.is_some(),
                    "value {} allocated without its key record",
                    c.value
                );
            }
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        let stats = allot.pool("crash").await.unwrap().stats;
        assert_eq!(stats.allocated, values.len() as u64);
        assert!(values.len() >= acked.len());
        allot.close().await;
        eprintln!(
            "round {round}: {} acknowledged so far, {} stored",
            acked.len(),
            values.len()
        );
    }
}
