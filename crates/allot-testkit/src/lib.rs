//! Test support for allot: helper binaries that tests run as child
//! processes (and kill), and the tests that need them.
//!
//! - `crash-child`: claims keys as fast as it can on a data dir and prints
//!   each claim once it is acknowledged (`tests/crash.rs` kills it with SIGKILL).
//! - `member-child`: a member pod allocating from owned blocks on a shared
//!   store, recording what it hands out (`tests/members.rs` runs fifty of
//!   them, kills some, stops one, and checks the histories).

pub mod history;
