//! The scenarios and their faults. Each fault is injected and healed in
//! one call, which returns when the cluster should be whole again.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use metropolis_api::admin::{SetFailpointRequest, node_faults_client::NodeFaultsClient};
use metropolis_identity::ServerTrust;
use rand::Rng;

use crate::cluster::{Cluster, DEBUG_PORT, LEASE_TTL, signal};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    EmbeddedKill,
    FailpointCommit,
    LeaderKill,
    LeaderPause,
    EtcdKill,
    PartitionLike,
}

/// Which cluster a scenario runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterKind {
    /// One node on the embedded store.
    Embedded,
    /// One node on the embedded store, built with `--features debug`.
    EmbeddedDebug,
    /// Three consensus members on etcd.
    Ha,
}

const SETTLE: Duration = Duration::from_secs(60);

impl Scenario {
    /// In the order a default run takes them (grouped by cluster).
    pub const ALL: [Scenario; 6] = [
        Scenario::EmbeddedKill,
        Scenario::FailpointCommit,
        Scenario::LeaderKill,
        Scenario::LeaderPause,
        Scenario::EtcdKill,
        Scenario::PartitionLike,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::EmbeddedKill => "embedded-kill",
            Scenario::FailpointCommit => "failpoint-commit",
            Scenario::LeaderKill => "leader-kill",
            Scenario::LeaderPause => "leader-pause",
            Scenario::EtcdKill => "etcd-kill",
            Scenario::PartitionLike => "partition-like",
        }
    }

    pub fn parse(name: &str) -> anyhow::Result<Scenario> {
        Scenario::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .with_context(|| {
                let names: Vec<_> = Scenario::ALL.iter().map(|s| s.name()).collect();
                let shown: String = name.chars().take(40).collect();
                format!(
                    "unknown scenario {shown:?}; the scenarios are {}",
                    names.join(", ")
                )
            })
    }

    pub fn cluster(self) -> ClusterKind {
        match self {
            Scenario::EmbeddedKill => ClusterKind::Embedded,
            Scenario::FailpointCommit => ClusterKind::EmbeddedDebug,
            _ => ClusterKind::Ha,
        }
    }

    /// Injects fault number `n` of this scenario and heals it; returns what
    /// was done, for the log.
    pub async fn inject(
        self,
        c: &mut Cluster,
        n: usize,
        rng: &mut impl Rng,
    ) -> anyhow::Result<String> {
        match self {
            Scenario::EmbeddedKill => {
                let down = Duration::from_millis(rng.gen_range(200..800));
                let node = &mut c.nodes[0];
                node.kill().await?;
                tokio::time::sleep(down).await;
                node.restart()?;
                node.wait_serving().await?;
                let settled = c.wait_settled(SETTLE).await?;
                Ok(format!(
                    "SIGKILL of the single node mid-write, restarted after {down:?}; serving again {settled:?} later"
                ))
            }
            Scenario::FailpointCommit => {
                let (actions, window) = match n % 3 {
                    0 => ("return", Duration::from_millis(1500)),
                    1 => ("50%return", Duration::from_secs(2)),
                    // Commits delayed past the clients' timeout: writes they
                    // record as unknown commit afterwards.
                    _ => ("20%sleep(2500)", Duration::from_secs(2)),
                };
                set_failpoint(c, actions).await?;
                tokio::time::sleep(window).await;
                set_failpoint(c, "off").await?;
                c.wait_settled(SETTLE).await?;
                Ok(format!(
                    "failpoint curator::store_commit={actions} for {window:?}"
                ))
            }
            Scenario::LeaderKill => {
                let l = leader(c).await?;
                let killed = Instant::now();
                c.nodes[l].kill().await?;
                let (new, after) = new_leader(c, l).await?;
                c.nodes[l].restart()?;
                c.nodes[l].wait_serving().await?;
                let settled = c.wait_settled(SETTLE).await?;
                Ok(format!(
                    "SIGKILL of the curator leader {}; {} led {after:?} later; restarted, settled {:?} after the kill",
                    c.nodes[l].name,
                    c.nodes[new].name,
                    killed.elapsed().max(settled)
                ))
            }
            Scenario::LeaderPause => {
                let l = leader(c).await?;
                let pause = 2 * LEASE_TTL + Duration::from_millis(rng.gen_range(500..1500));
                c.nodes[l].signal(libc::SIGSTOP)?;
                let stopped = Instant::now();
                let replaced = new_leader(c, l).await;
                let rest = pause.saturating_sub(stopped.elapsed());
                tokio::time::sleep(rest).await;
                let paused = stopped.elapsed();
                c.nodes[l].signal(libc::SIGCONT)?;
                let (new, after) = replaced?;
                let settled = c.wait_settled(SETTLE).await?;
                Ok(format!(
                    "SIGSTOP of the curator leader {} for {:?} (lease {LEASE_TTL:?}); {} led {after:?} after the stop; settled {settled:?} after SIGCONT",
                    c.nodes[l].name, paused, c.nodes[new].name,
                ))
            }
            Scenario::EtcdKill => {
                let l = leader(c).await?;
                // Alternately the leader's own etcd and a follower's.
                let m = if n.is_multiple_of(2) {
                    l
                } else {
                    (l + 1) % c.nodes.len()
                };
                let old = c.nodes[m].etcd_pid()?;
                signal(old, libc::SIGKILL)?;
                let deadline = Instant::now() + SETTLE;
                loop {
                    if let Ok(p) = c.nodes[m].etcd_pid()
                        && p != old
                        && std::path::Path::new(&format!("/proc/{p}")).exists()
                    {
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!(
                            "{}'s etcd was not restarted within {SETTLE:?}; see {}",
                            c.nodes[m].name,
                            c.nodes[m].log().display()
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let settled = c.wait_settled(SETTLE).await?;
                Ok(format!(
                    "SIGKILL of {}'s etcd alone ({}); restarted by the node, settled {settled:?} later",
                    c.nodes[m].name,
                    if m == l {
                        "the curator leader's"
                    } else {
                        "a follower's"
                    }
                ))
            }
            Scenario::PartitionLike => {
                let l = leader(c).await?;
                let f = (l + 1 + n % 2) % c.nodes.len();
                let pid = c.nodes[f].etcd_pid()?;
                let pause = Duration::from_millis(rng.gen_range(2500..4500));
                signal(pid, libc::SIGSTOP)?;
                tokio::time::sleep(pause).await;
                signal(pid, libc::SIGCONT)?;
                let settled = c.wait_settled(SETTLE).await?;
                Ok(format!(
                    "SIGSTOP of follower {}'s etcd for {pause:?}, then SIGCONT; settled {settled:?} later",
                    c.nodes[f].name
                ))
            }
        }
    }
}

/// The leading node's index, waiting out an election in progress.
async fn leader(c: &Cluster) -> anyhow::Result<usize> {
    let deadline = Instant::now() + SETTLE;
    loop {
        if let Some(l) = c.leader_index().await {
            return Ok(l);
        }
        if Instant::now() > deadline {
            bail!("no curator leader within {SETTLE:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until a node other than `old` leads and serves; returns it and how
/// long that took.
async fn new_leader(c: &Cluster, old: usize) -> anyhow::Result<(usize, Duration)> {
    let start = Instant::now();
    loop {
        for (i, n) in c.nodes.iter().enumerate() {
            if i == old {
                continue;
            }
            if let Some(l) = crate::cluster::current_leader(n.endpoint(), &c.ca).await
                && l.leader_node_id == n.id
            {
                return Ok((i, start.elapsed()));
            }
        }
        if start.elapsed() > SETTLE {
            bail!(
                "no new curator leader within {SETTLE:?} after {} went away",
                c.nodes[old].name
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn set_failpoint(c: &Cluster, actions: &str) -> anyhow::Result<()> {
    let addr = std::net::SocketAddr::new(c.nodes[0].address, DEBUG_PORT);
    // The debug port serves an ephemeral certificate: nothing to verify it
    // by, and the node is one this suite started on loopback.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let tls = metropolis_identity::client_config(ServerTrust::Capture(seen), None)
        .context("building the TLS configuration for the debug port")?;
    let ch = metropolis_rpc::client::connect(addr, tls).await?;
    NodeFaultsClient::new(ch)
        .set_failpoint(SetFailpointRequest {
            name: "curator::store_commit".into(),
            actions: actions.into(),
        })
        .await
        .map_err(|s| {
            anyhow::anyhow!(
                "SetFailpoint: {}",
                metropolis_rpc::client::explain_status(&s)
            )
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_unknown_names_list_the_choices() {
        for s in Scenario::ALL {
            assert_eq!(Scenario::parse(s.name()).unwrap(), s);
        }
        let err = Scenario::parse("leader-nap").unwrap_err().to_string();
        assert!(
            err.contains("leader-pause") && err.contains("partition-like"),
            "{err}"
        );
    }
}
