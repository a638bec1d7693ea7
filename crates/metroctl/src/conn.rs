//! Connections from metroctl to a cluster.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use metropolis_identity::{ServerTrust, SigningKey};
use tonic::transport::Channel;

use crate::config::{ConfigDir, parse_endpoint};

/// How long a command waits for the cluster to elect a curator leader.
const LEADER_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

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
        // During a failover no node knows a leader for a few seconds: wait
        // for one (with backoff) rather than fail the command, but not
        // forever — past the deadline the call itself says what is wrong.
        let deadline = std::time::Instant::now() + LEADER_WAIT;
        let mut delay = std::time::Duration::from_millis(200);
        loop {
            let c = metropolis_rpc::client::connect_leader(&endpoints, 0, tls.clone()).await?;
            if c.leader || std::time::Instant::now() + delay > deadline {
                return Ok(c.channel);
            }
            tracing::debug!(node = %c.addr, "no curator leader known yet; waiting {delay:?}");
            tokio::time::sleep(delay).await;
            // A new leader serves within about a lease TTL: look often
            // enough not to add seconds of our own.
            delay = (delay * 2).min(std::time::Duration::from_millis(500));
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
    // Escrow is served by the curator leader only; every node names it.
    let connected = metropolis_rpc::client::connect_leader(addrs, 0, tls).await?;
    Ok((connected.channel, seen))
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
