use crate::Revision;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The requested revision is older than the retained history.
    #[error("revision {requested} has been compacted (oldest retained revision is {oldest})")]
    Compacted {
        requested: Revision,
        oldest: Revision,
    },
    /// The requested revision is newer than the store's current revision.
    #[error("revision {requested} is in the future (current revision is {current})")]
    FutureRevision {
        requested: Revision,
        current: Revision,
    },
    /// The lease does not exist (never granted, expired or revoked).
    #[error("lease {0} not found (expired or revoked)")]
    LeaseNotFound(u64),
    /// The store cannot be reached or is shutting down; the call may be retried.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The data directory is locked by another process.
    #[error("data directory {path} is in use by another process: {detail}")]
    Locked { path: String, detail: String },
    /// Stored bytes could not be decoded; never silently reset.
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    /// An I/O or backend error.
    #[error("store backend error: {0}")]
    Backend(String),
    /// The call itself was invalid (for example an empty key).
    #[error("invalid store request: {0}")]
    Invalid(String),
}
