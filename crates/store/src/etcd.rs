//! The etcd backend: [`Store`] on a real etcd (v3 API) cluster, through
//! `etcd-client`.
//!
//! The trait is modelled on etcd, so almost everything maps one to one:
//!
//! * [`Store::get`] / [`Store::range`] are etcd ranges; the range revision is
//!   the response header's revision. An empty prefix means every key
//!   (`key = "\0"`, `range_end = "\0"`).
//! * [`Store::txn`] is exactly one etcd `Txn`, so the whole transaction gets a
//!   single revision and later operations see earlier writes of the same
//!   transaction, as in the embedded store.
//! * [`Store::watch`] is one etcd watch (on its own gRPC stream). Dropping the
//!   returned stream closes that gRPC stream, which cancels the watch on the
//!   server. A compacted start revision is reported as
//!   [`StoreError::Compacted`] (with `oldest` = etcd's `compact_revision`, the
//!   oldest revision a watch may still start at) and ends the stream.
//! * Leases are etcd leases. See [`EtcdStore::grant_lease`] for how TTLs are
//!   rounded.
//!
//! Differences from the embedded store callers must know about:
//!
//! * etcd rejects a transaction that writes (puts or deletes) the same key more
//!   than once in one branch ("duplicate key given in txn request"); the
//!   embedded store allows it. Such a transaction fails with
//!   [`StoreError::Invalid`].
//! * Lease TTLs are whole seconds, and etcd enforces a minimum TTL of its own
//!   (about 1.5 × the election timeout, so 2 s with default settings): a lease
//!   may live somewhat longer than asked. Expired leases are revoked by the
//!   leader's periodic check (every 500 ms), not at the exact deadline.
//! * Responses are bounded by gRPC message size limits (etcd's
//!   `--max-request-bytes` and the client's decode limit), so very large
//!   ranges or transactions can fail where the embedded store succeeds.
//!
//! Endpoints: plain `http://host:port` ([`EtcdStore::connect`]) or a unix
//! socket ([`EtcdStore::connect_unix`]). etcd listens on a unix socket only
//! when told `--listen-client-urls unix://client.sock:0`, which creates a
//! file literally named `client.sock:0` in etcd's working directory: run etcd
//! in the directory the socket should be in and connect to
//! `<dir>/client.sock:0`.
//!
//! The same store also implements [`Consensus`] (etcd's cluster and
//! maintenance APIs). Status reports the member this client talks to; with
//! several `http://` endpoints that is whichever one the request went to.
//!
//! Not done yet: TLS (client certificates) for client connections.

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::proto::{PbKeyValue, PbTxnOpResponse};
use etcd_client::{
    Client, ConnectOptions, DeleteOptions, GetOptions, MemberAddOptions, PutOptions, WatchOptions,
};
use hyper_util::rt::TokioIo;
use tonic::Code;
use tonic::transport::{Endpoint, Uri};

use crate::{
    Compare, CompareOp, CompareTarget, Consensus, ConsensusStatus, EventKind, KeyValue, LeaseId,
    Member, Op, OpResult, RangeResponse, Snapshot, Store, StoreError, Txn, TxnResponse, WatchEvent,
    WatchStream,
};

/// How long establishing a connection to an endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 keep-alive, so that a dead connection is noticed by open watches.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A [`Store`] backed by an etcd cluster.
pub struct EtcdStore {
    client: Client,
    endpoints: Vec<String>,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to an etcd cluster over plain HTTP (`http://host:port`
    /// endpoints) and checks that it answers. TLS and unix sockets are not
    /// supported yet.
    pub async fn connect(endpoints: &[String]) -> Result<Arc<EtcdStore>, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::Invalid("no etcd endpoints given".into()));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT);
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "cannot connect to etcd at {}: {e}",
                    endpoints.join(", ")
                ))
            })?;
        let store = EtcdStore {
            client,
            endpoints: endpoints.to_vec(),
        };
        // The channel connects lazily; make a bad endpoint fail here, with a
        // message that names it, rather than at the first real request.
        store.revision().await.map_err(|e| match e {
            StoreError::Unavailable(msg) => StoreError::Unavailable(format!(
                "etcd at {} does not answer: {msg}",
                endpoints.join(", ")
            )),
            other => other,
        })?;
        Ok(Arc::new(store))
    }

    /// Connects to an etcd member over the unix socket at `path` and checks
    /// that it answers. See the module documentation for the name etcd gives
    /// its socket.
    ///
    /// A learner refuses the check (etcd serves learners' clients almost
    /// nothing), so this fails with [`StoreError::Unavailable`] until the
    /// member has been promoted.
    pub async fn connect_unix(path: &Path) -> Result<Arc<EtcdStore>, StoreError> {
        let name = format!("unix:{}", path.display());
        let socket = path.to_path_buf();
        // tonic needs a URI to build HTTP/2 requests; the host is never
        // resolved, since the connector below ignores it.
        let endpoint = Endpoint::from_static("http://etcd.local")
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        // Also used to reconnect after the connection breaks (etcd restarts).
        let connector = tower::service_fn(move |_: Uri| {
            let socket: PathBuf = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(&socket).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        let channel = endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "cannot connect to etcd at {name}: {}",
                    error_chain(&e)
                ))
            })?;
        // Timeouts and keep-alive are the endpoint's above; from_channel reads
        // only per-call settings (credentials) from the options.
        let options = ConnectOptions::new();
        let client = Client::from_channel(etcd_client::Channel::Tonic(channel), Some(options))
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot connect to etcd at {name}: {e}"))
            })?;
        let store = EtcdStore {
            client,
            endpoints: vec![name.clone()],
        };
        store.revision().await.map_err(|e| match e {
            StoreError::Unavailable(msg) => {
                StoreError::Unavailable(format!("etcd at {name} does not answer: {msg}"))
            }
            other => other,
        })?;
        Ok(Arc::new(store))
    }

    /// The endpoints this store was connected to (`unix:<path>` for a unix
    /// socket).
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    fn client(&self) -> Client {
        // Clones share the underlying channel, but a whole `Client` is eight
        // service clients (each with its own auth caller): the key-value and
        // watch paths, which run per curator call, clone only theirs below.
        self.client.clone()
    }

    pub(crate) fn kv(&self) -> etcd_client::KvClient {
        self.client.kv_client()
    }
}

/// Reads of an etcd in the middle of an election fail with "leader changed"
/// or "no leader" for about an election timeout; a read is safe to repeat,
/// so it is, for a few seconds, rather than failing the caller's call.
/// (Writes are not: a write that failed so may have been committed.)
async fn read<T, F, Fut>(call: F) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    use backon::{ExponentialBuilder, Retryable};
    call.retry(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_millis(500))
            .with_max_times(8),
    )
    .when(during_election)
    .await
}

/// etcd's answers while its members elect a leader.
fn during_election(e: &etcd_client::Error) -> bool {
    const ELECTION: &[&str] = &["leader changed", "no leader"];
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.code() == Code::Unavailable && ELECTION.iter().any(|m| s.message().contains(m)))
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        // etcd rejects empty keys; none can exist, as in the embedded store.
        if key.is_empty() {
            return Ok(None);
        }
        let resp = read(|| {
            let mut kv = self.kv();
            async move { kv.get(key, None).await }
        })
        .await
        .map_err(map_err)?;
        Ok(resp.0.kvs.into_iter().next().map(convert_kv))
    }

    async fn range(&self, prefix: &[u8]) -> Result<RangeResponse, StoreError> {
        let (key, end) = prefix_range(prefix);
        let resp = read(|| {
            let mut kv = self.kv();
            let (key, end) = (key.clone(), end.clone());
            async move { kv.get(key, Some(GetOptions::new().with_range(end))).await }
        })
        .await
        .map_err(map_err)?;
        let revision = header_revision(resp.0.header.as_ref())?;
        Ok(RangeResponse {
            kvs: resp.0.kvs.into_iter().map(convert_kv).collect(),
            revision,
        })
    }

    /// A count of `count_prefix` fixes the revision; the pages are ranges
    /// at that revision, each starting after the last key of the one
    /// before, so no page exceeds the client's response limit. A
    /// compaction past the revision while the pages are read fails the
    /// snapshot (etcd keeps revisions until it is told to compact).
    async fn snapshot(
        &self,
        count_prefix: &[u8],
        page_keys: usize,
    ) -> Result<Snapshot, StoreError> {
        let (key, end) = prefix_range(count_prefix);
        let resp = self
            .kv()
            .get(
                key,
                Some(GetOptions::new().with_range(end).with_count_only()),
            )
            .await
            .map_err(map_err)?;
        let revision = header_revision(resp.0.header.as_ref())?;
        let counted = u64::try_from(resp.0.count).unwrap_or(0);
        let limit = i64::try_from(page_keys.max(1)).unwrap_or(i64::MAX);
        let kv = self.kv();
        let (from, end) = prefix_range(b"");
        let pages = futures::stream::try_unfold(Some(from), move |from| {
            let mut kv = kv.clone();
            let end = end.clone();
            async move {
                let Some(from) = from else {
                    return Ok(None);
                };
                let options = GetOptions::new()
                    .with_range(end)
                    .with_limit(limit)
                    .with_revision(revision);
                let resp = kv.get(from, Some(options)).await.map_err(map_err)?;
                let more = resp.0.more;
                let page: Vec<KeyValue> = resp.0.kvs.into_iter().map(convert_kv).collect();
                let next = match page.last() {
                    Some(last) if more => {
                        let mut next = last.key.clone();
                        next.push(0);
                        Some(next)
                    }
                    _ => None,
                };
                if page.is_empty() {
                    return Ok(None);
                }
                Ok(Some((page, next)))
            }
        });
        Ok(Snapshot {
            revision,
            counted,
            pages: Box::pin(pages),
        })
    }

    /// One etcd transaction. Note etcd's rule that a key may be written at most
    /// once per branch (the embedded store allows duplicates): such a
    /// transaction fails with [`StoreError::Invalid`].
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        validate_txn(&txn)?;
        let leased = txn
            .success
            .iter()
            .chain(&txn.failure)
            .find_map(|op| match op {
                Op::Put { lease, .. } if *lease != 0 => Some(*lease),
                _ => None,
            });
        // The transaction is consumed: keys and values move into the request
        // rather than being copied.
        let request = etcd_client::Txn::new()
            .when(
                txn.compares
                    .into_iter()
                    .map(convert_compare)
                    .collect::<Vec<_>>(),
            )
            .and_then(txn.success.into_iter().map(convert_op).collect::<Vec<_>>())
            .or_else(txn.failure.into_iter().map(convert_op).collect::<Vec<_>>());
        let resp = match self.kv().txn(request).await {
            Ok(resp) => resp.0,
            Err(e) if is_lease_not_found(&e) => {
                return Err(StoreError::LeaseNotFound(leased.unwrap_or_default()));
            }
            Err(e) => return Err(map_err(e)),
        };
        let revision = header_revision(resp.header.as_ref())?;
        let results = resp
            .responses
            .into_iter()
            .map(|op| match op.response {
                Some(PbTxnOpResponse::ResponsePut(_)) => Ok(OpResult::Put),
                Some(PbTxnOpResponse::ResponseDeleteRange(d)) => Ok(OpResult::Delete(d.deleted)),
                Some(PbTxnOpResponse::ResponseRange(r)) => {
                    Ok(OpResult::Get(r.kvs.into_iter().map(convert_kv).collect()))
                }
                Some(PbTxnOpResponse::ResponseTxn(_)) => Err(StoreError::Backend(
                    "etcd returned a nested transaction result that was never requested".into(),
                )),
                None => Err(StoreError::Backend(
                    "etcd returned an empty transaction operation result".into(),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TxnResponse {
            succeeded: resp.succeeded,
            revision,
            results,
        })
    }

    async fn watch(&self, prefix: &[u8], start_revision: i64) -> Result<WatchStream, StoreError> {
        if start_revision < 0 {
            return Err(StoreError::Invalid(format!(
                "watch start revision {start_revision} is negative"
            )));
        }
        let (key, end) = prefix_range(prefix);
        let mut options = WatchOptions::new().with_range(end);
        if start_revision > 0 {
            options = options.with_start_revision(start_revision);
        }
        let stream = self
            .client
            .watch_client()
            .watch(key, Some(options))
            .await
            .map_err(map_err)?;
        let mut watcher = Watcher {
            stream,
            requested: start_revision,
            pending: VecDeque::new(),
            finished: false,
        };
        // Wait until etcd confirms the watch, so that with start revision 0
        // every change committed after this call returns is delivered.
        watcher.wait_created().await?;
        Ok(Box::pin(futures::stream::unfold(watcher, Watcher::step)))
    }

    /// Grants an etcd lease. etcd TTLs are whole seconds: `ttl` is rounded up,
    /// to at least 1 s (and etcd may raise it further to its minimum TTL).
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        if ttl.is_zero() {
            return Err(StoreError::Invalid("lease TTL must be positive".into()));
        }
        let secs = ttl
            .as_secs()
            .saturating_add(u64::from(ttl.subsec_nanos() > 0))
            .max(1);
        let secs = i64::try_from(secs).unwrap_or(i64::MAX);
        let resp = self
            .client()
            .lease_grant(secs, None)
            .await
            .map_err(map_err)?;
        if !resp.0.error.is_empty() {
            return Err(StoreError::Backend(format!(
                "etcd refused to grant a lease: {}",
                resp.0.error
            )));
        }
        Ok(resp.0.id)
    }

    /// One keep-alive round trip on a short-lived keep-alive stream.
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        match self.client().lease_keep_alive(lease).await {
            // The keeper and the response stream are dropped here, which ends
            // the keep-alive stream on the server.
            Ok(_) => Ok(()),
            // etcd answers a keep-alive for an unknown or expired lease with
            // TTL 0, which etcd-client reports as this error.
            Err(etcd_client::Error::LeaseKeepAliveError(msg)) if msg.contains("not found") => {
                Err(StoreError::LeaseNotFound(lease))
            }
            Err(e) if is_lease_not_found(&e) => Err(StoreError::LeaseNotFound(lease)),
            Err(e) => Err(map_err(e)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        match self.client().lease_revoke(lease).await {
            Ok(_) => Ok(()),
            Err(e) if is_lease_not_found(&e) => Err(StoreError::LeaseNotFound(lease)),
            Err(e) => Err(map_err(e)),
        }
    }

    async fn revision(&self) -> Result<i64, StoreError> {
        // A count-only read of one key: the header carries the store revision.
        let resp = self
            .kv()
            .get(vec![0u8], Some(GetOptions::new().with_count_only()))
            .await
            .map_err(map_err)?;
        header_revision(resp.0.header.as_ref())
    }
}

// etcd's membership errors (etcdserver/api/v3rpc/rpctypes), matched by
// message: the gRPC codes alone do not tell them apart.
const LEARNER_NOT_READY: &str = "can only promote a learner member which is in sync with leader";
const NOT_LEARNER: &str = "can only promote a learner member";
const PEER_URL_EXISTS: &str = "peer urls already exists";
const TOO_MANY_LEARNERS: &str = "too many learner members";
const NOT_ENOUGH_STARTED: &str = "not enough started members";

/// How long a membership or maintenance call may take. etcd bounds most of
/// them itself, not all: MoveLeader waits for the new leader for as long as
/// the caller does, forever if that member died meanwhile, and the
/// reconciler that asked would wait with it.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// `call`, or Unavailable once [`ADMIN_TIMEOUT`] passed (dropping the call
/// cancels it at etcd too).
async fn bounded<T>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<Result<T, etcd_client::Error>, StoreError> {
    tokio::time::timeout(ADMIN_TIMEOUT, call)
        .await
        .map_err(|_| {
            StoreError::Unavailable(format!(
                "etcd did not answer {what} within {ADMIN_TIMEOUT:?}; retry shortly"
            ))
        })
}

#[async_trait]
impl Consensus for EtcdStore {
    async fn members(&self) -> Result<Vec<Member>, StoreError> {
        let resp = bounded("MemberList", self.client().member_list())
            .await?
            .map_err(map_member_err)?;
        Ok(resp.members().iter().map(convert_member).collect())
    }

    async fn add_learner(&self, peer_url: &str) -> Result<Member, StoreError> {
        if peer_url.is_empty() {
            return Err(StoreError::Invalid("empty etcd peer URL".into()));
        }
        if let Some(m) = self.member_with_peer_url(peer_url).await? {
            return Ok(m);
        }
        let added = bounded(
            "MemberAdd",
            self.client()
                .member_add([peer_url], Some(MemberAddOptions::new().with_is_learner())),
        )
        .await?;
        match added {
            Ok(resp) => resp.member().map(convert_member).ok_or_else(|| {
                StoreError::Backend(format!(
                    "etcd added a member for {peer_url} but did not return it"
                ))
            }),
            // Someone else added it between our list and our add (a
            // concurrent retry): that member is the answer.
            Err(e) if status_contains(&e, PEER_URL_EXISTS) => {
                self.member_with_peer_url(peer_url).await?.ok_or_else(|| {
                    StoreError::Backend(format!(
                        "etcd says a member with peer URL {peer_url} exists, but does not list it"
                    ))
                })
            }
            // Seen right after a learner that etcd had been asked to promote
            // was removed: etcd is still settling that change; the same call
            // succeeds a moment later.
            Err(e) if is_member_not_found(&e) => Err(StoreError::Unavailable(format!(
                "etcd is still applying an earlier membership change ({e}); retry shortly"
            ))),
            Err(e) => Err(match map_member_err(e) {
                StoreError::Invalid(msg) => {
                    StoreError::Invalid(format!("cannot add etcd learner {peer_url:?}: {msg}"))
                }
                other => other,
            }),
        }
    }

    async fn promote(&self, id: u64) -> Result<bool, StoreError> {
        match bounded("MemberPromote", self.client().member_promote(id)).await? {
            Ok(_) => Ok(true),
            // etcd checks "in sync" before "is a learner", also for voters: a
            // voter a few entries behind (just promoted, or down) gets this
            // too. Checked before NOT_LEARNER, which is a prefix of it.
            Err(e) if status_contains(&e, LEARNER_NOT_READY) => Ok(self
                .members()
                .await?
                .iter()
                .any(|m| m.id == id && !m.is_learner)),
            Err(e) if status_contains(&e, NOT_LEARNER) => Ok(true),
            Err(e) if is_member_not_found(&e) => Err(StoreError::Invalid(format!(
                "cannot promote etcd member {id:x}: there is no such member"
            ))),
            Err(e) => Err(map_member_err(e)),
        }
    }

    async fn remove(&self, id: u64) -> Result<(), StoreError> {
        match bounded("MemberRemove", self.client().member_remove(id)).await? {
            Ok(_) => Ok(()),
            // Also etcd's answer for a member removed earlier.
            Err(e) if is_member_not_found(&e) => Ok(()),
            Err(e) => Err(map_member_err(e)),
        }
    }

    async fn status(&self) -> Result<ConsensusStatus, StoreError> {
        let resp = bounded("Status", self.client().status())
            .await?
            .map_err(map_member_err)?;
        let header = resp
            .header()
            .ok_or_else(|| StoreError::Backend("etcd status response without a header".into()))?;
        Ok(ConsensusStatus {
            member_id: header.member_id(),
            leader_id: resp.leader(),
            raft_term: resp.raft_term(),
            revision: header.revision(),
            db_size_bytes: resp.db_size(),
        })
    }

    async fn move_leader(&self, to: u64) -> Result<(), StoreError> {
        bounded("MoveLeader", self.client().move_leader(to))
            .await?
            .map(|_| ())
            .map_err(map_member_err)
    }
}

impl EtcdStore {
    async fn member_with_peer_url(&self, peer_url: &str) -> Result<Option<Member>, StoreError> {
        // etcd keeps peer URLs unique across members, so at most one matches.
        Ok(self
            .members()
            .await?
            .into_iter()
            .find(|m| m.peer_urls.iter().any(|u| u == peer_url)))
    }
}

fn convert_member(m: &etcd_client::Member) -> Member {
    Member {
        id: m.id(),
        name: m.name().to_string(),
        peer_urls: m.peer_urls().to_vec(),
        is_learner: m.is_learner(),
    }
}

fn status_contains(e: &etcd_client::Error, needle: &str) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.message().to_ascii_lowercase().contains(needle))
}

/// etcd's `ErrMemberNotFound` (also returned for removed members).
fn is_member_not_found(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.code() == Code::NotFound && s.message().contains("member not found"))
}

/// [`map_err`], with etcd's refusals of membership changes explained.
fn map_member_err(e: etcd_client::Error) -> StoreError {
    if status_contains(&e, TOO_MANY_LEARNERS) {
        return StoreError::FailedPrecondition(
            "etcd refuses another learner while one is still catching up: wait until the existing \
             learner has been promoted (or remove it), then retry"
                .into(),
        );
    }
    if status_contains(&e, NOT_ENOUGH_STARTED) {
        return StoreError::FailedPrecondition(
            "etcd refuses the membership change because too few members are running to keep a \
             quorum afterwards: start the stopped members (or remove members that are gone for \
             good), then retry"
                .into(),
        );
    }
    map_err(e)
}

/// An error with its sources, since tonic's transport errors say only
/// "transport error" at the top. Some layers repeat their source's text;
/// that is said once.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// State of one watch stream.
struct Watcher {
    stream: etcd_client::WatchStream,
    requested: i64,
    pending: VecDeque<Result<WatchEvent, StoreError>>,
    finished: bool,
}

impl Watcher {
    /// Reads responses until etcd confirms the watch. Anything that arrives
    /// before (or with) the confirmation is queued for the stream.
    async fn wait_created(&mut self) -> Result<(), StoreError> {
        loop {
            let resp = match self.stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    return Err(StoreError::Unavailable(
                        "etcd closed the watch stream before confirming the watch".into(),
                    ));
                }
                Err(e) => return Err(map_err(e)),
            };
            let created = resp.0.created;
            self.absorb(resp.0);
            if created || self.finished {
                return Ok(());
            }
        }
    }

    async fn step(mut self) -> Option<(Result<WatchEvent, StoreError>, Self)> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some((item, self));
            }
            if self.finished {
                return None;
            }
            match self.stream.message().await {
                Ok(Some(resp)) => self.absorb(resp.0),
                Ok(None) => self.fail(StoreError::Unavailable(
                    "etcd closed the watch stream".into(),
                )),
                Err(e) => self.fail(map_err(e)),
            }
        }
    }

    fn absorb(&mut self, resp: etcd_client::proto::PbWatchResponse) {
        for event in resp.events {
            let kind = match event.r#type {
                0 => EventKind::Put,
                1 => EventKind::Delete,
                other => {
                    self.fail(StoreError::Backend(format!(
                        "etcd sent a watch event of unknown type {other}"
                    )));
                    return;
                }
            };
            let Some(kv) = event.kv else {
                self.fail(StoreError::Backend(
                    "etcd sent a watch event without a key".into(),
                ));
                return;
            };
            let mut kv = convert_kv(kv);
            if kind == EventKind::Delete {
                // etcd already sends key + mod_revision (the delete's
                // revision) and zeroes the rest; make that explicit.
                kv.value.clear();
                kv.create_revision = 0;
                kv.version = 0;
                kv.lease = 0;
            }
            self.pending.push_back(Ok(WatchEvent { kind, kv }));
        }
        if resp.compact_revision != 0 {
            self.fail(StoreError::Compacted {
                requested: self.requested,
                oldest: resp.compact_revision,
            });
        } else if resp.canceled {
            let reason = if resp.cancel_reason.is_empty() {
                "no reason given".to_string()
            } else {
                resp.cancel_reason
            };
            self.fail(StoreError::Backend(format!(
                "etcd cancelled the watch: {reason}"
            )));
        }
    }

    fn fail(&mut self, error: StoreError) {
        self.pending.push_back(Err(error));
        self.finished = true;
    }
}

/// `[key, range_end)` covering every key that starts with `prefix`.
pub(crate) fn prefix_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    if prefix.is_empty() {
        // etcd: key "\0" with range_end "\0" is every key.
        return (vec![0], vec![0]);
    }
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return (prefix.to_vec(), end);
        }
    }
    // All 0xff: no successor, range_end "\0" means "to the end".
    (prefix.to_vec(), vec![0])
}

pub(crate) fn convert_kv(kv: PbKeyValue) -> KeyValue {
    KeyValue {
        key: kv.key,
        value: kv.value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        lease: kv.lease,
    }
}

fn convert_compare(c: Compare) -> etcd_client::Compare {
    let op = match c.op {
        CompareOp::Equal => etcd_client::CompareOp::Equal,
        CompareOp::NotEqual => etcd_client::CompareOp::NotEqual,
        CompareOp::Greater => etcd_client::CompareOp::Greater,
        CompareOp::Less => etcd_client::CompareOp::Less,
    };
    let key = c.key;
    match c.target {
        // etcd fails a value compare on a missing key whatever the operator,
        // which is what the trait specifies.
        CompareTarget::Value(v) => etcd_client::Compare::value(key, op, v),
        CompareTarget::CreateRevision(r) => etcd_client::Compare::create_revision(key, op, r),
        CompareTarget::ModRevision(r) => etcd_client::Compare::mod_revision(key, op, r),
        CompareTarget::Version(v) => etcd_client::Compare::version(key, op, v),
    }
}

fn convert_op(op: Op) -> etcd_client::TxnOp {
    match op {
        Op::Put { key, value, lease } => {
            let options = (lease != 0).then(|| PutOptions::new().with_lease(lease));
            etcd_client::TxnOp::put(key, value, options)
        }
        Op::Delete { key } => etcd_client::TxnOp::delete(key, None),
        Op::DeletePrefix { prefix } => {
            let (key, end) = prefix_range(&prefix);
            etcd_client::TxnOp::delete(key, Some(DeleteOptions::new().with_range(end)))
        }
        Op::Get { key } => etcd_client::TxnOp::get(key, None),
        Op::GetPrefix { prefix } => {
            let (key, end) = prefix_range(&prefix);
            etcd_client::TxnOp::get(key, Some(GetOptions::new().with_range(end)))
        }
    }
}

fn validate_txn(txn: &Txn) -> Result<(), StoreError> {
    for c in &txn.compares {
        if c.key.is_empty() {
            return Err(StoreError::Invalid("empty key in compare".into()));
        }
    }
    for op in txn.success.iter().chain(&txn.failure) {
        match op {
            Op::Put { key, .. } | Op::Delete { key } | Op::Get { key } if key.is_empty() => {
                return Err(StoreError::Invalid("empty key".into()));
            }
            _ => {}
        }
    }
    Ok(())
}

pub(crate) fn header_revision(
    header: Option<&etcd_client::proto::PbResponseHeader>,
) -> Result<i64, StoreError> {
    header
        .map(|h| h.revision)
        .ok_or_else(|| StoreError::Backend("etcd response without a header".into()))
}

/// etcd's `ErrLeaseNotFound` ("etcdserver: requested lease not found").
fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.code() == Code::NotFound && s.message().contains("lease not found"))
}

/// Connection problems become [`StoreError::Unavailable`], requests etcd
/// rejects as malformed [`StoreError::Invalid`], everything else
/// [`StoreError::Backend`].
/// Messages of raft errors etcd reports with code Unknown that mean "not
/// now", not "never" (raft's ErrProposalDropped).
const TRANSIENT_UNKNOWN: &[&str] = &["raft proposal dropped"];

pub(crate) fn map_err(e: etcd_client::Error) -> StoreError {
    use etcd_client::Error;
    match e {
        Error::TransportError(e) => {
            StoreError::Unavailable(format!("cannot reach etcd: {}", error_chain(&e)))
        }
        Error::IoError(e) => StoreError::Unavailable(format!("I/O error talking to etcd: {e}")),
        Error::GRpcStatus(s) => match s.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                StoreError::Unavailable(format!("etcd is unavailable: {}", s.message()))
            }
            Code::InvalidArgument => {
                StoreError::Invalid(format!("etcd rejected the request: {}", s.message()))
            }
            // etcd passes raft's own transient errors on with code Unknown:
            // the proposal was dropped because leadership is moving (a
            // transfer, an election). Nothing was written; a retry in a
            // moment succeeds, as for Unavailable.
            Code::Unknown if TRANSIENT_UNKNOWN.iter().any(|m| s.message().contains(m)) => {
                StoreError::Unavailable(format!("etcd is unavailable: {}", s.message()))
            }
            code => StoreError::Backend(format!("etcd error ({code:?}): {}", s.message())),
        },
        other => StoreError::Backend(format!("etcd client error: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_election_answers_are_read_again() {
        let status =
            |code, msg: &str| etcd_client::Error::GRpcStatus(tonic::Status::new(code, msg));
        assert!(during_election(&status(
            Code::Unavailable,
            "etcdserver: leader changed"
        )));
        assert!(during_election(&status(
            Code::Unavailable,
            "etcdserver: no leader"
        )));
        assert!(!during_election(&status(
            Code::Unavailable,
            "etcdserver: request timed out"
        )));
        assert!(!during_election(&status(
            Code::Unknown,
            "etcdserver: leader changed"
        )));
    }

    #[test]
    fn a_dropped_raft_proposal_is_unavailable_and_other_unknowns_are_not() {
        let dropped =
            etcd_client::Error::GRpcStatus(tonic::Status::unknown("raft proposal dropped"));
        assert!(matches!(map_err(dropped), StoreError::Unavailable(_)));
        let other =
            etcd_client::Error::GRpcStatus(tonic::Status::unknown("mvcc: database space exceeded"));
        assert!(matches!(map_err(other), StoreError::Backend(_)));
    }

    #[test]
    fn prefix_range_matches_etcd() {
        assert_eq!(prefix_range(b""), (vec![0], vec![0]));
        assert_eq!(prefix_range(b"a/"), (b"a/".to_vec(), b"a0".to_vec()));
        assert_eq!(prefix_range(&[0xfe, 0xff]), (vec![0xfe, 0xff], vec![0xff]));
        assert_eq!(prefix_range(&[0xff, 0xff]), (vec![0xff, 0xff], vec![0]));
    }
}
