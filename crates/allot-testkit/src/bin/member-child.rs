//! A member pod: joins a shared store as a member and allocates from a
//! member-blocks pool at a steady rate, appending each value it hands out to
//! its history file before "using" it. The histories of all pods are the
//! application's record of the values in use, which is also what the scan
//! callback answers from when this pod takes over an orphan block.
//!
//! Usage: member-child STORE_URL NAME POOL HISTORY_DIR INTERVAL_MS TTL_MS
//!
//! History lines (`HISTORY_DIR/NAME.log`, one `write` each, so a line is
//! never torn by `kill -9`): `V VALUE BLOCK EPOCH INCARNATION` for a value
//! handed out, `F INCARNATION REASON` when the member found itself fenced
//! (it then joins again, as a restarted pod would). Runs until killed.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use allot::{Allot, BlockScan, Error, Member, MemberOptions};
use anyhow::{bail, Context};

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, name, pool, dir, interval_ms, ttl_ms] = args.as_slice() else {
        bail!("usage: member-child STORE_URL NAME POOL HISTORY_DIR INTERVAL_MS TTL_MS");
    };
    let interval = Duration::from_millis(interval_ms.parse().context("INTERVAL_MS")?);
    let ttl = Duration::from_millis(ttl_ms.parse().context("TTL_MS")?);
    let dir = PathBuf::from(dir);
    let backend = allot_backends::Backend::open(&url.parse()?, &dir).await?;
    let engine = Allot::new(backend.store());
    let mut history = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))?;
    let scan_dir = dir.clone();
    let options = MemberOptions {
        ttl,
        address: Some(format!("pid-{}", std::process::id())),
        scan: Some(Arc::new(move |req: &BlockScan| in_use(&scan_dir, req))),
        ..MemberOptions::default()
    };
    let mut member = join(&engine, name, &options, interval).await;
    loop {
        match member.allocate(pool).await {
            Ok(v) => {
                let line = format!(
                    "V {} {} {} {}\n",
                    v.value,
                    v.block,
                    v.epoch,
                    member.incarnation()
                );
                history.write_all(line.as_bytes())?;
            }
            Err(Error::Fenced(why)) => {
                let line = format!("F {} {}\n", member.incarnation(), why.replace('\n', " "));
                history.write_all(line.as_bytes())?;
                // A pod that lost its lease starts over as a new incarnation.
                member = join(&engine, name, &options, interval).await;
            }
            // The store is away or busy for a moment: try again.
            Err(Error::Store(_) | Error::Contention(_)) => {}
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(interval).await;
    }
}

/// Joins, retrying while the store is busy or away.
async fn join(engine: &Allot, name: &str, options: &MemberOptions, pause: Duration) -> Member {
    loop {
        match engine.join(name, options.clone()).await {
            Ok(m) => return m,
            Err(e) => {
                eprintln!("member-child {name}: joining: {e}");
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// The values of the scanned block that any pod's history shows in use.
fn in_use(dir: &Path, req: &BlockScan) -> Result<Vec<String>, String> {
    let (lo, hi): (u64, u64) = match (req.first.parse(), req.last.parse()) {
        (Ok(lo), Ok(hi)) => (lo, hi),
        _ => return Err(format!("not an integer block: {}..{}", req.first, req.last)),
    };
    let mut values = BTreeSet::new();
    let entries = std::fs::read_dir(dir).map_err(|e| e.to_string())?;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.extension().is_none_or(|x| x != "log") {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
        for line in text.lines() {
            let mut fields = line.split(' ');
            if fields.next() != Some("V") {
                continue;
            }
            if let Some(Ok(v)) = fields.next().map(str::parse::<u64>) {
                if (lo..=hi).contains(&v) {
                    values.insert(v);
                }
            }
        }
    }
    Ok(values.into_iter().map(|v| v.to_string()).collect())
}
