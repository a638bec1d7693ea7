//! The cluster backup file.
//!
//! ```text
//! metropolis-backup v1                      ─┐
//! ca-fingerprint: <SHA-256 of the CA, hex>   │ readable header: what the
//! revision: <store revision>                 │ backup is of, for
//! time: <RFC 3339>                           │ `metroctl cluster backup
//! nodes: <node records>                      │ --inspect` (never trusted:
//! backend: embedded | etcd                   │ the payload repeats it)
//! owner: ssh-ed25519 <owner public key>      │
//! <empty line>                              ─┘
//! age-encryption.org/v1 …                   ─ age file (binary), encrypted to the owner's
//!                                             Ed25519 key as an ssh-ed25519 recipient,
//!                                             and to any extra recipients
//! ```
//!
//! The age payload is a sequence of length-delimited
//! `metropolis.proto.admin.BackupChunk`s exactly as the Backup call streams
//! them: the header, the entries, the trailer with the digest of every key
//! and value ([`metropolis_store::transfer::Digest`]). Age authenticates
//! every 64 KiB of the payload and its end, so a truncated or altered file
//! fails to decrypt; the digest also proves the entries are the ones the
//! server read, and the header inside must equal the readable one.
//!
//! A passphrase is not offered: age allows a passphrase (scrypt) only as
//! the single recipient of a file, and every backup must be readable with
//! the owner's key.

use std::io::{self, BufRead, Read, Write};

use base64::Engine as _;
use metropolis_api::admin::{
    BackupChunk, BackupEntries, BackupHeader, BackupTrailer, ConsensusBackend, backup_chunk,
};
use metropolis_store::transfer::Digester;
use prost::Message;

/// The first line of every backup file.
pub const MAGIC: &str = "metropolis-backup v1";
/// The backup format this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Longest readable header accepted (a real one is about 250 bytes).
const MAX_HEADER: usize = 4096;
/// Largest chunk accepted in a payload: the Backup call sends at most
/// 1 MiB of keys and values per chunk, and a single record larger than
/// that stays far below this.
const MAX_CHUNK: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("not a Metropolis backup file (it does not start with {MAGIC:?})")]
    NotABackup,
    #[error("the readable header is damaged: {0}")]
    BadHeader(String),
    #[error(
        "backup format version {0} is not supported (this build reads version {FORMAT_VERSION})"
    )]
    UnsupportedVersion(u32),
    #[error(
        "the backup is not encrypted to this owner key (it was made for the owner {owner}); use the owner key of the cluster it comes from"
    )]
    WrongKey { owner: String },
    #[error("the backup is truncated or was altered: {0}")]
    Damaged(String),
    #[error("bad recipient {0}")]
    BadRecipient(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The `ssh-ed25519 <base64>` form of a raw Ed25519 public key.
pub fn ssh_public_key(public_key: &[u8; 32]) -> String {
    format!(
        "ssh-ed25519 {}",
        base64::engine::general_purpose::STANDARD.encode(ssh_key_blob(public_key))
    )
}

/// SSH wire encoding of an Ed25519 public key: string "ssh-ed25519",
/// string key (each a 4-byte big-endian length and the bytes).
fn ssh_key_blob(public_key: &[u8; 32]) -> Vec<u8> {
    let mut blob = Vec::with_capacity(51);
    for part in [b"ssh-ed25519".as_slice(), public_key.as_slice()] {
        blob.extend_from_slice(&(part.len() as u32).to_be_bytes());
        blob.extend_from_slice(part);
    }
    blob
}

/// The age recipient for an owner key.
pub fn owner_recipient(public_key: &[u8; 32]) -> age::ssh::Recipient {
    ssh_public_key(public_key)
        .parse()
        .unwrap_or_else(|_| unreachable!("a well-formed ssh-ed25519 key always parses"))
}

/// The age identity of an owner's private key. age builds SSH identities
/// only from OpenSSH's private key file, so the key goes through that
/// format in memory (unencrypted, one key, as `ssh-keygen` writes it).
pub fn owner_identity(key: &ed25519_dalek::SigningKey) -> age::ssh::Identity {
    fn string(out: &mut Vec<u8>, part: &[u8]) {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
    let public = key.verifying_key().to_bytes();
    let blob = ssh_key_blob(&public);
    let mut private = Vec::new();
    // The check integers only tell a right passphrase from a wrong one.
    private.extend_from_slice(&[0x6d, 0x65, 0x74, 0x72, 0x6d, 0x65, 0x74, 0x72]);
    string(&mut private, b"ssh-ed25519");
    string(&mut private, &public);
    // OpenSSH keeps an Ed25519 private key as seed ‖ public key.
    let mut pair = key.as_bytes().to_vec();
    pair.extend_from_slice(&public);
    string(&mut private, &pair);
    string(&mut private, b"");
    let mut pad = 1u8;
    while private.len() % 8 != 0 {
        private.push(pad);
        pad += 1;
    }
    let mut file = b"openssh-key-v1\0".to_vec();
    string(&mut file, b"none");
    string(&mut file, b"none");
    string(&mut file, b"");
    file.extend_from_slice(&1u32.to_be_bytes());
    string(&mut file, &blob);
    string(&mut file, &private);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&file);
    let mut pem = String::from("-----BEGIN OPENSSH PRIVATE KEY-----\n");
    for line in b64.as_bytes().chunks(70) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END OPENSSH PRIVATE KEY-----\n");
    age::ssh::Identity::from_buffer(pem.as_bytes(), None)
        .unwrap_or_else(|e| unreachable!("a well-formed OpenSSH key always parses: {e}"))
}

/// An extra recipient as `--recipient` takes it: an age X25519 recipient
/// (`age1…`) or an SSH public key line (`ssh-ed25519 …`, `ssh-rsa …`).
pub fn parse_recipient(s: &str) -> Result<Box<dyn age::Recipient + Send>, BackupError> {
    let s = s.trim();
    if s.starts_with("age1") {
        return s
            .parse::<age::x25519::Recipient>()
            .map(|r| Box::new(r) as _)
            .map_err(|e| BackupError::BadRecipient(format!("{}: {e}", short(s))));
    }
    s.parse::<age::ssh::Recipient>()
        .map(|r| Box::new(r) as _)
        .map_err(|e| {
            BackupError::BadRecipient(format!(
                "{}: {e:?}; use an age recipient (age1…) or an SSH public key line",
                short(s)
            ))
        })
}

fn short(s: &str) -> String {
    let cut: String = s.chars().take(24).collect();
    if cut.len() < s.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
}

fn backend_name(backend: i32) -> &'static str {
    match ConsensusBackend::try_from(backend) {
        Ok(ConsensusBackend::Embedded) => "embedded",
        Ok(ConsensusBackend::Etcd) => "etcd",
        _ => "unknown",
    }
}

/// The readable header, as written in front of the payload.
pub fn render_header(h: &BackupHeader) -> String {
    let time = h
        .time
        .and_then(|t| std::time::SystemTime::try_from(t).ok())
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|| "unknown".into());
    let owner = <[u8; 32]>::try_from(h.owner_public_key.as_slice())
        .map(|k| ssh_public_key(&k))
        .unwrap_or_else(|_| "unknown".into());
    format!(
        "{MAGIC}\nca-fingerprint: {}\nrevision: {}\ntime: {time}\nnodes: {}\nbackend: {}\nowner: {owner}\n\n",
        hex::encode(&h.ca_fingerprint),
        h.revision,
        h.node_count,
        backend_name(h.backend),
    )
}

/// Reads the readable header, leaving `r` at the start of the age file.
pub fn read_header<R: BufRead>(r: &mut R) -> Result<BackupHeader, BackupError> {
    let mut lines = Vec::new();
    let mut total = 0;
    loop {
        let mut line = Vec::new();
        let n = r
            .by_ref()
            .take(MAX_HEADER as u64)
            .read_until(b'\n', &mut line)?;
        total += n;
        if lines.is_empty() && !line.starts_with(b"metropolis-backup v") {
            return Err(BackupError::NotABackup);
        }
        if n == 0 || !line.ends_with(b"\n") || total > MAX_HEADER {
            return Err(BackupError::BadHeader(
                "it ends before the empty line that closes it".into(),
            ));
        }
        let line = String::from_utf8(line)
            .map_err(|_| BackupError::BadHeader("it is not UTF-8".into()))?;
        let line = line.trim_end_matches('\n').to_string();
        if line.is_empty() {
            break;
        }
        lines.push(line);
    }
    if lines[0] != MAGIC {
        let version = lines[0]
            .strip_prefix("metropolis-backup v")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        return Err(BackupError::UnsupportedVersion(version));
    }
    let mut h = BackupHeader {
        format_version: FORMAT_VERSION,
        ..Default::default()
    };
    for line in &lines[1..] {
        let (name, value) = line
            .split_once(": ")
            .ok_or_else(|| BackupError::BadHeader(format!("line {} has no value", short(line))))?;
        let bad = |what: &str| BackupError::BadHeader(format!("{name}: {what} {}", short(value)));
        match name {
            "ca-fingerprint" => {
                h.ca_fingerprint = hex::decode(value).map_err(|_| bad("not hex:"))?;
            }
            "revision" => h.revision = value.parse().map_err(|_| bad("not a number:"))?,
            "time" => {
                h.time = humantime::parse_rfc3339(value)
                    .ok()
                    .map(prost_types::Timestamp::from);
            }
            "nodes" => h.node_count = value.parse().map_err(|_| bad("not a number:"))?,
            "backend" => {
                h.backend = match value {
                    "embedded" => ConsensusBackend::Embedded,
                    "etcd" => ConsensusBackend::Etcd,
                    _ => ConsensusBackend::Invalid,
                } as i32;
            }
            "owner" => {
                h.owner_public_key = value
                    .strip_prefix("ssh-ed25519 ")
                    .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                    .filter(|blob| blob.len() == 51)
                    .map(|blob| blob[19..].to_vec())
                    .ok_or_else(|| bad("not an ssh-ed25519 key:"))?;
            }
            // Fields of later versions of the same format.
            _ => {}
        }
    }
    Ok(h)
}

/// Writes a backup file: [`Writer::new`] with the header the Backup call
/// sent first, [`Writer::entries`] for each page, [`Writer::finish`] with
/// its trailer.
pub struct Writer<W: Write> {
    payload: age::stream::StreamWriter<W>,
    digester: Digester,
}

impl<W: Write> Writer<W> {
    /// Writes the readable header and starts the payload, encrypted to the
    /// owner in `header` and to `extra` recipients.
    pub fn new(
        mut out: W,
        header: &BackupHeader,
        extra: &[Box<dyn age::Recipient + Send>],
    ) -> Result<Self, BackupError> {
        let owner: [u8; 32] = header
            .owner_public_key
            .as_slice()
            .try_into()
            .map_err(|_| BackupError::BadHeader("the owner key is not 32 bytes".into()))?;
        let owner = owner_recipient(&owner);
        let recipients = std::iter::once(&owner as &dyn age::Recipient)
            .chain(extra.iter().map(|r| r.as_ref() as &dyn age::Recipient));
        let encryptor = age::Encryptor::with_recipients(recipients)
            .map_err(|e| BackupError::BadRecipient(e.to_string()))?;
        out.write_all(render_header(header).as_bytes())?;
        let mut w = Writer {
            payload: encryptor.wrap_output(out)?,
            digester: Digester::default(),
        };
        w.chunk(backup_chunk::Chunk::Header(header.clone()))?;
        Ok(w)
    }

    fn chunk(&mut self, c: backup_chunk::Chunk) -> io::Result<()> {
        let msg = BackupChunk { chunk: Some(c) };
        self.payload
            .write_all(&msg.encode_length_delimited_to_vec())
    }

    pub fn entries(&mut self, entries: BackupEntries) -> Result<(), BackupError> {
        for e in &entries.entries {
            self.digester.add(&e.key, &e.value);
        }
        Ok(self.chunk(backup_chunk::Chunk::Entries(entries))?)
    }

    /// Ends the payload with `trailer`, which must match the entries
    /// written (the server's digest against what arrived), and returns the
    /// output.
    pub fn finish(mut self, trailer: &BackupTrailer) -> Result<W, BackupError> {
        let ours = trailer_of(std::mem::take(&mut self.digester).finish());
        if &ours != trailer {
            return Err(BackupError::Damaged(format!(
                "the server's digest ({} keys) differs from what arrived ({} keys)",
                trailer.keys, ours.keys
            )));
        }
        self.chunk(backup_chunk::Chunk::Trailer(ours))?;
        Ok(self.payload.finish()?)
    }
}

fn trailer_of(d: metropolis_store::transfer::Digest) -> BackupTrailer {
    BackupTrailer {
        keys: d.keys,
        bytes: d.bytes,
        sha256: d.sha256.to_vec(),
    }
}

/// Reads a backup file: the readable header, then (with the right key)
/// the entries, checked against the trailer at the end.
pub struct Reader<R: BufRead> {
    header: BackupHeader,
    payload: age::stream::StreamReader<R>,
    digester: Digester,
    done: bool,
}

impl<R: BufRead> Reader<R> {
    /// Reads the header and decrypts with `key`; fails if the file is not
    /// for this key or its inner header differs from the readable one.
    pub fn open(mut input: R, key: &ed25519_dalek::SigningKey) -> Result<Self, BackupError> {
        let readable = read_header(&mut input)?;
        let decryptor = age::Decryptor::new_buffered(input).map_err(|e| {
            BackupError::Damaged(format!(
                "the encrypted part does not start as age does: {e}"
            ))
        })?;
        let identity = owner_identity(key);
        let payload = decryptor
            .decrypt(std::iter::once(&identity as &dyn age::Identity))
            .map_err(|e| match e {
                age::DecryptError::NoMatchingKeys => BackupError::WrongKey {
                    owner: <[u8; 32]>::try_from(readable.owner_public_key.as_slice())
                        .map(|k| short(&ssh_public_key(&k)))
                        .unwrap_or_else(|_| "unknown".into()),
                },
                e => BackupError::Damaged(format!("the encrypted header: {e}")),
            })?;
        let mut r = Reader {
            header: readable,
            payload,
            digester: Digester::default(),
            done: false,
        };
        match r.chunk()? {
            Some(backup_chunk::Chunk::Header(inner)) => {
                if inner.format_version != FORMAT_VERSION {
                    return Err(BackupError::UnsupportedVersion(inner.format_version));
                }
                // The readable header loses nothing but sub-second time.
                let mut seen = inner.clone();
                if let Some(t) = seen.time.as_mut() {
                    t.nanos = 0;
                }
                if seen != r.header {
                    return Err(BackupError::Damaged(
                        "the readable header differs from the one inside".into(),
                    ));
                }
                r.header = inner;
            }
            _ => {
                return Err(BackupError::Damaged(
                    "the payload does not start with its header".into(),
                ));
            }
        }
        Ok(r)
    }

    pub fn header(&self) -> &BackupHeader {
        &self.header
    }

    fn chunk(&mut self) -> Result<Option<backup_chunk::Chunk>, BackupError> {
        let len = match read_varint(&mut self.payload).map_err(damaged)? {
            None => return Ok(None),
            Some(len) if len > MAX_CHUNK => {
                return Err(BackupError::Damaged(format!("a chunk claims {len} bytes")));
            }
            Some(len) => len as usize,
        };
        let mut buf = vec![0; len];
        self.payload.read_exact(&mut buf).map_err(damaged)?;
        let msg = BackupChunk::decode(buf.as_slice())
            .map_err(|e| BackupError::Damaged(format!("a chunk does not decode: {e}")))?;
        Ok(msg.chunk)
    }

    /// The next page of entries, or None after the trailer, once the
    /// digest of every entry matched it and nothing followed it.
    pub fn entries(&mut self) -> Result<Option<BackupEntries>, BackupError> {
        if self.done {
            return Ok(None);
        }
        match self.chunk()? {
            Some(backup_chunk::Chunk::Entries(e)) => {
                for entry in &e.entries {
                    self.digester.add(&entry.key, &entry.value);
                }
                Ok(Some(e))
            }
            Some(backup_chunk::Chunk::Trailer(t)) => {
                let ours = trailer_of(std::mem::take(&mut self.digester).finish());
                if ours != t {
                    return Err(BackupError::Damaged(format!(
                        "the digest of the entries ({} keys) is not the recorded one ({} keys)",
                        ours.keys, t.keys
                    )));
                }
                if self.chunk()?.is_some() {
                    return Err(BackupError::Damaged("data follows the trailer".into()));
                }
                self.done = true;
                Ok(None)
            }
            Some(backup_chunk::Chunk::Header(_)) => {
                Err(BackupError::Damaged("a second header".into()))
            }
            None => Err(BackupError::Damaged(
                "the payload ends before its trailer".into(),
            )),
        }
    }
}

fn damaged(e: io::Error) -> BackupError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => {
            BackupError::Damaged("the payload ends in the middle of a chunk".into())
        }
        _ => BackupError::Damaged(format!("the encrypted payload fails authentication ({e})")),
    }
}

/// A protobuf varint, or None at a clean end of input.
fn read_varint(r: &mut impl Read) -> io::Result<Option<u64>> {
    let mut value = 0u64;
    for i in 0..10 {
        let mut b = [0u8];
        if r.read(&mut b)? == 0 {
            if i == 0 {
                return Ok(None);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        value |= u64::from(b[0] & 0x7f) << (7 * i);
        if b[0] & 0x80 == 0 {
            return Ok(Some(value));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "varint too long",
    ))
}

/// Reads a whole backup once, checking everything a restore relies on,
/// and returns its header.
pub fn verify<R: BufRead>(
    input: R,
    key: &ed25519_dalek::SigningKey,
) -> Result<BackupHeader, BackupError> {
    let mut r = Reader::open(input, key)?;
    while r.entries()?.is_some() {}
    Ok(r.header)
}

#[cfg(test)]
mod tests;
