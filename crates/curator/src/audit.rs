//! The audit log: who changed what, when, and with which result.
//!
//! One tower layer ([`AuditLayer`]) records every call to a mutating method of
//! `metropolis.proto.api.Management` and `metropolis.proto.admin.ClusterAdmin`
//! (see [`is_audited`]). It sits behind [`metropolis_rpc::AuthLayer`], so the
//! established [`Caller`] is in the request extensions; calls the AuthLayer
//! refuses (no certificate, missing permission) never reach it and are not
//! recorded.
//!
//! A record holds the caller, the method, a short rendering of the request
//! and the final gRPC status. The status of a unary call arrives either in
//! the response headers (a "trailers-only" error) or in the trailers after
//! the body, so the layer wraps the response body and writes the record when
//! it sees them, before passing them on: once a client has its answer, the
//! record is in the store. A store failure is logged and never fails the call.
//!
//! Key layout:
//!
//! | key                                   | value                 |
//! |---------------------------------------|-----------------------|
//! | `/audit/<unix ns, 20 digits>-<random>` | `private.AuditRecord` |
//!
//! Keys sort by the time the call arrived; the random suffix keeps calls
//! arriving in the same nanosecond (or at different curators) apart.
//!
//! Retention: the log keeps the newest [`MAX_ENTRIES`] (10,000) records.
//! Older ones are deleted by a trim that runs after every [`TRIM_EVERY`]
//! (100) appends of a curator and once after it starts, so between trims the
//! log may briefly hold up to `MAX_ENTRIES + TRIM_EVERY - 1` records.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{SystemTime, UNIX_EPOCH};

use http_body::{Body, Frame, SizeHint};
use metropolis_api::private::{self, audit_record};
use metropolis_rpc::{Caller, Principal};
use metropolis_store::{Op, Store, Txn};
use prost::Message;
use rand::RngCore;
use tonic::Code;
use tonic::codegen::Bytes;

use crate::error::CuratorError;

pub const AUDIT_PREFIX: &str = "/audit/";

/// Records kept (see the module documentation).
pub const MAX_ENTRIES: usize = 10_000;

/// Appends between two trims.
pub const TRIM_EVERY: u64 = 100;

/// Entries returned when the caller asks for no particular number.
pub const DEFAULT_READ_LIMIT: usize = 100;

/// Deletes per transaction when trimming; etcd refuses transactions with more
/// than 128 operations by default.
const DELETES_PER_TXN: usize = 100;

/// Bytes of a request body kept for its summary. Mutating requests are small;
/// a larger one is recorded without a summary rather than buffered.
const CAPTURE_LIMIT: usize = 4096;

/// Characters of the request summary and status message kept in a record.
const TEXT_LIMIT: usize = 256;

/// Services whose mutating calls are audited.
const AUDITED_SERVICES: &[&str] = &[
    "metropolis.proto.api.Management",
    "metropolis.proto.admin.ClusterAdmin",
];

/// Whether calls to `path` (`/package.Service/Method`) are recorded: every
/// method of the audited services except reads. Reads are recognised by the
/// API naming convention (`Get…`, `List…` never change state) rather than by
/// a list, so a new mutating method is audited without anyone remembering to
/// add it.
pub fn is_audited(path: &str) -> bool {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return false;
    };
    AUDITED_SERVICES.contains(&service)
        && !method.starts_with("Get")
        && !method.starts_with("List")
        && metropolis_api::authorization::lookup(path).is_some()
}

/// The audit log in the store.
pub struct AuditLog {
    store: Arc<dyn Store>,
    retention: usize,
    trim_every: u64,
    appended: AtomicU64,
    /// Set while a trim runs, so that trims never pile up.
    trimming: AtomicBool,
    /// A trim came due; the running trim (if any) goes round once more
    /// rather than let it drop.
    trim_due: AtomicBool,
    /// Records in the store as of the last trim plus appends since (-1:
    /// not known yet). A trim reads the whole prefix, so it only runs when
    /// this says there is something to delete (or on the first append).
    count: AtomicI64,
}

impl AuditLog {
    pub fn new(store: Arc<dyn Store>) -> Arc<AuditLog> {
        Self::with_retention(store, MAX_ENTRIES, TRIM_EVERY)
    }

    /// A log with other bounds (for tests).
    pub fn with_retention(store: Arc<dyn Store>, retention: usize, trim_every: u64) -> Arc<Self> {
        Arc::new(AuditLog {
            store,
            retention,
            trim_every: trim_every.max(1),
            appended: AtomicU64::new(0),
            trimming: AtomicBool::new(false),
            trim_due: AtomicBool::new(false),
            count: AtomicI64::new(-1),
        })
    }

    /// Writes one record; every `trim_every` appends, starts a trim in the
    /// background (the caller does not wait for it).
    pub async fn append(
        self: &Arc<Self>,
        record: &private::AuditRecord,
    ) -> Result<(), CuratorError> {
        let nanos = record
            .time
            .as_ref()
            .and_then(|t| SystemTime::try_from(*t).ok())
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let key = format!(
            "{AUDIT_PREFIX}{nanos:020}-{:016x}",
            rand::rngs::OsRng.next_u64()
        );
        self.store
            .txn(Txn::new().and_then(Op::put(key, record.encode_to_vec())))
            .await?;
        let n = self.appended.fetch_add(1, Ordering::Relaxed);
        let known = self.count.load(Ordering::Relaxed);
        if known >= 0 {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        let over = known < 0 || usize::try_from(known + 1).unwrap_or(usize::MAX) > self.retention;
        if n.is_multiple_of(self.trim_every) && over {
            // Due first, then claim: if a trim is running it sees `trim_due`
            // when it ends (or its current round already reads this record).
            self.trim_due.store(true, Ordering::Release);
            if !self.trimming.swap(true, Ordering::AcqRel) {
                let log = self.clone();
                tokio::spawn(async move {
                    loop {
                        log.trim_due.store(false, Ordering::Release);
                        if let Err(e) = log.trim().await {
                            tracing::warn!(error = %e, "trimming the audit log failed; will retry later");
                        }
                        log.trimming.store(false, Ordering::Release);
                        if !log.trim_due.load(Ordering::Acquire)
                            || log.trimming.swap(true, Ordering::AcqRel)
                        {
                            break;
                        }
                    }
                });
            }
        }
        Ok(())
    }

    /// Deletes the oldest records beyond the retention bound; returns how
    /// many.
    pub async fn trim(&self) -> Result<usize, CuratorError> {
        let range = self.store.range(AUDIT_PREFIX.as_bytes()).await?;
        let excess = range.kvs.len().saturating_sub(self.retention);
        let mut deleted = 0;
        for chunk in range.kvs[..excess].chunks(DELETES_PER_TXN) {
            let txn = chunk.iter().fold(Txn::new(), |txn, kv| {
                txn.and_then(Op::delete(kv.key.clone()))
            });
            self.store.txn(txn).await?;
            deleted += chunk.len();
        }
        // Appends that raced with this read are counted again by the next
        // trim; the count only decides when to look.
        self.count.store(
            i64::try_from(range.kvs.len() - deleted).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
        Ok(deleted)
    }
}

/// The newest `limit` records (0: [`DEFAULT_READ_LIMIT`]), newest first. A
/// record that does not decode is skipped with a warning rather than making
/// the whole log unreadable.
pub async fn read(
    store: &dyn Store,
    limit: usize,
) -> Result<Vec<private::AuditRecord>, CuratorError> {
    let limit = if limit == 0 {
        DEFAULT_READ_LIMIT
    } else {
        limit
    };
    let range = store.range(AUDIT_PREFIX.as_bytes()).await?;
    Ok(range
        .kvs
        .iter()
        .rev()
        .filter_map(
            |kv| match private::AuditRecord::decode(kv.value.as_slice()) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(key = %String::from_utf8_lossy(&kv.key), error = %e,
                    "skipping an audit record that does not decode");
                    None
                }
            },
        )
        .take(limit)
        .collect())
}

/// Cuts `s` to at most `limit` characters, marking the cut.
fn cut(mut s: String, limit: usize) -> String {
    if let Some((i, _)) = s.char_indices().nth(limit) {
        s.truncate(i);
        s.push('…');
    }
    s
}

/// A short rendering of the first request message of a call: the protobuf
/// JSON mapping of the method's input type, decoded from the captured gRPC
/// frame.
pub fn summarize_request(path: &str, body: &[u8]) -> String {
    let Some(header) = body.get(..5) else {
        return "(no request message)".into();
    };
    if header[0] != 0 {
        return "(compressed request, not rendered)".into();
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let Some(message) = body.get(5..5usize.saturating_add(len)) else {
        return format!("(request of {len} bytes, not rendered)");
    };
    let rendered = (|| -> Result<String, String> {
        let (service, method) = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .ok_or("not a gRPC path")?;
        let pool = metropolis_api::json::descriptor_pool()?;
        let input = pool
            .get_service_by_name(service)
            .and_then(|s| s.methods().find(|m| m.name() == method))
            .ok_or("method not in the descriptors")?
            .input();
        let msg =
            prost_reflect::DynamicMessage::decode(input, message).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let opts = prost_reflect::SerializeOptions::new().skip_default_fields(true);
        msg.serialize_with_options(&mut serde_json::Serializer::new(&mut out), &opts)
            .map_err(|e| e.to_string())?;
        String::from_utf8(out).map_err(|e| e.to_string())
    })();
    match rendered {
        Ok(s) => cut(s, TEXT_LIMIT),
        Err(e) => format!("(request not rendered: {e})"),
    }
}

/// The tower layer; add it after the `AuthLayer` with
/// `Server::builder().layer(auth).layer(audit)`: tonic applies layers like
/// tower's `ServiceBuilder`, the first added being the outermost, so
/// authentication runs first and the `Caller` is known here.
#[derive(Clone)]
pub struct AuditLayer {
    log: Option<Arc<AuditLog>>,
}

impl AuditLayer {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::with_log(AuditLog::new(store))
    }

    pub fn with_log(log: Arc<AuditLog>) -> Self {
        AuditLayer { log: Some(log) }
    }

    /// A layer that records nothing, for nodes that hold no cluster state:
    /// their servers need the same layer types but serve no mutating calls.
    pub fn disabled() -> Self {
        AuditLayer { log: None }
    }
}

impl<S> tower::Layer<S> for AuditLayer {
    type Service = AuditService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuditService {
            inner,
            log: self.log.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuditService<S> {
    inner: S,
    log: Option<Arc<AuditLog>>,
}

impl<S, B, R> tower::Service<http::Request<B>> for AuditService<S>
where
    S: tower::Service<http::Request<CaptureBody<B>>, Response = http::Response<R>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    R: Body<Data = Bytes> + Unpin + Send + 'static,
{
    type Response = http::Response<AuditBody<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // Keep the clone that was polled ready (tower's documented pattern).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = req.uri().path();
        let Some(log) = self.log.clone().filter(|_| is_audited(path)) else {
            let req = req.map(|b| CaptureBody {
                inner: b,
                capture: None,
            });
            return Box::pin(async move {
                Ok(inner.call(req).await?.map(|b| AuditBody {
                    inner: b,
                    pending: None,
                    writing: None,
                }))
            });
        };
        let capture = Arc::new(Mutex::new(Vec::new()));
        let pending = Pending(Some(PendingRecord {
            log,
            principal: req
                .extensions()
                .get::<Caller>()
                .and_then(|c| c.principal.clone()),
            method: path.to_string(),
            time: SystemTime::now(),
            capture: capture.clone(),
        }));
        let req = req.map(|b| CaptureBody {
            inner: b,
            capture: Some(capture),
        });
        Box::pin(async move {
            let resp = match inner.call(req).await {
                Ok(resp) => resp,
                Err(e) => {
                    pending.finish(Code::Unknown, "the service failed before answering".into());
                    return Err(e);
                }
            };
            // Trailers-only: the status is in the headers and the body is
            // empty. Record before answering, like for trailers.
            if let Some((code, message)) = metropolis_rpc::observe::grpc_status(resp.headers()) {
                if let Some(task) = pending.finish(code, message) {
                    let _ = task.await;
                }
                return Ok(resp.map(|b| AuditBody {
                    inner: b,
                    pending: None,
                    writing: None,
                }));
            }
            Ok(resp.map(|b| AuditBody {
                inner: b,
                pending: Some(pending),
                writing: None,
            }))
        })
    }
}

/// A call whose result is not recorded yet. Dropped unfinished (the caller
/// went away, or the server dropped the call), it records CANCELLED.
struct Pending(Option<PendingRecord>);

struct PendingRecord {
    log: Arc<AuditLog>,
    principal: Option<Principal>,
    method: String,
    time: SystemTime,
    capture: Arc<Mutex<Vec<u8>>>,
}

impl Pending {
    /// Writes the record in a task of its own (so it completes even if the
    /// response is dropped meanwhile) and returns it to wait for.
    fn finish(mut self, code: Code, message: String) -> Option<tokio::task::JoinHandle<()>> {
        self.0.take().and_then(|p| p.spawn(code, message))
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            p.spawn(
                Code::Cancelled,
                "the call ended before its result was sent; it may or may not have taken effect"
                    .into(),
            );
        }
    }
}

impl PendingRecord {
    fn spawn(self, code: Code, message: String) -> Option<tokio::task::JoinHandle<()>> {
        let request = {
            let captured = self.capture.lock().unwrap_or_else(|e| e.into_inner());
            summarize_request(&self.method, &captured)
        };
        let record = private::AuditRecord {
            time: Some(prost_types::Timestamp::from(self.time)),
            principal: self.principal.map(|p| match p {
                Principal::User { name, .. } => audit_record::Principal::Identity(name),
                Principal::Node { id, .. } => audit_record::Principal::NodeId(id),
            }),
            method: self.method,
            request,
            code: code as i32,
            message: cut(message, TEXT_LIMIT),
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // Only reachable when a body outlives the server's runtime.
            tracing::warn!(method = %record.method, "no runtime left to write an audit record");
            return None;
        };
        let log = self.log;
        Some(rt.spawn(async move {
            if let Err(e) = log.append(&record).await {
                tracing::warn!(method = %record.method, code = record.code, error = %e,
                    "could not write the audit record of this call; the call itself is unaffected");
            }
        }))
    }
}

/// The request body, passed through while its first bytes are kept for the
/// audit record's summary.
pub struct CaptureBody<B> {
    inner: B,
    capture: Option<Arc<Mutex<Vec<u8>>>>,
}

impl<B> Body for CaptureBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let (Some(Ok(frame)), Some(capture)) = (&frame, &this.capture)
            && let Some(data) = frame.data_ref()
        {
            let mut buf = capture.lock().unwrap_or_else(|e| e.into_inner());
            let room = CAPTURE_LIMIT.saturating_sub(buf.len());
            buf.extend_from_slice(&data[..data.len().min(room)]);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The response body, passed through until the trailers, which are held back
/// until the call's record is written.
pub struct AuditBody<R> {
    inner: R,
    pending: Option<Pending>,
    writing: Option<Writing>,
}

struct Writing {
    task: Option<tokio::task::JoinHandle<()>>,
    /// What to yield once the record is written: the trailers, or the end.
    then: Option<Frame<Bytes>>,
}

impl<R: Default> Default for AuditBody<R> {
    fn default() -> Self {
        AuditBody {
            inner: R::default(),
            pending: None,
            writing: None,
        }
    }
}

impl<R> Body for AuditBody<R>
where
    R: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = R::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        loop {
            if let Some(writing) = &mut this.writing {
                if let Some(task) = &mut writing.task {
                    // A failed or panicked write was already logged; the
                    // call's answer goes out regardless.
                    let _ = ready!(Pin::new(task).poll(cx));
                }
                let then = writing.then.take();
                this.writing = None;
                return Poll::Ready(then.map(Ok));
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let status = frame.trailers_ref().map(|t| {
                        metropolis_rpc::observe::grpc_status(t).unwrap_or((
                            Code::Unknown,
                            "the response trailers carry no grpc-status".into(),
                        ))
                    });
                    match (status, this.pending.take()) {
                        (Some((code, message)), Some(pending)) => {
                            this.writing = Some(Writing {
                                task: pending.finish(code, message),
                                then: Some(frame),
                            });
                        }
                        (_, pending) => {
                            this.pending = pending;
                            return Poll::Ready(Some(Ok(frame)));
                        }
                    }
                }
                Some(Err(e)) => {
                    if let Some(pending) = this.pending.take() {
                        pending.finish(
                            Code::Unknown,
                            "the response failed while it was being sent".into(),
                        );
                    }
                    return Poll::Ready(Some(Err(e)));
                }
                None => match this.pending.take() {
                    Some(pending) => {
                        this.writing = Some(Writing {
                            task: pending.finish(
                                Code::Unknown,
                                "the response ended without a gRPC status".into(),
                            ),
                            then: None,
                        });
                    }
                    None => return Poll::Ready(None),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.writing.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.pending.is_some() || self.writing.is_some() {
            // Not exact: the trailers are still to come.
            let mut hint = SizeHint::new();
            hint.set_lower(self.inner.size_hint().lower());
            hint
        } else {
            self.inner.size_hint()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (crate::state::test_support::Backing, Arc<dyn Store>) {
        let (backing, store, _) = crate::state::test_support::store().await;
        (backing, store)
    }

    fn record(n: u64) -> private::AuditRecord {
        private::AuditRecord {
            time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000 + n as i64,
                nanos: 0,
            }),
            principal: Some(audit_record::Principal::Identity("owner".into())),
            method: format!("/metropolis.proto.api.Management/Call{n}"),
            request: String::new(),
            code: 0,
            message: String::new(),
        }
    }

    #[test]
    fn audited_methods() {
        let audited: Vec<&str> = metropolis_api::authorization::METHODS
            .iter()
            .map(|m| m.path)
            .filter(|p| is_audited(p))
            .collect();
        for p in [
            "/metropolis.proto.api.Management/ApproveNode",
            "/metropolis.proto.api.Management/ConfigureCluster",
            "/metropolis.proto.api.Management/DeleteNode",
            "/metropolis.proto.api.Management/DecommissionNode",
            "/metropolis.proto.api.Management/UpdateNodeLabels",
            "/metropolis.proto.api.Management/UpdateNodeRoles",
            "/metropolis.proto.admin.ClusterAdmin/RegenerateRegisterTicket",
            "/metropolis.proto.admin.ClusterAdmin/AddIdentity",
            "/metropolis.proto.admin.ClusterAdmin/RemoveIdentity",
        ] {
            assert!(audited.contains(&p), "{p} is not audited");
        }
        for p in [
            "/metropolis.proto.api.Management/GetRegisterTicket",
            "/metropolis.proto.api.Management/GetClusterInfo",
            "/metropolis.proto.api.Management/GetNodes",
            "/metropolis.proto.admin.ClusterAdmin/ListIdentities",
            "/metropolis.proto.admin.ClusterAdmin/GetAuditLog",
            "/metropolis.proto.api.AAA/Escrow",
            "/metropolis.proto.api.Management/NoSuchMethod",
            "garbage",
        ] {
            assert!(!is_audited(p), "{p} is audited");
        }
        assert!(audited.iter().all(|p| {
            AUDITED_SERVICES
                .iter()
                .any(|s| p.starts_with(&format!("/{s}/")))
        }));
    }

    #[tokio::test]
    async fn append_read_newest_first_and_trim() {
        let (_d, s) = store().await;
        let log = AuditLog::with_retention(s.clone(), 5, 1000);
        for n in 0..8 {
            log.append(&record(n)).await.expect("append");
        }
        let all = read(s.as_ref(), 100).await.expect("read");
        assert_eq!(all.len(), 8);
        assert_eq!(all[0].method, "/metropolis.proto.api.Management/Call7");
        assert_eq!(all[7].method, "/metropolis.proto.api.Management/Call0");
        let two = read(s.as_ref(), 2).await.expect("read");
        assert_eq!(two.len(), 2);
        assert_eq!(two[1].method, "/metropolis.proto.api.Management/Call6");
        assert_eq!(read(s.as_ref(), 0).await.expect("read").len(), 8);

        assert_eq!(log.trim().await.expect("trim"), 3);
        let kept = read(s.as_ref(), 100).await.expect("read");
        assert_eq!(kept.len(), 5);
        assert_eq!(kept[4].method, "/metropolis.proto.api.Management/Call3");
        assert_eq!(log.trim().await.expect("trim again"), 0);
    }

    #[tokio::test]
    async fn appends_trim_in_the_background() {
        let (_d, s) = store().await;
        let log = AuditLog::with_retention(s.clone(), 3, 4);
        for n in 0..9 {
            log.append(&record(n)).await.expect("append");
        }
        // Trims ran after appends 1, 5 and 9; wait for the last one.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let n = read(s.as_ref(), 100).await.expect("read").len();
            if n == 3 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "still {n} records");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let kept = read(s.as_ref(), 100).await.expect("read");
        assert_eq!(kept[0].method, "/metropolis.proto.api.Management/Call8");
    }

    fn grpc_frame(msg: &impl Message) -> Vec<u8> {
        let body = msg.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn request_summaries() {
        use metropolis_api::api::{UpdateNodeLabelsRequest, update_node_labels_request};
        let req = UpdateNodeLabelsRequest {
            node: Some(update_node_labels_request::Node::Id("metropolis-ab".into())),
            delete: vec!["zone".into()],
            ..Default::default()
        };
        let path = "/metropolis.proto.api.Management/UpdateNodeLabels";
        let s = summarize_request(path, &grpc_frame(&req));
        let v: serde_json::Value = serde_json::from_str(&s).expect("json");
        assert_eq!(v["id"], "metropolis-ab");
        assert_eq!(v["delete"][0], "zone");

        let long = UpdateNodeLabelsRequest {
            delete: vec!["x".repeat(300)],
            ..Default::default()
        };
        let s = summarize_request(path, &grpc_frame(&long));
        assert_eq!(s.chars().count(), TEXT_LIMIT + 1);
        assert!(s.ends_with('…'));

        assert_eq!(summarize_request(path, &[]), "(no request message)");
        let mut frame = grpc_frame(&req);
        frame.truncate(8);
        assert!(summarize_request(path, &frame).contains("not rendered"));
        frame[0] = 1;
        assert!(summarize_request(path, &frame).contains("compressed"));
        assert!(summarize_request("/nope.Service/X", &grpc_frame(&req)).contains("not rendered"));
    }

    /// A handler that reads the request and answers OK in trailers, or
    /// INVALID_ARGUMENT trailers-only.
    #[derive(Clone)]
    struct Fake {
        trailers_only: bool,
    }

    #[derive(Default)]
    struct FakeBody {
        frames: std::collections::VecDeque<Frame<Bytes>>,
    }

    impl Body for FakeBody {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.frames.pop_front().map(Ok))
        }
    }

    impl tower::Service<http::Request<CaptureBody<FakeBody>>> for Fake {
        type Response = http::Response<FakeBody>;
        type Error = std::convert::Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: http::Request<CaptureBody<FakeBody>>) -> Self::Future {
            let trailers_only = self.trailers_only;
            Box::pin(async move {
                let mut body = req.into_body();
                while let Some(f) =
                    std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
                {
                    let _ = f;
                }
                if trailers_only {
                    return Ok(tonic::Status::invalid_argument("no \"good\"").into_http());
                }
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                let mut frames = std::collections::VecDeque::new();
                frames.push_back(Frame::data(Bytes::from_static(b"\0\0\0\0\0")));
                frames.push_back(Frame::trailers(trailers));
                Ok(http::Response::new(FakeBody { frames }))
            })
        }
    }

    async fn call(
        layer: &AuditLayer,
        trailers_only: bool,
        path: &str,
        principal: Option<Principal>,
    ) -> Vec<Frame<Bytes>> {
        use tower::{Layer, Service};
        let mut svc = layer.layer(Fake { trailers_only });
        let req_msg = metropolis_api::api::ApproveNodeRequest {
            pubkey: vec![1; 32],
        };
        let mut frames = std::collections::VecDeque::new();
        frames.push_back(Frame::data(Bytes::from(grpc_frame(&req_msg))));
        let mut req = http::Request::builder()
            .uri(format!("http://x{path}"))
            .body(FakeBody { frames })
            .expect("request");
        req.extensions_mut().insert(Caller {
            certificate: None,
            principal,
        });
        let resp = svc.call(req).await.expect("call");
        let mut body = resp.into_body();
        let mut out = Vec::new();
        while let Some(f) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            out.push(f.expect("frame"));
        }
        out
    }

    #[tokio::test]
    async fn layer_records_results_before_answering() {
        let (_d, s) = store().await;
        let layer = AuditLayer::new(s.clone());
        let approve = "/metropolis.proto.api.Management/ApproveNode";
        let who = Principal::User {
            name: "alice".into(),
            public_key: [0; 32],
        };

        // Status in trailers: passed on after the record is written.
        let frames = call(&layer, false, approve, Some(who.clone())).await;
        assert!(frames.last().expect("trailers").is_trailers());
        let log = read(s.as_ref(), 10).await.expect("read");
        assert_eq!(log.len(), 1, "recorded by the time the trailers arrive");
        assert_eq!(log[0].method, approve);
        assert_eq!(log[0].code, 0);
        assert_eq!(
            log[0].principal,
            Some(audit_record::Principal::Identity("alice".into()))
        );
        assert!(log[0].request.contains("pubkey"), "{}", log[0].request);

        // Trailers-only error.
        call(
            &layer,
            true,
            approve,
            Some(Principal::Node {
                id: "metropolis-00".into(),
                public_key: [0; 32],
            }),
        )
        .await;
        let log = read(s.as_ref(), 10).await.expect("read");
        assert_eq!(log.len(), 2);
        assert_eq!(log[0].code, Code::InvalidArgument as i32);
        assert_eq!(log[0].message, "no \"good\"");
        assert_eq!(
            log[0].principal,
            Some(audit_record::Principal::NodeId("metropolis-00".into()))
        );

        // Reads and a disabled layer record nothing.
        call(
            &layer,
            false,
            "/metropolis.proto.api.Management/GetNodes",
            Some(who.clone()),
        )
        .await;
        call(&AuditLayer::disabled(), false, approve, Some(who)).await;
        assert_eq!(read(s.as_ref(), 10).await.expect("read").len(), 2);
    }

    #[tokio::test]
    async fn a_failing_store_does_not_fail_the_call() {
        let (dir, s) = store().await;
        // A store whose writes fail: the caller still gets its answer.
        struct Broken(Arc<dyn Store>);
        #[async_trait::async_trait]
        impl Store for Broken {
            async fn get(
                &self,
                key: &[u8],
            ) -> Result<Option<metropolis_store::KeyValue>, metropolis_store::StoreError>
            {
                self.0.get(key).await
            }
            async fn range(
                &self,
                prefix: &[u8],
            ) -> Result<metropolis_store::RangeResponse, metropolis_store::StoreError> {
                self.0.range(prefix).await
            }
            async fn txn(
                &self,
                _: Txn,
            ) -> Result<metropolis_store::TxnResponse, metropolis_store::StoreError> {
                Err(metropolis_store::StoreError::Unavailable("broken".into()))
            }
            async fn watch(
                &self,
                prefix: &[u8],
                start: i64,
            ) -> Result<metropolis_store::WatchStream, metropolis_store::StoreError> {
                self.0.watch(prefix, start).await
            }
            async fn grant_lease(
                &self,
                ttl: std::time::Duration,
            ) -> Result<metropolis_store::LeaseId, metropolis_store::StoreError> {
                self.0.grant_lease(ttl).await
            }
            async fn keep_alive(
                &self,
                lease: metropolis_store::LeaseId,
            ) -> Result<(), metropolis_store::StoreError> {
                self.0.keep_alive(lease).await
            }
            async fn revoke_lease(
                &self,
                lease: metropolis_store::LeaseId,
            ) -> Result<(), metropolis_store::StoreError> {
                self.0.revoke_lease(lease).await
            }
            async fn revision(&self) -> Result<i64, metropolis_store::StoreError> {
                self.0.revision().await
            }
        }
        let layer = AuditLayer::new(Arc::new(Broken(s.clone())));
        let frames = call(
            &layer,
            false,
            "/metropolis.proto.api.Management/ApproveNode",
            None,
        )
        .await;
        assert!(frames.last().expect("trailers").is_trailers());
        assert!(read(s.as_ref(), 10).await.expect("read").is_empty());
        drop(dir);
    }
}
