//! Remote members against an in-process `allot_server` on 127.0.0.1: the
//! gRPC member session, allocation in process from granted blocks, `sync`
//! commits, takeover of a departed member's blocks (stored bitmap, scan),
//! owner lookup and refusals.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use allot::{Durability, MemberOptions, PoolKind, PoolSpec};
use allot_client::{Client, RemoteMember};

mod common;
use common::{start, Srv};

fn member_pool(hi: u64, block_size: u64, durability: Durability) -> PoolSpec {
    let mut spec = PoolSpec::new(PoolKind::Range { lo: 0, hi });
    spec.block_size = block_size;
    spec.member_blocks = Some(durability);
    spec
}

/// A server on a fresh data dir (`token` required if given) and a client of
/// it, with member-blocks pool `pool` of values `0..=hi` created.
async fn server_with_pool(
    token: Option<&str>,
    pool: &str,
    hi: u64,
    block_size: u64,
    durability: Durability,
) -> (tempfile::TempDir, Srv, Client) {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(dir.path(), "127.0.0.1:0", token).await;
    let mut client = Client::new(srv.url()).unwrap();
    if let Some(t) = token {
        client = client.with_token(t);
    }
    client
        .create_pool(
            pool,
            member_pool(hi, block_size, durability),
            BTreeMap::new(),
            None,
        )
        .await
        .unwrap();
    (dir, srv, client)
}

/// Leases of 3 s: short enough for takeover tests, long enough that a busy
/// CI machine does not let a live member's lease run out.
fn options(ttl_ms: u64) -> MemberOptions {
    MemberOptions {
        ttl: Duration::from_millis(ttl_ms),
        return_after: Duration::from_secs(3600),
        ..MemberOptions::default()
    }
}

/// Allocates `n` values through the hot path, falling back to the async
/// call when the owned blocks run dry.
async fn take(m: &RemoteMember, pool: &str, n: usize) -> Vec<u64> {
    let mut alloc = m.allocator(pool).await.unwrap();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match alloc.try_allocate().unwrap() {
            Some(v) => out.push(v.offset),
            None => {
                let v = m.allocate(pool).await.unwrap();
                out.push(v.value.parse().unwrap());
            }
        }
    }
    out
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    // Takeovers wait for a 3 s lease to run out; the machine may be busy.
    for _ in 0..600 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_members_allocate_in_process_and_the_server_knows_the_owners() {
    let (_dir, srv, client) =
        server_with_pool(Some("t0k"), "teids", 4095, 64, Durability::Block).await;

    let a = client.join("smf-a", options(3000)).await.unwrap();
    let b = client.join("smf-b", options(3000)).await.unwrap();
    assert_eq!((a.incarnation(), b.incarnation()), (1, 1));
    let (va, vb) = tokio::join!(take(&a, "teids", 300), take(&b, "teids", 300));
    let all: HashSet<u64> = va.iter().chain(&vb).copied().collect();
    assert_eq!(all.len(), 600, "a value was handed out twice");

    // The blocks are disjoint and the server's owner map agrees.
    let ba: BTreeSet<u64> = a.owned_blocks("teids").iter().map(|b| b.0).collect();
    let bb: BTreeSet<u64> = b.owned_blocks("teids").iter().map(|b| b.0).collect();
    assert!(ba.is_disjoint(&bb));
    for v in [va[0], va[299]] {
        let o = client.owner("teids", &v.to_string()).await.unwrap();
        assert_eq!((o.member.as_str(), o.live), ("smf-a", true));
        assert!(ba.contains(&o.block));
    }
    // The server's map follows the store's watch: a moment behind at most.
    // The member may take a block more meanwhile (its allocator runs ahead
    // by a batch), so compare with what it holds at each look.
    let mut listed = Vec::new();
    let mut held = 0;
    for _ in 0..100 {
        listed = client.members().await.unwrap();
        held = a.owned_blocks("teids").len();
        if listed.first().is_some_and(|m| m.blocks as usize == held) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let names: Vec<&str> = listed.iter().map(|m| m.record.name.as_str()).collect();
    assert_eq!(names, ["smf-a", "smf-b"]);
    assert_eq!(listed[0].blocks as usize, held);
    assert!(held >= ba.len());

    // Release works on owned values and is refused for others' values.
    a.release("teids", &va[0].to_string()).await.unwrap();
    let err = a.release("teids", &vb[0].to_string()).await.unwrap_err();
    assert_eq!(err.code(), "conflict", "{err}");
    let err = a.allocate("nope").await.unwrap_err();
    assert_eq!(err.code(), "pool_not_found", "{err}");

    // A second session under a name in use is a new incarnation; the old
    // one is fenced (its lease revoked) and stops.
    let a2 = client.join("smf-a", options(3000)).await.unwrap();
    assert_eq!(a2.incarnation(), 2);
    wait_for("the old incarnation to stop", || !a.is_live()).await;
    let err = a.allocate("teids").await.unwrap_err();
    assert_eq!(err.code(), "fenced", "{err}");

    b.leave().await.unwrap();
    a2.leave().await.unwrap();
    // The server's map sees the records go a moment later.
    let mut listed = client.members().await.unwrap();
    for _ in 0..100 {
        if listed.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        listed = client.members().await.unwrap();
    }
    assert!(listed.is_empty(), "{listed:?}");

    // A wrong token cannot join.
    let bad = Client::new(srv.url()).unwrap().with_token("wrong");
    let err = bad.join("smf-x", options(3000)).await.unwrap_err();
    assert_eq!(err.code(), "unauthenticated", "{err}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_pool_orphans_are_taken_over_with_their_stored_values() {
    // 512 values in 8 blocks.
    let (_dir, srv, client) = server_with_pool(None, "ids", 511, 64, Durability::Sync).await;
    let a = client.join("amf-a", options(3000)).await.unwrap();
    let mut held_by_a = BTreeSet::new();
    for _ in 0..150 {
        let v = a.allocate("ids").await.unwrap();
        held_by_a.insert(v.value.parse::<u64>().unwrap());
    }
    // Released values are stored as free again.
    for v in held_by_a.iter().take(10).copied().collect::<Vec<_>>() {
        a.release("ids", &v.to_string()).await.unwrap();
        held_by_a.remove(&v);
    }
    let a_blocks = a.owned_blocks("ids");
    // A dies: its session ends without leaving, its lease runs out.
    drop(a);

    let b = client.join("amf-b", options(3000)).await.unwrap();
    // B must use the pool before it takes its orphans over.
    let first = b.allocate("ids").await.unwrap();
    wait_for("B to take A's blocks over", || {
        let owned: BTreeSet<u64> = b.owned_blocks("ids").iter().map(|x| x.0).collect();
        a_blocks.iter().all(|(blk, _)| owned.contains(blk))
    })
    .await;
    // Epochs moved on: A's fencing tokens are stale.
    for (blk, epoch) in b.owned_blocks("ids") {
        if let Some((_, old)) = a_blocks.iter().find(|x| x.0 == blk) {
            assert!(epoch > *old);
        }
    }
    // Everything else of the pool goes to B, and nothing A held.
    let mut got = BTreeSet::from([first.value.parse::<u64>().unwrap()]);
    loop {
        match b.allocate("ids").await {
            Ok(v) => assert!(got.insert(v.value.parse().unwrap())),
            Err(e) => {
                assert_eq!(e.code(), "exhausted", "{e}");
                break;
            }
        }
    }
    assert!(got.is_disjoint(&held_by_a), "B handed out a value A held");
    assert_eq!(got.len() + held_by_a.len(), 512);
    b.leave().await.unwrap();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_pool_orphans_are_scanned_by_the_new_owner() {
    let (_dir, srv, client) = server_with_pool(None, "sessions", 255, 64, Durability::Block).await;
    let a = client.join("upf-a", options(3000)).await.unwrap();
    let in_use: Vec<u64> = take(&a, "sessions", 40).await;
    let a_blocks = a.owned_blocks("sessions");
    drop(a);

    // The application's record of sessions still open (A's values); the
    // first scan fails, as an application that is not ready yet would.
    let asked = Arc::new(Mutex::new(Vec::new()));
    let open: Vec<String> = in_use.iter().map(u64::to_string).collect();
    let (asked2, fail_once) = (asked.clone(), Arc::new(Mutex::new(true)));
    let scan: allot::ScanFn = Arc::new(move |s: &allot::BlockScan| {
        asked2.lock().unwrap().push(s.block);
        if std::mem::replace(&mut *fail_once.lock().unwrap(), false) {
            return Err("not ready".into());
        }
        let lo: u64 = s.first.parse().unwrap();
        let hi: u64 = s.last.parse().unwrap();
        Ok(open
            .iter()
            .filter(|v| (lo..=hi).contains(&v.parse::<u64>().unwrap()))
            .cloned()
            .collect())
    });
    let mut opts = options(3000);
    opts.scan = Some(scan);
    let b = client.join("upf-b", opts).await.unwrap();
    let mut got: BTreeSet<u64> = take(&b, "sessions", 1).await.into_iter().collect();
    wait_for("B to take A's blocks over and scan them", || {
        let owned: BTreeSet<u64> = b.owned_blocks("sessions").iter().map(|x| x.0).collect();
        a_blocks.iter().all(|(blk, _)| owned.contains(blk))
    })
    .await;
    assert!(
        asked.lock().unwrap().len() > a_blocks.len(),
        "the failed scan was not asked again"
    );
    loop {
        match b.allocate("sessions").await {
            Ok(v) => assert!(got.insert(v.value.parse().unwrap())),
            Err(e) => {
                assert_eq!(e.code(), "exhausted", "{e}");
                break;
            }
        }
    }
    let reused: Vec<&u64> = in_use.iter().filter(|v| got.contains(v)).collect();
    assert!(
        reused.is_empty(),
        "values in use handed out again: {reused:?}"
    );
    assert_eq!(got.len() + in_use.len(), 256);
    b.leave().await.unwrap();
    srv.stop().await;
}
