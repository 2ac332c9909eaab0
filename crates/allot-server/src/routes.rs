//! The `/v1` handlers, their request and response bodies, and the
//! extractors that turn axum's rejections into [`ApiError`]s.
//!
//! Every handler checks its input completely before calling the engine, and
//! the engine refuses bad input before writing anything, so a refused request
//! changes nothing.

use std::collections::BTreeMap;

use allot::{AllocRequest, Claim, ClaimPage, PoolInfo, ResyncReport, Target};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::config::PoolDecl;
use crate::error::{ApiError, ErrorBody};
use crate::AppState;

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

/// Creates a pool.
#[utoipa::path(post, path = "/v1/pools", tag = "pools", operation_id = "create_pool",
    request_body = PoolDecl,
    responses(
        (status = 201, description = "Created", body = crate::openapi::PoolInfoDoc),
        (status = 400, description = "Invalid definition", body = ErrorBody),
        (status = 409, description = "`pool_exists`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn create_pool(
    State(s): State<AppState>,
    ApiJson(body): ApiJson<PoolDecl>,
) -> Result<(StatusCode, Json<PoolInfo>), ApiError> {
    let (spec, labels) = body.to_spec().map_err(ApiError::invalid)?;
    let info = s.allot.create_pool(&body.name, spec, labels).await?;
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
    let pools = s
        .allot
        .list_pools()
        .await?
        .into_iter()
        .filter(|p| {
            want.iter()
                .all(|(k, v)| p.record.labels.get(k).is_some_and(|have| have == v))
        })
        .collect();
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
/// or the value bound to a key (idempotent).
#[utoipa::path(post, path = "/v1/pools/{pool}/allocate", tag = "claims", operation_id = "allocate",
    params(("pool" = String, Path, description = "Pool name")),
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
    ApiJson(body): ApiJson<AllocBody>,
) -> Result<Json<Allocated>, ApiError> {
    let claims = s.allot.allocate(&pool, body.into()).await?;
    Ok(Json(Allocated {
        values: claims.iter().map(|c| c.value.clone()).collect(),
        pool,
        claims,
    }))
}

/// Releases a claim by value or by key and returns it.
#[utoipa::path(post, path = "/v1/pools/{pool}/release", tag = "claims", operation_id = "release",
    params(("pool" = String, Path, description = "Pool name")),
    request_body = ReleaseBody,
    responses(
        (status = 200, description = "Released", body = crate::openapi::ClaimDoc),
        (status = 400, description = "`invalid_argument`", body = ErrorBody),
        (status = 404, description = "`pool_not_found` or `not_found`", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn release(
    State(s): State<AppState>,
    PoolName(pool): PoolName,
    ApiJson(body): ApiJson<ReleaseBody>,
) -> Result<Json<Claim>, ApiError> {
    let t = target(body.value, body.key)?;
    Ok(Json(s.allot.release(&pool, t).await?))
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
