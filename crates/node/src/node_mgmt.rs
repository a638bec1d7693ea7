//! NodeManagement (port 7839): operations on this node — Logs, Reboot,
//! UpdateNode.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use metropolis_api::api::{
    ActivationMode, LogsRequest, LogsResponse, RebootRequest, RebootResponse, UpdateNodeRequest,
    UpdateNodeResponse,
    node_management_server::NodeManagement,
    reboot_request::{NextBoot, Type},
};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::logtree::LogTree;

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
}

impl NodeManagementService {
    pub fn new(logs: Arc<LogTree>, power: mpsc::Sender<PowerAction>) -> Self {
        NodeManagementService { logs, power }
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
        let image = req
            .os_image
            .ok_or_else(|| Status::invalid_argument("os_image must be set"))?;
        if image.repository.is_empty() || (image.tag.is_empty() && image.digest.is_empty()) {
            return Err(Status::invalid_argument(
                "os_image needs a repository and a tag or digest",
            ));
        }
        match ActivationMode::try_from(req.activation_mode) {
            Ok(ActivationMode::None | ActivationMode::Reboot | ActivationMode::Kexec) => {}
            _ => {
                return Err(Status::invalid_argument(format!(
                    "activation_mode {} is not valid; use ACTIVATION_MODE_NONE, _REBOOT or _KEXEC",
                    req.activation_mode
                )));
            }
        }
        Err(Status::failed_precondition(
            "metropolis-node runs as a daemon, not from an OS image: there is no image to update. \
             Upgrade the metropolis-node binary and restart the node (metroctl node reboot)",
        ))
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
                return Err(Status::failed_precondition(
                    "NEXT_BOOT_START_ROLLBACK does not apply: metropolis-node has no A/B OS slots to roll back to",
                ));
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
        let power = self.power.clone();
        tracing::warn!(?action, "reboot requested");
        tokio::spawn(async move {
            tokio::time::sleep(ACT_AFTER).await;
            let _ = power.send(action).await;
        });
        Ok(Response::new(RebootResponse {}))
    }
}
