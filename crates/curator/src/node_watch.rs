//! NodeWatch.WatchNodes: the operator's live view of the nodes, as
//! Management.GetNodes shows them, then every change.
//!
//! Changes come from two places: the store (records: state, roles, labels,
//! status; deletions), through the same revision-exact snapshot-and-watch as
//! Curator.Watch ([`crate::watch::records_and_changes`]), and the heartbeat
//! bookkeeping (health, which lives in memory, see
//! [`crate::heartbeat::HealthChange`]). Each watcher keeps every record of
//! the cluster and which nodes it has shown with which health, so that a
//! health change or a record change can bring a node into the filtered
//! view, take it out, or be dropped as no change at all.
//!
//! One task per watcher converts and filters; its output waits in a bounded
//! outbox. A watcher that does not keep up is cut with RESOURCE_EXHAUSTED:
//! the curator never waits for a client and never buffers without bound.
//! When this curator stops leading, every watch ends with UNAVAILABLE, and
//! the client watches again at the new leader (fresh snapshot).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::{Stream, StreamExt};
use metropolis_api::admin::{
    NodeRemoved, WatchNodesEvent, WatchNodesRequest, node_removed::Reason,
    node_watch_server::NodeWatch, watch_nodes_event::Kind,
};
use metropolis_api::api::Node;
use metropolis_store::{EventKind, WatchStream};
use prost::Message;
use tokio::sync::{broadcast, mpsc, watch};
use tonic::{Request, Response, Status};

use crate::CuratorError;
use crate::heartbeat::{HealthChange, Heartbeats};
use crate::leader::Leadership;
use crate::management::NodeView;
use crate::state::{Cluster, NODES_PREFIX, NodeEntry};
use crate::watch::{MAX_EVENT_BYTES, node_id_of_key, records_and_changes, split_under};

/// Events a watcher may have pending before it is cut.
pub const WATCHER_EVENTS: usize = 1024;
/// Encoded bytes a watcher may have pending before it is cut (about eight
/// large snapshot events).
pub const WATCHER_BYTES: usize = 16 * 1024 * 1024;

pub struct NodeWatchService {
    cluster: Arc<Cluster>,
    heartbeats: Arc<Heartbeats>,
    leadership: watch::Receiver<Leadership>,
    /// This curator's node, named in snapshots.
    node_id: String,
}

impl NodeWatchService {
    pub fn new(
        cluster: Arc<Cluster>,
        heartbeats: Arc<Heartbeats>,
        leadership: watch::Receiver<Leadership>,
        node_id: String,
    ) -> Self {
        NodeWatchService {
            cluster,
            heartbeats,
            leadership,
            node_id,
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<WatchNodesEvent, Status>> + Send>>;

#[tonic::async_trait]
impl NodeWatch for NodeWatchService {
    type WatchNodesStream = EventStream;

    async fn watch_nodes(
        &self,
        request: Request<WatchNodesRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let view = NodeView::new(&request.into_inner().filter)?;
        let stream = watch_nodes(
            &self.cluster,
            self.heartbeats.clone(),
            view,
            self.leadership.clone(),
            &self.node_id,
            Limits::default(),
        )
        .await?;
        Ok(Response::new(stream))
    }
}

/// How much a watcher may have pending.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub events: usize,
    pub bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            events: WATCHER_EVENTS,
            bytes: WATCHER_BYTES,
        }
    }
}

/// The stream of one watch: the snapshot, then changes from a task of its
/// own until the client goes away, falls behind, or this curator stops
/// leading.
pub async fn watch_nodes(
    cluster: &Cluster,
    heartbeats: Arc<Heartbeats>,
    view: NodeView,
    mut leadership: watch::Receiver<Leadership>,
    node_id: &str,
    limits: Limits,
) -> Result<EventStream, Status> {
    // Subscribed before the snapshot: a change of health between the
    // snapshot's health and the first event is not lost (at worst seen as
    // no change).
    let health = heartbeats.subscribe_changes();
    let (range, changes) = records_and_changes(cluster.store(), NODES_PREFIX).await?;
    let mut state = WatchState::new(view, range.revision);
    let now = Instant::now();
    let mut nodes = Vec::new();
    for kv in &range.kvs {
        let entry = NodeEntry::from_kv(kv)?;
        if let Some(node) = state.record(entry, &heartbeats, now)? {
            nodes.push(node);
        }
    }
    let template = WatchNodesEvent {
        kind: Kind::SnapshotDone as i32,
        revision: range.revision,
        leader_node_id: node_id.to_string(),
        ..Default::default()
    };
    let parts = split_under(nodes, MAX_EVENT_BYTES, template.encoded_len());
    let count = parts.len();
    let snapshot: Vec<Result<WatchNodesEvent, Status>> = parts
        .into_iter()
        .enumerate()
        .map(|(i, nodes)| {
            Ok(WatchNodesEvent {
                kind: if i + 1 == count {
                    Kind::SnapshotDone
                } else {
                    Kind::Snapshot
                } as i32,
                nodes,
                ..template.clone()
            })
        })
        .collect();

    // A deposed curator's watch would go on showing its own, meaningless
    // view of health: end it as soon as leadership moves.
    leadership.mark_changed();
    let (outbox, inbox) = outbox(limits);
    tokio::spawn(async move {
        let why = follow(state, changes, health, leadership, &heartbeats, &outbox).await;
        if let Some(status) = why {
            tracing::debug!(%status, "node watch ended");
            outbox.cut(status);
        }
    });
    Ok(Box::pin(futures::stream::iter(snapshot).chain(inbox)))
}

/// Feeds the outbox until something ends the watch; returns why (None: the
/// client went away).
async fn follow(
    mut state: WatchState,
    mut changes: WatchStream,
    mut health: broadcast::Receiver<HealthChange>,
    mut leadership: watch::Receiver<Leadership>,
    heartbeats: &Heartbeats,
    outbox: &Outbox,
) -> Option<Status> {
    loop {
        let events = tokio::select! {
            () = outbox.closed() => return None,
            led = leadership.changed() => {
                let leading = led.is_ok() && leadership.borrow_and_update().is_leading();
                if leading {
                    continue;
                }
                return Some(Status::unavailable(
                    "this curator stopped leading; watch again at the new leader \
                     for a fresh snapshot",
                ));
            }
            change = changes.next() => match change {
                None => return Some(Status::unavailable(
                    "the store's watch ended; watch again for a fresh snapshot",
                )),
                Some(Err(e)) => return Some(CuratorError::from(e).into()),
                Some(Ok(ev)) => state.store_change(ev, heartbeats, Instant::now()),
            },
            h = health.recv() => match h {
                Ok(HealthChange::Node(id)) => state.health_change(Some(&id), heartbeats, Instant::now()),
                // Missed some: every node's health again.
                Ok(HealthChange::All) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    state.health_change(None, heartbeats, Instant::now())
                }
                Err(broadcast::error::RecvError::Closed) => {
                    return Some(Status::unavailable("the curator is shutting down"));
                }
            },
        };
        match events {
            Ok(events) => {
                for ev in events {
                    if let Err(status) = outbox.push(ev) {
                        return status;
                    }
                }
            }
            Err(status) => return Some(status),
        }
    }
}

/// What one watcher knows: every record (a health change can bring a
/// filtered-out node into view), and which nodes it has shown with which
/// health.
struct WatchState {
    view: NodeView,
    records: HashMap<String, NodeEntry>,
    shown: HashMap<String, i32>,
    revision: i64,
}

impl WatchState {
    fn new(view: NodeView, revision: i64) -> Self {
        WatchState {
            view,
            records: HashMap::new(),
            shown: HashMap::new(),
            revision,
        }
    }

    /// Takes in a record (snapshot or change); the node if it is in view.
    fn record(
        &mut self,
        entry: NodeEntry,
        heartbeats: &Heartbeats,
        now: Instant,
    ) -> Result<Option<Node>, Status> {
        let node = self.view.show(entry.clone(), heartbeats, now, None)?;
        self.records.insert(entry.id.clone(), entry);
        if let Some(n) = &node {
            self.shown.insert(n.id.clone(), n.health);
        }
        Ok(node)
    }

    fn change(&self, nodes: Vec<Node>, removed: Vec<NodeRemoved>) -> Vec<WatchNodesEvent> {
        if nodes.is_empty() && removed.is_empty() {
            return Vec::new();
        }
        let mut events: Vec<WatchNodesEvent> = split_under(nodes, MAX_EVENT_BYTES, 64)
            .into_iter()
            .map(|nodes| WatchNodesEvent {
                kind: Kind::Change as i32,
                nodes,
                revision: self.revision,
                ..Default::default()
            })
            .collect();
        // Removals are a few bytes each: they ride on the last event.
        if let Some(last) = events.last_mut() {
            last.removed = removed;
        }
        events
    }

    fn removal(id: String, reason: Reason) -> NodeRemoved {
        NodeRemoved {
            id,
            reason: reason as i32,
        }
    }

    /// A record changed or was deleted in the store.
    fn store_change(
        &mut self,
        ev: metropolis_store::WatchEvent,
        heartbeats: &Heartbeats,
        now: Instant,
    ) -> Result<Vec<WatchNodesEvent>, Status> {
        self.revision = self.revision.max(ev.kv.mod_revision);
        match ev.kind {
            EventKind::Put => {
                let entry = NodeEntry::from_kv(&ev.kv)?;
                let id = entry.id.clone();
                match self.record(entry, heartbeats, now)? {
                    Some(node) => Ok(self.change(vec![node], vec![])),
                    None => Ok(self.leave(id, Reason::FilteredOut)),
                }
            }
            EventKind::Delete => {
                let id = node_id_of_key(&ev.kv.key);
                self.records.remove(&id);
                Ok(self.leave(id, Reason::Deleted))
            }
        }
    }

    /// The node is no longer in view: a removal if it was.
    fn leave(&mut self, id: String, reason: Reason) -> Vec<WatchNodesEvent> {
        match self.shown.remove(&id) {
            Some(_) => self.change(vec![], vec![Self::removal(id, reason)]),
            None => vec![],
        }
    }

    /// The health of one node (or of every node) may have changed: what
    /// changed in view.
    fn health_change(
        &mut self,
        only: Option<&str>,
        heartbeats: &Heartbeats,
        now: Instant,
    ) -> Result<Vec<WatchNodesEvent>, Status> {
        let ids: Vec<String> = match only {
            Some(id) if self.records.contains_key(id) => vec![id.to_string()],
            // Not (or no longer) a node: nothing to show.
            Some(_) => vec![],
            None => self.records.keys().cloned().collect(),
        };
        let mut nodes = Vec::new();
        let mut removed = Vec::new();
        for id in ids {
            let Some(entry) = self.records.get(&id) else {
                continue;
            };
            match self.view.show(entry.clone(), heartbeats, now, None)? {
                Some(node) => {
                    if self.shown.insert(id, node.health) != Some(node.health) {
                        nodes.push(node);
                    }
                }
                None => {
                    if self.shown.remove(&id).is_some() {
                        removed.push(Self::removal(id, Reason::FilteredOut));
                    }
                }
            }
        }
        Ok(self.change(nodes, removed))
    }
}

/// The producer's end of a watcher's bounded buffer.
struct Outbox {
    tx: mpsc::Sender<WatchNodesEvent>,
    shared: Arc<Pending>,
    limits: Limits,
}

/// What the two ends share: bytes in flight, and why the watch was cut.
#[derive(Default)]
struct Pending {
    bytes: AtomicUsize,
    cut: Mutex<Option<Status>>,
}

impl Outbox {
    /// Queues an event; Err when the watch must end (Some: with that status,
    /// None: the client is gone).
    fn push(&self, ev: WatchNodesEvent) -> Result<(), Option<Status>> {
        let len = ev.encoded_len();
        let behind = || {
            Status::resource_exhausted(format!(
                "this watcher fell behind (more than {} events or {} MiB pending): it reads \
                 too slowly, so the curator ended the watch rather than buffer more; watch \
                 again for a fresh snapshot",
                self.limits.events,
                self.limits.bytes / (1024 * 1024)
            ))
        };
        if self.shared.bytes.load(Ordering::Acquire) + len > self.limits.bytes {
            return Err(Some(behind()));
        }
        match self.tx.try_send(ev) {
            Ok(()) => {
                self.shared.bytes.fetch_add(len, Ordering::AcqRel);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(Some(behind())),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(None),
        }
    }

    /// Ends the watch with `status`: the client sees it next, ahead of
    /// anything still queued.
    fn cut(&self, status: Status) {
        let mut cut = self.shared.cut.lock().unwrap_or_else(|p| p.into_inner());
        cut.get_or_insert(status);
    }

    async fn closed(&self) {
        self.tx.closed().await
    }
}

/// The consumer's end: queued events, unless the watch was cut.
fn outbox(limits: Limits) -> (Outbox, impl Stream<Item = Result<WatchNodesEvent, Status>>) {
    let (tx, rx) = mpsc::channel(limits.events.max(1));
    let shared = Arc::new(Pending::default());
    let out = Outbox {
        tx,
        shared: shared.clone(),
        limits,
    };
    let take_cut = |shared: &Pending| shared.cut.lock().unwrap_or_else(|p| p.into_inner()).take();
    let stream = futures::stream::unfold(Some((rx, shared)), move |st| async move {
        let (mut rx, shared) = st?;
        if let Some(status) = take_cut(&shared) {
            return Some((Err(status), None));
        }
        match rx.recv().await {
            Some(ev) => {
                shared.bytes.fetch_sub(ev.encoded_len(), Ordering::AcqRel);
                Some((Ok(ev), Some((rx, shared))))
            }
            // The producer ended: with a reason, or because the watch
            // cannot go on (the status says).
            None => take_cut(&shared).map(|status| (Err(status), None)),
        }
    });
    (out, stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::test_support::bootstrapped;
    use std::time::Duration;

    async fn next(s: &mut EventStream) -> Result<WatchNodesEvent, Status> {
        tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("an event in time")
            .expect("the stream goes on")
    }

    fn leading() -> (watch::Sender<Leadership>, watch::Receiver<Leadership>) {
        watch::channel(Leadership::Leading { key_revision: 1 })
    }

    #[tokio::test]
    async fn snapshot_then_label_changes_filter_and_deletion() {
        let t = bootstrapped().await;
        let hb = Arc::new(Heartbeats::new(Duration::from_secs(60)));
        let (_lead, rx) = leading();
        let view =
            NodeView::new(r#"node.labels.pairs.exists(p, p.key == "zone")"#).expect("filter");
        let mut s = watch_nodes(&t.cluster, hb.clone(), view, rx, "me", Limits::default())
            .await
            .expect("watch");
        let snap = next(&mut s).await.expect("snapshot");
        assert_eq!(snap.kind, Kind::SnapshotDone as i32);
        assert!(snap.nodes.is_empty(), "no node has a zone yet");
        assert_eq!(snap.leader_node_id, "me");

        // Into view by a label.
        t.cluster
            .update_labels(&t.first_id, vec![("zone".into(), "a".into())], vec![])
            .await
            .expect("label");
        let ev = next(&mut s).await.expect("change");
        assert_eq!(ev.kind, Kind::Change as i32);
        assert_eq!(ev.nodes.len(), 1);
        assert_eq!(ev.nodes[0].id, t.first_id);
        assert!(ev.revision > snap.revision);
        // Out of view by removing it.
        t.cluster
            .update_labels(&t.first_id, vec![], vec!["zone".into()])
            .await
            .expect("unlabel");
        let ev = next(&mut s).await.expect("change");
        assert_eq!(
            ev.removed,
            vec![NodeRemoved {
                id: t.first_id.clone(),
                reason: Reason::FilteredOut as i32
            }]
        );
        // A record deleted from the store (as DeleteNode does): removed as
        // deleted, once; one out of view leaves no trace.
        use metropolis_api::common::{NodeLabels, node_labels::Pair};
        use metropolis_store::{Op, Txn};
        let zoned = metropolis_api::private::Node {
            labels: Some(NodeLabels {
                pairs: vec![Pair {
                    key: "zone".into(),
                    value: "b".into(),
                }],
            }),
            ..Default::default()
        };
        let key = crate::state::node_key("metropolis-0000");
        t.store
            .txn(Txn::new().and_then(Op::put(key.clone(), zoned.encode_to_vec())))
            .await
            .expect("put");
        let ev = next(&mut s).await.expect("new node");
        assert_eq!(ev.nodes[0].id, "metropolis-0000");
        t.store
            .txn(Txn::new().and_then(Op::delete(key)))
            .await
            .expect("delete");
        let ev = next(&mut s).await.expect("deleted");
        assert_eq!(
            ev.removed,
            vec![NodeRemoved {
                id: "metropolis-0000".into(),
                reason: Reason::Deleted as i32
            }]
        );
        assert!(ev.nodes.is_empty());
    }

    #[tokio::test]
    async fn health_transitions_and_leadership_loss() {
        let t = bootstrapped().await;
        let hb = Arc::new(Heartbeats::new(Duration::from_millis(300)));
        hb.start_leading();
        let sweeper = tokio::spawn(hb.clone().report_timeouts());
        let (lead, rx) = leading();
        let view = NodeView::new("").expect("no filter");
        let mut s = watch_nodes(&t.cluster, hb.clone(), view, rx, "me", Limits::default())
            .await
            .expect("watch");
        let snap = next(&mut s).await.expect("snapshot");
        assert_eq!(snap.nodes.len(), 1);
        let health = |ev: &WatchNodesEvent| ev.nodes.first().map(|n| n.health);
        use metropolis_api::api::node::Health;
        assert_eq!(health(&snap), Some(Health::Unknown as i32), "new leader");
        // The first timeout as leader passes without a beat: timed out.
        let ev = next(&mut s).await.expect("timeout");
        assert_eq!(health(&ev), Some(Health::HeartbeatTimeout as i32), "{ev:?}");
        // A beat: healthy again; then silence: timed out again.
        hb.beat(&t.first_id);
        let ev = next(&mut s).await.expect("healthy");
        assert_eq!(health(&ev), Some(Health::Healthy as i32), "{ev:?}");
        let ev = next(&mut s).await.expect("timeout again");
        assert_eq!(health(&ev), Some(Health::HeartbeatTimeout as i32), "{ev:?}");
        let tsh = ev.nodes[0]
            .time_since_heartbeat
            .and_then(|d| Duration::try_from(d).ok())
            .expect("time since heartbeat");
        println!(
            "timeout reported {:?} after the last beat (timeout {:?}, resolution {:?})",
            tsh,
            hb.timeout(),
            hb.timeout_resolution()
        );
        // Leadership moves: the watch ends with UNAVAILABLE.
        lead.send_replace(Leadership::Unknown);
        let err = next(&mut s).await.expect_err("cut");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
        assert!(s.next().await.is_none(), "ended");
        sweeper.abort();
    }

    #[tokio::test]
    async fn a_slow_watcher_is_cut_and_the_curator_goes_on() {
        let t = bootstrapped().await;
        let hb = Arc::new(Heartbeats::new(Duration::from_secs(60)));
        let (_lead, rx) = leading();
        let limits = Limits {
            events: 4,
            bytes: WATCHER_BYTES,
        };
        let view = NodeView::new("").expect("no filter");
        let mut s = watch_nodes(&t.cluster, hb, view, rx, "me", limits)
            .await
            .expect("watch");
        next(&mut s).await.expect("snapshot");
        // Nobody reads while the cluster changes: writes are not held up.
        let started = Instant::now();
        for i in 0..20 {
            t.cluster
                .update_labels(&t.first_id, vec![("n".into(), i.to_string())], vec![])
                .await
                .expect("label");
        }
        println!(
            "20 label writes with a stalled watcher: {:?}",
            started.elapsed()
        );
        // Let the producer reach the limit.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let err = next(&mut s).await.expect_err("cut");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
        assert!(err.message().contains("watch again"), "{err}");
        assert!(s.next().await.is_none(), "ended");
    }

    #[tokio::test]
    async fn a_bad_filter_is_refused_with_the_reason() {
        let err = NodeView::new("node.state ==").err().expect("refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(!err.message().is_empty());
    }
}
