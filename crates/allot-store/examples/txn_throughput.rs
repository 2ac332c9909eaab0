//! Rough group-commit throughput of the redb backend: N tasks each looping
//! on a one-put transaction (~100-byte value, fsync per commit) for a few
//! seconds. Not a benchmark harness, just a quick way to see the effect of
//! group commit on this machine:
//!
//! ```text
//! cargo run -p allot-store --example txn_throughput -- [DIR] [SECONDS] [TASKS...]
//! ```

use std::time::{Duration, Instant};

use allot_store::{Op, RedbOptions, RedbStore, Store, Txn};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let base = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let seconds: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(3);
    let mut task_counts: Vec<usize> = args.map(|s| s.parse()).collect::<Result<_, _>>()?;
    if task_counts.is_empty() {
        task_counts = vec![1, 8, 64, 256];
    }
    for tasks in task_counts {
        let dir = tempfile::tempdir_in(&base)?;
        let store = RedbStore::open(dir.path().join("bench.redb"), RedbOptions::default())?;
        let rate = run(&store, tasks, Duration::from_secs(seconds)).await?;
        println!("{tasks:>4} tasks: {rate:>8.0} txn/s");
        store.close()?;
    }
    Ok(())
}

async fn run(
    store: &RedbStore,
    tasks: usize,
    duration: Duration,
) -> Result<f64, Box<dyn std::error::Error>> {
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let value = vec![b'x'; 100];
            let mut n = 0u64;
            while start.elapsed() < duration {
                store
                    .txn(Txn::new().then(Op::put(format!("bench/{t}/{n}"), &value)))
                    .await?;
                n += 1;
            }
            Ok::<u64, allot_store::StoreError>(n)
        }));
    }
    let mut total = 0;
    for handle in handles {
        total += handle.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}
