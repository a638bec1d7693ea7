//! The node's logtree: in-memory, bounded, structured logs, served by
//! `NodeManagement.Logs` and `NodeDebugService.Logs`.
//!
//! # Tree of DNs
//! Logs live in a tree of distinguished names (DNs): dot-separated segments
//! of ASCII letters, digits, `_` and `-`, at most [`MAX_DN_LEN`] bytes, all
//! under `root` (`root`, `root.curator`, `root.consensus.etcd`). `a.b` is a
//! child of `a`. Readers may ask for the empty DN, which means `root`.
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
//! missed. Filters apply to both. [`serve`] turns that into `LogsResponse`s.
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
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::SystemTime;

use futures::{Stream, StreamExt};
use metropolis_api::api::logs_request::{BacklogMode, StreamMode};
use metropolis_api::api::{LogsRequest, LogsResponse};
use metropolis_api::common::log_filter::Filter as LogFilterKind;
use metropolis_api::osbase::logtree::proto::{LeveledLogSeverity, LogEntry, log_entry};
use tokio::io::{AsyncRead, AsyncReadExt};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber, span};
use tracing_subscriber::layer::{Context as LayerContext, Layer};
use tracing_subscriber::registry::LookupSpan;

/// The DN every other DN descends from.
pub const ROOT_DN: &str = "root";
/// Longest DN accepted, in bytes.
pub const MAX_DN_LEN: usize = 256;
/// Raw lines are cut to this many bytes.
pub const RAW_LINE_MAX: usize = 1024;
/// Leveled messages (message and fields) are cut to this many bytes.
pub const LEVELED_MESSAGE_MAX: usize = 8 * 1024;
/// Entries per `LogsResponse`: with entries of at most ~8 KiB this keeps a
/// response far below gRPC's default 4 MiB message limit.
pub const RESPONSE_CHUNK: usize = 256;

/// Rough per-entry overhead (the `Arc`, the entry struct, the ring slot), so
/// that a flood of empty lines is bounded by bytes too.
const ENTRY_OVERHEAD: usize = 96;
/// The tracing layer caches target → DN; targets are static callsite data,
/// so this is only a guard against something generating targets.
const TARGET_CACHE_MAX: usize = 4096;

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

    /// A line splitter that appends a child process's output to `dn` as raw
    /// entries; feed it bytes ([`io::Write`]) or let it [`RawWriter::pump`]
    /// a pipe.
    pub fn raw_writer(self: &Arc<Self>, dn: &str) -> Result<RawWriter, LogError> {
        validate_dn(dn)?;
        Ok(RawWriter {
            tree: self.clone(),
            dn: Arc::from(dn),
            buf: Vec::new(),
            line_len: 0,
            last_was_cr: false,
        })
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

    /// Answers a `LogsRequest`: the backlog now, and the stream if asked for.
    pub fn read(&self, req: &LogsRequest) -> Result<LogReader, LogError> {
        let plan = Plan::parse(req)?;
        let (mut snapshot, reader) = {
            let mut inner = lock(&self.inner);
            let snapshot = inner.snapshot(&plan.query, plan.backlog);
            // Registering under the same lock as the snapshot is what makes
            // the hand-over exact: every later append sees this reader.
            let reader = plan.stream.then(|| {
                let reader = Arc::new(Reader {
                    query: plan.query.clone(),
                    closed: AtomicBool::new(false),
                    state: Mutex::new(ReaderState {
                        queue: VecDeque::new(),
                        dropped: 0,
                        waker: None,
                    }),
                });
                inner.readers.push(reader.clone());
                reader
            });
            (snapshot, reader)
        };
        // Sorting and converting outside the lock keeps writers unblocked
        // while a large backlog is prepared.
        snapshot.sort_unstable_by_key(|e| e.seq);
        if let Backlog::Last(n) = plan.backlog {
            let excess = snapshot.len().saturating_sub(n);
            snapshot.drain(..excess);
        }
        Ok(LogReader {
            backlog: snapshot.iter().map(|e| e.to_proto()).collect(),
            stream: reader.map(|reader| LogStream { reader }),
        })
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

impl Inner {
    /// The backlog's entries, unsorted: for `Last(n)` each DN contributes
    /// its last `n` matches, which is enough for the merged last `n`.
    fn snapshot(&self, query: &Query, backlog: Backlog) -> Vec<Arc<Entry>> {
        let per_dn = match backlog {
            Backlog::None => return Vec::new(),
            Backlog::All => usize::MAX,
            Backlog::Last(n) => n,
        };
        let mut out = Vec::new();
        for log in self.logs.iter().filter(|l| query.matches_dn(&l.name)) {
            out.extend(
                log.entries
                    .iter()
                    .rev()
                    .filter(|e| query.matches_kind(e))
                    .take(per_dn)
                    .cloned(),
            );
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KindFilter {
    Any,
    Raw,
    Leveled(LeveledLogSeverity),
}

#[derive(Debug, Clone)]
struct Query {
    dn: String,
    children: bool,
    kinds: KindFilter,
}

impl Query {
    fn matches_dn(&self, dn: &str) -> bool {
        dn == self.dn
            || (self.children
                && dn.len() > self.dn.len()
                && dn.starts_with(self.dn.as_str())
                && dn.as_bytes().get(self.dn.len()) == Some(&b'.'))
    }

    fn matches_kind(&self, e: &Entry) -> bool {
        match self.kinds {
            KindFilter::Any => true,
            KindFilter::Raw => matches!(e.kind, Kind::Raw { .. }),
            KindFilter::Leveled(min) => e.is_leveled_at_least(min),
        }
    }

    fn matches(&self, e: &Entry) -> bool {
        self.matches_dn(&e.dn) && self.matches_kind(e)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backlog {
    None,
    All,
    Last(usize),
}

struct Plan {
    query: Query,
    backlog: Backlog,
    stream: bool,
}

impl Plan {
    fn parse(req: &LogsRequest) -> Result<Plan, LogError> {
        let bad = |msg: String| Err(LogError::InvalidRequest(msg));
        let dn = if req.dn.is_empty() {
            ROOT_DN.to_owned()
        } else {
            validate_dn(&req.dn)?;
            req.dn.clone()
        };

        let backlog_mode = match BacklogMode::try_from(req.backlog_mode) {
            Ok(BacklogMode::Invalid) => {
                return bad(
                    "backlog_mode must be set: BACKLOG_MODE_DISABLE, BACKLOG_MODE_ALL or BACKLOG_MODE_COUNT"
                        .into(),
                );
            }
            Ok(mode) => mode,
            Err(_) => return bad(format!("unknown backlog_mode {}", req.backlog_mode)),
        };
        let backlog = match backlog_mode {
            BacklogMode::Count if req.backlog_count <= 0 => {
                return bad(format!(
                    "backlog_count must be > 0 with BACKLOG_MODE_COUNT, got {}",
                    req.backlog_count
                ));
            }
            BacklogMode::Count => {
                Backlog::Last(usize::try_from(req.backlog_count).unwrap_or(usize::MAX))
            }
            _ if req.backlog_count != 0 => {
                return bad(format!(
                    "backlog_count is only valid with BACKLOG_MODE_COUNT, not {}",
                    backlog_mode.as_str_name()
                ));
            }
            BacklogMode::All => Backlog::All,
            _ => Backlog::None,
        };

        let stream = match StreamMode::try_from(req.stream_mode) {
            Ok(StreamMode::Invalid) => {
                return bad(
                    "stream_mode must be set: STREAM_MODE_DISABLE or STREAM_MODE_UNBUFFERED".into(),
                );
            }
            Ok(StreamMode::Disable) => false,
            Ok(StreamMode::Unbuffered) => true,
            Err(_) => return bad(format!("unknown stream_mode {}", req.stream_mode)),
        };
        if backlog == Backlog::None && !stream {
            return bad(
                "BACKLOG_MODE_DISABLE with STREAM_MODE_DISABLE asks for nothing; enable the backlog or streaming"
                    .into(),
            );
        }

        let mut children = false;
        let mut only_raw = false;
        let mut only_leveled = false;
        let mut minimum: Option<LeveledLogSeverity> = None;
        for filter in &req.filters {
            match filter.filter {
                Some(LogFilterKind::WithChildren(_)) => children = true,
                Some(LogFilterKind::OnlyRaw(_)) => only_raw = true,
                Some(LogFilterKind::OnlyLeveled(_)) => only_leveled = true,
                Some(LogFilterKind::LeveledWithMinimumSeverity(m)) => {
                    let severity = match LeveledLogSeverity::try_from(m.minimum) {
                        Ok(LeveledLogSeverity::Invalid) => {
                            return bad(
                                "leveled_with_minimum_severity needs a severity other than LEVELED_LOG_SEVERITY_INVALID"
                                    .into(),
                            );
                        }
                        Ok(s) => s,
                        Err(_) => {
                            return bad(format!("unknown minimum severity {}", m.minimum));
                        }
                    };
                    if minimum.is_some_and(|prev| prev != severity) {
                        return bad("conflicting leveled_with_minimum_severity filters".into());
                    }
                    minimum = Some(severity);
                }
                // An unset filter is also what a filter kind newer than this
                // node decodes to: serving unfiltered logs would be wrong.
                None => {
                    return bad(
                        "filter with no kind set (or a kind this node does not know)".into(),
                    );
                }
            }
        }
        if only_raw && only_leveled {
            return bad("only_raw and only_leveled exclude each other".into());
        }
        if only_raw && minimum.is_some() {
            return bad(
                "only_raw and leveled_with_minimum_severity exclude each other (raw entries have no severity)"
                    .into(),
            );
        }
        let kinds = match (only_raw, only_leveled, minimum) {
            (true, _, _) => KindFilter::Raw,
            (_, _, Some(min)) => KindFilter::Leveled(min),
            (_, true, None) => KindFilter::Leveled(LeveledLogSeverity::Info),
            _ => KindFilter::Any,
        };
        Ok(Plan {
            query: Query {
                dn,
                children,
                kinds,
            },
            backlog,
            stream,
        })
    }
}

/// The answer to a `LogsRequest`.
#[derive(Debug)]
pub struct LogReader {
    /// Chronological; empty with `BACKLOG_MODE_DISABLE`.
    pub backlog: Vec<LogEntry>,
    /// Entries appended after the backlog was taken; `None` with
    /// `STREAM_MODE_DISABLE`.
    pub stream: Option<LogStream>,
}

impl LogReader {
    /// `LogsResponse`s as the RPCs send them: the backlog in chunks of up to
    /// [`RESPONSE_CHUNK`] entries in `backlog_entries`, then streamed entries
    /// in `stream_entries`, batching whatever is ready (up to the same
    /// chunk size) so a busy DN does not cost one message per entry.
    pub fn into_responses(self) -> impl Stream<Item = LogsResponse> + Send + 'static {
        let LogReader { backlog, stream } = self;
        let mut chunks = Vec::with_capacity(backlog.len().div_ceil(RESPONSE_CHUNK));
        let mut entries = backlog.into_iter().peekable();
        while entries.peek().is_some() {
            chunks.push(LogsResponse {
                backlog_entries: entries.by_ref().take(RESPONSE_CHUNK).collect(),
                stream_entries: Vec::new(),
            });
        }
        let tail = futures::stream::unfold(stream, |stream| async move {
            let mut stream = stream?;
            let first = stream.next().await?;
            let mut batch = vec![first];
            while batch.len() < RESPONSE_CHUNK {
                match stream.try_next() {
                    Some(e) => batch.push(e),
                    None => break,
                }
            }
            let response = LogsResponse {
                backlog_entries: Vec::new(),
                stream_entries: batch,
            };
            Some((response, Some(stream)))
        });
        futures::stream::iter(chunks).chain(tail)
    }
}

/// The response stream a `Logs` RPC returns.
pub type LogsResponseStream =
    Pin<Box<dyn Stream<Item = Result<LogsResponse, tonic::Status>> + Send>>;

/// `Logs` for NodeManagement and NodeDebugService: [`LogTree::read`] then
/// [`LogReader::into_responses`].
pub fn serve(tree: &LogTree, req: &LogsRequest) -> Result<LogsResponseStream, LogError> {
    let reader = tree.read(req)?;
    Ok(Box::pin(reader.into_responses().map(Ok)))
}

struct Reader {
    query: Query,
    /// Set when the stream is dropped; the next append unregisters it.
    closed: AtomicBool,
    state: Mutex<ReaderState>,
}

struct ReaderState {
    queue: VecDeque<Arc<Entry>>,
    dropped: u64,
    waker: Option<Waker>,
}

impl Reader {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    fn push(&self, entry: &Arc<Entry>, cap: usize) {
        let waker = {
            let mut state = lock(&self.state);
            if state.queue.len() >= cap {
                state.queue.pop_front();
                state.dropped += 1;
            }
            state.queue.push_back(entry.clone());
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// Entries appended after [`LogTree::read`], filtered as the request asked.
/// Never ends; drop it to stop. See the module docs on lagging.
pub struct LogStream {
    reader: Arc<Reader>,
}

impl LogStream {
    /// Entries this stream lost because it fell behind.
    pub fn dropped(&self) -> u64 {
        lock(&self.reader.state).dropped
    }

    /// The next entry if one is already waiting.
    pub fn try_next(&mut self) -> Option<LogEntry> {
        let entry = lock(&self.reader.state).queue.pop_front()?;
        Some(entry.to_proto())
    }
}

impl Stream for LogStream {
    type Item = LogEntry;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<LogEntry>> {
        let entry = {
            let mut state = lock(&self.reader.state);
            match state.queue.pop_front() {
                Some(entry) => entry,
                None => {
                    // Stored under the same lock a writer takes to push, so a
                    // push can never slip between the check and this.
                    state.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        };
        Poll::Ready(Some(entry.to_proto()))
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

impl fmt::Debug for LogStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStream")
            .field("query", &self.reader.query)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for RawWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawWriter")
            .field("dn", &self.dn)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for LogTreeLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogTreeLayer")
            .field("max_level", &self.max_level)
            .finish_non_exhaustive()
    }
}

impl Drop for LogStream {
    fn drop(&mut self) {
        self.reader.closed.store(true, Ordering::Relaxed);
        // Free the queued entries now rather than at the next append.
        let mut state = lock(&self.reader.state);
        state.queue.clear();
        state.waker = None;
    }
}

/// Splits a byte stream into lines and appends them to one DN as raw entries.
/// Keeps at most [`RAW_LINE_MAX`] bytes of the current line, however long it
/// is. A partial last line is appended when the writer is dropped (or
/// [`RawWriter::pump`] reaches EOF); [`io::Write::flush`] does not append it,
/// since the line may still go on.
pub struct RawWriter {
    tree: Arc<LogTree>,
    dn: Arc<str>,
    buf: Vec<u8>,
    line_len: usize,
    last_was_cr: bool,
}

impl RawWriter {
    /// Copies `reader` (a child's stdout or stderr) into the tree until EOF.
    pub async fn pump<R: AsyncRead + Unpin>(mut self, mut reader: R) -> io::Result<()> {
        let mut chunk = vec![0u8; 8192];
        loop {
            let n = reader.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            self.feed(&chunk[..n]);
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        while let Some(pos) = data.iter().position(|&b| b == b'\n') {
            self.extend(&data[..pos]);
            self.emit();
            data = &data[pos + 1..];
        }
        self.extend(data);
    }

    fn extend(&mut self, part: &[u8]) {
        if let Some(&last) = part.last() {
            self.last_was_cr = last == b'\r';
        }
        self.line_len += part.len();
        let room = RAW_LINE_MAX.saturating_sub(self.buf.len());
        self.buf.extend_from_slice(&part[..part.len().min(room)]);
    }

    fn emit(&mut self) {
        let original_length = self.line_len - usize::from(self.last_was_cr);
        let kept = &self.buf[..self.buf.len().min(original_length)];
        self.tree.push(&self.dn, raw_kind(kept, original_length));
        self.buf.clear();
        self.line_len = 0;
        self.last_was_cr = false;
    }
}

impl io::Write for RawWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.feed(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for RawWriter {
    fn drop(&mut self) {
        if self.line_len > 0 {
            self.emit();
        }
    }
}

/// A `tracing_subscriber` layer that appends events to the tree as leveled
/// entries.
///
/// - DN: an event field `dn`, else the `dn` field of the innermost span that
///   has one, else the target: `metropolis_node::<module>::…` →
///   `root.<module>`, `metropolis_<crate>::…` → `root.<crate>`, anything else
///   → `root`. A `dn` that is not a valid DN is ignored (and not rendered).
/// - Severity: ERROR → ERROR, WARN → WARNING, INFO/DEBUG/TRACE → INFO.
///   DEBUG and TRACE are skipped unless [`LogTreeLayer::with_max_level`]
///   lets them in. (Filtering here rather than in `Layer::enabled` keeps the
///   other layers' verbosity independent.)
/// - Text: the message, then the event's other fields as ` key=value`
///   (strings with spaces or quotes in quotes); span fields are not included.
/// - Location: the source file's name and line, `membership.rs:123`.
pub struct LogTreeLayer {
    tree: Arc<LogTree>,
    max_level: Level,
    targets: RwLock<HashMap<&'static str, Arc<str>>>,
}

impl LogTreeLayer {
    pub fn new(tree: Arc<LogTree>) -> Self {
        LogTreeLayer {
            tree,
            max_level: Level::INFO,
            targets: RwLock::new(HashMap::new()),
        }
    }

    /// The most verbose level kept (default INFO).
    pub fn with_max_level(mut self, level: Level) -> Self {
        self.max_level = level;
        self
    }

    fn target_dn(&self, target: &'static str) -> Arc<str> {
        let cached = self
            .targets
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(target)
            .cloned();
        if let Some(dn) = cached {
            return dn;
        }
        let dn: Arc<str> = Arc::from(dn_for_target(target));
        let mut targets = self.targets.write().unwrap_or_else(PoisonError::into_inner);
        if targets.len() < TARGET_CACHE_MAX {
            targets.insert(target, dn.clone());
        }
        dn
    }
}

fn dn_for_target(target: &str) -> String {
    let mut parts = target.split("::");
    let krate = parts.next().unwrap_or_default();
    let segment = if krate == "metropolis_node" {
        parts.next()
    } else {
        krate.strip_prefix("metropolis_")
    };
    match segment {
        Some(seg) if is_valid_segment(seg) => format!("{ROOT_DN}.{seg}"),
        _ => ROOT_DN.to_owned(),
    }
}

fn severity_for(level: &Level) -> LeveledLogSeverity {
    match *level {
        Level::ERROR => LeveledLogSeverity::Error,
        Level::WARN => LeveledLogSeverity::Warning,
        _ => LeveledLogSeverity::Info,
    }
}

/// A DN attached to a span through its `dn` field.
struct SpanDn(Arc<str>);

/// Collects only the `dn` field of a span.
#[derive(Default)]
struct DnVisitor(Option<String>);

impl Visit for DnVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "dn" {
            self.0 = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "dn" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

/// A string that stops growing at its limit, so rendering a huge field
/// cannot allocate without bound.
struct Bounded {
    text: String,
    limit: usize,
    cut: usize,
}

impl Bounded {
    fn new(limit: usize) -> Self {
        Bounded {
            text: String::new(),
            limit,
            cut: 0,
        }
    }
}

impl fmt::Write for Bounded {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.limit.saturating_sub(self.text.len());
        let keep = floor_char_boundary(s, room);
        self.text.push_str(&s[..keep]);
        self.cut += s.len() - keep;
        Ok(())
    }
}

struct EventVisitor {
    message: Bounded,
    /// Separate from `message` because the message field need not come
    /// first, but is rendered first.
    fields: Bounded,
    dn: Option<String>,
}

impl EventVisitor {
    fn field(&mut self, field: &Field) -> bool {
        let name = field.name();
        // `log.*` fields are tracing-log's copy of the metadata.
        if name == "dn" || name.starts_with("log.") {
            return false;
        }
        let _ = write!(self.fields, " {name}=");
        true
    }

    fn into_text(self) -> String {
        let EventVisitor {
            message, fields, ..
        } = self;
        let cut = message.cut + fields.cut;
        let mut text = message.text;
        if text.is_empty() {
            text.push_str(fields.text.trim_start());
        } else {
            text.push_str(&fields.text);
        }
        if cut > 0 || text.len() > LEVELED_MESSAGE_MAX {
            let total = text.len() + cut;
            text.truncate(floor_char_boundary(&text, LEVELED_MESSAGE_MAX));
            let _ = write!(text, "\n(message cut: {total} bytes in total)");
        }
        text
    }
}

impl Visit for EventVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            let _ = self.message.write_str(value);
        } else if field.name() == "dn" {
            self.dn = Some(value.to_owned());
        } else if self.field(field) {
            let plain = !value.is_empty()
                && !value
                    .chars()
                    .any(|c| c.is_whitespace() || c == '"' || c == '=' || c.is_control());
            let _ = if plain {
                self.fields.write_str(value)
            } else {
                write!(self.fields, "{value:?}")
            };
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else if field.name() == "dn" {
            self.dn = Some(format!("{value:?}"));
        } else if self.field(field) {
            let _ = write!(self.fields, "{value:?}");
        }
    }
}

impl<S> Layer<S> for LogTreeLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: LayerContext<'_, S>) {
        let mut visitor = DnVisitor::default();
        attrs.record(&mut visitor);
        if let (Some(dn), Some(span)) = (visitor.0, ctx.span(id))
            && validate_dn(&dn).is_ok()
        {
            span.extensions_mut().insert(SpanDn(Arc::from(dn)));
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: LayerContext<'_, S>) {
        let mut visitor = DnVisitor::default();
        values.record(&mut visitor);
        if let (Some(dn), Some(span)) = (visitor.0, ctx.span(id))
            && validate_dn(&dn).is_ok()
        {
            span.extensions_mut().replace(SpanDn(Arc::from(dn)));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: LayerContext<'_, S>) {
        let meta = event.metadata();
        if *meta.level() > self.max_level {
            return;
        }
        let mut visitor = EventVisitor {
            message: Bounded::new(LEVELED_MESSAGE_MAX),
            fields: Bounded::new(LEVELED_MESSAGE_MAX),
            dn: None,
        };
        event.record(&mut visitor);
        let event_dn = visitor.dn.take().filter(|dn| validate_dn(dn).is_ok());
        let location = match (meta.file(), meta.line()) {
            (Some(file), Some(line)) => Location::Static {
                file: file.rsplit(['/', '\\']).next().unwrap_or(file),
                line,
            },
            _ => Location::None,
        };
        let kind = Kind::Leveled {
            time: SystemTime::now(),
            severity: severity_for(meta.level()),
            location,
            message: visitor.into_text(),
        };
        if let Some(dn) = event_dn {
            self.tree.push(&dn, kind);
            return;
        }
        let span_dn = ctx.event_scope(event).and_then(|scope| {
            scope
                .into_iter()
                .find_map(|span| span.extensions().get::<SpanDn>().map(|d| d.0.clone()))
        });
        let dn = span_dn.unwrap_or_else(|| self.target_dn(meta.target()));
        self.tree.push(&dn, kind);
    }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;
    use metropolis_api::common::LogFilter;
    use metropolis_api::common::log_filter::{
        LeveledWithMinimumSeverity, OnlyLeveled, OnlyRaw, WithChildren,
    };
    use std::io::Write as _;
    use std::time::Duration;
    use tracing_subscriber::layer::SubscriberExt;

    const SEV_INFO: LeveledLogSeverity = LeveledLogSeverity::Info;
    const SEV_WARN: LeveledLogSeverity = LeveledLogSeverity::Warning;
    const SEV_ERROR: LeveledLogSeverity = LeveledLogSeverity::Error;

    fn req(dn: &str, backlog: BacklogMode, count: i64, stream: StreamMode) -> LogsRequest {
        LogsRequest {
            dn: dn.into(),
            filters: Vec::new(),
            backlog_mode: backlog as i32,
            backlog_count: count,
            stream_mode: stream as i32,
        }
    }

    fn all(dn: &str) -> LogsRequest {
        req(dn, BacklogMode::All, 0, StreamMode::Disable)
    }

    fn with(mut r: LogsRequest, filter: LogFilterKind) -> LogsRequest {
        r.filters.push(LogFilter {
            filter: Some(filter),
        });
        r
    }

    fn children() -> LogFilterKind {
        LogFilterKind::WithChildren(WithChildren {})
    }

    fn min_severity(s: LeveledLogSeverity) -> LogFilterKind {
        LogFilterKind::LeveledWithMinimumSeverity(LeveledWithMinimumSeverity { minimum: s as i32 })
    }

    /// The text of an entry: leveled lines joined with `\n`, or raw data.
    fn text(e: &LogEntry) -> String {
        match &e.kind {
            Some(log_entry::Kind::Leveled(l)) => l.lines.join("\n"),
            Some(log_entry::Kind::Raw(r)) => r.data.clone(),
            None => "<none>".into(),
        }
    }

    fn texts(entries: &[LogEntry]) -> Vec<String> {
        entries.iter().map(text).collect()
    }

    fn leveled(e: &LogEntry) -> &log_entry::Leveled {
        match &e.kind {
            Some(log_entry::Kind::Leveled(l)) => l,
            other => panic!("expected a leveled entry, got {other:?}"),
        }
    }

    fn raw(e: &LogEntry) -> &log_entry::Raw {
        match &e.kind {
            Some(log_entry::Kind::Raw(r)) => r,
            other => panic!("expected a raw entry, got {other:?}"),
        }
    }

    fn backlog(tree: &LogTree, r: &LogsRequest) -> Vec<LogEntry> {
        tree.read(r).expect("valid request").backlog
    }

    fn info(tree: &LogTree, dn: &str, msg: &str) {
        tree.leveled(dn, SEV_INFO, "x.rs:1", msg).expect("valid DN");
    }

    async fn next(stream: &mut LogStream) -> LogEntry {
        tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("an entry within 5s")
            .expect("streams do not end")
    }

    #[test]
    fn backlog_all_is_chronological() {
        let tree = LogTree::new();
        for i in 0..5 {
            info(&tree, "root.a", &format!("m{i}"));
        }
        let got = backlog(&tree, &all("root.a"));
        assert_eq!(texts(&got), ["m0", "m1", "m2", "m3", "m4"]);
        assert!(got.iter().all(|e| e.dn == "root.a"));
        let l = leveled(&got[0]);
        assert_eq!(l.severity, SEV_INFO as i32);
        assert_eq!(l.location, "x.rs:1");
        assert!(l.timestamp.is_some());
    }

    #[test]
    fn backlog_count_is_the_last_n() {
        let tree = LogTree::new();
        for i in 0..10 {
            info(&tree, "root.a", &format!("m{i}"));
        }
        let last3 = req("root.a", BacklogMode::Count, 3, StreamMode::Disable);
        assert_eq!(texts(&backlog(&tree, &last3)), ["m7", "m8", "m9"]);
        let more = req("root.a", BacklogMode::Count, 100, StreamMode::Disable);
        assert_eq!(backlog(&tree, &more).len(), 10);
        // Counted after filtering: the last 2 raw entries, not raw among the last 2.
        tree.raw("root.a", "r0\nr1\nr2").expect("valid DN");
        info(&tree, "root.a", "late");
        let raw2 = with(
            req("root.a", BacklogMode::Count, 2, StreamMode::Disable),
            LogFilterKind::OnlyRaw(OnlyRaw {}),
        );
        assert_eq!(texts(&backlog(&tree, &raw2)), ["r1", "r2"]);
    }

    #[test]
    fn backlog_count_with_children_is_the_merged_last_n() {
        let tree = LogTree::new();
        for i in 0..6 {
            let dn = if i % 2 == 0 { "root.a" } else { "root.a.b" };
            info(&tree, dn, &format!("m{i}"));
        }
        let r = with(
            req("root.a", BacklogMode::Count, 3, StreamMode::Disable),
            children(),
        );
        assert_eq!(texts(&backlog(&tree, &r)), ["m3", "m4", "m5"]);
    }

    #[test]
    fn backlog_disable_gives_no_backlog() {
        let tree = LogTree::new();
        info(&tree, "root", "old");
        let reader = tree
            .read(&req(
                "root",
                BacklogMode::Disable,
                0,
                StreamMode::Unbuffered,
            ))
            .expect("valid request");
        assert!(reader.backlog.is_empty());
        assert!(reader.stream.is_some());
        assert!(tree.read(&all("root")).expect("valid").stream.is_none());
    }

    #[test]
    fn children_are_merged_in_append_order() {
        let tree = LogTree::new();
        info(&tree, "root", "r0");
        info(&tree, "root.a", "a0");
        info(&tree, "root.a.b", "ab0");
        info(&tree, "root.ab", "sibling");
        info(&tree, "root.a", "a1");
        info(&tree, "root.a.b", "ab1");
        assert_eq!(texts(&backlog(&tree, &all("root.a"))), ["a0", "a1"]);
        let r = with(all("root.a"), children());
        assert_eq!(texts(&backlog(&tree, &r)), ["a0", "ab0", "a1", "ab1"]);
        let everything = with(all("root"), children());
        assert_eq!(backlog(&tree, &everything).len(), 6);
        assert!(backlog(&tree, &all("root.nothing")).is_empty());
    }

    #[test]
    fn empty_dn_means_root() {
        let tree = LogTree::new();
        info(&tree, "root", "top");
        info(&tree, "root.x", "below");
        assert_eq!(texts(&backlog(&tree, &all(""))), ["top"]);
        assert_eq!(backlog(&tree, &with(all(""), children())).len(), 2);
    }

    #[test]
    fn kind_and_severity_filters() {
        let tree = LogTree::new();
        tree.leveled("root", SEV_INFO, "", "i").expect("valid");
        tree.raw("root", "raw").expect("valid");
        tree.leveled("root", SEV_WARN, "", "w").expect("valid");
        tree.leveled("root", SEV_ERROR, "", "e").expect("valid");
        tree.leveled("root", LeveledLogSeverity::Fatal, "", "f")
            .expect("valid");
        let only_raw = with(all("root"), LogFilterKind::OnlyRaw(OnlyRaw {}));
        assert_eq!(texts(&backlog(&tree, &only_raw)), ["raw"]);
        let only_leveled = with(all("root"), LogFilterKind::OnlyLeveled(OnlyLeveled {}));
        assert_eq!(texts(&backlog(&tree, &only_leveled)), ["i", "w", "e", "f"]);
        let warn = with(all("root"), min_severity(SEV_WARN));
        assert_eq!(texts(&backlog(&tree, &warn)), ["w", "e", "f"]);
        let both = with(
            with(all("root"), LogFilterKind::OnlyLeveled(OnlyLeveled {})),
            min_severity(SEV_ERROR),
        );
        assert_eq!(texts(&backlog(&tree, &both)), ["e", "f"]);
        assert_eq!(backlog(&tree, &all("root")).len(), 5);
    }

    #[tokio::test]
    async fn stream_gets_new_entries_not_old_ones() {
        let tree = LogTree::new();
        info(&tree, "root.a", "old");
        let reader = tree
            .read(&req(
                "root.a",
                BacklogMode::Disable,
                0,
                StreamMode::Unbuffered,
            ))
            .expect("valid request");
        let mut stream = reader.stream.expect("streaming");
        assert!(stream.try_next().is_none());
        let writer = {
            let tree = tree.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                info(&tree, "root.other", "elsewhere");
                info(&tree, "root.a.child", "child, not asked for");
                info(&tree, "root.a", "new1");
                info(&tree, "root.a", "new2");
            })
        };
        assert_eq!(text(&next(&mut stream).await), "new1");
        assert_eq!(text(&next(&mut stream).await), "new2");
        writer.await.expect("writer task");
        assert!(stream.try_next().is_none());
        assert_eq!(stream.dropped(), 0);
    }

    #[tokio::test]
    async fn backlog_and_stream_neither_overlap_nor_miss() {
        // The stream is read only after all writes, so it must hold them all.
        let tree = LogTree::with_limits(Limits {
            stream_buffer: 4096,
            ..Limits::default()
        });
        let writer = {
            let tree = tree.clone();
            std::thread::spawn(move || {
                for i in 0..2000 {
                    info(&tree, "root.a", &i.to_string());
                }
            })
        };
        // Somewhere in the middle of the writes.
        while tree.stats().entries < 300 {
            tokio::task::yield_now().await;
        }
        let reader = tree
            .read(&req("root.a", BacklogMode::All, 0, StreamMode::Unbuffered))
            .expect("valid request");
        writer.join().expect("writer thread");
        let mut stream = reader.stream.expect("streaming");
        let mut seen: Vec<usize> = texts(&reader.backlog)
            .iter()
            .map(|t| t.parse().expect("number"))
            .collect();
        while let Some(e) = stream.try_next() {
            seen.push(text(&e).parse().expect("number"));
        }
        // The ring holds 1024, so the backlog may have lost its start; from
        // there on every entry comes exactly once, in order.
        let first = seen[0];
        assert_eq!(seen, (first..2000).collect::<Vec<_>>());
        assert_eq!(stream.dropped(), 0);
    }

    #[tokio::test]
    async fn stream_applies_filters_and_children() {
        let tree = LogTree::new();
        let r = with(
            with(
                req("root.a", BacklogMode::Disable, 0, StreamMode::Unbuffered),
                children(),
            ),
            min_severity(SEV_WARN),
        );
        let mut stream = tree.read(&r).expect("valid").stream.expect("streaming");
        info(&tree, "root.a", "info, filtered");
        tree.raw("root.a", "raw, filtered").expect("valid");
        tree.leveled("root.a.b", SEV_WARN, "", "warn child")
            .expect("valid");
        tree.leveled("root.b", SEV_ERROR, "", "not a child")
            .expect("valid");
        tree.leveled("root.a", SEV_ERROR, "", "error")
            .expect("valid");
        let e = next(&mut stream).await;
        assert_eq!(
            (e.dn.as_str(), text(&e).as_str()),
            ("root.a.b", "warn child")
        );
        assert_eq!(text(&next(&mut stream).await), "error");
        assert!(stream.try_next().is_none());
    }

    #[test]
    fn invalid_requests_are_refused() {
        use BacklogMode as B;
        use StreamMode as S;
        let ok = req("root", B::All, 0, S::Disable);
        assert!(Plan::parse(&ok).is_ok());
        let mut cases: Vec<(&str, LogsRequest)> = vec![
            ("backlog invalid", req("root", B::Invalid, 0, S::Unbuffered)),
            ("stream invalid", req("root", B::All, 0, S::Invalid)),
            ("count zero", req("root", B::Count, 0, S::Disable)),
            ("count negative", req("root", B::Count, -5, S::Disable)),
            ("count without COUNT", req("root", B::All, 5, S::Disable)),
            (
                "count with DISABLE",
                req("root", B::Disable, 5, S::Unbuffered),
            ),
            ("nothing asked", req("root", B::Disable, 0, S::Disable)),
            (
                "raw and leveled",
                with(
                    with(ok.clone(), LogFilterKind::OnlyRaw(OnlyRaw {})),
                    LogFilterKind::OnlyLeveled(OnlyLeveled {}),
                ),
            ),
            (
                "raw and severity",
                with(
                    with(ok.clone(), LogFilterKind::OnlyRaw(OnlyRaw {})),
                    min_severity(SEV_WARN),
                ),
            ),
            (
                "severity invalid",
                with(ok.clone(), min_severity(LeveledLogSeverity::Invalid)),
            ),
            (
                "severity conflict",
                with(
                    with(ok.clone(), min_severity(SEV_WARN)),
                    min_severity(SEV_ERROR),
                ),
            ),
            ("empty segment", all("root..a")),
            ("trailing dot", all("root.")),
            ("leading dot", all(".root")),
            ("space", all("root.a b")),
            ("not under root", all("foo.bar")),
            ("too long", all(&format!("root.{}", "a".repeat(300)))),
        ];
        let mut unknown_backlog = ok.clone();
        unknown_backlog.backlog_mode = 42;
        cases.push(("unknown backlog mode", unknown_backlog));
        let mut unknown_stream = ok.clone();
        unknown_stream.stream_mode = -1;
        cases.push(("unknown stream mode", unknown_stream));
        let mut unknown_severity = with(ok.clone(), min_severity(SEV_WARN));
        unknown_severity.filters[0].filter = Some(LogFilterKind::LeveledWithMinimumSeverity(
            LeveledWithMinimumSeverity { minimum: 99 },
        ));
        cases.push(("unknown severity", unknown_severity));
        let mut empty_filter = ok.clone();
        empty_filter.filters.push(LogFilter { filter: None });
        cases.push(("empty filter", empty_filter));

        let tree = LogTree::new();
        for (name, r) in cases {
            let err = match tree.read(&r) {
                Err(e) => e,
                Ok(_) => panic!("{name}: accepted"),
            };
            let status = tonic::Status::from(err.clone());
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{name}");
            assert!(!err.to_string().is_empty(), "{name}");
            assert!(
                serve(&tree, &r).is_err(),
                "{name}: serve accepted what read refused"
            );
        }
        // Duplicated but agreeing filters are fine.
        let dup = with(with(ok.clone(), children()), children());
        assert!(tree.read(&dup).is_ok());
        let same = with(with(ok, min_severity(SEV_WARN)), min_severity(SEV_WARN));
        assert!(tree.read(&same).is_ok());
    }

    #[test]
    fn invalid_appends_are_refused() {
        let tree = LogTree::new();
        for dn in ["", "root..a", "a b", "curator", "root.é"] {
            assert!(tree.raw(dn, "x").is_err(), "{dn:?}");
            assert!(tree.leveled(dn, SEV_INFO, "", "x").is_err(), "{dn:?}");
            assert!(tree.raw_writer(dn).is_err(), "{dn:?}");
        }
        assert!(
            tree.leveled("root", LeveledLogSeverity::Invalid, "", "x")
                .is_err()
        );
        assert_eq!(tree.stats().entries, 0);
    }

    #[test]
    fn long_raw_lines_are_cut_with_original_length() {
        let tree = LogTree::new();
        tree.raw("root.p", "short").expect("valid");
        tree.raw("root.p", &"x".repeat(5000)).expect("valid");
        // A 2-byte char straddling the cut goes entirely.
        let straddling = format!("{}é{}", "a".repeat(RAW_LINE_MAX - 1), "b".repeat(10));
        tree.raw("root.p", &straddling).expect("valid");
        let got = backlog(&tree, &all("root.p"));
        assert_eq!(raw(&got[0]).data, "short");
        assert_eq!(raw(&got[0]).original_length, 5);
        assert_eq!(raw(&got[1]).data.len(), RAW_LINE_MAX);
        assert_eq!(raw(&got[1]).original_length, 5000);
        assert_eq!(raw(&got[2]).data, "a".repeat(RAW_LINE_MAX - 1));
        assert_eq!(
            raw(&got[2]).original_length,
            i64::try_from(straddling.len()).expect("small")
        );
    }

    #[test]
    fn raw_writer_splits_lines() {
        let tree = LogTree::new();
        {
            let mut w = tree.raw_writer("root.etcd").expect("valid");
            w.write_all(b"one\ntw").expect("infallible");
            w.write_all(b"o\r\n\nthr").expect("infallible");
            w.write_all(b"ee").expect("infallible");
            w.flush().expect("infallible");
            assert_eq!(tree.stats().entries, 3, "flush keeps the partial line");
            // 3000 bytes with no newline, in pieces, ending in a cut char.
            for _ in 0..1000 {
                w.write_all(b"\n").expect("infallible");
                w.write_all("é".as_bytes()).expect("infallible");
                w.write_all(&[0xff, b'z']).expect("infallible");
            }
            w.write_all(&"é".as_bytes()[..1]).expect("infallible");
        }
        let got = backlog(&tree, &all("root.etcd"));
        // "one", "two", "", "three", 999 × "é\xffz", then the partial last
        // line "é\xffz\xc3", appended on drop.
        assert_eq!(texts(&got[..4]), ["one", "two", "", "three"]);
        assert_eq!(raw(&got[1]).original_length, 3, "CR is not counted");
        assert_eq!(raw(&got[4]).data, "é\u{fffd}z");
        assert_eq!(raw(&got[4]).original_length, 4);
        assert_eq!(got.len(), 4 + 1000);
        assert_eq!(raw(&got[1003]).data, "é\u{fffd}z\u{fffd}");
    }

    #[test]
    fn raw_writer_cuts_endless_lines_with_bounded_buffer() {
        let tree = LogTree::new();
        let mut w = tree.raw_writer("root.p").expect("valid");
        // 1 MiB of "ab…" then a 3-byte char crossing the cut.
        let mut line = "a".repeat(RAW_LINE_MAX - 1).into_bytes();
        line.extend_from_slice("€".as_bytes());
        line.extend(std::iter::repeat_n(b'b', 1 << 20));
        for piece in line.chunks(777) {
            w.write_all(piece).expect("infallible");
            assert!(w.buf.len() <= RAW_LINE_MAX);
        }
        w.write_all(b"\n").expect("infallible");
        let got = backlog(&tree, &all("root.p"));
        assert_eq!(raw(&got[0]).data, "a".repeat(RAW_LINE_MAX - 1));
        assert_eq!(
            raw(&got[0]).original_length,
            i64::try_from(line.len()).expect("small")
        );
    }

    #[tokio::test]
    async fn pump_reads_a_pipe_to_eof() {
        let tree = LogTree::new();
        let (mut tx, rx) = tokio::io::duplex(64);
        let pump = tokio::spawn(
            tree.raw_writer("root.consensus.etcd")
                .expect("valid")
                .pump(rx),
        );
        tokio::io::AsyncWriteExt::write_all(&mut tx, b"started\n{\"level\":\"info\"}\npartial")
            .await
            .expect("pipe");
        drop(tx);
        pump.await.expect("task").expect("EOF is not an error");
        let got = backlog(&tree, &all("root.consensus.etcd"));
        assert_eq!(texts(&got), ["started", "{\"level\":\"info\"}", "partial"]);
    }

    #[test]
    fn leveled_messages_become_lines_and_are_cut() {
        let tree = LogTree::new();
        info(&tree, "root", "first\nsecond\r\nthird\n");
        info(&tree, "root", "");
        let huge = "y".repeat(LEVELED_MESSAGE_MAX * 3);
        info(&tree, "root", &huge);
        let got = backlog(&tree, &all("root"));
        assert_eq!(leveled(&got[0]).lines, ["first", "second", "third"]);
        assert_eq!(leveled(&got[1]).lines, [""]);
        let lines = &leveled(&got[2]).lines;
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), LEVELED_MESSAGE_MAX);
        assert!(lines[1].contains(&(LEVELED_MESSAGE_MAX * 3).to_string()));
    }

    #[test]
    fn tracing_layer_makes_leveled_entries() {
        let tree = LogTree::new();
        let subscriber = tracing_subscriber::registry().with(LogTreeLayer::new(tree.clone()));
        let line = tracing::subscriber::with_default(subscriber, || {
            tracing::error!(target: "metropolis_node::membership", "lost quorum");
            tracing::warn!(target: "metropolis_curator::leader::election", node = "n1", "slow\nsecond line");
            tracing::info!(target: "h2::proto", count = 3, reason = "two words", "plain");
            tracing::debug!(target: "metropolis_node::membership", "dropped by default");
            tracing::info!(target: "metropolis_node::membership", dn = "root.consensus.etcd", "explicit");
            tracing::info!(target: "metropolis_node", dn = "not a dn", "bad dn");
            let span = tracing::info_span!("etcd", dn = "root.consensus");
            span.in_scope(|| {
                tracing::info_span!("inner").in_scope(|| {
                    tracing::info!(target: "metropolis_node::membership", "from span");
                });
            });
            let line = line!();
            tracing::info!(target: "other_crate", fields_only = true);
            line + 1
        });
        let got = backlog(&tree, &with(all("root"), children()));
        let summary: Vec<(String, i32, String)> = got
            .iter()
            .map(|e| (e.dn.clone(), leveled(e).severity, text(e)))
            .collect();
        let expected = [
            ("root.membership", SEV_ERROR, "lost quorum"),
            ("root.curator", SEV_WARN, "slow\nsecond line node=n1"),
            ("root", SEV_INFO, "plain count=3 reason=\"two words\""),
            ("root.consensus.etcd", SEV_INFO, "explicit"),
            ("root", SEV_INFO, "bad dn"),
            ("root.consensus", SEV_INFO, "from span"),
            ("root", SEV_INFO, "fields_only=true"),
        ];
        let expected: Vec<(String, i32, String)> = expected
            .iter()
            .map(|(dn, s, t)| (dn.to_string(), *s as i32, t.to_string()))
            .collect();
        assert_eq!(summary, expected);
        assert_eq!(leveled(&got[1]).lines, ["slow", "second line node=n1"]);
        let last = leveled(&got[6]);
        assert_eq!(last.location, format!("logtree.rs:{line}"));
        assert!(last.timestamp.is_some());
    }

    #[test]
    fn tracing_layer_can_keep_debug_as_info() {
        let tree = LogTree::new();
        let layer = LogTreeLayer::new(tree.clone()).with_max_level(Level::DEBUG);
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!("kept");
            tracing::trace!("still dropped");
        });
        // The DN follows the test's own target (which depends on the crate
        // this module is compiled into), so read the whole tree.
        let got = backlog(&tree, &with(all("root"), children()));
        assert_eq!(texts(&got), ["kept"]);
        assert_eq!(leveled(&got[0]).severity, SEV_INFO as i32);
    }

    #[test]
    fn target_mapping() {
        assert_eq!(
            dn_for_target("metropolis_node::membership"),
            "root.membership"
        );
        assert_eq!(dn_for_target("metropolis_node::serve::logs"), "root.serve");
        assert_eq!(dn_for_target("metropolis_node"), "root");
        assert_eq!(dn_for_target("metropolis_curator::x::y"), "root.curator");
        assert_eq!(dn_for_target("metropolis_store"), "root.store");
        assert_eq!(dn_for_target("tonic::transport"), "root");
        assert_eq!(dn_for_target(""), "root");
        assert_eq!(severity_for(&Level::TRACE), SEV_INFO);
    }

    #[test]
    fn memory_stays_bounded() {
        let tree = LogTree::new();
        let limits = Limits::default();
        for i in 0..200_000 {
            tree.raw("root.busy", &format!("line {i}")).expect("valid");
        }
        let s = tree.stats();
        assert_eq!((s.dns, s.entries), (1, limits.entries_per_dn));
        let got = backlog(&tree, &all("root.busy"));
        assert_eq!(
            text(&got[0]),
            format!("line {}", 200_000 - limits.entries_per_dn)
        );
        assert_eq!(text(&got[got.len() - 1]), "line 199999");

        for i in 0..2000 {
            tree.raw(&format!("root.many.d{i}"), "x").expect("valid");
        }
        let s = tree.stats();
        assert_eq!(s.dns, limits.dns);
        assert_eq!(s.entries, limits.entries_per_dn + limits.dns - 1);
        assert_eq!(s.dropped_entries, 2000 - (limits.dns as u64 - 1));
        // Existing DNs still log when the table is full.
        tree.raw("root.busy", "still here").expect("valid");
        assert_eq!(tree.stats().dropped_entries, s.dropped_entries);

        // Bytes bind before the entry count for long lines.
        let long = "z".repeat(RAW_LINE_MAX);
        for _ in 0..5000 {
            tree.raw("root.busy", &long).expect("valid");
        }
        let s = tree.stats();
        assert!(s.bytes <= limits.dns * limits.bytes_per_dn, "{s:?}");
        let busy = backlog(&tree, &all("root.busy"));
        let busy_bytes: usize = busy.iter().map(|e| text(e).len()).sum();
        assert!(busy_bytes <= limits.bytes_per_dn, "{busy_bytes}");
        assert!(busy.len() > limits.bytes_per_dn / (RAW_LINE_MAX + 2 * ENTRY_OVERHEAD));
    }

    #[tokio::test]
    async fn lagging_reader_loses_oldest_and_continues() {
        let tree = LogTree::with_limits(Limits {
            stream_buffer: 4,
            ..Limits::default()
        });
        let r = req("root", BacklogMode::Disable, 0, StreamMode::Unbuffered);
        let mut slow = tree.read(&r).expect("valid").stream.expect("streaming");
        for i in 0..10 {
            info(&tree, "root", &format!("m{i}"));
        }
        assert_eq!(slow.dropped(), 6);
        let mut got = Vec::new();
        while let Some(e) = slow.try_next() {
            got.push(text(&e));
        }
        assert_eq!(got, ["m6", "m7", "m8", "m9"]);
        info(&tree, "root", "after");
        assert_eq!(text(&next(&mut slow).await), "after");
        // The tree itself kept everything it is allowed to.
        assert_eq!(tree.stats().entries, 11);
    }

    #[tokio::test]
    async fn dropped_streams_are_unregistered() {
        let tree = LogTree::new();
        let r = req("root", BacklogMode::Disable, 0, StreamMode::Unbuffered);
        let stream = tree.read(&r).expect("valid").stream.expect("streaming");
        assert_eq!(tree.stats().streams, 1);
        drop(stream);
        assert_eq!(tree.stats().streams, 0);
        info(&tree, "root", "prunes");
        assert!(lock(&tree.inner).readers.is_empty());
    }

    #[tokio::test]
    async fn serve_chunks_backlog_and_batches_stream() {
        let tree = LogTree::new();
        for i in 0..(RESPONSE_CHUNK + 10) {
            info(&tree, "root", &i.to_string());
        }
        let r = req("root", BacklogMode::All, 0, StreamMode::Unbuffered);
        let mut responses = serve(&tree, &r).expect("valid");
        let first = responses.next().await.expect("a response").expect("ok");
        assert_eq!(first.backlog_entries.len(), RESPONSE_CHUNK);
        assert!(first.stream_entries.is_empty());
        let second = responses.next().await.expect("a response").expect("ok");
        assert_eq!(second.backlog_entries.len(), 10);
        info(&tree, "root", "s1");
        info(&tree, "root", "s2");
        let third = tokio::time::timeout(Duration::from_secs(5), responses.next())
            .await
            .expect("in time")
            .expect("a response")
            .expect("ok");
        assert!(third.backlog_entries.is_empty());
        assert_eq!(texts(&third.stream_entries), ["s1", "s2"]);

        let finite = req("root", BacklogMode::Count, 1, StreamMode::Disable);
        let all: Vec<_> = serve(&tree, &finite).expect("valid").collect().await;
        assert_eq!(all.len(), 1);
    }
}
