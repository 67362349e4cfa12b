//! A transaction's view of the state ([`Txn`]): the writer's in-memory state (every answered
//! transaction and the earlier ones of the same group) plus its own overlay of writes, and the
//! bounds every write is checked against.
//!
//! Must not: write anything (the writer applies the overlay to its in-memory state only when the
//! closure and its drafts succeed), or see anything the writer has not run.

use std::collections::BTreeMap;

use redb::ReadableTable;

use super::*;

/// Bound on a state key.
pub const MAX_STATE_KEY_BYTES: usize = 512;
/// Bound on a state value.
pub const MAX_STATE_VALUE_BYTES: usize = 1024 * 1024;
/// Bound on drafts returned by one transaction.
pub const MAX_DRAFTS_PER_TXN: usize = 256;
/// Bound on state writes by one transaction.
pub const MAX_WRITES_PER_TXN: usize = 4096;

/// Read access to redb's state table (snapshots and loading at open).
pub(super) trait StateRead {
    fn view_get(&self, key: &str) -> Result<Option<Vec<u8>>, redb::StorageError>;
    fn view_scan(&self, prefix: &str, out: &mut BTreeMap<String, Vec<u8>>) -> Result<(), redb::StorageError>;
}

impl<T: ReadableTable<&'static str, &'static [u8]>> StateRead for T {
    fn view_get(&self, key: &str) -> Result<Option<Vec<u8>>, redb::StorageError> {
        Ok(self.get(key)?.map(|v| v.value().to_vec()))
    }

    fn view_scan(&self, prefix: &str, out: &mut BTreeMap<String, Vec<u8>>) -> Result<(), redb::StorageError> {
        for entry in self.range::<&str>(prefix..)? {
            let (k, v) = entry?;
            let k = k.value();
            if !k.starts_with(prefix) {
                break;
            }
            out.insert(k.to_string(), v.value().to_vec());
        }
        Ok(())
    }
}

/// The records a transaction can read: the answered ones (the writer keeps those the indexer
/// has not published yet in memory, and reads older ones from redb).
pub(super) trait RecordRead {
    fn view_record(&self, index: u64) -> Result<Option<Vec<u8>>, TxnError>;
}

/// A transaction's view of the state: the writer's in-memory state table (every answered
/// transaction, including earlier ones of the same group), plus its own uncommitted writes.
pub struct Txn<'a> {
    pub(super) state: &'a BTreeMap<String, Vec<u8>>,
    pub(super) records: &'a dyn RecordRead,
    pub(super) overlay: BTreeMap<String, Option<Vec<u8>>>,
    pub(super) next_index: u64,
}

impl Txn<'_> {
    /// The canonical bytes of the record at `index`, as the writer sees it: every record answered
    /// so far, published or not (reading here never waits for a publish).
    pub fn record(&self, index: u64) -> Result<Option<Vec<u8>>, TxnError> {
        self.records.view_record(index)
    }

    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, TxnError> {
        Ok(self.peek(key).map(<[u8]>::to_vec))
    }

    /// [`Txn::get`] without the copy, for a transaction that only compares or parses the value
    /// (transactions run on the store's one writer thread, where every allocation counts).
    pub fn peek(&self, key: &str) -> Option<&[u8]> {
        match self.overlay.get(key) {
            Some(v) => v.as_deref(),
            None => self.state.get(key).map(Vec::as_slice),
        }
    }

    pub fn put(&mut self, key: &str, val: &[u8]) -> Result<(), TxnError> {
        check_key(key)?;
        if val.len() > MAX_STATE_VALUE_BYTES {
            return Err(TxnError::ValueTooLarge { key: key.to_string(), size: val.len() });
        }
        self.note_write(key)?;
        self.overlay.insert(key.to_string(), Some(val.to_vec()));
        Ok(())
    }

    pub fn delete(&mut self, key: &str) -> Result<(), TxnError> {
        check_key(key)?;
        self.note_write(key)?;
        self.overlay.insert(key.to_string(), None);
        Ok(())
    }

    /// All entries whose key starts with `prefix`, sorted by key.
    pub fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, TxnError> {
        let mut out: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (k, v) in self.state.range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded)) {
            if !k.starts_with(prefix) {
                break;
            }
            out.insert(k.clone(), v.clone());
        }
        for (k, v) in self.overlay.range(prefix.to_string()..) {
            if !k.starts_with(prefix) {
                break;
            }
            match v {
                Some(v) => out.insert(k.clone(), v.clone()),
                None => out.remove(k),
            };
        }
        Ok(out.into_iter().collect())
    }

    /// The log index the first draft returned by this transaction will get (the next ones get
    /// the following indices).
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    fn note_write(&self, key: &str) -> Result<(), TxnError> {
        if self.overlay.len() >= MAX_WRITES_PER_TXN && !self.overlay.contains_key(key) {
            return Err(TxnError::TooManyWrites);
        }
        Ok(())
    }
}

pub(super) fn check_key(key: &str) -> Result<(), TxnError> {
    let bad = |reason| TxnError::BadKey { key: key.chars().take(64).collect(), reason };
    if key.is_empty() {
        return Err(bad("empty"));
    }
    if key.len() > MAX_STATE_KEY_BYTES {
        return Err(bad("longer than 512 bytes"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn key() -> HostKey {
        HostKey::from_signing_key(SigningKey::from_bytes(&[3u8; 32]))
    }

    #[test]
    fn txn_rejects_bad_keys_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("l.redb"), key(), LedgerOptions::default()).unwrap();
        let r = ledger.transact_blocking(|txn| {
            assert!(matches!(txn.put("", b"x"), Err(TxnError::BadKey { .. })));
            let long = "k".repeat(MAX_STATE_KEY_BYTES + 1);
            assert!(matches!(txn.put(&long, b"x"), Err(TxnError::BadKey { .. })));
            let big = vec![0u8; MAX_STATE_VALUE_BYTES + 1];
            assert!(matches!(txn.put("k", &big), Err(TxnError::ValueTooLarge { .. })));
            for i in 0..MAX_WRITES_PER_TXN {
                txn.put(&format!("k{i}"), b"")?;
            }
            assert!(matches!(txn.put("one-more", b""), Err(TxnError::TooManyWrites)));
            Ok(((), vec![]))
        });
        assert!(r.is_ok());
        let too_many: Vec<Draft> = (0..=MAX_DRAFTS_PER_TXN).map(|_| Draft::new("p", serde_json::Map::new())).collect();
        let r = ledger.transact_blocking(move |_| Ok(((), too_many)));
        assert!(matches!(r, Err(LedgerError::Draft(DraftError::TooManyDrafts { .. }))));
        assert_eq!(ledger.size(), 0);
    }
}
