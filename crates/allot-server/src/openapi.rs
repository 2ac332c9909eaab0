//! The OpenAPI 3 document served at `/openapi.json`.
//!
//! Paths come from the `#[utoipa::path]` annotations of the handlers, and
//! are registered together with the routes (utoipa-axum), so a route cannot
//! be served without being documented. Request and response wrappers of this
//! crate derive their schemas; the engine's types (which cannot derive
//! `ToSchema` here) are described by the `*Doc` mirrors below, and the
//! server's tests check every response of the end-to-end tour against them.

// The `*Doc` types only describe JSON; they are never built.
#![allow(dead_code)]

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::AppState;

/// The document's fixed parts; paths are added as routes are registered.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "allot",
        description = "allot hands out unique values (integers, IP addresses, prefixes, set members) \
                       from named pools, durably and idempotently by key. Errors are \
                       `{\"error\": {\"code\", \"message\"}}` with a stable code.",
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "pools", description = "Create, list, show and delete pools"),
        (name = "claims", description = "Allocate, release, look up and list claims"),
        (name = "resync", description = "Mark and sweep"),
        (name = "events", description = "The change stream (Server-Sent Events)"),
        (name = "members", description = "Members and the owners of blocks"),
        (name = "operations", description = "Health, readiness, metrics and this document"),
    )
)]
pub(crate) struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "Needed on /v1 and /metrics when the server has a token \
                         (--token-file or ALLOT_TOKEN)",
                    ))
                    .build(),
            ),
        );
    }
}

/// Adds the error answers every operation of a kind can give, so each
/// handler's annotation lists only its own: 400, 500 and 503 on `/v1`, 401
/// where a token may be required, 413 and 415 where a JSON body is read.
pub(crate) fn add_common_responses(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let error = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build()
    };
    for (path, item) in doc.paths.paths.iter_mut() {
        let v1 = path.starts_with("/v1/");
        let ops = [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.delete,
            &mut item.patch,
        ];
        for op in ops.into_iter().flatten() {
            let secured = op.security.as_ref().is_some_and(|s| !s.is_empty());
            let body = op.request_body.is_some();
            let mut wanted = Vec::new();
            if v1 {
                wanted.push(("400", "`invalid_argument`: malformed or impossible input"));
                wanted.push(("500", "`store_error`, `corrupt` or `internal`"));
                wanted.push(("503", "`unavailable`: the store cannot be reached"));
            }
            if secured {
                wanted.push(("401", "`unauthenticated`: missing or wrong bearer token"));
            }
            if body {
                wanted.push(("413", "`too_large`: body above the server's limit"));
                wanted.push(("415", "`unsupported_media_type`: not `application/json`"));
            }
            for (status, description) in wanted {
                op.responses
                    .responses
                    .entry(status.to_string())
                    .or_insert_with(|| error(description).into());
            }
        }
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", operation_id = "openapi",
    responses((status = 200, description = "The OpenAPI 3 document", content_type = "application/json", body = Object)))]
pub(crate) async fn openapi_json(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        s.openapi.as_ref().clone(),
    )
}

/// Body of `/healthz` and `/readyz` when fine.
#[derive(Serialize, ToSchema)]
#[schema(as = Status)]
pub(crate) struct StatusDoc {
    /// `ok` (healthz) or `ready` (readyz).
    status: String,
}

/// How the next free value is chosen.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = Strategy)]
pub(crate) enum StrategyDoc {
    /// The lowest free value.
    Lowest,
    /// Next-fit: continue after the last value handed out, wrap at the end.
    Next,
    /// A uniformly random free value.
    Random,
}

/// What a pool hands out (allot_core's `PoolKind`), tagged by `type`.
#[derive(Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
#[schema(as = PoolKind)]
pub(crate) enum PoolKindDoc {
    /// Integers `lo..=hi`.
    Range {
        /// Lowest value.
        lo: u64,
        /// Highest value (not below `lo`).
        hi: u64,
    },
    /// Single addresses of a CIDR; IPv4 /30 and wider reserve the network
    /// and broadcast addresses unless `all_addresses`.
    Addresses {
        /// Network with host bits zero, e.g. `10.0.0.0/24`.
        #[schema(example = "10.0.0.0/24")]
        cidr: String,
        /// Also hand out the IPv4 network and broadcast addresses.
        #[serde(default)]
        all_addresses: bool,
    },
    /// Aligned sub-prefixes of a CIDR.
    Prefixes {
        /// Parent network with host bits zero.
        #[schema(example = "10.0.0.0/16")]
        cidr: String,
        /// Default length handed out.
        prefix_len: u8,
        /// Finest length that may be asked for.
        max_prefix_len: u8,
    },
    /// An enumerated list of strings.
    Set {
        /// The values, each once.
        values: Vec<String>,
    },
}

/// A pool's definition (allot_core's `PoolSpec`).
#[derive(Serialize, ToSchema)]
#[schema(as = PoolSpec)]
pub(crate) struct PoolSpecDoc {
    kind: PoolKindDoc,
    /// Reserved values, ranges or prefixes, as given.
    reserved: Vec<String>,
    strategy: StrategyDoc,
    /// Seconds a released value stays unavailable.
    quarantine_secs: u64,
    /// Units per storage block (a power of two).
    block_size: u64,
    /// Present for a pool whose values members hand out from blocks they
    /// own: how much of it is stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    member_blocks: Option<DurabilityDoc>,
}

/// How much of a member-owned block is stored.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = Durability)]
pub(crate) enum DurabilityDoc {
    /// Every allocation committed before it is answered.
    Sync,
    /// Only block ownership; a new owner asks the application (scan).
    Block,
}

/// A live member.
#[derive(Serialize, ToSchema)]
#[schema(as = MemberInfo)]
pub(crate) struct MemberInfoDoc {
    name: String,
    /// Grows by one on every join under this name.
    incarnation: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    zone: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    attributes: BTreeMap<String, String>,
    /// Join time, ms since the Unix epoch.
    joined_ms: u64,
    /// Lease TTL in ms.
    ttl_ms: u64,
    /// Blocks it owns.
    blocks: u64,
}

/// The owner of the block holding a value.
#[derive(Serialize, ToSchema)]
#[schema(as = OwnerInfo)]
pub(crate) struct OwnerInfoDoc {
    pool: String,
    /// The block holding the value.
    block: u64,
    member: String,
    incarnation: u64,
    /// Grows on every change of the block's owner: the fencing token.
    epoch: u64,
    /// The owner's address while it is live.
    address: Option<String>,
    /// False once the owner's lease expired: the block is an orphan until a
    /// live member takes it over.
    live: bool,
}

/// Counters of a pool, in units (may exceed 2^64 - 1 for `size`, `free`).
#[derive(Serialize, ToSchema)]
#[schema(as = PoolStats)]
pub(crate) struct PoolStatsDoc {
    size: u128,
    reserved: u128,
    allocated: u64,
    quarantined: u64,
    free: u128,
}

/// A pool with its counters.
#[derive(Serialize, ToSchema)]
#[schema(as = PoolInfo)]
pub(crate) struct PoolInfoDoc {
    name: String,
    spec: PoolSpecDoc,
    labels: BTreeMap<String, String>,
    /// Creation time, ms since the Unix epoch.
    created_ms: u64,
    /// The claimed value of another pool this pool is nested in; absent for
    /// a top-level pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    parent: Option<ParentRefDoc>,
    /// Human description of the kind, e.g. "addresses of 10.0.0.0/24".
    description: String,
    stats: PoolStatsDoc,
    /// Allocated share of what can be allocated, 0.0-1.0.
    utilization: f64,
}

/// One claimed value.
#[derive(Serialize, ToSchema)]
#[schema(as = Claim)]
pub(crate) struct ClaimDoc {
    /// Canonical text: decimal integer, IP address, CIDR prefix or set string.
    value: String,
    key: Option<String>,
    owner: Option<String>,
    meta: Option<serde_json::Value>,
    /// Marked by an open resync and not claimed again yet.
    stale: bool,
}

/// One page of claims, in value order.
#[derive(Serialize, ToSchema)]
#[schema(as = ClaimPage)]
pub(crate) struct ClaimPageDoc {
    claims: Vec<ClaimDoc>,
    /// Pass as `after` for the next page; null on the last page.
    next: Option<String>,
}

/// What a resync pass covered.
#[derive(Serialize, ToSchema)]
#[schema(as = ResyncReport)]
pub(crate) struct ResyncReportDoc {
    pool: String,
    owner: Option<String>,
    /// `begin`: keyed claims now marked stale. `end`: claims released.
    count: u64,
    /// `end` only: the released claims.
    released: Vec<ClaimDoc>,
}

/// A claimed value of another pool that holds a nested pool.
#[derive(Serialize, ToSchema)]
#[schema(as = ParentRef)]
pub(crate) struct ParentRefDoc {
    /// The parent pool.
    #[schema(example = "subnets")]
    pool: String,
    /// The claimed value, in canonical text (given in any form the parent
    /// pool parses; answers carry the canonical one).
    #[schema(example = "10.0.3.0/24")]
    value: String,
}

/// A value claimed or released, as events carry it (no metadata).
#[derive(Serialize, ToSchema)]
#[schema(as = EventClaim)]
pub(crate) struct EventClaimDoc {
    value: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
}

/// One change (the `data` of a `/v1/watch` event), tagged by `type`, with
/// the store revision it happened at.
#[derive(Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
#[schema(as = Event)]
pub(crate) enum EventDoc {
    /// A pool was created.
    PoolCreated {
        revision: u64,
        pool: String,
        /// Human description of the kind.
        description: String,
    },
    /// A pool was deleted, with everything in it.
    PoolDeleted { revision: u64, pool: String },
    /// Values claimed and released by one transaction.
    Claims {
        revision: u64,
        pool: String,
        /// Absent when empty.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        allocated: Vec<EventClaimDoc>,
        /// Absent when empty.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        released: Vec<EventClaimDoc>,
    },
    /// A resync pass was opened.
    ResyncBegun {
        revision: u64,
        pool: String,
        owner: Option<String>,
    },
    /// A resync pass was closed, releasing `released` claims.
    ResyncEnded {
        revision: u64,
        pool: String,
        owner: Option<String>,
        released: u64,
    },
    /// A member joined (a new incarnation of its name).
    MemberUp {
        revision: u64,
        member: String,
        incarnation: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        address: Option<String>,
    },
    /// A member's lease ended (it left, or expired); the incarnation when
    /// the stream saw it join.
    MemberDown {
        revision: u64,
        member: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        incarnation: Option<u64>,
    },
}
