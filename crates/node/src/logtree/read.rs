//! Reading the tree: a `LogsRequest` checked and turned into a query, the
//! backlog, the stream of later entries, and the responses the RPCs send.

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures::{Stream, StreamExt};
use metropolis_api::api::logs_request::{BacklogMode, StreamMode};
use metropolis_api::api::{LogsRequest, LogsResponse};
use metropolis_api::common::log_filter::Filter as LogFilterKind;
use metropolis_api::osbase::logtree::proto::{LeveledLogSeverity, LogEntry};

use super::{
    Entry, Inner, Kind, LogError, LogTree, MAX_DN_LEN, RESPONSE_CHUNK, RESPONSE_MAX_BYTES, lock,
};

impl LogTree {
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
pub(super) struct Query {
    dn: String,
    children: bool,
    kinds: KindFilter,
}

impl Query {
    fn matches_dn(&self, dn: &str) -> bool {
        // Nothing is logged at the top of the tree itself, so asking for it
        // exactly would always answer nothing: it names the whole tree.
        self.dn.is_empty()
            || dn == self.dn
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

    pub(super) fn matches(&self, e: &Entry) -> bool {
        self.matches_dn(&e.dn) && self.matches_kind(e)
    }
}

/// Most filters one request may carry (upstream's limit).
pub const MAX_FILTERS: usize = 10;

/// What a reader may name: any dot-separated DN without empty segments
/// (upstream's rule), bounded in length. Appends are stricter
/// (`validate_dn`).
pub(super) fn check_read_dn(dn: &str) -> Result<(), LogError> {
    let reason = if dn.len() > MAX_DN_LEN {
        "longer than 256 bytes"
    } else if dn.split('.').any(str::is_empty) {
        "empty segment (leading, trailing or doubled '.')"
    } else {
        return Ok(());
    };
    Err(LogError::InvalidDn {
        dn: dn.chars().take(32).collect(),
        reason,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backlog {
    None,
    All,
    Last(usize),
}

pub(super) struct Plan {
    pub(super) query: Query,
    backlog: Backlog,
    stream: bool,
}

impl Plan {
    pub(super) fn parse(req: &LogsRequest) -> Result<Plan, LogError> {
        let bad = |msg: String| Err(LogError::InvalidRequest(msg));
        if req.filters.len() > MAX_FILTERS {
            return bad(format!(
                "{} filters given; at most {MAX_FILTERS} are allowed",
                req.filters.len()
            ));
        }
        // Any DN may be asked for (one nobody logs to has no entries); the
        // empty DN is the top of the tree, above `root`.
        if !req.dn.is_empty() {
            check_read_dn(&req.dn)?;
        }
        let dn = req.dn.clone();

        // As upstream: backlog_count means something only with
        // BACKLOG_MODE_COUNT, and is ignored otherwise.
        let backlog = match BacklogMode::try_from(req.backlog_mode) {
            Ok(BacklogMode::Invalid) => {
                return bad(
                    "backlog_mode must be set: BACKLOG_MODE_DISABLE, BACKLOG_MODE_ALL or BACKLOG_MODE_COUNT"
                        .into(),
                );
            }
            Ok(BacklogMode::Count) if req.backlog_count <= 0 => {
                return bad(format!(
                    "backlog_count must be > 0 with BACKLOG_MODE_COUNT, got {}",
                    req.backlog_count
                ));
            }
            Ok(BacklogMode::Count) => {
                Backlog::Last(usize::try_from(req.backlog_count).unwrap_or(usize::MAX))
            }
            Ok(BacklogMode::All) => Backlog::All,
            Ok(BacklogMode::Disable) => Backlog::None,
            Err(_) => return bad(format!("unknown backlog_mode {}", req.backlog_mode)),
        };

        // An unset stream_mode (0) streams nothing, as upstream. A value this
        // node does not know may ask for something it cannot do: refused.
        let stream = match StreamMode::try_from(req.stream_mode) {
            Ok(StreamMode::Invalid | StreamMode::Disable) => false,
            Ok(StreamMode::Unbuffered) => true,
            Err(_) => return bad(format!("unknown stream_mode {}", req.stream_mode)),
        };

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
    /// `LogsResponse`s as the RPCs send them: the backlog in chunks in
    /// `backlog_entries`, then streamed entries in `stream_entries`,
    /// batching whatever is ready so a busy DN does not cost one message per
    /// entry. A response holds at most [`RESPONSE_CHUNK`] entries (upstream's
    /// figure) and [`RESPONSE_MAX_BYTES`] of them, whichever binds first. A
    /// request for neither backlog nor stream gets no response at all.
    pub fn into_responses(self) -> impl Stream<Item = LogsResponse> + Send + 'static {
        let LogReader { backlog, stream } = self;
        let mut chunks = Vec::new();
        let mut entries = backlog.into_iter().peekable();
        while entries.peek().is_some() {
            let mut chunk = Chunk::default();
            while let Some(e) = entries.next_if(|e| chunk.has_room_for(e)) {
                chunk.push(e);
            }
            chunks.push(LogsResponse {
                backlog_entries: chunk.entries,
                stream_entries: Vec::new(),
            });
        }
        let tail =
            futures::stream::unfold((stream, None::<LogEntry>), |(stream, carried)| async move {
                let mut stream = stream?;
                let first = match carried {
                    Some(e) => e,
                    None => stream.next().await?,
                };
                let mut chunk = Chunk::default();
                chunk.push(first);
                let mut carry = None;
                while let Some(e) = stream.try_next() {
                    if chunk.has_room_for(&e) {
                        chunk.push(e);
                    } else {
                        carry = Some(e);
                        break;
                    }
                }
                let response = LogsResponse {
                    backlog_entries: Vec::new(),
                    stream_entries: chunk.entries,
                };
                Some((response, (Some(stream), carry)))
            });
        futures::stream::iter(chunks).chain(tail)
    }
}

/// The entries of one response, and their encoded size.
#[derive(Default)]
struct Chunk {
    entries: Vec<LogEntry>,
    bytes: usize,
}

impl Chunk {
    /// Whether `e` still fits; an empty chunk takes any entry (one entry is
    /// far below the byte bound).
    fn has_room_for(&self, e: &LogEntry) -> bool {
        self.entries.is_empty()
            || (self.entries.len() < RESPONSE_CHUNK
                && self.bytes + encoded_len_in_response(e) <= RESPONSE_MAX_BYTES)
    }

    fn push(&mut self, e: LogEntry) {
        self.bytes += encoded_len_in_response(&e);
        self.entries.push(e);
    }
}

/// An entry's share of a `LogsResponse`: the entry and its field header.
fn encoded_len_in_response(e: &LogEntry) -> usize {
    use prost::Message;
    let len = e.encoded_len();
    len + prost::length_delimiter_len(len) + 1
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

pub(super) struct Reader {
    pub(super) query: Query,
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
    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    pub(super) fn push(&self, entry: &Arc<Entry>, cap: usize) {
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

impl fmt::Debug for LogStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStream")
            .field("query", &self.reader.query)
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
