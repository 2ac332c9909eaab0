//! Generates the gRPC messages, server and client from
//! `proto/allot/v1/allot.proto`.
//!
//! The `.proto` is compiled by `protox`, a pure-Rust protobuf compiler, and
//! the resulting descriptors are handed to `tonic-prost-build`, so building
//! needs no `protoc` binary (CI machines and fresh checkouts have none).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let include = manifest_dir.join("../../proto");
    let proto = include.join("allot/v1/allot.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let descriptors = protox::compile([&proto], [&include])?;
    tonic_prost_build::configure()
        // The client is generic over any transport: the library needs no
        // tonic transport (only the tests and client programs do).
        .build_transport(false)
        // Labels are BTreeMaps in the engine: the same type, stable order.
        .btree_map(".")
        .compile_fds(descriptors)?;
    Ok(())
}
