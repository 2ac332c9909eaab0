//! Opening and closing the local data dir.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use allot::Allot;
use allot_store::{RedbOptions, RedbStore, StoreError};
use anyhow::{anyhow, bail, Context, Result};

/// File name of the database inside the data dir.
pub const DB_FILE: &str = "allot.redb";

/// An engine over the redb file of one data dir.
pub struct Session {
    /// The engine the command runs on.
    pub allot: Allot,
    // A second handle on the same database, kept so that `close` can report
    // a failed final commit instead of only logging it on drop.
    store: RedbStore,
}

impl Session {
    /// Opens `data_dir`. Unless `create`, a data dir without a database is
    /// an error and nothing is created.
    pub fn open(data_dir: &Path, create: bool) -> Result<Session> {
        let path = data_dir.join(DB_FILE);
        if !create && !path.exists() {
            bail!(
                "no allot data in {}: create a pool first, or point --data-dir / ALLOT_DATA_DIR at it",
                data_dir.display()
            );
        }
        let store = RedbStore::open(&path, RedbOptions::default())
            .map_err(|e| open_error(data_dir, &path, e))?;
        let allot = Allot::new(Arc::new(store.clone()));
        Ok(Session { allot, store })
    }

    /// Waits for the engine to finish, then commits what is queued and
    /// releases the file lock.
    pub async fn close(self) -> Result<()> {
        let path: PathBuf = self.store.path().to_path_buf();
        self.allot.close().await;
        self.store
            .close()
            .with_context(|| format!("closing {}", path.display()))
    }
}

fn open_error(data_dir: &Path, path: &Path, e: StoreError) -> anyhow::Error {
    match e {
        StoreError::Locked { .. } => anyhow!(
            "the data dir {} is in use by another allot process (is `allot serve` running?)",
            data_dir.display()
        ),
        e => anyhow!("cannot open {}: {e}", path.display()),
    }
}
