//! The redb side of the shared committer ([`crate::committer`]): a batch is
//! one redb write transaction, committed with `Durability::Immediate` (one
//! fsync for the whole batch).

use std::sync::Arc;
use std::time::Duration;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, Table, WriteTransaction};

use super::{
    read_bounds, write_history, TableView, EVENT_CHUNKS, KV, LEASES, META, META_HISTORY_EVENTS,
    META_NEXT_LEASE, META_OLDEST, META_REVISION,
};
use crate::apply::KvRead;
use crate::codec::{chunk_event_count, encode_kv, kv_lease};
use crate::committer::{Batch, CommitState, EventCounts, Meta, Storage};
use crate::watch::Committed;
use crate::{KeyValue, LeaseId, Revision, StoreError};

pub(super) struct RedbStorage {
    db: Arc<Database>,
}

impl RedbStorage {
    pub fn new(db: Arc<Database>) -> Self {
        Self { db }
    }

    /// Reads the committed state back from the file, rebuilding the index of
    /// keys per lease from the `kv` table.
    pub fn load_state(&self) -> Result<CommitState, StoreError> {
        let rtx = self.db.begin_read()?;
        let meta = rtx.open_table(META)?;
        let (oldest, revision) = read_bounds(&rtx)?;
        let next_lease = super::meta_get(&meta, META_NEXT_LEASE)?;
        let history_events = super::meta_get(&meta, META_HISTORY_EVENTS)?;
        let mut leases = Vec::new();
        for entry in rtx.open_table(LEASES)?.iter()? {
            let (id, ttl_ms) = entry?;
            leases.push((id.value(), Duration::from_millis(ttl_ms.value())));
        }
        let meta = Meta {
            revision,
            oldest,
            history_events,
            next_lease,
        };
        let mut state = CommitState::new(meta, leases);
        for entry in rtx.open_table(KV)?.iter()? {
            let (key, bytes) = entry?;
            state.attach(key.value(), kv_lease(bytes.value())?)?;
        }
        state.checked()
    }
}

/// The tables of one batch's write transaction.
struct RedbBatch<'t> {
    wtx: &'t WriteTransaction,
    kv: TableView<Table<'t, &'static [u8], &'static [u8]>>,
    chunks: Table<'t, (u64, u32), &'static [u8]>,
    leases: Table<'t, u64, u64>,
}

impl Storage for RedbStorage {
    fn commit<R>(
        &mut self,
        fill: impl FnOnce(&mut dyn Batch) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let mut wtx = self.db.begin_write()?;
        // The default, spelled out: an acknowledged write must survive a crash.
        wtx.set_durability(Durability::Immediate)?;
        let result = {
            let mut batch = RedbBatch {
                wtx: &wtx,
                kv: TableView(wtx.open_table(KV)?),
                chunks: wtx.open_table(EVENT_CHUNKS)?,
                leases: wtx.open_table(LEASES)?,
            };
            fill(&mut batch)?
        };
        wtx.commit()?;
        Ok(result)
    }

    fn load(&mut self) -> Result<CommitState, StoreError> {
        self.load_state()
    }
}

impl Batch for RedbBatch<'_> {
    fn kv(&self) -> &dyn KvRead {
        &self.kv
    }

    fn put(&mut self, kv: KeyValue) -> Result<(), StoreError> {
        self.kv
            .0
            .insert(kv.key.as_slice(), encode_kv(&kv).as_slice())?;
        Ok(())
    }

    fn delete(&mut self, key: Vec<u8>) -> Result<(), StoreError> {
        self.kv.0.remove(key.as_slice())?;
        Ok(())
    }

    fn append_history(&mut self, committed: &Arc<Committed>) -> Result<(), StoreError> {
        write_history(&mut self.chunks, committed.revision, &committed.events)
    }

    fn grant(&mut self, id: LeaseId, ttl_ms: u64) -> Result<(), StoreError> {
        self.leases.insert(id, ttl_ms)?;
        Ok(())
    }

    fn revoke(&mut self, id: LeaseId) -> Result<(), StoreError> {
        self.leases.remove(id)?;
        Ok(())
    }

    fn event_counts(&self, from: Revision, to: Revision) -> Result<EventCounts<'_>, StoreError> {
        // Chunk headers only: a revision comes in as many pieces as chunks.
        let iter = self.chunks.range((from, 0)..(to, 0))?.map(|entry| {
            let (key, chunk) = entry?;
            Ok((key.value().0, chunk_event_count(chunk.value())?))
        });
        Ok(Box::new(iter))
    }

    fn drop_history(&mut self, from: Revision, before: Revision) -> Result<u64, StoreError> {
        // Counted while deleting: redb reads each chunk to delete it anyway.
        let mut dropped = 0u64;
        let mut unreadable = None;
        self.chunks.retain_in((from, 0)..(before, 0), |_, chunk| {
            match chunk_event_count(chunk) {
                Ok(n) => dropped += n,
                Err(err) => unreadable = Some(err),
            }
            false
        })?;
        match unreadable {
            Some(err) => Err(err),
            None => Ok(dropped),
        }
    }

    fn set_meta(&mut self, meta: &Meta) -> Result<(), StoreError> {
        let mut table = self.wtx.open_table(META)?;
        table.insert(META_REVISION, meta.revision)?;
        table.insert(META_OLDEST, meta.oldest)?;
        table.insert(META_HISTORY_EVENTS, meta.history_events)?;
        table.insert(META_NEXT_LEASE, meta.next_lease)?;
        Ok(())
    }
}
