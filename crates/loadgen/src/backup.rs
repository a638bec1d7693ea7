//! `--backup FILE`: a `ClusterAdmin.Backup` of the loaded cluster while its
//! nodes heartbeat, written as `metroctl cluster backup` writes it, with
//! its size and time.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use metropolis_api::admin::{
    BackupRequest, backup_chunk, cluster_admin_client::ClusterAdminClient,
};
use tonic::transport::Channel;

pub struct Figures {
    pub nodes: u64,
    pub keys: u64,
    /// Keys and values.
    pub state_bytes: u64,
    /// The file on disk.
    pub file_bytes: u64,
    pub time: Duration,
}

pub async fn take(owner: Channel, file: &std::path::Path) -> anyhow::Result<Figures> {
    let started = Instant::now();
    let mut admin = ClusterAdminClient::new(owner);
    let mut stream = admin
        .backup(BackupRequest {})
        .await
        .context("Backup")?
        .into_inner();
    let Some(backup_chunk::Chunk::Header(header)) = stream.message().await?.and_then(|c| c.chunk)
    else {
        bail!("the Backup answer does not start with its header");
    };
    let out = std::io::BufWriter::new(
        std::fs::File::create(file).with_context(|| format!("creating {}", file.display()))?,
    );
    let mut writer = metropolis_backup::Writer::new(out, &header, &[])?;
    let (mut keys, mut state_bytes) = (0, 0);
    let trailer = loop {
        match stream.message().await?.and_then(|c| c.chunk) {
            Some(backup_chunk::Chunk::Entries(e)) => {
                keys += e.entries.len() as u64;
                state_bytes += e
                    .entries
                    .iter()
                    .map(|e| (e.key.len() + e.value.len()) as u64)
                    .sum::<u64>();
                writer.entries(e)?;
            }
            Some(backup_chunk::Chunk::Trailer(t)) => break t,
            _ => bail!("the Backup answer ended without its trailer"),
        }
    };
    let mut out = writer.finish(&trailer)?;
    std::io::Write::flush(&mut out)?;
    Ok(Figures {
        nodes: header.node_count,
        keys,
        state_bytes,
        file_bytes: std::fs::metadata(file)?.len(),
        time: started.elapsed(),
    })
}
