//! Rough group-commit throughput of the redb backend: N tasks each looping
//! on a one-put transaction (~100-byte value, fsync per commit) for a few
//! seconds. Not a benchmark harness, just a quick way to see the effect of
//! group commit on this machine:
//!
//! ```text
//! cargo run -p allot-store --example txn_throughput -- [DIR] [SECONDS] [TASKS...]
//! ```
//!
//! With `--history-size` it instead measures how big the file gets when
//! history is retained: 10 transactions of 100,000 puts each (distinct keys,
//! 60-byte values), printing the file size after each and redb's statistics
//! per table at the end. `HISTORY_EVENTS` sets
//! [`RedbOptions::history_events`] (default 1,000,000: all of it is kept):
//!
//! ```text
//! cargo run -p allot-store --example txn_throughput -- --history-size [DIR] [HISTORY_EVENTS]
//! ```

use std::time::{Duration, Instant};

use allot_store::{Op, RedbOptions, RedbStore, Store, Txn};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("--history-size") {
        args.next();
        let base = args
            .next()
            .map(std::path::PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let mut opts = RedbOptions::default();
        if let Some(events) = args.next() {
            opts.history_events = events.parse()?;
        }
        return history_size(&base, opts).await;
    }
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

/// Writes 10 transactions of 100,000 puts and prints the file size after each.
async fn history_size(
    base: &std::path::Path,
    opts: RedbOptions,
) -> Result<(), Box<dyn std::error::Error>> {
    const TXNS: usize = 10;
    const PUTS: usize = 100_000;
    let dir = tempfile::tempdir_in(base)?;
    let path = dir.path().join("history.redb");
    println!("options: {opts:?}");
    let store = RedbStore::open(&path, opts)?;
    let value = [b'v'; 60];
    let start = Instant::now();
    for t in 0..TXNS {
        let mut txn = Txn::new();
        for i in 0..PUTS {
            txn = txn.then(Op::put(format!("claims/pool-{t}/{i:08}"), value));
        }
        let rev = store.txn(txn).await?.revision;
        let size = std::fs::metadata(&path)?.len();
        println!(
            "after txn {:>2} (revision {rev}): {:>6.1} MiB",
            t + 1,
            size as f64 / (1 << 20) as f64
        );
    }
    store.close()?;
    let size = std::fs::metadata(&path)?.len();
    println!(
        "closed: {:>6.1} MiB ({size} bytes) in {:.1?}",
        size as f64 / (1 << 20) as f64,
        start.elapsed()
    );
    print_table_stats(&path)?;
    Ok(())
}

/// Prints redb's storage statistics of every table of a closed store.
fn print_table_stats(path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    use redb::{ReadableDatabase, ReadableTableMetadata, TableHandle};
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    {
        let db = redb::Database::open(path)?;
        let wtx = db.begin_write()?;
        let stats = wtx.stats()?;
        println!(
            "allocated: {:.1} MiB ({} pages)",
            mib(stats.allocated_pages() * stats.page_size() as u64),
            stats.allocated_pages()
        );
        wtx.abort()?;
    }
    let db = redb::ReadOnlyDatabase::open(path)?;
    let rtx = db.begin_read()?;
    for handle in rtx.list_tables()? {
        let name = handle.name().to_string();
        let table = rtx.open_untyped_table(handle)?;
        let stats = table.stats()?;
        println!(
            "table {name:>12}: {:>9} entries, height {}, {:>6} leaf + {:>4} branch pages, \
             {:>6.1} MiB stored, {:>6.1} MiB metadata, {:>6.1} MiB fragmented",
            table.len()?,
            stats.tree_height(),
            stats.leaf_pages(),
            stats.branch_pages(),
            mib(stats.stored_bytes()),
            mib(stats.metadata_bytes()),
            mib(stats.fragmented_bytes()),
        );
    }
    Ok(())
}
