//! End-to-end tests of the REST service over real sockets on 127.0.0.1:
//! every route, every kind of bad input (right status and code, nothing
//! changed, still serving), authentication, metrics, the OpenAPI document
//! and pools declared in the configuration.

mod common;

use std::collections::BTreeSet;

use allot_server::{Config, PoolDecl, ServerError};
use common::{check_request, check_response, sample, Resp, TestServer};
use reqwest::Method;
use serde_json::{json, Value};

/// Every route the router serves, as (method, OpenAPI path).
const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/pools"),
    ("get", "/v1/pools"),
    ("get", "/v1/pools/{pool}"),
    ("delete", "/v1/pools/{pool}"),
    ("post", "/v1/pools/{pool}/allocate"),
    ("post", "/v1/pools/{pool}/release"),
    ("get", "/v1/pools/{pool}/lookup"),
    ("get", "/v1/pools/{pool}/claims"),
    ("post", "/v1/pools/{pool}/resync/begin"),
    ("post", "/v1/pools/{pool}/resync/end"),
    ("get", "/v1/watch"),
    ("get", "/v1/members"),
    ("get", "/v1/pools/{pool}/owner"),
    ("get", "/openapi.json"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
];

async fn doc(s: &TestServer) -> Value {
    s.ok("/openapi.json").await
}

/// Sends `body` to `method path` (a concrete path), checks the request and
/// the response against the document (`route` is its OpenAPI path), and
/// returns the response.
async fn checked(
    s: &TestServer,
    d: &Value,
    method: &str,
    route: &str,
    path: &str,
    body: Option<Value>,
) -> Resp {
    if let Some(b) = &body {
        check_request(d, method, route, b);
    }
    let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
    let r = s.call(m, path, body).await;
    check_response(d, method, route, r.status, &r.body);
    r
}

fn fixture_pools() -> Vec<Value> {
    vec![
        json!({"name": "vlans", "kind": {"type": "range", "lo": 100, "hi": 199},
               "reserved": ["150-159"], "labels": {"team": "net", "env": "prod"}}),
        json!({"name": "hosts", "kind": {"type": "addresses", "cidr": "10.0.0.0/30"},
               "strategy": "next", "quarantine_secs": 0}),
        json!({"name": "p2p", "kind": {"type": "prefixes", "cidr": "10.64.0.0/16", "prefix_len": 24, "max_prefix_len": 28},
               "block_size": 4096, "labels": {"team": "net"}}),
        json!({"name": "colors", "kind": {"type": "set", "values": ["red", "green", "blue"]}}),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tour_of_every_route() {
    let s = TestServer::start().await;
    let d = doc(&s).await;
    assert!(d["openapi"].as_str().unwrap().starts_with("3."));

    let r = checked(&s, &d, "get", "/healthz", "/healthz", None).await;
    assert_eq!(r.status, 200);
    let r = checked(&s, &d, "get", "/readyz", "/readyz", None).await;
    assert_eq!(r.status, 200);

    // Pools of every kind.
    for p in fixture_pools() {
        let r = checked(&s, &d, "post", "/v1/pools", "/v1/pools", Some(p.clone())).await;
        assert_eq!(r.status, 201, "{r:?}");
        assert_eq!(r.body["name"], p["name"]);
        assert_eq!(r.body["spec"]["kind"]["type"], p["kind"]["type"]);
    }
    let r = checked(&s, &d, "get", "/v1/pools", "/v1/pools", None).await;
    let names: Vec<&str> = r.body["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["colors", "hosts", "p2p", "vlans"]);
    let vl = &r.body["pools"][3];
    assert_eq!(vl["stats"]["size"], 100);
    assert_eq!(vl["stats"]["reserved"], 10);
    assert_eq!(vl["labels"]["team"], "net");

    // Label filters: all given labels must match.
    let names = |v: &Value| -> Vec<String> {
        v["pools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect()
    };
    let r = checked(&s, &d, "get", "/v1/pools", "/v1/pools?label=team=net", None).await;
    assert_eq!(names(&r.body), ["p2p", "vlans"]);
    let r = s.get("/v1/pools?label=team=net&label=env=prod").await;
    assert_eq!(names(&r.body), ["vlans"]);
    let r = s.get("/v1/pools?label=team=nope").await;
    assert_eq!(names(&r.body), Vec::<String>::new());

    let r = checked(&s, &d, "get", "/v1/pools/{pool}", "/v1/pools/hosts", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["description"], "addresses of 10.0.0.0/30");
    assert_eq!(r.body["spec"]["strategy"], "next");

    // Allocate: one, many, keyed (idempotent), a value, a prefix, a set member.
    let alloc = |pool: &str| format!("/v1/pools/{pool}/allocate");
    let route = "/v1/pools/{pool}/allocate";
    let r = checked(&s, &d, "post", route, &alloc("vlans"), Some(json!({}))).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["values"], json!(["100"]));
    assert_eq!(r.body["pool"], "vlans");
    let r = checked(
        &s,
        &d,
        "post",
        route,
        &alloc("vlans"),
        Some(json!({"count": 3})),
    )
    .await;
    assert_eq!(r.body["values"], json!(["101", "102", "103"]));
    let keyed = json!({"key": "site-a", "owner": "agent-1", "meta": {"rack": "r12", "n": [1, 2]}});
    let r = checked(&s, &d, "post", route, &alloc("vlans"), Some(keyed.clone())).await;
    assert_eq!(r.body["values"], json!(["104"]));
    assert_eq!(r.body["claims"][0]["meta"]["rack"], "r12");
    let again = checked(&s, &d, "post", route, &alloc("vlans"), Some(keyed)).await;
    assert_eq!(again.body, r.body, "a key gets the same value");
    let r = checked(
        &s,
        &d,
        "post",
        route,
        &alloc("vlans"),
        Some(json!({"key": "site-c", "owner": "agent-1"})),
    )
    .await;
    assert_eq!(r.body["values"], json!(["105"]));
    let r = checked(
        &s,
        &d,
        "post",
        route,
        &alloc("vlans"),
        Some(json!({"value": "120", "meta": "plain string"})),
    )
    .await;
    assert_eq!(r.body["values"], json!(["120"]));
    let r = checked(
        &s,
        &d,
        "post",
        route,
        &alloc("p2p"),
        Some(json!({"prefix_len": 26})),
    )
    .await;
    assert_eq!(r.body["values"], json!(["10.64.0.0/26"]));
    let r = checked(&s, &d, "post", route, &alloc("p2p"), Some(json!({}))).await;
    assert_eq!(r.body["values"], json!(["10.64.1.0/24"]));
    let r = checked(
        &s,
        &d,
        "post",
        route,
        &alloc("hosts"),
        Some(json!({"key": "gw"})),
    )
    .await;
    assert_eq!(r.body["values"], json!(["10.0.0.1"]));
    let r = checked(
        &s,
        &d,
        "post",
        route,
        &alloc("colors"),
        Some(json!({"value": "green"})),
    )
    .await;
    assert_eq!(r.body["values"], json!(["green"]));

    // Lookup by key and by value.
    let route = "/v1/pools/{pool}/lookup";
    let r = checked(
        &s,
        &d,
        "get",
        route,
        "/v1/pools/vlans/lookup?key=site-a",
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["value"], "104");
    assert_eq!(r.body["owner"], "agent-1");
    assert_eq!(r.body["stale"], false);
    let r = checked(
        &s,
        &d,
        "get",
        route,
        "/v1/pools/vlans/lookup?value=120",
        None,
    )
    .await;
    assert_eq!(r.body["meta"], "plain string");
    let r = checked(
        &s,
        &d,
        "get",
        route,
        "/v1/pools/p2p/lookup?value=10.64.0.0/26",
        None,
    )
    .await;
    assert_eq!(r.body["value"], "10.64.0.0/26");
    let r = checked(
        &s,
        &d,
        "get",
        route,
        "/v1/pools/vlans/lookup?value=101",
        None,
    )
    .await;
    assert_eq!(r.body["key"], Value::Null);

    // Claims, paged.
    let route = "/v1/pools/{pool}/claims";
    let r = checked(&s, &d, "get", route, "/v1/pools/vlans/claims?limit=4", None).await;
    let vals: Vec<&str> = r.body["claims"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["value"].as_str().unwrap())
        .collect();
    assert_eq!(vals, ["100", "101", "102", "103"]);
    assert_eq!(r.body["next"], "103");
    let r = checked(
        &s,
        &d,
        "get",
        route,
        "/v1/pools/vlans/claims?limit=4&after=103",
        None,
    )
    .await;
    let vals: Vec<&str> = r.body["claims"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["value"].as_str().unwrap())
        .collect();
    assert_eq!(vals, ["104", "105", "120"]);
    assert_eq!(r.body["next"], Value::Null);
    let r = checked(&s, &d, "get", route, "/v1/pools/p2p/claims", None).await;
    assert_eq!(r.body["claims"].as_array().unwrap().len(), 2);

    // Release by value and by key.
    let route = "/v1/pools/{pool}/release";
    let r = checked(
        &s,
        &d,
        "post",
        route,
        "/v1/pools/vlans/release",
        Some(json!({"value": "101"})),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["value"], "101");
    let r = checked(
        &s,
        &d,
        "post",
        route,
        "/v1/pools/hosts/release",
        Some(json!({"key": "gw"})),
    )
    .await;
    assert_eq!(r.body["value"], "10.0.0.1");
    assert_eq!(r.body["key"], "gw");

    // Mark and sweep: site-a is re-claimed, site-c is not.
    let r = checked(
        &s,
        &d,
        "post",
        "/v1/pools/{pool}/resync/begin",
        "/v1/pools/vlans/resync/begin",
        Some(json!({"owner": "agent-1"})),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["count"], 2);
    let r = s.get("/v1/pools/vlans/lookup?key=site-c").await;
    assert_eq!(r.body["stale"], true);
    let r = s
        .post(
            "/v1/pools/vlans/allocate",
            json!({"key": "site-a", "owner": "agent-1"}),
        )
        .await;
    assert_eq!(r.body["values"], json!(["104"]));
    let r = checked(
        &s,
        &d,
        "post",
        "/v1/pools/{pool}/resync/end",
        "/v1/pools/vlans/resync/end",
        Some(json!({"owner": "agent-1"})),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["count"], 1);
    assert_eq!(r.body["released"][0]["key"], "site-c");
    // An all-owners pass with an empty body object.
    let r = s.post("/v1/pools/vlans/resync/begin", json!({})).await;
    assert_eq!((r.status, r.body["owner"].clone()), (200, Value::Null));
    let r = s.post("/v1/pools/vlans/resync/end", json!({})).await;
    assert_eq!(r.body["released"][0]["key"], "site-a");

    // Delete: refused while claimed, then forced.
    let route = "/v1/pools/{pool}";
    let r = checked(&s, &d, "delete", route, "/v1/pools/colors", None).await;
    assert_eq!((r.status, r.code()), (409, "pool_not_empty"));
    let r = checked(
        &s,
        &d,
        "delete",
        route,
        "/v1/pools/colors?force=false",
        None,
    )
    .await;
    assert_eq!(r.status, 409);
    let r = checked(&s, &d, "delete", route, "/v1/pools/colors?force=true", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, json!({"deleted": "colors"}));
    let r = checked(&s, &d, "get", route, "/v1/pools/colors", None).await;
    assert_eq!((r.status, r.code()), (404, "pool_not_found"));

    let r = s.get("/metrics").await;
    assert_eq!(r.status, 200);

    // Everything survives a restart of the server on the same data dir.
    let before = s.snapshot().await;
    let base = s.base.clone();
    let s = s.restart().await;
    assert_ne!(s.base, base);
    assert_eq!(s.snapshot().await, before);
    s.stop().await.unwrap();
}

/// A server with the fixture pools and some claims: hosts (/30) has one of
/// its two usable addresses left; vlans holds 100-113.
async fn fixture(tweak: impl FnOnce(&mut Config)) -> TestServer {
    let s = TestServer::start_with(tweak).await;
    for p in fixture_pools() {
        assert_eq!(s.post("/v1/pools", p).await.status, 201);
    }
    let r = s
        .post("/v1/pools/vlans/allocate", json!({"count": 13}))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = s
        .post(
            "/v1/pools/vlans/allocate",
            json!({"key": "site-a", "owner": "o"}),
        )
        .await;
    assert_eq!(r.body["values"], json!(["113"]));
    let r = s.post("/v1/pools/hosts/allocate", json!({})).await;
    assert_eq!(r.body["values"], json!(["10.0.0.1"]));
    let r = s
        .post("/v1/pools/p2p/allocate", json!({"prefix_len": 25}))
        .await;
    assert_eq!(r.status, 200);
    s
}

/// One bad request and what it must get back.
struct Bad {
    method: Method,
    path: &'static str,
    body: Body,
    status: u16,
    code: &'static str,
    needle: &'static str,
}

enum Body {
    None,
    Json(Value),
    Raw(Option<&'static str>, Vec<u8>),
}

fn bad(
    method: Method,
    path: &'static str,
    body: Body,
    status: u16,
    code: &'static str,
    needle: &'static str,
) -> Bad {
    Bad {
        method,
        path,
        body,
        status,
        code,
        needle,
    }
}

fn pool(name: &str, kind: Value) -> Body {
    Body::Json(json!({"name": name, "kind": kind}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    const LIMIT: usize = 16 * 1024;
    let s = fixture(|c| c.max_body_bytes = LIMIT).await;
    let d = doc(&s).await;
    let before = s.snapshot().await;
    let (get, post, delete) = (Method::GET, Method::POST, Method::DELETE);
    let json = |v: Value| Body::Json(v);
    let range = |lo: i64, hi: i64| json!({"type": "range", "lo": lo, "hi": hi});
    let cidr = |c: &str| json!({"type": "addresses", "cidr": c});
    let cases = vec![
        // Malformed CIDR, host bits, inverted range, bad kinds.
        bad(
            post.clone(),
            "/v1/pools",
            pool("net", cidr("10.0.0.300/24")),
            400,
            "invalid_argument",
            "is not a CIDR",
        ),
        bad(
            post.clone(),
            "/v1/pools",
            pool("net", cidr("10.0.0.0")),
            400,
            "invalid_argument",
            "is not a CIDR",
        ),
        bad(
            post.clone(),
            "/v1/pools",
            pool("net", cidr("10.0.0.1/24")),
            400,
            "invalid_argument",
            "host bits set; did you mean 10.0.0.0/24",
        ),
        bad(
            post.clone(),
            "/v1/pools",
            pool(
                "net",
                json!({"type": "prefixes", "cidr": "10.0.0.0/16", "prefix_len": 8, "max_prefix_len": 24}),
            ),
            400,
            "invalid_argument",
            "does not fit",
        ),
        bad(
            post.clone(),
            "/v1/pools",
            pool("r", range(200, 100)),
            400,
            "invalid_argument",
            "inverted",
        ),
        bad(
            post.clone(),
            "/v1/pools",
            pool("r", range(-1, 100)),
            400,
            "invalid_argument",
            "invalid kind",
        ),
        bad(
            post.clone(),
            "/v1/pools",
            pool("r", json!({"type": "ranges", "lo": 1, "hi": 2})),
            400,
            "invalid_argument",
            "ranges",
        ),
        bad(
            post.clone(),
            "/v1/pools",
            pool("r", json!({"type": "range", "lo": 1, "hi": 2, "step": 1})),
            400,
            "invalid_argument",
            "unknown field `step`",
        ),
        bad(
            post.clone(),
            "/v1/pools",
            pool("s", json!({"type": "set", "values": ["a", "a"]})),
            400,
            "invalid_argument",
            "listed twice",
        ),
        bad(
            post.clone(),
            "/v1/pools",
            pool("bad name", range(1, 2)),
            400,
            "invalid_argument",
            "invalid pool name",
        ),
        // Duplicate pool, bad block size, unknown strategy, reservation outside.
        bad(
            post.clone(),
            "/v1/pools",
            pool("vlans", range(1, 10)),
            409,
            "pool_exists",
            "pool 'vlans' already exists",
        ),
        bad(
            post.clone(),
            "/v1/pools",
            json(json!({"name": "b", "kind": range(1, 10), "block_size": 1000})),
            400,
            "invalid_argument",
            "power of two",
        ),
        bad(
            post.clone(),
            "/v1/pools",
            json(json!({"name": "b", "kind": range(1, 10), "strategy": "fastest"})),
            400,
            "invalid_argument",
            "fastest",
        ),
        bad(
            post.clone(),
            "/v1/pools",
            json(json!({"name": "b", "kind": range(1, 10), "reserved": ["20"]})),
            400,
            "invalid_argument",
            "outside",
        ),
        bad(
            post.clone(),
            "/v1/pools",
            json(json!({"name": "b", "kind": range(1, 10), "labels": {"": "x"}})),
            400,
            "invalid_argument",
            "label name",
        ),
        // Unknown pool on every pool route.
        bad(
            post.clone(),
            "/v1/pools/nope/allocate",
            json(json!({})),
            404,
            "pool_not_found",
            "pool 'nope' not found",
        ),
        bad(
            post.clone(),
            "/v1/pools/nope/release",
            json(json!({"value": "1"})),
            404,
            "pool_not_found",
            "pool 'nope' not found",
        ),
        bad(
            get.clone(),
            "/v1/pools/nope/lookup?key=k",
            Body::None,
            404,
            "pool_not_found",
            "pool 'nope' not found",
        ),
        bad(
            get.clone(),
            "/v1/pools/nope/claims",
            Body::None,
            404,
            "pool_not_found",
            "pool 'nope' not found",
        ),
        bad(
            get.clone(),
            "/v1/pools/nope",
            Body::None,
            404,
            "pool_not_found",
            "pool 'nope' not found",
        ),
        bad(
            delete.clone(),
            "/v1/pools/nope?force=true",
            Body::None,
            404,
            "pool_not_found",
            "pool 'nope' not found",
        ),
        bad(
            post.clone(),
            "/v1/pools/nope/resync/begin",
            json(json!({})),
            404,
            "pool_not_found",
            "pool 'nope' not found",
        ),
        bad(
            post.clone(),
            "/v1/pools/nope/resync/end",
            json(json!({})),
            404,
            "pool_not_found",
            "pool 'nope' not found",
        ),
        bad(
            post.clone(),
            "/v1/pools/bad%20name/allocate",
            json(json!({})),
            400,
            "invalid_argument",
            "invalid pool name",
        ),
        // Exhausted bulk allocates nothing.
        bad(
            post.clone(),
            "/v1/pools/hosts/allocate",
            json(json!({"count": 2})),
            409,
            "exhausted",
            "exhausted",
        ),
        bad(
            post.clone(),
            "/v1/pools/vlans/allocate",
            json(json!({"count": 77})),
            409,
            "exhausted",
            "asked for 77, 76 free",
        ),
        bad(
            post.clone(),
            "/v1/pools/vlans/allocate",
            json(json!({"count": 0})),
            400,
            "invalid_argument",
            "at least 1",
        ),
        // Values outside the pool, reserved, taken, wrong shape.
        bad(
            post.clone(),
            "/v1/pools/vlans/allocate",
            json(json!({"value": "200"})),
            400,
            "invalid_argument",
            "200 is outside the pool's range 100-199",
        ),
        bad(
            post.clone(),
            "/v1/pools/hosts/allocate",
            json(json!({"value": "10.0.1.1"})),
            400,
            "invalid_argument",
            "outside",
        ),
        bad(
            post.clone(),
            "/v1/pools/vlans/allocate",
            json(json!({"value": "abc"})),
            400,
            "invalid_argument",
            "'abc' is not an integer",
        ),
        bad(
            post.clone(),
            "/v1/pools/vlans/allocate",
            json(json!({"value": "155"})),
            400,
            "invalid_argument",
            "reserved",
        ),
        bad(
            post.clone(),
            "/v1/pools/hosts/allocate",
            json(json!({"value": "10.0.0.3"})),
            400,
            "invalid_argument",
            "reserved",
        ),
        bad(
            post.clone(),
            "/v1/pools/vlans/allocate",
            json(json!({"value": "105"})),
            409,
            "conflict",
            "105",
        ),
        bad(
            post.clone(),
            "/v1/pools/vlans/allocate",
            json(json!({"key": "site-a", "value": "120"})),
            409,
            "conflict",
            "site-a",
        ),
        bad(
            post.clone(),
            "/v1/pools/vlans/allocate",
            json(json!({"key": "k", "count": 2})),
            400,
            "invalid_argument",
            "exactly one value",
        ),
        bad(
            post.clone(),
            "/v1/pools/p2p/allocate",
            json(json!({"prefix_len": 30})),
            400,
            "invalid_argument",
            "30",
        ),
        // Releases and lookups of what is not claimed; bad targets.
        bad(
            post.clone(),
            "/v1/pools/vlans/release",
            json(json!({"value": "120"})),
            404,
            "not_found",
            "not allocated",
        ),
        bad(
            post.clone(),
            "/v1/pools/vlans/release",
            json(json!({"key": "no-such-key"})),
            404,
            "not_found",
            "key 'no-such-key' is not claimed",
        ),
        bad(
            post.clone(),
            "/v1/pools/vlans/release",
            json(json!({"value": "100", "key": "site-a"})),
            400,
            "invalid_argument",
            "not both",
        ),
        bad(
            post.clone(),
            "/v1/pools/vlans/release",
            json(json!({})),
            400,
            "invalid_argument",
            "one of",
        ),
        bad(
            get.clone(),
            "/v1/pools/vlans/lookup?key=nope",
            Body::None,
            404,
            "not_found",
            "key 'nope' is not claimed",
        ),
        bad(
            get.clone(),
            "/v1/pools/vlans/lookup?value=120",
            Body::None,
            404,
            "not_found",
            "not claimed",
        ),
        bad(
            get.clone(),
            "/v1/pools/vlans/lookup",
            Body::None,
            400,
            "invalid_argument",
            "one of",
        ),
        bad(
            get.clone(),
            "/v1/pools/vlans/lookup?value=1&key=2",
            Body::None,
            400,
            "invalid_argument",
            "not both",
        ),
        bad(
            get.clone(),
            "/v1/pools/vlans/lookup?vale=1",
            Body::None,
            400,
            "invalid_argument",
            "vale",
        ),
        bad(
            get.clone(),
            "/v1/pools/vlans/claims?limit=0",
            Body::None,
            400,
            "invalid_argument",
            "limit",
        ),
        bad(
            get.clone(),
            "/v1/pools/vlans/claims?limit=10001",
            Body::None,
            400,
            "invalid_argument",
            "limit",
        ),
        bad(
            get.clone(),
            "/v1/pools/vlans/claims?limit=ten",
            Body::None,
            400,
            "invalid_argument",
            "limit",
        ),
        bad(
            get.clone(),
            "/v1/pools/vlans/claims?after=abc",
            Body::None,
            400,
            "invalid_argument",
            "not an integer",
        ),
        bad(
            get.clone(),
            "/v1/pools?label=team",
            Body::None,
            400,
            "invalid_argument",
            "KEY=VALUE",
        ),
        bad(
            get.clone(),
            "/v1/pools?labels=a=b",
            Body::None,
            400,
            "invalid_argument",
            "labels",
        ),
        bad(
            delete.clone(),
            "/v1/pools/vlans",
            Body::None,
            409,
            "pool_not_empty",
            "still holds 14",
        ),
        bad(
            delete.clone(),
            "/v1/pools/vlans?force=maybe",
            Body::None,
            400,
            "invalid_argument",
            "force",
        ),
        bad(
            post.clone(),
            "/v1/pools/vlans/resync/end",
            json(json!({"owner": "o"})),
            404,
            "not_found",
            "no resync in progress",
        ),
        // Malformed JSON, wrong types, unknown fields, content type, size.
        bad(
            post.clone(),
            "/v1/pools/vlans/allocate",
            Body::Raw(Some("application/json"), b"{site:a}".to_vec()),
            400,
            "invalid_argument",
            "invalid JSON body",
        ),
        bad(
            post.clone(),
            "/v1/pools/vlans/allocate",
            Body::Raw(Some("application/json"), b"{\"count\": 1".to_vec()),
            400,
            "invalid_argument",
            "invalid JSON body",
        ),
        bad(
            post.clone(),
            "/v1/pools/vlans/allocate",
            Body::Raw(Some("application/json"), Vec::new()),
            400,
            "invalid_argument",
            "invalid JSON body",
        ),
        bad(
            post.clone(),
            "/v1/pools/vlans/allocate",
            json(json!({"count": "two"})),
            400,
            "invalid_argument",
            "count",
        ),
        bad(
            post.clone(),
            "/v1/pools/vlans/allocate",
            json(json!({"count": -1})),
            400,
            "invalid_argument",
            "count",
        ),
        bad(
            post.clone(),
            "/v1/pools/vlans/allocate",
            json(json!({"key": 5})),
            400,
            "invalid_argument",
            "key",
        ),
        bad(
            post.clone(),
            "/v1/pools/vlans/allocate",
            json(json!([1, 2])),
            400,
            "invalid_argument",
            "invalid JSON body",
        ),
        bad(
            post.clone(),
            "/v1/pools/vlans/allocate",
            json(json!({"cout": 2})),
            400,
            "invalid_argument",
            "unknown field `cout`",
        ),
        bad(
            post.clone(),
            "/v1/pools",
            json(json!({"name": "x", "kind": range(1, 2), "colour": "red"})),
            400,
            "invalid_argument",
            "unknown field `colour`",
        ),
        bad(
            post.clone(),
            "/v1/pools",
            json(json!({"name": 5, "kind": range(1, 2)})),
            400,
            "invalid_argument",
            "name",
        ),
        bad(
            post.clone(),
            "/v1/pools",
            json(json!({"kind": range(1, 2)})),
            400,
            "invalid_argument",
            "missing field `name`",
        ),
        bad(
            post.clone(),
            "/v1/pools/vlans/release",
            json(json!({"value": "100", "force": true})),
            400,
            "invalid_argument",
            "unknown field `force`",
        ),
        bad(
            post.clone(),
            "/v1/pools/vlans/resync/begin",
            json(json!({"owner": 1})),
            400,
            "invalid_argument",
            "owner",
        ),
        bad(
            post.clone(),
            "/v1/pools/vlans/allocate",
            Body::Raw(None, b"{}".to_vec()),
            415,
            "unsupported_media_type",
            "Content-Type",
        ),
        bad(
            post.clone(),
            "/v1/pools/vlans/allocate",
            Body::Raw(Some("text/plain"), b"{}".to_vec()),
            415,
            "unsupported_media_type",
            "Content-Type",
        ),
        bad(
            post.clone(),
            "/v1/pools/vlans/allocate",
            json(json!({"meta": "x".repeat(LIMIT)})),
            413,
            "too_large",
            "limit",
        ),
        bad(
            post.clone(),
            "/v1/pools",
            json(json!({"name": "big", "kind": {"type": "set", "values": vec!["v"; LIMIT]}})),
            413,
            "too_large",
            "limit",
        ),
        bad(
            post.clone(),
            "/v1/pools/vlans/allocate",
            json(json!({"meta": {"big": "y".repeat(65 * 1024 - LIMIT / 2)}})),
            413,
            "too_large",
            "limit",
        ),
        // Unknown routes and methods.
        bad(
            get.clone(),
            "/v1/nothing",
            Body::None,
            404,
            "not_found",
            "no such route",
        ),
        bad(
            Method::PUT,
            "/v1/pools",
            Body::None,
            405,
            "method_not_allowed",
            "PUT",
        ),
        bad(
            get.clone(),
            "/v1/pools/vlans/allocate",
            Body::None,
            405,
            "method_not_allowed",
            "GET",
        ),
    ];
    for case in cases {
        let r = match case.body {
            Body::None => s.call(case.method.clone(), case.path, None).await,
            Body::Json(v) => s.call(case.method.clone(), case.path, Some(v)).await,
            Body::Raw(ct, bytes) => s.raw(case.method.clone(), case.path, ct, bytes).await,
        };
        let what = format!("{} {}", case.method, case.path);
        assert_eq!(
            (r.status, r.code()),
            (case.status, case.code),
            "{what}: {}",
            r.text
        );
        assert!(
            r.message().contains(case.needle),
            "{what}: message {:?} should mention {:?}",
            r.message(),
            case.needle
        );
        assert!(
            !r.message().contains('\n'),
            "{what}: one line: {:?}",
            r.message()
        );
        // The error body has exactly the documented shape.
        assert_eq!(r.body.as_object().unwrap().len(), 1, "{what}: {}", r.text);
        assert_eq!(r.body["error"].as_object().unwrap().len(), 2, "{what}");
        let route = d["paths"]
            .as_object()
            .unwrap()
            .keys()
            .find(|k| route_matches(k, case.path.split('?').next().unwrap()))
            .cloned();
        if let (Some(route), m) = (route, case.method.as_str().to_lowercase()) {
            if d["paths"][&route][&m].is_object() {
                check_response(&d, &m, &route, r.status, &r.body);
            }
        }
        assert_eq!(s.snapshot().await, before, "{what} changed the state");
        assert_eq!(s.get("/healthz").await.status, 200, "still serving");
    }
    // Nothing was half-done: the next free values are the ones expected.
    let r = s.post("/v1/pools/vlans/allocate", json!({})).await;
    assert_eq!(r.body["values"], json!(["114"]));
    let r = s.post("/v1/pools/hosts/allocate", json!({})).await;
    assert_eq!(r.body["values"], json!(["10.0.0.2"]));
    s.stop().await.unwrap();
}

/// Whether an OpenAPI path template (`/v1/pools/{pool}`) matches `path`.
fn route_matches(template: &str, path: &str) -> bool {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    t.len() == p.len() && t.iter().zip(&p).all(|(a, b)| a.starts_with('{') || a == b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_guards_v1_and_metrics() {
    let mut s = TestServer::start_with(|c| c.token = Some("s3cret-token".into())).await;
    assert_eq!(
        s.post(
            "/v1/pools",
            json!({"name": "v", "kind": {"type": "range", "lo": 1, "hi": 9}})
        )
        .await
        .status,
        201
    );
    assert_eq!(
        s.post("/v1/pools/v/allocate", json!({"key": "k"}))
            .await
            .status,
        200
    );
    let before = s.snapshot().await;
    let with_token = s.token.take();
    let tries: [(Option<&str>, &str); 4] = [
        (None, "missing"),
        (Some("Bearer wrong"), "invalid bearer token"),
        (Some("Bearer s3cret-toke"), "invalid bearer token"),
        (Some("Basic s3cret-token"), "Bearer <token>"),
    ];
    for (header, needle) in tries {
        for (method, path, body) in [
            (Method::GET, "/v1/pools", None),
            (Method::GET, "/v1/pools/v", None),
            (
                Method::POST,
                "/v1/pools/v/allocate",
                Some(json!({"key": "k2"})),
            ),
            (
                Method::POST,
                "/v1/pools/v/release",
                Some(json!({"key": "k"})),
            ),
            (Method::DELETE, "/v1/pools/v?force=true", None),
            (
                Method::POST,
                "/v1/pools",
                Some(json!({"name": "w", "kind": {"type": "range", "lo": 1, "hi": 9}})),
            ),
            (Method::GET, "/metrics", None),
        ] {
            let mut rb = s
                .client
                .request(method.clone(), format!("{}{path}", s.base));
            if let Some(h) = header {
                rb = rb.header("authorization", h);
            }
            if let Some(b) = body {
                rb = rb.json(&b);
            }
            let resp = rb.send().await.unwrap();
            assert_eq!(
                resp.status().as_u16(),
                401,
                "{method} {path} with {header:?}"
            );
            assert_eq!(resp.headers()["www-authenticate"], "Bearer");
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body["error"]["code"], "unauthenticated");
            assert!(
                body["error"]["message"].as_str().unwrap().contains(needle),
                "{body}"
            );
        }
        // Probes and the document stay open.
        for path in ["/healthz", "/readyz", "/openapi.json"] {
            assert_eq!(s.get(path).await.status, 200, "{path}");
        }
    }
    s.token = with_token;
    assert_eq!(s.snapshot().await, before);
    let r = s.get("/metrics").await;
    assert_eq!(r.status, 200);
    assert!(
        common::sample(
            &r.text,
            "allot_http_requests_total",
            &[("operation", "list_pools"), ("code", "unauthenticated")]
        )
        .unwrap()
            >= 4.0,
        "{}",
        r.text
    );
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_request_and_pool_series() {
    let s = fixture(|_| {}).await;
    assert_eq!(
        s.post("/v1/pools/nope/allocate", json!({})).await.status,
        404
    );
    assert_eq!(
        s.post("/v1/pools/vlans/allocate", json!({"value": "155"}))
            .await
            .status,
        400
    );
    let r = s.get("/metrics").await;
    assert_eq!(r.status, 200);
    let t = &r.text;
    let m = |name: &str, labels: &[(&str, &str)]| {
        sample(t, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in\n{t}"))
    };
    assert_eq!(
        m(
            "allot_http_requests_total",
            &[("operation", "create_pool"), ("code", "ok")]
        ),
        4.0
    );
    assert_eq!(
        m(
            "allot_http_requests_total",
            &[("operation", "allocate"), ("code", "ok")]
        ),
        4.0
    );
    assert_eq!(
        m(
            "allot_http_requests_total",
            &[("operation", "allocate"), ("code", "pool_not_found")]
        ),
        1.0
    );
    assert_eq!(
        m(
            "allot_http_requests_total",
            &[("operation", "allocate"), ("code", "invalid_argument")]
        ),
        1.0
    );
    assert_eq!(
        m(
            "allot_http_request_duration_seconds_count",
            &[("operation", "allocate"), ("code", "ok")]
        ),
        4.0
    );
    assert_eq!(
        m(
            "allot_http_request_duration_seconds_bucket",
            &[("operation", "allocate"), ("code", "ok"), ("le", "+Inf")]
        ),
        4.0
    );
    assert!(
        m(
            "allot_http_request_duration_seconds_sum",
            &[("operation", "create_pool"), ("code", "ok")]
        ) > 0.0
    );
    // vlans: 100 values, 10 reserved, 14 claimed.
    assert_eq!(m("allot_pool_size", &[("pool", "vlans")]), 100.0);
    assert_eq!(m("allot_pool_allocated", &[("pool", "vlans")]), 14.0);
    assert_eq!(m("allot_pool_free", &[("pool", "vlans")]), 76.0);
    assert!((m("allot_pool_utilization", &[("pool", "vlans")]) - 14.0 / 90.0).abs() < 1e-9);
    assert_eq!(m("allot_pool_allocated", &[("pool", "hosts")]), 1.0);
    assert_eq!(m("allot_pool_size", &[("pool", "colors")]), 3.0);
    // A deleted pool's gauges disappear.
    assert_eq!(
        s.call(Method::DELETE, "/v1/pools/colors", None)
            .await
            .status,
        200
    );
    let t = s.get("/metrics").await.text;
    assert_eq!(sample(&t, "allot_pool_size", &[("pool", "colors")]), None);
    assert_eq!(
        sample(&t, "allot_pool_size", &[("pool", "vlans")]),
        Some(100.0)
    );
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_lists_every_route_the_router_serves() {
    let s = TestServer::start().await;
    let d = doc(&s).await;
    let mut documented = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for (path, item) in d["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if ["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                documented.insert((method.clone(), path.clone()));
                let id = op["operationId"].as_str().unwrap();
                assert!(ids.insert(id.to_string()), "operationId {id} twice");
                assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()));
            }
        }
    }
    let expected: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, expected);
    // Every documented route is served (not the fallback's "no such route",
    // nor a 405), and the same paths with other methods are 405.
    for (method, path) in &expected {
        let concrete = path.replace("{pool}", "nope");
        let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let body = (m == Method::POST).then(|| json!({}));
        // A valid watch never ends; a malformed one answers at once.
        let query = if path == "/v1/watch" { "?from=x" } else { "" };
        let r = s.call(m.clone(), &format!("{concrete}{query}"), body).await;
        assert!(
            !r.message().contains("no such route") && r.status != 405,
            "{method} {path} is documented but not served: {r:?}"
        );
        assert_ne!(r.code(), "method_not_allowed");
        let r = s.call(Method::PATCH, &concrete, None).await;
        assert_eq!(r.status, 405, "PATCH {path}");
    }
    // The route the router does not serve is refused by the fallback.
    assert!(s.get("/v2/pools").await.message().contains("no such route"));
    // Documented schemas for request bodies exist; security on /v1 and /metrics.
    for (method, path) in &expected {
        let op = &d["paths"][path][method];
        let secured = op["security"].as_array().is_some_and(|s| !s.is_empty());
        assert_eq!(
            secured,
            path.starts_with("/v1") || path == "/metrics",
            "{method} {path}"
        );
    }
    assert_eq!(
        d["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    // The document the library renders is the one served.
    assert_eq!(serde_json::to_value(allot_server::openapi()).unwrap(), d);
    s.stop().await.unwrap();
}

#[test]
fn schema_checker_catches_undocumented_fields() {
    let d = serde_json::to_value(allot_server::openapi()).unwrap();
    let claim = json!({"value": "1", "key": null, "owner": null, "meta": null, "stale": false});
    check_response(&d, "get", "/v1/pools/{pool}/lookup", 200, &claim);
    let mut extra = claim.clone();
    extra["surprise"] = json!(1);
    let caught = std::panic::catch_unwind(|| {
        check_response(&d, "get", "/v1/pools/{pool}/lookup", 200, &extra)
    });
    assert!(caught.is_err());
    let mut wrong = claim;
    wrong["stale"] = json!("no");
    let caught = std::panic::catch_unwind(|| {
        check_response(&d, "get", "/v1/pools/{pool}/lookup", 200, &wrong)
    });
    assert!(caught.is_err());
}

fn decl(v: Value) -> PoolDecl {
    serde_json::from_value(v).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_pools_are_applied_idempotently() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let vlans = decl(
        json!({"name": "vlans", "kind": {"type": "range", "lo": 100, "hi": 199}, "labels": {"team": "net"}}),
    );
    let hosts = decl(
        json!({"name": "hosts", "kind": {"type": "addresses", "cidr": "10.0.0.0/24"}, "strategy": "next"}),
    );
    let with = |pools: Vec<PoolDecl>| {
        let mut c = common::config(&data);
        c.pools = pools;
        c
    };
    // First start creates both.
    let s = TestServer::start_config(with(vec![vlans.clone(), hosts.clone()]))
        .await
        .unwrap();
    assert_eq!(
        s.post("/v1/pools/vlans/allocate", json!({"key": "a"}))
            .await
            .status,
        200
    );
    let before = s.snapshot().await;
    assert_eq!(before["pools"]["pools"].as_array().unwrap().len(), 2);
    s.stop().await.unwrap();

    // Same declarations again: nothing changes (created_ms included).
    let s = TestServer::start_config(with(vec![hosts.clone(), vlans.clone()]))
        .await
        .unwrap();
    assert_eq!(s.snapshot().await, before);
    s.stop().await.unwrap();

    // A conflicting declaration refuses the start and changes nothing, even
    // for a new pool declared next to it.
    let mut changed = vlans.clone();
    changed.strategy = Some(allot::Strategy::Next);
    changed.labels.insert("team".into(), "ops".into());
    let colors = decl(json!({"name": "colors", "kind": {"type": "set", "values": ["red"]}}));
    let err = TestServer::start_config(with(vec![colors.clone(), changed, hosts.clone()]))
        .await
        .err()
        .expect("conflicting config must refuse to start");
    let msg = err.to_string();
    assert!(matches!(err, ServerError::PoolConflict { .. }), "{msg}");
    assert!(msg.contains("config pool 'vlans'"), "{msg}");
    assert!(
        msg.contains("strategy: existing \"lowest\", config \"next\""),
        "{msg}"
    );
    assert!(
        msg.contains("labels: existing {\"team\":\"net\"}, config {\"team\":\"ops\"}"),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
    let mut kind = vlans.clone();
    kind.kind = json!({"type": "range", "lo": 100, "hi": 299});
    let msg = TestServer::start_config(with(vec![kind]))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("kind: existing {\"hi\":199,\"lo\":100,\"type\":\"range\"}"),
        "{msg}"
    );

    // Invalid and duplicate declarations refuse the start too.
    let bad = decl(json!({"name": "bad", "kind": {"type": "range", "lo": 9, "hi": 1}}));
    let msg = TestServer::start_config(with(vec![colors.clone(), bad]))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("config pool 'bad'") && msg.contains("inverted"),
        "{msg}"
    );
    let msg = TestServer::start_config(with(vec![colors.clone(), colors.clone()]))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("declared twice"), "{msg}");

    // After all the refusals: the data dir is as it was, and not locked.
    let s = TestServer::start_config(with(vec![])).await.unwrap();
    assert_eq!(s.snapshot().await, before);
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_server_on_the_same_data_dir_is_refused() {
    let s = TestServer::start().await;
    let err = TestServer::start_config(common::config(&s.data_dir))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ServerError::Locked(_)), "{err}");
    assert!(err.to_string().contains("in use by another allot process"));
    let mut c = common::config(&s.data_dir);
    c.listen = s.base.trim_start_matches("http://").to_string();
    let err = TestServer::start_config(c).await.err().unwrap();
    assert!(matches!(err, ServerError::Bind { .. }), "{err}");
    assert_eq!(s.get("/readyz").await.status, 200);
    s.stop().await.unwrap();
}
