//! Backup and restore: a launched cluster loses its only consensus node,
//! data directory and all, and comes back from `metroctl cluster backup`
//! through `metropolis-node --restore`; and every bad input to a restore is
//! refused with one line, before anything is written.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::*;

fn json(cfg: &Path, args: &[&str]) -> serde_json::Value {
    let out = metroctl(cfg, args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("json")
}

fn nodes(cfg: &Path) -> Vec<serde_json::Value> {
    let out = metroctl(cfg, &["node", "describe", "-o", "json"]);
    if !out.status.success() {
        return Vec::new();
    }
    serde_json::from_str::<Vec<serde_json::Value>>(&stdout(&out)).unwrap_or_default()
}

/// The launch directory's node whose address is `address`.
fn node_dir_of(dir: &Path, address: &str) -> PathBuf {
    (1..=4)
        .map(|i| dir.join(format!("node{i}")))
        .find(|d| std::fs::read_to_string(d.join("address")).is_ok_and(|a| a.trim() == address))
        .unwrap_or_else(|| panic!("no launched node has address {address}"))
}

/// The CA fingerprint `cluster info` prints (`AB:CD:…`), as lowercase hex.
fn ca_fingerprint(info: &str) -> String {
    info.split_whitespace()
        .find(|w| w.len() == 95 && w.matches(':').count() == 31)
        .unwrap_or_else(|| panic!("no CA fingerprint in {info}"))
        .replace(':', "")
        .to_lowercase()
}

fn sigkill(pid: &str) {
    let status = std::process::Command::new("kill")
        .args(["-KILL", pid])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -KILL {pid}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A restore that must fail: exit 1, one line naming the problem, and the
/// data directory as it was.
fn refused(data_dir: &Path, args: &[&str], expect: &str) {
    let before = listing(data_dir);
    let mut all = vec!["--data-dir", data_dir.to_str().expect("utf8")];
    all.extend_from_slice(args);
    let out = run_node(&all);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("metropolis-node:"))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains(expect), "expected {expect:?} in {err}");
    assert_eq!(
        listing(data_dir),
        before,
        "{args:?} wrote into the data directory"
    );
    println!("refused as expected: {}", lines[0]);
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn listing(dir: &Path) -> Option<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Some(names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_survives_losing_its_consensus_node() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = tmp.path().join("metroctl");
    let dir = tmp.path().join("cluster");
    let dir_arg = dir.to_str().expect("utf8");
    let _guard = StopOnDrop {
        cfg: cfg.clone(),
        dir: dir.clone(),
    };
    let out = metroctl(
        &cfg,
        &["cluster", "launch", "--nodes", "3", "--dir", dir_arg],
    );
    assert!(out.status.success(), "launch: {}", stderr(&out));

    let consensus = json(
        &cfg,
        &[
            "node",
            "describe",
            "--filter",
            "has(node.roles.consensus_member)",
            "-o",
            "json",
        ],
    );
    let old_id = consensus[0]["id"].as_str().expect("id").to_string();
    let address = consensus[0]["status"]["externalAddress"]
        .as_str()
        .expect("address")
        .to_string();
    let worker = nodes(&cfg)
        .into_iter()
        .find(|n| n["id"] != old_id.as_str())
        .and_then(|n| n["id"].as_str().map(str::to_string))
        .expect("a worker");
    for n in nodes(&cfg) {
        let id = n["id"].as_str().expect("id");
        let out = metroctl(&cfg, &["node", "label", id, "backup-test=before-loss"]);
        assert!(out.status.success(), "label: {}", stderr(&out));
    }
    let ca_before = stdout(&metroctl(&cfg, &["cluster", "info"]));

    let file = tmp.path().join("cluster.backup");
    let file_arg = file.to_str().expect("utf8");
    let started = Instant::now();
    let out = metroctl(&cfg, &["cluster", "backup", "-o", file_arg]);
    assert!(out.status.success(), "backup: {}", stderr(&out));
    println!(
        "backup of 3 nodes: {} bytes in {:?}: {}",
        std::fs::metadata(&file).expect("file").len(),
        started.elapsed(),
        stdout(&out).trim()
    );
    let audit = stdout(&metroctl(&cfg, &["audit", "-o", "json"]));
    assert!(
        audit.contains("/metropolis.proto.admin.ClusterAdmin/Backup"),
        "the backup is not in the audit log: {audit}"
    );
    let again = metroctl(&cfg, &["cluster", "backup", "-o", file_arg]);
    assert!(!again.status.success(), "an existing file was overwritten");
    let inspect = metroctl(&cfg, &["cluster", "backup", "--inspect", file_arg]);
    let header = stdout(&inspect);
    assert!(inspect.status.success(), "{}", stderr(&inspect));
    assert!(
        header.contains("nodes: 3\n") && header.contains("backend: embedded\n"),
        "{header}"
    );
    assert_eq!(
        header
            .lines()
            .find_map(|l| l.strip_prefix("ca-fingerprint: "))
            .expect("fingerprint"),
        ca_fingerprint(&ca_before),
        "{header}"
    );
    let raw = std::fs::read(&file).expect("read backup");
    assert!(
        !raw.windows(7).any(|w| w == b"/nodes/") && !raw.windows(11).any(|w| w == b"before-loss"),
        "cluster state in the clear in the backup file"
    );

    // Every bad input is refused before anything is written.
    let owner_key = cfg.join("owner-key.pem");
    let owner_arg = owner_key.to_str().expect("utf8");
    let scratch = tmp.path().join("scratch");
    let other_key = tmp.path().join("other-owner.pem");
    std::fs::write(
        &other_key,
        metropolis_identity::encode_owner_key_pem(&metropolis_identity::generate_key()),
    )
    .expect("other key");
    let restore = |f: &str, k: &str| {
        vec![
            "--address".to_string(),
            address.clone(),
            "--restore".into(),
            f.into(),
            "--owner-key".into(),
            k.into(),
        ]
    };
    let args = restore(file_arg, other_key.to_str().expect("utf8"));
    refused(&scratch, &refs(&args), "not encrypted to this owner key");
    let cut = tmp.path().join("truncated.backup");
    std::fs::write(&cut, &raw[..raw.len() * 2 / 3]).expect("truncated");
    let args = restore(cut.to_str().expect("utf8"), owner_arg);
    refused(&scratch, &refs(&args), "truncated or was altered");
    let mut bad = raw.clone();
    let at = raw.len() - raw.len() / 3;
    bad[at] ^= 0x20;
    let altered = tmp.path().join("altered.backup");
    std::fs::write(&altered, &bad).expect("altered");
    let args = restore(altered.to_str().expect("utf8"), owner_arg);
    refused(&scratch, &refs(&args), "truncated or was altered");
    std::fs::create_dir_all(&scratch).expect("scratch");
    std::fs::write(scratch.join("something"), b"x").expect("something");
    let args = restore(file_arg, owner_arg);
    refused(&scratch, &refs(&args), "is not empty");
    let args = restore(
        dir.join("missing.backup").to_str().expect("utf8"),
        owner_arg,
    );
    refused(&tmp.path().join("scratch2"), &refs(&args), "missing.backup");

    // The consensus node dies with its disk.
    let node_dir = node_dir_of(&dir, &address);
    let pid = std::fs::read_to_string(node_dir.join("pid")).expect("pid");
    sigkill(pid.trim());
    std::fs::remove_file(node_dir.join("pid")).expect("pid file");
    std::fs::remove_dir_all(node_dir.join("data")).expect("remove data dir");
    let down = metroctl(&cfg, &["node", "list"]);
    assert!(
        !down.status.success(),
        "the cluster answers without its consensus node"
    );

    let started = Instant::now();
    let data = node_dir.join("data");
    let restored = TestNode::spawn_with(
        address.parse().expect("ip"),
        &data,
        None,
        &["--restore", file_arg, "--owner-key", owner_arg],
    );
    restored.wait_leading().await;
    let leading = started.elapsed();

    // The other nodes rejoin with their existing credentials; the owner's
    // existing metroctl configuration works.
    let deadline = Instant::now() + Duration::from_secs(120);
    let all = loop {
        let all = nodes(&cfg);
        let healthy = all
            .iter()
            .filter(|n| n["status"].is_object() && n["health"] == "HEALTH_HEALTHY")
            .count();
        if all.len() == 3 && healthy == 3 {
            break all;
        }
        assert!(
            Instant::now() < deadline,
            "not all three nodes HEALTHY after the restore: {all:#?}\n{}",
            restored.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!(
        "restored: leading after {leading:?}, all three HEALTHY after {:?}",
        started.elapsed()
    );
    let ids: Vec<&str> = all.iter().filter_map(|n| n["id"].as_str()).collect();
    assert!(
        !ids.contains(&old_id.as_str()),
        "the lost node's ID is still there: {ids:?}"
    );
    assert!(ids.contains(&worker.as_str()));
    for n in &all {
        assert_eq!(n["labels"]["pairs"][0]["key"], "backup-test", "{n:#}");
        assert_eq!(n["labels"]["pairs"][0]["value"], "before-loss", "{n:#}");
    }
    let me = all
        .iter()
        .find(|n| n["status"]["externalAddress"] == address.as_str())
        .expect("the restored node");
    assert!(me["roles"]["consensusMember"].is_object(), "{me:#}");
    let ca_after = stdout(&metroctl(&cfg, &["cluster", "info"]));
    assert_eq!(ca_fingerprint(&ca_after), ca_fingerprint(&ca_before));
    // Changes work, and the label survives another read.
    let out = metroctl(&cfg, &["node", "label", &worker, "after=restore"]);
    assert!(
        out.status.success(),
        "label after restore: {}",
        stderr(&out)
    );
    // A second restore on the now restored directory is refused.
    let args = restore(file_arg, owner_arg);
    refused(&data, &refs(&args), "is not empty");
    drop(restored);
    drop(_guard);

    // Launched clusters take the first free 127.0.0.x addresses, so the
    // etcd case runs after the first, in the same test.
    an_etcd_cluster_survives_losing_every_consensus_member().await;
}

/// `--ha` with a fourth, plain node: all three etcd members die with their
/// disks; the restore makes a new etcd cluster of one, and the plain node
/// rejoins it.
async fn an_etcd_cluster_survives_losing_every_consensus_member() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = tmp.path().join("metroctl");
    let dir = tmp.path().join("cluster");
    let dir_arg = dir.to_str().expect("utf8");
    let _guard = StopOnDrop {
        cfg: cfg.clone(),
        dir: dir.clone(),
    };
    let out = metroctl(
        &cfg,
        &[
            "cluster", "launch", "--nodes", "4", "--ha", "--dir", dir_arg,
        ],
    );
    assert!(out.status.success(), "launch --ha: {}", stderr(&out));
    let all = nodes(&cfg);
    let members: Vec<String> = all
        .iter()
        .filter(|n| n["roles"]["consensusMember"].is_object())
        .filter_map(|n| n["status"]["externalAddress"].as_str().map(str::to_string))
        .collect();
    assert_eq!(members.len(), 3, "{all:#?}");
    let plain = all
        .iter()
        .find(|n| !n["roles"]["consensusMember"].is_object())
        .and_then(|n| n["id"].as_str())
        .expect("the plain node")
        .to_string();
    let out = metroctl(&cfg, &["node", "label", &plain, "backup-test=etcd"]);
    assert!(out.status.success(), "label: {}", stderr(&out));
    let file = tmp.path().join("etcd.backup");
    let file_arg = file.to_str().expect("utf8");
    let out = metroctl(&cfg, &["cluster", "backup", "-o", file_arg]);
    assert!(out.status.success(), "backup: {}", stderr(&out));
    let header = stdout(&metroctl(
        &cfg,
        &["cluster", "backup", "--inspect", file_arg],
    ));
    assert!(
        header.contains("backend: etcd\n") && header.contains("nodes: 4\n"),
        "{header}"
    );

    for address in &members {
        let node_dir = node_dir_of(&dir, address);
        let pid = std::fs::read_to_string(node_dir.join("pid")).expect("pid");
        sigkill(pid.trim());
        std::fs::remove_file(node_dir.join("pid")).expect("pid file");
        std::fs::remove_dir_all(node_dir.join("data")).expect("remove data dir");
    }
    let owner_key = cfg.join("owner-key.pem");
    let restored = TestNode::spawn_with(
        members[0].parse().expect("ip"),
        &node_dir_of(&dir, &members[0]).join("data"),
        None,
        &[
            "--restore",
            file_arg,
            "--owner-key",
            owner_key.to_str().expect("utf8"),
        ],
    );
    restored.wait_leading().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let all = nodes(&cfg);
        let healthy: Vec<&serde_json::Value> = all
            .iter()
            .filter(|n| n["health"] == "HEALTH_HEALTHY")
            .collect();
        let plain_back = healthy
            .iter()
            .any(|n| n["id"] == plain.as_str() && n["labels"]["pairs"][0]["value"] == "etcd");
        let member_back = healthy.iter().any(|n| {
            n["status"]["externalAddress"] == members[0].as_str()
                && n["roles"]["consensusMember"].is_object()
        });
        if plain_back && member_back {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restored etcd cluster did not come back: {all:#?}\n{}",
            restored.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let status = metroctl(&cfg, &["cluster", "status"]);
    let text = stdout(&status);
    assert!(status.status.success(), "{}", stderr(&status));
    println!("restored etcd cluster:\n{text}");
    assert!(text.contains(&members[0]), "{text}");
}
