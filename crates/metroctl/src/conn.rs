//! Connections from metroctl to a cluster.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use metropolis_identity::{ServerTrust, SigningKey};
use tonic::transport::Channel;

use crate::config::{ConfigDir, parse_endpoint};

/// What every subcommand gets: where the configuration lives and which
/// endpoints were given on the command line.
pub struct Ctx {
    pub config: ConfigDir,
    pub endpoints_flag: Option<Vec<String>>,
    pub assume_yes: bool,
}

impl Ctx {
    /// `--endpoints`, else the ones remembered by takeownership.
    pub fn endpoints(&self) -> anyhow::Result<Vec<SocketAddr>> {
        let raw = match &self.endpoints_flag {
            Some(e) => e.clone(),
            None => self.config.cluster()?.endpoints,
        };
        if raw.is_empty() {
            bail!(
                "no cluster endpoints known; pass --endpoints IP[,IP...] (or run `metroctl takeownership --endpoints IP` once)"
            );
        }
        raw.iter().map(|s| parse_endpoint(s)).collect()
    }

    /// The pinned cluster CA.
    pub fn pinned_ca(&self) -> anyhow::Result<Vec<u8>> {
        self.config.ca()?.with_context(|| {
            format!(
                "no pinned cluster CA in {}; run `metroctl takeownership --endpoints IP` first",
                self.config.root().display()
            )
        })
    }

    /// A channel authenticated as the owner, or as the named identity when
    /// `login --identity` stored its certificate, verifying nodes against the
    /// pinned CA.
    pub async fn owner_channel(&self) -> anyhow::Result<Channel> {
        let ca = self.pinned_ca()?;
        let (cert, key) = self.client_identity()?;
        self.channel(
            ServerTrust::ClusterCa {
                ca_der: ca,
                node_id: None,
            },
            Some((cert, key)),
        )
        .await
    }

    /// The certificate and key metroctl authenticates with: a named
    /// identity's after `login`, else the owner's.
    pub fn client_identity(&self) -> anyhow::Result<(Vec<u8>, SigningKey)> {
        Ok(match self.config.identity_cert()? {
            Some(cert) => (cert, self.config.require_identity_key()?),
            None => {
                let cert = self.config.owner_cert()?.with_context(|| {
                    format!(
                        "no owner certificate in {}; run `metroctl takeownership` to get one \
                         (or `metroctl login --identity NAME` as a named identity)",
                        self.config.root().display()
                    )
                })?;
                (cert, self.config.require_owner_key()?)
            }
        })
    }

    pub async fn channel(
        &self,
        trust: ServerTrust,
        identity: Option<(Vec<u8>, SigningKey)>,
    ) -> anyhow::Result<Channel> {
        let tls = metropolis_identity::client_config(trust, identity)
            .context("building TLS configuration")?;
        let endpoints = self.endpoints()?;
        let channel = metropolis_rpc::client::connect_any(&endpoints, tls.clone()).await?;
        Ok(follow_leader(channel, tls).await)
    }
}

/// Any node answers, but only the curator serves the cluster API: ask the
/// node we reached who leads (CuratorLocal.GetCurrentLeader) and go there
/// when it is another node. If the question fails, keep the channel we have;
/// the call itself then says what is wrong.
async fn follow_leader(channel: Channel, tls: Arc<rustls::ClientConfig>) -> Channel {
    use metropolis_api::curator::{
        GetCurrentLeaderRequest, curator_local_client::CuratorLocalClient,
    };
    let ask = async {
        let mut stream = CuratorLocalClient::new(channel.clone())
            .get_current_leader(GetCurrentLeaderRequest {})
            .await
            .ok()?
            .into_inner();
        stream.message().await.ok().flatten()
    };
    let Ok(Some(leader)) = tokio::time::timeout(std::time::Duration::from_secs(3), ask).await
    else {
        return channel;
    };
    if leader.leader_node_id == leader.this_node_id && !leader.leader_node_id.is_empty() {
        return channel;
    }
    let (Ok(ip), Ok(port)) = (
        leader.leader_host.parse::<std::net::IpAddr>(),
        u16::try_from(leader.leader_port),
    ) else {
        return channel;
    };
    match metropolis_rpc::client::connect(SocketAddr::new(ip, port), tls).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "the leader named by the node is unreachable; staying");
            channel
        }
    }
}

/// Trust on first use: a channel that accepts any server certificate and
/// records the one it saw, so the caller can check it against the CA it is
/// about to pin.
pub async fn capture_channel(
    addrs: &[SocketAddr],
) -> anyhow::Result<(Channel, Arc<Mutex<Option<Vec<u8>>>>)> {
    let seen = Arc::new(Mutex::new(None));
    let tls = metropolis_identity::client_config(ServerTrust::Capture(seen.clone()), None)
        .context("building TLS configuration")?;
    Ok((metropolis_rpc::client::connect_any(addrs, tls).await?, seen))
}

/// Turns a failed call into an error a person can act on.
pub fn call_error(what: &str, status: tonic::Status) -> anyhow::Error {
    let detail = metropolis_rpc::client::explain_status(&status);
    let hint = match status.code() {
        tonic::Code::Unauthenticated => {
            " (are you the owner of this cluster? run `metroctl takeownership`)"
        }
        tonic::Code::PermissionDenied => "",
        tonic::Code::Unavailable => " (is the node running and reachable?)",
        _ => "",
    };
    anyhow::anyhow!("{what} failed: {detail}{hint}")
}
