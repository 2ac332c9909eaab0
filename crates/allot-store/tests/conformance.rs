//! The store conformance suite (`allot_store::conformance`, feature
//! `conformance`) instantiated for the backends of this crate, plus tests
//! of the durable backends (reopen, crash, lock: [`durable`], run for redb
//! and the log store alike) and tests specific to each.
//!
//! The memory backend runs the lease tests on tokio's paused clock (long
//! TTLs, no real waiting), the durable backends on the real clock with
//! short TTLs.

use std::collections::HashSet;
use std::time::Duration;

use allot_store::conformance::*;
use allot_store::{
    Compare, EventKind, LogOptions, LogStore, MemoryStore, Op, RedbOptions, RedbStore, Store,
    StoreError, Txn,
};

async fn memory_store(revisions: u64, events: u64) -> (MemoryStore, ()) {
    (MemoryStore::with_history_limits(revisions, events), ())
}

/// A durable backend, for the tests that close, reopen and crash a store.
pub trait Durable: Store + Clone + std::fmt::Debug {
    /// What the store is opened at inside a test's directory.
    const NAME: &'static str;
    fn open_bounded(
        path: &std::path::Path,
        revisions: u64,
        events: u64,
    ) -> Result<Self, StoreError>;
    fn close(self) -> Result<(), StoreError>;
}

impl Durable for RedbStore {
    const NAME: &'static str = "store.redb";
    fn open_bounded(
        path: &std::path::Path,
        revisions: u64,
        events: u64,
    ) -> Result<Self, StoreError> {
        let opts = RedbOptions {
            history_revisions: revisions,
            history_events: events,
            ..RedbOptions::default()
        };
        RedbStore::open(path, opts)
    }
    fn close(self) -> Result<(), StoreError> {
        RedbStore::close(self)
    }
}

impl Durable for LogStore {
    const NAME: &'static str = "store";
    fn open_bounded(
        path: &std::path::Path,
        revisions: u64,
        events: u64,
    ) -> Result<Self, StoreError> {
        let opts = LogOptions {
            history_revisions: revisions,
            history_events: events,
            // Tiny, so that every test runs through snapshots and segment
            // rotation (the kill -9 test too).
            snapshot_bytes: 16 << 10,
            ..LogOptions::default()
        };
        LogStore::open(path, opts)
    }
    fn close(self) -> Result<(), StoreError> {
        LogStore::close(self)
    }
}

/// A fresh store in a new temporary directory.
fn fresh<S: Durable>(revisions: u64, events: u64) -> (S, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = S::open_bounded(&dir.path().join(S::NAME), revisions, events).unwrap();
    (store, dir)
}

async fn durable_store<S: Durable>(revisions: u64, events: u64) -> (S, tempfile::TempDir) {
    fresh(revisions, events)
}

mod memory {
    allot_store::conformance_tests!(
        make = super::memory_store,
        lease_ttl = std::time::Duration::from_secs(10),
        timed = #[tokio::test(start_paused = true)],
    );
}

mod redb {
    allot_store::conformance_tests!(
        make = super::durable_store::<allot_store::RedbStore>,
        lease_ttl = std::time::Duration::from_millis(1000),
        timed = #[tokio::test(flavor = "multi_thread", worker_threads = 2)],
    );
}

mod log {
    allot_store::conformance_tests!(
        make = super::durable_store::<allot_store::LogStore>,
        lease_ttl = std::time::Duration::from_millis(1000),
        timed = #[tokio::test(flavor = "multi_thread", worker_threads = 2)],
    );
}

/// Instantiates the tests of [`durable`] for one backend, in a module named
/// `$module` (the crash test runs its child half by that path).
macro_rules! durable_tests {
    ($module:ident, $store:ty) => {
        mod $module {
            use super::durable;
            type S = $store;

            durable_tests!(@async
                reopen_keeps_data_revision_and_history,
                reopen_keeps_the_event_bound_and_count,
                reopened_leases_restart_with_a_full_ttl,
                reopen_right_after_drop_despite_a_live_lease,
                group_commit_answers_each_txn_once_with_unique_revisions,
                closed_store_refuses_writes,
                crash_child,
            );

            #[test]
            fn opening_twice_is_locked() {
                durable::opening_twice_is_locked::<S>();
            }

            #[test]
            fn acknowledged_writes_survive_kill_9() {
                let child = concat!(stringify!($module), "::crash_child");
                durable::acknowledged_writes_survive_kill_9::<S>(child);
            }
        }
    };
    (@async $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                durable::$test::<S>().await;
            }
        )*
    };
}

durable_tests!(redb_durable, allot_store::RedbStore);
durable_tests!(log_durable, allot_store::LogStore);

// ------------------------------------------------- tests for every durable backend

pub mod durable {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::path::Path;
    use std::process::{Command, Stdio};

    fn open<S: Durable>(path: &Path) -> Result<S, StoreError> {
        S::open_bounded(path, 100_000, DEFAULT_HISTORY_EVENTS)
    }

    pub async fn reopen_keeps_data_revision_and_history<S: Durable>() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir").join(S::NAME);
        let s = open::<S>(&path).unwrap();
        put(&s, "a", "1").await;
        put(&s, "b", "1").await;
        s.txn(Txn::new().then(Op::delete("a"))).await.unwrap();
        let before = s.range(b"", b"", 0).await.unwrap();
        drop(s);

        let s = open::<S>(&path).unwrap();
        assert_eq!(s.current_revision().await.unwrap(), 4);
        assert_eq!(s.range(b"", b"", 0).await.unwrap(), before);
        let mut watch = s.watch(b"", 1).await.unwrap();
        assert_eq!(
            summary(&next_events(&mut watch, 3).await),
            vec![
                (EventKind::Put, "a".to_string(), 2),
                (EventKind::Put, "b".to_string(), 3),
                (EventKind::Delete, "a".to_string(), 4),
            ]
        );
        assert_eq!(put(&s, "c", "1").await, 5);
        assert_eq!(key_of(&next_event(&mut watch).await), "c");
        s.close().unwrap();

        // Compaction survives a reopen too.
        let s = open::<S>(&path).unwrap();
        s.compact(4).await.unwrap();
        drop(s);
        let s = open::<S>(&path).unwrap();
        assert!(matches!(
            s.watch(b"", 3).await.err(),
            Some(StoreError::Compacted { .. })
        ));
    }

    pub async fn reopen_keeps_the_event_bound_and_count<S: Durable>() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(S::NAME);
        let with_bound = |events| S::open_bounded(&path, 1000, events);
        let s = with_bound(100).unwrap();
        for t in 0..10 {
            put_many(&s, &format!("a{t}"), 10).await;
        }
        put_many(&s, "b", 5).await;
        let before = retained_history(&s).await;
        assert_eq!((before.0, before.1.len()), (4, 85));
        s.close().unwrap();

        // The count is recovered: two more 10-event revisions reach 105 and
        // drop exactly revisions 4 and 5 (not more, not fewer).
        let s = with_bound(100).unwrap();
        assert_eq!(retained_history(&s).await, before);
        put_many(&s, "c0", 10).await;
        put_many(&s, "c1", 10).await;
        let (oldest, events) = retained_history(&s).await;
        assert_eq!((oldest, events.len()), (6, 85));
        drop(s);

        // A lower bound applies from the next write on.
        let s = with_bound(50).unwrap();
        assert_eq!(retained_history(&s).await.1.len(), 85);
        let rev = put(&s, "d", "1").await;
        let (oldest, events) = retained_history(&s).await;
        // 86 > 50 events: revisions of 10 go until at most 45 remain.
        assert_eq!((oldest, events.len()), (rev - 4, 36));
        drop(s);

        // A transaction beyond the bound survives a reopen alone.
        let s = with_bound(50).unwrap();
        let big = put_many(&s, "big", 300).await;
        s.close().unwrap();
        let s = with_bound(50).unwrap();
        let (oldest, events) = retained_history(&s).await;
        assert_eq!((oldest, events.len()), (big, 300));
        let next = put(&s, "e", "1").await;
        assert_eq!(retained_history(&s).await.0, next);
        assert_eq!(s.range(b"", b"", 0).await.unwrap().kvs.len(), 127 + 300);
    }

    pub async fn reopened_leases_restart_with_a_full_ttl<S: Durable>() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(S::NAME);
        let ttl = Duration::from_millis(1000);
        let s = open::<S>(&path).unwrap();
        let lease = s.lease_grant(ttl).await.unwrap();
        s.txn(Txn::new().then(Op::put_with_lease("k", "v", lease)))
            .await
            .unwrap();
        tokio::time::sleep(ttl / 2).await;
        drop(s);
        tokio::time::sleep(ttl / 2).await;

        // Past the original deadline, but the lease restarted at open.
        let s = open::<S>(&path).unwrap();
        assert_eq!(s.get(b"k").await.unwrap().unwrap().lease, lease);
        assert_eq!(s.lease_keep_alive(lease).await.unwrap(), ttl);
        // New ids never reuse an old one.
        let newer = s.lease_grant(ttl).await.unwrap();
        assert!(newer > lease);
        let mut watch = s.watch(b"", 0).await.unwrap();
        let event = next_event(&mut watch).await;
        assert_eq!(
            (event.kind, key_of(&event)),
            (EventKind::Delete, "k".to_string())
        );
        drop(s);
        let s = open::<S>(&path).unwrap();
        assert_eq!(s.get(b"k").await.unwrap(), None);
        assert!(matches!(
            s.lease_keep_alive(lease).await,
            Err(StoreError::LeaseNotFound(_))
        ));
    }

    pub async fn reopen_right_after_drop_despite_a_live_lease<S: Durable>() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(S::NAME);
        let s = open::<S>(&path).unwrap();
        let lease = s.lease_grant(Duration::from_secs(60)).await.unwrap();
        s.txn(Txn::new().then(Op::put_with_lease("k", "v", lease)))
            .await
            .unwrap();
        drop(s);
        let s = open::<S>(&path).unwrap();
        assert_eq!(s.get(b"k").await.unwrap().unwrap().lease, lease);
    }

    pub fn opening_twice_is_locked<S: Durable>() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(S::NAME);
        let first = open::<S>(&path).unwrap();
        match open::<S>(&path) {
            Err(StoreError::Locked { path: p, .. }) => assert_eq!(p, path.display().to_string()),
            other => panic!("expected Locked, got {other:?}"),
        }
        // Usable without a runtime, and released when closed.
        first.close().unwrap();
        open::<S>(&path).unwrap();
    }

    pub async fn group_commit_answers_each_txn_once_with_unique_revisions<S: Durable>() {
        const TXNS: usize = 500;
        let (s, _dir) = fresh::<S>(100_000, DEFAULT_HISTORY_EVENTS);
        let mut tasks = Vec::new();
        for i in 0..TXNS {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let key = format!("k{i}");
                let resp = s
                    .txn(
                        Txn::new()
                            .when(Compare::absent(&key))
                            .then(Op::put(&key, i.to_string()))
                            // Some fail individually inside a batch.
                            .then(Op::put_with_lease(
                                format!("bad{i}"),
                                "x",
                                if i % 5 == 0 { 999_999 } else { 0 },
                            )),
                    )
                    .await;
                (i, resp)
            }));
        }
        let mut revisions = HashSet::new();
        let mut ok = 0;
        for task in tasks {
            let (i, resp) = task.await.unwrap();
            if i % 5 == 0 {
                assert!(matches!(resp, Err(StoreError::LeaseNotFound(999_999))));
                continue;
            }
            let resp = resp.unwrap();
            assert!(resp.succeeded);
            assert!(revisions.insert(resp.revision));
            let kv = s.get(format!("k{i}").as_bytes()).await.unwrap().unwrap();
            assert_eq!(kv.mod_revision, resp.revision);
            ok += 1;
        }
        assert_eq!(ok, TXNS - TXNS / 5);
        assert_eq!(revisions, (2..2 + ok as u64).collect());
        assert_eq!(s.current_revision().await.unwrap(), 1 + ok as u64);
        for i in (0..TXNS).step_by(5) {
            assert_eq!(s.get(format!("k{i}").as_bytes()).await.unwrap(), None);
        }
    }

    pub async fn closed_store_refuses_writes<S: Durable>() {
        let (s, _dir) = fresh::<S>(1000, DEFAULT_HISTORY_EVENTS);
        let other = s.clone();
        put(&s, "a", "1").await;
        s.close().unwrap();
        assert!(matches!(
            other.txn(Txn::new().then(Op::put("b", "1"))).await,
            Err(StoreError::Unavailable(_))
        ));
        // Reads of what was committed still work.
        assert_eq!(value(&other, "a").await.as_deref(), Some("1"));
    }

    const CRASH_DIR_ENV: &str = "ALLOT_STORE_CRASH_TEST_DIR";

    /// The child half of `acknowledged_writes_survive_kill_9`: writes until
    /// killed, printing each acknowledged key. Does nothing when run alone.
    pub async fn crash_child<S: Durable>() {
        let Ok(dir) = std::env::var(CRASH_DIR_ENV) else {
            return;
        };
        let s = open::<S>(&Path::new(&dir).join(S::NAME)).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        for w in 0..16 {
            let s = s.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                for i in 0.. {
                    let key = format!("w{w}/{i}");
                    put(&s, &key, "v").await;
                    if tx.send(key).is_err() {
                        return;
                    }
                }
            });
        }
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        while let Some(key) = rx.recv().await {
            writeln!(out, "ACK {key}").unwrap();
            out.flush().unwrap();
        }
    }

    pub fn acknowledged_writes_survive_kill_9<S: Durable>(crash_child: &str) {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", crash_child, "--nocapture", "--test-threads=1"])
            .env(CRASH_DIR_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut acked = Vec::new();
        for line in stdout.lines() {
            let line = line.unwrap();
            if let Some(key) = line.strip_prefix("ACK ") {
                acked.push(key.to_string());
                if acked.len() == 300 {
                    // SIGKILL: no destructor, no flush, mid-batch.
                    child.kill().unwrap();
                    break;
                }
            }
        }
        child.wait().unwrap();
        assert_eq!(acked.len(), 300, "the child stopped acknowledging early");

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let s = open::<S>(&dir.path().join(S::NAME)).unwrap();
            for key in &acked {
                assert!(
                    s.get(key.as_bytes()).await.unwrap().is_some(),
                    "acked {key} lost"
                );
            }
            // Revisions stay dense: one per surviving write.
            let all = s.range(b"", b"", 0).await.unwrap();
            assert_eq!(
                s.current_revision().await.unwrap(),
                1 + all.kvs.len() as u64
            );
        });
    }
}

// ---------------------------------------------------------------- redb only

mod redb_only {
    use super::*;

    fn open(path: &std::path::Path) -> Result<RedbStore, StoreError> {
        RedbStore::open(path, RedbOptions::default())
    }

    #[test]
    fn garbage_file_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        assert!(open(&path).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), vec![0x5a; 8192]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_record_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let s = open(&path).unwrap();
        put(&s, "k", "v").await;
        s.close().unwrap();
        {
            let db = ::redb::Database::create(&path).unwrap();
            let wtx = db.begin_write().unwrap();
            {
                let table: ::redb::TableDefinition<&[u8], &[u8]> =
                    ::redb::TableDefinition::new("kv");
                let mut kv = wtx.open_table(table).unwrap();
                kv.insert(&b"k"[..], &b"\x01short"[..]).unwrap();
            }
            wtx.commit().unwrap();
        }
        match open(&path) {
            Err(StoreError::Corrupt(_)) => {}
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------- log store only

mod log_only {
    use super::*;
    use std::path::{Path, PathBuf};

    fn opts() -> LogOptions {
        LogOptions {
            snapshot_bytes: 4 << 10,
            ..LogOptions::default()
        }
    }

    /// The files of `dir` with this extension, in name order.
    fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == ext))
            .collect();
        out.sort();
        out
    }

    fn last_segment(dir: &Path) -> PathBuf {
        files(dir, "wal").pop().unwrap()
    }

    fn append_bytes(path: &Path, bytes: &[u8]) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(bytes).unwrap();
    }

    /// `(start, end)` of each record of a segment (12-byte header, then
    /// `u32 length, u32 CRC, payload` until a zero frame).
    fn records(path: &Path) -> Vec<(usize, usize)> {
        let bytes = std::fs::read(path).unwrap();
        let mut out = Vec::new();
        let mut pos = 12;
        while pos + 8 <= bytes.len() {
            let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
            if len == 0 {
                break;
            }
            out.push((pos, pos + 8 + len));
            pos += 8 + len;
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_garbage_tail_is_cut_off_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let s = LogStore::open(dir.path(), LogOptions::default()).unwrap();
        for i in 0..5 {
            put(&s, &format!("k{i}"), "v").await;
        }
        drop(s);
        let segment = last_segment(dir.path());
        let end = records(&segment).last().unwrap().1 as u64;
        // After the preallocated zeros, then right after the last record.
        for garbage in [
            vec![0x5a; 37],
            vec![7, 0, 0],
            vec![1, 0, 0, 0, 9, 9, 9, 9, 1],
        ] {
            append_bytes(&segment, &garbage);
            let s = LogStore::open(dir.path(), LogOptions::default()).unwrap();
            let torn = s.recovery().torn_tail.clone().expect("a torn tail");
            assert_eq!(torn.offset, end);
            assert!(torn.dropped >= garbage.len() as u64);
            assert_eq!(std::fs::metadata(&segment).unwrap().len(), end);
            assert_eq!(s.current_revision().await.unwrap(), 6);
            assert_eq!(s.range(b"", b"", 0).await.unwrap().kvs.len(), 5);
            s.close().unwrap();
        }
        // Writes go on after the cut, and the next open finds nothing to cut.
        let s = LogStore::open(dir.path(), LogOptions::default()).unwrap();
        assert_eq!(put(&s, "after", "v").await, 7);
        drop(s);
        let s = LogStore::open(dir.path(), LogOptions::default()).unwrap();
        assert_eq!(s.recovery().torn_tail, None);
        assert_eq!(value(&s, "after").await.as_deref(), Some("v"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_cut_short_is_dropped_whole() {
        let dir = tempfile::tempdir().unwrap();
        let s = LogStore::open(dir.path(), LogOptions::default()).unwrap();
        put(&s, "a", "1").await;
        s.txn(Txn::new().then(Op::put("b", "1")).then(Op::put("c", "1")))
            .await
            .unwrap();
        drop(s);
        let segment = last_segment(dir.path());
        let intact = std::fs::read(&segment).unwrap();
        let (start, end) = *records(&segment).last().unwrap();
        // A write cut at any byte, the file ending there (an append) or
        // zeros after it (preallocated space), loses that record alone.
        for cut in start + 1..end {
            for zeros_after in [false, true] {
                let mut bytes = intact.clone();
                match zeros_after {
                    true => bytes[cut..end].fill(0),
                    false => bytes.truncate(cut),
                }
                std::fs::write(&segment, &bytes).unwrap();
                let s = LogStore::open(dir.path(), LogOptions::default()).unwrap();
                let what = format!("cut at {cut}, zeros after: {zeros_after}");
                assert!(s.recovery().torn_tail.is_some(), "{what}");
                assert_eq!(s.current_revision().await.unwrap(), 2, "{what}");
                assert_eq!(value(&s, "a").await.as_deref(), Some("1"));
                assert_eq!(value(&s, "b").await, None);
                s.close().unwrap();
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_damaged_record_before_the_tail_is_an_error_not_a_cut() {
        let dir = tempfile::tempdir().unwrap();
        let s = LogStore::open(dir.path(), LogOptions::default()).unwrap();
        for i in 0..3 {
            put(&s, &format!("k{i}"), "some value").await;
        }
        drop(s);
        let segment = last_segment(dir.path());
        let mut bytes = std::fs::read(&segment).unwrap();
        // Inside the first record's payload (12-byte header, 8-byte frame).
        bytes[12 + 8 + 3] ^= 0x40;
        std::fs::write(&segment, &bytes).unwrap();
        match LogStore::open(dir.path(), LogOptions::default()) {
            Err(StoreError::Corrupt(detail)) => {
                assert!(detail.contains("checksum mismatch"), "{detail}")
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        // Nothing was cut.
        assert_eq!(std::fs::read(&segment).unwrap(), bytes);
    }

    #[test]
    fn a_damaged_snapshot_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let s = LogStore::open(dir.path(), opts()).unwrap();
            for i in 0..200 {
                put(&s, &format!("key/{i:04}"), &"v".repeat(50)).await;
            }
            s.close().unwrap();
        });
        let snap = files(dir.path(), "snap").pop().expect("a snapshot");
        let mut bytes = std::fs::read(&snap).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        std::fs::write(&snap, &bytes).unwrap();
        assert!(matches!(
            LogStore::open(dir.path(), opts()),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn snapshots_replace_old_segments_and_reopen_the_same_store() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LogOptions {
            history_revisions: 50,
            ..opts()
        };
        let s = LogStore::open(dir.path(), opts.clone()).unwrap();
        let lease = s.lease_grant(Duration::from_secs(60)).await.unwrap();
        // Concurrent writers, so snapshots run while batches commit.
        let mut tasks = Vec::new();
        for w in 0..8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..100 {
                    let key = format!("w{w}/{:03}", i % 40);
                    let txn = Txn::new().then(Op::put_with_lease(&key, format!("{i}"), lease));
                    s.txn(txn).await.unwrap();
                    if i % 7 == 0 {
                        s.txn(Txn::new().then(Op::delete(format!("w{w}/{:03}", (i + 5) % 40))))
                            .await
                            .unwrap();
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let before = s.range(b"", b"", 0).await.unwrap();
        let revision = s.current_revision().await.unwrap();
        let history = retained_history(&s).await;
        s.close().unwrap();

        assert_eq!(files(dir.path(), "snap").len(), 1);
        let segments = files(dir.path(), "wal").len();
        assert!(segments <= 3, "{segments} segments kept");
        let s = LogStore::open(dir.path(), opts).unwrap();
        assert!(s.recovery().snapshot_revision.is_some());
        assert_eq!(s.current_revision().await.unwrap(), revision);
        assert_eq!(s.range(b"", b"", 0).await.unwrap(), before);
        assert_eq!(retained_history(&s).await, history);
        // The lease and its keys came back.
        s.lease_revoke(lease).await.unwrap();
        assert!(s.range(b"", b"", 0).await.unwrap().kvs.is_empty());
        assert_eq!(s.current_revision().await.unwrap(), revision + 1);
    }
}
