//! The allot gRPC API, package `allot.v1`, generated from
//! `proto/allot/v1/allot.proto` at build time (by `protox`, so no `protoc`
//! is needed). `allot-server` implements the server; `allot-client` uses
//! the client for member sessions. Clients in other languages generate
//! theirs from the same file.
//!
//! ```
//! // A message of the API, as any client builds it.
//! let req = allot_proto::pb::AllocateRequest { pool: "ids".into(), count: 1, ..Default::default() };
//! assert_eq!(req.pool, "ids");
//! ```

/// The messages, server and client. Clients:
/// `pb::allot_client::AllotClient::new` over any tonic transport, e.g. a
/// `tonic::transport::Channel`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("allot.v1");
}
