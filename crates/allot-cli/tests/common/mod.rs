//! Helpers shared by the CLI's test binaries. Each binary uses only some of
//! them, hence the allowance.
#![allow(dead_code)]

pub mod served;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// What one run of the binary produced.
#[derive(Debug, PartialEq)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// `allot` with a clean environment (no `ALLOT_*` settings leaking in from
/// the caller), run in `dir`.
pub fn allot(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_allot"));
    cmd.current_dir(dir);
    for var in [
        "ALLOT_DATA_DIR",
        "ALLOT_OUTPUT",
        "ALLOT_LISTEN",
        "ALLOT_STORE",
        "ALLOT_CONFIG",
        "ALLOT_TOKEN",
        "ALLOT_SERVER",
        "ALLOT_MAX_BODY_BYTES",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs `cmd` to completion.
pub fn output(cmd: &mut Command) -> Out {
    let out = cmd.output().expect("run allot");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn assert_one_error_line(out: &Out) {
    assert!(
        out.stdout.is_empty(),
        "stdout should be empty on error: {}",
        out.stdout
    );
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "stderr should be one line: {:?}",
        out.stderr
    );
    assert!(lines[0].starts_with("error: "), "stderr: {}", lines[0]);
}

pub fn values(v: &Value) -> Vec<String> {
    v["values"]
        .as_array()
        .expect("values array")
        .iter()
        .map(|x| x.as_str().expect("string value").to_string())
        .collect()
}

pub fn claim_values(page: &Value) -> Vec<String> {
    page["claims"]
        .as_array()
        .expect("claims")
        .iter()
        .map(|c| c["value"].as_str().expect("value").to_string())
        .collect()
}

pub fn lines(s: &str) -> Vec<&str> {
    s.lines().collect()
}
