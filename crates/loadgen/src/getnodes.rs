//! Phase 3: how long Management.GetNodes takes over the whole cluster, with
//! and without a filter, and what health it reports.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use metropolis_api::api::{GetNodesRequest, management_client::ManagementClient, node::Health};
use metropolis_rpc::client::explain_status;
use tonic::transport::Channel;

use crate::stats::Samples;

pub const UP_FILTER: &str = "node.state == NODE_STATE_UP";

/// One call, read to the end.
struct Call {
    /// From the call to the last message.
    took: Duration,
    nodes: usize,
    /// Encoded size of the nodes (protobuf, without gRPC framing).
    bytes: u64,
    /// Of the simulated nodes, how many were HEALTHY.
    simulated_healthy: usize,
}

async fn timed(
    owner: &mut ManagementClient<Channel>,
    filter: &str,
    simulated: &HashSet<String>,
) -> anyhow::Result<Call> {
    let start = Instant::now();
    let mut stream = owner
        .get_nodes(GetNodesRequest {
            filter: filter.into(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("GetNodes({filter:?}): {}", explain_status(&s)))?
        .into_inner();
    let mut n = 0;
    let mut bytes = 0u64;
    let mut simulated_healthy = 0;
    while let Some(node) = stream.next().await {
        let node = node.map_err(|s| {
            anyhow::anyhow!(
                "GetNodes({filter:?}) failed after {n} nodes: {}",
                explain_status(&s)
            )
        })?;
        n += 1;
        bytes += prost::Message::encoded_len(&node) as u64;
        if node.health == Health::Healthy as i32 && simulated.contains(&node.id) {
            simulated_healthy += 1;
        }
    }
    Ok(Call {
        took: start.elapsed(),
        nodes: n,
        bytes,
        simulated_healthy,
    })
}

#[derive(Default)]
pub struct Timings {
    pub unfiltered: Samples,
    pub filtered: Samples,
    pub unfiltered_count: usize,
    pub filtered_count: usize,
    /// Encoded size of the nodes of one unfiltered read.
    pub unfiltered_bytes: u64,
    /// Simulated nodes not HEALTHY in each read (unfiltered and filtered).
    pub unhealthy_per_read: Vec<usize>,
}

impl Timings {
    /// Nodes/s and MB/s of the median unfiltered read.
    pub fn unfiltered_throughput(&self) -> Option<(f64, f64)> {
        let secs = self.unfiltered.clone().median()?.as_secs_f64().max(1e-9);
        Some((
            self.unfiltered_count as f64 / secs,
            self.unfiltered_bytes as f64 / secs / 1e6,
        ))
    }
}

/// `repeats` calls of each kind, alternating so that both see the same
/// background load (the heartbeats keep running).
pub async fn measure(
    owner: &mut ManagementClient<Channel>,
    repeats: usize,
    simulated: &HashSet<String>,
) -> anyhow::Result<Timings> {
    let mut t = Timings::default();
    for _ in 0..repeats {
        let c = timed(owner, "", simulated).await?;
        t.unfiltered.push(c.took);
        t.unfiltered_count = c.nodes;
        t.unfiltered_bytes = c.bytes;
        t.unhealthy_per_read
            .push(simulated.len().saturating_sub(c.simulated_healthy));
        // Every simulated node is UP, so the filter keeps them all.
        let c = timed(owner, UP_FILTER, simulated).await?;
        t.filtered.push(c.took);
        t.filtered_count = c.nodes;
        t.unhealthy_per_read
            .push(simulated.len().saturating_sub(c.simulated_healthy));
    }
    Ok(t)
}

#[derive(Debug, Default)]
pub struct HealthCount {
    pub healthy: usize,
    pub timeout: usize,
    pub unknown: usize,
    /// HEALTH_INVALID or a value this build does not know.
    pub other: usize,
}

impl HealthCount {
    fn add(&mut self, health: i32) {
        match Health::try_from(health) {
            Ok(Health::Healthy) => self.healthy += 1,
            Ok(Health::HeartbeatTimeout) => self.timeout += 1,
            Ok(Health::Unknown) => self.unknown += 1,
            _ => self.other += 1,
        }
    }
}

pub struct HealthReport {
    /// The simulated nodes.
    pub simulated: HealthCount,
    /// Simulated nodes GetNodes did not return.
    pub missing: usize,
    /// Everything else in the cluster (the bootstrap node).
    pub others: HealthCount,
    /// How long after the node started the snapshot was taken.
    pub at_uptime: Duration,
    /// The largest time since a heartbeat among simulated nodes.
    pub max_since_heartbeat: Option<Duration>,
}

/// One unfiltered GetNodes, its nodes sorted by health.
pub async fn health(
    owner: &mut ManagementClient<Channel>,
    simulated: &HashSet<String>,
    node_started: Instant,
) -> anyhow::Result<HealthReport> {
    let at_uptime = node_started.elapsed();
    let mut stream = owner
        .get_nodes(GetNodesRequest::default())
        .await
        .map_err(|s| anyhow::anyhow!("GetNodes: {}", explain_status(&s)))?
        .into_inner();
    let mut report = HealthReport {
        simulated: HealthCount::default(),
        missing: 0,
        others: HealthCount::default(),
        at_uptime,
        max_since_heartbeat: None,
    };
    let mut seen = 0;
    while let Some(node) = stream.next().await {
        let node = node.map_err(|s| anyhow::anyhow!("GetNodes: {}", explain_status(&s)))?;
        if simulated.contains(&node.id) {
            seen += 1;
            report.simulated.add(node.health);
            if let Some(since) = node.time_since_heartbeat {
                let since = Duration::try_from(since)
                    .context("GetNodes returned a negative time since heartbeat")?;
                report.max_since_heartbeat = report.max_since_heartbeat.max(Some(since));
            }
        } else {
            report.others.add(node.health);
        }
    }
    report.missing = simulated.len().saturating_sub(seen);
    Ok(report)
}
