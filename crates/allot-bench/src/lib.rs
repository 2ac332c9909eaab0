//! `allot-bench`: the issue-3 load generator. Claims per second and
//! latency through a running `allot serve` (REST, one HTTP/1.1 keep-alive
//! connection per client, or gRPC, one HTTP/2 connection per client) and, for comparison, through Redis used as a
//! resource manager (a SET of free IDs, `SPOP` to claim, `SADD` to release,
//! one connection per client, no pipelining).
//!
//! The client and the server are separate processes so they never share a
//! runtime; `scripts/bench-server` starts both servers and runs this.

pub mod allot_client;
pub mod cpu;
pub mod driver;
pub mod grpc_client;
pub mod redis_client;
pub mod stats;
