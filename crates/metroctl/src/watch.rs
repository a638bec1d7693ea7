//! A node watch that outlives leader changes, for `node describe --watch`
//! and the dashboard.
//!
//! NodeWatch.WatchNodes ends when its curator stops leading (UNAVAILABLE)
//! or when the watcher fell behind (RESOURCE_EXHAUSTED). Either way the
//! client watches again, at whichever curator leads by then, and gets a
//! fresh snapshot. [`NodeTable`] compares that snapshot with what it held:
//! nodes that vanished meanwhile are reported removed, changed ones
//! modified, so no change is lost (some may be reported twice, or folded
//! into one).

use std::collections::BTreeMap;
use std::time::Duration;

use metropolis_api::admin::{
    WatchNodesEvent, WatchNodesRequest, node_removed::Reason, node_watch_client::NodeWatchClient,
    watch_nodes_event::Kind,
};
use metropolis_api::api::Node;
use tokio::sync::mpsc;

use crate::conn::Ctx;

/// What changed, as a client sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Added(Node),
    Modified(Node),
    Removed { id: String, why: Removal },
}

/// Why a node left the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Removal {
    Deleted,
    FilteredOut,
    /// Gone from the fresh snapshot after a reconnect: deleted, or no
    /// longer matching, while the watch was being resumed.
    GoneWhileReconnecting,
}

impl Change {
    pub fn id(&self) -> &str {
        match self {
            Change::Added(n) | Change::Modified(n) => &n.id,
            Change::Removed { id, .. } => id,
        }
    }
}

/// The nodes in view, kept current from watch events.
#[derive(Debug, Default)]
pub struct NodeTable {
    nodes: BTreeMap<String, Node>,
    /// The snapshot being received (after a (re)connect), until it is done.
    incoming: Option<BTreeMap<String, Node>>,
    /// The leader serving the current watch.
    pub leader: String,
}

impl NodeTable {
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// A watch starts (again): its snapshot replaces what we hold.
    pub fn restart(&mut self) {
        self.incoming = Some(BTreeMap::new());
    }

    /// Takes in one event; what changed for the client. Snapshot parts
    /// change nothing until the snapshot is complete.
    pub fn apply(&mut self, ev: WatchNodesEvent) -> Vec<Change> {
        let kind = Kind::try_from(ev.kind).unwrap_or(Kind::Invalid);
        if matches!(kind, Kind::Snapshot | Kind::SnapshotDone) {
            if !ev.leader_node_id.is_empty() {
                self.leader = ev.leader_node_id.clone();
            }
            let incoming = self.incoming.get_or_insert_with(BTreeMap::new);
            for n in ev.nodes {
                incoming.insert(n.id.clone(), n);
            }
            if kind == Kind::Snapshot {
                return Vec::new();
            }
            let fresh = self.incoming.take().unwrap_or_default();
            return self.resync(fresh);
        }
        let mut changes = Vec::new();
        for n in ev.nodes {
            match self.nodes.insert(n.id.clone(), n.clone()) {
                None => changes.push(Change::Added(n)),
                Some(old) if old != n => changes.push(Change::Modified(n)),
                Some(_) => {}
            }
        }
        for r in ev.removed {
            if self.nodes.remove(&r.id).is_some() {
                let why = match Reason::try_from(r.reason) {
                    Ok(Reason::FilteredOut) => Removal::FilteredOut,
                    _ => Removal::Deleted,
                };
                changes.push(Change::Removed { id: r.id, why });
            }
        }
        changes
    }

    /// A complete snapshot: the differences from what we held.
    fn resync(&mut self, fresh: BTreeMap<String, Node>) -> Vec<Change> {
        let mut changes = Vec::new();
        for id in self.nodes.keys() {
            if !fresh.contains_key(id) {
                changes.push(Change::Removed {
                    id: id.clone(),
                    why: Removal::GoneWhileReconnecting,
                });
            }
        }
        for (id, n) in &fresh {
            match self.nodes.get(id) {
                None => changes.push(Change::Added(n.clone())),
                Some(old) if old != n => changes.push(Change::Modified(n.clone())),
                Some(_) => {}
            }
        }
        self.nodes = fresh;
        changes
    }
}

/// What a running watch reports.
#[derive(Debug)]
pub enum Update {
    /// Changes (the first after a (re)connect completes its snapshot; it
    /// may be empty).
    Changes { changes: Vec<Change>, synced: bool },
    /// The watch was interrupted and is being resumed.
    Reconnecting(String),
}

/// Errors that watching again cannot fix: a bad filter, missing
/// permissions, no credentials.
fn is_permanent(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        InvalidArgument | PermissionDenied | Unauthenticated | Unimplemented
    )
}

/// Watches until `updates` is closed or a permanent error, which is
/// returned (a bad filter: the server's message). The table is the caller's:
/// every update has been applied to it.
pub async fn run(
    ctx: &Ctx,
    filter: &str,
    table: &std::sync::Mutex<NodeTable>,
    updates: mpsc::Sender<Update>,
) -> anyhow::Result<()> {
    let mut delay = Duration::from_millis(200);
    let mut first = true;
    loop {
        let why = match watch_once(ctx, filter, table, &updates).await {
            Ok(()) => return Ok(()),
            Err(Interrupted::Closed) => return Ok(()),
            Err(Interrupted::Fatal(e)) if first => return Err(e),
            Err(Interrupted::Fatal(e)) => format!("{e:#}"),
            Err(Interrupted::Status(s)) if is_permanent(s.code()) => {
                return Err(crate::conn::call_error("WatchNodes", s));
            }
            Err(Interrupted::Status(s)) => {
                format!("{:#}", crate::conn::call_error("WatchNodes", s))
            }
            Err(Interrupted::Synced(s)) => {
                // It had worked: retry promptly.
                delay = Duration::from_millis(200);
                format!("{:#}", crate::conn::call_error("WatchNodes", s))
            }
        };
        first = false;
        if updates.send(Update::Reconnecting(why)).await.is_err() {
            return Ok(());
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

enum Interrupted {
    /// The consumer went away.
    Closed,
    /// Before the snapshot completed.
    Status(tonic::Status),
    /// After the snapshot completed.
    Synced(tonic::Status),
    /// No connection at all.
    Fatal(anyhow::Error),
}

async fn watch_once(
    ctx: &Ctx,
    filter: &str,
    table: &std::sync::Mutex<NodeTable>,
    updates: &mpsc::Sender<Update>,
) -> Result<(), Interrupted> {
    let channel = ctx.owner_channel().await.map_err(Interrupted::Fatal)?;
    let mut stream = NodeWatchClient::new(channel)
        .watch_nodes(WatchNodesRequest {
            filter: filter.to_string(),
        })
        .await
        .map_err(Interrupted::Status)?
        .into_inner();
    table.lock().unwrap_or_else(|p| p.into_inner()).restart();
    let mut synced = false;
    loop {
        let ev = match stream.message().await {
            Ok(Some(ev)) => ev,
            Ok(None) => {
                return Err(Interrupted::Status(tonic::Status::unavailable(
                    "the watch ended",
                )));
            }
            Err(s) if synced => return Err(Interrupted::Synced(s)),
            Err(s) => return Err(Interrupted::Status(s)),
        };
        let done = ev.kind != Kind::Snapshot as i32;
        let changes = table.lock().unwrap_or_else(|p| p.into_inner()).apply(ev);
        let first_sync = done && !synced;
        synced |= done;
        if (!changes.is_empty() || first_sync)
            && updates
                .send(Update::Changes {
                    changes,
                    synced: first_sync,
                })
                .await
                .is_err()
        {
            return Err(Interrupted::Closed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metropolis_api::admin::NodeRemoved;

    fn node(id: &str, health: i32) -> Node {
        Node {
            id: id.into(),
            health,
            ..Default::default()
        }
    }

    fn snapshot(kind: Kind, nodes: Vec<Node>) -> WatchNodesEvent {
        WatchNodesEvent {
            kind: kind as i32,
            nodes,
            leader_node_id: "leader".into(),
            ..Default::default()
        }
    }

    #[test]
    fn changes_follow_the_events() {
        let mut t = NodeTable::default();
        t.restart();
        assert!(
            t.apply(snapshot(Kind::Snapshot, vec![node("a", 1)]))
                .is_empty()
        );
        let c = t.apply(snapshot(Kind::SnapshotDone, vec![node("b", 1)]));
        assert_eq!(
            c,
            vec![Change::Added(node("a", 1)), Change::Added(node("b", 1))]
        );
        assert_eq!(t.leader, "leader");
        let c = t.apply(WatchNodesEvent {
            kind: Kind::Change as i32,
            nodes: vec![node("a", 2), node("b", 1)],
            removed: vec![],
            ..Default::default()
        });
        assert_eq!(c, vec![Change::Modified(node("a", 2))], "b did not change");
        let c = t.apply(WatchNodesEvent {
            kind: Kind::Change as i32,
            removed: vec![NodeRemoved {
                id: "b".into(),
                reason: Reason::FilteredOut as i32,
            }],
            ..Default::default()
        });
        assert_eq!(
            c,
            vec![Change::Removed {
                id: "b".into(),
                why: Removal::FilteredOut
            }]
        );
        assert_eq!(t.len(), 1);
    }

    /// The resume logic: after a failover the new leader's snapshot is
    /// compared with what the old watch had shown.
    #[test]
    fn a_fresh_snapshot_after_reconnecting_loses_no_change() {
        let mut t = NodeTable::default();
        t.restart();
        t.apply(snapshot(
            Kind::SnapshotDone,
            vec![node("a", 2), node("b", 2), node("c", 2)],
        ));
        // The old leader dies; meanwhile b is deleted, c times out, d joins.
        t.restart();
        // Until the new snapshot is complete, the table stays as it was.
        assert!(
            t.apply(snapshot(Kind::Snapshot, vec![node("a", 2)]))
                .is_empty()
        );
        assert_eq!(t.len(), 3);
        let c = t.apply(snapshot(
            Kind::SnapshotDone,
            vec![node("c", 3), node("d", 1)],
        ));
        assert_eq!(
            c,
            vec![
                Change::Removed {
                    id: "b".into(),
                    why: Removal::GoneWhileReconnecting
                },
                Change::Modified(node("c", 3)),
                Change::Added(node("d", 1)),
            ]
        );
        assert_eq!(
            t.nodes().map(|n| n.id.as_str()).collect::<Vec<_>>(),
            vec!["a", "c", "d"]
        );
    }
}
