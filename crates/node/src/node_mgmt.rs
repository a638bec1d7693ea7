//! NodeManagement (port 7839): operations on this node — Logs, Reboot,
//! UpdateNode (the work is `update`'s; the gRPC codes are decided here).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use metropolis_api::api::{
    LogsRequest, LogsResponse, RebootRequest, RebootResponse, UpdateNodeRequest,
    UpdateNodeResponse,
    node_management_server::NodeManagement,
    reboot_request::{NextBoot, Type},
};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::logtree::LogTree;
use crate::update::{Activation, UpdateError, Updater};

/// What a Reboot asks of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    /// Stop and start again as a fresh process (new boot ID, join flow).
    Restart,
    /// Stop and stay down.
    PowerOff,
}

/// A reboot is acknowledged before it happens, so the caller gets its
/// answer; the daemon acts on it this long after.
const ACT_AFTER: Duration = Duration::from_millis(200);

pub struct NodeManagementService {
    logs: Arc<LogTree>,
    power: mpsc::Sender<PowerAction>,
    updater: Updater,
}

impl NodeManagementService {
    pub fn new(logs: Arc<LogTree>, power: mpsc::Sender<PowerAction>, updater: Updater) -> Self {
        NodeManagementService {
            logs,
            power,
            updater,
        }
    }

    /// Acts on `action` shortly, after the caller got its answer.
    fn act_soon(&self, action: PowerAction) {
        let power = self.power.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ACT_AFTER).await;
            let _ = power.send(action).await;
        });
    }
}

/// The one place update errors become gRPC codes: the caller's input is
/// wrong (INVALID_ARGUMENT: bad request, digest mismatch, a file that is not
/// a runnable node binary, too large), cannot apply here
/// (FAILED_PRECONDITION), collides with another update (ABORTED, as
/// upstream), or the file could not be fetched (UNAVAILABLE, as upstream
/// answers install errors).
fn update_status(e: UpdateError) -> Status {
    let msg = e.to_string();
    match e {
        UpdateError::Invalid(_) | UpdateError::Digest { .. } => Status::invalid_argument(msg),
        UpdateError::Check(crate::update::CheckError::Local(_)) | UpdateError::Local(_) => {
            Status::internal(msg)
        }
        UpdateError::Check(_) => Status::invalid_argument(msg),
        UpdateError::Fetch(f) if f.refused_content() => Status::invalid_argument(msg),
        UpdateError::Fetch(f) if f.local() => Status::internal(msg),
        UpdateError::Fetch(_) => Status::unavailable(msg),
        UpdateError::OsImage | UpdateError::Refused(_) => Status::failed_precondition(msg),
        UpdateError::Busy => Status::aborted(msg),
    }
}

type LogsStream = Pin<Box<dyn Stream<Item = Result<LogsResponse, Status>> + Send>>;

/// Serves a LogsRequest from the node's log tree: one response with the
/// backlog, then one response per new entry while streaming.
pub fn serve_logs(tree: &LogTree, req: &LogsRequest) -> Result<LogsStream, Status> {
    crate::logtree::serve(tree, req).map_err(|e| Status::invalid_argument(e.to_string()))
}

#[tonic::async_trait]
impl NodeManagement for NodeManagementService {
    type LogsStream = LogsStream;

    async fn logs(&self, request: Request<LogsRequest>) -> Result<Response<LogsStream>, Status> {
        Ok(Response::new(serve_logs(&self.logs, request.get_ref())?))
    }

    async fn update_node(
        &self,
        request: Request<UpdateNodeRequest>,
    ) -> Result<Response<UpdateNodeResponse>, Status> {
        let req = request.into_inner();
        match self.updater.update(&req).await.map_err(update_status)? {
            Activation::Now => {
                tracing::warn!("restarting into the new binary");
                self.act_soon(PowerAction::Restart);
            }
            Activation::NextStart => {}
        }
        Ok(Response::new(UpdateNodeResponse {}))
    }

    async fn reboot(
        &self,
        request: Request<RebootRequest>,
    ) -> Result<Response<RebootResponse>, Status> {
        let req = request.into_inner();
        let action = match Type::try_from(req.r#type) {
            Ok(Type::Firmware | Type::Kexec) => PowerAction::Restart,
            Ok(Type::PowerOff) => PowerAction::PowerOff,
            _ => {
                return Err(Status::invalid_argument(
                    "type must be TYPE_FIRMWARE, TYPE_KEXEC or TYPE_POWER_OFF",
                ));
            }
        };
        match NextBoot::try_from(req.next_boot) {
            Ok(NextBoot::StartNormal) => {}
            Ok(NextBoot::StartRollback) => {
                self.updater.rollback().map_err(update_status)?;
            }
            Ok(NextBoot::StartFirmwareUi) => {
                return Err(Status::failed_precondition(
                    "NEXT_BOOT_START_FIRMWARE_UI does not apply: metropolis-node restarts as a process, not a machine",
                ));
            }
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown next_boot {}",
                    req.next_boot
                )));
            }
        }
        tracing::warn!(?action, "reboot requested");
        self.act_soon(action);
        Ok(Response::new(RebootResponse {}))
    }
}
