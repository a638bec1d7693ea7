//! `metroctl cluster backup`: the whole cluster state into an encrypted
//! file (owner only), and `--inspect` of such a file's readable header.
//!
//! The state arrives in the clear over the owner's mutual-TLS connection
//! and is encrypted here, as it arrives, before it reaches the disk: extra
//! recipients stay a local choice, and no page is held longer than it
//! takes to encrypt it. The file is written under a temporary name next to
//! the target and renamed only once complete, so a failed backup never
//! leaves a file that looks like one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use metropolis_api::admin::{
    BackupRequest, backup_chunk, cluster_admin_client::ClusterAdminClient,
};

use crate::conn::{Ctx, call_error};

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Write the backup to FILE (refused if it exists).
    #[arg(
        short = 'o',
        long = "output",
        value_name = "FILE",
        required_unless_present = "inspect"
    )]
    pub output: Option<PathBuf>,
    /// Also encrypt to this recipient: an age recipient (age1…) or an SSH
    /// public key line (ssh-ed25519 …). The owner's key is always one.
    #[arg(
        long = "recipient",
        value_name = "RECIPIENT",
        conflicts_with = "inspect"
    )]
    pub recipients: Vec<String>,
    /// Show the readable header of a backup file (no key needed) instead.
    #[arg(long, value_name = "FILE", conflicts_with = "output")]
    pub inspect: Option<PathBuf>,
}

pub async fn run(ctx: &Ctx, args: BackupArgs) -> anyhow::Result<()> {
    if let Some(file) = &args.inspect {
        return inspect(file);
    }
    let Some(output) = &args.output else {
        bail!("give -o FILE to write a backup, or --inspect FILE to read one's header");
    };
    let extra = args
        .recipients
        .iter()
        .map(|r| metropolis_backup::parse_recipient(r))
        .collect::<Result<Vec<_>, _>>()?;
    if output.exists() {
        bail!(
            "{} exists; choose another file or remove it first",
            output.display()
        );
    }
    let pinned = ctx.cluster_ca().await?;
    let started = Instant::now();
    let mut admin = ClusterAdminClient::new(ctx.owner_channel().await?);
    let mut stream = admin
        .backup(BackupRequest {})
        .await
        .map_err(|s| call_error("Backup", s))?
        .into_inner();
    let next = |s: tonic::Status| call_error("Backup", s);
    let header = match stream.message().await.map_err(next)?.and_then(|c| c.chunk) {
        Some(backup_chunk::Chunk::Header(h)) => h,
        _ => bail!("the cluster's Backup answer does not start with its header; nothing written"),
    };
    let fingerprint = {
        use sha2::Digest as _;
        sha2::Sha256::digest(&pinned).to_vec()
    };
    if header.ca_fingerprint != fingerprint {
        bail!(
            "the cluster answering is not the one whose CA metroctl pinned (CA {} ≠ pinned {}); nothing written",
            hex::encode(&header.ca_fingerprint[..header.ca_fingerprint.len().min(8)]),
            hex::encode(&fingerprint[..8])
        );
    }

    let partial = partial_path(output);
    let file = create_private(&partial)?;
    let result = async {
        let mut writer =
            metropolis_backup::Writer::new(std::io::BufWriter::new(file), &header, &extra)?;
        let progress = ProgressBar::new(header.node_count).with_style(
            ProgressStyle::with_template("{bar:30} {pos}/{len} nodes {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let (mut keys, mut bytes) = (0u64, 0u64);
        let trailer = loop {
            match stream.message().await.map_err(next)?.and_then(|c| c.chunk) {
                Some(backup_chunk::Chunk::Entries(e)) => {
                    let nodes = e
                        .entries
                        .iter()
                        .filter(|e| e.key.starts_with(b"/nodes/"))
                        .count();
                    keys += e.entries.len() as u64;
                    bytes += e
                        .entries
                        .iter()
                        .map(|e| (e.key.len() + e.value.len()) as u64)
                        .sum::<u64>();
                    progress.inc(nodes as u64);
                    progress.set_message(format!("{keys} keys, {} KiB", bytes / 1024));
                    writer.entries(e)?;
                }
                Some(backup_chunk::Chunk::Trailer(t)) => break t,
                Some(backup_chunk::Chunk::Header(_)) => {
                    bail!("the cluster's Backup answer has a second header")
                }
                None => bail!("the cluster's Backup answer ended before its trailer"),
            }
        };
        progress.finish_and_clear();
        let mut out = writer.finish(&trailer)?;
        out.flush()?;
        out.get_ref().sync_all()?;
        Ok::<_, anyhow::Error>((keys, bytes))
    }
    .await;
    let (keys, bytes) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e.context("backup failed; nothing written"));
        }
    };
    std::fs::rename(&partial, output)
        .with_context(|| format!("renaming {} to {}", partial.display(), output.display()))?;
    let size = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    println!(
        "Wrote {}: {} nodes, {keys} keys ({bytes} bytes of keys and values), revision {}, {size} bytes encrypted, in {:.1}s.",
        output.display(),
        header.node_count,
        header.revision,
        started.elapsed().as_secs_f64()
    );
    println!(
        "Restore it with: metropolis-node --data-dir EMPTY_DIR --address IP --restore {} --owner-key {}",
        output.display(),
        ctx.config.path(crate::config::OWNER_KEY).display()
    );
    Ok(())
}

fn inspect(file: &Path) -> anyhow::Result<()> {
    let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let header = metropolis_backup::read_header(&mut std::io::BufReader::new(f))
        .with_context(|| format!("reading {}", file.display()))?;
    print!("{}", metropolis_backup::render_header(&header));
    Ok(())
}

fn partial_path(output: &Path) -> PathBuf {
    let mut name = output.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    output.with_file_name(name)
}

/// Creates `path` readable by its owner only (mode 0600).
fn create_private(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}
