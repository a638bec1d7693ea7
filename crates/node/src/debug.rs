//! The debug service on port 7837: NodeDebugService and the project-owned
//! NodeFaults. Compiled only with the `debug` cargo feature; it starts before
//! the node joins a cluster (so its logs can be read while it registers) and
//! needs no authentication, as the contract says for debug builds.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use metropolis_api::admin::{
    DumpStateRequest, DumpStateResponse, EmitLogsRequest, EmitLogsResponse, ListFailpointsRequest,
    ListFailpointsResponse, SetFailpointRequest, SetFailpointResponse,
    list_failpoints_response::Failpoint,
    node_faults_server::{NodeFaults, NodeFaultsServer},
};
use metropolis_api::api::{
    GetDebugKubeconfigRequest, GetDebugKubeconfigResponse, ImagePart, LoadImageResponse,
    LogsRequest, LogsResponse, TraceEvent, TraceRequest,
    node_debug_service_server::{NodeDebugService, NodeDebugServiceServer},
};
use metropolis_rpc::{AuthLayer, Authorizer, Permissions, Principal};
use tonic::{Request, Response, Status, Streaming};

use crate::logtree::LogTree;

pub const DEBUG_PORT: u16 = 7837;

/// Failpoints compiled into this build, besides the migration's
/// (`metropolis_curator::consensus::migration::FAILPOINTS`).
const FAILPOINTS: &[&str] = &["curator::store_commit", "node::heartbeat_send"];

/// Set in the environment, failpoints that are configured before the node
/// does anything (`name=actions;name=actions`, the `fail` crate's syntax):
/// for faults a restarted node must hit before a test could reach it.
pub const FAILPOINTS_ENV: &str = "METROPOLIS_FAILPOINTS";

fn known() -> impl Iterator<Item = &'static str> {
    FAILPOINTS
        .iter()
        .chain(metropolis_curator::consensus::migration::FAILPOINTS)
        .copied()
}

/// The node's view of itself, filled in as it starts, for DumpState.
pub type View = Arc<Mutex<serde_json::Value>>;

struct Debug {
    logs: Arc<LogTree>,
    view: View,
}

type LogsStream = Pin<Box<dyn Stream<Item = Result<LogsResponse, Status>> + Send>>;
type TraceStream = Pin<Box<dyn Stream<Item = Result<TraceEvent, Status>> + Send>>;

#[tonic::async_trait]
impl NodeDebugService for Debug {
    async fn get_debug_kubeconfig(
        &self,
        _: Request<GetDebugKubeconfigRequest>,
    ) -> Result<Response<GetDebugKubeconfigResponse>, Status> {
        Err(Status::unimplemented(
            "this node runs no Kubernetes, so there is no kubeconfig to hand out",
        ))
    }

    type LogsStream = LogsStream;

    async fn logs(&self, request: Request<LogsRequest>) -> Result<Response<LogsStream>, Status> {
        Ok(Response::new(crate::node_mgmt::serve_logs(
            &self.logs,
            request.get_ref(),
        )?))
    }

    type TraceStream = TraceStream;

    async fn trace(&self, _: Request<TraceRequest>) -> Result<Response<TraceStream>, Status> {
        Err(Status::unimplemented(
            "kernel function tracing does not apply: metropolis-node is a daemon, not an OS",
        ))
    }

    async fn load_image(
        &self,
        _: Request<Streaming<ImagePart>>,
    ) -> Result<Response<LoadImageResponse>, Status> {
        Err(Status::unimplemented(
            "there is no container runtime on this node to load images into",
        ))
    }
}

#[tonic::async_trait]
impl NodeFaults for Debug {
    async fn set_failpoint(
        &self,
        request: Request<SetFailpointRequest>,
    ) -> Result<Response<SetFailpointResponse>, Status> {
        let req = request.into_inner();
        if !known().any(|n| n == req.name) {
            return Err(Status::not_found(format!(
                "no failpoint {:?}; known: {}",
                req.name,
                known().collect::<Vec<_>>().join(", ")
            )));
        }
        fail::cfg(&req.name, &req.actions).map_err(|e| {
            Status::invalid_argument(format!(
                "actions {}: {e}",
                metropolis_api::quote(&req.actions)
            ))
        })?;
        tracing::warn!(name = %req.name, actions = %req.actions, "failpoint configured");
        Ok(Response::new(SetFailpointResponse {}))
    }

    async fn list_failpoints(
        &self,
        _: Request<ListFailpointsRequest>,
    ) -> Result<Response<ListFailpointsResponse>, Status> {
        Ok(Response::new(ListFailpointsResponse {
            configured: fail::list()
                .into_iter()
                .map(|(name, actions)| Failpoint { name, actions })
                .collect(),
            known: known().map(str::to_string).collect(),
        }))
    }

    async fn emit_logs(
        &self,
        request: Request<EmitLogsRequest>,
    ) -> Result<Response<EmitLogsResponse>, Status> {
        let req = request.into_inner();
        if req.lines_per_second == 0
            || req.lines_per_second > 1_000_000
            || req.seconds == 0
            || req.seconds > 3600
            || req.dns > 64
        {
            return Err(Status::invalid_argument(
                "lines_per_second must be 1..=1000000, seconds 1..=3600 and dns at most 64",
            ));
        }
        let dns: Vec<String> = if req.dns <= 1 {
            vec!["root.debug.spam".into()]
        } else {
            (0..req.dns)
                .map(|i| format!("root.debug.spam.{i}"))
                .collect()
        };
        tokio::spawn(async move {
            // Ten batches a second keep the rate smooth without a timer per line.
            let per_tick = (req.lines_per_second / 10).max(1);
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
            let mut n: u64 = 0;
            for _ in 0..(u64::from(req.seconds) * 10) {
                tick.tick().await;
                for _ in 0..per_tick {
                    let dn = dns[(n % dns.len() as u64) as usize].as_str();
                    n += 1;
                    tracing::info!(dn, n, "synthetic log line for load tests");
                }
            }
        });
        Ok(Response::new(EmitLogsResponse {}))
    }

    async fn dump_state(
        &self,
        _: Request<DumpStateRequest>,
    ) -> Result<Response<DumpStateResponse>, Status> {
        let json = self
            .view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .to_string();
        Ok(Response::new(DumpStateResponse { json }))
    }
}

/// Every method here is unauthenticated; nothing to authorize.
struct Nobody;

#[async_trait::async_trait]
impl Authorizer for Nobody {
    async fn permissions(&self, _: &Principal) -> Result<Permissions, Status> {
        Ok(Permissions::NONE)
    }
}

/// Starts the debug server with an ephemeral self-signed certificate (the
/// node may have no cluster credentials yet).
pub async fn start(address: IpAddr, logs: Arc<LogTree>, view: View) -> anyhow::Result<()> {
    if let Ok(spec) = std::env::var(FAILPOINTS_ENV) {
        for (name, actions) in spec.split(';').filter_map(|f| f.split_once('=')) {
            if !known().any(|n| n == name) {
                anyhow::bail!("{FAILPOINTS_ENV}: no failpoint {name:?}");
            }
            fail::cfg(name, actions)
                .map_err(|e| anyhow::anyhow!("{FAILPOINTS_ENV}: {name}={actions}: {e}"))?;
            tracing::warn!(%name, %actions, "failpoint configured from the environment");
        }
    }
    let key = metropolis_identity::generate_key();
    let cert = metropolis_identity::self_signed_certificate(&key, "metropolis-node-debug")?;
    let tls = metropolis_identity::server_config(cert.clone(), &key)?;
    let addr = SocketAddr::new(address, DEBUG_PORT);
    let listener = metropolis_rpc::server::bind(addr).await?;
    let debug = Arc::new(Debug { logs, view });
    let limits = metropolis_rpc::server::Limits::default();
    let router = metropolis_rpc::server::builder(&limits)
        .layer(AuthLayer::new(cert, Arc::new(Nobody)))
        .add_service(NodeDebugServiceServer::from_arc(debug.clone()))
        .add_service(NodeFaultsServer::from_arc(debug));
    tracing::warn!(%addr, "serving the debug service (debug build): unauthenticated, for development only");
    tokio::spawn(
        router.serve_with_incoming(metropolis_rpc::server::tls_incoming(
            listener, tls, &limits, None,
        )),
    );
    Ok(())
}
