//! Opening and closing the backend a [`StoreUrl`] names.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use allot_store::{LogOptions, LogStore, RedbOptions, RedbStore, Store, StoreError};
use allot_store_etcd::{EtcdOptions, EtcdStore};
use allot_store_postgres::{PostgresOptions, PostgresStore};

use crate::StoreUrl;

/// File name of the embedded redb database inside the data dir.
pub const REDB_FILE: &str = "allot.redb";
/// Directory of the embedded log-structured store inside the data dir.
pub const LOG_DIR: &str = "allot-log";

/// Why a store could not be opened or closed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The `--store` value (or an option of it) is wrong; nothing was touched.
    #[error("{0}")]
    Invalid(String),
    /// The data dir is held by another allot process.
    #[error("the data dir {} is in use by another allot process (is `allot serve` running?)", .0.display())]
    Locked(PathBuf),
    /// The data dir could not be created.
    #[error("cannot create the data dir {}: {source}", path.display())]
    DataDir {
        /// The data dir.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The backend refused or failed.
    #[error("store {store}: {source}")]
    Store {
        /// The store, password masked.
        store: String,
        /// What failed.
        source: StoreError,
    },
}

/// An open store of any backend, with what it takes to close it properly.
///
/// Cloning shares the same store.
#[derive(Clone, Debug)]
pub struct Backend {
    kind: Kind,
    /// Where the state lives, password masked.
    label: String,
}

#[derive(Clone, Debug)]
enum Kind {
    Redb(RedbStore),
    Log(LogStore),
    Postgres(PostgresStore),
    Etcd(EtcdStore),
}

impl Backend {
    /// Opens the store `url` names. The embedded store lives in `data_dir`
    /// (created if missing; [`StoreUrl::Auto`] picks the one there, see
    /// [`StoreUrl::resolve`]); the other backends ignore it.
    ///
    /// Must be called within a tokio runtime.
    pub async fn open(url: &StoreUrl, data_dir: &Path) -> Result<Backend, OpenError> {
        let url = &url.resolve(data_dir);
        let failed = |source| OpenError::Store {
            store: url.to_string(),
            source,
        };
        match url {
            // `resolve` turned `Auto` into one of the two.
            StoreUrl::Auto | StoreUrl::Redb | StoreUrl::Log => {
                std::fs::create_dir_all(data_dir).map_err(|source| OpenError::DataDir {
                    path: data_dir.to_path_buf(),
                    source,
                })?;
                let redb = *url == StoreUrl::Redb;
                let path = data_dir.join(if redb { REDB_FILE } else { LOG_DIR });
                let open_path = path.clone();
                // Opening may replay or migrate: keep it off the runtime's
                // worker threads.
                let opened = tokio::task::spawn_blocking(move || {
                    if redb {
                        RedbStore::open(&open_path, RedbOptions::default()).map(Kind::Redb)
                    } else {
                        LogStore::open(&open_path, LogOptions::default()).map(Kind::Log)
                    }
                })
                .await
                .map_err(|e| failed(StoreError::Backend(format!("opening: {e}"))))?;
                match opened {
                    Ok(kind) => Ok(Backend {
                        kind,
                        label: path.display().to_string(),
                    }),
                    Err(StoreError::Locked { .. }) => Err(OpenError::Locked(data_dir.into())),
                    Err(source) => Err(OpenError::Store {
                        store: path.display().to_string(),
                        source,
                    }),
                }
            }
            StoreUrl::Postgres {
                url: pg,
                schema,
                pool_size,
            } => {
                let mut options = PostgresOptions {
                    // The engine's watches are all it needs history for.
                    history_prefixes: Some(allot::keys::watched_prefixes()),
                    ..PostgresOptions::default()
                };
                if let Some(schema) = schema {
                    options.schema = schema.clone();
                }
                if let Some(n) = pool_size {
                    options.pool_size = *n;
                }
                connected(
                    url,
                    PostgresStore::connect(pg, options).await,
                    Kind::Postgres,
                )
            }
            StoreUrl::Etcd {
                endpoints,
                namespace,
            } => {
                let mut options = EtcdOptions::default();
                if let Some(namespace) = namespace {
                    options.namespace = namespace.clone();
                }
                connected(
                    url,
                    EtcdStore::connect(endpoints, options).await,
                    Kind::Etcd,
                )
            }
        }
    }

    /// The store, to hand to the engine (`allot::Allot::new`).
    pub fn store(&self) -> Arc<dyn Store> {
        match &self.kind {
            Kind::Redb(s) => Arc::new(s.clone()),
            Kind::Log(s) => Arc::new(s.clone()),
            Kind::Postgres(s) => Arc::new(s.clone()),
            Kind::Etcd(s) => Arc::new(s.clone()),
        }
    }

    /// Where the state lives (the database file, or the store URL with any
    /// password masked), for start-up messages.
    pub fn describe(&self) -> &str {
        &self.label
    }

    /// Commits what is queued and lets go of the store (for redb: the file
    /// lock). Close the engine first, so nothing is queued behind this.
    pub async fn close(self) -> Result<(), OpenError> {
        // Both embedded stores close on a blocking thread: the final
        // commit and the release of the lock wait for the disk.
        let (label, close): (String, Box<dyn FnOnce() -> Result<(), StoreError> + Send>) =
            match self.kind {
                Kind::Redb(store) => (self.label, Box::new(move || store.close())),
                Kind::Log(store) => (self.label, Box::new(move || store.close())),
                // Dropping the last handle commits what is queued; the
                // engine, closed first, waits for its answers, so nothing is.
                Kind::Postgres(_) | Kind::Etcd(_) => return Ok(()),
            };
        tokio::task::spawn_blocking(close)
            .await
            .map_err(|e| StoreError::Backend(format!("closing: {e}")))
            .and_then(|r| r)
            .map_err(|source| OpenError::Store {
                store: label,
                source,
            })
    }
}

/// A shared store's connection result as a [`Backend`]: bad options are the
/// caller's mistake ([`OpenError::Invalid`]), anything else the store's.
fn connected<S>(
    url: &StoreUrl,
    result: Result<S, StoreError>,
    kind: impl FnOnce(S) -> Kind,
) -> Result<Backend, OpenError> {
    match result {
        Ok(store) => Ok(Backend {
            kind: kind(store),
            label: url.to_string(),
        }),
        Err(StoreError::Invalid(why)) => Err(OpenError::Invalid(format!("{url}: {why}"))),
        Err(source) => Err(OpenError::Store {
            store: url.to_string(),
            source,
        }),
    }
}
