//! Talking to the node as its operator would: pin the CA, escrow the owner
//! certificate, and keep one owner channel.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use metropolis_api::api::{GetRegisterTicketRequest, management_client::ManagementClient};
use metropolis_identity::{ServerTrust, SigningKey};
use metropolis_rpc::client::explain_status;
use tonic::transport::Channel;

use crate::node::NodeProcess;

pub fn trust(ca: &[u8]) -> ServerTrust {
    ServerTrust::ClusterCa {
        ca_der: ca.to_vec(),
        node_id: None,
    }
}

/// A TLS channel presenting `identity` (certificate DER and its key).
pub async fn channel(
    addr: SocketAddr,
    ca: &[u8],
    identity: (Vec<u8>, SigningKey),
) -> anyhow::Result<Channel> {
    let tls = metropolis_identity::client_config(trust(ca), Some(identity))
        .context("building the TLS client configuration")?;
    Ok(metropolis_rpc::client::connect(addr, tls).await?)
}

/// Polls until the node answers CuratorLocal, failing early if it dies.
pub async fn wait_serving(node: &mut NodeProcess, limit: Duration) -> anyhow::Result<Vec<u8>> {
    let deadline = Instant::now() + limit;
    loop {
        node.check_alive()?;
        match metropolis_rpc::client::fetch_ca_unverified(node.addr).await {
            Ok(ca) => return Ok(ca),
            Err(e) if Instant::now() >= deadline => bail!(
                "the node did not start serving on {} within {limit:?} (last error: {e:#}); \
                 last lines of {}:\n{}",
                node.addr,
                node.log.display(),
                node.log_tail(30)
            ),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Trades the self-signed initial owner credentials for the owner
/// certificate (AAA.Escrow), as metroctl does on first use. The node serves
/// before its curator has won its first election; until then the call is
/// UNAVAILABLE, and is retried for up to [`LEADER_WAIT`].
pub async fn escrow_owner(
    addr: SocketAddr,
    ca: &[u8],
    owner: &SigningKey,
) -> anyhow::Result<Vec<u8>> {
    Ok(metropolis_rpc::client::escrow_owner(addr, ca, owner).await?)
}

pub async fn register_ticket(owner: &mut ManagementClient<Channel>) -> anyhow::Result<Vec<u8>> {
    let ticket = owner
        .get_register_ticket(GetRegisterTicketRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("GetRegisterTicket: {}", explain_status(&s)))?
        .into_inner()
        .ticket;
    if ticket.is_empty() {
        bail!("GetRegisterTicket: the cluster returned an empty ticket");
    }
    Ok(ticket)
}
