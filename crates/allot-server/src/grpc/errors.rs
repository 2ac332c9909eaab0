//! gRPC statuses for refused and failed calls: the status code documented at
//! the top of `allot.proto`, the human message, and the stable machine code
//! REST returns in `error.code` as the `allot-code` metadata entry.

use allot_store::StoreError;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

use crate::error::{one_line, ApiError};

/// Metadata key carrying the stable machine code of an error.
pub const ALLOT_CODE: &str = "allot-code";

/// The gRPC code for a stable machine code (see `allot.proto`).
pub(crate) fn grpc_code(code: &str) -> Code {
    match code {
        "invalid_argument" => Code::InvalidArgument,
        "pool_not_found" | "not_found" => Code::NotFound,
        "pool_exists" => Code::AlreadyExists,
        // A value taken or quarantined, a key bound elsewhere, a value
        // holding a nested pool: the state must change before a retry can
        // succeed, which is what FAILED_PRECONDITION says.
        "conflict" | "pool_not_empty" => Code::FailedPrecondition,
        "exhausted" | "too_large" => Code::ResourceExhausted,
        "contention" => Code::Aborted,
        "compacted" => Code::OutOfRange,
        "unavailable" => Code::Unavailable,
        "unauthenticated" => Code::Unauthenticated,
        _ => Code::Internal,
    }
}

/// A status with its `allot-code`.
pub(crate) fn status(code: &'static str, message: impl Into<String>) -> Status {
    let mut metadata = MetadataMap::new();
    metadata.insert(ALLOT_CODE, MetadataValue::from_static(code));
    Status::with_metadata(grpc_code(code), one_line(&message.into()), metadata)
}

/// `INVALID_ARGUMENT` (`invalid_argument`).
pub(crate) fn invalid(message: impl Into<String>) -> Status {
    status("invalid_argument", message)
}

/// The status for an engine error. Watch revisions the store cannot serve
/// get the codes REST's watch gives them (`compacted`, `invalid_argument`):
/// the engine files them under `store_error`, which would read as a server
/// fault, while they are about the revision the client asked for.
pub(crate) fn from_engine(e: allot::Error) -> Status {
    let code = match &e {
        allot::Error::Store(StoreError::Compacted { .. }) => "compacted",
        allot::Error::Store(StoreError::FutureRevision { .. }) => "invalid_argument",
        e => e.code(),
    };
    if grpc_code(code) == Code::Internal {
        tracing::warn!(code, "grpc: {e}");
    }
    status(code, e.to_string())
}

/// The status for a REST-side refusal (authentication), keeping its code.
pub(crate) fn from_api(e: ApiError) -> Status {
    status(e.code, e.message)
}

/// The `allot-code` a status carries, if it is one of ours.
pub(crate) fn code_of(s: &Status) -> Option<&str> {
    s.metadata().get(ALLOT_CODE).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_map_as_documented() {
        let cases: Vec<(allot::Error, Code, &str)> = vec![
            (
                allot::Error::InvalidInput("x".into()),
                Code::InvalidArgument,
                "invalid_argument",
            ),
            (
                allot::Error::PoolNotFound("p".into()),
                Code::NotFound,
                "pool_not_found",
            ),
            (
                allot::Error::NotFound("x".into()),
                Code::NotFound,
                "not_found",
            ),
            (
                allot::Error::PoolExists("p".into()),
                Code::AlreadyExists,
                "pool_exists",
            ),
            (
                allot::Error::Conflict("x".into()),
                Code::FailedPrecondition,
                "conflict",
            ),
            (
                allot::Error::PoolNotEmpty {
                    pool: "p".into(),
                    claims: 1,
                },
                Code::FailedPrecondition,
                "pool_not_empty",
            ),
            (
                allot::Error::Exhausted {
                    pool: "p".into(),
                    requested: 2,
                    available: 1,
                },
                Code::ResourceExhausted,
                "exhausted",
            ),
            (
                allot::Error::Contention("p".into()),
                Code::Aborted,
                "contention",
            ),
            (
                allot::Error::Store(StoreError::Compacted {
                    requested: 1,
                    oldest: 5,
                }),
                Code::OutOfRange,
                "compacted",
            ),
            (
                allot::Error::Store(StoreError::FutureRevision {
                    requested: 9,
                    current: 5,
                }),
                Code::InvalidArgument,
                "invalid_argument",
            ),
            (
                allot::Error::Store(StoreError::Unavailable("x".into())),
                Code::Unavailable,
                "unavailable",
            ),
            (
                allot::Error::Store(StoreError::Backend("x".into())),
                Code::Internal,
                "store_error",
            ),
            (
                allot::Error::Corrupt("x\ny".into()),
                Code::Internal,
                "corrupt",
            ),
        ];
        for (e, code, allot_code) in cases {
            let what = format!("{e:?}");
            let s = from_engine(e);
            assert_eq!(s.code(), code, "{what}");
            assert_eq!(code_of(&s), Some(allot_code), "{what}");
            assert!(!s.message().contains('\n'), "{what}: one line");
        }
    }
}
