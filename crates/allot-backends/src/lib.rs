//! Every store backend behind one `--store` URL.
//!
//! The server, the CLI and applications embedding the engine choose where
//! allot keeps its state with one string, parsed into a [`StoreUrl`] and
//! opened into a [`Backend`]:
//!
//! | `--store` | backend |
//! |---|---|
//! | `redb` (default) | the embedded store, one file in the data dir |
//! | `log` | the embedded log-structured store (write-ahead log + snapshots) in the data dir |
//! | `postgres://user@host:port/db[?schema=NAME]` | a PostgreSQL database (`postgresql://` too) |
//! | `etcd://host:port[,host:port...][/NAMESPACE]` | an etcd cluster (keys under NAMESPACE, default `allot/`) |
//!
//! Keeping this in its own crate lets the engine stay free of backend
//! dependencies while every front end spells stores the same way.
//!
//! ```no_run
//! # async fn demo() -> Result<(), allot_backends::OpenError> {
//! use allot_backends::{Backend, StoreUrl};
//! let url: StoreUrl = "postgres://allot@db.example:5432/allot".parse()?;
//! let backend = Backend::open(&url, std::path::Path::new("./allot-data")).await?;
//! let engine = allot::Allot::new(backend.store());
//! // ... allocate ...
//! engine.close().await;
//! backend.close().await?;
//! # Ok(()) }
//! ```

mod open;
mod url;

pub use open::{Backend, OpenError, LOG_DIR, REDB_FILE};
pub use url::StoreUrl;
