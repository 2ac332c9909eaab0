//! Idempotent retries (`Idempotency-Key` header or `request_id`) and nested
//! pools (`parent` on create) over real sockets, every answer checked
//! against the OpenAPI document.

mod common;

use common::{check_request, check_response, Resp, TestServer};
use reqwest::Method;
use serde_json::{json, Value};

/// POSTs `body` to `path` (documented as `route`) with an optional
/// Idempotency-Key and checks request and answer against the document.
async fn post(
    s: &TestServer,
    doc: &Value,
    route: &str,
    path: &str,
    key: Option<&str>,
    body: Value,
) -> Resp {
    check_request(doc, "post", route, &body);
    let mut rb = s.client.post(format!("{}{path}", s.base)).json(&body);
    if let Some(k) = key {
        rb = rb.header("Idempotency-Key", k);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    let r = Resp { status, body, text };
    check_response(doc, "post", route, r.status, &r.body);
    r
}

const ALLOC: &str = "/v1/pools/{pool}/allocate";
const RELEASE: &str = "/v1/pools/{pool}/release";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_requests_are_answered_once() {
    let s = TestServer::start().await;
    let d = s.ok("/openapi.json").await;
    let create = json!({"name": "ids", "kind": {"type": "range", "lo": 1, "hi": 100}});
    assert_eq!(s.post("/v1/pools", create).await.status, 201);
    let alloc = "/v1/pools/ids/allocate";
    let release = "/v1/pools/ids/release";

    // The same key and request: the first answer, one value claimed.
    let first = post(&s, &d, ALLOC, alloc, Some("req-1"), json!({"count": 2})).await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.body["values"], json!(["1", "2"]));
    let again = post(&s, &d, ALLOC, alloc, Some("req-1"), json!({"count": 2})).await;
    assert_eq!(again.body, first.body);
    assert_eq!(s.ok("/v1/pools/ids").await["stats"]["allocated"], 2);
    // `request_id` in the body is the same thing, and may repeat the header.
    let r = post(
        &s,
        &d,
        ALLOC,
        alloc,
        None,
        json!({"request_id": "req-1", "count": 2}),
    )
    .await;
    assert_eq!(r.body, first.body);
    let r = post(
        &s,
        &d,
        ALLOC,
        alloc,
        Some("req-1"),
        json!({"request_id": "req-1", "count": 2}),
    )
    .await;
    assert_eq!(r.body, first.body);
    // Without a key, a repeat is a new request.
    let r = post(&s, &d, ALLOC, alloc, None, json!({"count": 2})).await;
    assert_eq!(r.body["values"], json!(["3", "4"]));
    let r = post(&s, &d, ALLOC, alloc, None, json!({"request_id": "req-2"})).await;
    assert_eq!(r.body["values"], json!(["5"]));

    // Refusals change nothing.
    let before = s.snapshot().await;
    let r = post(&s, &d, ALLOC, alloc, Some("req-1"), json!({})).await;
    assert_eq!((r.status, r.code()), (409, "conflict"), "{r:?}");
    assert!(
        r.message().contains("request id 'req-1' was already used"),
        "{r:?}"
    );
    let r = post(&s, &d, ALLOC, alloc, Some("a"), json!({"request_id": "b"})).await;
    assert_eq!((r.status, r.code()), (400, "invalid_argument"));
    assert!(r.message().contains("differ"), "{r:?}");
    let long = "x".repeat(300);
    let r = post(&s, &d, ALLOC, alloc, Some(&long), json!({})).await;
    assert_eq!((r.status, r.code()), (400, "invalid_argument"));
    assert!(r.message().contains("request id is 300 bytes"), "{r:?}");
    let r = post(&s, &d, ALLOC, alloc, None, json!({"request_id": ""})).await;
    assert_eq!(r.status, 400);
    assert_eq!(s.snapshot().await, before);

    // Release: a retry gets the first answer, not "not allocated".
    let r = post(
        &s,
        &d,
        RELEASE,
        release,
        Some("rel-1"),
        json!({"value": "1"}),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["value"], "1");
    let again = post(
        &s,
        &d,
        RELEASE,
        release,
        Some("rel-1"),
        json!({"value": "1"}),
    )
    .await;
    assert_eq!((again.status, &again.body), (200, &r.body));
    let r = post(&s, &d, RELEASE, release, None, json!({"value": "1"})).await;
    assert_eq!((r.status, r.code()), (404, "not_found"));
    let r = post(
        &s,
        &d,
        RELEASE,
        release,
        None,
        json!({"value": "2", "request_id": "rel-2"}),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = post(
        &s,
        &d,
        RELEASE,
        release,
        Some("rel-2"),
        json!({"value": "2"}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(s.ok("/v1/pools/ids").await["stats"]["allocated"], 3);

    // Remembered across a restart: the answers are stored with the claims.
    let s = s.restart().await;
    let r = post(&s, &d, ALLOC, alloc, Some("req-1"), json!({"count": 2})).await;
    assert_eq!(r.body, first.body);
    assert_eq!(s.ok("/v1/pools/ids").await["stats"]["allocated"], 3);
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_pools_hold_their_parent_value() {
    let s = TestServer::start().await;
    let d = s.ok("/openapi.json").await;
    let create = |body: Value| {
        check_request(&d, "post", "/v1/pools", &body);
        s.post("/v1/pools", body)
    };
    let r = create(json!({"name": "supernets", "kind":
        {"type": "prefixes", "cidr": "10.0.0.0/16", "prefix_len": 24, "max_prefix_len": 28}}))
    .await;
    assert_eq!(r.status, 201);
    let r = s.post("/v1/pools/supernets/allocate", json!({})).await;
    assert_eq!(r.body["values"], json!(["10.0.0.0/24"]));

    let r = create(
        json!({"name": "lan", "kind": {"type": "addresses", "cidr": "10.0.0.0/24"},
        "labels": {"site": "a"}, "parent": {"pool": "supernets", "value": "10.0.0.0/24"}}),
    )
    .await;
    assert_eq!(r.status, 201, "{r:?}");
    check_response(&d, "post", "/v1/pools", 201, &r.body);
    assert_eq!(
        r.body["parent"],
        json!({"pool": "supernets", "value": "10.0.0.0/24"})
    );
    let lan = s.ok("/v1/pools/lan").await;
    check_response(&d, "get", "/v1/pools/{pool}", 200, &lan);
    assert_eq!(lan["parent"]["pool"], "supernets");
    // A top-level pool has no parent field at all.
    assert!(s.ok("/v1/pools/supernets").await.get("parent").is_none());
    let list = s.ok("/v1/pools?label=site=a").await;
    check_response(&d, "get", "/v1/pools", 200, &list);
    assert_eq!(list["pools"].as_array().unwrap().len(), 1);
    assert_eq!(list["pools"][0]["name"], "lan");

    let before = s.snapshot().await;
    let refusals: Vec<(Value, Method, &str, u16, &str, &str)> = vec![
        (
            json!({"value": "10.0.0.0/24"}),
            Method::POST,
            "/v1/pools/supernets/release",
            409,
            "conflict",
            "holds nested pool(s) lan",
        ),
        (
            json!({"name": "x", "kind": {"type": "addresses", "cidr": "10.0.1.0/24"},
                   "parent": {"pool": "supernets", "value": "10.0.1.0/24"}}),
            Method::POST,
            "/v1/pools",
            400,
            "invalid_argument",
            "is not claimed in pool 'supernets'",
        ),
        (
            json!({"name": "x", "kind": {"type": "addresses", "cidr": "10.1.0.0/24"},
                   "parent": {"pool": "supernets", "value": "10.0.0.0/24"}}),
            Method::POST,
            "/v1/pools",
            400,
            "invalid_argument",
            "does not lie within",
        ),
        (
            json!({"name": "x", "kind": {"type": "range", "lo": 1, "hi": 2},
                   "parent": {"pool": "nope", "value": "1"}}),
            Method::POST,
            "/v1/pools",
            404,
            "pool_not_found",
            "pool 'nope' not found",
        ),
        (
            json!({"name": "x", "kind": {"type": "range", "lo": 1, "hi": 2},
                   "parent": {"pool": "supernets"}}),
            Method::POST,
            "/v1/pools",
            400,
            "invalid_argument",
            "missing field `value`",
        ),
        (
            json!({"name": "x", "kind": {"type": "range", "lo": 1, "hi": 2},
                   "parent": {"pool": "supernets", "value": "10.0.0.0/24", "extra": 1}}),
            Method::POST,
            "/v1/pools",
            400,
            "invalid_argument",
            "unknown field `extra`",
        ),
        (
            json!({}),
            Method::DELETE,
            "/v1/pools/supernets?force=true",
            409,
            "conflict",
            "holds nested pool(s) lan",
        ),
    ];
    for (body, method, path, status, code, needle) in refusals {
        let body = (method == Method::POST).then_some(body);
        let r = s.call(method.clone(), path, body).await;
        assert_eq!(
            (r.status, r.code()),
            (status, code),
            "{method} {path}: {r:?}"
        );
        assert!(r.message().contains(needle), "{method} {path}: {r:?}");
        assert_eq!(s.snapshot().await, before, "{method} {path} changed state");
    }

    // Deleting the nested pool frees the parent value again.
    assert_eq!(
        s.call(Method::DELETE, "/v1/pools/lan", None).await.status,
        200
    );
    let r = s
        .post(
            "/v1/pools/supernets/release",
            json!({"value": "10.0.0.0/24"}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    s.stop().await.unwrap();
}
