//! `metroctl cluster info` and `regenerate-ticket`.

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
    println!();
    let mut nodes = output::table();
    nodes.set_header(vec!["NODE", "ADDRESSES"]);
    for n in info.cluster_directory.iter().flat_map(|d| d.nodes.iter()) {
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
