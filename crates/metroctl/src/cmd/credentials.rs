//! `metroctl credentials export DIR`: the operator's credentials in the
//! formats other tools read (curl, Prometheus, any TLS client).

use std::path::Path;

use anyhow::Context;

use crate::config::ConfigDir;
use crate::conn::Ctx;

/// File names written into the export directory.
pub const CA: &str = "ca.pem";
pub const CERT: &str = "client.pem";
pub const KEY: &str = "client-key.pem";

/// Writes the pinned CA, the client certificate metroctl uses (owner or
/// named identity) and its key as PKCS#8, all mode 0600.
pub async fn export(ctx: &Ctx, dir: &Path) -> anyhow::Result<()> {
    let ca = ctx.cluster_ca().await?;
    let (cert, key) = ctx.client_identity()?;
    let out = ConfigDir::locate(Some(dir.to_path_buf()))?;
    out.write(CA, metropolis_identity::cert_to_pem(&ca).as_bytes())?;
    out.write(CERT, metropolis_identity::cert_to_pem(&cert).as_bytes())?;
    out.write(
        KEY,
        metropolis_identity::encode_pkcs8_key_pem(&key).as_bytes(),
    )
    .with_context(|| format!("exporting into {}", dir.display()))?;
    let d = dir.display();
    println!("Wrote {d}/{CA}, {d}/{CERT} and {d}/{KEY} (keep the key private).");
    // Node certificates name the node (its ID), not its address: ask for
    // the ID and tell curl where it is.
    println!("For example, Prometheus service discovery from a consensus member:");
    println!(
        "  curl --cacert {d}/{CA} --cert {d}/{CERT} --key {d}/{KEY} \\\n    --resolve NODE_ID:7840:NODE_IP https://NODE_ID:7840/discovery"
    );
    Ok(())
}
