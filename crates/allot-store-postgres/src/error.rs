//! Errors of the PostgreSQL backend and how they map onto [`StoreError`].
//!
//! The mapping decides what a caller may retry: anything that means "the
//! database could not be reached or did not answer in time" becomes
//! [`StoreError::Unavailable`], so the engine retries or reports it as an
//! outage, never as a bug or a corruption.

use std::time::Duration;

use allot_store::StoreError;

/// Why a call to PostgreSQL failed, before it is mapped onto [`StoreError`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum PgError {
    /// An error reported by the client library or the server.
    #[error("PostgreSQL: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// The connection pool could not hand out a connection.
    #[error("PostgreSQL connection pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The server did not answer within the configured timeout.
    #[error("PostgreSQL did not answer within {0:?}")]
    Timeout(Duration),
    /// A stored value is outside what this backend writes.
    #[error("{0}")]
    Corrupt(String),
}

/// SQLSTATE codes that mean "try again later": the server is going away,
/// starting, overloaded, or a lock or statement timeout fired.
fn is_transient(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || matches!(
            code,
            "57P01" // admin_shutdown
                | "57P02" // crash_shutdown
                | "57P03" // cannot_connect_now
                | "57014" // query_canceled (statement or lock timeout)
                | "55P03" // lock_not_available
                | "53300" // too_many_connections
                | "53400" // configuration_limit_exceeded
                | "40001" // serialization_failure
                | "40P01" // deadlock_detected
                | "25P03" // idle_in_transaction_session_timeout
        )
}

fn map_db(err: tokio_postgres::Error) -> StoreError {
    if let Some(db) = err.as_db_error() {
        let code = db.code().code();
        let text = format!("PostgreSQL: {} (SQLSTATE {code})", db.message());
        return if is_transient(code) {
            StoreError::Unavailable(text)
        } else {
            StoreError::Backend(text)
        };
    }
    // No server error: the connection broke, could not be made, or timed
    // out; all of them are outages. Only encoding and decoding problems are
    // not, and those are bugs or foreign data.
    let io = std::error::Error::source(&err).is_some_and(|s| s.is::<std::io::Error>());
    let text = err.to_string();
    if err.is_closed()
        || io
        || text.starts_with("error connecting")
        || text.starts_with("timeout")
        || text.starts_with("error communicating")
    {
        StoreError::Unavailable(format!("PostgreSQL: {text}"))
    } else {
        StoreError::Backend(format!("PostgreSQL: {text}"))
    }
}

impl From<PgError> for StoreError {
    fn from(err: PgError) -> Self {
        match err {
            PgError::Db(e) => map_db(e),
            PgError::Pool(deadpool_postgres::PoolError::Backend(e)) => map_db(e),
            PgError::Pool(e) => StoreError::Unavailable(format!("PostgreSQL connection pool: {e}")),
            e @ PgError::Timeout(_) => StoreError::Unavailable(e.to_string()),
            PgError::Corrupt(text) => StoreError::Corrupt(text),
        }
    }
}

/// Errors of store calls: either a store-level answer (a missing lease, a
/// compacted revision) or a PostgreSQL failure.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Pg(#[from] PgError),
}

impl From<tokio_postgres::Error> for CallError {
    fn from(e: tokio_postgres::Error) -> Self {
        CallError::Pg(PgError::Db(e))
    }
}

impl From<deadpool_postgres::PoolError> for CallError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        CallError::Pg(PgError::Pool(e))
    }
}

impl From<CallError> for StoreError {
    fn from(err: CallError) -> Self {
        match err {
            CallError::Store(e) => e,
            CallError::Pg(e) => e.into(),
        }
    }
}

impl CallError {
    /// True if the connection that produced this error must not be reused:
    /// a PostgreSQL error may leave a transaction open or aborted, or the
    /// connection half-way through a pipeline.
    pub(crate) fn poisons_connection(&self) -> bool {
        matches!(self, CallError::Pg(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_codes() {
        assert!(is_transient("08006"));
        assert!(is_transient("57P01"));
        assert!(!is_transient("23505"));
        assert!(!is_transient("42P01"));
    }

    #[test]
    fn timeouts_and_pool_errors_are_unavailable() {
        let e: StoreError = PgError::Timeout(Duration::from_secs(5)).into();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
        let e: StoreError = PgError::Pool(deadpool_postgres::PoolError::Closed).into();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
        let e: StoreError = PgError::Corrupt("x".into()).into();
        assert!(matches!(e, StoreError::Corrupt(_)), "{e:?}");
    }
}
