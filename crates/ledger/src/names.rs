//! Names as integer ids.
//!
//! A record carries six names (client, model, provider, upstream model,
//! key, error) drawn from a small set that repeats on every request. Rows
//! store integer ids into one dictionary, `proxypal_ledger_names (id, name
//! UNIQUE)`, shared by every column: integers bind, encode and compare
//! for a fraction of what text costs, and rows shrink.
//!
//! The writer remembers the ids it has seen ([`NameIds`]); a batch's names
//! are looked up there ([`NameIds::lookup`]), the store resolves the few
//! it lacks inside the batch's own transaction (inserting those that are
//! new, so concurrent writers agree on one id per name through the UNIQUE
//! constraint), and only after that transaction commits are the new ids
//! remembered ([`NameIds::learn`]): an id from a rolled-back insert never
//! reaches a row.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::Arc;

use crate::Record;

/// Name columns per record.
pub(crate) const COLUMNS: usize = 6;

/// Most ids remembered. Names are few (clients, models, keys, error
/// classes), so this is reached only by unusual traffic; the map then
/// starts over, which costs one dictionary lookup per name seen again.
const CAPACITY: usize = 4_096;

/// A record's ids in column order; `0` stands for no name (SQL `NULL`: a
/// record without an error). Dictionary ids start at 1.
pub(crate) type RowIds = [i64; COLUMNS];

/// The writer's memory of name → id, valid for the database it was learned
/// from: ids are never deleted, so it does not go stale (the PostgreSQL
/// store still starts over on each new connection, in case the server came
/// back from a backup).
#[derive(Debug, Default)]
pub(crate) struct NameIds {
    known: HashMap<Box<str>, i64, Seeded>,
    /// Known names by their allocation, [`RECENT`] slots per `Arc<str>`
    /// column (client, model, provider, upstream model, key; empty until
    /// first used). A record's names are clones of a few shared `Arc`s
    /// (from the config, the routes, the keys), so a name seen before is
    /// found by one pointer comparison instead of hashing it: the lookup
    /// was a fifth of the writer's instructions per record
    /// (`examples/write_cost`). A slot holds a clone of the `Arc` it stands
    /// for, so its allocation stays alive and no other string can appear
    /// at that address.
    recent: Vec<Option<(Arc<str>, i64)>>,
}

/// Slots per column in [`NameIds::recent`] (a power of two): room for the
/// keys of a large pool without two sharing a slot often.
const RECENT: usize = 512;

/// The columns of [`RowIds`] that are `Arc<str>` (all but the error).
const SHARED_COLUMNS: usize = 5;

/// `name`'s slot in its column of [`NameIds::recent`].
fn slot(column: usize, name: &Arc<str>) -> usize {
    let address = Arc::as_ptr(name).cast::<u8>() as usize as u64;
    // Fibonacci hashing: the top bits of the product spread the addresses.
    let index = address.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - RECENT.trailing_zeros());
    column * RECENT + index as usize
}

/// What [`NameIds::lookup`] gathers.
#[derive(Default)]
struct Found<'a> {
    rows: Vec<RowIds>,
    unknown: Vec<&'a str>,
    /// Empty (and not allocated) unless a name is missing.
    placeholders: HashMap<&'a str, i64, Seeded>,
}

/// One batch's ids, with the names [`NameIds`] did not know.
#[derive(Debug)]
pub(crate) struct Lookup<'a> {
    /// Per record; an unknown name's slot holds `-(1 + its index in unknown)`.
    pub(crate) rows: Vec<RowIds>,
    /// Distinct, in order of first appearance.
    pub(crate) unknown: Vec<&'a str>,
}

impl NameIds {
    /// The ids of every name in `records`, as far as they are known.
    pub(crate) fn lookup<'a>(&mut self, records: &'a [Record]) -> Lookup<'a> {
        if self.recent.is_empty() && !records.is_empty() {
            self.recent = vec![None; SHARED_COLUMNS * RECENT];
        }
        let mut found = Found { rows: Vec::with_capacity(records.len()), ..Found::default() };
        // Consecutive records often share names (one client's burst, one
        // provider): the same allocation as the previous record's settles
        // it with one comparison.
        let mut previous: [Option<(&'a Arc<str>, i64)>; SHARED_COLUMNS] = [None; SHARED_COLUMNS];
        let mut previous_error: Option<(&'a str, i64)> = None;
        for record in records {
            let mut ids = [0; COLUMNS];
            let shared =
                [&record.client, &record.model, &record.provider, &record.upstream_model, &record.key];
            for column in 0..SHARED_COLUMNS {
                let name = shared[column];
                ids[column] = match previous[column] {
                    Some((seen, id)) if Arc::ptr_eq(seen, name) => id,
                    _ => {
                        let id = self.shared_id(column, name, &mut found);
                        previous[column] = Some((name, id));
                        id
                    }
                };
            }
            if let Some(error) = record.error.as_deref() {
                ids[COLUMNS - 1] = match previous_error {
                    Some((seen, id)) if std::ptr::eq(seen, error) || seen == error => id,
                    _ => {
                        let id = self.id(error, &mut found);
                        previous_error = Some((error, id));
                        id
                    }
                };
            }
            found.rows.push(ids);
        }
        Lookup { rows: found.rows, unknown: found.unknown }
    }

    /// The id of `name` from `column` of [`SHARED_COLUMNS`]: remembered by
    /// its allocation, else by its text (then remembered by allocation
    /// too), else a placeholder.
    fn shared_id<'a>(&mut self, column: usize, name: &'a Arc<str>, found: &mut Found<'a>) -> i64 {
        let index = slot(column, name);
        if let Some(Some((seen, id))) = self.recent.get(index) {
            if Arc::ptr_eq(seen, name) {
                return *id;
            }
        }
        let id = self.id(name, found);
        if id > 0 {
            if let Some(entry) = self.recent.get_mut(index) {
                *entry = Some((Arc::clone(name), id));
            }
        }
        id
    }

    /// The id of `name` if known, else its placeholder in `found`.
    fn id<'a>(&self, name: &'a str, found: &mut Found<'a>) -> i64 {
        match self.known.get(name) {
            Some(&id) => id,
            None => *found.placeholders.entry(name).or_insert_with(|| {
                found.unknown.push(name);
                -(found.unknown.len() as i64)
            }),
        }
    }

    /// Remembers `unknown[i]` → `ids[i]`, once the transaction that made
    /// or found them has committed.
    pub(crate) fn learn(&mut self, unknown: &[&str], ids: &[i64]) {
        if self.known.len() + unknown.len() > CAPACITY {
            self.known.clear();
        }
        for (name, &id) in unknown.iter().zip(ids).take(CAPACITY) {
            self.known.insert((*name).into(), id);
        }
    }
}

impl Lookup<'_> {
    /// Asks `id_of` for the id of each unknown name, in order, and fills
    /// their slots; returns those ids (for [`NameIds::learn`]).
    pub(crate) fn resolve<E>(
        &mut self,
        mut id_of: impl FnMut(&str) -> Result<i64, E>,
    ) -> Result<Vec<i64>, E> {
        let ids = self.unknown.iter().map(|name| id_of(name)).collect::<Result<Vec<_>, E>>()?;
        if !ids.is_empty() {
            for slot in self.rows.iter_mut().flatten().filter(|slot| **slot < 0) {
                // Every placeholder indexes `unknown`, and `ids` is as long.
                if let Some(&id) = usize::try_from(-1 - *slot).ok().and_then(|index| ids.get(index)) {
                    *slot = id;
                }
            }
        }
        Ok(ids)
    }
}

/// The hasher of [`NameIds`]: six lookups per record made SipHash a tenth
/// of the SQLite writer's instructions per row. This one mixes 8 bytes per
/// 128-bit multiply (the folded multiply of foldhash and aHash's fallback)
/// from a per-process random seed, so colliding names cannot be chosen in
/// advance; and the map is bounded by [`CAPACITY`] whatever arrives.
#[derive(Debug, Clone, Copy)]
struct Seeded(u64);

impl Default for Seeded {
    fn default() -> Self {
        Self(RandomState::new().build_hasher().finish())
    }
}

impl BuildHasher for Seeded {
    type Hasher = FoldHasher;

    fn build_hasher(&self) -> FoldHasher {
        FoldHasher(self.0)
    }
}

/// See [`Seeded`].
#[derive(Debug)]
struct FoldHasher(u64);

/// The fractional digits of pi: an odd constant with well-mixed bits.
const MULTIPLIER: u64 = 0x243f_6a88_85a3_08d3;

impl FoldHasher {
    fn mix(&mut self, word: u64) {
        let product = u128::from(self.0 ^ word) * u128::from(MULTIPLIER);
        self.0 = (product as u64) ^ ((product >> 64) as u64);
    }
}

impl Hasher for FoldHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0; 8];
            word.copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        let mut word = [0; 8];
        word[..rest.len()].copy_from_slice(rest);
        // The length tells "ab" from "ab\0".
        self.mix(u64::from_le_bytes(word) ^ ((bytes.len() as u64) << 56));
    }

    fn write_u8(&mut self, byte: u8) {
        self.mix(u64::from(byte));
    }

    fn finish(&self) -> u64 {
        // One more round, so the last word's bits reach the top bits
        // (hashbrown's tag) as well as the bottom ones (the bucket).
        let product = u128::from(self.0) * u128::from(MULTIPLIER);
        (product as u64) ^ ((product >> 64) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(client: &str, model: &str, error: Option<&str>) -> Record {
        Record {
            client: client.into(),
            model: model.into(),
            provider: "nvidia".into(),
            upstream_model: format!("{model}-up").into(),
            key: "k1".into(),
            error: error.map(|e| e.to_owned().into()),
            ..Record::default()
        }
    }

    #[test]
    fn unknown_names_are_listed_once_and_resolved_in_place() {
        let mut names = NameIds::default();
        names.learn(&["nvidia", "k1"], &[7, 8]);
        let records = [
            record("alice", "llama", None),
            record("bob", "llama", Some("rate_limited")),
            record("alice", "gpt", None),
        ];
        let mut lookup = names.lookup(&records);
        assert_eq!(lookup.unknown, ["alice", "llama", "llama-up", "bob", "rate_limited", "gpt", "gpt-up"]);
        assert_eq!(lookup.rows[0], [-1, -2, 7, -3, 8, 0]);
        assert_eq!(lookup.rows[1], [-4, -2, 7, -3, 8, -5]);
        let ids = [11, 12, 13, 14, 15, 16, 17];
        let mut next = ids.iter();
        assert_eq!(lookup.resolve(|_| next.next().copied().ok_or(())), Ok(ids.to_vec()));
        assert_eq!(lookup.rows, [[11, 12, 7, 13, 8, 0], [14, 12, 7, 13, 8, 15], [11, 16, 7, 17, 8, 0]]);

        let unknown = lookup.unknown.clone();
        names.learn(&unknown, &ids);
        let again = names.lookup(&records);
        assert!(again.unknown.is_empty());
        assert_eq!(again.rows, lookup.rows);
    }

    #[test]
    fn a_failed_resolution_is_the_error() {
        let mut names = NameIds::default();
        let records = [record("alice", "llama", None)];
        let mut lookup = names.lookup(&records);
        assert_eq!(
            lookup.resolve(|name| if name == "llama" { Err(name.to_owned()) } else { Ok(1) }),
            Err("llama".to_owned())
        );
    }

    #[test]
    fn a_full_memory_starts_over() {
        let mut names = NameIds::default();
        let many: Vec<String> = (0..CAPACITY).map(|i| format!("n{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let ids: Vec<i64> = (1..=CAPACITY as i64).collect();
        names.learn(&many, &ids);
        assert_eq!(names.known.len(), CAPACITY);
        names.learn(&["one more"], &[9_999]);
        assert_eq!(names.known.len(), 1);
        assert_eq!(names.known.get("one more"), Some(&9_999));
    }

    /// Names found by their allocation are the same names: a new `Arc`
    /// with other text is never taken for a remembered one, even when the
    /// remembered one's text is the same.
    #[test]
    fn names_remembered_by_allocation_stay_right() {
        let mut names = NameIds::default();
        names.learn(&["alice", "bob", "llama", "nvidia", "k1", "llama-up"], &[1, 2, 3, 4, 5, 6]);
        let alice: Arc<str> = Arc::from("alice");
        let records: Vec<Record> =
            (0..3).map(|_| Record { client: Arc::clone(&alice), ..record("x", "llama", None) }).collect();
        let lookup = names.lookup(&records);
        assert!(lookup.unknown.is_empty(), "{:?}", lookup.unknown);
        assert!(lookup.rows.iter().all(|row| *row == [1, 3, 4, 6, 5, 0]), "{:?}", lookup.rows);
        // Remembered now by allocation; other allocations, same or other text.
        for _ in 0..100 {
            let mixed = [
                Record { client: Arc::clone(&alice), ..record("x", "llama", None) },
                record("bob", "llama", None),
                record("alice", "llama", None),
                record("carol", "llama", None),
            ];
            let lookup = names.lookup(&mixed);
            assert_eq!(lookup.unknown, ["carol"]);
            assert_eq!(lookup.rows.iter().map(|row| row[0]).collect::<Vec<_>>(), [1, 2, 1, -1]);
        }
        drop(records);
        drop(alice);
        // A new allocation that might land where `alice` was (the slot
        // still holds `alice`'s clone, so it cannot).
        let dave = record("dave", "llama", None);
        assert_eq!(names.lookup(std::slice::from_ref(&dave)).unknown, ["dave"]);
    }
}
