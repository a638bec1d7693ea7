//! Curator leadership: which consensus member's curator serves the cluster.
//!
//! A curator runs on every consensus member; exactly one leads. Leadership is
//! a key in the consensus store (`/curator/leader`, naming the leader's node
//! ID and address) attached to a lease: whoever creates the key leads, keeps
//! the lease alive, and loses leadership when it cannot. When the key goes
//! away (the leader stopped, or its lease expired), the others campaign
//! again. The same code runs on the embedded store, where the single curator
//! always wins.
//!
//! Two things keep a deposed leader harmless:
//! - [`LeaderGate`] answers Management, Curator, AAA and ClusterAdmin calls
//!   with UNAVAILABLE naming the leader whenever this curator does not lead.
//! - Every write of cluster state carries a compare on the leader key's
//!   creation revision ([`Fence`], set by [`crate::Cluster::set_fence`]), so
//!   a curator that lost its lease while a write was in flight cannot commit
//!   it. That covers node state and identities; audit records are not
//!   fenced, since they record what happened (including a call that failed
//!   because its curator was deposed) rather than decide anything.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::StreamExt;
use metropolis_api::curator::GetCurrentLeaderResponse;
use metropolis_store::{
    Compare, CompareOp, CompareTarget, EventKind, KeyValue, Op, OpResult, Store, StoreError, Txn,
    TxnResponse,
};
use prost::Message;
use tokio::sync::watch;

use crate::error::CuratorError;

/// The leader key. Its value is a `GetCurrentLeaderResponse` without
/// `this_node_id`.
pub const KEY_LEADER: &str = "/curator/leader";

/// Default lease TTL: a dead leader is replaced within about this long.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(3);

/// The leadership a curator's writes depend on: once set, a write commits
/// only while the leader key created at that revision exists. Unset (no
/// leadership yet, or a test), writes are not fenced.
#[derive(Debug, Default)]
pub struct Fence(std::sync::Mutex<Option<i64>>);

impl Fence {
    pub fn set(&self, key_revision: i64) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(key_revision);
    }

    pub fn get(&self) -> Option<i64> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits `txn` if this curator still leads. A transaction that failed
    /// because the leadership is gone reads as UNAVAILABLE, so callers can
    /// tell it from an ordinary compare failure (which they retry).
    pub async fn commit(&self, store: &dyn Store, txn: Txn) -> Result<TxnResponse, CuratorError> {
        let fence = self.get();
        let txn = match fence {
            Some(rev) => txn.when(Compare {
                key: KEY_LEADER.as_bytes().to_vec(),
                op: CompareOp::Equal,
                target: CompareTarget::CreateRevision(rev),
            }),
            None => txn,
        };
        let resp = store.txn(txn).await?;
        if let (false, Some(rev)) = (resp.succeeded, fence) {
            let held = store
                .get(KEY_LEADER.as_bytes())
                .await?
                .is_some_and(|kv| kv.create_revision == rev);
            if !held {
                return Err(CuratorError::Store(StoreError::Unavailable(
                    "this curator lost the leadership while writing; retry against the new leader"
                        .into(),
                )));
            }
        }
        Ok(resp)
    }
}

/// A leader's request to hand leadership to another consensus member: the
/// leading curator cannot remove its own etcd member (its store would stop
/// serving halfway through), so it steps down and abstains for a while, and
/// the member that takes over does the removal when the caller retries.
#[derive(Debug, Default)]
pub struct StepDown {
    until: std::sync::Mutex<Option<Instant>>,
    requested: tokio::sync::Notify,
}

impl StepDown {
    /// Stops leading (if this curator leads) and does not campaign for
    /// `abstain`.
    pub fn request(&self, abstain: Duration) {
        *self.until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + abstain);
        // notify_one keeps a permit if the holder is between two waits.
        self.requested.notify_one();
    }

    /// Whether this curator stays out of elections right now.
    pub fn abstaining(&self) -> bool {
        self.remaining().is_some()
    }

    /// How much longer this curator abstains from campaigning.
    fn remaining(&self) -> Option<Duration> {
        let until = (*self.until.lock().unwrap_or_else(|p| p.into_inner()))?;
        until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    }
}

/// Where a curator can be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderInfo {
    pub node_id: String,
    pub host: String,
    pub port: u16,
}

impl LeaderInfo {
    fn encode(&self) -> Vec<u8> {
        GetCurrentLeaderResponse {
            leader_node_id: self.node_id.clone(),
            leader_host: self.host.clone(),
            leader_port: i32::from(self.port),
            this_node_id: String::new(),
        }
        .encode_to_vec()
    }

    fn decode(bytes: &[u8]) -> Option<LeaderInfo> {
        let m = GetCurrentLeaderResponse::decode(bytes).ok()?;
        Some(LeaderInfo {
            node_id: m.leader_node_id,
            host: m.leader_host,
            port: u16::try_from(m.leader_port).ok()?,
        })
    }
}

/// This curator's view of leadership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leadership {
    /// Campaigning, or the store is unreachable.
    Unknown,
    /// This curator leads; its leader key was created at `key_revision`.
    Leading { key_revision: i64 },
    /// Another curator leads.
    Following(LeaderInfo),
}

impl Leadership {
    pub fn is_leading(&self) -> bool {
        matches!(self, Leadership::Leading { .. })
    }

    /// The CuratorLocal.GetCurrentLeader answer for this view.
    pub fn to_response(&self, me: &LeaderInfo) -> GetCurrentLeaderResponse {
        let leader = match self {
            Leadership::Unknown => None,
            Leadership::Leading { .. } => Some(me),
            Leadership::Following(l) => Some(l),
        };
        GetCurrentLeaderResponse {
            leader_node_id: leader.map(|l| l.node_id.clone()).unwrap_or_default(),
            leader_host: leader.map(|l| l.host.clone()).unwrap_or_default(),
            leader_port: leader.map(|l| i32::from(l.port)).unwrap_or_default(),
            this_node_id: me.node_id.clone(),
        }
    }
}

/// Campaigns for leadership until the returned task is aborted; the receiver
/// follows this curator's view.
pub fn campaign(
    store: Arc<dyn Store>,
    me: LeaderInfo,
    ttl: Duration,
    step_down: Arc<StepDown>,
) -> (watch::Receiver<Leadership>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(Leadership::Unknown);
    let election = Election {
        store,
        me,
        ttl,
        tx,
        step_down,
    };
    let task = election_runtime().spawn(async move { election.run().await });
    (rx, task)
}

/// The runtime elections run on: one thread of their own. On the node's main
/// runtime, a burst of work (thousands of nodes connecting at once: TLS
/// handshakes, registrations) delayed lease renewals until the leader gave
/// up its lease, which ended every heartbeat stream and brought on the next
/// burst. Renewing is a few microseconds of work every `ttl / 6` and must
/// not wait behind anything. (On etcd the renewal still goes through the
/// etcd client's connection, which the main runtime drives; the embedded
/// store's renewal is in memory, so there it waits for nothing.)
fn election_runtime() -> &'static tokio::runtime::Handle {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("curator-election")
                .enable_all()
                .build()
                // Without a thread the node cannot run at all; it is
                // started before any port opens.
                .expect("cannot start the curator election's thread")
        })
        .handle()
}

struct Election {
    store: Arc<dyn Store>,
    me: LeaderInfo,
    ttl: Duration,
    tx: watch::Sender<Leadership>,
    step_down: Arc<StepDown>,
}

impl Election {
    async fn run(self) {
        let mut failures = 0u32;
        loop {
            match self.round().await {
                Ok(()) => failures = 0,
                Err(e) => {
                    self.set(Leadership::Unknown);
                    failures = failures.saturating_add(1);
                    // Capped backoff: the store may be restarting or without
                    // quorum; campaigning in a tight loop would only add load.
                    let wait = Duration::from_millis(100 << failures.min(5)).min(self.ttl);
                    tracing::warn!(error = %e, retry_in = ?wait, "leader election: store error");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    fn set(&self, l: Leadership) {
        self.tx.send_if_modified(|cur| {
            if *cur == l {
                false
            } else {
                match &l {
                    Leadership::Leading { .. } => tracing::info!("this curator is now the leader"),
                    Leadership::Following(info) => {
                        tracing::info!(leader = %info.node_id, host = %info.host, "following the curator leader")
                    }
                    Leadership::Unknown => tracing::info!("no curator leader known; campaigning"),
                }
                *cur = l;
                true
            }
        });
    }

    /// One campaign: lead until the lease is lost, or follow until the
    /// leader key goes away.
    async fn round(&self) -> Result<(), StoreError> {
        let key = KEY_LEADER.as_bytes();
        if let Some(left) = self.step_down.remaining() {
            // Abstaining: follow whoever leads, without claiming.
            let Some(kv) = self.store.get(key).await? else {
                self.set(Leadership::Unknown);
                tokio::time::sleep(left.min(Duration::from_millis(100))).await;
                return Ok(());
            };
            return self.follow(kv).await;
        }
        // The lease lives at least a TTL from here (etcd starts counting when
        // it grants it, later than this).
        let granted = Instant::now();
        let lease = self.store.grant_lease(self.ttl).await?;
        let claim = Txn::new()
            .when(Compare::absent(key))
            .and_then(Op::Put {
                key: key.to_vec(),
                value: self.me.encode(),
                lease,
            })
            .or_else(Op::get(key));
        let resp = match self.store.txn(claim).await {
            Ok(r) => r,
            Err(e) => {
                let _ = self.store.revoke_lease(lease).await;
                return Err(e);
            }
        };
        if resp.succeeded {
            self.set(Leadership::Leading {
                key_revision: resp.revision,
            });
            self.hold(lease, granted).await;
            self.set(Leadership::Unknown);
            // Best effort: if the store is reachable, let the others take
            // over now rather than after the TTL.
            let _ = self.store.revoke_lease(lease).await;
            return Ok(());
        }
        let _ = self.store.revoke_lease(lease).await;
        let current = resp.results.into_iter().find_map(|r| match r {
            OpResult::Get(kvs) => kvs.into_iter().next(),
            _ => None,
        });
        let Some(kv) = current else {
            // Gone between the compare and now: campaign again.
            return Ok(());
        };
        match LeaderInfo::decode(&kv.value) {
            Some(info) if info.node_id == self.me.node_id => {
                // A claim of this node's previous life (one process per node
                // ID: it is dead, or it would hold our ports). Drop it rather
                // than wait out its lease.
                tracing::info!("removing the leader claim of this node's previous run");
                self.store
                    .txn(
                        Txn::new()
                            .when(Compare::mod_revision(key, kv.mod_revision))
                            .and_then(Op::delete(key)),
                    )
                    .await?;
                Ok(())
            }
            _ => self.follow(kv).await,
        }
    }

    /// Follows the leader named by `kv` until its key goes away.
    ///
    /// Meanwhile it knocks on the leader's curator port: a leader whose port
    /// refuses connections has no process listening any more (node and
    /// curator share one process, and the election ends before the port
    /// closes), so its lease is revoked rather than waited out, and the
    /// followers campaign at once. A leader that does not answer at all (a
    /// dead machine, a partition) is waited out: only its lease ending says
    /// it no longer leads.
    async fn follow(&self, kv: KeyValue) -> Result<(), StoreError> {
        let key = KEY_LEADER.as_bytes();
        let mut leader = match LeaderInfo::decode(&kv.value) {
            // This curator's own claim, while it abstains: it goes with the
            // lease.
            Some(info) if info.node_id == self.me.node_id => {
                self.set(Leadership::Unknown);
                None
            }
            Some(info) => {
                self.set(Leadership::Following(info.clone()));
                Some((info, kv.lease))
            }
            None => {
                tracing::warn!("unreadable leader key; waiting for it to expire");
                None
            }
        };
        let mut watch = self.store.watch(key, kv.mod_revision + 1).await?;
        loop {
            let gone = async {
                match &leader {
                    Some((info, _)) => refuses_connections(info).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = watch.next() => {
                    let Some(ev) = ev else { break };
                    let ev = ev?;
                    if ev.kv.key != key {
                        continue;
                    }
                    match ev.kind {
                        EventKind::Delete => return Ok(()),
                        EventKind::Put => {
                            if let Some(info) = LeaderInfo::decode(&ev.kv.value) {
                                self.set(Leadership::Following(info.clone()));
                                leader = (info.node_id != self.me.node_id)
                                    .then_some((info, ev.kv.lease));
                            }
                        }
                    }
                }
                () = gone => {
                    if let Some((info, lease)) = leader.take() {
                        tracing::info!(
                            leader = %info.node_id,
                            "the curator leader's port refuses connections: its process is gone; \
                             revoking its lease"
                        );
                        match self.store.revoke_lease(lease).await {
                            // Gone already: the watch shows the delete.
                            Ok(()) | Err(StoreError::LeaseNotFound(_)) => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
        }
        Err(StoreError::Unavailable("the leader watch ended".into()))
    }

    /// Keeps the lease alive; returns when leadership is lost: the lease is
    /// gone, or it could not be renewed for so long that it may expire soon.
    ///
    /// A keep-alive sent at `t` that succeeds keeps the lease until at least
    /// `t` + TTL (etcd receives it later). Renewing six times per TTL and
    /// giving up one renewal interval before that bound lets a renewal
    /// fail for most of a TTL (an etcd election elsewhere takes about a
    /// second) while no other curator can have taken over yet.
    async fn hold(&self, lease: i64, granted: Instant) {
        let interval = self.ttl / 6;
        let mut renewed = granted;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.step_down.requested.notified() => {
                    if self.step_down.remaining().is_some() {
                        tracing::info!("stepping down as the curator leader on request");
                        return;
                    }
                    continue;
                }
            }
            let sent = Instant::now();
            let give_up = renewed + self.ttl.saturating_sub(interval);
            let Some(left) = give_up
                .checked_duration_since(sent)
                .filter(|d| !d.is_zero())
            else {
                tracing::warn!("cannot renew the leader lease in time; stepping down");
                return;
            };
            match tokio::time::timeout(left, self.store.keep_alive(lease)).await {
                Ok(Ok(())) => renewed = sent,
                Ok(Err(StoreError::LeaseNotFound(_))) => {
                    tracing::warn!("the leader lease expired; stepping down");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "leader lease renewal failed; retrying");
                }
                Err(_) => {
                    // Step down before the lease can have expired, so two
                    // curators never both believe they lead.
                    tracing::warn!(
                        waited = ?left,
                        "cannot renew the leader lease; stepping down"
                    );
                    return;
                }
            }
        }
    }
}

/// How often a follower knocks on the leader's curator port ...
const KNOCK_INTERVAL: Duration = Duration::from_millis(150);
/// ... and after how many refusals in a row it takes the leader for gone.
const REFUSALS: u32 = 3;

/// Returns once `leader`'s curator port has refused TCP connections
/// [`REFUSALS`] times in a row (nothing listens there); never for a port that
/// accepts, or does not answer.
async fn refuses_connections(leader: &LeaderInfo) {
    let mut refused = 0;
    loop {
        tokio::time::sleep(KNOCK_INTERVAL).await;
        let connect = tokio::net::TcpStream::connect((leader.host.as_str(), leader.port));
        match tokio::time::timeout(Duration::from_secs(1), connect).await {
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
            _ => refused = 0,
        }
        if refused >= REFUSALS {
            return;
        }
    }
}

/// Services only the leader serves (every curator service but CuratorLocal).
const GATED: &[&str] = &[
    "/metropolis.proto.api.AAA/",
    "/metropolis.proto.api.Management/",
    "/metropolis.proto.admin.ClusterAdmin/",
    "/metropolis.node.core.curator.proto.api.Curator/",
];

/// A tower layer that lets calls to the curator services through only while
/// this curator leads; otherwise they get UNAVAILABLE naming the leader, so
/// clients can retry there.
#[derive(Clone)]
pub struct LeaderGate {
    leadership: watch::Receiver<Leadership>,
    node_id: Arc<str>,
}

impl LeaderGate {
    pub fn new(leadership: watch::Receiver<Leadership>, node_id: &str) -> Self {
        LeaderGate {
            leadership,
            node_id: node_id.into(),
        }
    }

    /// Why a call cannot be served here, or None when this curator leads.
    fn refusal(&self, path: &str) -> Option<tonic::Status> {
        if !GATED.iter().any(|p| path.starts_with(p)) {
            return None;
        }
        // The election ended (its curator stopped): whatever it last said,
        // this curator leads no more. Connections that outlive their server
        // (a stream in flight at a shutdown) must not reach a stopped one.
        if self.leadership.has_changed().is_err() {
            return Some(tonic::Status::unavailable(format!(
                "node {}'s curator has stopped; reconnect to the cluster to find the leader",
                self.node_id
            )));
        }
        let msg = match &*self.leadership.borrow() {
            Leadership::Leading { .. } => return None,
            Leadership::Following(l) => format!(
                "node {} is not the curator leader; the leader is node {} at {}:{}",
                self.node_id, l.node_id, l.host, l.port
            ),
            Leadership::Unknown => format!(
                "node {} knows no curator leader right now (an election is in progress, or the \
                 consensus store is unreachable); retry shortly",
                self.node_id
            ),
        };
        Some(tonic::Status::unavailable(msg))
    }
}

impl<S> tower::Layer<S> for LeaderGate {
    type Service = Gated<S>;

    fn layer(&self, inner: S) -> Gated<S> {
        Gated {
            gate: self.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct Gated<S> {
    gate: LeaderGate,
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for Gated<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        futures::future::Either<std::future::Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match self.gate.refusal(req.uri().path()) {
            Some(status) => {
                futures::future::Either::Left(std::future::ready(Ok(status.into_http())))
            }
            None => futures::future::Either::Right(self.inner.call(req)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A curator that listens on a port (followers knock on it), kept open
    /// while the returned listener lives.
    fn me(n: &str) -> LeaderInfo {
        use std::sync::OnceLock;
        // One listening port for every live curator of these tests.
        static LISTENER: OnceLock<std::net::TcpListener> = OnceLock::new();
        let l =
            LISTENER.get_or_init(|| std::net::TcpListener::bind("127.0.0.1:0").expect("listen"));
        LeaderInfo {
            node_id: n.into(),
            host: "127.0.0.1".into(),
            port: l.local_addr().expect("address").port(),
        }
    }

    /// A curator whose port nothing listens on (its process is gone).
    fn dead(n: &str) -> LeaderInfo {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        LeaderInfo {
            node_id: n.into(),
            host: "127.0.0.1".into(),
            port,
        }
    }

    async fn wait_for(
        rx: &mut watch::Receiver<Leadership>,
        f: impl Fn(&Leadership) -> bool,
    ) -> Leadership {
        tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|l| f(l)))
            .await
            .expect("leadership did not change in time")
            .expect("election ended")
            .clone()
    }

    #[tokio::test]
    async fn one_leader_and_takeover_after_the_leader_stops() {
        let (_dir, store, _) = crate::state::test_support::store().await;
        let ttl = Duration::from_secs(1);
        let (mut a, task_a) = campaign(store.clone(), me("a"), ttl, Default::default());
        wait_for(&mut a, Leadership::is_leading).await;
        let (mut b, task_b) = campaign(store.clone(), me("b"), ttl, Default::default());
        let seen = wait_for(&mut b, |l| matches!(l, Leadership::Following(_))).await;
        assert_eq!(seen, Leadership::Following(me("a")));
        // The leader dies without a word: its lease expires, b takes over.
        task_a.abort();
        wait_for(&mut b, Leadership::is_leading).await;
        task_b.abort();
    }

    #[tokio::test]
    async fn a_leader_whose_port_refuses_connections_is_not_waited_out() {
        let (_dir, store, _) = crate::state::test_support::store().await;
        // Far longer than the test's patience: only the knock can explain
        // a takeover.
        let ttl = Duration::from_secs(60);
        let gone = dead("a");
        let (mut a, task_a) = campaign(store.clone(), gone.clone(), ttl, Default::default());
        wait_for(&mut a, Leadership::is_leading).await;
        // Its process dies without a word (its lease lives on).
        task_a.abort();
        let (mut b, task_b) = campaign(store.clone(), me("b"), ttl, Default::default());
        let started = Instant::now();
        wait_for(&mut b, Leadership::is_leading).await;
        assert!(started.elapsed() < ttl / 2);
        // While b's own port accepts, c keeps following it.
        let (mut c, task_c) = campaign(store, me("c"), ttl, Default::default());
        wait_for(&mut c, |l| matches!(l, Leadership::Following(_))).await;
        tokio::time::sleep(KNOCK_INTERVAL * (REFUSALS + 2)).await;
        assert_eq!(*c.borrow(), Leadership::Following(me("b")));
        task_b.abort();
        task_c.abort();
    }

    #[tokio::test]
    async fn a_leader_that_steps_down_hands_over_and_abstains() {
        let (_dir, store, _) = crate::state::test_support::store().await;
        // Long enough that only a handover (not an expiry) can explain b
        // leading within the test's timeout.
        let ttl = Duration::from_secs(60);
        let step_down = Arc::new(StepDown::default());
        let (mut a, task_a) = campaign(store.clone(), me("a"), ttl, step_down.clone());
        wait_for(&mut a, Leadership::is_leading).await;
        let (mut b, task_b) = campaign(store.clone(), me("b"), ttl, Default::default());
        wait_for(&mut b, |l| matches!(l, Leadership::Following(_))).await;

        step_down.request(Duration::from_millis(500));
        wait_for(&mut b, Leadership::is_leading).await;
        let seen = wait_for(&mut a, |l| matches!(l, Leadership::Following(_))).await;
        assert_eq!(seen, Leadership::Following(me("b")));

        // Abstaining ends, but a leader is there: a keeps following, and
        // takes over once b is gone.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(*a.borrow(), Leadership::Following(me("b")));
        task_b.abort();
        store
            .txn(Txn::new().and_then(Op::delete(KEY_LEADER)))
            .await
            .expect("remove b's claim");
        wait_for(&mut a, Leadership::is_leading).await;
        task_a.abort();
    }

    #[tokio::test]
    async fn a_restarted_node_reclaims_its_own_stale_claim() {
        let (_dir, store, _) = crate::state::test_support::store().await;
        // A long TTL: waiting it out would fail the test's timeout.
        let ttl = Duration::from_secs(60);
        let (mut first, task) = campaign(store.clone(), me("a"), ttl, Default::default());
        wait_for(&mut first, Leadership::is_leading).await;
        task.abort();
        let (mut again, task) = campaign(store, me("a"), ttl, Default::default());
        wait_for(&mut again, Leadership::is_leading).await;
        task.abort();
    }

    #[test]
    fn gate_passes_curator_local_and_refuses_the_rest_when_following() {
        let (tx, rx) = watch::channel(Leadership::Following(me("b")));
        let gate = LeaderGate::new(rx, "a");
        assert!(
            gate.refusal("/metropolis.node.core.curator.proto.api.CuratorLocal/GetCurrentLeader")
                .is_none()
        );
        let s = gate
            .refusal("/metropolis.proto.api.Management/GetNodes")
            .expect("refused");
        assert_eq!(s.code(), tonic::Code::Unavailable);
        let b = me("b");
        assert!(
            s.message()
                .contains(&format!("node b at {}:{}", b.host, b.port)),
            "{}",
            s.message()
        );
        tx.send_replace(Leadership::Leading { key_revision: 1 });
        assert!(
            gate.refusal("/metropolis.proto.api.Management/GetNodes")
                .is_none()
        );
        // An election that ended leaves no leader behind, whatever it said.
        drop(tx);
        assert!(
            gate.refusal("/metropolis.proto.api.Management/GetNodes")
                .is_some_and(|s| s.code() == tonic::Code::Unavailable)
        );
    }
}
