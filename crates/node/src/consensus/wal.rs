//! etcd's write-ahead log, read just far enough to recognise a member that
//! etcd 3.4 cannot start (see the module documentation of `consensus`).

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::path::Path;

use prost::Message;

/// Removes etcd's data directory `data` if its WAL exists but holds no raft
/// records: the state etcd 3.4 cannot start from (see the module
/// documentation).
///
/// Such a member has persisted no entry, term or vote, so it has promised
/// nothing to any peer and starting it afresh is the same as the start that
/// was interrupted. Anything short of a clean parse showing exactly that
/// (an unreadable or damaged WAL, an unknown layout) leaves the directory
/// alone.
pub(super) fn reset_unbootstrapped(data: &Path) {
    let wal_dir = data.join("member").join("wal");
    match wal_has_raft_records(&wal_dir) {
        Ok(Some(false)) => {}
        Ok(None | Some(true)) => return,
        Err(e) => {
            tracing::warn!(
                dir = %wal_dir.display(),
                error = %e,
                "cannot read etcd's WAL; starting etcd on it as it is"
            );
            return;
        }
    }
    tracing::warn!(
        dir = %data.display(),
        "etcd was stopped before its first raft records reached its WAL, a state \
         etcd cannot start from (etcd-io/etcd#12578); removing its data so it \
         bootstraps again"
    );
    if let Err(e) = fs::remove_dir_all(data) {
        tracing::error!(dir = %data.display(), error = %e, "cannot remove etcd's data");
    }
}

/// Whether the WAL files (`*.wal`) in `wal_dir` hold raft records (entries
/// or hard state): `None` if there is no WAL, `Some(false)` if every file
/// parsed cleanly and holds header records only. Errors for anything else.
fn wal_has_raft_records(wal_dir: &Path) -> io::Result<Option<bool>> {
    let entries = match fs::read_dir(wal_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut found_wal = false;
    for entry in entries {
        let path = entry?.path();
        if path.extension() != Some(OsStr::new("wal")) {
            continue;
        }
        found_wal = true;
        if first_raft_record(&path)?.is_some() {
            return Ok(Some(true));
        }
    }
    Ok(found_wal.then_some(false))
}

/// etcd's `walpb.Record`.
#[derive(Clone, PartialEq, Message)]
struct WalRecord {
    #[prost(int64, tag = "1")]
    kind: i64,
    #[prost(uint32, tag = "2")]
    crc: u32,
    #[prost(bytes = "vec", tag = "3")]
    data: Vec<u8>,
}

/// WAL record types (etcd's `wal/wal.go`).
const WAL_METADATA: i64 = 1;
const WAL_ENTRY: i64 = 2;
const WAL_STATE: i64 = 3;
const WAL_CRC: i64 = 4;
const WAL_SNAPSHOT: i64 = 5;

/// The offset of the first raft record (entry or hard state) in the WAL file
/// `path`, or `None` if it ends after header records only (metadata, CRC,
/// snapshot). Fails on anything it cannot parse.
///
/// The format (etcd's `wal/encoder.go`): frames of a little-endian 64-bit
/// length word, whose low 56 bits are the record's length and whose top bit
/// says that the low 3 bits of the top byte are padding after it, then the
/// protobuf `walpb.Record`. The files are preallocated with zeros; a zero
/// length word is the end.
fn first_raft_record(path: &Path) -> io::Result<Option<u64>> {
    use std::io::Read as _;

    let invalid = |why: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {why}", path.display()),
        )
    };
    let file = fs::File::open(path)?;
    let size = file.metadata()?.len();
    let mut reader = io::BufReader::new(file);
    let mut offset = 0u64;
    loop {
        let mut word = [0u8; 8];
        match reader.read_exact(&mut word) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && offset == size => {
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        let word = u64::from_le_bytes(word);
        if word == 0 {
            return Ok(None);
        }
        let len = word & 0x00ff_ffff_ffff_ffff;
        let padding = if word >> 63 == 1 {
            (word >> 56) & 0x7
        } else {
            0
        };
        let frame = len + padding;
        if frame > size.saturating_sub(offset + 8) {
            return Err(invalid(format!(
                "record at {offset} is {len} bytes, past the end of the file"
            )));
        }
        let mut buf = vec![0u8; usize::try_from(frame).map_err(|e| invalid(e.to_string()))?];
        reader.read_exact(&mut buf)?;
        buf.truncate(buf.len() - usize::try_from(padding).unwrap_or(0));
        let record = WalRecord::decode(buf.as_slice())
            .map_err(|e| invalid(format!("record at {offset}: {e}")))?;
        match record.kind {
            WAL_ENTRY | WAL_STATE => return Ok(Some(offset)),
            WAL_METADATA | WAL_CRC | WAL_SNAPSHOT => {}
            other => return Err(invalid(format!("record at {offset} has type {other}"))),
        }
        offset += 8 + frame;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::config::DATA_DIR;
    use crate::consensus::supervisor::Etcd;
    use crate::consensus::testing::*;
    use crate::logtree::LogTree;
    use metropolis_identity::CertificateAuthority;
    use std::path::PathBuf;

    /// The one WAL file of a fresh member.
    fn wal_file(dir: &Path) -> PathBuf {
        let wal_dir = dir.join(DATA_DIR).join("member").join("wal");
        let mut wals: Vec<PathBuf> = fs::read_dir(&wal_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension() == Some(OsStr::new("wal")))
            .collect();
        assert_eq!(wals.len(), 1, "{wals:?}");
        wals.remove(0)
    }

    #[tokio::test]
    async fn member_killed_before_its_first_raft_records_is_reset() {
        let binary = etcd_binary();
        let ca = CertificateAuthority::generate().unwrap();
        let m = Member::new();
        m.configure_alone(&ca);
        let etcd = Etcd::start(&m.dir, &binary, LogTree::new()).await.unwrap();
        let socket = etcd.client_socket();
        eventually(30, "healthy", || healthy(&socket)).await;
        etcd.stop().await;

        // A real WAL, as etcd wrote it: header records, then raft records.
        let wal = wal_file(&m.dir);
        let wal_dir = wal.parent().unwrap().to_path_buf();
        let first = first_raft_record(&wal).unwrap().expect("raft records");
        assert!(first > 0);
        assert_eq!(wal_has_raft_records(&wal_dir).unwrap(), Some(true));
        // Nothing happens to a member that got that far.
        reset_unbootstrapped(&m.dir.join(DATA_DIR));
        assert!(wal.exists());

        // What etcd leaves behind when killed between creating the WAL and
        // its first raft records (the rest of the file is preallocated
        // zeros). Started on this, etcd 3.4 logs "voters=()" and hangs.
        let mut bytes = fs::read(&wal).unwrap();
        let cut = usize::try_from(first).unwrap();
        bytes[cut..].fill(0);
        fs::write(&wal, &bytes).unwrap();
        fs::remove_file(m.dir.join(DATA_DIR).join("member/snap/db")).unwrap();
        assert_eq!(first_raft_record(&wal).unwrap(), None);
        assert_eq!(wal_has_raft_records(&wal_dir).unwrap(), Some(false));

        let etcd = Etcd::start(&m.dir, &binary, LogTree::new()).await.unwrap();
        eventually(30, "healthy after the reset", || healthy(&socket)).await;
        etcd.stop().await;
        assert!(first_raft_record(&wal_file(&m.dir)).unwrap().is_some());

        // A damaged WAL is not taken for an empty one.
        let wal = wal_file(&m.dir);
        let mut bytes = fs::read(&wal).unwrap();
        bytes[8..16].fill(0xee);
        fs::write(&wal, &bytes).unwrap();
        assert!(wal_has_raft_records(&wal_dir).is_err());
        reset_unbootstrapped(&m.dir.join(DATA_DIR));
        assert!(wal.exists());
    }
}
