//! Talking to the node as its operator would: pin the CA, escrow the owner
//! certificate, and keep one owner channel.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use backon::{ConstantBuilder, Retryable};
use futures::StreamExt;
use metropolis_api::api::{
    EscrowRequest, GetRegisterTicketRequest, aaa_client::AaaClient, escrow_request::Parameters,
    management_client::ManagementClient,
};
use metropolis_api::curator::{GetCaCertificateRequest, curator_local_client::CuratorLocalClient};
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

/// The CA the node serves, fetched without trusting it yet. The loadgen
/// started the node itself on loopback, so trust on first use is sound here.
async fn fetch_ca(addr: SocketAddr) -> anyhow::Result<Vec<u8>> {
    let seen = Arc::new(Mutex::new(None));
    let tls = metropolis_identity::client_config(ServerTrust::Capture(seen), None)
        .context("building the TLS client configuration")?;
    let ch = metropolis_rpc::client::connect(addr, tls).await?;
    let resp = CuratorLocalClient::new(ch)
        .get_ca_certificate(GetCaCertificateRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("GetCACertificate: {}", explain_status(&s)))?;
    Ok(resp.into_inner().identity_ca_certificate)
}

/// Polls until the node answers CuratorLocal, failing early if it dies.
pub async fn wait_serving(node: &mut NodeProcess, limit: Duration) -> anyhow::Result<Vec<u8>> {
    let deadline = Instant::now() + limit;
    loop {
        node.check_alive()?;
        match fetch_ca(node.addr).await {
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
    let self_signed = metropolis_identity::self_signed_certificate(owner, "")
        .context("creating the initial owner certificate")?;
    let ch = channel(addr, ca, (self_signed, owner.clone())).await?;
    let attempt = || async {
        let request = EscrowRequest {
            parameters: Some(Parameters {
                requested_identity_name: "owner".into(),
                public_key: owner.verifying_key().to_bytes().to_vec(),
            }),
            proofs: None,
        };
        let mut replies = AaaClient::new(ch.clone())
            .escrow(tokio_stream::iter([request]))
            .await?
            .into_inner();
        match replies.next().await {
            Some(reply) => reply.map(Some),
            None => Ok(None),
        }
    };
    let reply = attempt
        .retry(
            ConstantBuilder::default()
                .with_delay(LEADER_RETRY)
                .with_max_times((LEADER_WAIT.as_millis() / LEADER_RETRY.as_millis()) as usize),
        )
        .when(|s: &tonic::Status| s.code() == tonic::Code::Unavailable)
        .await
        .map_err(|s| anyhow::anyhow!("Escrow: {}", explain_status(&s)))?
        .context("Escrow: the node closed the stream without an answer")?;
    if reply.emitted_certificate.is_empty() {
        bail!(
            "Escrow: no owner certificate emitted (needed proofs: {:?})",
            reply.needed
        );
    }
    Ok(reply.emitted_certificate)
}

/// How long the first election may take, and how often to ask meanwhile.
const LEADER_WAIT: Duration = Duration::from_secs(30);
const LEADER_RETRY: Duration = Duration::from_millis(100);

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
