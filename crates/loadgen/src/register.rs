//! Phase 1: simulated nodes register, get approved and commit, as
//! `metropolis-node` does with ClusterRegister parameters (see the node's
//! `membership::register`), minus its retries: a load generator has to
//! count a failure, not paper over it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use metropolis_api::api::{ApproveNodeRequest, management_client::ManagementClient};
use metropolis_api::curator::{
    CommitNodeRequest, RegisterNodeRequest, curator_client::CuratorClient,
};
use metropolis_identity::SigningKey;
use metropolis_rpc::client::explain_status;
use tonic::transport::Channel;

use crate::progress::Progress;
use crate::stats::{ErrorTally, Samples};

/// What a simulated node keeps after it was admitted.
pub struct Admitted {
    pub key: SigningKey,
    pub id: String,
    pub certificate: Vec<u8>,
}

pub struct Setup {
    pub addr: SocketAddr,
    pub ca: Arc<Vec<u8>>,
    pub ticket: Arc<Vec<u8>>,
    /// Shared by all registrations: approvals are multiplexed on the one
    /// HTTP/2 connection an operator would use.
    pub owner: ManagementClient<Channel>,
}

#[derive(Default)]
pub struct Results {
    pub admitted: Vec<Admitted>,
    pub errors: ErrorTally,
    pub wall: Duration,
    /// The whole cycle: key, certificate, TLS, register, approve, commit.
    pub cycle: Samples,
    pub connect: Samples,
    pub register: Samples,
    pub approve: Samples,
    pub commit: Samples,
}

struct Timings {
    cycle: Duration,
    connect: Duration,
    register: Duration,
    approve: Duration,
    commit: Duration,
}

/// A failed registration, naming the step.
struct Failed {
    step: &'static str,
    message: String,
}

impl Failed {
    fn status(step: &'static str, s: &tonic::Status) -> Failed {
        Failed {
            step,
            message: format!("{:?}: {}", s.code(), explain_status(s)),
        }
    }

    fn other(step: &'static str, e: impl std::fmt::Display) -> Failed {
        Failed {
            step,
            message: e.to_string(),
        }
    }
}

async fn register_one(setup: Arc<Setup>) -> Result<(Admitted, Timings), Failed> {
    let start = Instant::now();
    let key = metropolis_identity::generate_key();
    let pubkey = key.verifying_key().to_bytes();
    let id = metropolis_identity::node_id(&pubkey);
    let self_signed = metropolis_identity::self_signed_certificate(&key, &id)
        .map_err(|e| Failed::other("self-signed certificate", e))?;

    let t = Instant::now();
    let ch = crate::cluster::channel(setup.addr, &setup.ca, (self_signed, key.clone()))
        .await
        .map_err(|e| Failed::other("TLS connect", format!("{e:#}")))?;
    let connect = t.elapsed();
    let mut curator = CuratorClient::new(ch);

    let t = Instant::now();
    curator
        .register_node(RegisterNodeRequest {
            register_ticket: setup.ticket.to_vec(),
            labels: None,
            ..Default::default()
        })
        .await
        .map_err(|s| Failed::status("RegisterNode", &s))?;
    let register = t.elapsed();

    let t = Instant::now();
    setup
        .owner
        .clone()
        .approve_node(ApproveNodeRequest {
            pubkey: pubkey.to_vec(),
        })
        .await
        .map_err(|s| Failed::status("ApproveNode", &s))?;
    let approve = t.elapsed();

    let t = Instant::now();
    let committed = curator
        .commit_node(CommitNodeRequest::default())
        .await
        .map_err(|s| Failed::status("CommitNode", &s))?
        .into_inner();
    let commit = t.elapsed();
    let cycle = start.elapsed();

    check_certificate(&committed.node_certificate, &pubkey, &id)
        .map_err(|e| Failed::other("CommitNode", format!("{e:#}")))?;
    Ok((
        Admitted {
            key,
            id,
            certificate: committed.node_certificate,
        },
        Timings {
            cycle,
            connect,
            register,
            approve,
            commit,
        },
    ))
}

/// A node certificate the heartbeat phase can use: for our key and ID.
/// (Its chain is checked by the server when it is presented.)
fn check_certificate(der: &[u8], pubkey: &[u8; 32], id: &str) -> anyhow::Result<()> {
    let cert = metropolis_identity::parse_certificate(der)
        .context("the curator sent an unparseable node certificate")?;
    if cert.public_key != *pubkey {
        bail!("the curator sent a node certificate for another key");
    }
    if !cert.is_node_certificate() || cert.node_id() != id {
        bail!("the curator sent a certificate that is not a node certificate for {id}");
    }
    Ok(())
}

/// Registers `n` nodes with at most `concurrency` cycles in flight.
pub async fn run(setup: Setup, n: usize, concurrency: usize, progress: &Progress) -> Results {
    let setup = Arc::new(setup);
    let bar = progress.bar(n as u64, "register");
    let mut results = Results {
        admitted: Vec::with_capacity(n),
        ..Default::default()
    };
    let start = Instant::now();
    // Spawned tasks rather than futures polled by this one task, so the
    // client-side crypto (key generation, certificate signing, handshakes)
    // spreads over the runtime's worker threads; buffer_unordered spawns
    // lazily, which is what bounds the cycles in flight.
    let mut cycles = futures::stream::iter(0..n)
        .map(|_| tokio::spawn(register_one(setup.clone())))
        .buffer_unordered(concurrency);
    while let Some(joined) = cycles.next().await {
        match joined {
            Ok(Ok((admitted, t))) => {
                results.cycle.push(t.cycle);
                results.connect.push(t.connect);
                results.register.push(t.register);
                results.approve.push(t.approve);
                results.commit.push(t.commit);
                results.admitted.push(admitted);
            }
            Ok(Err(f)) => {
                if results.errors.total() == 0 {
                    tracing::warn!(step = f.step, error = %f.message, "registration failed (further failures are counted in the report)");
                }
                results.errors.add(f.step, &f.message);
                bar.set_message(format!("{} errors", results.errors.total()));
            }
            Err(e) => results.errors.add("registration task", &e.to_string()),
        }
        bar.inc(1);
    }
    results.wall = start.elapsed();
    bar.finish();
    results
}
