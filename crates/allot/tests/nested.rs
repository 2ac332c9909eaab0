//! Nested pools (FRINX-style): a pool carved from a claimed value of
//! another pool; the value stays claimed while the nested pool exists; pools
//! are filtered by label.

use std::collections::BTreeMap;
use std::sync::Arc;

use allot::{AllocRequest, Allot, Error, ParentRef, PoolKind, PoolSpec, Target};
use allot_store::MemoryStore;

fn addresses(cidr: &str) -> PoolSpec {
    PoolSpec::new(PoolKind::Addresses {
        cidr: cidr.parse().unwrap(),
        all_addresses: false,
    })
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn pools_nest_in_claimed_values() {
    let allot = Allot::new(Arc::new(MemoryStore::new()));
    let sites = PoolSpec::new(PoolKind::Prefixes {
        cidr: "10.0.0.0/16".parse().unwrap(),
        prefix_len: 24,
        max_prefix_len: 32,
    });
    allot
        .create_pool("sites", sites, labels(&[("role", "supernet")]))
        .await
        .unwrap();
    let site_a = allot
        .allocate("sites", AllocRequest::key("site-a"))
        .await
        .unwrap()
        .remove(0)
        .value;
    assert_eq!(site_a, "10.0.0.0/24");
    let parent = |v: &str| {
        Some(ParentRef {
            pool: "sites".into(),
            value: v.into(),
        })
    };

    // Refusals, each changing nothing.
    let outside = allot
        .create_pool_in(
            "bad",
            addresses("10.0.9.0/24"),
            labels(&[]),
            parent(&site_a),
        )
        .await;
    assert!(
        matches!(outside, Err(Error::InvalidInput(ref m)) if m.contains("does not lie within")),
        "{outside:?}"
    );
    let unclaimed = allot
        .create_pool_in(
            "bad",
            addresses("10.0.1.0/24"),
            labels(&[]),
            parent("10.0.1.0/24"),
        )
        .await;
    assert!(
        matches!(unclaimed, Err(Error::InvalidInput(ref m)) if m.contains("not claimed")),
        "{unclaimed:?}"
    );
    let missing = allot
        .create_pool_in(
            "bad",
            addresses("10.0.0.0/24"),
            labels(&[]),
            Some(ParentRef {
                pool: "nope".into(),
                value: "1".into(),
            }),
        )
        .await;
    assert!(matches!(missing, Err(Error::PoolNotFound(_))));
    assert!(matches!(
        allot.pool("bad").await,
        Err(Error::PoolNotFound(_))
    ));

    let hosts = allot
        .create_pool_in(
            "site-a-hosts",
            addresses("10.0.0.0/24"),
            labels(&[("site", "a")]),
            parent(&site_a),
        )
        .await
        .unwrap();
    assert_eq!(
        hosts.record.parent,
        parent(&site_a).map(|mut p| {
            p.value = site_a.clone();
            p
        })
    );
    assert_eq!(
        allot
            .allocate("site-a-hosts", AllocRequest::one())
            .await
            .unwrap()[0]
            .value,
        "10.0.0.1"
    );

    // The parent value cannot go while the nested pool exists.
    for target in [Target::Key("site-a".into()), Target::Value(site_a.clone())] {
        let r = allot.release("sites", target).await;
        assert!(
            matches!(r, Err(Error::Conflict(ref m)) if m.contains("site-a-hosts")),
            "{r:?}"
        );
    }
    allot.resync_begin("sites", None).await.unwrap();
    let swept = allot.resync_end("sites", None).await.unwrap();
    assert_eq!(
        swept.count, 0,
        "the sweep leaves a value holding a nested pool"
    );
    assert_eq!(
        allot
            .lookup("sites", Target::Key("site-a".into()))
            .await
            .unwrap()
            .value,
        site_a
    );
    let del = allot.delete_pool("sites", true).await;
    assert!(
        matches!(del, Err(Error::Conflict(ref m)) if m.contains("nested")),
        "{del:?}"
    );

    // Labels.
    let by_site = allot
        .list_pools_labeled(&labels(&[("site", "a")]))
        .await
        .unwrap();
    assert_eq!(
        by_site
            .iter()
            .map(|p| p.record.name.as_str())
            .collect::<Vec<_>>(),
        ["site-a-hosts"]
    );
    assert_eq!(
        allot.list_pools_labeled(&labels(&[])).await.unwrap().len(),
        2
    );
    assert!(allot
        .list_pools_labeled(&labels(&[("site", "b")]))
        .await
        .unwrap()
        .is_empty());

    // Once the nested pool is gone, the value can be released.
    allot.delete_pool("site-a-hosts", true).await.unwrap();
    allot
        .release("sites", Target::Key("site-a".into()))
        .await
        .unwrap();
    allot.delete_pool("sites", false).await.unwrap();
}
