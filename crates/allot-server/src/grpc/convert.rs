//! Conversions between the generated protobuf messages and the engine's
//! types. Incoming messages are checked completely here (or by the engine
//! before it queues anything), so a refused call changes nothing; the
//! checks and defaults follow the REST handlers and the CLI.

use allot::{AllocRequest, ParentRef, PoolKind, PoolSpec, Strategy, Target};
use tonic::Status;

use super::errors::invalid;
use super::pb;

/// The page size when a request leaves `limit` at 0 (as REST does).
pub(crate) const DEFAULT_PAGE: u32 = 100;
/// The largest page (as REST).
pub(crate) const MAX_PAGE: u32 = 10_000;

/// A prefix length from a `uint32` field, refused if it cannot be one.
fn prefix_len(field: &str, v: u32) -> Result<u8, Status> {
    u8::try_from(v).map_err(|_| invalid(format!("{field} {v} is not a prefix length")))
}

/// A pool kind from its message. CIDRs go through the strict parser, so a
/// typo or host bits are refused with a hint instead of being widened.
pub(crate) fn kind_from_pb(kind: Option<pb::PoolKind>) -> Result<PoolKind, Status> {
    use pb::pool_kind::Kind;
    let cidr = |text: &str| {
        allot::parse_cidr(text).map_err(|e| invalid(format!("invalid kind.cidr: {e}")))
    };
    match kind.and_then(|k| k.kind) {
        Some(Kind::Range(r)) => Ok(PoolKind::Range { lo: r.lo, hi: r.hi }),
        Some(Kind::Addresses(a)) => Ok(PoolKind::Addresses {
            cidr: cidr(&a.cidr)?,
            all_addresses: a.all_addresses,
        }),
        Some(Kind::Prefixes(p)) => {
            let net = cidr(&p.cidr)?;
            let len = prefix_len("kind.prefix_len", p.prefix_len)?;
            // 0 means "the default", which is what the CLI picks: IPv4 down
            // to single addresses; IPv6 16 bits finer than the default,
            // since all the way to /128 would exceed 2^64 units.
            let max = match p.max_prefix_len {
                0 => match net.max_prefix_len() {
                    32 => 32,
                    bits => len.saturating_add(16).min(bits),
                },
                m => prefix_len("kind.max_prefix_len", m)?,
            };
            Ok(PoolKind::Prefixes {
                cidr: net,
                prefix_len: len,
                max_prefix_len: max,
            })
        }
        Some(Kind::Set(s)) => Ok(PoolKind::Set { values: s.values }),
        None => Err(invalid(
            "kind is required: one of range, addresses, prefixes, set",
        )),
    }
}

/// The message for a pool kind.
pub(crate) fn kind_to_pb(kind: &PoolKind) -> pb::PoolKind {
    use pb::pool_kind::Kind;
    let kind = match kind {
        PoolKind::Range { lo, hi } => Kind::Range(pb::RangeKind { lo: *lo, hi: *hi }),
        PoolKind::Addresses {
            cidr,
            all_addresses,
        } => Kind::Addresses(pb::AddressesKind {
            cidr: cidr.to_string(),
            all_addresses: *all_addresses,
        }),
        PoolKind::Prefixes {
            cidr,
            prefix_len,
            max_prefix_len,
        } => Kind::Prefixes(pb::PrefixesKind {
            cidr: cidr.to_string(),
            prefix_len: u32::from(*prefix_len),
            max_prefix_len: u32::from(*max_prefix_len),
        }),
        PoolKind::Set { values } => Kind::Set(pb::SetKind {
            values: values.clone(),
        }),
    };
    pb::PoolKind { kind: Some(kind) }
}

/// A strategy from its enum number (unspecified: the default, lowest).
pub(crate) fn strategy_from_pb(v: i32) -> Result<Strategy, Status> {
    match pb::Strategy::try_from(v) {
        Ok(pb::Strategy::Unspecified | pb::Strategy::Lowest) => Ok(Strategy::Lowest),
        Ok(pb::Strategy::Next) => Ok(Strategy::Next),
        Ok(pb::Strategy::Random) => Ok(Strategy::Random),
        Err(_) => Err(invalid(format!(
            "unknown strategy {v} (expected STRATEGY_LOWEST, STRATEGY_NEXT or STRATEGY_RANDOM)"
        ))),
    }
}

pub(crate) fn member_blocks_from_pb(v: i32) -> Result<Option<allot::Durability>, Status> {
    match pb::MemberBlocks::try_from(v) {
        Ok(pb::MemberBlocks::None) => Ok(None),
        Ok(pb::MemberBlocks::Sync) => Ok(Some(allot::Durability::Sync)),
        Ok(pb::MemberBlocks::Block) => Ok(Some(allot::Durability::Block)),
        Err(_) => Err(invalid(format!(
            "unknown member_blocks {v} (expected MEMBER_BLOCKS_NONE, MEMBER_BLOCKS_SYNC or \
             MEMBER_BLOCKS_BLOCK)"
        ))),
    }
}

fn member_blocks_to_pb(d: Option<allot::Durability>) -> i32 {
    match d {
        None => pb::MemberBlocks::None,
        Some(allot::Durability::Sync) => pb::MemberBlocks::Sync,
        Some(allot::Durability::Block) => pb::MemberBlocks::Block,
    }
    .into()
}

/// The enum number of a strategy (never unspecified: answers say which).
pub(crate) fn strategy_to_pb(s: Strategy) -> i32 {
    let s = match s {
        Strategy::Lowest => pb::Strategy::Lowest,
        Strategy::Next => pb::Strategy::Next,
        Strategy::Random => pb::Strategy::Random,
    };
    s as i32
}

/// What `CreatePool` asks for: name, spec, labels, parent. Checks the name
/// first and the kind next, in the order REST reports them.
pub(crate) struct NewPool {
    pub(crate) name: String,
    pub(crate) spec: PoolSpec,
    pub(crate) labels: std::collections::BTreeMap<String, String>,
    pub(crate) parent: Option<ParentRef>,
}

pub(crate) fn new_pool(r: pb::CreatePoolRequest) -> Result<NewPool, Status> {
    allot::validate_pool_name(&r.name).map_err(super::errors::from_engine)?;
    let mut spec = PoolSpec::new(kind_from_pb(r.kind)?);
    spec.reserved = r.reserved.iter().map(|v| v.trim().to_string()).collect();
    spec.strategy = strategy_from_pb(r.strategy)?;
    spec.quarantine_secs = r.quarantine_secs;
    if r.block_size != 0 {
        spec.block_size = r.block_size;
    }
    spec.member_blocks = member_blocks_from_pb(r.member_blocks)?;
    // The spec, labels and parent are checked by the engine before it
    // writes anything.
    Ok(NewPool {
        name: r.name,
        spec,
        labels: r.labels,
        parent: r.parent.map(|p| ParentRef {
            pool: p.pool,
            value: p.value,
        }),
    })
}

/// The message for a pool with its counters. Counters that may exceed
/// 2^64 are decimal strings.
pub(crate) fn pool_to_pb(p: allot::PoolInfo) -> pb::PoolInfo {
    let r = p.record;
    let s = p.stats;
    pb::PoolInfo {
        kind: Some(kind_to_pb(&r.spec.kind)),
        name: r.name,
        description: p.description,
        reserved: r.spec.reserved,
        strategy: strategy_to_pb(r.spec.strategy),
        quarantine_secs: r.spec.quarantine_secs,
        block_size: r.spec.block_size,
        member_blocks: member_blocks_to_pb(r.spec.member_blocks),
        labels: r.labels,
        parent: r.parent.map(|p| pb::ParentRef {
            pool: p.pool,
            value: p.value,
        }),
        created_ms: r.created_ms,
        stats: Some(pb::PoolStats {
            size: s.size.to_string(),
            reserved: s.reserved.to_string(),
            allocated: s.allocated,
            quarantined: s.quarantined,
            free: s.free.to_string(),
            utilization: p.utilization,
        }),
    }
}

/// The message for a claim; metadata is rendered as compact JSON.
pub(crate) fn claim_to_pb(c: allot::Claim) -> pb::Claim {
    pb::Claim {
        value: c.value,
        key: c.key,
        owner: c.owner,
        meta_json: c.meta.map(|m| m.to_string()),
        stale: c.stale,
    }
}

/// An allocation request. `count` 0 is one value (proto3 cannot tell unset
/// from 0); the engine checks the rest before queueing anything.
pub(crate) fn alloc_from_pb(r: pb::AllocateRequest) -> Result<AllocRequest, Status> {
    let mut a = AllocRequest::many(r.count.max(1));
    a.value = r.value;
    a.key = r.key;
    a.prefix_len = r
        .prefix_len
        .map(|l| prefix_len("prefix_len", l))
        .transpose()?;
    a.owner = r.owner;
    a.meta = r
        .meta_json
        .map(|m| {
            serde_json::from_str(&m).map_err(|e| invalid(format!("meta_json is not JSON: {e}")))
        })
        .transpose()?;
    a.request_id = r.request_id;
    Ok(a)
}

/// A release or lookup target (the oneof must be set).
pub(crate) fn target(value: Option<String>, key: Option<String>) -> Result<Target, Status> {
    match (value, key) {
        (Some(v), None) => Ok(Target::Value(v)),
        (None, Some(k)) => Ok(Target::Key(k)),
        // Impossible through a oneof; kept so no input can slip through.
        (Some(_), Some(_)) => Err(invalid("give either `value` or `key`, not both")),
        (None, None) => Err(invalid("give one of `value` or `key`")),
    }
}

pub(crate) fn release_target(t: Option<pb::release_request::Target>) -> Result<Target, Status> {
    use pb::release_request::Target as T;
    match t {
        Some(T::Value(v)) => target(Some(v), None),
        Some(T::Key(k)) => target(None, Some(k)),
        None => target(None, None),
    }
}

pub(crate) fn lookup_target(t: Option<pb::lookup_request::Target>) -> Result<Target, Status> {
    use pb::lookup_request::Target as T;
    match t {
        Some(T::Value(v)) => target(Some(v), None),
        Some(T::Key(k)) => target(None, Some(k)),
        None => target(None, None),
    }
}

/// A page size: 0 is the default; above the maximum is refused, as REST
/// does, rather than silently clamped.
pub(crate) fn page_limit(limit: u32) -> Result<usize, Status> {
    let limit = if limit == 0 { DEFAULT_PAGE } else { limit };
    if limit > MAX_PAGE {
        return Err(invalid(format!(
            "limit {limit} is out of range 1-{MAX_PAGE}"
        )));
    }
    usize::try_from(limit).map_err(|_| invalid(format!("limit {limit} is too large")))
}

pub(crate) fn page_to_pb(p: allot::ClaimPage) -> pb::ClaimPage {
    pb::ClaimPage {
        claims: p.claims.into_iter().map(claim_to_pb).collect(),
        next: p.next,
    }
}

pub(crate) fn report_to_pb(r: allot::ResyncReport) -> pb::ResyncReport {
    pb::ResyncReport {
        pool: r.pool,
        owner: r.owner,
        count: r.count,
        released: r.released.into_iter().map(claim_to_pb).collect(),
    }
}

fn event_claims(v: Vec<allot::EventClaim>) -> Vec<pb::EventClaim> {
    v.into_iter()
        .map(|c| pb::EventClaim {
            value: c.value,
            key: c.key,
            owner: c.owner,
        })
        .collect()
}

/// The message for a change event.
pub(crate) fn event_to_pb(e: allot::Event) -> pb::Event {
    use allot::Change;
    use pb::event::Change as C;
    let change = match e.change {
        Change::PoolCreated { pool, description } => {
            C::PoolCreated(pb::PoolCreated { pool, description })
        }
        Change::PoolDeleted { pool } => C::PoolDeleted(pb::PoolDeleted { pool }),
        Change::Claims {
            pool,
            allocated,
            released,
        } => C::Claims(pb::Claims {
            pool,
            allocated: event_claims(allocated),
            released: event_claims(released),
        }),
        Change::ResyncBegun { pool, owner } => C::ResyncBegun(pb::ResyncBegun { pool, owner }),
        Change::ResyncEnded {
            pool,
            owner,
            released,
        } => C::ResyncEnded(pb::ResyncEnded {
            pool,
            owner,
            released,
        }),
        Change::MemberUp {
            member,
            incarnation,
            address,
        } => C::MemberUp(pb::MemberUp {
            member,
            incarnation,
            address,
        }),
        Change::MemberDown {
            member,
            incarnation,
        } => C::MemberDown(pb::MemberDown {
            member,
            incarnation,
        }),
    };
    pb::Event {
        revision: e.revision,
        change: Some(change),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn prefixes(cidr: &str, len: u32, max: u32) -> Option<pb::PoolKind> {
        Some(pb::PoolKind {
            kind: Some(pb::pool_kind::Kind::Prefixes(pb::PrefixesKind {
                cidr: cidr.into(),
                prefix_len: len,
                max_prefix_len: max,
            })),
        })
    }

    #[test]
    fn prefix_defaults_follow_the_cli() {
        let max = |k: PoolKind| match k {
            PoolKind::Prefixes { max_prefix_len, .. } => max_prefix_len,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            max(kind_from_pb(prefixes("10.0.0.0/16", 24, 0)).unwrap()),
            32
        );
        assert_eq!(
            max(kind_from_pb(prefixes("2001:db8::/32", 48, 0)).unwrap()),
            64
        );
        assert_eq!(
            max(kind_from_pb(prefixes("2001:db8::/64", 120, 0)).unwrap()),
            128
        );
        assert_eq!(
            max(kind_from_pb(prefixes("10.0.0.0/16", 24, 28)).unwrap()),
            28
        );
        let e = kind_from_pb(prefixes("10.0.0.0/16", 300, 0)).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = kind_from_pb(prefixes("10.0.0.1/16", 24, 0)).unwrap_err();
        assert!(e.message().contains("host bits set"), "{e:?}");
    }

    #[test]
    fn kinds_round_trip() {
        let kinds = [
            PoolKind::Range { lo: 5, hi: 9 },
            PoolKind::Addresses {
                cidr: allot::parse_cidr("10.1.0.0/24").unwrap(),
                all_addresses: true,
            },
            PoolKind::Prefixes {
                cidr: allot::parse_cidr("fd00::/48").unwrap(),
                prefix_len: 56,
                max_prefix_len: 60,
            },
            PoolKind::Set {
                values: vec!["a".into(), "b".into()],
            },
        ];
        for k in kinds {
            assert_eq!(kind_from_pb(Some(kind_to_pb(&k))).unwrap(), k);
        }
        assert_eq!(
            kind_from_pb(None).unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(
            kind_from_pb(Some(pb::PoolKind { kind: None }))
                .unwrap_err()
                .code(),
            Code::InvalidArgument
        );
    }

    #[test]
    fn strategies_round_trip() {
        for s in [Strategy::Lowest, Strategy::Next, Strategy::Random] {
            assert_eq!(strategy_from_pb(strategy_to_pb(s)).unwrap(), s);
        }
        assert_eq!(strategy_from_pb(0).unwrap(), Strategy::Lowest);
        assert_eq!(
            strategy_from_pb(42).unwrap_err().code(),
            Code::InvalidArgument
        );
    }

    #[test]
    fn allocation_requests() {
        let a = alloc_from_pb(pb::AllocateRequest {
            pool: "p".into(),
            count: 0,
            meta_json: Some(r#"{"rack": 4}"#.into()),
            prefix_len: Some(26),
            request_id: Some("r1".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(a.count, 1);
        assert_eq!(a.meta, Some(serde_json::json!({"rack": 4})));
        assert_eq!(a.prefix_len, Some(26));
        assert_eq!(a.request_id.as_deref(), Some("r1"));
        let bad = |r: pb::AllocateRequest| alloc_from_pb(r).unwrap_err().code();
        assert_eq!(
            bad(pb::AllocateRequest {
                meta_json: Some("{rack".into()),
                ..Default::default()
            }),
            Code::InvalidArgument
        );
        assert_eq!(
            bad(pb::AllocateRequest {
                prefix_len: Some(256),
                ..Default::default()
            }),
            Code::InvalidArgument
        );
    }

    #[test]
    fn page_limits() {
        assert_eq!(page_limit(0).unwrap(), 100);
        assert_eq!(page_limit(1).unwrap(), 1);
        assert_eq!(page_limit(10_000).unwrap(), 10_000);
        assert_eq!(
            page_limit(10_001).unwrap_err().code(),
            Code::InvalidArgument
        );
    }
}
