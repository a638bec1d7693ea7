//! The clients: writers of distinct values and readers, each a task with
//! its own connection to the curator leader, recording every operation.
//!
//! The registers are node labels: a write is UpdateNodeLabels of one label,
//! a read is GetNodes through the leader, looking at that label only (the
//! rest of a node's record — status, heartbeat-driven health — is not part
//! of the register).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use metropolis_api::api::{
    GetNodesRequest, UpdateNodeLabelsRequest, management_client::ManagementClient,
    update_node_labels_request,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::sync::watch;
use tonic::Code;
use tonic::transport::Channel;

use crate::history::{EventType, Function, Recorder};

/// How long a client waits for one call: a call to a stopped node would
/// otherwise hang the client for the whole fault.
pub const OP_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One register: a label on one node.
#[derive(Clone, Debug)]
pub struct Register {
    pub node_id: String,
    pub label: String,
}

#[derive(Clone)]
pub struct Target {
    pub endpoints: Vec<SocketAddr>,
    pub tls: Arc<rustls::ClientConfig>,
    pub registers: Arc<Vec<Register>>,
    pub scenario: String,
}

/// How a failed write is recorded: `Fail` only where the server promises
/// it did nothing; anything that may have reached a commit is `Unknown`.
fn write_outcome(s: &tonic::Status) -> EventType {
    match s.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::Unimplemented
        | Code::FailedPrecondition
        | Code::OutOfRange => EventType::Fail,
        _ => EventType::Unknown,
    }
}

fn short(s: &tonic::Status) -> String {
    let m: String = s.message().chars().take(120).collect();
    format!("{:?}: {m}", s.code())
}

/// A client: `writer` clients write, the others read. Runs until `stop`
/// turns true; every call is bounded by [`OP_TIMEOUT`].
pub async fn client(
    id: u32,
    writer: bool,
    seed: u64,
    target: Target,
    rec: Recorder,
    mut stop: watch::Receiver<bool>,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ (u64::from(id) << 32));
    let mut channel: Option<Channel> = None;
    let mut start = id as usize;
    let mut seq = 0u64;
    while !*stop.borrow() {
        let ch = match &channel {
            Some(ch) => ch.clone(),
            None => {
                let connect = metropolis_rpc::client::connect_leader(
                    &target.endpoints,
                    start,
                    target.tls.clone(),
                );
                match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                    Ok(Ok(c)) => {
                        channel = Some(c.channel.clone());
                        c.channel
                    }
                    _ => {
                        start += 1;
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                            _ = stop.changed() => {}
                        }
                        continue;
                    }
                }
            }
        };
        let reg = &target.registers[rng.gen_range(0..target.registers.len())];
        let failed = if writer {
            seq += 1;
            let value = format!("c{id}-{seq}");
            write(&rec, &target.scenario, id, ch, reg, value).await
        } else {
            read(&rec, &target.scenario, id, ch, reg).await.is_err()
        };
        if failed {
            // Find the leader again, starting one node further.
            channel = None;
            start += 1;
        }
        // A little think time, so clients interleave rather than queue.
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..5))).await;
    }
}

/// One write; true if it did not succeed.
pub async fn write(
    rec: &Recorder,
    scenario: &str,
    client: u32,
    ch: Channel,
    reg: &Register,
    value: String,
) -> bool {
    let p = rec.invoke(
        client,
        scenario,
        Function::Write,
        &reg.label,
        Some(value.clone()),
    );
    let mut mgmt = ManagementClient::new(ch);
    let call = mgmt.update_node_labels(UpdateNodeLabelsRequest {
        node: Some(update_node_labels_request::Node::Id(reg.node_id.clone())),
        upsert: vec![update_node_labels_request::Pair {
            key: reg.label.clone(),
            value,
        }],
        delete: vec![],
    });
    match tokio::time::timeout(OP_TIMEOUT, call).await {
        Ok(Ok(_)) => {
            rec.complete(p, EventType::Ok, None, None);
            false
        }
        Ok(Err(s)) => {
            rec.complete(p, write_outcome(&s), None, Some(short(&s)));
            true
        }
        Err(_) => {
            rec.complete(p, EventType::Unknown, None, Some("timed out".into()));
            true
        }
    }
}

/// One read through the leader. A read has no effect, so every error is a
/// plain failure.
pub async fn read(
    rec: &Recorder,
    scenario: &str,
    client: u32,
    ch: Channel,
    reg: &Register,
) -> Result<Option<String>, ()> {
    let p = rec.invoke(client, scenario, Function::Read, &reg.label, None);
    let call = async {
        let nodes: Vec<_> = ManagementClient::new(ch)
            .get_nodes(GetNodesRequest::default())
            .await?
            .into_inner()
            .try_collect()
            .await?;
        Ok::<_, tonic::Status>(nodes)
    };
    match tokio::time::timeout(OP_TIMEOUT, call).await {
        Ok(Ok(nodes)) => {
            let Some(node) = nodes.iter().find(|n| n.id == reg.node_id) else {
                rec.complete(
                    p,
                    EventType::Fail,
                    None,
                    Some(format!("node {} missing from GetNodes", reg.node_id)),
                );
                return Err(());
            };
            let value = node.labels.as_ref().and_then(|l| {
                l.pairs
                    .iter()
                    .find(|p| p.key == reg.label)
                    .map(|p| p.value.clone())
            });
            rec.complete(p, EventType::Ok, value.clone(), None);
            Ok(value)
        }
        Ok(Err(s)) => {
            rec.complete(p, EventType::Fail, None, Some(short(&s)));
            Err(())
        }
        Err(_) => {
            rec.complete(p, EventType::Fail, None, Some("timed out".into()));
            Err(())
        }
    }
}

/// After a scenario: one successful read of every register through the
/// leader (the final state the lost-write check judges), retried until
/// `limit`.
pub async fn final_reads(
    target: &Target,
    rec: &Recorder,
    client: u32,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    for reg in target.registers.iter() {
        loop {
            if let Ok(c) =
                metropolis_rpc::client::connect_leader(&target.endpoints, 0, target.tls.clone())
                    .await
                && read(rec, &target.scenario, client, c.channel, reg)
                    .await
                    .is_ok()
            {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("no final read of {} succeeded within {limit:?}", reg.label);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}
