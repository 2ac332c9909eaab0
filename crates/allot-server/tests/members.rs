//! Members and owner lookup through the REST API: members join with the
//! engine directly on the same PostgreSQL store the server uses (as member
//! pods embedding allot would), and the server answers who they are and
//! which of them owns a value's block.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use allot::{Allot, MemberOptions};
use allot_backends::StoreUrl;
use allot_store_postgres::{PostgresOptions, PostgresStore};
use common::TestServer;
use serde_json::json;

async fn eventually<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_and_owners_over_rest() {
    let pg = allot_store_postgres::testing::start_server().await;
    let url = pg.url();
    let s = TestServer::start_with(|c| {
        c.store = StoreUrl::Postgres {
            url: url.clone(),
            schema: None,
            pool_size: None,
        }
    })
    .await;

    let r = s
        .post(
            "/v1/pools",
            json!({"name": "teid", "kind": {"type": "range", "lo": 0, "hi": 65535},
                   "block_size": 256, "member_blocks": "block"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["spec"]["member_blocks"], "block");
    let r = s
        .post(
            "/v1/pools",
            json!({"name": "bad", "kind": {"type": "range", "lo": 0, "hi": 9},
                                  "member_blocks": "sometimes"}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    // Values of a member-blocks pool come from members only.
    let r = s.post("/v1/pools/teid/allocate", json!({})).await;
    assert_eq!(
        (r.status, r.code()),
        (400, "invalid_argument"),
        "{}",
        r.text
    );
    let r = s.get("/v1/members").await;
    assert_eq!(r.body, json!({"members": []}));

    // A member pod, embedding the engine on the same database.
    let store = PostgresStore::connect(&url, PostgresOptions::default())
        .await
        .unwrap();
    let engine = Allot::new(Arc::new(store));
    let options = MemberOptions {
        address: Some("10.0.0.1:38412".into()),
        zone: Some("z1".into()),
        ..MemberOptions::default()
    };
    let m = engine.join("amf-1", options).await.unwrap();
    let v = m.allocate("teid").await.unwrap();

    eventually("the server lists the member with its block", || async {
        let r = s.get("/v1/members").await;
        r.body["members"][0]["blocks"] == 1
    })
    .await;
    let r = s.get("/v1/members").await;
    let member = &r.body["members"][0];
    assert_eq!(member["name"], "amf-1");
    assert_eq!(member["incarnation"], 1);
    assert_eq!(member["address"], "10.0.0.1:38412");
    assert_eq!(member["zone"], "z1");

    let r = s
        .get(&format!("/v1/pools/teid/owner?value={}", v.value))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["member"], "amf-1");
    assert_eq!(r.body["epoch"], v.epoch);
    assert_eq!(r.body["block"], v.block);
    assert_eq!(r.body["live"], true);
    assert_eq!(r.body["address"], "10.0.0.1:38412");

    // A block nobody owns, a bad value, a shared pool, a stray parameter.
    let unowned = if v.block == 0 { 300 } else { 5 };
    let r = s
        .get(&format!("/v1/pools/teid/owner?value={unowned}"))
        .await;
    assert_eq!((r.status, r.code()), (404, "not_found"), "{}", r.text);
    let r = s.get("/v1/pools/teid/owner?value=abc").await;
    assert_eq!(
        (r.status, r.code()),
        (400, "invalid_argument"),
        "{}",
        r.text
    );
    let r = s.get("/v1/pools/teid/owner?value=70000").await;
    assert_eq!(r.status, 400, "{}", r.text);
    let r = s.get("/v1/pools/teid/owner").await;
    assert_eq!(r.status, 400, "{}", r.text);
    let r = s.get("/v1/pools/teid/owner?value=1&x=2").await;
    assert_eq!(r.status, 400, "{}", r.text);
    let r = s
        .post(
            "/v1/pools",
            json!({"name": "vlans", "kind": {"type": "range", "lo": 1, "hi": 9}}),
        )
        .await;
    assert_eq!(r.status, 201);
    let r = s.get("/v1/pools/vlans/owner?value=1").await;
    assert_eq!((r.status, r.code()), (404, "not_found"), "{}", r.text);

    // The member leaves: its block is an orphan until someone takes it.
    m.leave().await.unwrap();
    eventually("the block shows as an orphan", || async {
        let r = s
            .get(&format!("/v1/pools/teid/owner?value={}", v.value))
            .await;
        r.body["live"] == false
    })
    .await;
    let r = s.get("/v1/members").await;
    assert_eq!(r.body, json!({"members": []}));

    // The document describes both routes.
    let doc = s.get("/openapi.json").await;
    assert!(doc.body["paths"]["/v1/members"]["get"].is_object());
    assert!(doc.body["paths"]["/v1/pools/{pool}/owner"]["get"].is_object());
    s.stop().await.unwrap();
}
