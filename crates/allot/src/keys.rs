//! The keyspace: where each record lives in the store. Pool names cannot
//! contain '/', so one pool's prefix never covers another's.
//!
//! | key                         | value                      |
//! |-----------------------------|----------------------------|
//! | `p/{pool}`                  | pool definition (JSON)     |
//! | `c/{pool}`                  | next-fit cursor (u64 LE)   |
//! | `b/{pool}/{block: u64 BE}`  | block bitmap (core format) |
//! | `v/{pool}/{offset: u64 BE}` | claim record (JSON)        |
//! | `k/{pool}/{key}`            | key → offset (JSON)        |
//! | `r/{pool}/{owner}`          | an open resync ("" = all)  |
//! | `e/{pool}`                  | last change (JSON), watched |
//! | `i/{pool}/{request id}`     | remembered answer (leased)  |
//! | `n/{pool}`                  | nested pools by offset      |
//! | `m/{member}`                | live member (JSON, leased)  |
//! | `mi/{member}`               | last incarnation (u64 LE)   |
//! | `o/{pool}/{block: u64 BE}`  | block owner + epoch (JSON)  |
//! | `t/{pool}`                  | turn request: engine id (u64 LE) |
//!
//! The engine watches only the prefixes of [`WATCHED_PREFIXES`].

/// Every prefix the engine watches: its change stream (`e/`, `m/`), the
/// follower of other writers (`b/`, `p/`, `t/`) and the owner map (`p/`,
/// `m/`, `o/`). A store that can record watch history selectively needs it
/// for these only; the others (claim records, keys, answers, ...) are read,
/// never watched. The PostgreSQL store opened by `allot-backends` records
/// just these (`PostgresOptions::history_prefixes`) and refuses a watch
/// outside them. Tests hold the engine to the list: the store wrapper of
/// `tests/support` asserts it for every watch, the two-engine test on
/// PostgreSQL (`tests/turns.rs`) records only these, and the server and
/// testkit tests open PostgreSQL through `allot-backends`.
pub const WATCHED_PREFIXES: [&[u8]; 6] = [
    POOLS_PREFIX,
    BLOCKS_PREFIX,
    EVENTS_PREFIX,
    MEMBERS_PREFIX,
    OWNERS_PREFIX,
    TURNS_PREFIX,
];

/// [`WATCHED_PREFIXES`] as owned byte strings, the shape store options take
/// (`allot_store_postgres::PostgresOptions::history_prefixes`).
pub fn watched_prefixes() -> Vec<Vec<u8>> {
    WATCHED_PREFIXES.map(<[u8]>::to_vec).to_vec()
}

pub fn pool(name: &str) -> Vec<u8> {
    format!("p/{name}").into_bytes()
}
pub const POOLS_PREFIX: &[u8] = b"p/";

pub fn cursor(name: &str) -> Vec<u8> {
    format!("c/{name}").into_bytes()
}

fn with_u64(prefix: &str, name: &str, n: u64) -> Vec<u8> {
    let mut k = format!("{prefix}/{name}/").into_bytes();
    k.extend_from_slice(&n.to_be_bytes());
    k
}

fn tail_u64(key: &[u8]) -> Option<u64> {
    let tail = key.get(key.len().checked_sub(8)?..)?;
    Some(u64::from_be_bytes(tail.try_into().ok()?))
}

pub fn block(name: &str, index: u64) -> Vec<u8> {
    with_u64("b", name, index)
}
pub fn blocks_prefix(name: &str) -> Vec<u8> {
    format!("b/{name}/").into_bytes()
}
pub fn block_index(key: &[u8]) -> Option<u64> {
    tail_u64(key)
}
pub const BLOCKS_PREFIX: &[u8] = b"b/";
/// `b/{pool}/{block}` → (pool, block).
pub fn parse_block(key: &[u8]) -> Option<(&str, u64)> {
    parse_pool_u64(key, BLOCKS_PREFIX)
}

pub fn value(name: &str, offset: u64) -> Vec<u8> {
    with_u64("v", name, offset)
}
pub fn values_prefix(name: &str) -> Vec<u8> {
    format!("v/{name}/").into_bytes()
}
pub fn value_offset(key: &[u8]) -> Option<u64> {
    tail_u64(key)
}

pub fn key(name: &str, key: &str) -> Vec<u8> {
    format!("k/{name}/{key}").into_bytes()
}
pub fn keys_prefix(name: &str) -> Vec<u8> {
    format!("k/{name}/").into_bytes()
}

pub fn resync(name: &str, owner: Option<&str>) -> Vec<u8> {
    format!("r/{name}/{}", owner.unwrap_or("")).into_bytes()
}
pub fn resyncs_prefix(name: &str) -> Vec<u8> {
    format!("r/{name}/").into_bytes()
}

/// A remembered answer to an idempotent request (on a rolling lease).
pub fn idempotency(name: &str, request_id: &str) -> Vec<u8> {
    format!("i/{name}/{request_id}").into_bytes()
}
pub fn idempotency_prefix(name: &str) -> Vec<u8> {
    format!("i/{name}/").into_bytes()
}

/// Nested pools held by claimed values of this pool (JSON: offset → names).
pub fn children(name: &str) -> Vec<u8> {
    format!("n/{name}").into_bytes()
}

/// The change record of a pool: rewritten by every transaction that changes
/// the pool, so watching `e/` yields one change per revision, in order.
pub fn event(name: &str) -> Vec<u8> {
    format!("e/{name}").into_bytes()
}
pub const EVENTS_PREFIX: &[u8] = b"e/";

/// A live member: written at join on the member's lease, so it disappears
/// when the lease expires (the member is down).
pub fn member(name: &str) -> Vec<u8> {
    format!("m/{name}").into_bytes()
}
pub const MEMBERS_PREFIX: &[u8] = b"m/";

/// The last incarnation of a member name; outlives the member so the next
/// join under that name gets a larger one.
pub fn incarnation(name: &str) -> Vec<u8> {
    format!("mi/{name}").into_bytes()
}

/// The owner (and epoch) of a block of a member-blocks pool.
pub fn owner(name: &str, block: u64) -> Vec<u8> {
    with_u64("o", name, block)
}
pub const OWNERS_PREFIX: &[u8] = b"o/";
pub fn owners_prefix(name: &str) -> Vec<u8> {
    format!("o/{name}/").into_bytes()
}
/// `o/{pool}/{block}` → (pool, block).
pub fn parse_owner(key: &[u8]) -> Option<(&str, u64)> {
    parse_pool_u64(key, OWNERS_PREFIX)
}

/// An engine's request that the others hold off writing the pool for a
/// moment ([`crate::turns`]).
pub fn turn(name: &str) -> Vec<u8> {
    format!("t/{name}").into_bytes()
}
pub const TURNS_PREFIX: &[u8] = b"t/";
/// `t/{pool}` → pool.
pub fn parse_turn(key: &[u8]) -> Option<&str> {
    std::str::from_utf8(key.strip_prefix(TURNS_PREFIX)?).ok()
}

fn parse_pool_u64<'k>(key: &'k [u8], prefix: &[u8]) -> Option<(&'k str, u64)> {
    let rest = key.strip_prefix(prefix)?;
    let split = rest.len().checked_sub(9)?;
    let (name, tail) = rest.split_at(split);
    if tail.first() != Some(&b'/') {
        return None;
    }
    Some((std::str::from_utf8(name).ok()?, tail_u64(tail)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_keys_parse_back() {
        assert_eq!(parse_block(&block("vlans", 7)), Some(("vlans", 7)));
        assert_eq!(parse_block(&block("a", u64::MAX)), Some(("a", u64::MAX)));
        assert_eq!(parse_block(b"b/short"), None);
        assert_eq!(parse_block(&value("vlans", 7)), None);
        assert_eq!(parse_owner(&owner("teid", 3)), Some(("teid", 3)));
    }
}
