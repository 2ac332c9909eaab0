//! Claims keys as fast as it can from several concurrent tasks and prints
//! `KEY VALUE` for each claim after it has been acknowledged (committed).
//! Usage: crash-child DATA_DIR TAG
//! Runs until killed.

use std::io::Write;
use std::sync::Arc;

use allot::{AllocRequest, Allot, Error, PoolKind, PoolSpec};
use allot_store::{RedbOptions, RedbStore};

const TASKS: usize = 16;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(dir), Some(tag)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: crash-child DATA_DIR TAG");
    };
    let store = RedbStore::open(
        std::path::Path::new(&dir).join("allot.redb"),
        RedbOptions::default(),
    )?;
    let allot = Allot::new(Arc::new(store));
    let spec = PoolSpec::new(PoolKind::Range { lo: 1, hi: 1 << 40 });
    match allot.create_pool("crash", spec, Default::default()).await {
        Ok(_) | Err(Error::PoolExists(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let allot = allot.clone();
        let tag = tag.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0u64.. {
                let key = format!("{tag}-{t}-{i}");
                let claim = allot.allocate("crash", AllocRequest::key(&key)).await?;
                let mut out = std::io::stdout().lock();
                writeln!(out, "{key} {}", claim[0].value)?;
                out.flush()?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}
