//! TLS channels from clients (metroctl, nodes, tests) to nodes.
//!
//! Nodes are addressed by IP and present certificates named after their node
//! ID, so the server check is done by the TLS configuration's verifier
//! (metropolis-identity), not by hostname; no SNI is sent. The connector is
//! ours rather than tonic's so that the same rustls configuration (client
//! certificate included) is used everywhere.

use std::error::Error as _;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A channel to one node. Connects eagerly so that an unreachable node or a
/// TLS failure shows up here, not at the first call.
pub async fn connect(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Channel, ConnectError> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ConnectError {
            addr,
            message: e.to_string(),
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(Duration::from_secs(30))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20));
    endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let tls = tls.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let _ = tcp.set_nodelay(true);
                let stream = TlsConnector::from(tls)
                    .connect(ServerName::IpAddress(addr.ip().into()), tcp)
                    .await?;
                Ok::<_, io::Error>(TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| ConnectError {
            addr,
            message: explain_error(&e),
        })
}

/// A channel to the first of `addrs` that answers.
pub async fn connect_any(
    addrs: &[SocketAddr],
    tls: Arc<rustls::ClientConfig>,
) -> Result<Channel, ConnectError> {
    let mut last = None;
    for addr in addrs {
        match connect(*addr, tls.clone()).await {
            Ok(ch) => return Ok(ch),
            Err(e) => {
                tracing::debug!(%addr, error = %e, "endpoint failed");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or(ConnectError {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        message: "no endpoints given".into(),
    }))
}

/// How long a node may take to say who leads.
const LEADER_QUESTION_TIMEOUT: Duration = Duration::from_secs(3);

/// A channel to the curator leader, found from any of `addrs`: every node
/// answers CuratorLocal.GetCurrentLeader, so ask them all at once and take
/// the first that leads, or go where one points. All at once because a
/// stopped or dead node stalls its TCP or TLS handshake up to
/// [`CONNECT_TIMEOUT`]: asked in turn, every such node ahead of the leader
/// would add that much to a failover. Nodes that know no leader (an election
/// in progress) are passed over; if none knows one, a reachable node's
/// channel is returned (the first in `start` order), and calls on it say what
/// is wrong (UNAVAILABLE naming the leader, or that there is none yet), which
/// callers retry.
///
/// `start` rotates the order in which a fallback is chosen, so that a client
/// retrying after a failure does not use the same node every time.
pub async fn connect_leader(
    addrs: &[SocketAddr],
    start: usize,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Connected, ConnectError> {
    let n = addrs.len();
    let mut asks = tokio::task::JoinSet::new();
    for i in 0..n {
        let addr = addrs[(start + i) % n];
        // A leader named by another node is followed only if it is not among
        // `addrs`: there, its own answer comes anyway.
        let known = addrs.to_vec();
        asks.spawn(ask_candidate(i, addr, known, tls.clone()));
    }
    let mut fallback: Option<(usize, Channel, SocketAddr)> = None;
    let mut last = None;
    while let Some(joined) = asks.join_next().await {
        let Ok(answer) = joined else { continue };
        match answer {
            Answer::Leader(connected) => return Ok(connected),
            Answer::Reachable(order, channel, addr) => {
                if fallback.as_ref().is_none_or(|(o, _, _)| order < *o) {
                    fallback = Some((order, channel, addr));
                }
            }
            Answer::Failed(e) => last = Some(e),
        }
    }
    if let Some((_, channel, addr)) = fallback {
        return Ok(Connected {
            channel,
            addr,
            leader: false,
            leader_node_id: String::new(),
        });
    }
    Err(last.unwrap_or(ConnectError {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        message: "no endpoints given".into(),
    }))
}

/// What one of [`connect_leader`]'s candidates said.
enum Answer {
    Leader(Connected),
    /// Reachable, but neither it nor the node it named leads; `usize` is its
    /// place in the `start` order.
    Reachable(usize, Channel, SocketAddr),
    Failed(ConnectError),
}

async fn ask_candidate(
    order: usize,
    addr: SocketAddr,
    known: Vec<SocketAddr>,
    tls: Arc<rustls::ClientConfig>,
) -> Answer {
    let channel = match connect(addr, tls.clone()).await {
        Ok(ch) => ch,
        Err(e) => {
            tracing::debug!(%addr, error = %e, "endpoint failed");
            return Answer::Failed(e);
        }
    };
    let Some(leader) = ask_leader(channel.clone()).await else {
        return Answer::Reachable(order, channel, addr);
    };
    if let Some(connected) = leading(&channel, addr, &leader) {
        return Answer::Leader(connected);
    }
    let Ok(ip) = leader.leader_host.parse::<std::net::IpAddr>() else {
        return Answer::Reachable(order, channel, addr);
    };
    let port = u16::try_from(leader.leader_port).unwrap_or(addr.port());
    let leader_addr = SocketAddr::new(ip, port);
    if known.contains(&leader_addr) {
        return Answer::Reachable(order, channel, addr);
    }
    // Nodes that are not consensus members pass on what their own connection
    // found, which may be stale: ask the named node itself.
    match connect(leader_addr, tls).await {
        Ok(led) => match ask_leader(led.clone())
            .await
            .and_then(|l| leading(&led, leader_addr, &l))
        {
            Some(connected) => Answer::Leader(connected),
            None => Answer::Reachable(order, channel, addr),
        },
        Err(e) => {
            tracing::debug!(%leader_addr, error = %e, "the leader named by {addr} is unreachable");
            Answer::Reachable(order, channel, addr)
        }
    }
}

/// `channel` to `addr` as a [`Connected`] leader, if `answer` says the node
/// leads.
fn leading(
    channel: &Channel,
    addr: SocketAddr,
    answer: &metropolis_api::curator::GetCurrentLeaderResponse,
) -> Option<Connected> {
    (!answer.leader_node_id.is_empty() && answer.leader_node_id == answer.this_node_id).then(|| {
        Connected {
            channel: channel.clone(),
            addr,
            leader: true,
            leader_node_id: answer.leader_node_id.clone(),
        }
    })
}

/// A channel from [`connect_leader`].
pub struct Connected {
    pub channel: Channel,
    pub addr: SocketAddr,
    /// Whether `addr` said it leads (else it is just a node that answered).
    pub leader: bool,
    /// The leader's node ID, when `leader`.
    pub leader_node_id: String,
}

async fn ask_leader(channel: Channel) -> Option<metropolis_api::curator::GetCurrentLeaderResponse> {
    use metropolis_api::curator::{
        GetCurrentLeaderRequest, curator_local_client::CuratorLocalClient,
    };
    let ask = async {
        let mut stream = CuratorLocalClient::new(channel)
            .get_current_leader(GetCurrentLeaderRequest {})
            .await
            .ok()?
            .into_inner();
        stream.message().await.ok().flatten()
    };
    tokio::time::timeout(LEADER_QUESTION_TIMEOUT, ask)
        .await
        .ok()
        .flatten()
}

#[derive(Debug, thiserror::Error)]
#[error("cannot connect to {addr}: {message}")]
pub struct ConnectError {
    pub addr: SocketAddr,
    pub message: String,
}

/// The innermost useful message of an error chain (tonic wraps the cause of a
/// transport failure several levels deep), rephrased for the common TLS cases.
pub fn explain_error(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let mut deepest = err.to_string();
    while let Some(e) = cur {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return explain_tls(tls);
        }
        if let Some(ioe) = e.downcast_ref::<io::Error>() {
            if let Some(tls) = ioe
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            {
                return explain_tls(tls);
            }
            deepest = match ioe.kind() {
                io::ErrorKind::ConnectionRefused => {
                    "connection refused (is the node running?)".into()
                }
                io::ErrorKind::TimedOut => "timed out".into(),
                _ => ioe.to_string(),
            };
            break;
        }
        deepest = e.to_string();
        cur = e.source();
    }
    deepest
}

fn explain_tls(e: &rustls::Error) -> String {
    match e {
        rustls::Error::AlertReceived(rustls::AlertDescription::DecryptError)
        | rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate)
        | rustls::Error::AlertReceived(rustls::AlertDescription::CertificateUnknown) => {
            "our client certificate was rejected by the server".into()
        }
        rustls::Error::InvalidCertificate(inner) => format!(
            "the server's certificate was rejected ({inner:?}); is this the cluster whose CA you pinned?"
        ),
        other => format!("TLS error: {other}"),
    }
}

/// A human sentence for a failed call: the status message, or for transport
/// failures the underlying cause.
pub fn explain_status(status: &tonic::Status) -> String {
    if let Some(src) = status.source()
        && matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown
        )
    {
        return explain_error(src);
    }
    status.message().to_string()
}

/// A call made by [`fetch_ca_unverified`] or [`escrow_owner`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("building the TLS client configuration: {0}")]
    Tls(String),
    #[error("{call}: {message}")]
    Status { call: &'static str, message: String },
    #[error("Escrow: {0}")]
    Escrow(String),
}

/// The CA certificate the node at `addr` serves, fetched without verifying
/// it: trust on first use, sound only for a node the caller started itself
/// on loopback (tools and tests), or when the CA is checked afterwards.
pub async fn fetch_ca_unverified(addr: SocketAddr) -> Result<Vec<u8>, CallError> {
    use metropolis_api::curator::{
        GetCaCertificateRequest, curator_local_client::CuratorLocalClient,
    };
    let seen = Arc::new(std::sync::Mutex::new(None));
    let tls =
        metropolis_identity::client_config(metropolis_identity::ServerTrust::Capture(seen), None)
            .map_err(|e| CallError::Tls(e.to_string()))?;
    let ch = connect(addr, tls).await?;
    let resp = CuratorLocalClient::new(ch)
        .get_ca_certificate(GetCaCertificateRequest {})
        .await
        .map_err(|s| CallError::Status {
            call: "GetCACertificate",
            message: explain_status(&s),
        })?;
    Ok(resp.into_inner().identity_ca_certificate)
}

/// Trades an owner key for the owner certificate (AAA.Escrow with a
/// self-signed certificate), as metroctl's `takeownership` does.
/// How often, and how many times, a first call waits for a curator that
/// has not yet won its first election (about 30 s in all).
const ELECTION_RETRY: Duration = Duration::from_millis(100);
const ELECTION_RETRIES: usize = 300;

pub async fn escrow_owner(
    addr: SocketAddr,
    ca: &[u8],
    owner: &metropolis_identity::SigningKey,
) -> Result<Vec<u8>, CallError> {
    use backon::Retryable;
    use metropolis_api::api::{EscrowRequest, aaa_client::AaaClient, escrow_request::Parameters};
    let self_signed = metropolis_identity::self_signed_certificate(owner, "")
        .map_err(|e| CallError::Escrow(format!("creating the initial owner certificate: {e}")))?;
    let trust = metropolis_identity::ServerTrust::ClusterCa {
        ca_der: ca.to_vec(),
        node_id: None,
    };
    let tls = metropolis_identity::client_config(trust, Some((self_signed, owner.clone())))
        .map_err(|e| CallError::Tls(e.to_string()))?;
    let ch = connect(addr, tls).await?;
    let request = EscrowRequest {
        parameters: Some(Parameters {
            requested_identity_name: "owner".into(),
            public_key: owner.verifying_key().to_bytes().to_vec(),
        }),
        proofs: None,
    };
    let status = |s: tonic::Status| CallError::Status {
        call: "Escrow",
        message: explain_status(&s),
    };
    // A node serves a moment before its curator has won its first election;
    // meanwhile Escrow answers UNAVAILABLE. Every first step of an owner
    // (metroctl, tests, load and fault tools) waits that out here.
    let attempt = || async {
        AaaClient::new(ch.clone())
            .escrow(tokio_stream::iter([request.clone()]))
            .await?
            .into_inner()
            .message()
            .await
    };
    let reply = attempt
        .retry(
            backon::ConstantBuilder::default()
                .with_delay(ELECTION_RETRY)
                .with_max_times(ELECTION_RETRIES),
        )
        .when(|s: &tonic::Status| s.code() == tonic::Code::Unavailable)
        .await
        .map_err(status)?
        .ok_or_else(|| CallError::Escrow("the node closed the stream without an answer".into()))?;
    if reply.emitted_certificate.is_empty() {
        return Err(CallError::Escrow(format!(
            "no owner certificate emitted (needed proofs: {:?})",
            reply.needed
        )));
    }
    Ok(reply.emitted_certificate)
}
