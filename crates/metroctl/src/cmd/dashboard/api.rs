//! The dashboard's API: JSON and server-sent events over the cluster's gRPC
//! calls. Messages from the cluster go out in the protobuf JSON mapping, as
//! `-o json` prints them.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt, TryStreamExt};
use metropolis_api::api::management_client::ManagementClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::{Dashboard, refuse};
use crate::watch::{NodeTable, Update};

/// How often the node stream refreshes heartbeat ages: the watch reports
/// health transitions, not every beat.
const HEARTBEAT_REFRESH: Duration = Duration::from_secs(3);

impl Dashboard {
    /// The kept channel to the leader, or a new one.
    async fn channel(&self) -> Result<Channel, Response> {
        let mut kept = self.channel.lock().await;
        if let Some(c) = kept.as_ref() {
            return Ok(c.clone());
        }
        let c = self.ctx.owner_channel().await.map_err(|e| {
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot reach the cluster: {e:#}"),
            )
        })?;
        *kept = Some(c.clone());
        Ok(c)
    }

    /// A failed call's answer to the page; forgets the channel if the call
    /// may have gone to a curator that no longer leads.
    async fn failed(&self, what: &str, status: tonic::Status) -> Response {
        use tonic::Code::*;
        if status.code() == Unavailable {
            *self.channel.lock().await = None;
        }
        let code = match status.code() {
            InvalidArgument | FailedPrecondition | OutOfRange => StatusCode::BAD_REQUEST,
            NotFound => StatusCode::NOT_FOUND,
            AlreadyExists | Aborted => StatusCode::CONFLICT,
            PermissionDenied => StatusCode::FORBIDDEN,
            Unauthenticated => StatusCode::UNAUTHORIZED,
            Unavailable | DeadlineExceeded => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        refuse(code, format!("{:#}", crate::conn::call_error(what, status)))
    }
}

fn json_of<M: prost::Message + prost::Name>(m: &M) -> serde_json::Value {
    metropolis_api::json::to_json(m).unwrap_or(serde_json::Value::Null)
}

fn event(name: &str, data: &serde_json::Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

#[derive(serde::Deserialize)]
pub struct WatchQuery {
    #[serde(default)]
    filter: String,
}

/// GET /api/nodes/watch?filter=: the node table, live. Events: `reset`
/// (every node in view, after each (re)connect), `change` (one change, as
/// `describe --watch -o json` prints it), `heartbeats` (node ID → seconds
/// since its last beat), `status` (live or reconnecting, and why) and
/// `fatal` (the watch cannot go on, e.g. a bad filter: the server's message;
/// the stream ends).
pub async fn watch_nodes(
    State(d): State<Arc<Dashboard>>,
    Query(q): Query<WatchQuery>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (out, rx) = mpsc::channel::<Event>(256);
    tokio::spawn(async move {
        let table = Arc::new(Mutex::new(NodeTable::default()));
        let (tx, mut updates) = mpsc::channel(64);
        let watch = {
            let (d, table, filter) = (d.clone(), table.clone(), q.filter.clone());
            async move { crate::watch::run(&d.ctx, &filter, &table, tx).await }
        };
        let forward = async {
            while let Some(u) = updates.recv().await {
                let events = match u {
                    Update::Reconnecting(why) => vec![event(
                        "status",
                        &serde_json::json!({"live": false, "message": why}),
                    )],
                    Update::Changes { synced: true, .. } => {
                        let t = table.lock().unwrap_or_else(|p| p.into_inner());
                        let nodes: Vec<_> = t.nodes().map(json_of).collect();
                        vec![
                            event("reset", &serde_json::Value::Array(nodes)),
                            event(
                                "status",
                                &serde_json::json!({"live": true, "leader": t.leader}),
                            ),
                        ]
                    }
                    Update::Changes { changes, .. } => changes
                        .iter()
                        .filter_map(|c| crate::cmd::watch::change_json(c).ok())
                        .map(|v| event("change", &v))
                        .collect(),
                };
                for e in events {
                    if out.send(e).await.is_err() {
                        return;
                    }
                }
            }
        };
        let heartbeats = async {
            loop {
                tokio::time::sleep(HEARTBEAT_REFRESH).await;
                if let Some(ages) = heartbeat_ages(&d).await
                    && out.send(event("heartbeats", &ages)).await.is_err()
                {
                    return;
                }
            }
        };
        tokio::select! {
            r = watch => {
                if let Err(e) = r {
                    let _ = out.send(event("fatal", &serde_json::json!({"error": format!("{e:#}")}))).await;
                }
            }
            () = forward => {}
            () = heartbeats => {}
            // The page went away.
            () = out.closed() => {}
        }
    });
    Sse::new(ReceiverStream::new(rx).map(Ok::<_, Infallible>)).keep_alive(KeepAlive::default())
}

/// Node ID → seconds since its last heartbeat, for the nodes whose health
/// is known.
async fn heartbeat_ages(d: &Dashboard) -> Option<serde_json::Value> {
    use metropolis_api::api::GetNodesRequest;
    let channel = d.channel().await.ok()?;
    let nodes: Vec<_> = match ManagementClient::new(channel)
        .get_nodes(GetNodesRequest::default())
        .await
    {
        Ok(s) => match s.into_inner().try_collect().await {
            Ok(n) => n,
            Err(status) => {
                d.failed("GetNodes", status).await;
                return None;
            }
        },
        Err(status) => {
            d.failed("GetNodes", status).await;
            return None;
        }
    };
    let ages: serde_json::Map<String, serde_json::Value> = nodes
        .iter()
        .filter_map(|n: &metropolis_api::api::Node| {
            let d = Duration::try_from(n.time_since_heartbeat?).ok()?;
            Some((n.id.clone(), serde_json::json!(d.as_secs_f64())))
        })
        .collect();
    Some(serde_json::Value::Object(ages))
}

/// GET /api/cluster: CA (fingerprint, validity), configuration, directory,
/// consensus members and the curator leader.
pub async fn cluster(State(d): State<Arc<Dashboard>>) -> Response {
    use metropolis_api::api::GetClusterInfoRequest;
    use metropolis_api::curator::{
        GetConsensusStatusRequest, GetCurrentLeaderRequest, curator_client::CuratorClient,
        curator_local_client::CuratorLocalClient,
    };
    let channel = match d.channel().await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let info = match ManagementClient::new(channel.clone())
        .get_cluster_info(GetClusterInfoRequest {})
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => return d.failed("GetClusterInfo", s).await,
    };
    let consensus = match CuratorClient::new(channel.clone())
        .get_consensus_status(GetConsensusStatusRequest {})
        .await
    {
        Ok(r) => json_of(&r.into_inner()),
        Err(s) => {
            serde_json::json!({"error": format!("{:#}", crate::conn::call_error("GetConsensusStatus", s))})
        }
    };
    let leader = async {
        CuratorLocalClient::new(channel)
            .get_current_leader(GetCurrentLeaderRequest {})
            .await
            .ok()?
            .into_inner()
            .message()
            .await
            .ok()
            .flatten()
    }
    .await
    .map(|l| json_of(&l))
    .unwrap_or(serde_json::Value::Null);
    let ca = match metropolis_identity::parse_certificate(&info.ca_certificate) {
        Ok(c) => {
            let rfc3339 = |t: time::OffsetDateTime| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default()
            };
            serde_json::json!({
                "fingerprint_sha256": metropolis_identity::fingerprint_sha256(&info.ca_certificate),
                "not_before": rfc3339(c.not_before),
                "not_after": rfc3339(c.not_after),
                "common_name": c.common_name,
            })
        }
        Err(e) => serde_json::json!({"error": e.to_string()}),
    };
    Json(serde_json::json!({
        "ca": ca,
        "configuration": info.cluster_configuration.as_ref().map(json_of),
        "directory": info.cluster_directory.as_ref().map(json_of),
        "consensus": consensus,
        "leader": leader,
    }))
    .into_response()
}

/// GET /api/audit: the newest 50 audit entries (owner only; others get the
/// cluster's refusal).
pub async fn audit(State(d): State<Arc<Dashboard>>) -> Response {
    use metropolis_api::admin::{GetAuditLogRequest, cluster_admin_client::ClusterAdminClient};
    let channel = match d.channel().await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let entries: Result<Vec<_>, _> = match ClusterAdminClient::new(channel)
        .get_audit_log(GetAuditLogRequest { limit: 50 })
        .await
    {
        Ok(s) => s.into_inner().try_collect().await,
        Err(s) => Err(s),
    };
    match entries {
        Ok(entries) => Json(serde_json::Value::Array(
            entries.iter().map(json_of).collect(),
        ))
        .into_response(),
        Err(s) => d.failed("GetAuditLog", s).await,
    }
}

/// GET /api/nodes/{id}/logs: the node's last 200 log entries, then new ones
/// as they come (`entry` events, LogEntry in the protobuf JSON mapping);
/// `fatal` if the node cannot be read.
pub async fn logs(
    State(d): State<Arc<Dashboard>>,
    Path(id): Path<String>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    use metropolis_api::api::{
        LogsRequest, logs_request, node_management_client::NodeManagementClient,
    };
    use metropolis_api::common::{LogFilter, log_filter};
    let (out, rx) = mpsc::channel::<Event>(256);
    tokio::spawn(async move {
        let fatal = |msg: String| event("fatal", &serde_json::json!({ "error": msg }));
        let channel = match crate::cmd::node::node_management(&d.ctx, &id).await {
            Ok(c) => c,
            Err(e) => {
                let _ = out.send(fatal(format!("{e:#}"))).await;
                return;
            }
        };
        let req = LogsRequest {
            dn: "root".into(),
            filters: vec![LogFilter {
                filter: Some(log_filter::Filter::WithChildren(
                    log_filter::WithChildren {},
                )),
            }],
            backlog_mode: logs_request::BacklogMode::Count as i32,
            backlog_count: 200,
            stream_mode: logs_request::StreamMode::Unbuffered as i32,
        };
        let mut stream = match NodeManagementClient::new(channel).logs(req).await {
            Ok(s) => s.into_inner(),
            Err(s) => {
                let msg = format!("{:#}", crate::conn::call_error("Logs", s));
                let _ = out.send(fatal(msg)).await;
                return;
            }
        };
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                () = out.closed() => return,
            };
            match msg {
                Ok(Some(resp)) => {
                    for e in resp.backlog_entries.iter().chain(&resp.stream_entries) {
                        if out.send(event("entry", &json_of(e))).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(None) => return,
                Err(s) => {
                    let msg = format!("{:#}", crate::conn::call_error("Logs", s));
                    let _ = out.send(fatal(msg)).await;
                    return;
                }
            }
        }
    });
    Sse::new(ReceiverStream::new(rx).map(Ok::<_, Infallible>)).keep_alive(KeepAlive::default())
}

fn done(message: String) -> Response {
    Json(serde_json::json!({ "message": message })).into_response()
}

/// POST /api/nodes/{id}/approve.
pub async fn approve(State(d): State<Arc<Dashboard>>, Path(id): Path<String>) -> Response {
    use metropolis_api::api::{ApproveNodeRequest, GetNodesRequest};
    let channel = match d.channel().await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let mut mgmt = ManagementClient::new(channel);
    // The node by ID (CEL string literal: the ID is quoted as JSON).
    let filter = format!("node.id == {}", serde_json::Value::String(id.clone()));
    let nodes: Result<Vec<_>, _> = match mgmt.get_nodes(GetNodesRequest { filter }).await {
        Ok(s) => s.into_inner().try_collect().await,
        Err(s) => Err(s),
    };
    let node = match nodes {
        Ok(n) => match n.into_iter().next() {
            Some(n) => n,
            None => return refuse(StatusCode::NOT_FOUND, format!("node {id} not found")),
        },
        Err(s) => return d.failed("GetNodes", s).await,
    };
    match mgmt
        .approve_node(ApproveNodeRequest {
            pubkey: node.pubkey,
        })
        .await
    {
        Ok(_) => done(format!("Approved node {id}.")),
        Err(s) => d.failed("ApproveNode", s).await,
    }
}

#[derive(serde::Deserialize)]
pub struct Label {
    key: String,
    value: String,
}

#[derive(serde::Deserialize)]
pub struct LabelChange {
    #[serde(default)]
    upsert: Vec<Label>,
    #[serde(default)]
    delete: Vec<String>,
}

/// POST /api/nodes/{id}/labels `{"upsert": [{"key","value"}], "delete": [key]}`:
/// one atomic change, as `metroctl node label`.
pub async fn labels(
    State(d): State<Arc<Dashboard>>,
    Path(id): Path<String>,
    Json(change): Json<LabelChange>,
) -> Response {
    use metropolis_api::api::{UpdateNodeLabelsRequest, update_node_labels_request};
    if change.upsert.is_empty() && change.delete.is_empty() {
        return refuse(StatusCode::BAD_REQUEST, "no label change given");
    }
    let channel = match d.channel().await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let req = UpdateNodeLabelsRequest {
        node: Some(update_node_labels_request::Node::Id(id.clone())),
        upsert: change
            .upsert
            .into_iter()
            .map(|l| update_node_labels_request::Pair {
                key: l.key,
                value: l.value,
            })
            .collect(),
        delete: change.delete,
    };
    match ManagementClient::new(channel).update_node_labels(req).await {
        Ok(_) => done(format!("Updated the labels of node {id}.")),
        Err(s) => d.failed("UpdateNodeLabels", s).await,
    }
}

#[derive(serde::Deserialize)]
pub struct RoleChange {
    role: String,
    on: bool,
}

/// POST /api/nodes/{id}/roles `{"role": "KubernetesWorker", "on": true}`.
pub async fn roles(
    State(d): State<Arc<Dashboard>>,
    Path(id): Path<String>,
    Json(change): Json<RoleChange>,
) -> Response {
    use metropolis_api::api::{UpdateNodeRolesRequest, update_node_roles_request};
    let mut req = UpdateNodeRolesRequest {
        node: Some(update_node_roles_request::Node::Id(id.clone())),
        ..Default::default()
    };
    match change.role.as_str() {
        "ConsensusMember" => req.consensus_member = Some(change.on),
        "KubernetesController" => req.kubernetes_controller = Some(change.on),
        "KubernetesWorker" => req.kubernetes_worker = Some(change.on),
        other => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!(
                    "unknown role {:?}: ConsensusMember, KubernetesController or KubernetesWorker",
                    other.chars().take(40).collect::<String>()
                ),
            );
        }
    }
    let channel = match d.channel().await {
        Ok(c) => c,
        Err(r) => return r,
    };
    match ManagementClient::new(channel).update_node_roles(req).await {
        Ok(_) => done(format!(
            "{} {} {} node {id}.",
            if change.on { "Added" } else { "Removed" },
            change.role,
            if change.on { "to" } else { "from" }
        )),
        Err(s) => d.failed("UpdateNodeRoles", s).await,
    }
}
