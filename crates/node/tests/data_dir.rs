//! What a node finds at rest (issue #12): damaged credentials, secret files
//! readable by others and oversized Node Parameters stop it at start, with
//! one line saying what is wrong, before any port opens or anything is
//! written.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use metropolis_api::private::SealedCredentials;
use metropolis_identity::generate_key;
use prost::Message;

use support::*;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

/// Every file in `dir` (recursively) with its bytes, to show nothing changed.
fn snapshot(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let bytes = std::fs::read(&p).expect("read");
                out.push((p, bytes));
            }
        }
    }
    out.sort();
    out
}

/// Starts the node on `data` and expects it to exit with status 1 and one
/// line naming `expect`, leaving the data directory as it was.
fn refused_start(data: &Path, address: &str, expect: &str) {
    let before = snapshot(data);
    let out = run_node(&[
        "--data-dir",
        data.to_str().expect("utf8"),
        "--address",
        address,
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{expect}: {err}");
    assert_eq!(
        err.trim().lines().count(),
        1,
        "{expect}: not one line:\n{err}"
    );
    assert!(err.contains(expect), "{expect}: {err}");
    assert!(
        !err.contains("serving"),
        "{expect}: a port was opened: {err}"
    );
    assert!(
        snapshot(data) == before,
        "{expect}: the data directory changed"
    );
    println!("refused as expected: {}", err.trim());
}

fn rewrite_credentials(data: &Path, change: impl FnOnce(&mut SealedCredentials)) {
    let path = data.join("credentials.pb");
    let mut creds =
        SealedCredentials::decode(std::fs::read(&path).expect("read").as_slice()).expect("decode");
    change(&mut creds);
    std::fs::write(&path, creds.encode_to_vec()).expect("write");
}

#[tokio::test]
async fn damaged_credentials_stop_the_node_before_it_serves() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut node = TestNode::bootstrap(tmp.path(), &generate_key()).await;
    node.stop();
    let data = node.data_dir.clone();
    let address = node.address.to_string();
    let good = std::fs::read(data.join("credentials.pb")).expect("read");
    let restore = || std::fs::write(data.join("credentials.pb"), &good).expect("restore");

    // A flipped byte in the node certificate's signature (its last bytes).
    rewrite_credentials(&data, |c| {
        let last = c.node_certificate.len() - 1;
        c.node_certificate[last] ^= 0x01;
    });
    refused_start(
        &data,
        &address,
        "the node certificate is not valid for its CA",
    );
    restore();

    // A CA certificate that is not a certificate.
    rewrite_credentials(&data, |c| c.ca_certificate = b"garbage".to_vec());
    refused_start(&data, &address, "the CA certificate does not parse");
    restore();

    // Another cluster's CA.
    let other = metropolis_identity::CertificateAuthority::generate().expect("ca");
    rewrite_credentials(&data, |c| c.ca_certificate = other.cert_der().to_vec());
    refused_start(
        &data,
        &address,
        "the node certificate is not valid for its CA",
    );
    restore();

    // A key that is not the certificate's.
    rewrite_credentials(&data, |c| {
        c.node_key_seed = generate_key().to_bytes().to_vec();
    });
    refused_start(&data, &address, "does not match the node key");
    restore();

    // Restored, it serves again.
    let again = TestNode::spawn(node.address, &data, None);
    again.wait_serving().await;
}

#[tokio::test]
async fn secret_files_are_private_and_checked_at_start() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut node = TestNode::bootstrap(tmp.path(), &generate_key()).await;
    node.stop();
    let data = node.data_dir.clone();
    let store = data.join("store").join("cluster.redb");
    for f in [data.join("credentials.pb"), store.clone()] {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    println!(
        "modes: credentials.pb {:o}, store/cluster.redb {:o}",
        mode(&data.join("credentials.pb")),
        mode(&store)
    );
    let address = node.address.to_string();
    for f in [store.clone(), data.join("credentials.pb")] {
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        refused_start(&data, &address, "readable by others");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let again = TestNode::spawn(node.address, &data, None);
    again.wait_serving().await;
}

#[test]
fn oversized_node_parameters_are_refused_unread() {
    let tmp = tempfile::tempdir().expect("tmp");
    let params = tmp.path().join("huge.pb");
    // Sparse: 256 MiB on paper, nothing on disk.
    let f = std::fs::File::create(&params).expect("create");
    f.set_len(256 << 20).expect("set_len");
    let data = tmp.path().join("data");
    let start = std::time::Instant::now();
    let out = run_node(&[
        "--data-dir",
        data.to_str().expect("utf8"),
        "--address",
        "127.0.0.1",
        "--params",
        params.to_str().expect("utf8"),
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "not one line:\n{err}");
    assert!(err.contains("is larger than"), "{err}");
    assert!(!data.exists(), "the data directory was written");
    println!(
        "256 MiB parameters refused in {:?}: {}",
        start.elapsed(),
        err.trim()
    );
}
