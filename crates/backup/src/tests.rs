use super::*;
use metropolis_api::admin::BackupEntry;
use metropolis_store::transfer::Digest;

fn key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng)
}

fn header(owner: &ed25519_dalek::SigningKey) -> BackupHeader {
    BackupHeader {
        format_version: FORMAT_VERSION,
        ca_fingerprint: vec![0xab; 32],
        revision: 4711,
        time: Some(prost_types::Timestamp {
            seconds: 1_790_000_000,
            nanos: 0,
        }),
        node_count: 3,
        owner_public_key: owner.verifying_key().to_bytes().to_vec(),
        backend: ConsensusBackend::Embedded as i32,
    }
}

/// Pages of entries, one larger than age's 64 KiB chunks.
fn pages() -> Vec<BackupEntries> {
    (0..3)
        .map(|p| BackupEntries {
            entries: (0..50)
                .map(|i| BackupEntry {
                    key: format!("/nodes/{p}-{i:03}").into_bytes(),
                    value: vec![(i % 251) as u8; if i == 7 { 100_000 } else { 300 }],
                    leased: false,
                })
                .collect(),
        })
        .collect()
}

fn trailer(pages: &[BackupEntries]) -> BackupTrailer {
    let mut d = Digester::default();
    for e in pages.iter().flat_map(|p| &p.entries) {
        d.add(&e.key, &e.value);
    }
    trailer_of(d.finish())
}

fn write(owner: &ed25519_dalek::SigningKey, extra: &[Box<dyn age::Recipient + Send>]) -> Vec<u8> {
    let pages = pages();
    let mut w = Writer::new(Vec::new(), &header(owner), extra).expect("writer");
    for p in pages.clone() {
        w.entries(p).expect("entries");
    }
    w.finish(&trailer(&pages)).expect("finish")
}

fn read_all(
    file: &[u8],
    key: &ed25519_dalek::SigningKey,
) -> Result<Vec<BackupEntries>, BackupError> {
    let mut r = Reader::open(file, key)?;
    let mut out = Vec::new();
    while let Some(e) = r.entries()? {
        out.push(e);
    }
    Ok(out)
}

#[test]
fn round_trip_with_a_readable_header_and_nothing_in_the_clear() {
    let owner = key();
    let file = write(&owner, &[]);
    let text = String::from_utf8_lossy(&file);
    assert!(
        text.starts_with("metropolis-backup v1\nca-fingerprint: abab"),
        "{text:.200}"
    );
    assert!(text.contains("\nnodes: 3\n") && text.contains("\nrevision: 4711\n"));
    assert!(text.contains("\n\nage-encryption.org/v1\n-> ssh-ed25519 "));
    assert!(!text.contains("/nodes/"), "a key is in the clear");
    assert_eq!(
        read_header(&mut file.as_slice()).expect("inspect"),
        header(&owner)
    );
    assert_eq!(read_all(&file, &owner).expect("read"), pages());
    assert_eq!(
        verify(file.as_slice(), &owner).expect("verify"),
        header(&owner)
    );
}

#[test]
fn another_owner_key_is_refused() {
    let file = write(&key(), &[]);
    let err = read_all(&file, &key()).unwrap_err();
    assert!(matches!(err, BackupError::WrongKey { .. }), "{err}");
}

#[test]
fn every_truncation_is_refused() {
    let owner = key();
    let file = write(&owner, &[]);
    let start = file
        .windows(6)
        .position(|w| w == b"\n\nage-")
        .expect("payload")
        + 2;
    // Cut in the readable header, the age header, at and around age's
    // 64 KiB chunk boundaries, and just before the end.
    let cuts = [
        10,
        start - 1,
        start + 40,
        start + 200,
        start + 65_536,
        file.len() - 17,
        file.len() - 1,
    ];
    for cut in cuts {
        let err = read_all(&file[..cut], &owner).unwrap_err();
        assert!(
            !matches!(err, BackupError::WrongKey { .. } | BackupError::Io(_)),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn altered_bytes_are_refused() {
    let owner = key();
    let file = write(&owner, &[]);
    let start = file
        .windows(6)
        .position(|w| w == b"\n\nage-")
        .expect("payload")
        + 2;
    for at in [start + 300, start + 70_000, file.len() - 5] {
        let mut bad = file.clone();
        bad[at] ^= 1;
        let err = read_all(&bad, &owner).unwrap_err();
        assert!(matches!(err, BackupError::Damaged(_)), "byte {at}: {err}");
    }
    // The readable header is checked against the one inside.
    let text = String::from_utf8_lossy(&file[..start]).replace("nodes: 3", "nodes: 4");
    let mut bad = text.into_bytes();
    bad.extend_from_slice(&file[start..]);
    let err = read_all(&bad, &owner).unwrap_err();
    assert!(matches!(err, BackupError::Damaged(_)), "{err}");
    let err = read_all(b"PK\x03\x04 not a backup", &owner).unwrap_err();
    assert!(matches!(err, BackupError::NotABackup), "{err}");
}

#[test]
fn extra_recipients_decrypt_too() {
    let owner = key();
    let extra = age::x25519::Identity::generate();
    let file = write(
        &owner,
        &[parse_recipient(&extra.to_public().to_string()).expect("recipient")],
    );
    let mut input = file.as_slice();
    read_header(&mut input).expect("header");
    let mut plain = Vec::new();
    age::Decryptor::new_buffered(input)
        .expect("age")
        .decrypt(std::iter::once(&extra as &dyn age::Identity))
        .expect("decrypt with the extra recipient")
        .read_to_end(&mut plain)
        .expect("read");
    assert!(!plain.is_empty());
    assert_eq!(
        read_all(&file, &owner).expect("owner still reads it"),
        pages()
    );
    assert!(parse_recipient("ssh-ed25519 AAAA-nonsense").is_err());
}

#[test]
fn a_digest_that_does_not_match_is_refused_when_writing() {
    let owner = key();
    let mut w = Writer::new(Vec::new(), &header(&owner), &[]).expect("writer");
    w.entries(pages().remove(0)).expect("entries");
    let wrong = trailer_of(Digest::of(&[]));
    assert!(matches!(w.finish(&wrong), Err(BackupError::Damaged(_))));
}
