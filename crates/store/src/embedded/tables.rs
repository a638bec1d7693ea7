//! The tables of the database file, opening it, and the reads every other
//! part shares.

use std::fmt;
use std::ops::Bound;
use std::path::Path;
use std::time::Duration;

use redb::{Database, MultimapTableDefinition, ReadableTable, TableDefinition};

use super::codec::decode_record;
use crate::{Compare, CompareOp, CompareTarget, KeyValue, LeaseId, StoreError};

pub(super) const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
pub(super) const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
pub(super) const HISTORY: TableDefinition<i64, &[u8]> = TableDefinition::new("history");
pub(super) const LEASES: TableDefinition<i64, i64> = TableDefinition::new("leases");
pub(super) const LEASE_KEYS: MultimapTableDefinition<i64, &[u8]> =
    MultimapTableDefinition::new("lease_keys");

pub(super) const META_FORMAT: &str = "format_version";
pub(super) const META_REVISION: &str = "revision";
/// Every history entry at or below this revision has been removed.
pub(super) const META_COMPACTED: &str = "compacted_revision";
pub(super) const META_NEXT_LEASE: &str = "next_lease_id";

pub(super) const FORMAT_VERSION: i64 = 1;

/// Opens or creates the database, making sure every table exists so that read
/// transactions never see a missing table. Returns the current revision and
/// the persisted leases.
pub(super) fn init_db(path: &Path) -> Result<Opened, StoreError> {
    let ctx = |what: &str| format!("{what} {}", path.display());
    let db = Database::create(path)
        .map_err(|e| StoreError::Backend(format!("{}: {e}", ctx("opening database"))))?;
    let txn = db
        .begin_write()
        .map_err(backend("begin write transaction"))?;
    let (revision, leases) = {
        let mut meta = txn.open_table(META).map_err(backend("open meta table"))?;
        txn.open_table(KV).map_err(backend("open kv table"))?;
        txn.open_table(HISTORY)
            .map_err(backend("open history table"))?;
        txn.open_multimap_table(LEASE_KEYS)
            .map_err(backend("open lease_keys table"))?;
        let leases_table = txn
            .open_table(LEASES)
            .map_err(backend("open leases table"))?;

        let format = meta
            .get(META_FORMAT)
            .map_err(backend("read format version"))?
            .map(|v| v.value());
        match format {
            Some(FORMAT_VERSION) => {}
            Some(other) => {
                return Err(StoreError::Backend(format!(
                    "{}: unsupported format version {other} (expected {FORMAT_VERSION})",
                    ctx("opening database")
                )));
            }
            None => {
                meta.insert(META_FORMAT, FORMAT_VERSION)
                    .map_err(backend("write format version"))?;
                // etcd's empty store is at revision 1; the first write makes 2.
                meta.insert(META_REVISION, 1)
                    .map_err(backend("write revision"))?;
                meta.insert(META_COMPACTED, 0)
                    .map_err(backend("write compaction point"))?;
            }
        }
        let revision = meta_get(&meta, META_REVISION)?;
        let mut leases = Vec::new();
        for entry in leases_table.iter().map_err(backend("read leases"))? {
            let (id, ttl_ms) = entry.map_err(backend("read leases"))?;
            leases.push((
                id.value(),
                Duration::from_millis(ttl_ms.value().max(1).unsigned_abs()),
            ));
        }
        (revision, leases)
    };
    txn.commit().map_err(backend("commit initialisation"))?;
    Ok(Opened {
        db,
        revision,
        leases,
    })
}

pub(super) struct Opened {
    pub(super) db: Database,
    pub(super) revision: i64,
    /// Persisted leases and their TTLs.
    pub(super) leases: Vec<(LeaseId, Duration)>,
}

pub(super) fn backend<E: fmt::Display>(context: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Backend(format!("{context}: {e}"))
}

pub(super) fn meta_get(
    meta: &impl ReadableTable<&'static str, i64>,
    key: &'static str,
) -> Result<i64, StoreError> {
    Ok(meta
        .get(key)
        .map_err(backend("read meta"))?
        .map_or(0, |v| v.value()))
}

pub(super) fn kv_get(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    key: &[u8],
) -> Result<Option<KeyValue>, StoreError> {
    match table.get(key).map_err(backend("read key"))? {
        Some(record) => decode_record(key, record.value()).map(Some),
        None => Ok(None),
    }
}

pub(super) fn kv_prefix(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    prefix: &[u8],
) -> Result<Vec<KeyValue>, StoreError> {
    let end = prefix_end(prefix);
    let upper = match &end {
        Some(end) => Bound::Excluded(end.as_slice()),
        None => Bound::Unbounded,
    };
    let range: (Bound<&[u8]>, Bound<&[u8]>) = (Bound::Included(prefix), upper);
    let mut out = Vec::new();
    for entry in table
        .range::<&[u8]>(range)
        .map_err(backend("read key range"))?
    {
        let (key, record) = entry.map_err(backend("read key range"))?;
        out.push(decode_record(key.value(), record.value())?);
    }
    Ok(out)
}

/// The smallest key greater than every key starting with `prefix`, or `None`
/// if there is none (empty prefix or all 0xff), as etcd's `GetPrefixRangeEnd`.
pub(super) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

pub(super) fn compares_hold(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    compares: &[Compare],
) -> Result<bool, StoreError> {
    for c in compares {
        if !compare_holds(kv_get(table, &c.key)?.as_ref(), c) {
            return Ok(false);
        }
    }
    Ok(true)
}

pub(super) fn compare_holds(kv: Option<&KeyValue>, c: &Compare) -> bool {
    let ordering = match (&c.target, kv) {
        // etcd: a value compare against a missing key fails whatever the
        // operator, since there is no value to compare with.
        (CompareTarget::Value(_), None) => return false,
        (CompareTarget::Value(v), Some(kv)) => kv.value.as_slice().cmp(v.as_slice()),
        (CompareTarget::CreateRevision(r), kv) => kv.map_or(0, |kv| kv.create_revision).cmp(r),
        (CompareTarget::ModRevision(r), kv) => kv.map_or(0, |kv| kv.mod_revision).cmp(r),
        (CompareTarget::Version(v), kv) => kv.map_or(0, |kv| kv.version).cmp(v),
    };
    match c.op {
        CompareOp::Equal => ordering.is_eq(),
        CompareOp::NotEqual => ordering.is_ne(),
        CompareOp::Greater => ordering.is_gt(),
        CompareOp::Less => ordering.is_lt(),
    }
}
