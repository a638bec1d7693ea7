//! `metroctl install params`.

use std::path::Path;

use anyhow::Context;
use metropolis_api::api::{
    GetClusterInfoRequest, GetRegisterTicketRequest, NodeParameters,
    management_client::ManagementClient,
    node_parameters::{Cluster, ClusterBootstrap, ClusterRegister},
};
use prost::Message;

use crate::conn::{Ctx, call_error};

fn write_params(path: &Path, params: &NodeParameters) -> anyhow::Result<()> {
    std::fs::write(path, params.encode_to_vec())
        .with_context(|| format!("writing {}", path.display()))
}

/// Certificate lifetimes for a new cluster; unset means the cluster's
/// default.
#[derive(Debug, Default, Clone, Copy)]
pub struct Lifetimes {
    pub node: Option<std::time::Duration>,
    pub user: Option<std::time::Duration>,
}

/// A duration for the wire, refusing what protobuf cannot hold.
pub fn proto_duration(d: std::time::Duration) -> anyhow::Result<prost_types::Duration> {
    prost_types::Duration::try_from(d).map_err(|_| anyhow::anyhow!("duration {d:?} is too long"))
}

pub fn bootstrap_params(
    ctx: &Ctx,
    out: &Path,
    high_availability: bool,
    lifetimes: Lifetimes,
) -> anyhow::Result<()> {
    // The node checks them too (and against its CA); refusing here saves a
    // failed first start.
    for (flag, d) in [
        ("--node-certificate-lifetime", lifetimes.node),
        ("--user-certificate-lifetime", lifetimes.user),
    ] {
        if let Some(d) = d
            && d < std::time::Duration::from_secs(60)
        {
            anyhow::bail!("{flag} must be at least 60s");
        }
    }
    let initial_cluster_configuration = if lifetimes.node.is_some() || lifetimes.user.is_some() {
        Some(metropolis_api::common::ClusterConfiguration {
            node_certificate_lifetime: lifetimes.node.map(proto_duration).transpose()?,
            user_certificate_lifetime: lifetimes.user.map(proto_duration).transpose()?,
            ..Default::default()
        })
    } else {
        None
    };
    let (key, created) = ctx.config.owner_key_or_create()?;
    if created {
        eprintln!(
            "Created owner key {}",
            ctx.config.path(crate::config::OWNER_KEY).display()
        );
    }
    let params = NodeParameters {
        cluster: Some(Cluster::ClusterBootstrap(ClusterBootstrap {
            owner_public_key: key.verifying_key().to_bytes().to_vec(),
            high_availability,
            initial_cluster_configuration,
            ..Default::default()
        })),
        network_config: None,
    };
    write_params(out, &params)?;
    eprintln!("Wrote bootstrap parameters to {}", out.display());
    Ok(())
}

pub async fn register_params(ctx: &Ctx, out: &Path) -> anyhow::Result<()> {
    let mut mgmt = ManagementClient::new(ctx.owner_channel().await?);
    let ticket = mgmt
        .get_register_ticket(GetRegisterTicketRequest {})
        .await
        .map_err(|s| call_error("GetRegisterTicket", s))?
        .into_inner()
        .ticket;
    let info = mgmt
        .get_cluster_info(GetClusterInfoRequest {})
        .await
        .map_err(|s| call_error("GetClusterInfo", s))?
        .into_inner();
    let params = NodeParameters {
        cluster: Some(Cluster::ClusterRegister(ClusterRegister {
            cluster_directory: info.cluster_directory,
            register_ticket: ticket,
            ca_certificate: info.ca_certificate,
            labels: None,
        })),
        network_config: None,
    };
    write_params(out, &params)?;
    eprintln!("Wrote register parameters to {}", out.display());
    Ok(())
}
