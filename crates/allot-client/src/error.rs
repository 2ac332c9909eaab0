//! [`Error`]: what a call to the server can fail with.

/// Why a call failed.
///
/// The server's refusals arrive as [`Error::Api`] with its stable code
/// (`pool_not_found`, `conflict`, `exhausted`, `compacted`, ...), its
/// message and the HTTP status; the message is what the engine says, so a
/// remote refusal reads exactly like a local one.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server refused or failed the request.
    #[error("{message}")]
    Api {
        /// HTTP status (for an `error` event of a watch, the status the same
        /// error gets as an answer: 410 for `compacted`).
        status: u16,
        /// Stable machine-readable code.
        code: String,
        /// One line for people.
        message: String,
    },
    /// The request was refused by this client before anything was sent.
    #[error("{0}")]
    InvalidInput(String),
    /// The server could not be reached, or the connection broke.
    #[error("cannot reach the allot server at {url}: {message}")]
    Transport {
        /// The server's base URL.
        url: String,
        /// What went wrong, down to the root cause.
        message: String,
    },
    /// The server answered something this client does not understand (is
    /// the URL that of an allot server?).
    #[error("unexpected answer from {url}: {message}")]
    Protocol {
        /// The URL asked.
        url: String,
        /// What was wrong with the answer.
        message: String,
    },
}

impl Error {
    /// The stable code: the server's for [`Error::Api`], else
    /// `invalid_argument`, `unavailable` or `protocol`.
    pub fn code(&self) -> &str {
        match self {
            Error::Api { code, .. } => code,
            Error::InvalidInput(_) => "invalid_argument",
            Error::Transport { .. } => "unavailable",
            Error::Protocol { .. } => "protocol",
        }
    }

    /// The HTTP status of a server refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether a watch failed because the history it needs is gone: read
    /// the current state again, then watch from now.
    pub fn is_compacted(&self) -> bool {
        self.code() == "compacted"
    }

    /// Whether trying again later may succeed (the server is unreachable,
    /// unavailable, or too contended right now).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Transport { .. } => true,
            Error::Api { status, code, .. } => {
                *status == 503 || *status == 502 || *status == 504 || code == "contention"
            }
            _ => false,
        }
    }

    pub(crate) fn transport(url: &str, e: &reqwest::Error) -> Error {
        Error::Transport {
            url: url.to_string(),
            message: chain(e),
        }
    }
}

/// An error and its sources on one line, without repeating a source that
/// the previous message already includes.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
