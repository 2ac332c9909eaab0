//! The one layer on every REST route: the bearer-token check, where the
//! route's OpenAPI operation declares `bearer` security (all of `/v1` and
//! `/metrics`), and the per-operation metrics.
//!
//! One layer, not one per concern: each `from_fn` layer costs a clone of the
//! boxed inner service and a boxed future per request, and with the token
//! check as a layer of its own the REST claim path paid that twice
//! (BENCHMARKS §5). Taking the "needs a token" flag from the OpenAPI
//! document keeps what is documented and what is enforced one thing; a
//! route without an operation fails closed (token required).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::auth::Auth;
use crate::metrics::Metrics;

/// What the guard needs.
#[derive(Clone)]
pub(crate) struct RouteGuard {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) auth: Auth,
}

/// Middleware (on matched routes): refuses a request that lacks the token
/// with 401 where one is needed, and counts and times every request,
/// refused ones included.
pub(crate) async fn guard(State(g): State<RouteGuard>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str());
    let known = g.metrics.operation(req.method(), route.unwrap_or_default());
    // Only routes without an operation id (none today) pay for a name.
    let unnamed = match known {
        Some(_) => None,
        None => Some(format!("{} {}", req.method(), route.unwrap_or_default())),
    };
    let start = Instant::now();
    let needs_token = known.is_none_or(|op| op.needs_token);
    let header = req.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
    let resp = match needs_token.then(|| g.auth.check(header)) {
        Some(Err(e)) => e.into_response(),
        None | Some(Ok(())) => next.run(req).await,
    };
    g.metrics
        .record(known, unnamed.as_deref(), &resp, start.elapsed());
    resp
}
