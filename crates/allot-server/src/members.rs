//! Members and block owners: who takes part, and which member owns the
//! block of a value (for a load balancer routing by ID: DRSM's demux mode).
//! Both answer from the engine's owner map, which store watches keep
//! current, so an owner lookup costs no store round trip.

use allot::{MemberInfo, OwnerInfo};
use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ErrorBody};
use crate::routes::{ApiQuery, PoolName};
use crate::AppState;

/// `GET /v1/members`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MemberList {
    /// Every live member, by name.
    #[schema(value_type = Vec<crate::openapi::MemberInfoDoc>)]
    pub members: Vec<MemberInfo>,
}

/// Query of `GET /v1/pools/{pool}/owner`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct OwnerQuery {
    /// The value whose owner is wanted.
    pub value: String,
}

/// The live members, with the blocks each owns.
#[utoipa::path(get, path = "/v1/members", tag = "members", operation_id = "list_members",
    responses((status = 200, description = "Live members", body = MemberList)),
    security(("bearer" = [])))]
pub(crate) async fn list_members(State(s): State<AppState>) -> Result<Json<MemberList>, ApiError> {
    Ok(Json(MemberList {
        members: s.allot.list_members().await?,
    }))
}

/// Which member owns the block holding a value of a member-blocks pool.
#[utoipa::path(get, path = "/v1/pools/{pool}/owner", tag = "members", operation_id = "owner",
    params(("pool" = String, Path, description = "Pool name"), OwnerQuery),
    responses(
        (status = 200, description = "The owner", body = crate::openapi::OwnerInfoDoc),
        (status = 400, description = "`invalid_argument`", body = ErrorBody),
        (status = 404, description = "`not_found`: no member owns the block, or no such member-blocks pool", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn owner(
    State(s): State<AppState>,
    PoolName(pool): PoolName,
    ApiQuery(q): ApiQuery<OwnerQuery>,
) -> Result<Json<OwnerInfo>, ApiError> {
    Ok(Json(s.allot.owner(&pool, &q.value).await?))
}
