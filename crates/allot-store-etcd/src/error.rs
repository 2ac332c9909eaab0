//! Errors of the etcd backend and how they map onto [`StoreError`].
//!
//! The mapping decides what a caller may retry: anything that means "etcd
//! could not be reached, has no leader, or did not answer in time" becomes
//! [`StoreError::Unavailable`], so the engine retries or reports an outage,
//! never a bug. The few answers that carry store-level meaning (a compacted
//! or future revision, a missing lease) are recognised by the calls that
//! can get them, which know the context (which revision, which lease).

use std::time::Duration;

use allot_store::StoreError;
use etcd_client::Error as ClientError;
use tonic::Code;

/// Why a call to etcd failed, before it is mapped onto [`StoreError`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum EtcdError {
    /// An error reported by the client library or the server.
    #[error("etcd: {0}")]
    Client(#[from] ClientError),
    /// The server did not answer within the request timeout.
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
}

/// The server's messages for the answers with store-level meaning (etcd
/// reports them as plain gRPC statuses; their text is part of its API).
const COMPACTED: &str = "required revision has been compacted";
const FUTURE_REVISION: &str = "required revision is a future revision";
const LEASE_NOT_FOUND: &str = "requested lease not found";

impl EtcdError {
    fn status(&self) -> Option<&tonic::Status> {
        match self {
            EtcdError::Client(ClientError::GRpcStatus(status)) => Some(status),
            _ => None,
        }
    }

    fn says(&self, text: &str) -> bool {
        self.status().is_some_and(|s| s.message().contains(text))
    }

    /// The requested revision is older than etcd's compaction point.
    pub(crate) fn is_compacted(&self) -> bool {
        self.says(COMPACTED)
    }

    /// The requested revision is newer than etcd's current revision.
    pub(crate) fn is_future_revision(&self) -> bool {
        self.says(FUTURE_REVISION)
    }

    /// A lease named by the request does not exist (expired or revoked).
    pub(crate) fn is_lease_not_found(&self) -> bool {
        self.says(LEASE_NOT_FOUND)
            || matches!(
                self,
                EtcdError::Client(ClientError::LeaseKeepAliveError(text))
                    if text.contains("lease not found")
            )
    }
}

impl From<EtcdError> for StoreError {
    fn from(err: EtcdError) -> Self {
        let text = err.to_string();
        match &err {
            EtcdError::Timeout(_) => StoreError::Unavailable(text),
            EtcdError::Client(client) => match client {
                ClientError::GRpcStatus(status) => match status.code() {
                    // Not reachable, no leader, too slow, connection reset,
                    // overloaded: all may succeed when retried.
                    Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::Cancelled
                    | Code::Aborted
                    | Code::ResourceExhausted
                    | Code::Unknown
                    | Code::Internal => StoreError::Unavailable(text),
                    // Too many operations in one transaction, a request
                    // over etcd's size limit, an empty key.
                    Code::InvalidArgument | Code::OutOfRange => StoreError::Invalid(text),
                    _ => StoreError::Backend(text),
                },
                ClientError::TransportError(_)
                | ClientError::IoError(_)
                | ClientError::WatchError(_)
                | ClientError::LeaseKeepAliveError(_) => StoreError::Unavailable(text),
                ClientError::InvalidArgs(_) | ClientError::InvalidUri(_) => {
                    StoreError::Invalid(text)
                }
                _ => StoreError::Backend(text),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: Code, message: &str) -> EtcdError {
        EtcdError::Client(ClientError::GRpcStatus(tonic::Status::new(code, message)))
    }

    #[test]
    fn outages_are_unavailable() {
        for code in [Code::Unavailable, Code::DeadlineExceeded, Code::Unknown] {
            let e: StoreError = status(code, "etcdserver: no leader").into();
            assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
        }
        let e: StoreError = EtcdError::Timeout(Duration::from_secs(1)).into();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    }

    #[test]
    fn store_level_answers_are_recognised() {
        let e = status(
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted",
        );
        assert!(e.is_compacted() && !e.is_future_revision());
        let e = status(
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision",
        );
        assert!(e.is_future_revision());
        let e = status(Code::NotFound, "etcdserver: requested lease not found");
        assert!(e.is_lease_not_found());
        let e: StoreError = status(
            Code::InvalidArgument,
            "etcdserver: too many operations in txn request",
        )
        .into();
        assert!(matches!(e, StoreError::Invalid(_)), "{e:?}");
    }
}
