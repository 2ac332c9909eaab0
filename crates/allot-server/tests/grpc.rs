//! End-to-end tests of the gRPC API over real sockets on 127.0.0.1, with the
//! generated tonic client: every RPC, the watch stream resumed after a
//! disconnect, every kind of bad input (right status code and `allot-code`,
//! nothing changed, still serving), authentication, metrics, and REST and
//! gRPC answered on the same port by the same server.

mod common;

use std::time::Duration;

use allot_server::grpc::pb;
use allot_server::grpc::pb::allot_client::AllotClient;
use allot_server::grpc::{ALLOT_CODE, START_REVISION};
use common::TestServer;
use futures::StreamExt;
use serde_json::{json, Value};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};

/// A gRPC client for a test server, sending an `authorization` metadata
/// entry (`Bearer <token>` when the server has a token) with every call.
struct Grpc {
    c: AllotClient<Channel>,
    authorization: Option<String>,
}

impl Grpc {
    async fn connect(s: &TestServer) -> Grpc {
        Grpc {
            c: AllotClient::new(channel(s).await),
            authorization: s.token.as_ref().map(|t| format!("Bearer {t}")),
        }
    }

    /// A request carrying the `authorization` entry, if any.
    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(a) = &self.authorization {
            r.metadata_mut().insert("authorization", a.parse().unwrap());
        }
        r
    }

    async fn create(&mut self, r: pb::CreatePoolRequest) -> Result<pb::PoolInfo, Status> {
        let r = self.req(r);
        self.c.create_pool(r).await.map(|r| r.into_inner())
    }

    async fn get(&mut self, name: &str) -> Result<pb::PoolInfo, Status> {
        let r = self.req(pb::GetPoolRequest { name: name.into() });
        self.c.get_pool(r).await.map(|r| r.into_inner())
    }

    async fn list(&mut self, labels: &[(&str, &str)]) -> Result<Vec<pb::PoolInfo>, Status> {
        let r = self.req(pb::ListPoolsRequest {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        });
        self.c.list_pools(r).await.map(|r| r.into_inner().pools)
    }

    async fn alloc(&mut self, r: pb::AllocateRequest) -> Result<pb::AllocateResponse, Status> {
        let r = self.req(r);
        self.c.allocate(r).await.map(|r| r.into_inner())
    }

    async fn release(&mut self, r: pb::ReleaseRequest) -> Result<pb::Claim, Status> {
        let r = self.req(r);
        self.c.release(r).await.map(|r| r.into_inner())
    }

    async fn lookup(&mut self, r: pb::LookupRequest) -> Result<pb::Claim, Status> {
        let r = self.req(r);
        self.c.lookup(r).await.map(|r| r.into_inner())
    }

    async fn claims(&mut self, r: pb::ListClaimsRequest) -> Result<pb::ClaimPage, Status> {
        let r = self.req(r);
        self.c.list_claims(r).await.map(|r| r.into_inner())
    }

    async fn watch(&mut self, from_revision: u64) -> Result<Streaming<pb::Event>, Status> {
        let r = self.req(pb::WatchRequest { from_revision });
        self.c.watch(r).await.map(|r| r.into_inner())
    }

    /// Runs one call of any RPC, keeping only its status.
    async fn run(&mut self, call: Call) -> Result<(), Status> {
        match call {
            Call::Create(r) => self.create(r).await.map(drop),
            Call::Get(name) => self.get(name).await.map(drop),
            Call::List(labels) => self.list(&labels).await.map(drop),
            Call::Delete(r) => {
                let r = self.req(r);
                self.c.delete_pool(r).await.map(drop)
            }
            Call::Alloc(r) => self.alloc(r).await.map(drop),
            Call::Release(r) => self.release(r).await.map(drop),
            Call::Lookup(r) => self.lookup(r).await.map(drop),
            Call::Claims(r) => self.claims(r).await.map(drop),
            Call::ResyncBegin(r) => {
                let r = self.req(r);
                self.c.resync_begin(r).await.map(drop)
            }
            Call::ResyncEnd(r) => {
                let r = self.req(r);
                self.c.resync_end(r).await.map(drop)
            }
            Call::Watch(from) => self.watch(from).await.map(drop),
        }
    }
}

/// One call of any RPC (for tables of bad input).
enum Call {
    Create(pb::CreatePoolRequest),
    Get(&'static str),
    List(Vec<(&'static str, &'static str)>),
    Delete(pb::DeletePoolRequest),
    Alloc(pb::AllocateRequest),
    Release(pb::ReleaseRequest),
    Lookup(pb::LookupRequest),
    Claims(pb::ListClaimsRequest),
    ResyncBegin(pb::ResyncRequest),
    ResyncEnd(pb::ResyncRequest),
    Watch(u64),
}

/// An HTTP/2 (prior knowledge) channel to the server's one port.
async fn channel(s: &TestServer) -> Channel {
    Endpoint::from_shared(s.base.clone())
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap()
}

fn code_of(s: &Status) -> &str {
    s.metadata()
        .get(ALLOT_CODE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn kind(k: pb::pool_kind::Kind) -> Option<pb::PoolKind> {
    Some(pb::PoolKind { kind: Some(k) })
}

fn range(lo: u64, hi: u64) -> Option<pb::PoolKind> {
    kind(pb::pool_kind::Kind::Range(pb::RangeKind { lo, hi }))
}

fn addresses(cidr: &str) -> Option<pb::PoolKind> {
    kind(pb::pool_kind::Kind::Addresses(pb::AddressesKind {
        cidr: cidr.into(),
        all_addresses: false,
    }))
}

fn prefixes(cidr: &str, prefix_len: u32, max_prefix_len: u32) -> Option<pb::PoolKind> {
    kind(pb::pool_kind::Kind::Prefixes(pb::PrefixesKind {
        cidr: cidr.into(),
        prefix_len,
        max_prefix_len,
    }))
}

fn set(values: &[&str]) -> Option<pb::PoolKind> {
    kind(pb::pool_kind::Kind::Set(pb::SetKind {
        values: values.iter().map(|v| v.to_string()).collect(),
    }))
}

fn pool(name: &str, kind: Option<pb::PoolKind>) -> pb::CreatePoolRequest {
    pb::CreatePoolRequest {
        name: name.into(),
        kind,
        ..Default::default()
    }
}

fn alloc(pool: &str) -> pb::AllocateRequest {
    pb::AllocateRequest {
        pool: pool.into(),
        ..Default::default()
    }
}

fn by_value(pool: &str, v: &str) -> pb::ReleaseRequest {
    pb::ReleaseRequest {
        pool: pool.into(),
        target: Some(pb::release_request::Target::Value(v.into())),
        request_id: None,
    }
}

fn by_key(pool: &str, k: &str) -> pb::ReleaseRequest {
    pb::ReleaseRequest {
        pool: pool.into(),
        target: Some(pb::release_request::Target::Key(k.into())),
        request_id: None,
    }
}

fn lookup_value(pool: &str, v: &str) -> pb::LookupRequest {
    pb::LookupRequest {
        pool: pool.into(),
        target: Some(pb::lookup_request::Target::Value(v.into())),
    }
}

fn lookup_key(pool: &str, k: &str) -> pb::LookupRequest {
    pb::LookupRequest {
        pool: pool.into(),
        target: Some(pb::lookup_request::Target::Key(k.into())),
    }
}

fn stats(p: &pb::PoolInfo) -> &pb::PoolStats {
    p.stats.as_ref().unwrap()
}

/// The pools of REST's tests, created over gRPC, with the same claims.
async fn fixture(g: &mut Grpc) {
    let mut vlans = pool("vlans", range(100, 199));
    vlans.reserved = vec!["150-159".into()];
    vlans.labels = [("team", "net"), ("env", "prod")]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    let mut hosts = pool("hosts", addresses("10.0.0.0/30"));
    hosts.strategy = pb::Strategy::Next as i32;
    let mut p2p = pool("p2p", prefixes("10.64.0.0/16", 24, 28));
    p2p.block_size = 4096;
    p2p.labels = [("team".to_string(), "net".to_string())].into();
    let colors = pool("colors", set(&["red", "green", "blue"]));
    for p in [vlans, hosts, p2p, colors] {
        g.create(p).await.unwrap();
    }
    let r = g
        .alloc(pb::AllocateRequest {
            count: 13,
            ..alloc("vlans")
        })
        .await
        .unwrap();
    assert_eq!(r.values.len(), 13);
    let r = g
        .alloc(pb::AllocateRequest {
            key: Some("site-a".into()),
            owner: Some("o".into()),
            ..alloc("vlans")
        })
        .await
        .unwrap();
    assert_eq!(r.values, ["113"]);
    assert_eq!(g.alloc(alloc("hosts")).await.unwrap().values, ["10.0.0.1"]);
    let r = g
        .alloc(pb::AllocateRequest {
            prefix_len: Some(25),
            ..alloc("p2p")
        })
        .await
        .unwrap();
    assert_eq!(r.values, ["10.64.0.0/25"]);
    let r = g
        .alloc(pb::AllocateRequest {
            request_id: Some("req-1".into()),
            ..alloc("colors")
        })
        .await
        .unwrap();
    assert_eq!(r.values, ["red"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_end_to_end() {
    let s = TestServer::start().await;
    let mut g = Grpc::connect(&s).await;
    fixture(&mut g).await;

    // CreatePool answers the whole definition, with defaults filled in.
    let v6 = g
        .create(pool("v6", prefixes("fd00::/48", 56, 0)))
        .await
        .unwrap();
    assert_eq!(v6.kind, prefixes("fd00::/48", 56, 72));
    assert_eq!(v6.strategy, pb::Strategy::Lowest as i32);
    assert_eq!(v6.block_size, 65536);
    assert_eq!(stats(&v6).size, (1u128 << 24).to_string());
    assert!(v6.created_ms > 0);
    assert_eq!(v6.member_blocks, pb::MemberBlocks::None as i32);

    // A member-blocks pool: its values come from members only.
    let teid = g
        .create(pb::CreatePoolRequest {
            member_blocks: pb::MemberBlocks::Block as i32,
            block_size: 256,
            ..pool("teid", range(0, 65535))
        })
        .await
        .unwrap();
    assert_eq!(teid.member_blocks, pb::MemberBlocks::Block as i32);
    g.run(Call::Delete(pb::DeletePoolRequest {
        name: "teid".into(),
        ..Default::default()
    }))
    .await
    .unwrap();
    let err = g
        .create(pb::CreatePoolRequest {
            member_blocks: 7,
            ..pool("bad-mb", range(0, 9))
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("member_blocks"), "{err}");

    // GetPool: counters as decimal strings, matching REST on the same port.
    let vlans = g.get("vlans").await.unwrap();
    assert_eq!(vlans.kind, range(100, 199));
    assert_eq!(vlans.reserved, ["150-159"]);
    assert_eq!(vlans.labels["team"], "net");
    let st = stats(&vlans);
    assert_eq!(
        (
            st.size.as_str(),
            st.reserved.as_str(),
            st.allocated,
            st.free.as_str()
        ),
        ("100", "10", 14, "76")
    );
    let rest = s.ok("/v1/pools/vlans").await;
    assert_eq!(rest["description"], vlans.description);
    assert_eq!(rest["stats"]["allocated"], 14);
    assert_eq!(rest["created_ms"], vlans.created_ms);
    let hosts = g.get("hosts").await.unwrap();
    assert_eq!(hosts.strategy, pb::Strategy::Next as i32);
    assert_eq!(hosts.description, "addresses of 10.0.0.0/30");

    // ListPools, all and by labels.
    let names = |ps: Vec<pb::PoolInfo>| ps.into_iter().map(|p| p.name).collect::<Vec<_>>();
    assert_eq!(
        names(g.list(&[]).await.unwrap()),
        ["colors", "hosts", "p2p", "v6", "vlans"]
    );
    assert_eq!(
        names(g.list(&[("team", "net")]).await.unwrap()),
        ["p2p", "vlans"]
    );
    assert_eq!(
        names(g.list(&[("team", "net"), ("env", "prod")]).await.unwrap()),
        ["vlans"]
    );
    assert!(g.list(&[("team", "ops")]).await.unwrap().is_empty());

    // Allocate: a value, a key with owner and metadata (idempotent), bulk.
    let r = g
        .alloc(pb::AllocateRequest {
            value: Some("120".into()),
            ..alloc("vlans")
        })
        .await
        .unwrap();
    assert_eq!(r.pool, "vlans");
    assert_eq!(r.values, ["120"]);
    let keyed = pb::AllocateRequest {
        key: Some("vm-7".into()),
        owner: Some("agent-1".into()),
        meta_json: Some(r#"{"rack": 4, "tags": ["a"]}"#.into()),
        ..alloc("vlans")
    };
    let first = g.alloc(keyed.clone()).await.unwrap();
    assert_eq!(first.values, ["114"]);
    let c = &first.claims[0];
    assert_eq!(c.key.as_deref(), Some("vm-7"));
    assert_eq!(c.owner.as_deref(), Some("agent-1"));
    let meta: Value = serde_json::from_str(c.meta_json.as_deref().unwrap()).unwrap();
    assert_eq!(meta, json!({"rack": 4, "tags": ["a"]}));
    assert_eq!(g.alloc(keyed).await.unwrap().values, ["114"]);
    let bulk = g
        .alloc(pb::AllocateRequest {
            count: 3,
            ..alloc("colors")
        })
        .await;
    assert_eq!(bulk.unwrap_err().code(), Code::ResourceExhausted);
    let bulk = g
        .alloc(pb::AllocateRequest {
            count: 2,
            ..alloc("colors")
        })
        .await
        .unwrap();
    assert_eq!(bulk.values, ["green", "blue"]);
    // A repeated request id answers the first answer, allocating nothing.
    let again = g
        .alloc(pb::AllocateRequest {
            request_id: Some("req-1".into()),
            ..alloc("colors")
        })
        .await
        .unwrap();
    assert_eq!(again.values, ["red"]);
    let r = g
        .alloc(pb::AllocateRequest {
            prefix_len: Some(28),
            ..alloc("p2p")
        })
        .await
        .unwrap();
    assert_eq!(r.values, ["10.64.0.128/28"]);

    // Lookup by value and by key.
    let c = g.lookup(lookup_value("vlans", "114")).await.unwrap();
    assert_eq!(c.key.as_deref(), Some("vm-7"));
    assert!(!c.stale);
    let c = g.lookup(lookup_key("vlans", "site-a")).await.unwrap();
    assert_eq!((c.value.as_str(), c.owner.as_deref()), ("113", Some("o")));
    let c = g.lookup(lookup_value("vlans", "100")).await.unwrap();
    assert_eq!((c.value.as_str(), c.key.as_deref()), ("100", None));

    // ListClaims, page by page.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = g
            .claims(pb::ListClaimsRequest {
                pool: "vlans".into(),
                after: after.clone(),
                limit: 4,
            })
            .await
            .unwrap();
        assert!(page.claims.len() <= 4);
        seen.extend(page.claims.into_iter().map(|c| c.value));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let mut want: Vec<String> = (100..=114).map(|v| v.to_string()).collect();
    want.push("120".into());
    assert_eq!(seen, want);
    let page = g
        .claims(pb::ListClaimsRequest {
            pool: "vlans".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!((page.claims.len(), page.next), (16, None));

    // Release by value, by key, and idempotently by request id.
    let c = g.release(by_value("vlans", "120")).await.unwrap();
    assert_eq!(c.value, "120");
    let c = g.release(by_key("vlans", "vm-7")).await.unwrap();
    assert_eq!((c.value.as_str(), c.key.as_deref()), ("114", Some("vm-7")));
    let once = pb::ReleaseRequest {
        request_id: Some("rel-1".into()),
        ..by_value("vlans", "100")
    };
    assert_eq!(g.release(once.clone()).await.unwrap().value, "100");
    assert_eq!(g.release(once).await.unwrap().value, "100");
    let gone = g.release(by_value("vlans", "100")).await.unwrap_err();
    assert_eq!((gone.code(), code_of(&gone)), (Code::NotFound, "not_found"));

    // Resync: begin marks keyed claims of the owner stale, end sweeps them.
    let r =
        g.c.resync_begin(g.req(pb::ResyncRequest {
            pool: "vlans".into(),
            owner: Some("o".into()),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.pool.as_str(), r.owner.as_deref(), r.count),
        ("vlans", Some("o"), 1)
    );
    assert!(g.lookup(lookup_key("vlans", "site-a")).await.unwrap().stale);
    let r =
        g.c.resync_end(g.req(pb::ResyncRequest {
            pool: "vlans".into(),
            owner: Some("o".into()),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.count, 1);
    assert_eq!(r.released[0].value, "113");
    assert_eq!(r.released[0].key.as_deref(), Some("site-a"));

    // A pool nested in a claimed prefix records its parent.
    let mut nested = pool("lan", addresses("10.64.0.128/28"));
    nested.parent = Some(pb::ParentRef {
        pool: "p2p".into(),
        value: "10.64.0.128/28".into(),
    });
    let lan = g.create(nested).await.unwrap();
    assert_eq!(
        lan.parent,
        Some(pb::ParentRef {
            pool: "p2p".into(),
            value: "10.64.0.128/28".into()
        })
    );
    let held = g
        .release(by_value("p2p", "10.64.0.128/28"))
        .await
        .unwrap_err();
    assert_eq!(
        (held.code(), code_of(&held)),
        (Code::FailedPrecondition, "conflict")
    );

    // DeletePool: refused while claimed unless forced.
    let del = |name: &str, force: bool| pb::DeletePoolRequest {
        name: name.into(),
        force,
    };
    let e =
        g.c.delete_pool(g.req(del("hosts", false)))
            .await
            .unwrap_err();
    assert_eq!(
        (e.code(), code_of(&e)),
        (Code::FailedPrecondition, "pool_not_empty")
    );
    let r = g.c.delete_pool(g.req(del("hosts", true))).await.unwrap();
    assert_eq!(r.into_inner().deleted, "hosts");
    let e = g.get("hosts").await.unwrap_err();
    assert_eq!((e.code(), code_of(&e)), (Code::NotFound, "pool_not_found"));
    assert_eq!(s.get("/v1/pools/hosts").await.status, 404);
    s.stop().await.unwrap();
}

/// Receives the next event, or fails after a few seconds.
async fn next_event(w: &mut Streaming<pb::Event>) -> pb::Event {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("an event in time")
        .expect("stream open")
        .expect("an event, not an error")
}

/// An event as a short line, to compare sequences.
fn summary(e: &pb::Event) -> String {
    use pb::event::Change;
    let values = |cs: &[pb::EventClaim]| cs.iter().map(|c| c.value.clone()).collect::<Vec<_>>();
    match e.change.as_ref().expect("a change") {
        Change::PoolCreated(c) => format!("created {} ({})", c.pool, c.description),
        Change::PoolDeleted(d) => format!("deleted {}", d.pool),
        Change::Claims(c) => format!(
            "{} +{:?} -{:?}",
            c.pool,
            values(&c.allocated),
            values(&c.released)
        ),
        Change::ResyncBegun(r) => format!("begun {} {:?}", r.pool, r.owner),
        Change::ResyncEnded(r) => format!("ended {} {:?} {}", r.pool, r.owner, r.released),
        Change::MemberUp(m) => format!("member up {} {}", m.member, m.incarnation),
        Change::MemberDown(m) => format!("member down {} {:?}", m.member, m.incarnation),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_after_a_disconnect_without_loss_or_duplicates() {
    let s = TestServer::start().await;
    let mut g = Grpc::connect(&s).await;
    // A stream "from now" says where it starts, so a client that loses it
    // before any event still resumes without loss.
    let first =
        g.c.watch(g.req(pb::WatchRequest { from_revision: 0 }))
            .await
            .unwrap();
    let start: u64 = first
        .metadata()
        .get(START_REVISION)
        .expect("the start revision")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    drop(first);
    let mut w = g.watch(start).await.unwrap();
    // Changes made over REST, on the same port, show up on the gRPC stream.
    let r = s
        .post(
            "/v1/pools",
            json!({"name": "ids", "kind": {"type": "range", "lo": 1, "hi": 100}}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    g.alloc(pb::AllocateRequest {
        key: Some("a".into()),
        owner: Some("o".into()),
        ..alloc("ids")
    })
    .await
    .unwrap();
    g.alloc(pb::AllocateRequest {
        count: 2,
        ..alloc("ids")
    })
    .await
    .unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_event(&mut w).await);
    }
    assert_eq!(got[0].revision, start);
    // Disconnect: drop the stream and its connection, then change more.
    drop(w);
    drop(g);
    let mut g = Grpc::connect(&s).await;
    g.release(by_value("ids", "2")).await.unwrap();
    let r = s
        .post("/v1/pools/ids/resync/begin", json!({"owner": "o"}))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    g.c.resync_end(g.req(pb::ResyncRequest {
        pool: "ids".into(),
        owner: Some("o".into()),
    }))
    .await
    .unwrap();
    g.c.delete_pool(g.req(pb::DeletePoolRequest {
        name: "ids".into(),
        force: true,
    }))
    .await
    .unwrap();
    // Resume from the last revision received + 1.
    let last = got.last().unwrap().revision;
    let mut w = g.watch(last + 1).await.unwrap();
    for _ in 0..5 {
        got.push(next_event(&mut w).await);
    }
    let lines: Vec<String> = got.iter().map(summary).collect();
    assert_eq!(
        lines,
        [
            "created ids (integers 1-100)",
            "ids +[\"1\"] -[]",
            "ids +[\"2\", \"3\"] -[]",
            "ids +[] -[\"2\"]",
            "begun ids Some(\"o\")",
            "ids +[] -[\"1\"]",
            "ended ids Some(\"o\") 1",
            "deleted ids",
        ]
    );
    let revisions: Vec<u64> = got.iter().map(|e| e.revision).collect();
    assert!(
        revisions.windows(2).all(|w| w[0] < w[1]),
        "strictly increasing: {revisions:?}"
    );
    // Nothing more: the resumed stream repeats nothing.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), w.next())
            .await
            .is_err(),
        "no event beyond the changes made"
    );
    // Replaying from the first revision gives exactly the same events.
    let mut replay = g.watch(revisions[0]).await.unwrap();
    for want in &got {
        assert_eq!(&next_event(&mut replay).await, want);
    }
    // A revision beyond the next one is refused before any event.
    let e = g.watch(revisions[7] + 100).await.unwrap_err();
    assert_eq!(
        (e.code(), code_of(&e)),
        (Code::InvalidArgument, "invalid_argument")
    );
    assert!(e.message().contains("in the future"), "{e:?}");
    // Shutdown ends open streams promptly, with UNAVAILABLE.
    let stop = tokio::spawn(s.stop());
    let end = tokio::time::timeout(Duration::from_secs(5), replay.next())
        .await
        .expect("the stream ends at shutdown");
    let e = end.expect("a final status").expect_err("UNAVAILABLE");
    assert_eq!((e.code(), code_of(&e)), (Code::Unavailable, "unavailable"));
    tokio::time::timeout(Duration::from_secs(5), stop)
        .await
        .expect("shutdown does not wait for the stream")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_changes_nothing() {
    const LIMIT: usize = 16 * 1024;
    let s = TestServer::start_with(|c| c.max_body_bytes = LIMIT).await;
    let mut g = Grpc::connect(&s).await;
    fixture(&mut g).await;
    let before = s.snapshot().await;
    let (inv, nf) = (Code::InvalidArgument, Code::NotFound);
    let with = |f: fn(&mut pb::CreatePoolRequest)| {
        let mut p = pool("b", range(1, 10));
        f(&mut p);
        Call::Create(p)
    };
    let a = |f: fn(&mut pb::AllocateRequest)| {
        let mut r = alloc("vlans");
        f(&mut r);
        Call::Alloc(r)
    };
    let claims = |after: Option<&str>, limit: u32| {
        Call::Claims(pb::ListClaimsRequest {
            pool: "vlans".into(),
            after: after.map(String::from),
            limit,
        })
    };
    let resync = |pool: &str, owner: Option<&str>| pb::ResyncRequest {
        pool: pool.into(),
        owner: owner.map(String::from),
    };
    let cases: Vec<(&str, Call, Code, &str, &str)> = vec![
        // Malformed CIDR, host bits, inverted range, bad kinds.
        (
            "malformed cidr",
            Call::Create(pool("net", addresses("10.0.0.300/24"))),
            inv,
            "invalid_argument",
            "is not a CIDR",
        ),
        (
            "cidr without length",
            Call::Create(pool("net", addresses("10.0.0.0"))),
            inv,
            "invalid_argument",
            "is not a CIDR",
        ),
        (
            "host bits",
            Call::Create(pool("net", addresses("10.0.0.1/24"))),
            inv,
            "invalid_argument",
            "host bits set; did you mean 10.0.0.0/24",
        ),
        (
            "prefix host bits",
            Call::Create(pool("net", prefixes("10.0.0.1/16", 24, 0))),
            inv,
            "invalid_argument",
            "host bits set",
        ),
        (
            "prefix does not fit",
            Call::Create(pool("net", prefixes("10.0.0.0/16", 8, 24))),
            inv,
            "invalid_argument",
            "does not fit",
        ),
        (
            "prefix length over 255",
            Call::Create(pool("net", prefixes("10.0.0.0/16", 300, 0))),
            inv,
            "invalid_argument",
            "not a prefix length",
        ),
        (
            "inverted range",
            Call::Create(pool("r", range(200, 100))),
            inv,
            "invalid_argument",
            "inverted",
        ),
        (
            "no kind",
            Call::Create(pool("r", None)),
            inv,
            "invalid_argument",
            "kind is required",
        ),
        (
            "empty kind",
            Call::Create(pool("r", Some(pb::PoolKind { kind: None }))),
            inv,
            "invalid_argument",
            "kind is required",
        ),
        (
            "set listed twice",
            Call::Create(pool("s", set(&["a", "a"]))),
            inv,
            "invalid_argument",
            "listed twice",
        ),
        (
            "empty set",
            Call::Create(pool("s", set(&[]))),
            inv,
            "invalid_argument",
            "at least one value",
        ),
        (
            "bad pool name",
            Call::Create(pool("bad name", range(1, 2))),
            inv,
            "invalid_argument",
            "invalid pool name",
        ),
        // Duplicate pool, bad block size, unknown strategy, reservation outside, labels.
        (
            "duplicate pool",
            Call::Create(pool("vlans", range(1, 10))),
            Code::AlreadyExists,
            "pool_exists",
            "pool 'vlans' already exists",
        ),
        (
            "block size",
            with(|p| p.block_size = 1000),
            inv,
            "invalid_argument",
            "power of two",
        ),
        (
            "strategy",
            with(|p| p.strategy = 42),
            inv,
            "invalid_argument",
            "unknown strategy 42",
        ),
        (
            "reservation outside",
            with(|p| p.reserved = vec!["20".into()]),
            inv,
            "invalid_argument",
            "outside",
        ),
        (
            "empty label name",
            with(|p| p.labels = [(String::new(), "x".into())].into()),
            inv,
            "invalid_argument",
            "label name",
        ),
        (
            "parent pool unknown",
            with(|p| {
                p.parent = Some(pb::ParentRef {
                    pool: "nope".into(),
                    value: "1".into(),
                })
            }),
            nf,
            "pool_not_found",
            "pool 'nope' not found",
        ),
        // Unknown pool on every pool RPC.
        (
            "allocate unknown pool",
            Call::Alloc(alloc("nope")),
            nf,
            "pool_not_found",
            "pool 'nope' not found",
        ),
        (
            "release unknown pool",
            Call::Release(by_value("nope", "1")),
            nf,
            "pool_not_found",
            "pool 'nope' not found",
        ),
        (
            "lookup unknown pool",
            Call::Lookup(lookup_key("nope", "k")),
            nf,
            "pool_not_found",
            "pool 'nope' not found",
        ),
        (
            "claims unknown pool",
            Call::Claims(pb::ListClaimsRequest {
                pool: "nope".into(),
                ..Default::default()
            }),
            nf,
            "pool_not_found",
            "pool 'nope' not found",
        ),
        (
            "get unknown pool",
            Call::Get("nope"),
            nf,
            "pool_not_found",
            "pool 'nope' not found",
        ),
        (
            "delete unknown pool",
            Call::Delete(pb::DeletePoolRequest {
                name: "nope".into(),
                force: true,
            }),
            nf,
            "pool_not_found",
            "pool 'nope' not found",
        ),
        (
            "resync begin unknown pool",
            Call::ResyncBegin(resync("nope", None)),
            nf,
            "pool_not_found",
            "pool 'nope' not found",
        ),
        (
            "resync end unknown pool",
            Call::ResyncEnd(resync("nope", None)),
            nf,
            "pool_not_found",
            "pool 'nope' not found",
        ),
        (
            "allocate bad pool name",
            Call::Alloc(alloc("bad name")),
            inv,
            "invalid_argument",
            "invalid pool name",
        ),
        (
            "get bad pool name",
            Call::Get("a/b"),
            inv,
            "invalid_argument",
            "invalid pool name",
        ),
        // Exhausted bulk allocates nothing.
        (
            "exhausted hosts",
            Call::Alloc(pb::AllocateRequest {
                count: 2,
                ..alloc("hosts")
            }),
            Code::ResourceExhausted,
            "exhausted",
            "exhausted",
        ),
        (
            "exhausted vlans",
            a(|r| r.count = 77),
            Code::ResourceExhausted,
            "exhausted",
            "asked for 77, 76 free",
        ),
        (
            "count over the limit",
            a(|r| r.count = 100_001),
            inv,
            "invalid_argument",
            "limit",
        ),
        // Values outside the pool, reserved, taken, wrong shape.
        (
            "value outside",
            a(|r| r.value = Some("200".into())),
            inv,
            "invalid_argument",
            "200 is outside the pool's range 100-199",
        ),
        (
            "address outside",
            Call::Alloc(pb::AllocateRequest {
                value: Some("10.0.1.1".into()),
                ..alloc("hosts")
            }),
            inv,
            "invalid_argument",
            "outside",
        ),
        (
            "not an integer",
            a(|r| r.value = Some("abc".into())),
            inv,
            "invalid_argument",
            "'abc' is not an integer",
        ),
        (
            "reserved value",
            a(|r| r.value = Some("155".into())),
            inv,
            "invalid_argument",
            "reserved",
        ),
        (
            "reserved address",
            Call::Alloc(pb::AllocateRequest {
                value: Some("10.0.0.3".into()),
                ..alloc("hosts")
            }),
            inv,
            "invalid_argument",
            "reserved",
        ),
        (
            "value taken",
            a(|r| r.value = Some("105".into())),
            Code::FailedPrecondition,
            "conflict",
            "105",
        ),
        (
            "key bound elsewhere",
            a(|r| {
                r.key = Some("site-a".into());
                r.value = Some("120".into());
            }),
            Code::FailedPrecondition,
            "conflict",
            "site-a",
        ),
        (
            "key with count",
            a(|r| {
                r.key = Some("k".into());
                r.count = 2;
            }),
            inv,
            "invalid_argument",
            "exactly one value",
        ),
        (
            "empty key",
            a(|r| r.key = Some(String::new())),
            inv,
            "invalid_argument",
            "key must not be empty",
        ),
        (
            "prefix too fine",
            Call::Alloc(pb::AllocateRequest {
                prefix_len: Some(30),
                ..alloc("p2p")
            }),
            inv,
            "invalid_argument",
            "30",
        ),
        (
            "prefix length over 255",
            Call::Alloc(pb::AllocateRequest {
                prefix_len: Some(256),
                ..alloc("p2p")
            }),
            inv,
            "invalid_argument",
            "not a prefix length",
        ),
        (
            "malformed meta_json",
            a(|r| r.meta_json = Some("{rack: 4".into())),
            inv,
            "invalid_argument",
            "meta_json is not JSON",
        ),
        (
            "empty meta_json",
            a(|r| r.meta_json = Some(String::new())),
            inv,
            "invalid_argument",
            "meta_json is not JSON",
        ),
        (
            "request id reused",
            Call::Alloc(pb::AllocateRequest {
                request_id: Some("req-1".into()),
                key: Some("other".into()),
                ..alloc("colors")
            }),
            Code::FailedPrecondition,
            "conflict",
            "req-1",
        ),
        // Releases and lookups of what is not claimed; missing targets.
        (
            "release unclaimed",
            Call::Release(by_value("vlans", "120")),
            nf,
            "not_found",
            "not allocated",
        ),
        (
            "release unknown key",
            Call::Release(by_key("vlans", "no-such-key")),
            nf,
            "not_found",
            "key 'no-such-key' is not claimed",
        ),
        (
            "release no target",
            Call::Release(pb::ReleaseRequest {
                pool: "vlans".into(),
                ..Default::default()
            }),
            inv,
            "invalid_argument",
            "one of",
        ),
        (
            "release outside",
            Call::Release(by_value("vlans", "1")),
            inv,
            "invalid_argument",
            "outside",
        ),
        (
            "lookup unknown key",
            Call::Lookup(lookup_key("vlans", "nope")),
            nf,
            "not_found",
            "key 'nope' is not claimed",
        ),
        (
            "lookup unclaimed",
            Call::Lookup(lookup_value("vlans", "120")),
            nf,
            "not_found",
            "not claimed",
        ),
        (
            "lookup no target",
            Call::Lookup(pb::LookupRequest {
                pool: "vlans".into(),
                target: None,
            }),
            inv,
            "invalid_argument",
            "one of",
        ),
        (
            "claims limit",
            claims(None, 10_001),
            inv,
            "invalid_argument",
            "limit",
        ),
        (
            "claims after",
            claims(Some("abc"), 0),
            inv,
            "invalid_argument",
            "not an integer",
        ),
        (
            "label filter without name",
            Call::List(vec![("", "x")]),
            inv,
            "invalid_argument",
            "label name",
        ),
        (
            "delete non-empty",
            Call::Delete(pb::DeletePoolRequest {
                name: "vlans".into(),
                force: false,
            }),
            Code::FailedPrecondition,
            "pool_not_empty",
            "still holds 14",
        ),
        (
            "resync end without pass",
            Call::ResyncEnd(resync("vlans", Some("o"))),
            nf,
            "not_found",
            "no resync in progress",
        ),
        (
            "watch from the future",
            Call::Watch(1_000_000),
            inv,
            "invalid_argument",
            "in the future",
        ),
        // Messages over the body limit, like REST's 413.
        (
            "meta over the body limit",
            a(|r| r.meta_json = Some(format!("\"{}\"", "x".repeat(LIMIT)))),
            Code::ResourceExhausted,
            "too_large",
            "too large",
        ),
        (
            "pool over the body limit",
            Call::Create(pool("big", set(&vec!["v"; LIMIT]))),
            Code::ResourceExhausted,
            "too_large",
            "too large",
        ),
    ];
    for (what, call, code, allot_code, needle) in cases {
        let e = g.run(call).await.expect_err(what);
        assert_eq!((e.code(), code_of(&e)), (code, allot_code), "{what}: {e:?}");
        assert!(
            e.message().contains(needle),
            "{what}: message {:?} should mention {needle:?}",
            e.message()
        );
        assert!(!e.message().contains('\n'), "{what}: one line");
        assert_eq!(s.snapshot().await, before, "{what} changed the state");
        g.get("vlans").await.expect("still serving gRPC");
        assert_eq!(s.get("/healthz").await.status, 200, "still serving REST");
    }

    // Bytes that are not the request message: refused as bad input (tonic
    // calls it INTERNAL), counted, and nothing changes.
    let mut raw = tonic::client::Grpc::new(channel(&s).await);
    raw.ready().await.unwrap();
    let wrong = pb::WatchRequest { from_revision: 5 };
    let e = raw
        .unary::<_, pb::PoolInfo, _>(
            tonic::Request::new(wrong),
            "/allot.v1.Allot/CreatePool".parse().unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), code_of(&e)),
        (Code::InvalidArgument, "invalid_argument"),
        "{e:?}"
    );
    // An unknown method.
    raw.ready().await.unwrap();
    let e = raw
        .unary::<_, pb::PoolInfo, _>(
            tonic::Request::new(pb::GetPoolRequest {
                name: "vlans".into(),
            }),
            "/allot.v1.Allot/Frobnicate".parse().unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), code_of(&e)),
        (Code::Unimplemented, "unimplemented"),
        "{e:?}"
    );
    assert_eq!(s.snapshot().await, before);

    // Nothing was half-done: the next free values are the ones expected.
    assert_eq!(g.alloc(alloc("vlans")).await.unwrap().values, ["114"]);
    assert_eq!(g.alloc(alloc("hosts")).await.unwrap().values, ["10.0.0.2"]);

    // gRPC calls are counted per RPC and outcome, beside REST's.
    let r = s.get("/metrics").await;
    assert_eq!(r.status, 200);
    let count = |op: &str, code: &str| {
        common::sample(
            &r.text,
            "allot_http_requests_total",
            &[("operation", op), ("code", code)],
        )
        .unwrap_or_else(|| panic!("no series for {op} {code} in\n{}", r.text))
    };
    assert_eq!(count("/allot.v1.Allot/CreatePool", "ok"), 4.0);
    assert_eq!(count("/allot.v1.Allot/Allocate", "exhausted"), 2.0);
    assert_eq!(count("/allot.v1.Allot/Allocate", "too_large"), 1.0);
    // 16 refused by checks, 1 that did not decode.
    assert_eq!(
        count("/allot.v1.Allot/CreatePool", "invalid_argument"),
        17.0
    );
    assert_eq!(count("/allot.v1.Allot/unknown", "unimplemented"), 1.0);
    assert!(count("/allot.v1.Allot/GetPool", "ok") >= 60.0);
    assert!(count("list_pools", "ok") >= 60.0);
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_guards_every_rpc() {
    let mut s = TestServer::start_with(|c| c.token = Some("s3cret-token".into())).await;
    let mut g = Grpc::connect(&s).await;
    g.create(pool("v", range(1, 9))).await.unwrap();
    g.alloc(pb::AllocateRequest {
        key: Some("k".into()),
        ..alloc("v")
    })
    .await
    .unwrap();
    let before = s.snapshot().await;
    let tries: [(Option<&str>, &str); 5] = [
        (None, "missing"),
        (Some("Bearer wrong"), "invalid bearer token"),
        (Some("Bearer s3cret-toke"), "invalid bearer token"),
        (Some("Bearer s3cret-tokenx"), "invalid bearer token"),
        (Some("Basic s3cret-token"), "Bearer <token>"),
    ];
    for (header, needle) in tries {
        let mut bad = Grpc {
            c: g.c.clone(),
            authorization: header.map(String::from),
        };
        let calls = vec![
            Call::Create(pool("w", range(1, 9))),
            Call::Get("v"),
            Call::List(vec![]),
            Call::Delete(pb::DeletePoolRequest {
                name: "v".into(),
                force: true,
            }),
            Call::Alloc(alloc("v")),
            Call::Release(by_key("v", "k")),
            Call::Lookup(lookup_key("v", "k")),
            Call::Claims(pb::ListClaimsRequest {
                pool: "v".into(),
                ..Default::default()
            }),
            Call::ResyncBegin(pb::ResyncRequest {
                pool: "v".into(),
                owner: None,
            }),
            Call::ResyncEnd(pb::ResyncRequest {
                pool: "v".into(),
                owner: None,
            }),
            Call::Watch(1),
        ];
        for call in calls {
            let e = bad.run(call).await.expect_err("refused");
            assert_eq!(
                (e.code(), code_of(&e)),
                (Code::Unauthenticated, "unauthenticated"),
                "{header:?}: {e:?}"
            );
            assert!(e.message().contains(needle), "{header:?}: {e:?}");
        }
    }
    assert_eq!(s.snapshot().await, before);
    // REST on the same port is guarded by the same token.
    let token = s.token.take();
    assert_eq!(s.get("/v1/pools").await.status, 401);
    s.token = token;
    assert_eq!(s.get("/v1/pools").await.status, 200);
    // The right token works, in any case of "Bearer".
    let mut lower = Grpc {
        c: g.c.clone(),
        authorization: Some("bearer s3cret-token".into()),
    };
    assert_eq!(lower.get("v").await.unwrap().name, "v");
    let r = s.get("/metrics").await;
    assert!(
        common::sample(
            &r.text,
            "allot_http_requests_total",
            &[
                ("operation", "/allot.v1.Allot/Get"),
                ("code", "unauthenticated")
            ]
        )
        .is_none(),
        "labels are full method paths"
    );
    assert!(
        common::sample(
            &r.text,
            "allot_http_requests_total",
            &[
                ("operation", "/allot.v1.Allot/GetPool"),
                ("code", "unauthenticated")
            ]
        )
        .unwrap()
            >= 5.0,
        "{}",
        r.text
    );
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_and_grpc_share_one_port() {
    use tonic::codegen::http;
    use tonic::codegen::Service as _;

    let s = TestServer::start().await;
    let mut g = Grpc::connect(&s).await;
    // Created over gRPC, read over REST (HTTP/1.1), and back.
    g.create(pool("ids", range(1, 10))).await.unwrap();
    let r = s.post("/v1/pools/ids/allocate", json!({"key": "a"})).await;
    assert_eq!(r.body["values"], json!(["1"]), "{r:?}");
    let c = g.lookup(lookup_key("ids", "a")).await.unwrap();
    assert_eq!(c.value, "1");
    assert_eq!(g.alloc(alloc("ids")).await.unwrap().values, ["2"]);
    let claims = s.ok("/v1/pools/ids/claims").await;
    assert_eq!(claims["claims"].as_array().unwrap().len(), 2);
    // REST also answers over HTTP/2 (prior knowledge), on the gRPC channel.
    let mut ch = channel(&s).await;
    for (path, status) in [
        ("/healthz", 200),
        ("/v1/pools/ids", 200),
        ("/v1/nothing", 404),
    ] {
        futures::future::poll_fn(|cx| ch.poll_ready(cx))
            .await
            .unwrap();
        let req = http::Request::get(format!("{}{path}", s.base))
            .body(tonic::body::Body::empty())
            .unwrap();
        let resp = ch.call(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2, "{path}");
        assert_eq!(resp.status().as_u16(), status, "{path}");
        assert_eq!(resp.headers()["content-type"], "application/json", "{path}");
    }
    // The two APIs agree on the pool.
    let rest = s.ok("/v1/pools/ids").await;
    let grpc = g.get("ids").await.unwrap();
    assert_eq!(rest["description"], grpc.description);
    assert_eq!(rest["stats"]["allocated"], stats(&grpc).allocated);
    assert_eq!(rest["stats"]["free"], 8);
    assert_eq!(stats(&grpc).free, "8");
    s.stop().await.unwrap();
}
