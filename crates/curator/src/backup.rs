//! Backups of the whole cluster state, and restoring one into a fresh store.
//!
//! A backup is every key and value the store holds at one revision
//! ([`metropolis_store::Store::snapshot`], so either backend), streamed as
//! [`BackupChunk`]s: a header, pages of entries, a trailer with the
//! [`Digest`] of them all. Encryption and the file are
//! `metropolis_backup`'s; this module knows what the keys mean.
//!
//! Restoring ([`restore`]) writes the entries into an empty store and then
//! makes the state fit a cluster whose only consensus member is the
//! restoring node:
//!
//! - the leased keys (the old curator leader's claim) are left out: their
//!   lease does not exist in the new store, and the first election makes a
//!   new leader key (and so a new fence);
//! - the register ticket is replaced, so a ticket that was handed out
//!   before the backup (and perhaps revoked since) does not work again;
//! - every ConsensusMember role goes: the old members' etcd (or embedded
//!   store) is gone, and keeping their roles would have the new leader try
//!   to reach members that no longer exist. The cluster grows back to HA
//!   the way it grew the first time (`metroctl node add role
//!   ConsensusMember`);
//! - the restoring node needs a new key (its sealed credentials were lost
//!   with its disk) and so, node IDs being derived from keys, a new ID. The
//!   old record of a node at the same address (if any) moves to the new ID
//!   with its labels and roles and is marked with the new key; the old ID
//!   gets a tombstone, as a deleted node does, so its certificate (and key,
//!   should it still exist somewhere) is refused. Without such a record a
//!   new one is made, as bootstrap makes the first node's.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::SystemTime;

use futures::{Stream, StreamExt};
use metropolis_api::admin::{
    BackupChunk, BackupEntries, BackupEntry, BackupHeader, BackupTrailer, ConsensusBackend,
    backup_chunk,
};
use metropolis_api::common::{NodeRoles, NodeState, NodeStatus, node_roles};
use metropolis_api::private;
use metropolis_identity::CertificateAuthority;
use metropolis_store::transfer::{Digest, Digester};
use metropolis_store::{KeyValue, Op, Store, Txn};
use prost::Message;

use crate::consensus::pki::{ConsensusPki, KEY_PKI};
use crate::error::CuratorError;
use crate::state::{self, Cluster, KEY_CA, KEY_OWNER, KEY_TICKET, NODES_PREFIX, decode};

/// Version of the backup format: what the entries are and how they are
/// digested.
pub const FORMAT_VERSION: u32 = 1;

/// Keys per page read from the store.
const PAGE_KEYS: usize = 1000;
/// Bytes of keys and values per streamed chunk: well under any gRPC message
/// limit, whatever the size of single records.
const CHUNK_BYTES: usize = 1 << 20;

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<BackupChunk, CuratorError>> + Send>>;

/// The digest a backup's trailer carries.
pub fn trailer(d: &Digest) -> BackupTrailer {
    BackupTrailer {
        keys: d.keys,
        bytes: d.bytes,
        sha256: d.sha256.to_vec(),
    }
}

/// Adds a page of entries to a digest (the one definition of what a backup
/// digests: key and value of every entry, in order).
pub fn digest_entries(digester: &mut Digester, entries: &BackupEntries) {
    for e in &entries.entries {
        digester.add(&e.key, &e.value);
    }
}

impl Cluster {
    /// The whole state at one revision, as the Backup call streams it.
    pub async fn backup(&self) -> Result<ChunkStream, CuratorError> {
        let owner = self.owner_public_key().await?;
        let snapshot = self
            .store()
            .snapshot(NODES_PREFIX.as_bytes(), PAGE_KEYS)
            .await?;
        let header = BackupHeader {
            format_version: FORMAT_VERSION,
            ca_fingerprint: ca_fingerprint(self.ca()),
            revision: snapshot.revision,
            time: Some(prost_types::Timestamp::from(SystemTime::now())),
            node_count: snapshot.counted,
            owner_public_key: owner.to_vec(),
            backend: if self.consensus().is_some() {
                ConsensusBackend::Etcd
            } else {
                ConsensusBackend::Embedded
            } as i32,
        };
        let pump = Pump {
            header: Some(header),
            pages: snapshot.pages,
            pending: VecDeque::new(),
            digester: Some(Digester::default()),
        };
        Ok(Box::pin(futures::stream::try_unfold(pump, Pump::next)))
    }
}

/// The state of a Backup stream: header first, then the pages of the
/// snapshot cut into chunks (read one page ahead at most), then the trailer.
struct Pump {
    header: Option<BackupHeader>,
    pages: metropolis_store::PageStream,
    pending: VecDeque<BackupEntries>,
    /// None once the trailer is out.
    digester: Option<Digester>,
}

impl Pump {
    async fn next(mut self) -> Result<Option<(BackupChunk, Pump)>, CuratorError> {
        if let Some(h) = self.header.take() {
            return Ok(Some((chunk(backup_chunk::Chunk::Header(h)), self)));
        }
        loop {
            let Some(digester) = self.digester.as_mut() else {
                return Ok(None);
            };
            if let Some(entries) = self.pending.pop_front() {
                digest_entries(digester, &entries);
                return Ok(Some((chunk(backup_chunk::Chunk::Entries(entries)), self)));
            }
            match self.pages.next().await {
                Some(page) => self.pending.extend(split(page?)),
                None => {
                    let digest = self.digester.take().map(Digester::finish);
                    let t = trailer(&digest.unwrap_or_else(|| Digester::default().finish()));
                    return Ok(Some((chunk(backup_chunk::Chunk::Trailer(t)), self)));
                }
            }
        }
    }
}

/// Cuts a page into chunks of at most [`CHUNK_BYTES`] (a single larger
/// record gets a chunk of its own).
fn split(kvs: Vec<KeyValue>) -> Vec<BackupEntries> {
    let mut out = Vec::new();
    let mut current = BackupEntries::default();
    let mut bytes = 0;
    for kv in kvs {
        let size = kv.key.len() + kv.value.len();
        if !current.entries.is_empty() && bytes + size > CHUNK_BYTES {
            out.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.entries.push(BackupEntry {
            key: kv.key,
            value: kv.value,
            leased: kv.lease != 0,
        });
    }
    if !current.entries.is_empty() {
        out.push(current);
    }
    out
}

fn chunk(c: backup_chunk::Chunk) -> BackupChunk {
    BackupChunk { chunk: Some(c) }
}

/// SHA-256 of the CA certificate.
pub fn ca_fingerprint(ca: &CertificateAuthority) -> Vec<u8> {
    use sha2::Digest as _;
    sha2::Sha256::digest(ca.cert_der()).to_vec()
}

/// Writes one chunk of verified backup entries into the store being
/// restored, leaving out the leased ones (see the module documentation).
pub async fn load(store: &dyn Store, entries: BackupEntries) -> Result<(), CuratorError> {
    let kvs: Vec<KeyValue> = entries
        .entries
        .into_iter()
        .filter(|e| !e.leased)
        .map(|e| KeyValue {
            key: e.key,
            value: e.value,
            create_revision: 0,
            mod_revision: 0,
            version: 0,
            lease: 0,
        })
        .collect();
    metropolis_store::transfer::load(store, &kvs).await?;
    Ok(())
}

/// The restoring node: who it is now.
pub struct Restoring {
    /// The new node key's public half.
    pub node_public_key: [u8; 32],
    /// The address it serves on.
    pub address: String,
    /// Its ConsensusMember role: empty on the embedded store; on etcd its
    /// peer certificate (from [`peer_certificate`]); itself as the only
    /// peer is filled in.
    pub consensus_role: node_roles::ConsensusMember,
}

/// The etcd peer certificate of a node restoring a backup onto etcd, from
/// the backup's consensus CA (the value of [`KEY_PKI`] in it), valid for the
/// node certificate lifetime of the backup's configuration (the value of
/// [`state::KEY_CONFIG`], if it has one), with the CA certificate and the
/// CRL etcd starts with.
pub fn peer_certificate(
    pki_record: &[u8],
    config_record: Option<&[u8]>,
    node_public_key: &[u8; 32],
    address: std::net::IpAddr,
) -> Result<node_roles::ConsensusMember, CuratorError> {
    let pki = ConsensusPki::from_stored(pki_record, 0)?;
    let lifetime = node_lifetime(config_record)?;
    Ok(node_roles::ConsensusMember {
        ca_certificate: pki.ca_certificate().to_vec(),
        peer_certificate: pki.issue_peer_certificate(node_public_key, address, lifetime)?,
        initial_crl: pki.crl()?,
        peers: Vec::new(),
    })
}

/// The node certificate lifetime a stored configuration (the value of
/// [`state::KEY_CONFIG`]) sets; the default without one.
fn node_lifetime(config_record: Option<&[u8]>) -> Result<std::time::Duration, CuratorError> {
    let cfg: metropolis_api::common::ClusterConfiguration = match config_record {
        Some(v) => decode(state::KEY_CONFIG, v)?,
        None => Default::default(),
    };
    Ok(state::Lifetimes::of(&cfg).node)
}

/// What [`finish`] did.
#[derive(Debug)]
pub struct Restored {
    pub ca_certificate: Vec<u8>,
    pub node_certificate: Vec<u8>,
    pub node_id: String,
    /// The ID the node at this address had in the backup, if there was one.
    pub replaced: Option<String>,
    /// Nodes whose ConsensusMember role was dropped.
    pub demoted: Vec<String>,
}

/// After every chunk is [`load`]ed: makes the restored state that of a
/// cluster with `node` as its only consensus member (see the module
/// documentation) in one transaction, and issues the node's certificate.
pub async fn finish(store: &dyn Store, node: &Restoring) -> Result<Restored, CuratorError> {
    let ca_kv = store
        .get(KEY_CA.as_bytes())
        .await?
        .ok_or_else(|| CuratorError::Corrupt(format!("the backup holds no {KEY_CA}")))?;
    let ca_record: private::ClusterCa = decode(KEY_CA, &ca_kv.value)?;
    let seed: [u8; 32] = ca_record
        .key_seed
        .as_slice()
        .try_into()
        .map_err(|_| CuratorError::Corrupt(format!("{KEY_CA}: key seed is not 32 bytes")))?;
    let ca = CertificateAuthority::from_parts(ca_record.certificate, seed)
        .map_err(|e| CuratorError::Corrupt(format!("{KEY_CA}: {e}")))?;
    if store.get(KEY_OWNER.as_bytes()).await?.is_none() {
        return Err(CuratorError::Corrupt(format!(
            "the backup holds no {KEY_OWNER}"
        )));
    }
    let node_id = metropolis_identity::node_id(&node.node_public_key);
    let nodes = store.range(NODES_PREFIX.as_bytes()).await?;
    let mut txn = Txn::new().and_then(Op::put(KEY_TICKET, state::random_ticket()));
    let mut replaced = None;
    let mut demoted = Vec::new();
    let mut revoke = Vec::new();
    let mut own: Option<private::Node> = None;
    for kv in nodes.kvs {
        let key = String::from_utf8_lossy(&kv.key).into_owned();
        let id = key[NODES_PREFIX.len()..].to_string();
        let mut record: private::Node = decode(&key, &kv.value)?;
        let here = record
            .status
            .as_ref()
            .is_some_and(|s| s.external_address == node.address);
        if here && own.is_none() {
            txn = txn.and_then(Op::delete(kv.key.clone())).and_then(Op::put(
                state::tombstone_key(&id),
                record.public_key.clone(),
            ));
            replaced = Some(id);
            own = Some(record);
            continue;
        }
        if let Some(roles) = record.roles.as_mut()
            && let Some(old) = roles.consensus_member.take()
        {
            txn = txn.and_then(Op::put(kv.key, record.encode_to_vec()));
            revoke.push((id.clone(), old.peer_certificate));
            demoted.push(id);
        }
    }
    if let Some(own) = &own
        && let Some(old) = own.roles.as_ref().and_then(|r| r.consensus_member.as_ref())
    {
        revoke.push((
            replaced.clone().unwrap_or_default(),
            old.peer_certificate.clone(),
        ));
    }
    // The old members' peer certificates must not open the new etcd's
    // peer port: they go on the consensus CRL.
    if let Some(kv) = store.get(KEY_PKI.as_bytes()).await? {
        let mut pki = ConsensusPki::from_stored(&kv.value, kv.mod_revision)?;
        let mut changed = false;
        for (id, cert) in &revoke {
            changed |= pki.revoke(id, cert);
        }
        if changed {
            let (compare, ops) = pki.write()?;
            txn = txn.when(compare);
            for op in ops {
                txn = txn.and_then(op);
            }
        }
    }
    let mut own = own.unwrap_or_else(|| private::Node {
        registered_at: Some(prost_types::Timestamp::from(SystemTime::now())),
        tpm_usage: metropolis_api::common::NodeTpmUsage::NotPresent as i32,
        ..Default::default()
    });
    own.public_key = node.node_public_key.to_vec();
    own.state = NodeState::Up as i32;
    own.decommission_requested = false;
    let mut role = node.consensus_role.clone();
    if !role.peer_certificate.is_empty() && role.peers.is_empty() {
        let address = node.address.parse().map_err(|_| {
            CuratorError::InvalidArgument(format!("{} is not an IP address", node.address))
        })?;
        role.peers.push(node_roles::consensus_member::Peer {
            name: node_id.clone(),
            url: crate::consensus::peer_url(address),
        });
    }
    own.roles
        .get_or_insert_with(NodeRoles::default)
        .consensus_member = Some(role);
    let status = own.status.get_or_insert_with(NodeStatus::default);
    status.external_address = node.address.clone();
    txn = txn.and_then(Op::put(state::node_key(&node_id), own.encode_to_vec()));
    if !store.txn(txn).await?.succeeded {
        return Err(CuratorError::Unavailable(
            "the restored consensus PKI changed while the restore finished".into(),
        ));
    }
    // The restored configuration's lifetime, as any node certificate.
    let config = store.get(state::KEY_CONFIG.as_bytes()).await?;
    let lifetime = node_lifetime(config.as_ref().map(|kv| kv.value.as_slice()))?;
    let node_certificate = ca
        .issue_node_certificate(&node.node_public_key, lifetime)
        .map_err(|e| CuratorError::Internal(format!("issuing node certificate: {e}")))?;
    Ok(Restored {
        ca_certificate: ca.cert_der().to_vec(),
        node_certificate,
        node_id,
        replaced,
        demoted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::test_support;
    use futures::TryStreamExt;

    /// Backup of a bootstrapped cluster with a worker, restored into a
    /// fresh store by a new node at the first node's address.
    #[tokio::test]
    async fn backup_and_restore_round_trip() {
        let (_dir, cluster, first_id, worker, _) = test_support::cluster_with_worker().await;
        // A leased key, as the leader's claim is.
        let lease = cluster
            .store()
            .grant_lease(std::time::Duration::from_secs(30))
            .await
            .expect("lease");
        cluster
            .store()
            .txn(Txn::new().and_then(Op::Put {
                key: b"/curator/leader".to_vec(),
                value: b"me".to_vec(),
                lease,
            }))
            .await
            .expect("leased put");
        let everything = cluster.store().range(b"").await.expect("range");
        let ticket = cluster.register_ticket().await.expect("ticket");

        let chunks: Vec<BackupChunk> = cluster
            .backup()
            .await
            .expect("backup")
            .try_collect()
            .await
            .expect("stream");
        let Some(backup_chunk::Chunk::Header(header)) = &chunks[0].chunk else {
            panic!("first chunk is not the header: {:?}", chunks[0]);
        };
        assert_eq!(header.node_count, 2);
        assert_eq!(header.revision, everything.revision);
        assert_eq!(header.ca_fingerprint, ca_fingerprint(cluster.ca()));
        assert_eq!(header.owner_public_key, vec![7; 32]);
        let Some(backup_chunk::Chunk::Trailer(t)) = &chunks[chunks.len() - 1].chunk else {
            panic!("last chunk is not the trailer");
        };
        assert_eq!(*t, trailer(&Digest::of(&everything.kvs)));

        let (_dir2, fresh, _) = test_support::store().await;
        let mut entries = 0;
        for c in chunks {
            if let Some(backup_chunk::Chunk::Entries(e)) = c.chunk {
                entries += e.entries.len();
                load(fresh.as_ref(), e).await.expect("load");
            }
        }
        assert_eq!(entries, everything.kvs.len());
        let key = metropolis_identity::generate_key()
            .verifying_key()
            .to_bytes();
        let restored = finish(
            fresh.as_ref(),
            &Restoring {
                node_public_key: key,
                address: "127.0.0.2".into(),
                consensus_role: Default::default(),
            },
        )
        .await
        .expect("finish");
        assert_eq!(restored.replaced.as_deref(), Some(first_id.as_str()));
        assert_eq!(restored.node_id, metropolis_identity::node_id(&key));
        assert!(fresh.get(b"/curator/leader").await.expect("get").is_none());

        let reopened = Cluster::open(fresh.clone()).await.expect("open restored");
        assert_eq!(reopened.ca().cert_der(), cluster.ca().cert_der());
        assert_ne!(reopened.register_ticket().await.expect("ticket"), ticket);
        assert!(reopened.is_deleted(&first_id).await.expect("tombstone"));
        let nodes = reopened.nodes().await.expect("nodes");
        let ids: Vec<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids.len(), 2);
        assert!(ids.contains(&worker.as_str()) && ids.contains(&restored.node_id.as_str()));
        let me = nodes
            .iter()
            .find(|n| n.id == restored.node_id)
            .expect("restored node");
        assert!(state::is_consensus_member(&me.node));
        let cert = metropolis_identity::parse_certificate(&restored.node_certificate)
            .expect("restored node certificate");
        assert_eq!(cert.public_key, key);
        metropolis_identity::verify_signed_by(
            &cert,
            &restored.ca_certificate,
            time::OffsetDateTime::now_utc(),
        )
        .expect("signed by the restored CA");
    }
}
