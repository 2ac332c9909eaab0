//! The Contrail agent's restart flow on the embedded store: labels claimed
//! for 1,000 keys, a restart, a mark-and-sweep pass in which half of the keys
//! are claimed again, and the sweep releasing exactly the other half.

use std::collections::BTreeMap;
use std::sync::Arc;

use allot::{AllocRequest, Allot, Error, PoolKind, PoolSpec, Target};
use allot_store::{RedbOptions, RedbStore};

fn open(dir: &std::path::Path) -> Allot {
    Allot::new(Arc::new(
        RedbStore::open(dir.join("allot.redb"), RedbOptions::default()).unwrap(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_survive_restart_and_sweep_releases_the_unclaimed_half() {
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<String> = (0..1000).map(|i| format!("vrf:{i}")).collect();

    // Before the restart: every key gets a label (claimed concurrently).
    let first: BTreeMap<String, String> = {
        let allot = open(dir.path());
        let spec = PoolSpec::new(PoolKind::Range {
            lo: 16,
            hi: 1_048_575,
        });
        allot
            .create_pool("mpls", spec, Default::default())
            .await
            .unwrap();
        let claims = futures::future::join_all(
            keys.iter()
                .map(|k| allot.allocate("mpls", AllocRequest::key(k).owner("agent"))),
        )
        .await;
        let first = keys
            .iter()
            .cloned()
            .zip(claims.into_iter().map(|c| c.unwrap().remove(0).value))
            .collect();
        allot.close().await;
        first
    };
    let distinct: std::collections::BTreeSet<_> = first.values().collect();
    assert_eq!(distinct.len(), 1000, "labels must be unique");

    // After the restart: state restored before any "configuration" arrives.
    let allot = open(dir.path());
    assert_eq!(allot.pool("mpls").await.unwrap().stats.allocated, 1000);
    let begun = allot.resync_begin("mpls", Some("agent")).await.unwrap();
    assert_eq!(begun.count, 1000);
    let stale = allot
        .lookup("mpls", Target::Key("vrf:3".into()))
        .await
        .unwrap();
    assert!(stale.stale);

    // Configuration re-claims half of the keys: the same labels come back.
    for k in keys.iter().step_by(2) {
        let c = allot
            .allocate("mpls", AllocRequest::key(k).owner("agent"))
            .await
            .unwrap();
        assert_eq!(
            &c[0].value, &first[k],
            "key {k} changed label across the restart"
        );
        assert!(!c[0].stale);
    }
    assert!(
        !allot
            .lookup("mpls", Target::Key("vrf:2".into()))
            .await
            .unwrap()
            .stale
    );
    assert!(
        allot
            .lookup("mpls", Target::Key("vrf:3".into()))
            .await
            .unwrap()
            .stale
    );

    // End of configuration: exactly the other half goes.
    let ended = allot.resync_end("mpls", Some("agent")).await.unwrap();
    assert_eq!(ended.count, 500);
    let released: BTreeMap<String, String> = ended
        .released
        .into_iter()
        .map(|c| (c.key.unwrap(), c.value))
        .collect();
    let expected: BTreeMap<String, String> = keys
        .iter()
        .skip(1)
        .step_by(2)
        .map(|k| (k.clone(), first[k].clone()))
        .collect();
    assert_eq!(released, expected);

    for (i, k) in keys.iter().enumerate() {
        let r = allot.lookup("mpls", Target::Key(k.clone())).await;
        if i % 2 == 0 {
            assert_eq!(r.unwrap().value, first[k]);
        } else {
            assert!(
                matches!(r, Err(Error::NotFound(_))),
                "{k} should be released"
            );
        }
    }
    assert_eq!(allot.pool("mpls").await.unwrap().stats.allocated, 500);
    // The pass is closed: ending it again is an error.
    assert!(matches!(
        allot.resync_end("mpls", Some("agent")).await,
        Err(Error::NotFound(_))
    ));
}
