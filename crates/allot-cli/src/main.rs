//! `allot`: see the `allot_cli` library for the implementation.

fn main() -> std::process::ExitCode {
    allot_cli::main()
}
