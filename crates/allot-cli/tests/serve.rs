//! `allot serve` as a process: graceful shutdown on SIGTERM, `kill -9`
//! under load, settings precedence, and refusals at start.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;

use common::allot;
use common::served::{check_acked, create_ids_pool, post, serve};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_and_exits_zero() {
    let dir = TempDir::new().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    assert!(!data.exists());
    let s = serve(dir.path(), &["--data-dir", d], &[], &[]);
    assert!(
        s.line.contains(&format!("(store: {d}/allot-log)")),
        "{}",
        s.line
    );
    assert!(
        data.join("allot-log").exists(),
        "serve creates the data dir, with the log store (the default for a new one)"
    );
    let client = reqwest::Client::new();
    s.ready(&client).await;
    let (st, _) = post(&client, format!("{}/v1/pools", s.base), create_ids_pool())
        .await
        .unwrap();
    assert_eq!(st, 201);

    // A burst of claims, and SIGTERM as soon as the first is answered, while
    // the others are in flight: whatever was answered is committed, and the
    // process exits 0.
    let acked = Arc::new(Mutex::new(HashMap::new()));
    let mut tasks = Vec::new();
    for i in 0..48 {
        let (client, base, acked) = (client.clone(), s.base.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let key = format!("k{i}");
            let url = format!("{base}/v1/pools/ids/allocate");
            if let Ok((200, r)) = post(&client, url, json!({"key": key})).await {
                let v = r["values"][0].as_str().unwrap().to_string();
                acked.lock().unwrap().insert(key, v);
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no claim answered");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    s.signal(libc::SIGTERM);
    for t in tasks {
        t.await.unwrap();
    }
    let (code, log) = s.wait();
    assert_eq!(code, Some(0), "stderr: {log}");
    assert!(
        log.contains("shutting down") && log.contains("stopped"),
        "{log}"
    );

    // A restart on the same data dir sees every acknowledged claim.
    let acked = acked.lock().unwrap().clone();
    eprintln!("{} of 48 claims acknowledged around SIGTERM", acked.len());
    let s = serve(dir.path(), &["--data-dir", d], &[], &[]);
    s.ready(&client).await;
    check_acked(&client, &s.base, &acked).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_keeps_every_acknowledged_claim() {
    const CLIENTS: usize = 16;
    let dir = TempDir::new().unwrap();
    let d = dir.path().join("data");
    let d = d.to_str().unwrap();
    let client = reqwest::Client::new();
    let mut acked_all: HashMap<String, String> = HashMap::new();
    for round in 0..3 {
        let s = serve(dir.path(), &["--data-dir", d], &[], &[]);
        s.ready(&client).await;
        if round == 0 {
            let (st, _) = post(&client, format!("{}/v1/pools", s.base), create_ids_pool())
                .await
                .unwrap();
            assert_eq!(st, 201);
        }
        // Everything acknowledged before is still there after the last kill.
        check_acked(&client, &s.base, &acked_all).await;

        let acked = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for c in 0..CLIENTS {
            let (base, acked) = (s.base.clone(), acked.clone());
            tasks.push(tokio::spawn(async move {
                let client = reqwest::Client::new();
                for i in 0.. {
                    let key = format!("r{round}-c{c}-{i}");
                    let url = format!("{base}/v1/pools/ids/allocate");
                    match post(&client, url, json!({"key": key, "owner": "crash"})).await {
                        Ok((200, r)) => {
                            let v = r["values"][0].as_str().unwrap().to_string();
                            acked.lock().unwrap().push((key, v));
                        }
                        Ok((status, r)) => panic!("unexpected answer {status}: {r}"),
                        // The server is gone.
                        Err(_) => return,
                    }
                }
            }));
        }
        // Kill after a number of acknowledgements that differs per round.
        let target = 150 + 100 * round;
        let deadline = Instant::now() + Duration::from_secs(30);
        while acked.lock().unwrap().len() < target {
            assert!(Instant::now() < deadline, "load too slow");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut s = s;
        s.kill9();
        for t in tasks {
            t.await.unwrap();
        }
        for (k, v) in acked.lock().unwrap().drain(..) {
            assert!(acked_all.insert(k, v).is_none());
        }
    }
    let s = serve(dir.path(), &["--data-dir", d], &[], &[]);
    s.ready(&client).await;
    eprintln!("{} acknowledged claims over 3 kills", acked_all.len());
    check_acked(&client, &s.base, &acked_all).await;
    // Keys acknowledged before a kill still get the same value.
    let (k, v) = acked_all.iter().next().unwrap();
    let (st, r) = post(
        &client,
        format!("{}/v1/pools/ids/allocate", s.base),
        json!({"key": k}),
    )
    .await
    .unwrap();
    assert_eq!((st, r["values"][0].as_str()), (200, Some(v.as_str())));
    s.stop();
}

/// Runs `allot serve` expecting it to refuse to start; returns stderr.
fn refused(dir: &Path, global: &[&str], args: &[&str]) -> String {
    let out = allot(dir)
        .args(global)
        .arg("serve")
        .args(args)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(out.stdout, b"", "nothing listened");
    let err = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line: {err}");
    lines[0].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_pools_precedence_and_refusals() {
    let dir = TempDir::new().unwrap();
    let p = dir.path();
    // Unknown stores are refused before anything is created.
    let line = refused(p, &[], &["--store", "mysql://db/allot"]);
    assert!(
        line.starts_with(
            "error: --store \"mysql://db/allot\": unknown store scheme mysql://; use `auto`"
        ),
        "{line}"
    );
    let line = refused(p, &["--store", "postgres"], &[]);
    assert!(line.contains("not a known store"), "{line}");
    assert!(!p.join("allot-data").exists());

    // A config file: data dir relative to the file, a token file, a pool.
    std::fs::create_dir(p.join("etc")).unwrap();
    std::fs::write(p.join("etc/token"), "file-token\n").unwrap();
    let cfg = p.join("etc/allot.toml");
    let write_cfg = |hi: u32| {
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:0\"\ndata_dir = \"from-file\"\ntoken_file = \"token\"\n\n\
                 [[pools]]\nname = \"vlans\"\nkind = {{ type = \"range\", lo = 100, hi = {hi} }}\n\
                 labels = {{ team = \"net\" }}\n"
            ),
        )
        .unwrap();
    };
    write_cfg(199);
    let c = cfg.to_str().unwrap();
    let client = reqwest::Client::new();
    let s = serve(p, &[], &["--config", c], &[]);
    let from_file = p.join("etc/from-file");
    assert!(
        s.line.contains(&from_file.display().to_string()),
        "{}",
        s.line
    );
    s.ready(&client).await;
    // The token comes from the file's token_file.
    let r = client
        .get(format!("{}/v1/pools", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .get(format!("{}/v1/pools/vlans", s.base))
        .bearer_auth("file-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["labels"]["team"], "net");
    s.stop();

    // Same config again: fine. ALLOT_TOKEN beats the file's token_file;
    // ALLOT_DATA_DIR beats the file's data_dir, and --data-dir beats both.
    let s = serve(p, &[], &["--config", c], &[("ALLOT_TOKEN", "env-token")]);
    s.ready(&client).await;
    let r = client
        .get(format!("{}/v1/pools/vlans", s.base))
        .bearer_auth("env-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    s.stop();
    let env_dir = p.join("env-dir");
    let flag_dir = p.join("flag-dir");
    let s = serve(
        p,
        &[],
        &["--config", c],
        &[("ALLOT_DATA_DIR", env_dir.to_str().unwrap())],
    );
    assert!(
        s.line.contains(&env_dir.display().to_string()),
        "{}",
        s.line
    );
    s.stop();
    let s = serve(
        p,
        &["--data-dir", flag_dir.to_str().unwrap()],
        &["--config", c],
        &[("ALLOT_DATA_DIR", env_dir.to_str().unwrap())],
    );
    assert!(
        s.line.contains(&flag_dir.display().to_string()),
        "{}",
        s.line
    );
    s.stop();

    // A conflicting declaration refuses to start, naming pool and field.
    write_cfg(299);
    let line = refused(p, &[], &["--config", c]);
    assert!(
        line.contains("config pool 'vlans' conflicts with the existing pool"),
        "{line}"
    );
    assert!(line.contains("kind: existing"), "{line}");
    assert!(line.contains("nothing was changed"), "{line}");
    // A broken file is refused with its name.
    std::fs::write(&cfg, "listen = 7070\n").unwrap();
    let line = refused(p, &[], &["--config", c]);
    assert!(line.contains("allot.toml"), "{line}");
    // And the data dir is in use while a server runs.
    write_cfg(199);
    let s = serve(p, &[], &["--config", c], &[]);
    let line = refused(p, &[], &["--config", c]);
    assert!(line.contains("in use by another allot process"), "{line}");
    s.stop();
    // Help has examples.
    let out = allot(p).args(["serve", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("Examples:"));
}
