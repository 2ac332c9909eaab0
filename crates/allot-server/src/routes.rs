//! The `/v1` handlers, their request and response bodies, and the
//! extractors that turn axum's rejections into [`ApiError`]s.
//!
//! Every handler checks its input completely before calling the engine, and
//! the engine refuses bad input before writing anything, so a refused request
//! changes nothing.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use allot::{AllocRequest, Claim, ClaimPage, ParentRef, PoolInfo, ResyncReport, Strategy, Target};
use allot_store::StoreError;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::Json;
use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::config::PoolDecl;
use crate::error::{one_line, ApiError, ErrorBody, ErrorDetail};
use crate::{AppState, Readiness};

/// The request header carrying an idempotency key (see [`allocate`]).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// How often an idle event stream gets a keep-alive comment, so proxies and
/// clients can tell a quiet stream from a dead connection.
pub const WATCH_KEEP_ALIVE: Duration = Duration::from_secs(15);

/// A JSON body; malformed JSON, wrong types and unknown fields are 400s,
/// a missing JSON content type 415 and an oversize body 413, all in the
/// error shape.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(v) = Json::<T>::from_request(req, state).await?;
        Ok(ApiJson(v))
    }
}

/// A query string, refused in the error shape when it does not parse.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Query(v) = Query::<T>::from_request_parts(parts, state).await?;
        Ok(ApiQuery(v))
    }
}

/// The `{pool}` path segment.
pub struct PoolName(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PoolName {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(name) = Path::<String>::from_request_parts(parts, state).await?;
        allot::validate_pool_name(&name)?;
        Ok(PoolName(name))
    }
}

/// `GET /v1/pools`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PoolList {
    /// Every pool (matching the label filter), by name.
    #[schema(value_type = Vec<crate::openapi::PoolInfoDoc>)]
    pub pools: Vec<PoolInfo>,
}

/// `DELETE /v1/pools/{pool}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Deleted {
    /// The deleted pool's name.
    pub deleted: String,
}

/// Body of `POST /v1/pools`: a pool definition plus, for a nested pool,
/// the claimed value of another pool it is carved from.
///
/// The definition fields repeat [`PoolDecl`]'s rather than flattening it:
/// serde cannot refuse unknown fields through a flattened struct, and
/// `PoolDecl` is also the configuration file's `[[pools]]` table, which has
/// no parent.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CreatePool)]
pub struct CreatePoolBody {
    /// Pool name: 1-128 of `A-Z a-z 0-9 . _ -`.
    #[schema(example = "vlans")]
    pub name: String,
    /// What the pool hands out, tagged by `type`.
    #[schema(value_type = crate::openapi::PoolKindDoc)]
    pub kind: serde_json::Value,
    /// Values, ranges (`A-B`) or prefixes never handed out.
    #[serde(default)]
    pub reserved: Vec<String>,
    /// How the next free value is chosen (default `lowest`).
    #[serde(default)]
    #[schema(value_type = Option<crate::openapi::StrategyDoc>)]
    pub strategy: Option<Strategy>,
    /// Seconds a released value stays unavailable (default 0).
    #[serde(default)]
    pub quarantine_secs: Option<u64>,
    /// Values per storage block, a power of two (default 65536).
    #[serde(default)]
    pub block_size: Option<u64>,
    /// Hand values out from blocks members own, with this durability
    /// (`sync`: every allocation stored; `block`: only ownership).
    #[serde(default)]
    #[schema(value_type = Option<crate::openapi::DurabilityDoc>)]
    pub member_blocks: Option<allot::Durability>,
    /// Descriptive labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Nest the pool in this claimed value of another pool (an address pool
    /// inside a /24 claimed from a prefix pool, say): the value cannot be
    /// released while the nested pool exists.
    #[serde(default)]
    #[schema(value_type = Option<crate::openapi::ParentRefDoc>)]
    pub parent: Option<ParentRef>,
}

impl CreatePoolBody {
    /// The definition and the parent, apart.
    pub fn split(self) -> (PoolDecl, Option<ParentRef>) {
        let decl = PoolDecl {
            name: self.name,
            kind: self.kind,
            reserved: self.reserved,
            strategy: self.strategy,
            quarantine_secs: self.quarantine_secs,
            block_size: self.block_size,
            member_blocks: self.member_blocks,
            labels: self.labels,
        };
        (decl, self.parent)
    }
}

/// Body of `POST /v1/pools/{pool}/allocate`. Every field is optional: `{}`
/// claims one value chosen by the pool's strategy.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AllocBody {
    /// How many values, all or nothing (default 1; at most 100000).
    #[serde(default = "one")]
    #[schema(default = 1, minimum = 1)]
    pub count: u64,
    /// Claim exactly this value.
    #[serde(default)]
    pub value: Option<String>,
    /// Bind the claim to this key: repeating the request returns the same value.
    #[serde(default)]
    pub key: Option<String>,
    /// Prefix pools: the length to hand out instead of the pool's default.
    #[serde(default)]
    pub prefix_len: Option<u8>,
    /// Who holds the claim (used by resync).
    #[serde(default)]
    pub owner: Option<String>,
    /// Any JSON document stored with the claim (at most 64 KiB).
    #[serde(default)]
    pub meta: Option<serde_json::Value>,
    /// Idempotency key, like the `Idempotency-Key` header (give either, or
    /// both with the same value): a repeat within about an hour returns the
    /// first answer and claims nothing more.
    #[serde(default)]
    pub request_id: Option<String>,
}

fn one() -> u64 {
    1
}

impl From<AllocBody> for AllocRequest {
    fn from(b: AllocBody) -> Self {
        // Field by field over the default, so fields the engine adds later
        // keep their defaults here.
        let mut r = AllocRequest::many(b.count);
        r.value = b.value;
        r.key = b.key;
        r.prefix_len = b.prefix_len;
        r.owner = b.owner;
        r.meta = b.meta;
        r.request_id = b.request_id;
        r
    }
}

/// `POST /v1/pools/{pool}/allocate`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Allocated {
    /// The pool.
    pub pool: String,
    /// The claimed values in canonical text, in the order of `claims`.
    pub values: Vec<String>,
    /// The claims.
    #[schema(value_type = Vec<crate::openapi::ClaimDoc>)]
    pub claims: Vec<Claim>,
}

/// Body of `POST /v1/pools/{pool}/release`: exactly one of `value`, `key`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseBody {
    /// The claimed value.
    #[serde(default)]
    pub value: Option<String>,
    /// The key the claim is bound to.
    #[serde(default)]
    pub key: Option<String>,
    /// Idempotency key, like the `Idempotency-Key` header: a repeat within
    /// about an hour returns the first answer instead of `not_found`.
    #[serde(default)]
    pub request_id: Option<String>,
}

/// `GET /v1/pools/{pool}/lookup`: exactly one of `value`, `key`.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LookupQuery {
    /// The claimed value.
    pub value: Option<String>,
    /// The key the claim is bound to.
    pub key: Option<String>,
}

fn target(value: Option<String>, key: Option<String>) -> Result<Target, ApiError> {
    match (value, key) {
        (Some(v), None) => Ok(Target::Value(v)),
        (None, Some(k)) => Ok(Target::Key(k)),
        (Some(_), Some(_)) => Err(ApiError::invalid("give either `value` or `key`, not both")),
        (None, None) => Err(ApiError::invalid("give one of `value` or `key`")),
    }
}

/// `GET /v1/pools/{pool}/claims`.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ClaimsQuery {
    /// Start after this value (the `next` of the previous page).
    pub after: Option<String>,
    /// Claims per page, 1-10000 (default 100).
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<u64>,
}

/// `DELETE /v1/pools/{pool}`.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Delete even though values are still claimed (default false).
    pub force: Option<bool>,
}

/// Body of `POST /v1/pools/{pool}/resync/begin` and `.../end`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResyncBody {
    /// Only claims made with this owner tag (default: every keyed claim).
    #[serde(default)]
    pub owner: Option<String>,
}

/// Creates a pool, optionally nested in a claimed value of another pool.
#[utoipa::path(post, path = "/v1/pools", tag = "pools", operation_id = "create_pool",
    request_body = CreatePoolBody,
    responses(
        (status = 201, description = "Created", body = crate::openapi::PoolInfoDoc),
        (status = 400, description = "Invalid definition, or a parent value that is not claimed or does not contain the pool", body = ErrorBody),
        (status = 404, description = "`pool_not_found`: the parent pool", body = ErrorBody),
        (status = 409, description = "`pool_exists`, or `contention` on the parent", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn create_pool(
    State(s): State<AppState>,
    ApiJson(body): ApiJson<CreatePoolBody>,
) -> Result<(StatusCode, Json<PoolInfo>), ApiError> {
    let (decl, parent) = body.split();
    let (spec, labels) = decl.to_spec().map_err(ApiError::invalid)?;
    let info = s
        .allot
        .create_pool_in(&decl.name, spec, labels, parent)
        .await?;
    Ok((StatusCode::CREATED, Json(info)))
}

/// Lists pools, optionally only those having every given label.
#[utoipa::path(get, path = "/v1/pools", tag = "pools", operation_id = "list_pools",
    params(("label" = Option<Vec<String>>, Query, explode = true,
        description = "`KEY=VALUE`; repeatable: only pools having all these labels")),
    responses(
        (status = 200, description = "Pools", body = PoolList),
        (status = 400, description = "Invalid filter", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn list_pools(
    State(s): State<AppState>,
    ApiQuery(query): ApiQuery<Vec<(String, String)>>,
) -> Result<Json<PoolList>, ApiError> {
    let mut want = BTreeMap::new();
    for (name, value) in query {
        if name != "label" {
            return Err(ApiError::invalid(format!(
                "unknown query parameter `{name}`; only `label=KEY=VALUE` filters pools"
            )));
        }
        let (k, v) = value
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "invalid label filter '{value}': expected KEY=VALUE"
                ))
            })?;
        if want.insert(k.to_string(), v.to_string()).is_some() {
            return Err(ApiError::invalid(format!(
                "label '{k}' is given twice in the filter"
            )));
        }
    }
    let pools = s.allot.list_pools_labeled(&want).await?;
    Ok(Json(PoolList { pools }))
}

/// A pool's definition and counters.
#[utoipa::path(get, path = "/v1/pools/{pool}", tag = "pools", operation_id = "get_pool",
    params(("pool" = String, Path, description = "Pool name")),
    responses(
        (status = 200, description = "The pool", body = crate::openapi::PoolInfoDoc),
        (status = 404, description = "`pool_not_found`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn get_pool(
    State(s): State<AppState>,
    PoolName(pool): PoolName,
) -> Result<Json<PoolInfo>, ApiError> {
    Ok(Json(s.allot.pool(&pool).await?))
}

/// Deletes a pool and everything in it (refused while values are claimed,
/// unless `force`).
#[utoipa::path(delete, path = "/v1/pools/{pool}", tag = "pools", operation_id = "delete_pool",
    params(("pool" = String, Path, description = "Pool name"), DeleteQuery),
    responses(
        (status = 200, description = "Deleted", body = Deleted),
        (status = 404, description = "`pool_not_found`", body = ErrorBody),
        (status = 409, description = "`pool_not_empty`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn delete_pool(
    State(s): State<AppState>,
    PoolName(pool): PoolName,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> Result<Json<Deleted>, ApiError> {
    s.allot.delete_pool(&pool, q.force.unwrap_or(false)).await?;
    Ok(Json(Deleted { deleted: pool }))
}

/// Allocates: one value, `count` values all or nothing, a requested value,
/// or the value bound to a key (idempotent). With an `Idempotency-Key`
/// header (or `request_id`), a retry of the same request within about an
/// hour returns the first answer and claims nothing more; the same key with
/// a different request is a `conflict`.
#[utoipa::path(post, path = "/v1/pools/{pool}/allocate", tag = "claims", operation_id = "allocate",
    params(("pool" = String, Path, description = "Pool name"),
        ("Idempotency-Key" = Option<String>, Header,
            description = "Makes the request safe to retry: a repeat within about an hour returns the first answer")),
    request_body = AllocBody,
    responses(
        (status = 200, description = "Claimed", body = Allocated),
        (status = 400, description = "`invalid_argument` (value outside the pool, reserved, ...)", body = ErrorBody),
        (status = 404, description = "`pool_not_found`", body = ErrorBody),
        (status = 409, description = "`conflict`, `exhausted` or `contention`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn allocate(
    State(s): State<AppState>,
    PoolName(pool): PoolName,
    headers: HeaderMap,
    ApiJson(mut body): ApiJson<AllocBody>,
) -> Result<Json<Allocated>, ApiError> {
    body.request_id = request_id(&headers, body.request_id)?;
    let claims = s.allot.allocate(&pool, body.into()).await?;
    Ok(Json(Allocated {
        values: claims.iter().map(|c| c.value.clone()).collect(),
        pool,
        claims,
    }))
}

/// Releases a claim by value or by key and returns it. With an
/// `Idempotency-Key` header (or `request_id`), a retry returns the first
/// answer instead of `not_found`.
#[utoipa::path(post, path = "/v1/pools/{pool}/release", tag = "claims", operation_id = "release",
    params(("pool" = String, Path, description = "Pool name"),
        ("Idempotency-Key" = Option<String>, Header,
            description = "Makes the request safe to retry: a repeat within about an hour returns the first answer")),
    request_body = ReleaseBody,
    responses(
        (status = 200, description = "Released", body = crate::openapi::ClaimDoc),
        (status = 400, description = "`invalid_argument`", body = ErrorBody),
        (status = 404, description = "`pool_not_found` or `not_found`", body = ErrorBody),
        (status = 409, description = "`conflict`: the value holds a nested pool, or the idempotency key was used for another request", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn release(
    State(s): State<AppState>,
    PoolName(pool): PoolName,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ReleaseBody>,
) -> Result<Json<Claim>, ApiError> {
    let id = request_id(&headers, body.request_id)?;
    let t = target(body.value, body.key)?;
    Ok(Json(s.allot.release_once(&pool, t, id).await?))
}

/// The request's idempotency key: the `Idempotency-Key` header or the
/// body's `request_id` (both only if equal). The engine checks its length
/// and characters.
fn request_id(headers: &HeaderMap, in_body: Option<String>) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let header = match (values.next(), values.next()) {
        (None, _) => None,
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "the Idempotency-Key header is given more than once",
            ))
        }
        (Some(v), None) => Some(
            v.to_str()
                .map_err(|_| {
                    ApiError::invalid("the Idempotency-Key header must be visible ASCII text")
                })?
                .to_string(),
        ),
    };
    match (header, in_body) {
        (Some(h), Some(b)) if h != b => Err(ApiError::invalid(
            "the Idempotency-Key header and `request_id` differ; give one, or the same in both",
        )),
        (h, b) => Ok(h.or(b)),
    }
}

/// Who holds a value, or which value a key holds.
#[utoipa::path(get, path = "/v1/pools/{pool}/lookup", tag = "claims", operation_id = "lookup",
    params(("pool" = String, Path, description = "Pool name"), LookupQuery),
    responses(
        (status = 200, description = "The claim", body = crate::openapi::ClaimDoc),
        (status = 400, description = "`invalid_argument`", body = ErrorBody),
        (status = 404, description = "`pool_not_found` or `not_found`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn lookup(
    State(s): State<AppState>,
    PoolName(pool): PoolName,
    ApiQuery(q): ApiQuery<LookupQuery>,
) -> Result<Json<Claim>, ApiError> {
    let t = target(q.value, q.key)?;
    Ok(Json(s.allot.lookup(&pool, t).await?))
}

/// A page of claims in value order.
#[utoipa::path(get, path = "/v1/pools/{pool}/claims", tag = "claims", operation_id = "list_claims",
    params(("pool" = String, Path, description = "Pool name"), ClaimsQuery),
    responses(
        (status = 200, description = "One page", body = crate::openapi::ClaimPageDoc),
        (status = 400, description = "`invalid_argument`", body = ErrorBody),
        (status = 404, description = "`pool_not_found`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn list_claims(
    State(s): State<AppState>,
    PoolName(pool): PoolName,
    ApiQuery(q): ApiQuery<ClaimsQuery>,
) -> Result<Json<ClaimPage>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit {limit} is out of range 1-10000"
        )));
    }
    // Bounded above, so the conversion cannot fail.
    let limit = usize::try_from(limit).unwrap_or(10_000);
    Ok(Json(
        s.allot
            .list_claims(&pool, q.after.as_deref(), limit)
            .await?,
    ))
}

/// Opens a mark-and-sweep pass: every keyed claim (of `owner`, or all) is
/// stale until it is claimed again.
#[utoipa::path(post, path = "/v1/pools/{pool}/resync/begin", tag = "resync", operation_id = "resync_begin",
    params(("pool" = String, Path, description = "Pool name")),
    request_body = ResyncBody,
    responses(
        (status = 200, description = "Pass opened; `count` claims marked", body = crate::openapi::ResyncReportDoc),
        (status = 404, description = "`pool_not_found`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn resync_begin(
    State(s): State<AppState>,
    PoolName(pool): PoolName,
    ApiJson(body): ApiJson<ResyncBody>,
) -> Result<Json<ResyncReport>, ApiError> {
    Ok(Json(
        s.allot.resync_begin(&pool, body.owner.as_deref()).await?,
    ))
}

/// Closes a pass: releases every claim it marked that was not claimed
/// again, and lists them.
#[utoipa::path(post, path = "/v1/pools/{pool}/resync/end", tag = "resync", operation_id = "resync_end",
    params(("pool" = String, Path, description = "Pool name")),
    request_body = ResyncBody,
    responses(
        (status = 200, description = "Pass closed; `released` lists what it released", body = crate::openapi::ResyncReportDoc),
        (status = 404, description = "`pool_not_found`, or `not_found` when no pass is open", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn resync_end(
    State(s): State<AppState>,
    PoolName(pool): PoolName,
    ApiJson(body): ApiJson<ResyncBody>,
) -> Result<Json<ResyncReport>, ApiError> {
    Ok(Json(
        s.allot.resync_end(&pool, body.owner.as_deref()).await?,
    ))
}

/// `GET /v1/watch`.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WatchQuery {
    /// The first revision to send (default: only changes from now). A
    /// `Last-Event-ID` header takes precedence: it is what a reconnecting
    /// client last saw.
    pub from: Option<u64>,
}

/// Streams every change (pools created and deleted, values claimed and
/// released, resync passes) as Server-Sent Events, one per store revision,
/// in order: `id` is the revision, `event` the change's `type`, `data` the
/// change as JSON. The first message carries only an `id` (the revision
/// before the first one sent), so a client that reconnects with
/// `Last-Event-ID` loses nothing even if no change happened in between.
/// History older than the store retains is refused with 410 `compacted`
/// before the stream starts, or with an `error` event (data: the error
/// body) that ends the stream if it is found later. Idle streams get a
/// keep-alive comment every 15 s.
#[utoipa::path(get, path = "/v1/watch", tag = "events", operation_id = "watch",
    params(WatchQuery,
        ("Last-Event-ID" = Option<String>, Header,
            description = "Resume after this revision (the `id` of the last event received); beats `from`")),
    responses(
        (status = 200, description = "An endless `text/event-stream`; each event's data is one of these", content_type = "text/event-stream", body = crate::openapi::EventDoc),
        (status = 400, description = "`invalid_argument`: malformed `from` or `Last-Event-ID`, or a revision in the future", body = ErrorBody),
        (status = 410, description = "`compacted`: the requested history is gone; read the current state and watch from now", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn watch(
    State(s): State<AppState>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<WatchQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let start = match last_event_id(&headers)? {
        Some(id) => id
            .checked_add(1)
            .ok_or_else(|| ApiError::invalid("Last-Event-ID is out of range"))?,
        None => q.from.unwrap_or(0),
    };
    // "From now" is pinned to a revision here, so the first message can
    // name it and a client resuming from it misses nothing.
    let start = match start {
        0 => {
            let current = s
                .allot
                .store()
                .current_revision()
                .await
                .map_err(|e| ApiError::from(allot::Error::from(e)))?;
            current.saturating_add(1)
        }
        n => n,
    };
    let events = s.allot.watch(start).await.map_err(watch_error)?;
    let hello = SseEvent::default()
        .comment(format!("watching from revision {start}"))
        .id((start - 1).to_string())
        .retry(Duration::from_secs(1));
    let changes = events.scan(false, |ended, item| {
        let frame = if *ended {
            None
        } else {
            Some(match item {
                Ok(event) => event_frame(&event),
                Err(e) => {
                    // The engine's stream may go on after a record it
                    // cannot decode; the client must not skip it silently.
                    *ended = true;
                    error_frame(watch_error(e))
                }
            })
        };
        std::future::ready(frame)
    });
    let stream = futures::stream::once(std::future::ready(hello))
        .chain(changes)
        .take_until(stopping(s.ready.clone()))
        .map(Ok);
    Ok(Sse::new(stream).keep_alive(
        KeepAlive::new()
            .interval(WATCH_KEEP_ALIVE)
            .text("keep-alive"),
    ))
}

/// The `Last-Event-ID` header as a revision, if given.
fn last_event_id(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get("last-event-id") else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| ApiError::invalid("Last-Event-ID must be a revision (an integer)"))
}

/// An engine watch error as the API reports it: history that is gone is
/// 410 `compacted`, a revision beyond the current one is a bad request.
fn watch_error(e: allot::Error) -> ApiError {
    if allot::is_compacted(&e) {
        return ApiError::new(
            StatusCode::GONE,
            "compacted",
            format!(
                "{}; read the current state, then watch from now",
                one_line(&e.to_string())
            ),
        );
    }
    if let allot::Error::Store(StoreError::FutureRevision { requested, current }) = &e {
        return ApiError::invalid(format!(
            "revision {requested} is in the future (the current revision is {current})"
        ));
    }
    e.into()
}

/// One change as an SSE message.
fn event_frame(event: &allot::Event) -> SseEvent {
    // The data keeps the engine's field order (revision, type, ...); the
    // type is read from the serialized change so new kinds need no code here.
    let encoded = serde_json::to_string(event).and_then(|data| {
        let change = serde_json::to_value(&event.change)?;
        let kind = change["type"].as_str().unwrap_or("change").to_string();
        Ok((data, kind))
    });
    match encoded {
        Ok((data, kind)) => SseEvent::default()
            .id(event.revision.to_string())
            .event(kind)
            .data(data),
        Err(e) => error_frame(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("encoding event {}: {e}", event.revision),
        )),
    }
}

/// A failure as the last SSE message of a stream: `event: error`, data the
/// usual error body.
fn error_frame(e: ApiError) -> SseEvent {
    tracing::warn!(code = e.code, "watch ended: {}", e.message);
    let body = ErrorBody {
        error: ErrorDetail {
            code: e.code.to_string(),
            message: e.message,
        },
    };
    SseEvent::default()
        .event("error")
        .data(serde_json::to_string(&body).unwrap_or_default())
}

/// Completes once the server begins shutting down, so open event streams
/// end and graceful shutdown does not wait for them until its timeout.
async fn stopping(ready: Arc<Readiness>) {
    while !ready.stopping.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Liveness: 200 whenever the process serves requests.
#[utoipa::path(get, path = "/healthz", tag = "operations", operation_id = "healthz",
    responses((status = 200, description = "Serving", body = crate::openapi::StatusDoc)))]
pub(crate) async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// Readiness: 200 once the store is open and every pool's state is loaded;
/// 503 before that and once shutdown has begun.
#[utoipa::path(get, path = "/readyz", tag = "operations", operation_id = "readyz",
    responses(
        (status = 200, description = "Ready", body = crate::openapi::StatusDoc),
        (status = 503, description = "`unavailable`: starting or shutting down", body = ErrorBody),
    ))]
pub(crate) async fn readyz(State(s): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    if s.ready.is_ready() {
        Ok(Json(serde_json::json!({"status": "ready"})))
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "not ready: loading state or shutting down",
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use allot::{AllocRequest, Allot, PoolKind, PoolSpec};
    use axum::response::IntoResponse;

    use super::*;

    fn state() -> AppState {
        AppState {
            allot: Allot::new(Arc::new(allot_store::MemoryStore::new())),
            ready: Arc::new(Readiness::default()),
            metrics: Arc::new(crate::metrics::Metrics::new(HashMap::new()).unwrap()),
            openapi: Arc::new(String::new()),
        }
    }

    /// The whole body of a response that must end within 5 s.
    async fn body_text(resp: axum::response::Response) -> String {
        let mut body = resp.into_body().into_data_stream();
        let mut out = Vec::new();
        let read = async {
            while let Some(chunk) = body.next().await {
                out.extend_from_slice(&chunk.unwrap());
            }
        };
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("the stream did not end");
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn history_compacted_mid_stream_ends_it_with_an_error_event() {
        let s = state();
        let spec = PoolSpec::new(PoolKind::Range { lo: 1, hi: 9 });
        s.allot
            .create_pool("ids", spec, BTreeMap::new())
            .await
            .unwrap();
        for _ in 0..3 {
            s.allot.allocate("ids", AllocRequest::one()).await.unwrap();
        }
        let q = ApiQuery(WatchQuery { from: Some(1) });
        let resp = watch(State(s.clone()), HeaderMap::new(), q)
            .await
            .ok()
            .unwrap()
            .into_response();
        assert_eq!(resp.status(), StatusCode::OK);
        // The stream was accepted; its history goes before it is read.
        let current = s.allot.store().current_revision().await.unwrap();
        s.allot.store().compact(current).await.unwrap();
        let text = body_text(resp).await;
        let frames: Vec<&str> = text.split("\n\n").filter(|f| !f.is_empty()).collect();
        assert_eq!(frames.len(), 2, "{text}");
        assert!(frames[0].contains("id: 0"), "{text}");
        let (head, data) = frames[1].split_once("data: ").unwrap();
        assert_eq!(head, "event: error\n");
        let body: ErrorBody = serde_json::from_str(data).unwrap();
        assert_eq!(body.error.code, "compacted");
        assert!(body.error.message.contains("revision 1 has been compacted"));
    }

    #[tokio::test]
    async fn shutdown_ends_an_idle_stream() {
        let s = state();
        let resp = watch(
            State(s.clone()),
            HeaderMap::new(),
            ApiQuery(WatchQuery { from: None }),
        )
        .await
        .ok()
        .unwrap()
        .into_response();
        s.ready.stopping.store(true, Ordering::Release);
        // Ends (within the 5 s body_text allows), sending nothing more.
        let text = body_text(resp).await;
        assert!(!text.contains("event:"), "{text}");
    }

    #[test]
    fn idempotency_key_from_header_or_body() {
        let mut h = HeaderMap::new();
        assert_eq!(request_id(&h, None).unwrap(), None);
        assert_eq!(
            request_id(&h, Some("b".into())).unwrap().as_deref(),
            Some("b")
        );
        h.insert(IDEMPOTENCY_KEY, "k".parse().unwrap());
        assert_eq!(request_id(&h, None).unwrap().as_deref(), Some("k"));
        assert_eq!(
            request_id(&h, Some("k".into())).unwrap().as_deref(),
            Some("k")
        );
        assert!(request_id(&h, Some("other".into())).is_err());
        h.append(IDEMPOTENCY_KEY, "k2".parse().unwrap());
        assert!(request_id(&h, None)
            .unwrap_err()
            .message
            .contains("more than once"));
    }
}
