//! The node's logtree: in-memory, bounded, structured logs, served by
//! `NodeManagement.Logs` and `NodeDebugService.Logs`.
//!
//! # Tree of DNs
//! Logs live in a tree of distinguished names (DNs): dot-separated segments
//! of ASCII letters, digits, `_` and `-`, at most [`MAX_DN_LEN`] bytes, all
//! under `root` (`root`, `root.curator`, `root.consensus.etcd`). `a.b` is a
//! child of `a`. Readers may name any DN without empty segments (one that
//! nobody logs to has no entries); the empty DN is the top of the tree and
//! reads all of it, with or without `WithChildren`.
//!
//! # Entries
//! - *Leveled* entries come from `tracing` through [`LogTreeLayer`], or from
//!   [`LogTree::leveled`]: severity, timestamp, source location
//!   (`membership.rs:123`) and a message served as lines (one per `\n`). A
//!   message longer than [`LEVELED_MESSAGE_MAX`] bytes is cut on a char
//!   boundary and gets a last line saying so.
//! - *Raw* entries are a child process's output, one per line, through
//!   [`RawWriter`] / [`RawWriter::pump`] or [`LogTree::raw`]. Lines longer
//!   than [`RAW_LINE_MAX`] bytes are cut on a char boundary; `original_length`
//!   always holds the line's full length in bytes (without `\n` / `\r\n`).
//!   Invalid UTF-8 becomes U+FFFD.
//!
//! # Bounds ([`Limits::default`])
//! - each DN keeps at most 1024 entries and 512 KiB (whichever binds first;
//!   the oldest entries go);
//! - at most 1024 DNs: entries for a new DN beyond that are dropped and
//!   counted in [`Stats::dropped_entries`] (the DNs already there keep
//!   logging, since a flood of new DNs is a bug and should not erase the
//!   history of the DNs that were there first);
//! - each streaming reader buffers at most 1024 entries.
//!
//! Retained log memory is therefore at most 1024 × 512 KiB plus 1024 entries
//! per open stream, whatever the log volume; a node with a few dozen DNs
//! keeps a few MiB.
//!
//! # Reading
//! [`LogTree::read`] takes a [`LogsRequest`] exactly as the contract defines
//! it and returns the backlog (chronological; children merged in the order
//! the entries were appended) and, when streaming, a [`LogStream`] of the
//! entries appended after the backlog was taken: no entry is in both, none is
//! missed. Filters apply to both (at most ten). As upstream's service reads
//! a request: an unset `stream_mode` streams nothing, `backlog_count` counts
//! only with `BACKLOG_MODE_COUNT`, and asking for neither backlog nor stream
//! is an empty answer. [`serve`] turns that into `LogsResponse`s of at most
//! 2000 entries (upstream's chunk) and 2 MiB.
//!
//! # Lagging readers
//! Appending never waits for readers. A stream reader that falls
//! [`Limits::stream_buffer`] entries behind loses its oldest pending entries
//! and carries on with the newer ones; [`LogStream::dropped`] says how many
//! it lost. The stream never ends on its own.
//!
//! # Cost
//! One append is one `Arc` allocation for the entry plus its text, one hash
//! lookup and one short mutex hold (shared by the whole tree), plus a filter
//! check per open stream.

// The daemon is a binary crate, so any part of this API it does not call yet
// (direct appends, stats, limits) would otherwise warn.
#![allow(
    dead_code,
    reason = "API used in part by the daemon; the rest serves tests and later callers"
)]

use std::collections::{HashMap, VecDeque};
use std::fmt::{self, Write as _};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use metropolis_api::osbase::logtree::proto::{LeveledLogSeverity, LogEntry, log_entry};

mod layer;
#[cfg(test)]
mod props;
mod raw;
mod read;
#[cfg(test)]
mod tests;

pub use layer::LogTreeLayer;
pub use raw::RawWriter;
use read::Reader;
pub use read::serve;

/// The DN every other DN descends from.
pub const ROOT_DN: &str = "root";
/// Longest DN accepted, in bytes.
pub const MAX_DN_LEN: usize = 256;
/// Raw lines are cut to this many bytes.
pub const RAW_LINE_MAX: usize = 1024;
/// Leveled messages (message and fields) are cut to this many bytes.
pub const LEVELED_MESSAGE_MAX: usize = 8 * 1024;
/// Most entries in one `LogsResponse` (upstream sends the backlog in chunks
/// of 2000).
pub const RESPONSE_CHUNK: usize = 2000;
/// Most encoded bytes of entries in one `LogsResponse`: leveled entries here
/// can be 8 KiB, so 2000 of them could pass gRPC's default 4 MiB message
/// limit that clients decode with; half of it leaves room.
pub const RESPONSE_MAX_BYTES: usize = 2 * 1024 * 1024;

/// Rough per-entry overhead (the `Arc`, the entry struct, the ring slot), so
/// that a flood of empty lines is bounded by bytes too.
const ENTRY_OVERHEAD: usize = 96;

/// Why a request or an append was refused. Every variant is the caller's
/// fault: map it to `INVALID_ARGUMENT` (`From<LogError> for tonic::Status`
/// does).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    #[error("invalid DN {}: {reason}", metropolis_api::quote(dn))]
    InvalidDn { dn: String, reason: &'static str },
    #[error("{0}")]
    InvalidRequest(String),
}

impl From<LogError> for tonic::Status {
    fn from(e: LogError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// The tree's bounds; see the module documentation. Zero values act as 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub entries_per_dn: usize,
    pub bytes_per_dn: usize,
    pub dns: usize,
    pub stream_buffer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            entries_per_dn: 1024,
            bytes_per_dn: 512 * 1024,
            dns: 1024,
            stream_buffer: 1024,
        }
    }
}

/// What the tree holds right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub dns: usize,
    pub entries: usize,
    /// Accounted bytes (text plus a fixed per-entry overhead).
    pub bytes: usize,
    /// Entries refused because the DN table was full.
    pub dropped_entries: u64,
    pub streams: usize,
}

/// The node's log tree. Cheap to share: create one with [`LogTree::new`].
pub struct LogTree {
    limits: Limits,
    inner: Mutex<Inner>,
}

struct Inner {
    /// DN → index into `logs`; the index keeps the common append path at one
    /// hash lookup.
    index: HashMap<Arc<str>, usize>,
    logs: Vec<DnLog>,
    next_seq: u64,
    dropped_entries: u64,
    readers: Vec<Arc<Reader>>,
}

struct DnLog {
    name: Arc<str>,
    entries: VecDeque<Arc<Entry>>,
    bytes: usize,
}

struct Entry {
    /// Tree-wide append order: timestamps can go backwards, this cannot, so
    /// merging children and the backlog/stream hand-over use it.
    seq: u64,
    dn: Arc<str>,
    kind: Kind,
}

enum Kind {
    Leveled {
        time: SystemTime,
        severity: LeveledLogSeverity,
        location: Location,
        /// Kept as one string and split into lines when read, which saves
        /// an allocation per line on the append path.
        message: String,
    },
    Raw {
        data: String,
        original_length: usize,
    },
}

/// The tracing layer's locations are static; rendering `file:line` when read
/// instead of when logged saves an allocation per event.
enum Location {
    None,
    Static { file: &'static str, line: u32 },
    Owned(String),
}

impl Location {
    fn render(&self) -> String {
        match self {
            Location::None => String::new(),
            Location::Static { file, line } => format!("{file}:{line}"),
            Location::Owned(s) => s.clone(),
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Location::Owned(s) => s.capacity(),
            _ => 0,
        }
    }
}

impl Entry {
    fn accounted_bytes(&self) -> usize {
        ENTRY_OVERHEAD
            + self.dn.len()
            + match &self.kind {
                Kind::Leveled {
                    location, message, ..
                } => message.capacity() + location.heap_bytes(),
                Kind::Raw { data, .. } => data.capacity(),
            }
    }

    fn is_leveled_at_least(&self, min: LeveledLogSeverity) -> bool {
        matches!(&self.kind, Kind::Leveled { severity, .. } if *severity >= min)
    }

    fn to_proto(&self) -> LogEntry {
        let kind = match &self.kind {
            Kind::Leveled {
                time,
                severity,
                location,
                message,
            } => {
                let mut lines: Vec<String> = message.lines().map(str::to_owned).collect();
                if lines.is_empty() {
                    // A leveled entry with no lines renders as nothing in
                    // clients; an empty message is still one (empty) line.
                    lines.push(String::new());
                }
                log_entry::Kind::Leveled(log_entry::Leveled {
                    lines,
                    timestamp: Some(prost_types::Timestamp::from(*time)),
                    severity: *severity as i32,
                    location: location.render(),
                })
            }
            Kind::Raw {
                data,
                original_length,
            } => log_entry::Kind::Raw(log_entry::Raw {
                data: data.clone(),
                original_length: i64::try_from(*original_length).unwrap_or(i64::MAX),
            }),
        };
        LogEntry {
            dn: self.dn.to_string(),
            kind: Some(kind),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the node's logs down with it; the data
    // under these locks stays consistent between statements.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn is_valid_segment(seg: &str) -> bool {
    !seg.is_empty()
        && seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn validate_dn(dn: &str) -> Result<(), LogError> {
    let fail = |reason| {
        Err(LogError::InvalidDn {
            // Echo garbage back only in part: it may be huge.
            dn: dn.chars().take(MAX_DN_LEN).collect(),
            reason,
        })
    };
    if dn.is_empty() {
        return fail("empty");
    }
    if dn.len() > MAX_DN_LEN {
        return fail("longer than 256 bytes");
    }
    if dn.split('.').any(|seg| seg.is_empty()) {
        return fail("empty segment (leading, trailing or doubled '.')");
    }
    if !dn.split('.').all(is_valid_segment) {
        return fail("segments may only hold ASCII letters, digits, '_' and '-'");
    }
    if dn != ROOT_DN && !dn.starts_with("root.") {
        return fail("must be `root` or start with `root.`");
    }
    Ok(())
}

/// Largest index <= `max` on a char boundary of `s`.
fn floor_char_boundary(s: &str, max: usize) -> usize {
    if max >= s.len() {
        return s.len();
    }
    let mut i = max;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Drops a multi-byte UTF-8 sequence that a cut left incomplete at the end,
/// so that a cut line does not end in U+FFFD.
fn trim_partial_char(b: &[u8]) -> &[u8] {
    for back in 1..=b.len().min(4) {
        let i = b.len() - back;
        let byte = b[i];
        if byte & 0xC0 != 0x80 {
            let width = match byte {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF7 => 4,
                _ => 1,
            };
            return if width > back { &b[..i] } else { b };
        }
    }
    b
}

fn cut_message(text: &str) -> String {
    if text.len() <= LEVELED_MESSAGE_MAX {
        return text.to_owned();
    }
    let mut out = String::with_capacity(LEVELED_MESSAGE_MAX + 64);
    out.push_str(&text[..floor_char_boundary(text, LEVELED_MESSAGE_MAX)]);
    let _ = write!(out, "\n(message cut: {} bytes in total)", text.len());
    out
}

fn raw_kind(kept: &[u8], original_length: usize) -> Kind {
    let kept = if original_length > kept.len() {
        trim_partial_char(kept)
    } else {
        kept
    };
    let mut data = String::from_utf8_lossy(kept).into_owned();
    // U+FFFD is 3 bytes for 1 invalid byte: the lossy text can outgrow the cut.
    data.truncate(floor_char_boundary(&data, RAW_LINE_MAX));
    Kind::Raw {
        data,
        original_length,
    }
}

impl LogTree {
    /// A tree with [`Limits::default`].
    pub fn new() -> Arc<LogTree> {
        LogTree::with_limits(Limits::default())
    }

    pub fn with_limits(limits: Limits) -> Arc<LogTree> {
        let limits = Limits {
            entries_per_dn: limits.entries_per_dn.max(1),
            bytes_per_dn: limits.bytes_per_dn.max(1),
            dns: limits.dns.max(1),
            stream_buffer: limits.stream_buffer.max(1),
        };
        Arc::new(LogTree {
            limits,
            inner: Mutex::new(Inner {
                index: HashMap::new(),
                logs: Vec::new(),
                next_seq: 0,
                dropped_entries: 0,
                readers: Vec::new(),
            }),
        })
    }

    /// Appends a leveled entry. `location` is `file.rs:123` or empty; a
    /// multi-line `message` is served as several lines.
    pub fn leveled(
        &self,
        dn: &str,
        severity: LeveledLogSeverity,
        location: &str,
        message: &str,
    ) -> Result<(), LogError> {
        validate_dn(dn)?;
        if severity == LeveledLogSeverity::Invalid {
            return Err(LogError::InvalidRequest(
                "severity LEVELED_LOG_SEVERITY_INVALID cannot be logged".into(),
            ));
        }
        let location = if location.is_empty() {
            Location::None
        } else {
            Location::Owned(location.to_owned())
        };
        self.push(
            dn,
            Kind::Leveled {
                time: SystemTime::now(),
                severity,
                location,
                message: cut_message(message),
            },
        );
        Ok(())
    }

    /// Appends raw output: one entry per line of `text` (a final `\n` does
    /// not start another line; `\r\n` counts as `\n`).
    pub fn raw(&self, dn: &str, text: &str) -> Result<(), LogError> {
        validate_dn(dn)?;
        let text = text.strip_suffix('\n').unwrap_or(text);
        for line in text.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            let kept = &line[..floor_char_boundary(line, RAW_LINE_MAX)];
            self.push(dn, raw_kind(kept.as_bytes(), line.len()));
        }
        Ok(())
    }

    pub fn stats(&self) -> Stats {
        let inner = lock(&self.inner);
        Stats {
            dns: inner.logs.len(),
            entries: inner.logs.iter().map(|l| l.entries.len()).sum(),
            bytes: inner.logs.iter().map(|l| l.bytes).sum(),
            dropped_entries: inner.dropped_entries,
            streams: inner.readers.iter().filter(|r| !r.is_closed()).count(),
        }
    }

    fn push(&self, dn: &str, kind: Kind) {
        let limits = self.limits;
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        let idx = match inner.index.get(dn) {
            Some(&idx) => idx,
            None => {
                if inner.logs.len() >= limits.dns {
                    inner.dropped_entries += 1;
                    return;
                }
                let name: Arc<str> = Arc::from(dn);
                inner.logs.push(DnLog {
                    name: name.clone(),
                    entries: VecDeque::new(),
                    bytes: 0,
                });
                let idx = inner.logs.len() - 1;
                inner.index.insert(name, idx);
                idx
            }
        };
        let Some(log) = inner.logs.get_mut(idx) else {
            return;
        };
        let entry = Arc::new(Entry {
            seq: inner.next_seq,
            dn: log.name.clone(),
            kind,
        });
        inner.next_seq += 1;
        log.bytes += entry.accounted_bytes();
        log.entries.push_back(entry.clone());
        while log.entries.len() > limits.entries_per_dn
            || (log.bytes > limits.bytes_per_dn && log.entries.len() > 1)
        {
            match log.entries.pop_front() {
                Some(old) => log.bytes -= old.accounted_bytes(),
                None => break,
            }
        }
        let mut saw_closed = false;
        for reader in &inner.readers {
            if reader.is_closed() {
                saw_closed = true;
            } else if reader.query.matches(&entry) {
                reader.push(&entry, limits.stream_buffer);
            }
        }
        if saw_closed {
            inner.readers.retain(|r| !r.is_closed());
        }
    }
}

// Hand-written because the tree's contents are not worth printing (and
// could be huge); these exist so that holders can derive Debug.
impl fmt::Debug for LogTree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogTree")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}
