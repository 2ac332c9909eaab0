use allot_core::CoreError;
use allot_store::StoreError;

/// Why an engine call failed. Every error leaves stored state unchanged.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or can never succeed as written.
    #[error("{0}")]
    InvalidInput(String),
    #[error("pool '{0}' not found")]
    PoolNotFound(String),
    #[error("pool '{0}' already exists")]
    PoolExists(String),
    /// The key or value is not claimed.
    #[error("{0}")]
    NotFound(String),
    /// The request collides with the current state (value taken, key bound
    /// to another value, ...).
    #[error("{0}")]
    Conflict(String),
    #[error("pool '{pool}' is exhausted: asked for {requested}, {available} free")]
    Exhausted {
        pool: String,
        requested: u64,
        available: u128,
    },
    /// The pool still has claims and `force` was not given.
    #[error("pool '{pool}' still holds {claims} claimed value(s); release them first, or delete the pool with force")]
    PoolNotEmpty { pool: String, claims: u64 },
    /// Another writer kept winning; the request was not applied.
    #[error("too much contention on pool '{0}', try again")]
    Contention(String),
    /// A member may have lost its lease, or a block it owned was taken
    /// over: it must not hand out values (join again, or wait for a
    /// keep-alive to get through).
    #[error("{0}")]
    Fenced(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Stored data could not be decoded.
    #[error("corrupt data: {0}")]
    Corrupt(String),
}

impl Error {
    /// A stable machine-readable code for APIs and scripts.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidInput(_) => "invalid_argument",
            Error::PoolNotFound(_) => "pool_not_found",
            Error::PoolExists(_) => "pool_exists",
            Error::NotFound(_) => "not_found",
            Error::Conflict(_) => "conflict",
            Error::Exhausted { .. } => "exhausted",
            Error::PoolNotEmpty { .. } => "pool_not_empty",
            Error::Contention(_) => "contention",
            Error::Fenced(_) => "fenced",
            Error::Store(StoreError::Unavailable(_)) | Error::Store(StoreError::Locked { .. }) => {
                "unavailable"
            }
            Error::Store(_) => "store_error",
            Error::Corrupt(_) => "corrupt",
        }
    }

    pub(crate) fn from_core(pool: &str, e: CoreError) -> Self {
        match e {
            CoreError::InvalidSpec(m) => Error::InvalidInput(m),
            CoreError::InvalidValue(m) => Error::InvalidInput(format!("pool '{pool}': {m}")),
            CoreError::Reserved(v) => {
                Error::InvalidInput(format!("pool '{pool}': value {v} is reserved"))
            }
            e @ (CoreError::Taken(_) | CoreError::Quarantined { .. }) => {
                Error::Conflict(format!("pool '{pool}': {e}"))
            }
            CoreError::NotAllocated(v) => {
                Error::NotFound(format!("pool '{pool}': value {v} is not allocated"))
            }
            CoreError::Exhausted {
                requested,
                available,
            } => Error::Exhausted {
                pool: pool.to_string(),
                requested,
                available,
            },
            CoreError::Corrupt(m) => Error::Corrupt(format!("pool '{pool}': {m}")),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The HTTP status that goes with an error code (as [`Error::code`] gives
/// it): what REST answers, and what clients report for refusals that
/// arrive by other ways (a member session's in-band errors).
///
/// ```
/// assert_eq!(allot::http_status("fenced"), 409);
/// assert_eq!(allot::http_status("unavailable"), 503);
/// ```
pub fn http_status(code: &str) -> u16 {
    match code {
        "invalid_argument" => 400,
        "pool_not_found" | "not_found" => 404,
        "conflict" | "exhausted" | "pool_exists" | "pool_not_empty" | "contention" | "fenced" => {
            409
        }
        "unavailable" => 503,
        _ => 500,
    }
}
