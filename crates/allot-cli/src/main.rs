//! `allot`: see the `allot_cli` library for the implementation.

/// mimalloc instead of the system allocator: `allot serve` allocates and
/// frees many small buffers per request on different worker threads, where
/// glibc's malloc showed up as 14–19% of the server's CPU (BENCHMARKS §5).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    allot_cli::main()
}
