//! Opening and closing the store local commands work on.

use std::path::Path;

use allot::Allot;
use allot_backends::{Backend, OpenError, StoreUrl, LOG_DIR, REDB_FILE};
use anyhow::{bail, Result};

/// File name of the embedded database inside the data dir.
pub const DB_FILE: &str = REDB_FILE;

/// An engine over the store of one command.
pub struct Session {
    /// The engine the command runs on.
    pub allot: Allot,
    // Kept so that `close` can report a failed final commit instead of only
    // logging it on drop.
    store: Backend,
}

impl Session {
    /// Opens the store. For the embedded store, unless `create`, a data dir
    /// without a database is an error and nothing is created.
    pub async fn open(url: &StoreUrl, data_dir: &Path, create: bool) -> Result<Session> {
        let url = &url.resolve(data_dir);
        let embedded = match url {
            StoreUrl::Redb => Some(DB_FILE),
            StoreUrl::Log => Some(LOG_DIR),
            _ => None,
        };
        if embedded.is_some_and(|name| !create && !data_dir.join(name).exists()) {
            bail!(
                "no allot data in {}: create a pool first, or point --data-dir / ALLOT_DATA_DIR at it",
                data_dir.display()
            );
        }
        let store = Backend::open(url, data_dir).await.map_err(|e| match e {
            OpenError::Store { store, source } => {
                anyhow::anyhow!("cannot open {store}: {source}")
            }
            e => e.into(),
        })?;
        let allot = Allot::new(store.store());
        Ok(Session { allot, store })
    }

    /// Waits for the engine to finish, then commits what is queued and
    /// lets go of the store.
    pub async fn close(self) -> Result<()> {
        self.allot.close().await;
        Ok(self.store.close().await?)
    }
}
