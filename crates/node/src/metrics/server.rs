//! Port 7840 as upstream lays it out (metropolis/node/core/metrics): HTTPS
//! with the node certificate, `/metrics/<exporter>` for this node's
//! exporters and `/discovery` (Prometheus HTTP service discovery).
//!
//! Only holders of a cluster-CA certificate with READ_CLUSTER_STATUS (the
//! owner, identities, nodes) get an answer; the check is the same as the
//! gRPC ports' ([`metropolis_rpc::auth::authenticate`] and the node's
//! [`Authorizer`]), made per request so that a refusal is an HTTP status
//! with a reason rather than a failed handshake. Connections come through
//! the one accept loop ([`metropolis_rpc::server::tls_incoming`]).
//!
//! Exporters: `core` (this process's registry, as upstream names it) and
//! `etcd` on nodes that run etcd (etcd serves `/metrics` on its client
//! socket, which only this node can reach; no new port). Upstream's others
//! (node_exporter, Kubernetes, containerd) have nothing to run here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use metropolis_api::common::NodeState;
use metropolis_api::ext::Permission;
use metropolis_curator::Cluster;
use metropolis_curator::heartbeat::Heartbeats;
use metropolis_curator::state::NodeEntry;
use metropolis_rpc::Authorizer;
use tokio::net::TcpListener;

use super::Metrics;

/// Exporter names, as upstream's `DefaultExporters` call them.
pub const CORE: &str = "core";
pub const ETCD: &str = "etcd";

/// Everything a request may need.
pub struct MetricsService {
    pub metrics: Arc<Metrics>,
    /// Set on nodes that run the curator: node counts and `/discovery`.
    pub cluster: Option<(Arc<Cluster>, Arc<Heartbeats>)>,
    /// etcd's client socket, on nodes that run etcd.
    pub etcd_socket: Option<PathBuf>,
    pub ca_der: Vec<u8>,
    pub authorizer: Arc<dyn Authorizer>,
}

/// How a request arrived.
#[derive(Clone)]
enum Peer {
    /// Over TLS, with the client's leaf certificate if it sent one.
    Tls(Option<Arc<Vec<u8>>>),
    /// Over the plain-HTTP loopback listener (`--metrics-plain-http`),
    /// which the node's own user and root reach anyway.
    Loopback,
}

/// Serves until `stop` resolves: TLS on `listener`, and plain HTTP on
/// `plain` if given (a loopback address, checked by the caller).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    limits: metropolis_rpc::server::Limits,
    plain: Option<TcpListener>,
    service: Arc<MetricsService>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Prometheus and curl speak HTTP/1.1 or HTTP/2; the node's TLS
    // configuration offers only h2 (gRPC).
    let mut tls = (*tls).clone();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let app = router(service.clone());
    let plain_task = plain.map(|l| {
        let app = app.clone().layer(Extension(Peer::Loopback));
        tokio::spawn(async move { axum::serve(l, app).await })
    });
    let mut incoming = std::pin::pin!(metropolis_rpc::server::tls_incoming(
        listener,
        Arc::new(tls),
        &limits,
        Some(service.ca_der.clone()),
    ));
    let mut stop = std::pin::pin!(stop);
    // Dropped on return: open connections end with the server.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            () = &mut stop => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            conn = incoming.next() => match conn {
                Some(Ok(stream)) => {
                    let leaf = stream.peer_certificate().map(Arc::new);
                    let app = app.clone().layer(Extension(Peer::Tls(leaf)));
                    let builder = connection_builder(&limits);
                    connections.spawn(async move {
                        let svc = hyper_util::service::TowerToHyperService::new(app);
                        let io = hyper_util::rt::TokioIo::new(stream);
                        if let Err(e) = builder.serve_connection(io, svc).await {
                            tracing::debug!(error = %e, "metrics connection ended");
                        }
                    });
                }
                Some(Err(e)) => tracing::debug!(error = %e, "metrics connection failed"),
                None => break,
            },
        }
    }
    if let Some(t) = plain_task {
        t.abort();
    }
    Ok(())
}

/// HTTP/1.1 and HTTP/2 for one connection, with the gRPC ports' HTTP/2
/// settings (`Limits`): a scraper needs a stream or two, never more than a
/// gRPC client, and a dead one is found by the same keepalive.
fn connection_builder(
    limits: &metropolis_rpc::server::Limits,
) -> hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor> {
    let mut builder =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        // A request head that trickles in is dropped like a slow handshake.
        .header_read_timeout(limits.handshake_timeout)
        .max_buf_size(limits.max_header_list_size as usize);
    metropolis_rpc::apply_http2_limits!(builder.http2(), limits);
    builder
}

fn router(service: Arc<MetricsService>) -> axum::Router {
    axum::Router::new()
        .route("/metrics/{exporter}", axum::routing::get(exporter))
        .route("/discovery", axum::routing::get(discovery))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not found: this port serves /metrics/<exporter> (core, and etcd on nodes \
                 that run it) and /discovery\n",
            )
        })
        .with_state(service)
}

fn refuse(code: StatusCode, why: impl Into<String>) -> Response {
    let mut why = why.into();
    why.push('\n');
    (code, why).into_response()
}

/// The caller must hold a cluster-CA certificate with READ_CLUSTER_STATUS.
async fn authorize(service: &MetricsService, peer: &Peer) -> Result<(), Response> {
    let der = match peer {
        Peer::Loopback => return Ok(()),
        Peer::Tls(None) => {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "no client certificate: metrics need a certificate issued by the cluster CA \
                 (an identity with READ_CLUSTER_STATUS, or a node); \
                 `metroctl credentials export DIR` writes the operator's for curl and Prometheus",
            ));
        }
        Peer::Tls(Some(der)) => der,
    };
    let cert = metropolis_identity::parse_certificate(der).map_err(|e| {
        refuse(
            StatusCode::UNAUTHORIZED,
            format!("client certificate could not be parsed: {e}"),
        )
    })?;
    let principal = metropolis_rpc::auth::authenticate(&service.ca_der, &cert)
        .map_err(|s| refuse(StatusCode::UNAUTHORIZED, s.message()))?;
    let perms = service
        .authorizer
        .permissions(&principal)
        .await
        .map_err(|s| refuse(StatusCode::FORBIDDEN, s.message()))?;
    if !perms.contains(Permission::ReadClusterStatus) {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            format!("{principal} may not read metrics: it lacks PERMISSION_READ_CLUSTER_STATUS"),
        ));
    }
    Ok(())
}

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4";

async fn exporter(
    State(service): State<Arc<MetricsService>>,
    Extension(peer): Extension<Peer>,
    Path(name): Path<String>,
) -> Response {
    if let Err(r) = authorize(&service, &peer).await {
        return r;
    }
    match name.as_str() {
        CORE => {
            let body = service.metrics.render(service.cluster.as_ref()).await;
            ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], body).into_response()
        }
        ETCD => match &service.etcd_socket {
            Some(socket) => match etcd_metrics(socket).await {
                Ok((content_type, body)) => {
                    ([(header::CONTENT_TYPE, content_type)], body).into_response()
                }
                Err(e) => refuse(
                    StatusCode::BAD_GATEWAY,
                    format!("could not read etcd's metrics: {e:#}"),
                ),
            },
            None => refuse(
                StatusCode::NOT_FOUND,
                "exporter etcd: this node runs no etcd (only consensus members of a \
                 high-availability cluster do)",
            ),
        },
        other => refuse(
            StatusCode::NOT_FOUND,
            format!(
                "no exporter {:?} on this node; it has: {}",
                other.chars().take(64).collect::<String>(),
                if service.etcd_socket.is_some() {
                    "core, etcd"
                } else {
                    "core"
                }
            ),
        ),
    }
}

/// GET /metrics on etcd's client socket.
async fn etcd_metrics(socket: &std::path::Path) -> anyhow::Result<(String, axum::body::Bytes)> {
    use anyhow::Context;
    use http_body_util::BodyExt;
    let fetch = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .with_context(|| format!("connecting to {}", socket.display()))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = axum::http::Request::get("/metrics")
            .header(header::HOST, "localhost")
            .body(http_body_util::Empty::<axum::body::Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        anyhow::ensure!(
            resp.status().is_success(),
            "etcd answered {}",
            resp.status()
        );
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(PROMETHEUS_TEXT)
            .to_string();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((content_type, body))
    };
    tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .context("etcd did not answer within 10s")?
}

/// One target group of Prometheus HTTP service discovery.
#[derive(Debug, serde::Serialize, PartialEq)]
pub struct TargetGroup {
    pub targets: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

/// Every UP node with an address, labelled as upstream labels them: its
/// ID and one true/false label per role. Targets are bare addresses, as
/// upstream's: the scrape configuration adds the port (README).
pub fn discovery_targets(nodes: &[NodeEntry]) -> Vec<TargetGroup> {
    nodes
        .iter()
        .filter(|e| e.node.state == NodeState::Up as i32)
        .filter_map(|e| {
            let address = e.node.status.as_ref()?.external_address.clone();
            if address.is_empty() {
                return None;
            }
            let roles = e.node.roles.clone().unwrap_or_default();
            let flag = |b: bool| b.to_string();
            let labels = BTreeMap::from([
                ("__meta_metropolis_node".to_string(), e.id.clone()),
                (
                    "__meta_metropolis_role_consensus_member".to_string(),
                    flag(roles.consensus_member.is_some()),
                ),
                (
                    "__meta_metropolis_role_kubernetes_controller".to_string(),
                    flag(roles.kubernetes_controller.is_some()),
                ),
                (
                    "__meta_metropolis_role_kubernetes_worker".to_string(),
                    flag(roles.kubernetes_worker.is_some()),
                ),
            ]);
            Some(TargetGroup {
                targets: vec![address],
                labels,
            })
        })
        .collect()
}

async fn discovery(
    State(service): State<Arc<MetricsService>>,
    Extension(peer): Extension<Peer>,
) -> Response {
    if let Err(r) = authorize(&service, &peer).await {
        return r;
    }
    // As upstream: consensus members (which hold the cluster state) answer;
    // other nodes have nothing to say.
    let Some((cluster, _)) = &service.cluster else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node holds no cluster state; ask a consensus member for /discovery",
        );
    };
    match cluster.nodes().await {
        Ok(nodes) => match serde_json::to_vec(&discovery_targets(&nodes)) {
            Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
            Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        },
        Err(e) => refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read the nodes: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metropolis_api::common::{NodeRoles, NodeStatus, node_roles};

    fn entry(id: &str, state: NodeState, address: &str, consensus: bool) -> NodeEntry {
        NodeEntry {
            id: id.into(),
            node: metropolis_api::private::Node {
                state: state as i32,
                status: Some(NodeStatus {
                    external_address: address.into(),
                    ..Default::default()
                }),
                roles: Some(NodeRoles {
                    consensus_member: consensus.then(node_roles::ConsensusMember::default),
                    ..Default::default()
                }),
                ..Default::default()
            },
            mod_revision: 1,
        }
    }

    #[test]
    fn discovery_lists_up_nodes_as_upstream_does() {
        let nodes = [
            entry("metropolis-fake-1", NodeState::Up, "1.2.3.4", true),
            entry("metropolis-fake-2", NodeState::New, "1.2.3.5", false),
            entry("metropolis-fake-3", NodeState::Up, "", false),
            entry("metropolis-fake-4", NodeState::Up, "1.2.3.7", false),
        ];
        let json = serde_json::to_string(&discovery_targets(&nodes)).expect("json");
        // Upstream's TestDiscovery expects exactly this for fake-1.
        let want = r#"[{"targets":["1.2.3.4"],"labels":{"__meta_metropolis_node":"metropolis-fake-1","__meta_metropolis_role_consensus_member":"true","__meta_metropolis_role_kubernetes_controller":"false","__meta_metropolis_role_kubernetes_worker":"false"}},{"targets":["1.2.3.7"],"#;
        assert!(json.starts_with(want), "{json}");
        assert_eq!(
            discovery_targets(&nodes).len(),
            2,
            "NEW and address-less nodes left out"
        );
    }
}
