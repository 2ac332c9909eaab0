//! Prometheus metrics: per-operation request counters and latency
//! histograms (labels `operation` and `code`, the outcome: `ok` or the
//! error's stable code), and per-pool gauges computed at scrape time.
//!
//! Uses the `prometheus` crate with a registry per server rather than the
//! `metrics` facade, whose recorder is process-global: several servers in
//! one process (tests, applications embedding the server) keep their own
//! numbers, and the pool gauges are rebuilt on every scrape so a deleted
//! pool disappears instead of lingering.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

use crate::error::{ApiError, OutcomeCode};
use crate::AppState;

/// The server's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    pool_size: GaugeVec,
    pool_allocated: GaugeVec,
    pool_free: GaugeVec,
    pool_utilization: GaugeVec,
    /// Operation names by (method, route), from the OpenAPI operation ids.
    operations: HashMap<(Method, String), String>,
    /// One scrape at a time: each rebuilds the pool gauges.
    scrape: tokio::sync::Mutex<()>,
}

impl Metrics {
    pub(crate) fn new(
        operations: HashMap<(Method, String), String>,
    ) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "allot_http_requests_total",
                "Requests handled, by operation and outcome code (ok or the error code)",
            ),
            &["operation", "code"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "allot_http_request_duration_seconds",
                "Time from routing to response, by operation and outcome code",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["operation", "code"],
        )?;
        let gauge = |name: &str, help: &str| GaugeVec::new(Opts::new(name, help), &["pool"]);
        let pool_size = gauge("allot_pool_size", "Values in the pool (units)")?;
        let pool_allocated = gauge("allot_pool_allocated", "Values claimed (units)")?;
        let pool_free = gauge(
            "allot_pool_free",
            "Values free to claim (units; excludes reserved and quarantined)",
        )?;
        let pool_utilization = gauge(
            "allot_pool_utilization",
            "Claimed share of what can be claimed, 0-1",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        for g in [&pool_size, &pool_allocated, &pool_free, &pool_utilization] {
            registry.register(Box::new(g.clone()))?;
        }
        Ok(Metrics {
            registry,
            requests,
            latency,
            pool_size,
            pool_allocated,
            pool_free,
            pool_utilization,
            operations,
            scrape: tokio::sync::Mutex::new(()),
        })
    }

    pub(crate) fn observe(&self, operation: &str, code: &str, seconds: f64) {
        self.requests.with_label_values(&[operation, code]).inc();
        self.latency
            .with_label_values(&[operation, code])
            .observe(seconds);
    }
}

/// Middleware (on matched routes): counts and times every request.
pub(crate) async fn track(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let operation = s
        .metrics
        .operations
        .get(&(req.method().clone(), route.clone()))
        .cloned()
        .unwrap_or_else(|| format!("{} {route}", req.method()));
    let start = Instant::now();
    let resp = next.run(req).await;
    let elapsed = start.elapsed();
    let code = match resp.extensions().get::<OutcomeCode>() {
        Some(c) => c.0,
        None if resp.status().is_success() => "ok",
        None => "other",
    };
    s.metrics.observe(&operation, code, elapsed.as_secs_f64());
    tracing::debug!(
        operation,
        code,
        status = resp.status().as_u16(),
        ?elapsed,
        "request"
    );
    resp
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "operations", operation_id = "metrics",
    responses(
        (status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain", body = String),
        (status = 401, description = "`unauthenticated`", body = crate::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn metrics(State(s): State<AppState>) -> Result<Response, ApiError> {
    let m: &Arc<Metrics> = &s.metrics;
    let _one = m.scrape.lock().await;
    let pools = s.allot.list_pools().await?;
    for g in [
        &m.pool_size,
        &m.pool_allocated,
        &m.pool_free,
        &m.pool_utilization,
    ] {
        g.reset();
    }
    for p in &pools {
        let name = [p.record.name.as_str()];
        m.pool_size
            .with_label_values(&name)
            .set(p.stats.size as f64);
        m.pool_allocated
            .with_label_values(&name)
            .set(p.stats.allocated as f64);
        m.pool_free
            .with_label_values(&name)
            .set(p.stats.free as f64);
        m.pool_utilization
            .with_label_values(&name)
            .set(p.utilization);
    }
    let text = TextEncoder::new()
        .encode_to_string(&m.registry.gather())
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("encoding metrics: {e}"),
            )
        })?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
