//! Transactions: store compares and operations onto etcd transactions.
//!
//! **Native path.** Every compare and operation has a direct etcd
//! equivalent: `Version`, `ModRevision`, `CreateRevision` and `Value`
//! compares are etcd's (etcd also treats a missing key as version, create
//! and mod revision 0 and fails a value compare on it); puts, deletes,
//! range deletes and gets are etcd's, and etcd evaluates a branch's gets
//! after its earlier writes, bumps the revision once per writing
//! transaction, and rejects a put to a dead lease. So a transaction is sent
//! as one etcd transaction and etcd makes it atomic and serializable.
//!
//! **Evaluated path.** etcd refuses a branch that writes one key twice (two
//! puts of a key, or a put of a key the branch also deletes, in either
//! order). Such transactions, and requests etcd cannot spell (an empty key,
//! which the namespace prefix would turn into a real key; an inverted range;
//! a lease id beyond etcd's signed range), are evaluated here instead, with
//! the shared evaluator (`allot_store::backend::apply_txn`), in a loop:
//! 1. read every key and range the transaction names in one read-only etcd
//!    transaction: a snapshot at revision `R`;
//! 2. evaluate the transaction on that snapshot;
//! 3. commit its net writes with one etcd transaction guarded by a
//!    `mod_revision` compare on every key read (0 for a missing one) and a
//!    `mod_revision < R + 1` compare over every range read (which catches a
//!    key created in it since), so it commits only if nothing it read has
//!    changed: then it is serializable at its commit revision;
//! 4. if a guard fails, start over (until the request timeout).
//!
//! Results (including gets after writes) are exactly those of the reference
//! semantics. What etcd cannot express is the history *within* such a
//! revision: etcd records one change per key per revision, so the watch
//! shows each key's net change (a key put and then deleted by the same
//! transaction shows one delete, or nothing if it did not exist before),
//! and a key deleted and put again by one transaction keeps its
//! `create_revision` and counts on its `version`, as if it had only been
//! overwritten.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use allot_store::backend::{apply_txn, in_range, Applied};
use allot_store::{
    Compare, CompareTarget, KeyValue, LeaseId, Op, OpResult, Revision, StoreError, Txn, TxnResponse,
};
use etcd_client::{
    Compare as EtcdCompare, CompareOp, GetOptions, PutOptions, Txn as EtcdTxn, TxnOp, TxnOpResponse,
};

use crate::error::EtcdError;
use crate::{header_revision, to_u64, Inner, Namespace};

/// Runs one store transaction.
pub(crate) async fn run(inner: &Inner, txn: &Txn) -> Result<TxnResponse, StoreError> {
    if needs_evaluation(txn) {
        evaluated(inner, txn).await
    } else {
        native(inner, txn).await
    }
}

/// True if etcd would refuse the transaction as it is, or read it
/// differently from the reference semantics.
fn needs_evaluation(txn: &Txn) -> bool {
    txn.compare.iter().any(|c| c.key.is_empty())
        || branch_needs_evaluation(&txn.success)
        || branch_needs_evaluation(&txn.failure)
}

fn branch_needs_evaluation(ops: &[Op]) -> bool {
    let mut puts = BTreeSet::new();
    let mut deleted: Vec<(&[u8], Vec<u8>)> = Vec::new();
    for op in ops {
        match op {
            Op::Put { key, lease, .. } => {
                if key.is_empty() || i64::try_from(*lease).is_err() || !puts.insert(key.as_slice())
                {
                    return true;
                }
            }
            Op::Delete { key } => {
                if key.is_empty() {
                    return true;
                }
                let mut end = key.clone();
                end.push(0);
                deleted.push((key, end));
            }
            Op::DeleteRange { start, end } => {
                if !end.is_empty() && start >= end {
                    return true;
                }
                deleted.push((start, end.clone()));
            }
            Op::Get { key } => {
                if key.is_empty() {
                    return true;
                }
            }
        }
    }
    puts.iter()
        .any(|key| deleted.iter().any(|(start, end)| in_range(key, start, end)))
}

fn etcd_compare(ns: &Namespace, c: &Compare) -> EtcdCompare {
    let key = ns.key(&c.key);
    // Numbers beyond etcd's signed range can never match.
    let num = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    match &c.target {
        CompareTarget::Version(v) => EtcdCompare::version(key, CompareOp::Equal, num(*v)),
        CompareTarget::ModRevision(r) => EtcdCompare::mod_revision(key, CompareOp::Equal, num(*r)),
        CompareTarget::CreateRevision(r) => {
            EtcdCompare::create_revision(key, CompareOp::Equal, num(*r))
        }
        CompareTarget::Value(v) => EtcdCompare::value(key, CompareOp::Equal, v.clone()),
    }
}

fn etcd_op(ns: &Namespace, op: &Op) -> TxnOp {
    match op {
        Op::Put { key, value, lease } => {
            let mut options = PutOptions::new();
            if *lease != 0 {
                // Checked by `needs_evaluation`.
                options = options.with_lease(i64::try_from(*lease).unwrap_or(i64::MAX));
            }
            TxnOp::put(ns.key(key), value.clone(), Some(options))
        }
        Op::Delete { key } => TxnOp::delete(ns.key(key), None),
        Op::DeleteRange { start, end } => TxnOp::delete(
            ns.range_start(start),
            Some(etcd_client::DeleteOptions::new().with_range(ns.range_end(end))),
        ),
        Op::Get { key } => TxnOp::get(ns.key(key), None),
    }
}

/// The error for a transaction etcd refused because of a dead lease: etcd
/// does not say which, so each candidate is looked up.
async fn lease_error(inner: &Inner, leases: BTreeSet<LeaseId>) -> StoreError {
    let mut client = inner.client.lease_client();
    for &lease in &leases {
        let Ok(id) = i64::try_from(lease) else {
            return StoreError::LeaseNotFound(lease);
        };
        match inner.timed(client.time_to_live(id, None)).await {
            Ok(resp) if resp.ttl() < 0 => return StoreError::LeaseNotFound(lease),
            Ok(_) => {}
            Err(e) if e.is_lease_not_found() => return StoreError::LeaseNotFound(lease),
            Err(e) => return e.into(),
        }
    }
    // It expired between the transaction and the lookup... or came back?
    // Leases never come back: report the first candidate.
    StoreError::LeaseNotFound(leases.into_iter().next().unwrap_or(0))
}

fn leases_of<'a>(ops: impl IntoIterator<Item = &'a Op>) -> BTreeSet<LeaseId> {
    ops.into_iter()
        .filter_map(|op| match op {
            Op::Put { lease, .. } if *lease != 0 => Some(*lease),
            _ => None,
        })
        .collect()
}

async fn native(inner: &Inner, txn: &Txn) -> Result<TxnResponse, StoreError> {
    let ns = &inner.ns;
    let request = EtcdTxn::new()
        .when(
            txn.compare
                .iter()
                .map(|c| etcd_compare(ns, c))
                .collect::<Vec<_>>(),
        )
        .and_then(
            txn.success
                .iter()
                .map(|op| etcd_op(ns, op))
                .collect::<Vec<_>>(),
        )
        .or_else(
            txn.failure
                .iter()
                .map(|op| etcd_op(ns, op))
                .collect::<Vec<_>>(),
        );
    let resp = match inner.timed(inner.kv().txn(request)).await {
        Ok(resp) => resp,
        Err(e) if e.is_lease_not_found() => {
            return Err(lease_error(inner, leases_of(txn.success.iter().chain(&txn.failure))).await)
        }
        Err(e) => return Err(e.into()),
    };
    let succeeded = resp.succeeded();
    let ops = if succeeded {
        &txn.success
    } else {
        &txn.failure
    };
    let answers = resp.op_responses();
    if answers.len() != ops.len() {
        return Err(StoreError::Backend(format!(
            "etcd answered {} operations of {}",
            answers.len(),
            ops.len()
        )));
    }
    let mut events = 0u64;
    let mut results = Vec::with_capacity(ops.len());
    for answer in answers {
        results.push(match answer {
            TxnOpResponse::Put(_) => {
                events += 1;
                OpResult::Put
            }
            TxnOpResponse::Delete(d) => {
                let deleted = to_u64(d.deleted());
                events += deleted;
                OpResult::Delete(deleted)
            }
            TxnOpResponse::Get(g) => {
                OpResult::Get(g.kvs().first().map(|kv| ns.kv(kv)).transpose()?)
            }
            TxnOpResponse::Txn(_) => {
                return Err(StoreError::Backend(
                    "etcd answered a nested transaction that was not sent".into(),
                ))
            }
        });
    }
    let revision = header_revision(resp.header());
    if events > 0 {
        inner.after_write(revision, events).await;
    }
    Ok(TxnResponse {
        succeeded,
        revision,
        results,
    })
}

/// What the evaluated path reads: single keys and key ranges.
struct Reads {
    keys: BTreeSet<Vec<u8>>,
    ranges: Vec<(Vec<u8>, Vec<u8>)>,
}

fn reads_of(txn: &Txn) -> Reads {
    let mut keys = BTreeSet::new();
    let mut ranges = Vec::new();
    let mut key = |k: &Vec<u8>| {
        // The empty key never exists.
        if !k.is_empty() {
            keys.insert(k.clone());
        }
    };
    for c in &txn.compare {
        key(&c.key);
    }
    for op in txn.success.iter().chain(&txn.failure) {
        match op {
            Op::Put { key: k, .. } | Op::Delete { key: k } | Op::Get { key: k } => key(k),
            Op::DeleteRange { start, end } => {
                if end.is_empty() || start < end {
                    ranges.push((start.clone(), end.clone()));
                }
            }
        }
    }
    Reads { keys, ranges }
}

async fn evaluated(inner: &Inner, txn: &Txn) -> Result<TxnResponse, StoreError> {
    let ns = &inner.ns;
    let reads = reads_of(txn);
    let deadline = Instant::now() + inner.timeout;
    loop {
        // 1. The snapshot.
        let mut snapshot_ops: Vec<TxnOp> = reads
            .keys
            .iter()
            .map(|k| TxnOp::get(ns.key(k), None))
            .collect();
        for (start, end) in &reads.ranges {
            snapshot_ops.push(TxnOp::get(
                ns.range_start(start),
                Some(GetOptions::new().with_range(ns.range_end(end))),
            ));
        }
        let resp = inner
            .timed(inner.kv().txn(EtcdTxn::new().and_then(snapshot_ops)))
            .await?;
        let snapshot = header_revision(resp.header());
        let mut view: BTreeMap<Vec<u8>, KeyValue> = BTreeMap::new();
        for answer in resp.op_responses() {
            if let TxnOpResponse::Get(g) = answer {
                for kv in g.kvs() {
                    let kv = ns.kv(kv)?;
                    view.insert(kv.key.clone(), kv);
                }
            }
        }

        // 2. Evaluation. Leases etcd cannot name are dead; etcd checks the
        // others when committing.
        let alive = |lease: LeaseId| i64::try_from(lease).is_ok();
        let applied = apply_txn(&view, txn, snapshot, alive)?;
        if applied.changes.is_empty() {
            // Nothing to write: the outcome holds at the snapshot.
            return Ok(applied.response);
        }

        // 3. The guarded commit.
        let mut guards: Vec<EtcdCompare> = reads
            .keys
            .iter()
            .chain(view.keys())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .map(|k| {
                let seen = view.get(k).map_or(0, |kv| kv.mod_revision);
                EtcdCompare::mod_revision(
                    ns.key(k),
                    CompareOp::Equal,
                    i64::try_from(seen).unwrap_or(i64::MAX),
                )
            })
            .collect();
        let after = i64::try_from(snapshot + 1).unwrap_or(i64::MAX);
        for (start, end) in &reads.ranges {
            guards.push(
                EtcdCompare::mod_revision(ns.range_start(start), CompareOp::Less, after)
                    .with_range(ns.range_end(end)),
            );
        }
        let writes: Vec<TxnOp> = applied
            .changes
            .iter()
            .map(|change| match &change.new {
                Some(kv) => etcd_op(
                    ns,
                    &Op::Put {
                        key: change.key.clone(),
                        value: kv.value.clone(),
                        lease: kv.lease,
                    },
                ),
                None => TxnOp::delete(ns.key(&change.key), None),
            })
            .collect();
        let events = writes.len() as u64;
        let commit = EtcdTxn::new().when(guards).and_then(writes);
        let resp = match inner.timed(inner.kv().txn(commit)).await {
            Ok(resp) => resp,
            Err(e) if e.is_lease_not_found() => {
                let leases = applied
                    .changes
                    .iter()
                    .filter_map(|c| c.new.as_ref().map(|kv| kv.lease))
                    .filter(|&l| l != 0)
                    .collect();
                return Err(lease_error(inner, leases).await);
            }
            Err(e) => return Err(e.into()),
        };
        if resp.succeeded() {
            let revision = header_revision(resp.header());
            let applied = at_revision(&view, txn, applied, snapshot, revision)?;
            inner.after_write(revision, events).await;
            return Ok(applied.response);
        }

        // 4. Something read changed: again, within the deadline.
        if Instant::now() >= deadline {
            return Err(EtcdError::Timeout(inner.timeout).into());
        }
        tokio::task::yield_now().await;
    }
}

/// The evaluation redone for the revision the write actually took: other
/// namespaces' writes may have advanced etcd past `snapshot + 1`, which
/// changes the revisions the results report (the guards proved the keys
/// themselves unchanged).
fn at_revision(
    view: &BTreeMap<Vec<u8>, KeyValue>,
    txn: &Txn,
    applied: Applied,
    snapshot: Revision,
    revision: Revision,
) -> Result<Applied, StoreError> {
    if revision == snapshot + 1 || revision == 0 {
        return Ok(applied);
    }
    apply_txn(view, txn, revision - 1, |lease| {
        i64::try_from(lease).is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_double_writes_and_unspellable_requests_are_evaluated() {
        let native = Txn::new()
            .when(Compare::absent("a"))
            .then(Op::put("a", "1"))
            .then(Op::put("b", "1"))
            .then(Op::delete("c"))
            .then(Op::delete("c"))
            .then(Op::delete_prefix("d/"))
            .then(Op::get("a"))
            .otherwise(Op::put("a", "2"));
        assert!(!needs_evaluation(&native));
        for txn in [
            Txn::new().then(Op::put("a", "1")).then(Op::put("a", "2")),
            Txn::new().then(Op::put("a", "1")).then(Op::delete("a")),
            Txn::new().then(Op::delete("a")).then(Op::put("a", "1")),
            Txn::new()
                .then(Op::put("p/4", "1"))
                .then(Op::delete_prefix("p/")),
            Txn::new().then(Op::put("", "1")),
            Txn::new().when(Compare::absent("")),
            Txn::new().then(Op::DeleteRange {
                start: b"b".to_vec(),
                end: b"a".to_vec(),
            }),
            Txn::new().then(Op::put_with_lease("a", "1", u64::MAX)),
        ] {
            assert!(needs_evaluation(&txn), "{txn:?}");
        }
    }
}
