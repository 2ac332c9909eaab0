//! The store conformance suite of `allot-store`, unchanged, against
//! PostgreSQL: one throw-away server for this test binary, one schema per
//! test (see `allot_store_postgres::testing`).

use allot_store_postgres::testing::fresh_store;

allot_store::conformance_tests!(
    make = fresh_store,
    // Real time: lease tests wait a few TTLs.
    lease_ttl = std::time::Duration::from_millis(1000),
    timed = #[tokio::test(flavor = "multi_thread", worker_threads = 2)],
);
