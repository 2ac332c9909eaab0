//! Which keys' changes the change log records (schema v5).
//!
//! Every event written to `allot_log` costs a row, its index entry and its
//! WAL inside the serial write, yet most keys are never watched: the engine
//! watches pools, blocks, change records, members, owners and turns, never
//! its claim records, keys or idempotency records. A store therefore records
//! history only for the key prefixes its clients ask for
//! ([`crate::PostgresOptions::history_prefixes`]; every key by default).
//! For the engine's keyed claims this halves the rows written: at 64
//! clients the write statement took 23% less time and wrote 42% less WAL
//! (BENCHMARKS.md §6 round 9).
//!
//! The scope lives in the revision row, so every server of one database
//! agrees on it: `history_prefixes` with, per prefix, `history_since`, the
//! first revision whose changes under it are all recorded, and
//! `history_version`, bumped by each change. A client only ever widens it
//! (when it connects), under the revision row lock; a write checks the
//! version it was built with under that lock (refused otherwise, and run
//! again with the new scope), so no revision after a widening misses a
//! change under the new prefix. A watch of keys no recorded prefix covers is
//! refused, and one starting before its prefix was recorded fails as
//! compacted: never a silent gap.
//!
//! Since it never narrows, the saving needs every client of the database to
//! ask for less than everything: one client with the default (every key),
//! or a store upgraded from an earlier schema (which logged every key so
//! far), records everything for good. Narrowing would have to end the
//! watches of the dropped prefixes first; there is no way to do it yet.

use allot_store::Revision;
use tokio_postgres::Row;

use crate::error::CallError;
use crate::shared::to_u64;

/// The recorded prefixes of one version of the scope.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HistoryScope {
    /// Each recorded prefix with the first revision recorded under it.
    entries: Vec<(Vec<u8>, Revision)>,
    /// `history_version` of the revision row this was read from.
    pub version: i64,
}

impl HistoryScope {
    /// Reads the scope from the revision row's `history_prefixes`,
    /// `history_since` and `history_version`, at columns `at..at + 3`.
    pub fn from_row(row: &Row, at: usize) -> Result<HistoryScope, CallError> {
        let prefixes: Vec<Vec<u8>> = row.try_get(at)?;
        let since: Vec<i64> = row.try_get(at + 1)?;
        let version: i64 = row.try_get(at + 2)?;
        if prefixes.len() != since.len() {
            return Err(crate::error::PgError::Corrupt(format!(
                "history scope: {} prefixes but {} revisions",
                prefixes.len(),
                since.len()
            ))
            .into());
        }
        let entries = prefixes
            .into_iter()
            .zip(since)
            .map(|(p, s)| Ok((p, to_u64(s, "history revision")?)))
            .collect::<Result<_, CallError>>()?;
        Ok(HistoryScope { entries, version })
    }

    /// Whether a change of `key` goes into the log.
    pub fn records(&self, key: &[u8]) -> bool {
        covers(&self.entries, key)
    }

    /// The first revision from which every change of a key under `prefix`
    /// is in the log (history before it may still have been compacted), or
    /// `None` if such changes are not recorded at all.
    pub fn complete_from(&self, prefix: &[u8]) -> Option<Revision> {
        self.entries
            .iter()
            .filter(|(p, _)| prefix.starts_with(p))
            .map(|(_, since)| *since)
            .min()
    }

    /// The scope widened to also record `wanted` (each a prefix; the empty
    /// prefix is every key) from revision `since` on, as the two arrays of
    /// the revision row; `None` if it already records them all.
    pub fn widened(&self, wanted: &[Vec<u8>], since: Revision) -> Option<(Vec<Vec<u8>>, Vec<i64>)> {
        let mut added = false;
        let mut entries = self.entries.clone();
        for prefix in wanted {
            if !covers(&entries, prefix) {
                entries.push((prefix.clone(), since));
                added = true;
            }
        }
        if !added {
            return None;
        }
        let since = entries
            .iter()
            .map(|(_, s)| i64::try_from(*s).unwrap_or(i64::MAX))
            .collect();
        Some((entries.into_iter().map(|(p, _)| p).collect(), since))
    }
}

/// Whether one of `entries` is a prefix of `key`.
fn covers(entries: &[(Vec<u8>, Revision)], key: &[u8]) -> bool {
    entries.iter().any(|(p, _)| key.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(entries: &[(&str, Revision)]) -> HistoryScope {
        HistoryScope {
            entries: entries
                .iter()
                .map(|(p, s)| (p.as_bytes().to_vec(), *s))
                .collect(),
            version: 0,
        }
    }

    #[test]
    fn records_keys_under_a_prefix_only() {
        let s = scope(&[("b/", 1), ("e/", 5)]);
        assert!(s.records(b"b/pool/1"));
        assert!(s.records(b"e/x"));
        assert!(!s.records(b"v/pool/1"));
        assert!(!s.records(b"b"));
        assert!(!HistoryScope::default().records(b"b/"));
        assert!(scope(&[("", 3)]).records(b"anything"));
    }

    #[test]
    fn complete_from_takes_the_oldest_covering_prefix() {
        let s = scope(&[("b/", 1), ("", 9)]);
        assert_eq!(s.complete_from(b"b/x"), Some(1));
        assert_eq!(s.complete_from(b"b/"), Some(1));
        // Only the empty prefix covers these.
        assert_eq!(s.complete_from(b"v/"), Some(9));
        assert_eq!(s.complete_from(b""), Some(9));
        assert_eq!(scope(&[("b/", 1)]).complete_from(b"b"), None);
        assert_eq!(scope(&[("b/", 1)]).complete_from(b"v/"), None);
    }

    #[test]
    fn widening_adds_only_what_is_not_covered() {
        let s = scope(&[("b/", 1)]);
        assert_eq!(s.widened(&[b"b/x".to_vec()], 7), None);
        let (prefixes, since) = s
            .widened(&[b"b/".to_vec(), b"e/".to_vec()], 7)
            .expect("e/ is new");
        assert_eq!(prefixes, vec![b"b/".to_vec(), b"e/".to_vec()]);
        assert_eq!(since, vec![1, 7]);
        let (prefixes, since) = s.widened(&[Vec::new()], 7).expect("everything is new");
        assert_eq!(prefixes, vec![b"b/".to_vec(), Vec::new()]);
        assert_eq!(since, vec![1, 7]);
    }
}
