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
    /// `--insecure-accept-and-persist-first-encountered-ca`.
    pub accept_first_ca: bool,
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

    /// The cluster CA: the pinned one, or on first use (as upstream's
    /// `GetClusterCAWithTOFU`) the one the cluster presents, pinned once
    /// trusted. Credentials already issued decide without asking: the CA
    /// must be the one that signed them. Otherwise the operator confirms the
    /// fingerprint (`--yes`, or `--insecure-accept-and-persist-first-encountered-ca`).
    pub async fn cluster_ca(&self) -> anyhow::Result<Vec<u8>> {
        if let Some(ca) = self.config.ca()? {
            return Ok(ca);
        }
        let endpoints = self.endpoints()?;
        let ca = fetch_ca_trust_on_first_use(&endpoints).await?;
        let fingerprint = metropolis_identity::fingerprint_sha256(&ca);
        match self.issued_certificate()? {
            Some(cert) => {
                let cert = metropolis_identity::parse_certificate(&cert)
                    .context("your certificate in the configuration directory is invalid")?;
                metropolis_identity::verify_signed_by(&cert, &ca, time::OffsetDateTime::now_utc())
                    .with_context(|| {
                        format!(
                            "the cluster at {} presents CA {fingerprint}, which did not issue your \
                             certificate in {}; refusing to trust it (wrong endpoints?)",
                            endpoints_text(&endpoints),
                            self.config.root().display()
                        )
                    })?;
            }
            None => {
                eprintln!("Cluster CA certificate fingerprint (SHA-256): {fingerprint}");
                if !self.trust_new_ca()? {
                    bail!("the CA was not trusted; nothing was changed");
                }
            }
        }
        self.config.write(
            crate::config::CA_CERT,
            metropolis_identity::cert_to_pem(&ca).as_bytes(),
        )?;
        eprintln!(
            "Pinned the cluster CA {fingerprint} in {}.",
            self.config.root().display()
        );
        Ok(ca)
    }

    /// Asks whether to trust a CA seen for the first time.
    pub fn trust_new_ca(&self) -> anyhow::Result<bool> {
        if self.accept_first_ca {
            return Ok(true);
        }
        crate::cmd::confirm(self, "Trust this CA and pin it?")
    }

    /// The certificate the cluster issued to this configuration directory
    /// (a named identity's after `login`, else the owner's), if any.
    fn issued_certificate(&self) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(match self.config.identity_cert()? {
            Some(cert) => Some(cert),
            None => self.config.owner_cert()?,
        })
    }

    /// A channel authenticated as the owner, or as the named identity when
    /// `login --identity` stored its certificate, verifying nodes against the
    /// pinned CA.
    pub async fn owner_channel(&self) -> anyhow::Result<Channel> {
        let ca = self.cluster_ca().await?;
        let (cert, key) = self.renewed_client_identity(&ca).await?;
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
        self.client_identity_file()
            .map(|(_, cert, key)| (cert, key))
    }

    /// [`Self::client_identity`], renewed through Escrow first once a third
    /// of its lifetime is left (or it expired: the key is what Escrow
    /// checks). Says so on stderr when it did. A failed renewal of a
    /// certificate that is still valid is a warning: the command goes on.
    async fn renewed_client_identity(&self, ca: &[u8]) -> anyhow::Result<(Vec<u8>, SigningKey)> {
        let (file, cert, key) = self.client_identity_file()?;
        // A certificate that does not parse is left to the server to refuse,
        // with its reason.
        let Ok(parsed) = metropolis_identity::parse_certificate(&cert) else {
            return Ok((cert, key));
        };
        let now = time::OffsetDateTime::now_utc();
        if !parsed.renewal_due(now) {
            return Ok((cert, key));
        }
        let name = parsed.common_name.clone();
        match crate::cmd::takeownership::escrow(self, ca, &name, &key).await {
            Ok(renewed) => {
                self.config
                    .write(file, metropolis_identity::cert_to_pem(&renewed).as_bytes())?;
                let until = metropolis_identity::parse_certificate(&renewed)
                    .map(|c| metropolis_identity::rfc3339(c.not_after))
                    .unwrap_or_default();
                eprintln!(
                    "Renewed the certificate of {name} ({}); valid until {until}.",
                    self.config.path(file).display()
                );
                Ok((renewed, key))
            }
            Err(e) if now < parsed.not_after => {
                eprintln!(
                    "warning: could not renew the certificate of {name}, which expires at {}: {e:#}",
                    metropolis_identity::rfc3339(parsed.not_after)
                );
                Ok((cert, key))
            }
            Err(e) => Err(e.context(format!(
                "the certificate of {name} expired at {} and could not be renewed; run \
                 `metroctl takeownership` (the owner) or `metroctl login` (a named identity)",
                metropolis_identity::rfc3339(parsed.not_after)
            ))),
        }
    }

    /// The file the client certificate is in, the certificate and its key.
    fn client_identity_file(&self) -> anyhow::Result<(&'static str, Vec<u8>, SigningKey)> {
        Ok(match self.config.identity_cert()? {
            Some(cert) => (
                crate::config::IDENTITY_CERT,
                cert,
                self.config.require_identity_key()?,
            ),
            None => {
                let cert = self.config.owner_cert()?.with_context(|| {
                    format!(
                        "no owner certificate in {}; run `metroctl takeownership` to get one \
                         (or `metroctl login --identity NAME` as a named identity)",
                        self.config.root().display()
                    )
                })?;
                (
                    crate::config::OWNER_CERT,
                    cert,
                    self.config.require_owner_key()?,
                )
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

fn endpoints_text(endpoints: &[SocketAddr]) -> String {
    endpoints
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Fetches the CA without trusting anything yet, and checks that the node we
/// talked to holds a certificate issued by that CA, so the fingerprint shown
/// to the operator is the one the cluster actually uses.
pub async fn fetch_ca_trust_on_first_use(endpoints: &[SocketAddr]) -> anyhow::Result<Vec<u8>> {
    use metropolis_api::curator::{
        GetCaCertificateRequest, curator_local_client::CuratorLocalClient,
    };
    let (channel, seen) = capture_channel(endpoints).await?;
    let ca = CuratorLocalClient::new(channel)
        .get_ca_certificate(GetCaCertificateRequest {})
        .await
        .map_err(|s| call_error("GetCACertificate", s))?
        .into_inner()
        .identity_ca_certificate;
    let server = seen
        .lock()
        .map_err(|_| anyhow::anyhow!("internal error: certificate capture poisoned"))?
        .clone()
        .context("the node presented no certificate")?;
    let server = metropolis_identity::parse_certificate(&server)
        .context("the node's certificate is invalid")?;
    metropolis_identity::verify_signed_by(&server, &ca, time::OffsetDateTime::now_utc())
        .context("the node's certificate is not signed by the CA it sent; refusing to pin it")?;
    Ok(ca)
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

/// GET `path` over HTTPS from node `node_id` at `addr` (its metrics port),
/// as the operator, verifying the node by the pinned CA and its ID.
pub async fn https_get(
    ctx: &Ctx,
    addr: SocketAddr,
    node_id: &str,
    path: &str,
) -> anyhow::Result<(hyper::StatusCode, hyper::body::Bytes)> {
    use http_body_util::BodyExt;
    let (cert, key) = ctx.client_identity()?;
    let tls = metropolis_identity::client_config(
        ServerTrust::ClusterCa {
            ca_der: ctx.cluster_ca().await?,
            node_id: Some(node_id.to_string()),
        },
        Some((cert, key)),
    )
    .context("building TLS configuration")?;
    let mut tls = (*tls).clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let fetch = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS with {addr} failed"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())?;
        let resp = sender
            .send_request(req)
            .await
            .with_context(|| format!("GET https://{addr}{path} failed"))?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(std::time::Duration::from_secs(20), fetch)
        .await
        .with_context(|| format!("https://{addr}{path} did not answer within 20s"))?
}
