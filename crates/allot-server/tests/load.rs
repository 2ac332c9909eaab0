//! Load: 64 concurrent clients claim, re-claim and release keyed values
//! through one in-process server for a bounded number of operations; the
//! final state must equal what the acknowledged history implies, with no
//! value held twice.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use common::TestServer;
use serde_json::{json, Value};

const CLIENTS: usize = 64;
const OPS: usize = 100;
const KEYS_PER_CLIENT: u64 = 8;

/// A tiny deterministic generator (no shared state between clients).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_match_the_acknowledged_history() {
    let s = Arc::new(TestServer::start().await);
    // 512 keys at most held at once out of 1024 values: never exhausted,
    // and lowest-free reuses released values at once, which is what could
    // expose a value handed out twice.
    let r = s
        .post(
            "/v1/pools",
            json!({"name": "load", "kind": {"type": "range", "lo": 1, "hi": 1024}}),
        )
        .await;
    assert_eq!(r.status, 201);

    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            // Its own connection per client.
            let client = reqwest::Client::new();
            let url = |op: &str| format!("{}/v1/pools/load/{op}", s.base);
            let mut rng = Lcg(c as u64 + 1);
            // What this client's acknowledged requests imply: key -> value.
            let mut held: BTreeMap<String, String> = BTreeMap::new();
            for _ in 0..OPS {
                let key = format!("c{c}-k{}", rng.next() % KEYS_PER_CLIENT);
                let owner = format!("client-{c}");
                match held.get(&key).cloned() {
                    Some(v) if rng.next() % 3 == 0 => {
                        // Re-claim: the same value, idempotently.
                        let r: Value = client
                            .post(url("allocate"))
                            .json(&json!({"key": key, "owner": owner}))
                            .send()
                            .await
                            .unwrap()
                            .json()
                            .await
                            .unwrap();
                        assert_eq!(r["values"], json!([v]), "re-claim of {key}: {r}");
                    }
                    Some(v) => {
                        let resp = client
                            .post(url("release"))
                            .json(&json!({"key": key}))
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(resp.status(), 200);
                        let r: Value = resp.json().await.unwrap();
                        assert_eq!(r["value"], v.as_str(), "release of {key}: {r}");
                        held.remove(&key);
                    }
                    None => {
                        let resp = client
                            .post(url("allocate"))
                            .json(&json!({"key": key, "owner": owner}))
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(resp.status(), 200);
                        let r: Value = resp.json().await.unwrap();
                        let v = r["values"][0].as_str().unwrap().to_string();
                        held.insert(key, v);
                    }
                }
            }
            held
        }));
    }
    let mut expected: HashMap<String, String> = HashMap::new();
    for t in tasks {
        expected.extend(t.await.unwrap());
    }

    // The server's state: every claim, by value, with its key.
    let claims = s.all_claims("load").await;
    let mut seen_values = HashSet::new();
    let mut actual: HashMap<String, String> = HashMap::new();
    for c in &claims {
        let v = c["value"].as_str().unwrap().to_string();
        assert!(seen_values.insert(v.clone()), "value {v} listed twice");
        let k = c["key"]
            .as_str()
            .unwrap_or_else(|| panic!("claim without key: {c}"));
        assert!(
            actual.insert(k.to_string(), v).is_none(),
            "key {k} holds two values"
        );
    }
    assert_eq!(
        actual, expected,
        "state differs from the acknowledged history"
    );
    let info = s.ok("/v1/pools/load").await;
    assert_eq!(info["stats"]["allocated"], expected.len());
    // Each key's lookup agrees.
    for (k, v) in expected.iter().take(32) {
        let r = s.ok(&format!("/v1/pools/load/lookup?key={k}")).await;
        assert_eq!(r["value"], v.as_str());
    }
    let s = Arc::into_inner(s).unwrap();
    s.stop().await.unwrap();
}
