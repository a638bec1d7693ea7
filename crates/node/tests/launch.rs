//! `metroctl cluster launch --nodes 3`, the README's main command, end to end,
//! `cluster launch --ha`, and a launched cluster grown into an HA one.

mod support;

use std::path::PathBuf;

use support::*;

#[test]
fn launch_three_nodes_then_stop() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = tmp.path().join("metroctl");
    let dir = tmp.path().join("cluster");
    let out = metroctl(
        &cfg,
        &[
            "cluster",
            "launch",
            "--nodes",
            "3",
            "--dir",
            dir.to_str().expect("utf8"),
        ],
    );
    let text = stdout(&out);
    let guard = StopOnDrop {
        cfg: cfg.clone(),
        dir: dir.clone(),
    };
    let stop = || guard.stop();
    if !out.status.success() {
        panic!("launch failed: {}\n{text}", stderr(&out));
    }
    assert_eq!(text.matches("HEALTHY").count(), 3, "{text}");
    assert!(text.contains("ConsensusMember"), "{text}");

    // Plain metroctl works right after, from the config directory.
    let out = metroctl(
        &cfg,
        &["node", "list", "--filter", "node.state == NODE_STATE_UP"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out)
            .lines()
            .filter(|l| l.starts_with("metropolis-"))
            .count(),
        3
    );

    // Metrics of a curator node, in the Prometheus text format.
    let first = stdout(&out)
        .lines()
        .find(|l| l.starts_with("metropolis-"))
        .map(str::to_string)
        .expect("an id");
    let cm = stdout(&metroctl(
        &cfg,
        &[
            "node",
            "list",
            "--filter",
            "has(node.roles.consensus_member)",
        ],
    ))
    .trim()
    .to_string();
    let m = metroctl(&cfg, &["node", "metrics", &cm]);
    assert!(m.status.success(), "{}", stderr(&m));
    let text = stdout(&m);
    assert!(
        text.contains("metropolis_nodes{health=\"HEALTH_HEALTHY\",state=\"NODE_STATE_UP\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("metropolis_heartbeats_received_total"),
        "{text}"
    );
    assert!(text.contains("metropolis_rpc_calls_total{code=\"Ok\",method=\"/metropolis.proto.api.Management/GetNodes\"}"), "{text}");
    assert!(
        text.contains("metropolis_store_operation_duration_seconds_bucket"),
        "{text}"
    );
    assert!(text.contains("process_resident_memory_bytes"), "{text}");
    assert!(
        stdout(&metroctl(&cfg, &["node", "metrics", &first]))
            .contains("process_resident_memory_bytes")
    );

    // Any node's address will do: a node that does not run the curator
    // names the leader, and metroctl goes there.
    let json: serde_json::Value = serde_json::from_str(&stdout(&metroctl(
        &cfg,
        &[
            "node",
            "describe",
            "--filter",
            "!has(node.roles.consensus_member)",
            "-o",
            "json",
        ],
    )))
    .expect("json");
    let worker = json[0]["status"]["externalAddress"]
        .as_str()
        .expect("a worker address")
        .to_string();
    let via_worker = metroctl(&cfg, &["--endpoints", &worker, "node", "list"]);
    assert!(via_worker.status.success(), "{}", stderr(&via_worker));
    assert_eq!(stdout(&via_worker).lines().count(), 3);

    // Launching into the same directory again is refused.
    let again = metroctl(
        &cfg,
        &[
            "cluster",
            "launch",
            "--nodes",
            "1",
            "--dir",
            dir.to_str().expect("utf8"),
        ],
    );
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );

    let out = stop();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("Stopped 3 node(s)"),
        "{}",
        stdout(&out)
    );
    let out = metroctl(&cfg, &["node", "list"]);
    assert!(!out.status.success(), "the nodes still answer after stop");

    launch_ha_makes_three_consensus_members();
    a_launched_cluster_grows_into_ha();
}

/// `cluster launch --ha`: bootstrapped on etcd, three voting consensus
/// members, shown by `cluster status`. (Launched clusters pick the first
/// free 127.0.0.x addresses, so launch tests run one after another, in one
/// test.)
fn launch_ha_makes_three_consensus_members() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = tmp.path().join("metroctl");
    let dir = tmp.path().join("cluster");
    let dir_arg = dir.to_str().expect("utf8");
    let refused = metroctl(
        &cfg,
        &[
            "cluster", "launch", "--nodes", "2", "--ha", "--dir", dir_arg,
        ],
    );
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("--nodes 3"),
        "{}",
        stderr(&refused)
    );

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
    assert!(
        out.status.success(),
        "launch --ha: {}\n{}",
        stderr(&out),
        stdout(&out)
    );
    let text = stdout(&out);
    assert_eq!(text.matches("ConsensusMember").count(), 3, "{text}");

    let status = metroctl(&cfg, &["cluster", "status"]);
    assert!(status.status.success(), "{}", stderr(&status));
    let text = stdout(&status);
    assert!(text.contains("Consensus store  etcd"), "{text}");
    assert_eq!(text.matches(" voter").count(), 3, "{text}");
    assert!(text.contains("raft leader"), "{text}");
    let json = metroctl(&cfg, &["cluster", "status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&json)).expect("json");
    assert_eq!(v["backend"], "CONSENSUS_BACKEND_ETCD", "{v}");
    assert_eq!(v["members"].as_array().map(Vec::len), Some(3), "{v}");
    // Upstream's member list, as upstream clients read it.
    let upstream = v["etcdMember"].as_array().cloned().unwrap_or_default();
    assert_eq!(upstream.len(), 3, "{v}");
    assert!(upstream.iter().all(|m| m["status"] == "STATUS_FULL"), "{v}");
    // etcd's own metrics through a member's metrics port (upstream's `etcd`
    // exporter), as the owner.
    let member = v["members"][0]["name"].as_str().expect("member name");
    let m = metroctl(&cfg, &["node", "metrics", member, "etcd"]);
    assert!(m.status.success(), "metrics etcd: {}", stderr(&m));
    assert!(
        stdout(&m).contains("etcd_server_has_leader 1"),
        "{}",
        stdout(&m)
    );

    // A member that starts while its etcd cluster has no quorum serves as a
    // plain node (reachable, its logs readable) and starts its curator once
    // a second member is back.
    let out = metroctl(&cfg, &["cluster", "stop", "--dir", dir_arg]);
    assert!(out.status.success(), "{}", stderr(&out));
    let members: Vec<(std::net::IpAddr, PathBuf)> = (1..=4)
        .map(|i| dir.join(format!("node{i}")))
        .filter(|d| d.join("data/etcd").exists())
        .map(|d| {
            let address = std::fs::read_to_string(d.join("address")).expect("address file");
            (address.trim().parse().expect("an IP"), d.join("data"))
        })
        .collect();
    assert_eq!(members.len(), 3, "the launched members' data directories");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let alone = TestNode::spawn(members[0].0, &members[0].1, None);
    runtime.block_on(alone.wait_serving());
    wait_for_log(&alone, "serving as a plain node until it does");
    assert!(!alone.log_text().contains("starting its curator"));
    let _second = TestNode::spawn(members[1].0, &members[1].1, None);
    wait_for_log(&alone, "starting its curator");
    let endpoints = format!("{},{}", members[0].0, members[1].0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let status = metroctl(&cfg, &["--endpoints", &endpoints, "cluster", "status"]);
        if status.status.success() {
            assert_eq!(stdout(&status).matches(" voter").count(), 3);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no curator after quorum returned: {}",
            stderr(&status)
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// Waits (at most a minute) for `text` in the node's log.
fn wait_for_log(node: &TestNode, text: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !node.log_text().contains(text) {
        assert!(
            std::time::Instant::now() < deadline,
            "{text:?} never appeared in the log of {}:\n{}",
            node.address,
            node.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The operator's way to high availability: `cluster launch --nodes 3` (on
/// the embedded store), then one `node add role ConsensusMember ID2 ID3
/// --wait`: the cluster moves to etcd and both become voters. The bootstrap
/// node is then SIGKILLed: what was written before is read, and a new write
/// acknowledged, through the other two.
fn a_launched_cluster_grows_into_ha() {
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
    assert!(
        out.status.success(),
        "launch: {}\n{}",
        stderr(&out),
        stdout(&out)
    );
    let list = |filter: &str| -> Vec<String> {
        let out = metroctl(&cfg, &["node", "list", "--filter", filter]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).lines().map(str::to_string).collect()
    };
    let first = list("has(node.roles.consensus_member)");
    assert_eq!(first.len(), 1, "{first:?}");
    let others = list("!has(node.roles.consensus_member)");
    assert_eq!(others.len(), 2, "{others:?}");
    let out = metroctl(&cfg, &["node", "label", &first[0], "written-before=yes"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // An ID that names no node: refused, and the other is not changed.
    let unknown = "metropolis-00000000000000000000000000000000";
    let out = metroctl(
        &cfg,
        &[
            "node",
            "add",
            "role",
            "ConsensusMember",
            &others[0],
            unknown,
        ],
    );
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        stderr(&out).contains(&format!("node {unknown} not found; no role was changed")),
        "{}",
        stderr(&out)
    );
    assert_eq!(list("has(node.roles.consensus_member)"), first);

    let started = std::time::Instant::now();
    let mut args = vec!["node", "add", "role", "ConsensusMember"];
    args.extend(others.iter().map(String::as_str));
    args.push("--wait");
    let out = metroctl(&cfg, &args);
    assert!(
        out.status.success(),
        "add role: {}\n{}",
        stderr(&out),
        stdout(&out)
    );
    println!(
        "node add role ConsensusMember ID2 ID3 --wait: both voters on etcd after {:?}",
        started.elapsed()
    );
    let text = stdout(&out);
    for id in &others {
        assert!(text.contains(&format!("{id}: voter")), "{text}");
    }
    let status = metroctl(&cfg, &["cluster", "status"]);
    let shown = stdout(&status);
    assert!(shown.contains("Consensus store  etcd"), "{shown}");
    assert_eq!(shown.matches(" voter").count(), 3, "{shown}");
    let voters = list("node.consensus_progress == CONSENSUS_PROGRESS_VOTER");
    assert_eq!(voters.len(), 3, "{voters:?}");

    // SIGKILL of the bootstrap node.
    let node1 = dir.join("node1");
    let pid: i32 = std::fs::read_to_string(node1.join("pid"))
        .expect("pid")
        .trim()
        .parse()
        .expect("a pid");
    // SAFETY: kill(2) of the node process this test launched.
    assert_eq!(unsafe { kill(pid, 9) }, 0);
    let killed = std::time::Instant::now();
    let endpoints: Vec<String> = (2..=3)
        .map(|i| {
            std::fs::read_to_string(dir.join(format!("node{i}/address")))
                .expect("address")
                .trim()
                .to_string()
        })
        .collect();
    let endpoints = endpoints.join(",");
    let out = metroctl(
        &cfg,
        &[
            "--endpoints",
            &endpoints,
            "node",
            "label",
            &others[0],
            "written-after=yes",
        ],
    );
    assert!(
        out.status.success(),
        "a write through the other two: {}",
        stderr(&out)
    );
    println!(
        "after the bootstrap node's SIGKILL, a write was acknowledged through the other two after {:?}",
        killed.elapsed()
    );
    let out = metroctl(
        &cfg,
        &[
            "--endpoints",
            &endpoints,
            "node",
            "describe",
            &first[0],
            "-o",
            "json",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    let pairs = json[0]["labels"]["pairs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        pairs
            .iter()
            .any(|p| p["key"] == "written-before" && p["value"] == "yes"),
        "{json}"
    );
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}
