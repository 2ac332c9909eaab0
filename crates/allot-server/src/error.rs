//! Errors: [`ApiError`], what a request gets back (a status plus a JSON body
//! `{"error": {"code", "message"}}` with a stable machine code), and
//! [`ServerError`], why the server could not start or stop cleanly.

use std::path::PathBuf;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// A stable code for programs and a message for people.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorDetail {
    /// Stable machine-readable code: `invalid_argument`, `pool_not_found`,
    /// `not_found`, `conflict`, `exhausted`, `pool_exists`, `pool_not_empty`,
    /// `contention`, `too_large`, `unauthenticated`, `unsupported_media_type`,
    /// `method_not_allowed`, `unavailable`, `compacted` (watch history that
    /// is gone), `store_error`, `corrupt`, `internal`.
    #[schema(example = "pool_not_found")]
    pub code: String,
    /// One line for people.
    #[schema(example = "pool 'vlans' not found")]
    pub message: String,
}

/// Marks an error response with its code, so the metrics layer can count
/// outcomes without parsing bodies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutcomeCode(pub &'static str);

/// A refused or failed request: HTTP status, stable code, message.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The HTTP status sent.
    pub status: StatusCode,
    /// The stable machine code (see [`ErrorDetail::code`]).
    pub code: &'static str,
    /// The human message.
    pub message: String,
}

impl ApiError {
    /// An error with an explicit status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 `invalid_argument`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }

    /// 401 `unauthenticated`.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.code, self.message)
    }
}

impl From<allot::Error> for ApiError {
    fn from(e: allot::Error) -> Self {
        let code = e.code();
        let status = StatusCode::from_u16(allot::http_status(code))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ApiError::new(status, code, one_line(&e.to_string()))
    }
}

/// Maps one of axum's extractor rejections by its status: 413 and 415 keep
/// theirs, everything else about the request's shape is a 400.
fn from_rejection(status: StatusCode, what: &str, text: String) -> ApiError {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            status,
            "too_large",
            "request body is larger than the server's limit (--max-body-bytes)",
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
            status,
            "unsupported_media_type",
            "expected a JSON body with `Content-Type: application/json`",
        ),
        s if s.is_server_error() => {
            ApiError::new(status, "internal", format!("{what}: {}", one_line(&text)))
        }
        _ => ApiError::invalid(format!("{what}: {}", one_line(&text))),
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        from_rejection(r.status(), "invalid JSON body", r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        from_rejection(r.status(), "invalid query string", r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        from_rejection(r.status(), "invalid path", r.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(code = self.code, "{}", self.message);
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body is never read, so the connection cannot
            // carry another request: say so, or a client reusing it sees
            // its next request fail (HTTP/2 drops this header by itself).
            resp.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp.extensions_mut().insert(OutcomeCode(self.code));
        resp
    }
}

/// Squeezes a message onto one line.
pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Why the server could not start, or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The settings are unusable (bad file, empty token, ...).
    #[error("{0}")]
    Config(String),
    /// A configuration file could not be read or parsed.
    #[error("config file {}: {message}", path.display())]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A pool declared in the configuration is invalid.
    #[error("config pool '{pool}': {message}")]
    InvalidPool {
        /// The pool's name as declared.
        pool: String,
        /// What is wrong with it.
        message: String,
    },
    /// A pool declared in the configuration exists with another definition.
    #[error(
        "config pool '{pool}' conflicts with the existing pool: {difference}; nothing was changed"
    )]
    PoolConflict {
        /// The pool's name.
        pool: String,
        /// Every field that differs, existing versus configured.
        difference: String,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// Another process holds the data dir's database.
    #[error("the data dir {} is in use by another allot process (is another `allot serve` running?)", .0.display())]
    Locked(PathBuf),
    /// The store could not be opened or closed (bad `--store`, data dir
    /// not writable, database unreachable, ...).
    #[error(transparent)]
    Store(allot_backends::OpenError),
    /// The engine refused a start-up step.
    #[error(transparent)]
    Engine(#[from] allot::Error),
    /// Serving failed.
    #[error("serving: {0}")]
    Serve(std::io::Error),
}
