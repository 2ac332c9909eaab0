//! A member pod: joins a shared store as a member and allocates from a
//! member-blocks pool at a steady rate, appending each value it hands out to
//! its history file before "using" it. The histories of all pods are the
//! application's record of the values in use, which is also what the scan
//! callback answers from when this pod takes over an orphan block.
//!
//! Usage: member-child STORE_URL|SERVER_URL NAME POOL HISTORY_DIR INTERVAL_MS TTL_MS
//!
//! With a store URL the pod embeds the engine on that store; with
//! `http://HOST:PORT` it is a remote member through that `allot serve`
//! (`allot_client::RemoteMember`).
//!
//! History lines (`HISTORY_DIR/NAME.log`, one `write` each, so a line is
//! never torn by `kill -9`; their format: `allot_testkit::history`): a
//! value handed out, or the member found itself fenced (it then joins
//! again, as a restarted pod would). Runs until killed.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use allot::{Allot, BlockScan, MemberOptions, OwnedValue};
use allot_testkit::history::Line;
use anyhow::{bail, Context};

/// The member, embedded on the store or remote through a server.
enum Pod {
    Local(allot::Member),
    Remote(allot_client::RemoteMember),
}

/// Where a pod joins.
enum Cluster {
    Store(Allot),
    Server(allot_client::Client),
}

/// What an allocation came to.
enum Outcome {
    Value(OwnedValue),
    /// The lease is gone (or may be): join again.
    Fenced(String),
    /// The store or server is away or busy for a moment.
    Retry,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, name, pool, dir, interval_ms, ttl_ms] = args.as_slice() else {
        bail!("usage: member-child STORE_URL|SERVER_URL NAME POOL HISTORY_DIR INTERVAL_MS TTL_MS");
    };
    let interval = Duration::from_millis(interval_ms.parse().context("INTERVAL_MS")?);
    let ttl = Duration::from_millis(ttl_ms.parse().context("TTL_MS")?);
    let dir = PathBuf::from(dir);
    // http://…: a remote member through `allot serve`; else a store URL.
    let cluster = if url.starts_with("http://") || url.starts_with("https://") {
        Cluster::Server(allot_client::Client::new(url)?)
    } else {
        let backend = allot_backends::Backend::open(&url.parse()?, &dir).await?;
        Cluster::Store(Allot::new(backend.store()))
    };
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
    let mut member = join(&cluster, name, &options, interval).await;
    loop {
        match allocate(&member, pool).await? {
            Outcome::Value(v) => {
                let line = Line::Value {
                    value: v
                        .value
                        .parse()
                        .with_context(|| format!("not an integer value: {}", v.value))?,
                    block: v.block,
                    epoch: v.epoch,
                    incarnation: member.incarnation(),
                };
                history.write_all(format!("{line}\n").as_bytes())?;
            }
            Outcome::Fenced(why) => {
                let line = Line::Fenced {
                    incarnation: member.incarnation(),
                    why,
                };
                history.write_all(format!("{line}\n").as_bytes())?;
                // A pod that lost its lease starts over as a new incarnation.
                member = join(&cluster, name, &options, interval).await;
            }
            Outcome::Retry => {}
        }
        tokio::time::sleep(interval).await;
    }
}

impl Pod {
    fn incarnation(&self) -> u64 {
        match self {
            Pod::Local(m) => m.incarnation(),
            Pod::Remote(m) => m.incarnation(),
        }
    }
}

async fn allocate(member: &Pod, pool: &str) -> anyhow::Result<Outcome> {
    Ok(match member {
        Pod::Local(m) => match m.allocate(pool).await {
            Ok(v) => Outcome::Value(v),
            Err(allot::Error::Fenced(why)) => Outcome::Fenced(why),
            Err(allot::Error::Store(_) | allot::Error::Contention(_)) => Outcome::Retry,
            Err(e) => return Err(e.into()),
        },
        Pod::Remote(m) => match m.allocate(pool).await {
            Ok(v) => Outcome::Value(v),
            Err(e) if e.code() == "fenced" => Outcome::Fenced(e.to_string()),
            // A session that ended: the member is done; so is its lease soon.
            Err(e) if e.code() == "unavailable" && !m.is_live() => Outcome::Fenced(e.to_string()),
            Err(e) if e.is_retryable() => Outcome::Retry,
            Err(e) => return Err(e.into()),
        },
    })
}

/// Joins, retrying while the store or server is busy or away.
async fn join(cluster: &Cluster, name: &str, options: &MemberOptions, pause: Duration) -> Pod {
    loop {
        let joined = match cluster {
            Cluster::Store(engine) => engine
                .join(name, options.clone())
                .await
                .map(Pod::Local)
                .map_err(anyhow::Error::from),
            Cluster::Server(client) => client
                .join(name, options.clone())
                .await
                .map(Pod::Remote)
                .map_err(anyhow::Error::from),
        };
        match joined {
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
            if let Ok(Line::Value { value, .. }) = line.parse() {
                if (lo..=hi).contains(&value) {
                    values.insert(value);
                }
            }
        }
    }
    Ok(values.into_iter().map(|v| v.to_string()).collect())
}
