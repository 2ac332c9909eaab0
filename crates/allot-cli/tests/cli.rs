//! End-to-end tests of the `allot` binary: every command in both output
//! modes, restarts (each call is a new process), and one test per kind of
//! bad input, each checking that nothing changed.

mod common;

use std::path::PathBuf;

use common::{allot, assert_one_error_line, claim_values, lines, output, values, Out};

use serde_json::{json, Value};
use tempfile::TempDir;

/// A scratch working dir with a data dir inside it.
struct Env {
    dir: TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs `allot` with no --data-dir, in the scratch dir, with a clean env.
    fn raw(&self, args: &[&str]) -> Out {
        output(allot(self.dir.path()).args(args))
    }

    /// Runs `allot --data-dir DATA args...`.
    fn run(&self, args: &[&str]) -> Out {
        let data = self.data();
        let mut all = vec!["--data-dir", data.to_str().expect("utf-8 path")];
        all.extend_from_slice(args);
        self.raw(&all)
    }

    /// Runs and asserts success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(out.code, 0, "allot {args:?} failed: {}", out.stderr);
        out.stdout
    }

    /// Runs with `--output json` (after the subcommand) and parses stdout.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--output", "json"]);
        let stdout = self.ok(&all);
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("allot {args:?}: not one JSON document ({e}): {stdout}"))
    }

    /// Runs, asserts failure with exactly one `error:` line on stderr and
    /// nothing on stdout; returns the line.
    fn fail(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_ne!(
            out.code, 0,
            "allot {args:?} should fail; stdout: {}",
            out.stdout
        );
        assert_one_error_line(&out);
        out.stderr.trim_end().to_string()
    }

    /// Every pool and every claim, as JSON text.
    fn snapshot(&self) -> String {
        let pools = self.json(&["pool", "list"]);
        let mut snap = vec![pools.clone()];
        for p in pools.as_array().expect("pool list is an array") {
            let name = p["name"].as_str().expect("pool name");
            snap.push(self.json(&["claims", name, "--limit", "10000"]));
        }
        serde_json::to_string(&snap).expect("snapshot")
    }

    /// Asserts that `args` is refused with a message containing `needle`,
    /// and that no pool or claim changed.
    fn refused(&self, args: &[&str], needle: &str) -> String {
        let before = self.snapshot();
        let line = self.fail(args);
        assert!(
            line.contains(needle),
            "allot {args:?}: expected '{needle}' in: {line}"
        );
        assert_eq!(before, self.snapshot(), "allot {args:?} changed state");
        line
    }

    /// Two pools with claims, so refusals have something to disturb.
    fn fixture() -> Env {
        let env = Env::new();
        env.ok(&[
            "pool",
            "create",
            "vlans",
            "--range",
            "100-199",
            "--reserve",
            "150-159",
        ]);
        env.ok(&["alloc", "vlans", "--count", "3"]);
        env.ok(&[
            "alloc",
            "vlans",
            "--key",
            "site-a",
            "--owner",
            "agent-1",
            "--meta",
            r#"{"site":"a"}"#,
        ]);
        env.ok(&["pool", "create", "hosts", "--cidr", "10.0.0.0/30"]);
        env.ok(&["alloc", "hosts"]);
        env
    }
}

// ---------------------------------------------------------------- happy paths

#[test]
fn range_pool_tour_human() {
    let env = Env::new();
    let out = env.ok(&[
        "pool", "create", "vlans", "--range", "100-199", "--label", "team=net",
    ]);
    assert_eq!(
        out.trim(),
        "created pool vlans: integers 100-199 (100 values)"
    );
    assert_eq!(lines(&env.ok(&["alloc", "vlans"])), ["100"]);
    assert_eq!(
        lines(&env.ok(&["alloc", "vlans", "--count", "2"])),
        ["101", "102"]
    );
    assert_eq!(
        lines(&env.ok(&["alloc", "vlans", "--key", "k1", "--owner", "me"])),
        ["103"]
    );

    let show = env.ok(&["pool", "show", "vlans"]);
    for want in [
        "integers 100-199",
        "size:",
        "100",
        "allocated:   4",
        "free:        96",
        "4.0%",
        "lowest",
        "team=net",
    ] {
        assert!(show.contains(want), "pool show lacks '{want}':\n{show}");
    }
    let list = env.ok(&["pool", "list"]);
    let list = lines(&list);
    assert!(
        list[0].starts_with("NAME") && list[0].contains("UTIL"),
        "{list:?}"
    );
    let row: Vec<&str> = list[1].split_whitespace().collect();
    assert_eq!(
        row,
        ["vlans", "integers", "100-199", "100", "4", "96", "4.0%"]
    );

    let lookup = env.ok(&["lookup", "vlans", "--key", "k1"]);
    for want in [
        "value:  103",
        "key:    k1",
        "owner:  me",
        "meta:   -",
        "stale:  false",
    ] {
        assert!(lookup.contains(want), "lookup lacks '{want}':\n{lookup}");
    }
    assert_eq!(
        env.ok(&["release", "vlans", "--value", "100"]).trim(),
        "released 100"
    );
    assert_eq!(
        env.ok(&["release", "vlans", "--key", "k1"]).trim(),
        "released 103 (key k1)"
    );
    let claims = env.ok(&["claims", "vlans", "--limit", "1"]);
    assert!(claims.contains("101"), "{claims}");
    assert!(
        claims.contains("more: allot claims vlans --after 101"),
        "{claims}"
    );
    assert_eq!(
        env.ok(&["pool", "delete", "vlans", "--force"]).trim(),
        "deleted pool vlans"
    );
    assert_eq!(env.ok(&["pool", "list"]).trim(), "no pools");
}

#[test]
fn range_pool_tour_json() {
    let env = Env::new();
    let info = env.json(&[
        "pool",
        "create",
        "vlans",
        "--range",
        "100-199",
        "--strategy",
        "next",
        "--quarantine",
        "5",
    ]);
    assert_eq!(info["name"], "vlans");
    assert_eq!(
        info["spec"]["kind"],
        json!({"type": "range", "lo": 100, "hi": 199})
    );
    assert_eq!(info["spec"]["strategy"], "next");
    assert_eq!(info["spec"]["quarantine_secs"], 5);
    assert_eq!(info["stats"]["size"], 100);

    let a = env.json(&["alloc", "vlans", "--count", "2"]);
    assert_eq!(a["pool"], "vlans");
    assert_eq!(values(&a), ["100", "101"]);
    assert_eq!(a["claims"][1]["value"], "101");

    let show = env.json(&["pool", "show", "vlans"]);
    assert_eq!(show["stats"]["allocated"], 2);
    assert_eq!(show["stats"]["free"], 98);
    assert_eq!(show["utilization"], 0.02);
    let list = env.json(&["pool", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    assert_eq!(list[0]["name"], "vlans");

    let released = env.json(&["release", "vlans", "--value", "100"]);
    assert_eq!(released["value"], "100");
    // Quarantined after release: counted, not free.
    assert_eq!(
        env.json(&["pool", "show", "vlans"])["stats"]["quarantined"],
        1
    );
    assert_eq!(claim_values(&env.json(&["claims", "vlans"])), ["101"]);
    assert_eq!(
        env.json(&["pool", "delete", "vlans", "--force"]),
        json!({"deleted": "vlans"})
    );
}

#[test]
fn ipv4_address_pool_skips_edges_then_exhausts() {
    let env = Env::new();
    env.ok(&["pool", "create", "hosts", "--cidr", "10.0.0.0/30"]);
    assert_eq!(values(&env.json(&["alloc", "hosts"])), ["10.0.0.1"]);
    assert_eq!(lines(&env.ok(&["alloc", "hosts"])), ["10.0.0.2"]);
    env.refused(&["alloc", "hosts"], "exhausted");

    let env = Env::new();
    env.ok(&[
        "pool",
        "create",
        "all",
        "--cidr",
        "10.0.0.0/30",
        "--all-addresses",
    ]);
    assert_eq!(
        values(&env.json(&["alloc", "all", "--count", "4"])),
        ["10.0.0.0", "10.0.0.1", "10.0.0.2", "10.0.0.3"]
    );
}

#[test]
fn prefix_pool_hands_out_non_overlapping_prefixes() {
    let env = Env::new();
    let info = env.json(&[
        "pool",
        "create",
        "subnets",
        "--cidr",
        "10.0.0.0/16",
        "--prefix-len",
        "24",
    ]);
    assert_eq!(info["spec"]["kind"]["max_prefix_len"], 32);
    assert_eq!(values(&env.json(&["alloc", "subnets"])), ["10.0.0.0/24"]);
    let small = values(&env.json(&["alloc", "subnets", "--prefix-len", "26"]));
    assert_eq!(small.len(), 1);
    assert!(small[0].ends_with("/26"), "{small:?}");
    assert!(
        !small[0].starts_with("10.0.0."),
        "a /26 inside 10.0.0.0/24 overlaps: {small:?}"
    );
    let c = env.json(&["lookup", "subnets", "--value", &small[0]]);
    assert_eq!(c["value"], small[0].as_str());
    assert_eq!(
        claim_values(&env.json(&["claims", "subnets"])),
        ["10.0.0.0/24", small[0].as_str()]
    );

    let v6 = env.json(&[
        "pool",
        "create",
        "v6",
        "--cidr",
        "2001:db8::/32",
        "--prefix-len",
        "48",
    ]);
    assert_eq!(v6["spec"]["kind"]["max_prefix_len"], 64);
    let v6 = env.json(&[
        "pool",
        "create",
        "v6b",
        "--cidr",
        "2001:db8::/32",
        "--prefix-len",
        "48",
        "--max-prefix-len",
        "56",
    ]);
    assert_eq!(v6["spec"]["kind"]["max_prefix_len"], 56);
    assert_eq!(values(&env.json(&["alloc", "v6b"])), ["2001:db8::/48"]);
}

#[test]
fn set_pool() {
    let env = Env::new();
    env.ok(&["pool", "create", "colors", "--values", "red,green,blue"]);
    assert_eq!(
        values(&env.json(&["alloc", "colors", "--value", "blue"])),
        ["blue"]
    );
    assert_eq!(
        lines(&env.ok(&["alloc", "colors", "--count", "2"])),
        ["red", "green"]
    );
    env.refused(&["alloc", "colors"], "exhausted");
    env.refused(&["alloc", "colors", "--value", "purple"], "purple");
}

#[test]
fn keyed_claim_is_idempotent_across_restarts() {
    let env = Env::new();
    env.ok(&["pool", "create", "vlans", "--range", "100-199"]);
    env.ok(&["alloc", "vlans"]);
    let first = env.json(&[
        "alloc",
        "vlans",
        "--key",
        "site-a",
        "--owner",
        "agent-1",
        "--meta",
        r#"{"site":"a"}"#,
    ]);
    assert_eq!(values(&first), ["101"]);
    // Each call is a fresh process: the key survives the restart.
    for _ in 0..2 {
        assert_eq!(
            values(&env.json(&["alloc", "vlans", "--key", "site-a"])),
            ["101"]
        );
    }
    assert_eq!(
        env.json(&["pool", "show", "vlans"])["stats"]["allocated"],
        2
    );
    let c = env.json(&["lookup", "vlans", "--key", "site-a"]);
    assert_eq!(
        c,
        json!({"value": "101", "key": "site-a", "owner": "agent-1", "meta": {"site": "a"}, "stale": false})
    );
    let by_value = env.json(&["lookup", "vlans", "--value", "101"]);
    assert_eq!(by_value, c);
    let bare = env.json(&["lookup", "vlans", "--value", "100"]);
    assert_eq!(
        bare,
        json!({"value": "100", "key": null, "owner": null, "meta": null, "stale": false})
    );
}

#[test]
fn value_conflicting_with_key_is_refused() {
    let env = Env::new();
    env.ok(&["pool", "create", "vlans", "--range", "100-199"]);
    env.ok(&["alloc", "vlans", "--key", "k"]);
    env.ok(&["alloc", "vlans", "--key", "other"]);
    // The key is bound to 100; asking it to hold 105 must not move it.
    env.refused(
        &["alloc", "vlans", "--key", "k", "--value", "105"],
        "key 'k' already holds 100",
    );
    // 101 belongs to another key.
    env.refused(
        &["alloc", "vlans", "--key", "new", "--value", "101"],
        "101 is already allocated",
    );
    // Asking for the value the key already holds is the same claim.
    assert_eq!(
        values(&env.json(&["alloc", "vlans", "--key", "k", "--value", "100"])),
        ["100"]
    );
}

#[test]
fn release_by_value_and_by_key() {
    let env = Env::new();
    env.ok(&["pool", "create", "vlans", "--range", "100-199"]);
    env.ok(&["alloc", "vlans", "--count", "2"]);
    env.ok(&["alloc", "vlans", "--key", "k", "--owner", "o"]);
    let r = env.json(&["release", "vlans", "--value", "100"]);
    assert_eq!(
        r,
        json!({"value": "100", "key": null, "owner": null, "meta": null, "stale": false})
    );
    let r = env.json(&["release", "vlans", "--key", "k"]);
    assert_eq!(r["value"], "102");
    assert_eq!(r["key"], "k");
    assert_eq!(r["owner"], "o");
    assert_eq!(claim_values(&env.json(&["claims", "vlans"])), ["101"]);
    env.refused(&["lookup", "vlans", "--key", "k"], "not claimed");
    // Released values are free again (no quarantine).
    assert_eq!(values(&env.json(&["alloc", "vlans"])), ["100"]);
}

#[test]
fn claims_are_paged() {
    let env = Env::new();
    env.ok(&["pool", "create", "vlans", "--range", "100-199"]);
    env.ok(&["alloc", "vlans", "--count", "5"]);
    let p1 = env.json(&["claims", "vlans", "--limit", "2"]);
    assert_eq!(claim_values(&p1), ["100", "101"]);
    assert_eq!(p1["next"], "101");
    let p2 = env.json(&["claims", "vlans", "--limit", "2", "--after", "101"]);
    assert_eq!(claim_values(&p2), ["102", "103"]);
    assert_eq!(p2["next"], "103");
    let p3 = env.json(&["claims", "vlans", "--limit", "2", "--after", "103"]);
    assert_eq!(claim_values(&p3), ["104"]);
    assert_eq!(p3["next"], Value::Null);
    let human = env.ok(&["claims", "vlans", "--limit", "2", "--after", "103"]);
    assert!(!human.contains("more:"), "{human}");
    assert_eq!(claim_values(&env.json(&["claims", "vlans"])).len(), 5);
}

#[test]
fn resync_releases_exactly_the_keys_not_reclaimed() {
    let env = Env::new();
    env.ok(&["pool", "create", "vlans", "--range", "100-199"]);
    for key in ["a", "b", "c"] {
        env.ok(&["alloc", "vlans", "--key", key, "--owner", "agent-1"]);
    }
    env.ok(&["alloc", "vlans", "--key", "d", "--owner", "agent-2"]);
    env.ok(&["alloc", "vlans"]);

    let begun = env.json(&["resync", "begin", "vlans", "--owner", "agent-1"]);
    assert_eq!(begun["count"], 3);
    assert_eq!(begun["owner"], "agent-1");
    assert_eq!(env.json(&["lookup", "vlans", "--key", "b"])["stale"], true);
    assert_eq!(env.json(&["lookup", "vlans", "--key", "d"])["stale"], false);
    env.ok(&["alloc", "vlans", "--key", "a", "--owner", "agent-1"]);
    env.ok(&["alloc", "vlans", "--key", "c", "--owner", "agent-1"]);
    assert_eq!(env.json(&["lookup", "vlans", "--key", "a"])["stale"], false);

    let human = env.ok(&["resync", "end", "vlans", "--owner", "agent-1"]);
    assert!(human.contains("released 1 stale claim(s)"), "{human}");
    assert!(human.contains("101 (key b)"), "{human}");
    env.refused(&["lookup", "vlans", "--key", "b"], "not claimed");
    assert_eq!(
        claim_values(&env.json(&["claims", "vlans"])),
        ["100", "102", "103", "104"]
    );

    env.json(&["resync", "begin", "vlans"]);
    let ended = env.json(&["resync", "end", "vlans"]);
    assert_eq!(ended["count"], 3);
    let released: Vec<String> = claim_values(&json!({"claims": ended["released"]}));
    assert_eq!(released, ["100", "102", "103"]);
    env.refused(&["resync", "end", "vlans"], "no resync in progress");
}

#[test]
fn pool_delete_needs_force_while_claims_exist() {
    let env = Env::fixture();
    env.refused(&["pool", "delete", "vlans"], "--force");
    assert_eq!(
        env.ok(&["pool", "delete", "vlans", "--force"]).trim(),
        "deleted pool vlans"
    );
    let list = env.json(&["pool", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    env.ok(&["release", "hosts", "--value", "10.0.0.1"]);
    assert_eq!(
        env.json(&["pool", "delete", "hosts"]),
        json!({"deleted": "hosts"})
    );
}

#[test]
fn output_flag_and_env_anywhere() {
    let env = Env::fixture();
    let data = env.data();
    let data = data.to_str().expect("utf-8");
    let before = env.raw(&["--output", "json", "--data-dir", data, "pool", "list"]);
    let after = env.raw(&["pool", "list", "--data-dir", data, "--output", "json"]);
    assert_eq!(before.code, 0, "{}", before.stderr);
    assert_eq!(before.stdout, after.stdout);
    let parsed: Value = serde_json::from_str(&before.stdout).expect("json");
    assert_eq!(parsed.as_array().map(Vec::len), Some(2));

    let out = allot(env.dir.path())
        .args(["pool", "show", "vlans"])
        .env("ALLOT_DATA_DIR", data)
        .env("ALLOT_OUTPUT", "json")
        .output()
        .expect("run");
    let parsed: Value = serde_json::from_slice(&out.stdout).expect("json from env settings");
    assert_eq!(parsed["name"], "vlans");
}

#[test]
fn huge_counters_are_json_integers() {
    let env = Env::new();
    let out = env.run(&[
        "pool",
        "create",
        "v6",
        "--cidr",
        "2001:db8::/64",
        "--output",
        "json",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("\"size\": 18446744073709551616"),
        "{}",
        out.stdout
    );
    serde_json::from_str::<Value>(&out.stdout).expect("valid JSON");
    assert_eq!(values(&env.json(&["alloc", "v6"])), ["2001:db8::"]);
    let list = env.ok(&["pool", "list"]);
    assert!(list.contains("18446744073709551616"), "{list}");
}

#[test]
fn every_help_has_examples() {
    let env = Env::new();
    let top = env.raw(&["--help"]);
    assert_eq!(top.code, 0);
    assert!(top.stdout.contains("unique values"), "{}", top.stdout);
    let paths: &[&[&str]] = &[
        &[],
        &["pool"],
        &["pool", "create"],
        &["pool", "list"],
        &["pool", "show"],
        &["pool", "delete"],
        &["alloc"],
        &["release"],
        &["lookup"],
        &["claims"],
        &["resync"],
        &["resync", "begin"],
        &["resync", "end"],
        &["watch"],
    ];
    for path in paths {
        for flag in ["--help", "-h"] {
            let mut args = path.to_vec();
            args.push(flag);
            let out = env.raw(&args);
            assert_eq!(out.code, 0, "{args:?}");
            assert!(
                out.stdout.contains("Example"),
                "allot {args:?} has no example:\n{}",
                out.stdout
            );
        }
    }
    assert!(!env.dir.path().join("allot-data").exists());
}

#[test]
fn locked_data_dir_is_reported() {
    let env = Env::fixture();
    let before = env.snapshot();
    // The fixture's data dir was made with the default store: the log store.
    let db = env.data().join("allot-log");
    let held =
        allot_store::LogStore::open(&db, allot_store::LogOptions::default()).expect("open db");
    let line = env.fail(&["alloc", "vlans"]);
    assert!(line.contains("in use by another allot process"), "{line}");
    drop(held);
    assert_eq!(before, env.snapshot());
}

// ---------------------------------------------------------------- bad input

#[test]
fn missing_data_dir_is_not_created() {
    let env = Env::new();
    for args in [
        &["pool", "list"][..],
        &["alloc", "vlans"],
        &["pool", "show", "x"],
        &["claims", "x"],
        &["resync", "end", "x"],
    ] {
        let line = env.fail(args);
        assert!(line.contains("no allot data in"), "{line}");
        assert!(line.contains("create a pool first"), "{line}");
        assert!(!env.data().exists(), "allot {args:?} created the data dir");
    }
    // The default location, relative to the working dir.
    let out = env.raw(&["alloc", "vlans"]);
    assert_eq!(out.code, 1);
    assert_one_error_line(&out);
    assert!(
        out.stderr.contains("no allot data in ./allot-data"),
        "{}",
        out.stderr
    );
    assert!(!env.dir.path().join("allot-data").exists());
    // A refused create does not create it either.
    env.fail(&["pool", "create", "vlans", "--range", "9-1"]);
    assert!(!env.data().exists());
}

#[test]
fn malformed_cidr() {
    let env = Env::fixture();
    env.refused(
        &["pool", "create", "net", "--cidr", "10.0.0.300/24"],
        "is not a CIDR",
    );
    env.refused(
        &["pool", "create", "net", "--cidr", "10.0.0.0"],
        "is not a CIDR",
    );
}

#[test]
fn cidr_with_host_bits() {
    let env = Env::fixture();
    let line = env.refused(
        &["pool", "create", "net", "--cidr", "10.0.0.1/24"],
        "host bits",
    );
    assert!(line.contains("10.0.0.0/24"), "{line}");
}

#[test]
fn inverted_or_malformed_range() {
    let env = Env::fixture();
    env.refused(&["pool", "create", "r", "--range", "200-100"], "inverted");
    env.refused(&["pool", "create", "r", "--range", "100"], "expected LO-HI");
    env.refused(&["pool", "create", "r", "--range", "a-b"], "expected LO-HI");
}

#[test]
fn unknown_pool() {
    let env = Env::fixture();
    for args in [
        &["alloc", "nope"][..],
        &["release", "nope", "--value", "1"],
        &["lookup", "nope", "--key", "k"],
        &["claims", "nope"],
        &["pool", "show", "nope"],
        &["pool", "delete", "nope", "--force"],
        &["resync", "begin", "nope"],
    ] {
        env.refused(args, "pool 'nope' not found");
    }
    env.refused(&["alloc", "bad/name"], "invalid pool name");
}

#[test]
fn exhausted_bulk_allocates_nothing() {
    let env = Env::fixture();
    // hosts (/30) has one of its two usable addresses left.
    env.refused(&["alloc", "hosts", "--count", "2"], "exhausted");
    env.refused(&["alloc", "vlans", "--count", "87"], "exhausted");
    env.ok(&["alloc", "vlans", "--count", "86"]);
}

#[test]
fn value_outside_the_pool() {
    let env = Env::fixture();
    env.refused(
        &["alloc", "vlans", "--value", "200"],
        "200 is outside the pool's range 100-199",
    );
    env.refused(&["alloc", "hosts", "--value", "10.0.1.1"], "outside");
    env.refused(
        &["alloc", "vlans", "--value", "abc"],
        "'abc' is not an integer",
    );
}

#[test]
fn reserved_value() {
    let env = Env::fixture();
    env.refused(&["alloc", "vlans", "--value", "155"], "reserved");
    env.refused(&["alloc", "hosts", "--value", "10.0.0.3"], "reserved");
}

#[test]
fn duplicate_pool_name() {
    let env = Env::fixture();
    env.refused(
        &["pool", "create", "vlans", "--range", "1-10"],
        "already exists",
    );
}

#[test]
fn block_size_not_power_of_two() {
    let env = Env::fixture();
    env.refused(
        &[
            "pool",
            "create",
            "b",
            "--range",
            "1-10",
            "--block-size",
            "1000",
        ],
        "power of two",
    );
}

#[test]
fn malformed_json_metadata() {
    let env = Env::fixture();
    env.refused(&["alloc", "vlans", "--meta", "{site:a}"], "--meta");
}

#[test]
fn key_with_count() {
    let env = Env::fixture();
    env.refused(&["alloc", "vlans", "--key", "k", "--count", "2"], "--key");
}

#[test]
fn release_of_value_not_allocated() {
    let env = Env::fixture();
    env.refused(&["release", "vlans", "--value", "120"], "not allocated");
    env.refused(
        &["release", "vlans", "--key", "no-such-key"],
        "key 'no-such-key' is not claimed",
    );
}

#[test]
fn unknown_strategy() {
    let env = Env::fixture();
    let line = env.refused(
        &[
            "pool",
            "create",
            "s",
            "--range",
            "1-10",
            "--strategy",
            "fastest",
        ],
        "fastest",
    );
    assert!(line.contains("lowest"), "{line}");
}

#[test]
fn bad_label_and_conflicting_flags() {
    let env = Env::fixture();
    env.refused(
        &[
            "pool", "create", "l", "--range", "1-10", "--label", "novalue",
        ],
        "KEY=VALUE",
    );
    env.refused(
        &[
            "pool",
            "create",
            "l",
            "--range",
            "1-10",
            "--cidr",
            "10.0.0.0/24",
        ],
        "cannot be used with",
    );
    env.refused(
        &[
            "pool",
            "create",
            "l",
            "--range",
            "1-10",
            "--prefix-len",
            "24",
        ],
        "--cidr",
    );
    env.refused(
        &["release", "vlans", "--value", "100", "--key", "site-a"],
        "cannot be used with",
    );
    env.refused(
        &["pool", "create", "l", "--range", "1-10", "--reserve", "20"],
        "outside",
    );
}

#[test]
fn usage_errors_keep_clap_exit_code() {
    let env = Env::fixture();
    let out = env.run(&["pool", "create", "x"]);
    assert_eq!(out.code, 2);
    assert_one_error_line(&out);
    let out = env.run(&["alloc", "vlans", "--output", "yaml"]);
    assert_eq!(out.code, 2);
    assert_one_error_line(&out);
}
