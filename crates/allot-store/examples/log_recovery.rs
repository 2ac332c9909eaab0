//! Memory and recovery time of the log store with many keys: writes N keys
//! (default 1,000,000; 32-byte keys, 60-byte values, 1,000 puts per
//! transaction), then reports the process's resident memory, the size of
//! the data directory, and how long reopening takes (snapshot load + log
//! replay), with default [`LogOptions`] unless `SNAPSHOT_MIB` is set.
//!
//! ```text
//! cargo run --release -p allot-store --example log_recovery -- [DIR] [KEYS]
//! ```

use std::time::Instant;

use allot_store::{LogOptions, LogStore, Op, Store, Txn};

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn dir_mib(dir: &std::path::Path) -> f64 {
    let bytes: u64 = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    bytes as f64 / (1024.0 * 1024.0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let base = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let keys: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let mut opts = LogOptions::default();
    if let Ok(mib) = std::env::var("SNAPSHOT_MIB") {
        opts.snapshot_bytes = mib.parse::<u64>()? << 20;
    }
    let tmp = tempfile::tempdir_in(&base)?;
    let dir = tmp.path().join("log");
    let rss0 = rss_mib();
    let store = LogStore::open(&dir, opts.clone())?;
    let value = vec![b'v'; 60];
    let started = Instant::now();
    for chunk in (0..keys).collect::<Vec<_>>().chunks(1000) {
        let mut txn = Txn::new();
        for i in chunk {
            txn = txn.then(Op::put(format!("pools/p/claims/{i:016}"), &value));
        }
        store.txn(txn).await?;
    }
    let fill = started.elapsed();
    println!(
        "filled {keys} keys in {:.1} s; RSS {:.0} MiB (+{:.0} MiB), directory {:.0} MiB, {} commits",
        fill.as_secs_f64(),
        rss_mib(),
        rss_mib() - rss0,
        dir_mib(&dir),
        store.commits()
    );
    store.close()?;
    let started = Instant::now();
    let store = LogStore::open(&dir, opts)?;
    let reopen = started.elapsed();
    println!(
        "reopened in {:.2} s: {:?}; {} keys; RSS {:.0} MiB",
        reopen.as_secs_f64(),
        store.recovery(),
        store.range(b"", b"", 0).await?.kvs.len(),
        rss_mib()
    );
    Ok(())
}
