//! How records and history entries are laid out in redb's byte values.

use crate::{EventKind, KeyValue, StoreError, WatchEvent};

const RECORD_HEADER: usize = 32;

pub(super) fn encode_record(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(RECORD_HEADER + kv.value.len());
    for n in [kv.create_revision, kv.mod_revision, kv.version, kv.lease] {
        out.extend_from_slice(&n.to_le_bytes());
    }
    out.extend_from_slice(&kv.value);
    out
}

pub(super) fn decode_record(key: &[u8], data: &[u8]) -> Result<KeyValue, StoreError> {
    let corrupt = || StoreError::Backend(format!("corrupt record for key {}", key.escape_ascii()));
    let mut r = Reader { data };
    let create_revision = r.i64().ok_or_else(corrupt)?;
    let mod_revision = r.i64().ok_or_else(corrupt)?;
    let version = r.i64().ok_or_else(corrupt)?;
    let lease = r.i64().ok_or_else(corrupt)?;
    Ok(KeyValue {
        key: key.to_vec(),
        value: r.data.to_vec(),
        create_revision,
        mod_revision,
        version,
        lease,
    })
}

// History encoding, per revision: u32 event count, then per event: u8 kind,
// u32 key length, key, u32 value length, value, create_revision, version,
// lease (i64). mod_revision is the revision itself.
pub(super) fn encode_events(events: &[WatchEvent]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&len_u32(events.len()).to_le_bytes());
    for e in events {
        out.push(match e.kind {
            EventKind::Put => 0,
            EventKind::Delete => 1,
        });
        for bytes in [&e.kv.key, &e.kv.value] {
            out.extend_from_slice(&len_u32(bytes.len()).to_le_bytes());
            out.extend_from_slice(bytes);
        }
        for n in [e.kv.create_revision, e.kv.version, e.kv.lease] {
            out.extend_from_slice(&n.to_le_bytes());
        }
    }
    out
}

fn len_u32(len: usize) -> u32 {
    // redb refuses keys and values of 4 GiB or more, so stored lengths fit.
    u32::try_from(len).unwrap_or(u32::MAX)
}

pub(super) fn decode_events(
    revision: i64,
    data: &[u8],
    prefix: &[u8],
    out: &mut Vec<WatchEvent>,
) -> Result<(), StoreError> {
    let corrupt = || StoreError::Backend(format!("corrupt history entry at revision {revision}"));
    let mut r = Reader { data };
    let count = r.u32().ok_or_else(corrupt)?;
    for _ in 0..count {
        let kind = match r.u8().ok_or_else(corrupt)? {
            0 => EventKind::Put,
            1 => EventKind::Delete,
            _ => return Err(corrupt()),
        };
        let key = r.bytes().ok_or_else(corrupt)?;
        let value = r.bytes().ok_or_else(corrupt)?;
        let create_revision = r.i64().ok_or_else(corrupt)?;
        let version = r.i64().ok_or_else(corrupt)?;
        let lease = r.i64().ok_or_else(corrupt)?;
        if key.starts_with(prefix) {
            out.push(WatchEvent {
                kind,
                kv: KeyValue {
                    key: key.to_vec(),
                    value: value.to_vec(),
                    create_revision,
                    mod_revision: revision,
                    version,
                    lease,
                },
            });
        }
    }
    if !r.data.is_empty() {
        return Err(corrupt());
    }
    Ok(())
}

struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.data.len() < n {
            return None;
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }
    fn i64(&mut self) -> Option<i64> {
        self.take(8)?.try_into().ok().map(i64::from_le_bytes)
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u32()?).ok()?;
        self.take(len)
    }
}
