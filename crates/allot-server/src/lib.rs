//! allot's REST service: the engine over HTTP/JSON on the embedded store
//! (or a shared PostgreSQL or etcd store), with an OpenAPI document, health and readiness probes, Prometheus
//! metrics and optional bearer-token authentication.
//!
//! Routes (JSON everywhere; errors are `{"error": {"code", "message"}}`):
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/pools` | create a pool (201) |
//! | `GET /v1/pools?label=K=V` | list pools, optionally by labels |
//! | `GET /v1/pools/{pool}` | one pool |
//! | `DELETE /v1/pools/{pool}?force=bool` | delete a pool |
//! | `POST /v1/pools/{pool}/allocate` | claim values |
//! | `POST /v1/pools/{pool}/release` | release by value or key |
//! | `GET /v1/pools/{pool}/lookup?value=V` or `?key=K` | look a claim up |
//! | `GET /v1/pools/{pool}/claims?after=V&limit=N` | a page of claims |
//! | `POST /v1/pools/{pool}/resync/begin`, `/resync/end` | mark and sweep |
//! | `GET /v1/watch?from=REV` | the change stream (Server-Sent Events) |
//! | `GET /openapi.json`, `/healthz`, `/readyz`, `/metrics` | operations |
//!
//! The same port serves the gRPC API of `proto/allot/v1/allot.proto` over
//! HTTP/2 (cleartext, prior knowledge); see [`grpc`].
//!
//! Run it in-process (tests do, on port 0):
//!
//! ```no_run
//! # async fn demo() -> Result<(), allot_server::ServerError> {
//! let mut config = allot_server::Config::new("/tmp/allot-data");
//! config.listen = "127.0.0.1:0".into();
//! let server = allot_server::Server::bind(config).await?;
//! println!("listening on {}", server.local_addr());
//! server.run(async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

mod auth;
pub mod config;
pub mod error;
pub mod grpc;
mod guard;
pub mod members;
mod metrics;
mod openapi;
pub mod routes;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use allot::Allot;
use allot_backends::{Backend, OpenError, StoreUrl};
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, StatusCode, Uri};
use axum::serve::ListenerExt;
use axum::{middleware, Router};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use config::{FileConfig, Overrides, PoolDecl};
pub use error::{ApiError, ServerError};

/// File name of the embedded database inside the data dir (the same the
/// CLI uses).
pub const DB_FILE: &str = allot_backends::REDB_FILE;
/// Directory of the embedded log-structured store inside the data dir,
/// the store a new data dir gets.
pub const LOG_DIR: &str = allot_backends::LOG_DIR;

/// Everything the server needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to listen on, `HOST:PORT` (port 0 picks a free one).
    pub listen: String,
    /// Directory holding the embedded store (`allot-log`, or `allot.redb`
    /// for data dirs made with redb); created if missing.
    pub data_dir: PathBuf,
    /// Where state lives: the embedded store (default) or a shared
    /// PostgreSQL or etcd store, which several servers may use at once.
    pub store: StoreUrl,
    /// When set, `/v1` and `/metrics` need `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Largest request body accepted (413 above).
    pub max_body_bytes: usize,
    /// Pools created at start if missing (see [`config::apply_pools`]).
    pub pools: Vec<PoolDecl>,
    /// How long in-flight requests may take to finish after the shutdown
    /// signal before the server stops waiting for them.
    pub shutdown_timeout: Duration,
}

impl Config {
    /// Defaults (see [`config`]) with the given data dir.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Config {
            listen: config::DEFAULT_LISTEN.to_string(),
            data_dir: data_dir.into(),
            store: StoreUrl::Auto,
            token: None,
            max_body_bytes: config::DEFAULT_MAX_BODY_BYTES,
            pools: Vec::new(),
            shutdown_timeout: config::DEFAULT_SHUTDOWN_TIMEOUT,
        }
    }
}

/// What `/readyz` reports: ready once the state is loaded, until shutdown.
#[derive(Debug, Default)]
pub(crate) struct Readiness {
    loaded: AtomicBool,
    stopping: AtomicBool,
    /// Wakes [`Readiness::stopped`] when shutdown begins.
    stop: tokio::sync::Notify,
}

impl Readiness {
    pub(crate) fn is_ready(&self) -> bool {
        self.loaded.load(Ordering::Acquire) && !self.stopping.load(Ordering::Acquire)
    }

    /// Marks shutdown as begun and wakes every [`Readiness::stopped`].
    pub(crate) fn begin_stopping(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stop.notify_waiters();
    }

    /// Completes once shutdown has begun. Long-lived streams end on it, so
    /// graceful shutdown does not wait for them until its timeout.
    pub(crate) async fn stopped(&self) {
        let mut notified = std::pin::pin!(self.stop.notified());
        // Registered before the flag is read, so a shutdown between the two
        // still wakes this waiter.
        notified.as_mut().enable();
        if self.stopping.load(Ordering::Acquire) {
            return;
        }
        notified.await;
    }
}

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) allot: Allot,
    pub(crate) ready: Arc<Readiness>,
    pub(crate) metrics: Arc<metrics::Metrics>,
    pub(crate) openapi: Arc<String>,
}

/// The routes with their OpenAPI document, before state and the layer
/// that needs it ([`guard`]: the token where an operation declares `bearer`
/// security, which every `/v1` route and `/metrics` do).
fn api_router() -> OpenApiRouter<AppState> {
    let protected = OpenApiRouter::new()
        .routes(routes!(routes::create_pool, routes::list_pools))
        .routes(routes!(routes::get_pool, routes::delete_pool))
        .routes(routes!(routes::allocate))
        .routes(routes!(routes::release))
        .routes(routes!(routes::lookup))
        .routes(routes!(routes::list_claims))
        .routes(routes!(routes::resync_begin))
        .routes(routes!(routes::resync_end))
        .routes(routes!(routes::watch))
        .routes(routes!(members::list_members))
        .routes(routes!(members::owner))
        .routes(routes!(metrics::metrics));
    let open = OpenApiRouter::new()
        .routes(routes!(routes::healthz))
        .routes(routes!(routes::readyz))
        .routes(routes!(openapi::openapi_json));
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(protected)
        .merge(open)
}

/// The routes and their finished document.
fn build() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, mut doc) = api_router().split_for_parts();
    openapi::add_common_responses(&mut doc);
    (router, doc)
}

/// The OpenAPI document the server serves at `/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    build().1
}

/// Operation ids by (method, route), for metric labels, and whether each
/// declares `bearer` security (then [`guard`] asks for the token).
fn operation_ids(doc: &utoipa::openapi::OpenApi) -> HashMap<(Method, String), (String, bool)> {
    let mut out = HashMap::new();
    for (path, item) in &doc.paths.paths {
        for (method, op) in [
            (Method::GET, &item.get),
            (Method::POST, &item.post),
            (Method::PUT, &item.put),
            (Method::DELETE, &item.delete),
            (Method::PATCH, &item.patch),
        ] {
            let Some(op) = op else { continue };
            if let Some(id) = op.operation_id.clone() {
                let needs_token = op.security.as_ref().is_some_and(|s| !s.is_empty());
                out.insert((method, path.clone()), (id, needs_token));
            }
        }
    }
    out
}

/// The complete application for an engine; `ready` is what `/readyz` reports.
fn app(
    allot: Allot,
    token: Option<String>,
    max_body_bytes: usize,
    ready: Arc<Readiness>,
) -> Result<Router, ServerError> {
    let auth = auth::Auth::new(token);
    let (router, doc) = build();
    let metrics = metrics::Metrics::new(operation_ids(&doc))
        .map_err(|e| ServerError::Config(format!("setting up metrics: {e}")))?;
    let openapi = doc
        .to_json()
        .map_err(|e| ServerError::Config(format!("rendering the OpenAPI document: {e}")))?;
    let state = AppState {
        allot,
        ready,
        metrics: Arc::new(metrics),
        openapi: Arc::new(openapi),
    };
    let route_guard = guard::RouteGuard {
        metrics: state.metrics.clone(),
        auth: auth.clone(),
    };
    Ok(router
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(middleware::from_fn_with_state(route_guard, guard::guard))
        // After the REST route guard, which cannot read gRPC statuses
        // (trailers): the gRPC service checks the token and counts calls
        // itself.
        .merge(grpc::router(&state, auth, max_body_bytes))
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state))
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no such route: {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// A bound server over an open store, ready to [`run`](Server::run).
pub struct Server {
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    allot: Allot,
    store: Backend,
    router: Router,
    ready: Arc<Readiness>,
    shutdown_timeout: Duration,
}

impl Server {
    /// Binds the listen address, creates the data dir if missing, opens the
    /// store and creates the configured pools (refusing to start, with
    /// nothing changed, if one conflicts with an existing pool). Nothing is
    /// served until [`run`](Server::run).
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        if config.max_body_bytes == 0 {
            return Err(ServerError::Config(
                "max body bytes must be at least 1".into(),
            ));
        }
        if config.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(ServerError::Config("the token must not be empty".into()));
        }
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: config.listen.clone(),
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: config.listen.clone(),
            source,
        })?;
        let store = Backend::open(&config.store, &config.data_dir)
            .await
            .map_err(|e| match e {
                OpenError::Locked(dir) => ServerError::Locked(dir),
                e => ServerError::Store(e),
            })?;
        // On PostgreSQL or etcd the engine follows other servers' writes.
        let allot = Allot::new(store.store());
        if let Err(e) = config::apply_pools(&allot, &config.pools).await {
            allot.close().await;
            // The start-up error matters more than a failure to close.
            let _ = store.close().await;
            return Err(e);
        }
        let ready = Arc::new(Readiness::default());
        let router = app(
            allot.clone(),
            config.token,
            config.max_body_bytes,
            ready.clone(),
        )?;
        Ok(Server {
            listener,
            local_addr,
            allot,
            store,
            router,
            ready,
            shutdown_timeout: config.shutdown_timeout,
        })
    }

    /// Where the state lives (the database file, or the store URL with any
    /// password masked).
    pub fn store_description(&self) -> &str {
        self.store.describe()
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The engine the server serves: an application that embeds the server
    /// can use it directly too (it stays usable until [`Server::run`]
    /// returns, which closes it).
    pub fn engine(&self) -> Allot {
        self.allot.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting connections,
    /// lets in-flight requests finish (up to the shutdown timeout), closes
    /// the engine (flushing every batch) and the store (releasing the file),
    /// and returns.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let Server {
            listener,
            local_addr,
            allot,
            store,
            router,
            ready,
            shutdown_timeout,
        } = self;
        let warm = tokio::spawn(load_state(allot.clone(), ready.clone()));
        let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
        let signal = {
            let ready = ready.clone();
            async move {
                shutdown.await;
                ready.begin_stopping();
                tracing::info!("shutting down: no new connections, finishing requests in flight");
                let _ = stopping_tx.send(true);
            }
        };
        let listener = listener.tap_io(|tcp| {
            // Small request/response pairs: never wait for Nagle.
            let _ = tcp.set_nodelay(true);
        });
        tracing::info!(addr = %local_addr, "serving");
        let served = axum::serve(listener, router).with_graceful_shutdown(signal);
        let deadline = async move {
            let mut rx = stopping_rx;
            while !*rx.borrow() {
                if rx.changed().await.is_err() {
                    // The signal future was dropped: serving ended anyway.
                    std::future::pending::<()>().await;
                }
            }
            tokio::time::sleep(shutdown_timeout).await;
        };
        let result = tokio::select! {
            r = served => r.map_err(ServerError::Serve),
            () = deadline => {
                tracing::warn!(?shutdown_timeout, "requests still in flight after the shutdown timeout; closing anyway");
                Ok(())
            }
        };
        warm.abort();
        let _ = warm.await;
        allot.close().await;
        let closed = store.close().await.map_err(ServerError::Store);
        result?;
        closed?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Loads every pool's state into the engine, then reports ready. Retries
/// while the store fails.
async fn load_state(allot: Allot, ready: Arc<Readiness>) {
    let mut delay = Duration::from_millis(100);
    loop {
        match allot.list_pools().await {
            Ok(pools) => {
                tracing::info!(pools = pools.len(), "state loaded; ready");
                ready.loaded.store(true, Ordering::Release);
                return;
            }
            Err(e) => {
                tracing::warn!("loading state: {e}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Binds and runs a server until `shutdown` completes (see [`Server`]).
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    Server::bind(config).await?.run(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::State;

    #[tokio::test]
    async fn readyz_only_between_load_and_shutdown() {
        let allot = Allot::new(Arc::new(allot_store::MemoryStore::new()));
        let ready = Arc::new(Readiness::default());
        let state = AppState {
            allot: allot.clone(),
            ready: ready.clone(),
            metrics: Arc::new(metrics::Metrics::new(HashMap::new()).unwrap()),
            openapi: Arc::new(String::new()),
        };
        let status = |r: Result<_, ApiError>| r.map_or_else(|e| e.status, |_| StatusCode::OK);
        let err = routes::readyz(State(state.clone())).await.err().unwrap();
        assert_eq!(
            (err.status, err.code),
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        );
        load_state(allot, ready.clone()).await;
        assert_eq!(
            status(routes::readyz(State(state.clone())).await),
            StatusCode::OK
        );
        ready.stopping.store(true, Ordering::Release);
        assert_eq!(
            status(routes::readyz(State(state)).await),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn every_operation_has_an_id_for_metrics() {
        let doc = openapi();
        let ids = operation_ids(&doc);
        assert_eq!(ids.len(), 17);
        assert_eq!(
            ids[&(Method::POST, "/v1/pools/{pool}/allocate".to_string())],
            ("allocate".to_string(), true)
        );
        // The guard asks for the token exactly where the document says so:
        // everything under /v1 and /metrics, nothing else.
        for ((method, route), (id, needs_token)) in &ids {
            let protected = route.starts_with("/v1/") || route == "/metrics";
            assert_eq!(*needs_token, protected, "{method} {route} ({id})");
        }
    }
}
