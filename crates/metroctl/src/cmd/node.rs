//! `metroctl node describe | list | approve | label | add/remove role | decommission | delete | logs | reboot | poweroff | metrics`.

use std::time::Duration;

use anyhow::{Context, bail};
use futures::TryStreamExt;
use metropolis_api::api::{
    ApproveNodeRequest, GetNodesRequest, Node, management_client::ManagementClient, node::Health,
};
use metropolis_api::common::NodeState;

use crate::conn::{Ctx, call_error};
use crate::output::{self, Format};

/// Nodes matching `filter` (CEL), and of those only `ids` if any are given.
pub async fn get_nodes(ctx: &Ctx, filter: &str, ids: &[String]) -> anyhow::Result<Vec<Node>> {
    let mut mgmt = ManagementClient::new(ctx.owner_channel().await?);
    let stream = mgmt
        .get_nodes(GetNodesRequest {
            filter: filter.to_string(),
        })
        .await
        .map_err(|s| call_error("GetNodes", s))?
        .into_inner();
    let nodes: Vec<Node> = stream
        .try_collect()
        .await
        .map_err(|s| call_error("GetNodes", s))?;
    if ids.is_empty() {
        return Ok(nodes);
    }
    for id in ids {
        if !nodes.iter().any(|n| &n.id == id) {
            bail!("node {id} not found");
        }
    }
    Ok(nodes.into_iter().filter(|n| ids.contains(&n.id)).collect())
}

pub async fn describe(
    ctx: &Ctx,
    ids: &[String],
    filter: &str,
    format: Format,
) -> anyhow::Result<()> {
    let nodes = get_nodes(ctx, filter, ids).await?;
    if format != Format::Table {
        return output::print_structured(format, &nodes, false);
    }
    let mut t = output::table();
    t.set_header(vec![
        "NODE ID",
        "STATE",
        "ADDRESS",
        "HEALTH",
        "ROLES",
        "HEARTBEAT",
        "VERSION",
    ]);
    for n in &nodes {
        t.add_row(vec![
            n.id.clone(),
            state_name(n.state),
            n.status
                .as_ref()
                .map(|s| s.external_address.clone())
                .unwrap_or_default(),
            health_name(n.health),
            roles(n),
            n.time_since_heartbeat
                .as_ref()
                .and_then(|d| Duration::try_from(*d).ok())
                .map(|d| format!("{:.1}s", d.as_secs_f64()))
                .unwrap_or_else(|| "-".into()),
            version(n),
        ]);
    }
    println!("{t}");
    Ok(())
}

pub async fn list(ctx: &Ctx, filter: &str) -> anyhow::Result<()> {
    for n in get_nodes(ctx, filter, &[]).await? {
        println!("{}", n.id);
    }
    Ok(())
}

/// Approves a node by ID; without one, lists the nodes awaiting approval.
pub async fn approve(ctx: &Ctx, id: Option<&str>) -> anyhow::Result<()> {
    let new = get_nodes(ctx, "node.state == NODE_STATE_NEW", &[]).await?;
    let Some(id) = id else {
        if new.is_empty() {
            println!("No nodes are waiting for approval.");
        } else {
            println!(
                "Nodes waiting for approval (compare the IDs with the nodes' logs before approving):"
            );
            for n in &new {
                println!("  {}  (public key {})", n.id, hex(&n.pubkey));
            }
            println!("Approve one with `metroctl node approve ID`.");
        }
        return Ok(());
    };
    let node = match new.iter().find(|n| n.id == id) {
        Some(n) => n.clone(),
        None => {
            let all = get_nodes(ctx, "", &[]).await?;
            let n = all
                .into_iter()
                .find(|n| n.id == id)
                .with_context(|| format!("node {id} not found"))?;
            if n.state == NodeState::Standby as i32 || n.state == NodeState::Up as i32 {
                println!("Node {id} is already approved ({}).", state_name(n.state));
                return Ok(());
            }
            n
        }
    };
    let mut mgmt = ManagementClient::new(ctx.owner_channel().await?);
    mgmt.approve_node(ApproveNodeRequest {
        pubkey: node.pubkey.clone(),
    })
    .await
    .map_err(|s| call_error("ApproveNode", s))?;
    println!("Approved node {id}.");
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn state_name(state: i32) -> String {
    NodeState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("NODE_STATE_")
                .to_string()
        })
        .unwrap_or_else(|_| state.to_string())
}

pub fn health_name(h: i32) -> String {
    Health::try_from(h)
        .map(|s| s.as_str_name().trim_start_matches("HEALTH_").to_string())
        .unwrap_or_else(|_| h.to_string())
}

fn roles(n: &Node) -> String {
    let Some(r) = &n.roles else {
        return String::new();
    };
    let mut out = Vec::new();
    if r.consensus_member.is_some() {
        out.push("ConsensusMember");
    }
    if r.kubernetes_controller.is_some() {
        out.push("KubernetesController");
    }
    if r.kubernetes_worker.is_some() {
        out.push("KubernetesWorker");
    }
    out.join(",")
}

/// The version a node reports: release, build commit, and the first 12
/// digits of its binary's SHA-256 (which tells two builds of one commit
/// apart), e.g. `0.1.0-g1a2b3c4d5e6f sha256:0a1b2c3d4e5f`.
pub fn version(n: &Node) -> String {
    use metropolis_api::version::spec::version::git_information::BuildTreeState;
    let Some(v) = n.status.as_ref().and_then(|s| s.version.as_ref()) else {
        return String::new();
    };
    let mut out = v
        .release
        .as_ref()
        .map(|r| format!("{}.{}.{}", r.major, r.minor, r.patch))
        .unwrap_or_else(|| "0.0.0".into());
    if let Some(g) = v
        .git_information
        .as_ref()
        .filter(|g| !g.commit_hash.is_empty())
    {
        out.push_str(&format!("-g{}", g.commit_hash));
        if g.build_tree_state == BuildTreeState::Dirty as i32 {
            out.push_str("-dirty");
        }
    }
    if !v.binary_sha256.is_empty() {
        out.push_str(&format!(" sha256:{}", short_sha(&v.binary_sha256)));
    }
    out
}

/// The first 12 digits of a SHA-256, as versions show it.
pub fn short_sha(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

/// `metroctl node label ID key=value... key-...`: upserts and deletes in one
/// atomic change.
pub async fn label(ctx: &Ctx, id: &str, changes: &[String]) -> anyhow::Result<()> {
    use metropolis_api::api::{UpdateNodeLabelsRequest, update_node_labels_request};
    if changes.is_empty() {
        bail!("give at least one change: key=value to set a label, key- to remove one");
    }
    let mut upsert = Vec::new();
    let mut delete = Vec::new();
    for c in changes {
        if let Some((k, v)) = c.split_once('=') {
            upsert.push(update_node_labels_request::Pair {
                key: k.into(),
                value: v.into(),
            });
        } else if let Some(k) = c.strip_suffix('-') {
            delete.push(k.to_string());
        } else {
            bail!(
                "{} is neither key=value (set) nor key- (remove)",
                metropolis_api::quote(c)
            );
        }
    }
    let mut mgmt = ManagementClient::new(ctx.owner_channel().await?);
    mgmt.update_node_labels(UpdateNodeLabelsRequest {
        node: Some(update_node_labels_request::Node::Id(id.into())),
        upsert,
        delete,
    })
    .await
    .map_err(|s| call_error("UpdateNodeLabels", s))?;
    println!("Updated the labels of node {id}.");
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    #[value(name = "ConsensusMember", alias = "consensus-member")]
    ConsensusMember,
    #[value(name = "KubernetesController", alias = "kubernetes-controller")]
    KubernetesController,
    #[value(name = "KubernetesWorker", alias = "kubernetes-worker")]
    KubernetesWorker,
}

/// `metroctl node add|remove role ROLE ID... [--wait]`.
///
/// Each node's change is one UpdateNodeRoles call, accepted at once (a
/// ConsensusMember is admitted by the cluster afterwards, one at a time);
/// `--wait` then follows the consensus members' progress.
pub async fn set_role(
    ctx: &Ctx,
    role: Role,
    on: bool,
    ids: &[String],
    wait: bool,
) -> anyhow::Result<()> {
    for id in ids {
        update_role(ctx, role, on, id).await?;
        println!(
            "{} {role:?} {} node {id}.",
            if on { "Added" } else { "Removed" },
            if on { "to" } else { "from" }
        );
    }
    if wait && role == Role::ConsensusMember {
        wait_for_consensus(ctx, ids, on).await?;
    }
    Ok(())
}

/// One node's role change (UpdateNodeRoles), retried while UNAVAILABLE.
pub async fn update_role(ctx: &Ctx, role: Role, on: bool, id: &str) -> anyhow::Result<()> {
    use backon::{ExponentialBuilder, Retryable};
    use metropolis_api::api::{UpdateNodeRolesRequest, update_node_roles_request};
    let mut req = UpdateNodeRolesRequest {
        node: Some(update_node_roles_request::Node::Id(id.to_string())),
        ..Default::default()
    };
    match role {
        Role::ConsensusMember => req.consensus_member = Some(on),
        Role::KubernetesController => req.kubernetes_controller = Some(on),
        Role::KubernetesWorker => req.kubernetes_worker = Some(on),
    }
    // A role change is idempotent, so an UNAVAILABLE answer (nothing
    // done: the curator leadership moved, e.g. because the leader stepped
    // down to have its own consensus membership removed, or the cluster
    // state is moving to etcd and the curator restarts on it) is retried
    // at whichever curator leads by then.
    // The first connection fails fast (no credentials, no cluster);
    // retries connect anew, to the leader of the moment.
    let first = std::sync::Mutex::new(Some(ctx.owner_channel().await?));
    let update = || async {
        let ready = first.lock().unwrap_or_else(|p| p.into_inner()).take();
        let channel = match ready {
            Some(c) => c,
            None => ctx
                .owner_channel()
                .await
                .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?,
        };
        ManagementClient::new(channel)
            .update_node_roles(req.clone())
            .await
    };
    update
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(250))
                .with_max_delay(Duration::from_secs(2))
                .with_max_times(12),
        )
        .when(|s| s.code() == tonic::Code::Unavailable)
        .await
        .map_err(|s| call_error(&format!("UpdateNodeRoles of {id}"), s))?;
    Ok(())
}

/// How long `--wait` follows consensus progress before giving up.
const CONSENSUS_WAIT: Duration = Duration::from_secs(600);

/// The short name of a node's consensus progress.
pub fn progress_name(p: i32) -> &'static str {
    use metropolis_api::admin::ConsensusProgress as P;
    match P::try_from(p) {
        Ok(P::None) => "none",
        Ok(P::Pending) => "pending",
        Ok(P::Learner) => "learner",
        Ok(P::Voter) => "voter",
        Err(_) => "unknown",
    }
}

/// Follows the consensus progress of `ids` until every one is a voter (`on`)
/// or no member (`!on`), with a line per node on a terminal.
async fn wait_for_consensus(ctx: &Ctx, ids: &[String], on: bool) -> anyhow::Result<()> {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
    use metropolis_api::admin::ConsensusProgress as P;
    let want = if on { P::Voter } else { P::None } as i32;
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{spinner} {prefix} {msg} [{elapsed}]")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let lines: Vec<ProgressBar> = ids
        .iter()
        .map(|id| {
            let bar = bars.add(ProgressBar::new_spinner().with_style(style.clone()));
            bar.set_prefix(id.clone());
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        })
        .collect();
    let deadline = std::time::Instant::now() + CONSENSUS_WAIT;
    let mut last: Vec<Option<i32>> = vec![None; ids.len()];
    loop {
        // Errors are expected for a moment (the curator restarts on etcd, a
        // leader changes): shown, and looked at again.
        match get_nodes(ctx, "", ids).await {
            Ok(nodes) => {
                for (i, id) in ids.iter().enumerate() {
                    let p = nodes
                        .iter()
                        .find(|n| &n.id == id)
                        .map(|n| n.consensus_progress)
                        .unwrap_or_default();
                    if last[i] != Some(p) {
                        lines[i].set_message(progress_name(p));
                        if bars.is_hidden() {
                            println!("{id}: {}", progress_name(p));
                        }
                        last[i] = Some(p);
                    }
                    if p == want {
                        lines[i].finish();
                    }
                }
                if last.iter().all(|p| *p == Some(want)) {
                    return Ok(());
                }
            }
            Err(e) => {
                for line in &lines {
                    line.set_message(format!("(asking again: {e:#})"));
                }
            }
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "gave up waiting after {}s; see `metroctl cluster status` and the nodes' logs",
                CONSENSUS_WAIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn decommission(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    use metropolis_api::api::{DecommissionNodeRequest, decommission_node_request};
    let mut mgmt = ManagementClient::new(ctx.owner_channel().await?);
    mgmt.decommission_node(DecommissionNodeRequest {
        node: Some(decommission_node_request::Node::Id(id.into())),
    })
    .await
    .map_err(|s| call_error("DecommissionNode", s))?;
    println!("Asked node {id} to decommission itself; it wipes its data and reports back.");
    println!(
        "Watch it with `metroctl node describe {id}`; once DECOMMISSIONED, remove it with `metroctl node delete {id}`."
    );
    Ok(())
}

pub async fn delete(
    ctx: &Ctx,
    id: &str,
    bypass_roles: bool,
    bypass_not_decom: bool,
) -> anyhow::Result<()> {
    use metropolis_api::api::{DeleteNodeRequest, delete_node_request};
    if !super::confirm(ctx, &format!("Delete node {id} from the cluster for good?"))? {
        bail!("not deleted");
    }
    let mut mgmt = ManagementClient::new(ctx.owner_channel().await?);
    mgmt.delete_node(DeleteNodeRequest {
        node: Some(delete_node_request::Node::Id(id.into())),
        safety_bypass_has_roles: bypass_roles
            .then_some(delete_node_request::SafetyBypassHasRoles {}),
        safety_bypass_not_decommissioned: bypass_not_decom
            .then_some(delete_node_request::SafetyBypassNotDecommissioned {}),
    })
    .await
    .map_err(|s| call_error("DeleteNode", s))?;
    println!("Deleted node {id}; its certificate no longer works.");
    Ok(())
}

/// A channel to one node's NodeManagement port, verified as that node.
async fn node_management(ctx: &Ctx, id: &str) -> anyhow::Result<tonic::transport::Channel> {
    let nodes = get_nodes(ctx, "", &[id.to_string()]).await?;
    let node = nodes
        .first()
        .with_context(|| format!("node {id} not found"))?;
    node_management_of(ctx, node).await
}

/// A channel to `node`'s NodeManagement port, at the address its record
/// names, verified as that node.
pub async fn node_management_of(
    ctx: &Ctx,
    node: &Node,
) -> anyhow::Result<tonic::transport::Channel> {
    let id = &node.id;
    let host = node
        .status
        .as_ref()
        .map(|s| s.external_address.clone())
        .filter(|a| !a.is_empty())
        .with_context(|| format!("node {id} has not reported its address yet"))?;
    let ip: std::net::IpAddr = host
        .parse()
        .with_context(|| format!("node {id} reports a bad address {host:?}"))?;
    let addr = std::net::SocketAddr::new(ip, NODE_MANAGEMENT_PORT);
    let ca = ctx.pinned_ca()?;
    let (cert, key) = ctx.client_identity()?;
    let tls = metropolis_identity::client_config(
        metropolis_identity::ServerTrust::ClusterCa {
            ca_der: ca,
            node_id: Some(id.to_string()),
        },
        Some((cert, key)),
    )?;
    Ok(metropolis_rpc::client::connect(addr, tls).await?)
}

/// Port of NodeManagement on every node.
const NODE_MANAGEMENT_PORT: u16 = 7839;

pub struct LogsArgs {
    pub follow: bool,
    pub dn: String,
    pub backlog: Option<i64>,
    pub min_severity: Option<Severity>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Severity {
    Info,
    Warning,
    Error,
    Fatal,
}

/// `metroctl node logs ID`: prints the backlog, then follows with -f until
/// Ctrl-C.
pub async fn logs(ctx: &Ctx, id: &str, a: LogsArgs) -> anyhow::Result<()> {
    use metropolis_api::api::{
        LogsRequest, logs_request, node_management_client::NodeManagementClient,
    };
    use metropolis_api::common::{LogFilter, log_filter};
    use metropolis_api::osbase::logtree::proto::LeveledLogSeverity;
    let mut filters = vec![LogFilter {
        filter: Some(log_filter::Filter::WithChildren(
            log_filter::WithChildren {},
        )),
    }];
    if let Some(s) = a.min_severity {
        let minimum = match s {
            Severity::Info => LeveledLogSeverity::Info,
            Severity::Warning => LeveledLogSeverity::Warning,
            Severity::Error => LeveledLogSeverity::Error,
            Severity::Fatal => LeveledLogSeverity::Fatal,
        } as i32;
        filters.push(LogFilter {
            filter: Some(log_filter::Filter::LeveledWithMinimumSeverity(
                log_filter::LeveledWithMinimumSeverity { minimum },
            )),
        });
    }
    let (backlog_mode, backlog_count) = match a.backlog {
        Some(n) => (logs_request::BacklogMode::Count, n),
        None => (logs_request::BacklogMode::All, 0),
    };
    let req = LogsRequest {
        dn: a.dn,
        filters,
        backlog_mode: backlog_mode as i32,
        backlog_count,
        stream_mode: if a.follow {
            logs_request::StreamMode::Unbuffered
        } else {
            logs_request::StreamMode::Disable
        } as i32,
    };
    let mut client = NodeManagementClient::new(node_management(ctx, id).await?);
    let mut stream = client
        .logs(req)
        .await
        .map_err(|s| call_error("Logs", s))?
        .into_inner();
    loop {
        let msg = tokio::select! {
            m = stream.message() => m.map_err(|s| call_error("Logs", s))?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(resp) = msg else { return Ok(()) };
        for e in resp
            .backlog_entries
            .iter()
            .chain(resp.stream_entries.iter())
        {
            print_entry(e);
        }
    }
}

fn print_entry(e: &metropolis_api::osbase::logtree::proto::LogEntry) {
    use metropolis_api::osbase::logtree::proto::{LeveledLogSeverity, log_entry::Kind};
    match &e.kind {
        Some(Kind::Leveled(l)) => {
            let sev = match LeveledLogSeverity::try_from(l.severity) {
                Ok(LeveledLogSeverity::Info) => "I",
                Ok(LeveledLogSeverity::Warning) => "W",
                Ok(LeveledLogSeverity::Error) => "E",
                Ok(LeveledLogSeverity::Fatal) => "F",
                _ => "?",
            };
            let ts = l
                .timestamp
                .as_ref()
                .map(|t| {
                    time::OffsetDateTime::from_unix_timestamp_nanos(
                        i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos),
                    )
                    .ok()
                    .and_then(|d| {
                        d.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                    .unwrap_or_default()
                })
                .unwrap_or_default();
            for line in &l.lines {
                println!("{sev} {ts} {} {}] {line}", e.dn, l.location);
            }
        }
        Some(Kind::Raw(r)) => {
            let cut = if r.original_length as usize > r.data.len() {
                " [cut]"
            } else {
                ""
            };
            println!("R {} {}{cut}", e.dn, r.data);
        }
        None => {}
    }
}

/// `metroctl node reboot ID [--kexec]` and `node poweroff ID`.
/// `--rollback`: the node boots its previous binary (or gives up the update
/// on trial).
pub async fn power(
    ctx: &Ctx,
    id: &str,
    kind: metropolis_api::api::reboot_request::Type,
    rollback: bool,
) -> anyhow::Result<()> {
    use metropolis_api::api::{
        RebootRequest,
        node_management_client::NodeManagementClient,
        reboot_request::{NextBoot, Type},
    };
    let verb = match (kind, rollback) {
        (Type::PowerOff, _) => "Power off",
        (_, true) => "Roll back and reboot",
        _ => "Reboot",
    };
    if !super::confirm(ctx, &format!("{verb} node {id}?"))? {
        bail!("nothing was done");
    }
    let mut client = NodeManagementClient::new(node_management(ctx, id).await?);
    client
        .reboot(RebootRequest {
            r#type: kind as i32,
            next_boot: if rollback {
                NextBoot::StartRollback
            } else {
                NextBoot::StartNormal
            } as i32,
        })
        .await
        .map_err(|s| call_error("Reboot", s))?;
    if kind == Type::PowerOff {
        println!("Node {id} is powering off; it stays down until started again.");
    } else if rollback {
        println!(
            "Node {id} is restarting into its previous binary; like an update, it is tried and kept once HEALTHY \
             (watch it with `metroctl node describe {id}`)."
        );
    } else {
        println!("Node {id} is restarting; it rejoins with a new boot ID.");
    }
    Ok(())
}

/// `metroctl node metrics ID`: the node's Prometheus metrics.
pub async fn metrics(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    use http_body_util::BodyExt;
    let nodes = get_nodes(ctx, "", &[id.to_string()]).await?;
    let host = nodes
        .first()
        .and_then(|n| n.status.as_ref())
        .map(|s| s.external_address.clone())
        .filter(|a| !a.is_empty())
        .with_context(|| format!("node {id} has not reported its address yet"))?;
    let ip: std::net::IpAddr = host
        .parse()
        .with_context(|| format!("node {id} reports a bad address {host:?}"))?;
    let url: hyper::Uri =
        format!("http://{}/metrics", std::net::SocketAddr::new(ip, 7840)).parse()?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<hyper::body::Bytes>>();
    let resp = client
        .get(url.clone())
        .await
        .with_context(|| format!("cannot fetch {url}"))?;
    if !resp.status().is_success() {
        bail!("{url} answered {}", resp.status());
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .with_context(|| format!("reading {url}"))?
        .to_bytes();
    print!("{}", String::from_utf8_lossy(&body));
    Ok(())
}
