//! `metroctl cluster info`, `status` and `regenerate-ticket`.

use metropolis_api::admin::{
    RegenerateRegisterTicketRequest, cluster_admin_client::ClusterAdminClient,
};
use metropolis_api::api::{
    GetClusterInfoRequest, GetClusterInfoResponse, management_client::ManagementClient,
};
use metropolis_api::common::cluster_configuration::{StorageSecurityPolicy, TpmMode};

use crate::conn::{Ctx, call_error};
use crate::output::{self, Format};

pub async fn get_info(ctx: &Ctx) -> anyhow::Result<GetClusterInfoResponse> {
    let mut mgmt = ManagementClient::new(ctx.owner_channel().await?);
    Ok(mgmt
        .get_cluster_info(GetClusterInfoRequest {})
        .await
        .map_err(|s| call_error("GetClusterInfo", s))?
        .into_inner())
}

pub async fn info(ctx: &Ctx, format: Format) -> anyhow::Result<()> {
    let info = get_info(ctx).await?;
    if format != Format::Table {
        return output::print_structured(format, &[info], true);
    }
    print_info_table(&info);
    Ok(())
}

pub fn print_info_table(info: &GetClusterInfoResponse) {
    let cfg = info.cluster_configuration.clone().unwrap_or_default();
    let mut t = output::table();
    t.add_row(vec![
        "CA fingerprint (SHA-256)".to_string(),
        metropolis_identity::fingerprint_sha256(&info.ca_certificate),
    ]);
    t.add_row(vec![
        "Cluster domain".to_string(),
        cfg.cluster_domain.clone(),
    ]);
    t.add_row(vec![
        "TPM mode".to_string(),
        TpmMode::try_from(cfg.tpm_mode)
            .map(|m| m.as_str_name().to_string())
            .unwrap_or_else(|_| cfg.tpm_mode.to_string()),
    ]);
    t.add_row(vec![
        "Storage security policy".to_string(),
        StorageSecurityPolicy::try_from(cfg.storage_security_policy)
            .map(|m| m.as_str_name().to_string())
            .unwrap_or_else(|_| cfg.storage_security_policy.to_string()),
    ]);
    let sync: Vec<String> = cfg
        .kubernetes
        .map(|k| {
            k.node_labels_to_synchronize
                .into_iter()
                .map(|r| r.regexp)
                .collect()
        })
        .unwrap_or_default();
    t.add_row(vec![
        "Node labels synchronized to Kubernetes".to_string(),
        if sync.is_empty() {
            "(none)".to_string()
        } else {
            sync.join(", ")
        },
    ]);
    println!("{t}");
    let Some(directory) = &info.cluster_directory else {
        return;
    };
    println!();
    let mut nodes = output::table();
    nodes.set_header(vec!["NODE", "ADDRESSES"]);
    for n in &directory.nodes {
        let addrs: Vec<&str> = n.addresses.iter().map(|a| a.host.as_str()).collect();
        nodes.add_row(vec![n.id.clone(), addrs.join(", ")]);
    }
    println!("{nodes}");
}

pub async fn regenerate_ticket(ctx: &Ctx) -> anyhow::Result<()> {
    let mut admin = ClusterAdminClient::new(ctx.owner_channel().await?);
    admin
        .regenerate_register_ticket(RegenerateRegisterTicketRequest {})
        .await
        .map_err(|s| call_error("RegenerateRegisterTicket", s))?;
    println!(
        "The register ticket was replaced; parameters made with the old ticket no longer work."
    );
    println!("Make new ones with `metroctl install params --register -o FILE`.");
    Ok(())
}

/// `metroctl cluster configure get`.
pub async fn configure_get(ctx: &Ctx, format: Format) -> anyhow::Result<()> {
    let cfg = get_info(ctx)
        .await?
        .cluster_configuration
        .unwrap_or_default();
    if format != Format::Table {
        return output::print_structured(format, &[cfg], true);
    }
    let info = GetClusterInfoResponse {
        cluster_configuration: Some(cfg),
        ..Default::default()
    };
    print_info_table(&info);
    Ok(())
}

/// `metroctl cluster configure set kubernetes.node_labels_to_synchronize=RE[,RE...]`:
/// changes the field only if nobody changed it since we read it.
pub async fn configure_set(ctx: &Ctx, assignment: &str) -> anyhow::Result<()> {
    use metropolis_api::api::ConfigureClusterRequest;
    use metropolis_api::common::ClusterConfiguration;
    use metropolis_api::common::cluster_configuration::{
        Kubernetes, kubernetes::NodeLabelsToSynchronize,
    };
    let (path, value) = assignment.split_once('=').ok_or_else(|| {
        anyhow::anyhow!("expected FIELD=VALUE, e.g. kubernetes.node_labels_to_synchronize='^zone$'")
    })?;
    let regexps: Vec<NodeLabelsToSynchronize> = value
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|r| NodeLabelsToSynchronize {
            regexp: r.to_string(),
        })
        .collect();
    let base = get_info(ctx).await?.cluster_configuration;
    let new = ClusterConfiguration {
        kubernetes: Some(Kubernetes {
            node_labels_to_synchronize: regexps,
        }),
        ..Default::default()
    };
    let mut mgmt = ManagementClient::new(ctx.owner_channel().await?);
    let resp = mgmt
        .configure_cluster(ConfigureClusterRequest {
            base_config: base,
            new_config: Some(new),
            update_mask: Some(prost_types::FieldMask {
                paths: vec![path.to_string()],
            }),
        })
        .await
        .map_err(|s| call_error("ConfigureCluster", s))?
        .into_inner();
    let info = GetClusterInfoResponse {
        cluster_configuration: resp.resulting_config,
        ..Default::default()
    };
    print_info_table(&info);
    Ok(())
}

/// Who leads the curator, as the node behind `channel` knows it.
pub async fn current_leader(
    channel: tonic::transport::Channel,
) -> anyhow::Result<metropolis_api::curator::GetCurrentLeaderResponse> {
    use metropolis_api::curator::{
        GetCurrentLeaderRequest, curator_local_client::CuratorLocalClient,
    };
    Ok(CuratorLocalClient::new(channel)
        .get_current_leader(GetCurrentLeaderRequest {})
        .await
        .map_err(|s| call_error("GetCurrentLeader", s))?
        .into_inner()
        .message()
        .await
        .map_err(|s| call_error("GetCurrentLeader", s))?
        .unwrap_or_default())
}

/// `metroctl cluster status`: who leads the curator, and the consensus
/// store's members with their health.
pub async fn status(ctx: &Ctx, format: Format) -> anyhow::Result<()> {
    use metropolis_api::admin::ConsensusBackend as Backend;
    use metropolis_api::curator::{GetConsensusStatusRequest, curator_client::CuratorClient};
    let channel = ctx.owner_channel().await?;
    let consensus = CuratorClient::new(channel.clone())
        .get_consensus_status(GetConsensusStatusRequest {})
        .await
        .map_err(|s| call_error("GetConsensusStatus", s))?
        .into_inner();
    if format != Format::Table {
        return output::print_structured(format, &[consensus], true);
    }
    let leader = current_leader(channel).await?;
    let nodes = super::node::get_nodes(ctx, "", &[]).await?;
    let health_of = |id: &str| {
        nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| super::node::health_name(n.health))
            .unwrap_or_else(|| "-".into())
    };
    let mut t = output::table();
    t.add_row(vec![
        "Curator leader".to_string(),
        if leader.leader_node_id.is_empty() {
            "(none known)".to_string()
        } else {
            format!(
                "{} at {}:{}",
                leader.leader_node_id, leader.leader_host, leader.leader_port
            )
        },
    ]);
    let backend = match Backend::try_from(consensus.backend) {
        Ok(Backend::Etcd) => "etcd",
        Ok(Backend::Embedded) => "embedded (single consensus member)",
        _ => "unknown",
    };
    t.add_row(vec!["Consensus store".to_string(), backend.to_string()]);
    t.add_row(vec!["Revision".to_string(), consensus.revision.to_string()]);
    if consensus.backend == Backend::Etcd as i32 {
        t.add_row(vec![
            "Raft term".to_string(),
            consensus.raft_term.to_string(),
        ]);
    }
    println!("{t}");
    println!();
    let mut members = output::table();
    members.set_header(vec!["MEMBER", "NODE", "PEER URL", "KIND", "HEALTH"]);
    if consensus.backend == Backend::Etcd as i32 {
        for m in &consensus.members {
            let mut kind = if m.is_learner { "learner" } else { "voter" }.to_string();
            if m.id == consensus.raft_leader_id {
                kind.push_str(" (raft leader)");
            }
            members.add_row(vec![
                format!("{:x}", m.id),
                if m.name.is_empty() {
                    "(not started)".into()
                } else {
                    m.name.clone()
                },
                m.peer_urls.join(", "),
                kind,
                health_of(&m.name),
            ]);
        }
    } else {
        // The embedded store's only member is the node the curator runs on.
        members.add_row(vec![
            "-".to_string(),
            leader.leader_node_id.clone(),
            "-".to_string(),
            "embedded".to_string(),
            health_of(&leader.leader_node_id),
        ]);
    }
    // Nodes given the role that are no member yet: admitted one at a time
    // (after the move to etcd, on the embedded store).
    for n in nodes.iter().filter(|n| {
        n.consensus_progress == metropolis_api::admin::ConsensusProgress::Pending as i32
    }) {
        members.add_row(vec![
            "-".to_string(),
            n.id.clone(),
            n.status
                .as_ref()
                .map(|s| s.external_address.clone())
                .unwrap_or_default(),
            "pending".to_string(),
            super::node::health_name(n.health),
        ]);
    }
    println!("{members}");
    Ok(())
}
