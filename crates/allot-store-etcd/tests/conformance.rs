//! The store conformance suite of `allot-store` against etcd, less the one
//! test of intermediate writes to one key within a transaction (see below):
//! one throw-away server per test, as revisions are etcd-wide and the suite
//! expects an empty store at revision 1 (see `allot_store_etcd::testing`).

use allot_store_etcd::testing::fresh_store;

allot_store::conformance_tests!(
    make = fresh_store,
    // Real time. etcd counts lease TTLs in whole seconds and revokes expired
    // leases on a 500 ms tick, so the TTL is long enough for a test waiting
    // 1.5 TTLs to see the expiry.
    lease_ttl = std::time::Duration::from_secs(2),
    timed = #[tokio::test(flavor = "multi_thread", worker_threads = 2)],
    // etcd refuses a transaction writing one key twice; the backend commits
    // its net effect instead (see the crate's `txn` module).
    one_change_per_key_per_revision = true,
);
