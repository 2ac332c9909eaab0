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
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus::{
    GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
    TextEncoder,
};

use crate::error::{ApiError, OutcomeCode};
use crate::AppState;

/// One operation's name and its series for successful requests, resolved
/// at its first success (not up front, so that /metrics lists only series
/// that counted something), which keeps the label hashing and the
/// registry's lock off the path of every successful request.
pub(crate) struct Operation {
    name: String,
    /// Whether its OpenAPI operation declares `bearer` security: then the
    /// route guard asks for the token (when the server has one).
    pub(crate) needs_token: bool,
    ok: OnceLock<(IntCounter, Histogram)>,
}

/// The server's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    pool_size: GaugeVec,
    pool_allocated: GaugeVec,
    pool_free: GaugeVec,
    pool_utilization: GaugeVec,
    /// Operations by route and method, from the OpenAPI operation ids:
    /// looked up by the matched route as a `&str`, so that counting a
    /// request allocates nothing.
    operations: HashMap<String, Vec<(Method, Operation)>>,
    /// One scrape at a time: each rebuilds the pool gauges.
    scrape: tokio::sync::Mutex<()>,
}

impl Metrics {
    /// `operations`: each route's operation id and whether it needs the
    /// token, by method and route.
    pub(crate) fn new(
        operations: HashMap<(Method, String), (String, bool)>,
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
        let mut by_route: HashMap<String, Vec<(Method, Operation)>> = HashMap::new();
        for ((method, route), (name, needs_token)) in operations {
            let op = Operation {
                name,
                needs_token,
                ok: OnceLock::new(),
            };
            by_route.entry(route).or_default().push((method, op));
        }
        Ok(Metrics {
            registry,
            requests,
            latency,
            pool_size,
            pool_allocated,
            pool_free,
            pool_utilization,
            operations: by_route,
            scrape: tokio::sync::Mutex::new(()),
        })
    }

    /// The operation of a matched route.
    pub(crate) fn operation(&self, method: &Method, route: &str) -> Option<&Operation> {
        let ops = self.operations.get(route)?;
        ops.iter().find(|(m, _)| m == method).map(|(_, op)| op)
    }

    /// [`Metrics::observe`] for a known operation.
    fn observe_operation(&self, op: &Operation, code: &str, seconds: f64) {
        if code != "ok" {
            return self.observe(&op.name, code, seconds);
        }
        let (requests, latency) = op.ok.get_or_init(|| {
            let labels = [op.name.as_str(), "ok"];
            (
                self.requests.with_label_values(&labels),
                self.latency.with_label_values(&labels),
            )
        });
        requests.inc();
        latency.observe(seconds);
    }

    pub(crate) fn observe(&self, operation: &str, code: &str, seconds: f64) {
        self.requests.with_label_values(&[operation, code]).inc();
        self.latency
            .with_label_values(&[operation, code])
            .observe(seconds);
    }

    /// Counts and times one answered request: `known` is its operation
    /// (from [`Metrics::operation`]), `unnamed` the name of a route without
    /// an operation id (none today).
    pub(crate) fn record(
        &self,
        known: Option<&Operation>,
        unnamed: Option<&str>,
        resp: &Response,
        elapsed: std::time::Duration,
    ) {
        let code = match resp.extensions().get::<OutcomeCode>() {
            Some(c) => c.0,
            None if resp.status().is_success() => "ok",
            None => "other",
        };
        let seconds = elapsed.as_secs_f64();
        let operation = match known {
            Some(op) => {
                self.observe_operation(op, code, seconds);
                op.name.as_str()
            }
            None => {
                let name = unnamed.unwrap_or_default();
                self.observe(name, code, seconds);
                name
            }
        };
        tracing::debug!(
            operation,
            code,
            status = resp.status().as_u16(),
            ?elapsed,
            "request"
        );
    }
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
