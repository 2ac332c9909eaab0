/// Why a core operation was refused. Every refusal leaves the state unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// The pool definition itself is invalid (bad CIDR, inverted range, ...);
    /// the message names the problem on its own.
    #[error("{0}")]
    InvalidSpec(String),
    /// A value could not be parsed or does not belong to the pool.
    #[error("{0}")]
    InvalidValue(String),
    /// The value is reserved and can never be allocated.
    #[error("value {0} is reserved")]
    Reserved(String),
    /// The value (or part of the requested prefix) is already allocated.
    #[error("value {0} is already allocated")]
    Taken(String),
    /// The value is not allocated (releasing it is an error, not a no-op,
    /// so a caller with a stale view learns about it).
    #[error("value {0} is not allocated")]
    NotAllocated(String),
    /// The value was released recently and is held back until `until_ms`.
    #[error(
        "value {value} is in quarantine after its release (until {until_ms} ms since the epoch)"
    )]
    Quarantined { value: String, until_ms: u64 },
    /// Not enough free values for an all-or-nothing request.
    #[error("pool exhausted: asked for {requested}, {available} free")]
    Exhausted { requested: u64, available: u128 },
    /// Stored state could not be decoded.
    #[error("corrupt pool state: {0}")]
    Corrupt(String),
}

pub type Result<T, E = CoreError> = std::result::Result<T, E>;
