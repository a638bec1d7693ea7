//! `metroctl takeownership`: pin the CA, run Escrow, store the owner
//! certificate.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use metropolis_api::api::{
    EscrowRequest, GetClusterInfoRequest, aaa_client::AaaClient, escrow_request::Parameters,
    escrow_response::proof_request::Kind, management_client::ManagementClient,
};
use metropolis_api::curator::{GetCaCertificateRequest, curator_local_client::CuratorLocalClient};
use metropolis_identity::{ServerTrust, SigningKey};

use crate::cmd::confirm;
use crate::config::{CA_CERT, ClusterFile, OWNER_CERT};
use crate::conn::{Ctx, call_error, capture_channel};

/// Identity name escrowed for the owner.
const OWNER: &str = "owner";

pub async fn run(ctx: &Ctx) -> anyhow::Result<()> {
    let key = ctx.config.require_owner_key()?;
    let endpoints = ctx.endpoints()?;

    let (ca, newly_pinned) = pinned_or_confirmed_ca(ctx, &endpoints).await?;

    if ctx.config.owner_cert()?.is_some() && !newly_pinned {
        // Already holding credentials: prove they work instead of asking for
        // new ones.
        let mut mgmt = ManagementClient::new(ctx.owner_channel().await?);
        if mgmt
            .get_cluster_info(GetClusterInfoRequest {})
            .await
            .is_ok()
        {
            remember_endpoints(ctx, &endpoints)?;
            println!("You are already the owner of this cluster; nothing to do.");
            return Ok(());
        }
    }

    let emitted = escrow(ctx, &ca, OWNER, &key).await?;

    ctx.config
        .write(CA_CERT, metropolis_identity::cert_to_pem(&ca).as_bytes())?;
    ctx.config.write(
        OWNER_CERT,
        metropolis_identity::cert_to_pem(&emitted).as_bytes(),
    )?;
    remember_endpoints(ctx, &endpoints)?;
    println!(
        "You are now the owner of this cluster. Credentials are in {}.",
        ctx.config.root().display()
    );
    Ok(())
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// Saves the endpoints in the configuration directory, so later commands
/// need no `--endpoints`.
pub fn remember_endpoints(ctx: &Ctx, endpoints: &[SocketAddr]) -> anyhow::Result<()> {
    let endpoints = endpoints
        .iter()
        .map(|a| {
            if a.port() == crate::config::CURATOR_PORT {
                a.ip().to_string()
            } else {
                a.to_string()
            }
        })
        .collect();
    ctx.config.save_cluster(&ClusterFile { endpoints })
}

/// Fetches the CA without trusting anything yet, and checks that the node we
/// talked to holds a certificate issued by that CA, so the fingerprint shown
/// to the operator is the one the cluster actually uses.
pub async fn fetch_ca_trust_on_first_use(endpoints: &[SocketAddr]) -> anyhow::Result<Vec<u8>> {
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
    metropolis_identity::verify_signed_by(&server, &ca, time_now())
        .context("the node's certificate is not signed by the CA it sent; refusing to pin it")?;
    Ok(ca)
}

/// Escrow for `name`: a self-signed certificate over the key at the TLS
/// layer, the same key in the request; returns the certificate the cluster
/// issued, checked against the pinned CA. Used for the owner and for named
/// identities (`metroctl login`).
pub async fn escrow(ctx: &Ctx, ca: &[u8], name: &str, key: &SigningKey) -> anyhow::Result<Vec<u8>> {
    let self_signed = metropolis_identity::self_signed_certificate(key, "")?;
    let channel = ctx
        .channel(
            ServerTrust::ClusterCa {
                ca_der: ca.to_vec(),
                node_id: None,
            },
            Some((self_signed, key.clone())),
        )
        .await?;
    let request = EscrowRequest {
        parameters: Some(Parameters {
            requested_identity_name: name.to_string(),
            public_key: key.verifying_key().to_bytes().to_vec(),
        }),
        proofs: None,
    };
    let hint = |s: tonic::Status| {
        let extra = match s.code() {
            _ if name == OWNER => "",
            tonic::Code::Unimplemented => {
                " (ask the cluster owner to add the identity with `metroctl user add`)"
            }
            tonic::Code::PermissionDenied => {
                " (the owner registered another public key for this name; send them yours)"
            }
            _ => "",
        };
        anyhow::anyhow!("{:#}{extra}", call_error("Escrow", s))
    };
    let mut responses = AaaClient::new(channel)
        .escrow(tokio_stream::iter([request]))
        .await
        .map_err(hint)?
        .into_inner();
    let resp = responses
        .message()
        .await
        .map_err(hint)?
        .context("the cluster closed Escrow without an answer")?;
    if resp.emitted_certificate.is_empty() {
        let needed: Vec<String> = resp
            .needed
            .iter()
            .map(|p| {
                Kind::try_from(p.kind)
                    .map(|k| k.as_str_name().to_string())
                    .unwrap_or_else(|_| p.kind.to_string())
            })
            .collect();
        bail!(
            "the cluster asks for proofs metroctl cannot give: {}",
            needed.join(", ")
        );
    }
    let cert = metropolis_identity::parse_certificate(&resp.emitted_certificate)
        .context("the cluster sent an invalid certificate")?;
    metropolis_identity::verify_signed_by(&cert, ca, time_now())
        .context("the certificate the cluster sent does not chain to its CA")?;
    if cert.public_key != key.verifying_key().to_bytes() || cert.common_name != name {
        bail!("the certificate the cluster sent is for another identity or key");
    }
    Ok(resp.emitted_certificate)
}

/// The pinned CA, or on first use the CA the cluster presents, after the
/// operator confirmed its fingerprint. The bool says whether it is new (the
/// caller writes it once the escrow it is for has worked).
pub async fn pinned_or_confirmed_ca(
    ctx: &Ctx,
    endpoints: &[SocketAddr],
) -> anyhow::Result<(Vec<u8>, bool)> {
    if let Some(ca) = ctx.config.ca()? {
        return Ok((ca, false));
    }
    let ca = fetch_ca_trust_on_first_use(endpoints).await?;
    println!(
        "Cluster CA certificate fingerprint (SHA-256): {}",
        metropolis_identity::fingerprint_sha256(&ca)
    );
    if !confirm(ctx, "Trust this CA and pin it?")? {
        bail!("the CA was not trusted; nothing was changed");
    }
    Ok((ca, true))
}
