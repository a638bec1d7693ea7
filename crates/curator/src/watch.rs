//! Curator.Watch: the node records a watcher asked for, first as they are
//! (the backlog), then as they change.
//!
//! The backlog goes out in as many WatchEvents as it takes to keep each
//! under [`MAX_EVENT_BYTES`]: one event for a few thousand nodes would pass
//! the 4 MiB a gRPC client accepts by default. Only the last backlog event
//! carries PROGRESS_LAST_BACKLOGGED.

use futures::{Stream, StreamExt};
use metropolis_api::curator::{
    Node, WatchEvent, WatchRequest,
    watch_event::{NodeTombstone, Progress},
    watch_request,
};
use metropolis_store::{EventKind, RangeResponse, Store, WatchStream};
use prost::Message;
use tonic::Status;

use crate::CuratorError;
use crate::state::{NODES_PREFIX, node_key};

/// Upper bound of one encoded WatchEvent: half of tonic's default decode
/// limit, so that clients with default settings read every event.
pub const MAX_EVENT_BYTES: usize = 2 * 1024 * 1024;

pub fn node_id_of_key(key: &[u8]) -> String {
    String::from_utf8_lossy(key)
        .trim_start_matches(NODES_PREFIX)
        .to_string()
}

/// A node record as the Watch stream shows it to nodes.
fn watch_node(key: &[u8], value: &[u8]) -> Result<Node, Status> {
    let id = node_id_of_key(key);
    let n = metropolis_api::private::Node::decode(value)
        .map_err(|e| Status::internal(format!("node record {id} is corrupt: {e}")))?;
    Ok(Node {
        id,
        roles: n.roles,
        status: n.status,
        clusternet: n.clusternet,
        state: n.state,
        labels: n.labels,
        decommission_requested: n.decommission_requested,
    })
}

/// Splits `nodes` into events of at most `limit` encoded bytes each (a node
/// larger than that on its own goes alone), in order, the last one marked
/// PROGRESS_LAST_BACKLOGGED. No nodes still make one (empty) event: the
/// watcher learns that the backlog is complete.
pub fn backlog_events(nodes: Vec<Node>, limit: usize) -> Vec<WatchEvent> {
    let last = WatchEvent {
        progress: Progress::LastBacklogged as i32,
        ..Default::default()
    };
    let mut events: Vec<WatchEvent> = split_under(nodes, limit, last.encoded_len())
        .into_iter()
        .map(|nodes| WatchEvent {
            nodes,
            ..Default::default()
        })
        .collect();
    if let Some(e) = events.last_mut() {
        e.progress = last.progress;
    }
    events
}

/// Splits `items`, in order, into groups that encode as one repeated field
/// (number below 16) in at most `limit` bytes plus `reserve` for the rest of
/// the message; an item larger than that on its own goes alone. Always at
/// least one group, so that an empty snapshot is still sent.
pub fn split_under<T: Message>(items: Vec<T>, limit: usize, reserve: usize) -> Vec<Vec<T>> {
    let mut groups = Vec::new();
    let mut current = Vec::new();
    let mut size = reserve;
    for item in items {
        // Length-delimited field: tag, length, message.
        let len = item.encoded_len();
        let cost = 1 + prost::encoding::encoded_len_varint(len as u64) + len;
        if !current.is_empty() && size + cost > limit {
            groups.push(std::mem::take(&mut current));
            size = reserve;
        }
        size += cost;
        current.push(item);
    }
    groups.push(current);
    groups
}

/// The records under `prefix` as of one store revision, and a stream of
/// every change after it: nothing is missed or seen twice in between.
pub async fn records_and_changes(
    store: &std::sync::Arc<dyn Store>,
    prefix: &str,
) -> Result<(RangeResponse, WatchStream), Status> {
    let range = store
        .range(prefix.as_bytes())
        .await
        .map_err(CuratorError::from)?;
    let changes = store
        .watch(prefix.as_bytes(), range.revision + 1)
        .await
        .map_err(CuratorError::from)?;
    Ok((range, changes))
}

/// What one watcher asked for: one node's key or every node.
fn selection(request: WatchRequest) -> Result<Option<String>, Status> {
    match request.kind {
        Some(watch_request::Kind::NodeInCluster(n)) if !n.node_id.is_empty() => Ok(Some(n.node_id)),
        Some(watch_request::Kind::NodeInCluster(_)) => Err(Status::invalid_argument(
            "node_in_cluster.node_id must be set",
        )),
        Some(watch_request::Kind::NodesInCluster(_)) => Ok(None),
        None => Err(Status::invalid_argument(
            "kind must be node_in_cluster or nodes_in_cluster",
        )),
    }
}

/// The stream of one Watch call on `store`.
pub async fn watch(
    store: &std::sync::Arc<dyn Store>,
    request: WatchRequest,
) -> Result<impl Stream<Item = Result<WatchEvent, Status>> + Send + 'static, Status> {
    let only = selection(request)?;
    let prefix = match &only {
        Some(id) => node_key(id),
        None => NODES_PREFIX.to_string(),
    };
    let (range, changes) = records_and_changes(store, &prefix).await?;
    let wanted = only.map(|id| node_key(&id).into_bytes());
    let matches = move |key: &[u8]| wanted.as_deref().is_none_or(|w| key == w);
    let backlog: Vec<Node> = range
        .kvs
        .iter()
        .filter(|kv| matches(&kv.key))
        .map(|kv| watch_node(&kv.key, &kv.value))
        .collect::<Result<_, _>>()?;
    let backlog = backlog_events(backlog, MAX_EVENT_BYTES);
    // Changes go out one record per event: a record is far below the limit.
    let changes = changes.filter_map(move |ev| {
        let out = match ev {
            Err(e) => Some(Err(Status::from(CuratorError::from(e)))),
            Ok(ev) if !matches(&ev.kv.key) => None,
            Ok(ev) => Some(match ev.kind {
                EventKind::Put => watch_node(&ev.kv.key, &ev.kv.value).map(|n| WatchEvent {
                    nodes: vec![n],
                    ..Default::default()
                }),
                EventKind::Delete => Ok(WatchEvent {
                    node_tombstones: vec![NodeTombstone {
                        node_id: node_id_of_key(&ev.kv.key),
                    }],
                    ..Default::default()
                }),
            }),
        };
        futures::future::ready(out)
    });
    Ok(futures::stream::iter(backlog.into_iter().map(Ok)).chain(changes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use metropolis_api::common::{NodeLabels, NodeStatus, node_labels::Pair};
    use metropolis_store::{Op, Txn};
    use std::collections::BTreeSet;
    use std::time::Duration;

    fn big_node(i: usize, bytes: usize) -> Node {
        Node {
            id: format!("metropolis-{i:032x}"),
            status: Some(NodeStatus {
                external_address: "x".repeat(bytes),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Every node exactly once, in order; each event within the limit; only
    /// the last marked.
    fn check(events: &[WatchEvent], nodes: &[Node], limit: usize) {
        let sent: Vec<&Node> = events.iter().flat_map(|e| &e.nodes).collect();
        assert_eq!(sent, nodes.iter().collect::<Vec<_>>());
        for (i, e) in events.iter().enumerate() {
            assert!(
                e.encoded_len() <= limit || e.nodes.len() == 1,
                "event {i} is {} bytes",
                e.encoded_len()
            );
            let last = i + 1 == events.len();
            assert_eq!(e.progress == Progress::LastBacklogged as i32, last);
        }
    }

    #[test]
    fn backlog_splits_at_the_limit_and_loses_nothing() {
        assert_eq!(backlog_events(vec![], 100).len(), 1);
        for (count, size, limit) in [
            (1, 10, 1000),
            (50, 10, 1000),
            (50, 97, 1000),
            (7, 2000, 1000),
            (3000, 1000, MAX_EVENT_BYTES),
        ] {
            let nodes: Vec<Node> = (0..count).map(|i| big_node(i, size)).collect();
            let events = backlog_events(nodes.clone(), limit);
            check(&events, &nodes, limit);
            let total: usize = nodes.iter().map(|n| n.encoded_len()).sum();
            if total > limit {
                assert!(events.len() > 1, "{count} nodes of {size} bytes not split");
            }
        }
        // Exactly at the limit: the event is allowed to be `limit` bytes.
        let nodes: Vec<Node> = (0..10).map(|i| big_node(i, 100)).collect();
        let one = backlog_events(nodes.clone(), usize::MAX);
        let exact = one[0].encoded_len();
        assert_eq!(backlog_events(nodes.clone(), exact).len(), 1);
        assert_eq!(backlog_events(nodes, exact - 1).len(), 2);
    }

    #[tokio::test]
    async fn a_large_backlog_comes_in_several_events() {
        let t = crate::state::test_support::bootstrapped().await;
        // Records with 100 KiB of labels each, written directly: 40 of them
        // are about twice the event limit.
        let value = "v".repeat(1024);
        let labels = NodeLabels {
            pairs: (0..100)
                .map(|i| Pair {
                    key: format!("k{i}"),
                    value: value.clone(),
                })
                .collect(),
        };
        let mut want = BTreeSet::from([t.first_id.clone()]);
        for i in 0..40 {
            let id = format!("metropolis-{i:032x}");
            let rec = metropolis_api::private::Node {
                labels: Some(labels.clone()),
                ..Default::default()
            };
            t.store
                .txn(Txn::new().and_then(Op::put(node_key(&id), rec.encode_to_vec())))
                .await
                .expect("put");
            want.insert(id);
        }
        let req = WatchRequest {
            kind: Some(watch_request::Kind::NodesInCluster(Default::default())),
        };
        let mut stream = Box::pin(watch(&t.store, req).await.expect("watch"));
        let mut seen = Vec::new();
        let mut events = 0;
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .expect("in time")
                .expect("event")
                .expect("ok");
            events += 1;
            assert!(ev.encoded_len() <= MAX_EVENT_BYTES, "{}", ev.encoded_len());
            seen.extend(ev.nodes.iter().map(|n| n.id.clone()));
            if ev.progress == Progress::LastBacklogged as i32 {
                break;
            }
        }
        println!("backlog of {} nodes in {events} events", seen.len());
        assert!(events >= 2, "not split: {events} event(s)");
        assert_eq!(seen.len(), want.len(), "a node was sent twice");
        assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), want);
    }
}
