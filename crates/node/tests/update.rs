//! Updates of the node binary with real node processes: `metroctl node
//! update` rolling a new binary through a cluster, bad images refused or
//! rolled back, bad input changing nothing, a new binary that never rejoins
//! rolled back by the node itself, and a node killed during a trial.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use metropolis_api::api::{
    ActivationMode, ApproveNodeRequest, GetNodesRequest, Node, OsImageRef, RebootRequest,
    UpdateNodeRequest,
    management_client::ManagementClient,
    node::Health,
    node_management_client::NodeManagementClient,
    reboot_request::{NextBoot, Type},
};
use metropolis_api::common::NodeState;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::transport::Channel;

use support::*;

/// Fast heartbeats so health shows within a test's patience, and a short
/// trial so a rollback does too.
const FLAGS: &[&str] = &[
    "--heartbeat-interval",
    "200ms",
    "--heartbeat-timeout",
    "1500ms",
    "--update-trial-timeout",
    "12s",
];

const NODE_MANAGEMENT_PORT: u16 = 7839;

async fn nodes(mgmt: &mut ManagementClient<Channel>) -> Result<Vec<Node>, tonic::Status> {
    mgmt.get_nodes(GetNodesRequest {
        filter: String::new(),
    })
    .await?
    .into_inner()
    .try_collect()
    .await
}

fn sha_of(n: &Node) -> String {
    n.status
        .as_ref()
        .and_then(|s| s.version.as_ref())
        .map(|v| v.binary_sha256.clone())
        .unwrap_or_default()
}

fn boot_of(n: &Node) -> Vec<u8> {
    n.status
        .as_ref()
        .map(|s| s.boot_id.clone())
        .unwrap_or_default()
}

fn sha256_file(p: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(p).expect("read")))
}

/// Polls until `pred` holds for the node list (GetNodes errors while the
/// curator restarts count as "not yet").
async fn wait_nodes(
    ch: &Channel,
    what: &str,
    limit: Duration,
    pred: impl Fn(&[Node]) -> bool,
) -> Vec<Node> {
    let deadline = Instant::now() + limit;
    let mut last;
    loop {
        let mut mgmt = ManagementClient::new(ch.clone());
        match nodes(&mut mgmt).await {
            Ok(list) if pred(&list) => return list,
            Ok(list) => last = format!("{list:#?}"),
            Err(e) => last = e.to_string(),
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn all_healthy_on(list: &[Node], count: usize, sha: &str) -> bool {
    list.len() == count
        && list
            .iter()
            .all(|n| n.health == Health::Healthy as i32 && sha_of(n) == sha)
}

/// A copy of the node binary that differs from it: bytes after the ELF
/// image are ignored by the loader but change the digest.
fn marked_copy(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let mut bytes = std::fs::read(node_binary()).expect("node binary");
    bytes.extend_from_slice(format!("\nmetropolis update test {name}\n").as_bytes());
    std::fs::write(&p, bytes).expect("write copy");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p
}

/// A shell script that answers `--version` as `real` does and otherwise
/// runs `rest` (with the node's arguments in "$@").
fn wrapper(dir: &Path, name: &str, real: &Path, rest: &str) -> PathBuf {
    let p = dir.join(name);
    let real = real.display();
    std::fs::write(
        &p,
        format!("#!/bin/sh\ncase \"$1\" in --version) exec {real} --version;; esac\n{rest}\n"),
    )
    .expect("write wrapper");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p
}

fn slot_state(data_dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(data_dir.join("update/state.json")).ok()?;
    Some(serde_json::from_str(&text).expect("state.json is JSON"))
}

/// A node's own metrics, as the owner reads them (TLS, the node verified).
fn node_metrics(cfg: &Path, id: &str) -> String {
    let out = metroctl(cfg, &["node", "metrics", id]);
    assert!(out.status.success(), "metrics of {id}: {}", stderr(&out));
    stdout(&out)
}

/// Serves `response` (raw HTTP) to every connection, on loopback.
async fn serve_raw(response: Vec<u8>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let response = response.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(&response).await;
                let _ = s.shutdown().await;
            });
        }
    });
    format!("http://{addr}/node")
}

async fn serve_file(p: &Path) -> String {
    let body = std::fs::read(p).expect("read");
    let mut r = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(&body);
    serve_raw(r).await
}

fn rollback_request() -> RebootRequest {
    RebootRequest {
        r#type: Type::Firmware as i32,
        next_boot: NextBoot::StartRollback as i32,
    }
}

fn update_req(url: &str, sha: &str, mode: ActivationMode) -> UpdateNodeRequest {
    UpdateNodeRequest {
        os_image: None,
        activation_mode: mode as i32,
        binary_url: url.into(),
        binary_sha256: sha.into(),
    }
}

struct Cluster {
    cfg: PathBuf,
    nodes: Vec<TestNode>,
    owner: Channel,
    ca: Vec<u8>,
    owner_key: metropolis_identity::SigningKey,
    owner_cert: Vec<u8>,
}

impl Cluster {
    /// `count` nodes on the embedded store: the first is the consensus
    /// member, the others plain nodes; metroctl owns it.
    async fn start(dir: &Path, count: usize) -> Cluster {
        Self::start_on(dir, count, false).await
    }

    /// With `ha`, bootstrapped on etcd (still one consensus member).
    async fn start_on(dir: &Path, count: usize, ha: bool) -> Cluster {
        let install: &[&str] = if ha { &["--ha"] } else { &[] };
        let cluster = Bootstrapped::start(dir, install, FLAGS).await;
        let owner = cluster.owner_channel().await;
        let Bootstrapped {
            cfg,
            node: first,
            owner:
                Owner {
                    key: owner_key,
                    cert: owner_cert,
                    ca,
                },
            ..
        } = cluster;
        let mut mgmt = ManagementClient::new(owner.clone());
        let reg = dir.join("register.pb");
        fetch_register_params(&mut mgmt, &ca, &reg).await;
        let mut all = vec![first];
        for i in 2..=count {
            all.push(TestNode::spawn_with(
                fresh_address(),
                &dir.join(format!("n{i}")),
                Some(&reg),
                FLAGS,
            ));
        }
        let list = wait_nodes(&owner, "registrations", Duration::from_secs(60), |l| {
            l.len() == count
        })
        .await;
        for n in list.iter().filter(|n| n.state == NodeState::New as i32) {
            mgmt.approve_node(ApproveNodeRequest {
                pubkey: n.pubkey.clone(),
            })
            .await
            .expect("approve");
        }
        wait_nodes(&owner, "every node HEALTHY", Duration::from_secs(60), |l| {
            l.len() == count && l.iter().all(|n| n.health == Health::Healthy as i32)
        })
        .await;
        let ep = all[0].address.to_string();
        let out = metroctl(&cfg, &["--endpoints", &ep, "--yes", "takeownership"]);
        assert!(out.status.success(), "takeownership: {}", stderr(&out));
        Cluster {
            cfg,
            nodes: all,
            owner,
            ca,
            owner_key,
            owner_cert,
        }
    }

    fn node_by_address(&self, n: &Node) -> &TestNode {
        let addr = n
            .status
            .as_ref()
            .map(|s| s.external_address.clone())
            .unwrap_or_default();
        self.nodes
            .iter()
            .find(|t| t.address.to_string() == addr)
            .expect("a test node at the record's address")
    }

    async fn node_management(&self, address: std::net::IpAddr) -> NodeManagementClient<Channel> {
        let ch = channel(
            std::net::SocketAddr::new(address, NODE_MANAGEMENT_PORT),
            trust(&self.ca),
            Some((self.owner_cert.clone(), self.owner_key.clone())),
        )
        .await
        .expect("node management channel");
        NodeManagementClient::new(ch)
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- {}\n{}", n.address, n.log_text()))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metroctl_rolls_a_new_binary_through_three_nodes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let c = Cluster::start(tmp.path(), 3).await;
    let before = nodes(&mut ManagementClient::new(c.owner.clone()))
        .await
        .expect("nodes");
    let original = sha256_file(&node_binary());
    assert!(
        all_healthy_on(&before, 3, &original),
        "each node reports the digest of the binary it runs: {before:#?}"
    );

    // A new binary for every node, two plain nodes at a time.
    let image = marked_copy(tmp.path(), "image-1");
    let new_sha = sha256_file(&image);
    let started = Instant::now();
    let out = metroctl(
        &c.cfg,
        &[
            "node",
            "update",
            "--image",
            image.to_str().expect("utf-8"),
            "--max-unavailable",
            "2",
        ],
    );
    println!(
        "rolling update of 3 nodes took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let text = stdout(&out);
    println!("metroctl node update:\n{text}{}", stderr(&out));
    assert!(
        out.status.success(),
        "update failed: {}\n{text}\n{}",
        stderr(&out),
        c.logs()
    );
    assert_eq!(text.matches(": HEALTHY on").count(), 3, "{text}");
    let after = nodes(&mut ManagementClient::new(c.owner.clone()))
        .await
        .expect("nodes");
    assert!(all_healthy_on(&after, 3, &new_sha), "{after:#?}");
    for n in &after {
        let old = before.iter().find(|b| b.id == n.id).expect("same node");
        assert_ne!(boot_of(n), boot_of(old), "{} has a new boot ID", n.id);
        let t = c.node_by_address(n);
        // The supervisor confirms on the evidence metroctl saw, at its next
        // probe.
        wait_for_state(&t.data_dir, |s| s["active"] == "b" && s["trial"].is_null()).await;
        let state = slot_state(&t.data_dir).expect("slot state");
        assert_eq!(state["b"]["sha256"], new_sha.as_str());
        assert_eq!(state["a"]["sha256"], original.as_str());
        assert!(
            node_metrics(&c.cfg, &n.id).contains(&format!("sha256=\"{new_sha}\",slot=\"b\"")),
            "{}: the metric names the running slot",
            n.id
        );
    }
    let describe = stdout(&metroctl(&c.cfg, &["node", "describe"]));
    assert_eq!(
        describe
            .matches(&format!("sha256:{}", &new_sha[..12]))
            .count(),
        3,
        "{describe}"
    );

    // A binary that passes the check but cannot start as a node: the first
    // node tries it, falls back by itself, and the rollout stops there.
    let broken = wrapper(
        tmp.path(),
        "broken",
        &image,
        &format!("exec {} \"$@\" --no-such-flag", image.display()),
    );
    let out = metroctl(
        &c.cfg,
        &["node", "update", "--image", broken.to_str().expect("utf-8")],
    );
    let err = stderr(&out);
    println!("metroctl node update (broken):\n{}{err}", stdout(&out));
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        err.contains("rolled back to its previous binary")
            && err.contains("unexpected argument '--no-such-flag'")
            && err.contains("0 of 3 node(s) were updated"),
        "{err}\n{}",
        stdout(&out)
    );
    let failed_id = after
        .iter()
        .map(|n| n.id.clone())
        .find(|id| err.contains(&format!("node {id} rolled back")))
        .expect("the error names the node");
    let list = wait_nodes(
        &c.owner,
        "every node HEALTHY on the previous binary",
        Duration::from_secs(60),
        |l| all_healthy_on(l, 3, &new_sha),
    )
    .await;
    for n in &list {
        let old = after.iter().find(|b| b.id == n.id).expect("same node");
        assert_eq!(
            boot_of(n) != boot_of(old),
            n.id == failed_id,
            "only {failed_id} restarted (twice: into the broken binary and back)"
        );
    }
    let m = node_metrics(&c.cfg, &failed_id);
    assert!(
        m.contains("metropolis_node_update_rollbacks_total 1")
            && m.contains("metropolis_node_update_last_failed 1"),
        "{m}"
    );

    // A binary whose --version fails is refused before anything changes.
    let exits = tmp.path().join("exits");
    std::fs::write(&exits, "#!/bin/sh\necho 'cannot run here' >&2\nexit 1\n").expect("write");
    let out = metroctl(
        &c.cfg,
        &["node", "update", "--image", exits.to_str().expect("utf-8")],
    );
    let err = stderr(&out);
    println!("metroctl node update (exits):\n{}{err}", stdout(&out));
    assert!(
        !out.status.success()
            && err.contains("refused the update")
            && err.contains("`--version` exited with status 1: cannot run here"),
        "{err}"
    );
    let again = nodes(&mut ManagementClient::new(c.owner.clone()))
        .await
        .expect("nodes");
    assert!(all_healthy_on(&again, 3, &new_sha), "{again:#?}");
    for n in &again {
        let old = list.iter().find(|b| b.id == n.id).expect("same node");
        assert_eq!(boot_of(n), boot_of(old), "{} was not restarted", n.id);
    }

    // By hand: a node that was not part of the failure goes back to the
    // binary it ran before (the original build); the failed one has no good
    // binary to go back to.
    let other = again
        .iter()
        .find(|n| n.id != failed_id)
        .expect("another node");
    let out = metroctl(
        &c.cfg,
        &["--yes", "node", "reboot", "--rollback", &other.id],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let other_id = other.id.clone();
    wait_nodes(
        &c.owner,
        "the rolled back node HEALTHY on the original binary",
        Duration::from_secs(60),
        |l| {
            l.iter().any(|n| {
                n.id == other_id && n.health == Health::Healthy as i32 && sha_of(n) == original
            })
        },
    )
    .await;
    let out = metroctl(
        &c.cfg,
        &["--yes", "node", "reboot", "--rollback", &failed_id],
    );
    assert!(
        !out.status.success() && stderr(&out).contains("failed its trial"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_changes_nothing_and_a_node_updates_itself_without_help() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = Cluster::start(tmp.path(), 1).await;
    let (address, data_dir) = (c.nodes[0].address, c.nodes[0].data_dir.clone());
    let mut nm = c.node_management(address).await;
    let original = sha256_file(&node_binary());
    let first = nodes(&mut ManagementClient::new(c.owner.clone()))
        .await
        .expect("nodes")
        .remove(0);
    fn code_of<T>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
        match r {
            Ok(_) => panic!("accepted"),
            Err(s) => (s.code(), s.message().to_string()),
        }
    }

    // Unreachable: nothing listens on a port just released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let (code, msg) = code_of(
        nm.update_node(update_req(
            &format!("http://127.0.0.1:{port}/node"),
            &original,
            ActivationMode::Reboot,
        ))
        .await,
    );
    assert_eq!(code, Code::Unavailable, "{msg}");
    assert!(msg.contains("cannot fetch"), "{msg}");

    // Huge: refused on its announced size, before it is written.
    let huge = serve_raw(
        b"HTTP/1.1 200 OK\r\ncontent-length: 1099511627776\r\nconnection: close\r\n\r\n".to_vec(),
    )
    .await;
    let (code, msg) = code_of(
        nm.update_node(update_req(&huge, &original, ActivationMode::Reboot))
            .await,
    );
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    assert!(msg.contains("may be at most"), "{msg}");

    // Not a program.
    let junk = tmp.path().join("junk");
    std::fs::write(&junk, [0x13u8, 0x37, 0x00, 0xff, 0x42]).expect("write");
    let url = serve_file(&junk).await;
    let (code, msg) = code_of(
        nm.update_node(update_req(
            &url,
            &sha256_file(&junk),
            ActivationMode::Reboot,
        ))
        .await,
    );
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    assert!(msg.contains("not a program"), "{msg}");

    // The right binary under the wrong digest.
    let url = serve_file(&node_binary()).await;
    let (code, msg) = code_of(
        nm.update_node(update_req(&url, &"0".repeat(64), ActivationMode::Reboot))
            .await,
    );
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    assert!(msg.contains(&format!("SHA-256 is {original}")), "{msg}");

    // Invalid requests.
    let (code, msg) = code_of(
        nm.update_node(update_req(&url, &original, ActivationMode::Invalid))
            .await,
    );
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    let mut only_image = update_req("", "", ActivationMode::Reboot);
    only_image.os_image = Some(OsImageRef {
        scheme: "https".into(),
        host: "registry.example".into(),
        repository: "metropolis/node".into(),
        tag: "latest".into(),
        digest: format!("sha256:{original}"),
    });
    let (code, msg) = code_of(nm.update_node(only_image).await);
    assert_eq!(code, Code::FailedPrecondition, "{msg}");
    assert!(msg.contains("binary_url"), "{msg}");
    let (code, msg) = code_of(nm.reboot(rollback_request()).await);
    assert_eq!(code, Code::FailedPrecondition, "{msg}");
    assert!(msg.contains("never updated"), "{msg}");

    // A second update while one downloads: ABORTED, as upstream.
    let slow = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let slow_url = format!("http://{}/node", slow.local_addr().expect("addr"));
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    // The node asked for the slow file: the first update holds the node's
    // update lock from then on.
    let (started, downloading) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        if let Ok((mut s, _)) = slow.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = started.send(());
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
                .await;
            let _ = released.await;
        }
    });
    let mut nm2 = nm.clone();
    let slow_req = update_req(&slow_url, &original, ActivationMode::Reboot);
    let first_call = tokio::spawn(async move { nm2.update_node(slow_req).await });
    tokio::time::timeout(Duration::from_secs(30), downloading)
        .await
        .expect("the node asks for the slow file within 30 s")
        .expect("the slow server runs");
    let (code, msg) = code_of(
        nm.update_node(update_req(&url, &original, ActivationMode::Reboot))
            .await,
    );
    assert_eq!(code, Code::Aborted, "{msg}");
    drop(release);
    let (code, msg) = code_of(first_call.await.expect("join"));
    assert_eq!(code, Code::Unavailable, "{msg}");

    // Nothing changed: no slots, same process, same boot, HEALTHY.
    assert!(
        !data_dir.join("update/state.json").exists()
            && !data_dir.join("update/a").exists()
            && !data_dir.join("update/b").exists()
            && !data_dir.join("update/incoming").exists(),
        "no slot was written"
    );
    let now = nodes(&mut ManagementClient::new(c.owner.clone()))
        .await
        .expect("nodes")
        .remove(0);
    assert_eq!(boot_of(&now), boot_of(&first));
    assert_eq!(now.health, Health::Healthy as i32);

    // ACTIVATION_MODE_NONE installs only; the next reboot activates it.
    let image = marked_copy(tmp.path(), "image-1");
    let new_sha = sha256_file(&image);
    let url = serve_file(&image).await;
    nm.update_node(update_req(&url, &new_sha, ActivationMode::None))
        .await
        .expect("update, activation none");
    let state = slot_state(&data_dir).expect("state");
    assert_eq!(
        (&state["active"], &state["next"]),
        (&"a".into(), &"b".into())
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still = nodes(&mut ManagementClient::new(c.owner.clone()))
        .await
        .expect("nodes")
        .remove(0);
    assert_eq!(boot_of(&still), boot_of(&first), "not restarted");
    nm.reboot(RebootRequest {
        r#type: Type::Kexec as i32,
        next_boot: NextBoot::StartNormal as i32,
    })
    .await
    .expect("reboot");
    let on_new = wait_nodes(
        &c.owner,
        "the node HEALTHY on the new binary",
        Duration::from_secs(60),
        |l| all_healthy_on(l, 1, &new_sha),
    )
    .await;
    wait_for_state(&data_dir, |s| s["active"] == "b" && s["trial"].is_null()).await;

    // A new binary that starts but never rejoins: the node rolls back by
    // itself once the trial bound (12 s here) has passed.
    let hangs = wrapper(tmp.path(), "hangs", &image, "exec sleep 613");
    let url = serve_file(&hangs).await;
    let mut nm = c.node_management(address).await;
    let started = Instant::now();
    nm.update_node(update_req(
        &url,
        &sha256_file(&hangs),
        ActivationMode::Reboot,
    ))
    .await
    .expect("update to a binary that hangs");
    wait_for_state(&data_dir, |s| s["trial"]["slot"] == "a").await;
    let back = wait_nodes(
        &c.owner,
        "the node back on its previous binary",
        Duration::from_secs(90),
        |l| all_healthy_on(l, 1, &new_sha) && boot_of(&l[0]) != boot_of(&on_new[0]),
    )
    .await;
    println!(
        "a binary that never rejoined was rolled back, and the node HEALTHY again, after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let state = slot_state(&data_dir).expect("state");
    assert_eq!(state["active"], "b", "{state}");
    assert_eq!(state["rollbacks"], 1, "{state}");
    let reason = state["last_failure"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("did not rejoin"), "{state}");
    let m = node_metrics(&c.cfg, &back[0].id);
    assert!(
        m.contains("metropolis_node_update_rollbacks_total 1"),
        "{m}"
    );
    assert!(
        c.nodes[0].log_text().contains("update rolled back"),
        "the supervisor logs the rollback"
    );

    // Killed during a trial: the next start boots the slot that was good.
    let mut nm = c.node_management(address).await;
    nm.update_node(update_req(
        &url,
        &sha256_file(&hangs),
        ActivationMode::Reboot,
    ))
    .await
    .expect("update again");
    wait_for_state(&data_dir, |s| s["trial"]["slot"] == "a").await;
    assert!(sleeping_trials() > 0, "the trial runs");
    c.nodes[0].kill();
    // The node run by the killed supervisor dies with it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sleeping_trials() > 0 {
        assert!(
            Instant::now() < deadline,
            "the trial outlived its supervisor"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.nodes[0] = TestNode::spawn_with(address, &data_dir, None, FLAGS);
    wait_nodes(
        &c.owner,
        "the restarted node HEALTHY on the good binary",
        Duration::from_secs(60),
        |l| all_healthy_on(l, 1, &new_sha) && boot_of(&l[0]) != boot_of(&back[0]),
    )
    .await;
    let state = slot_state(&data_dir).expect("state");
    assert_eq!(state["rollbacks"], 2, "{state}");
    assert!(
        state["last_failure"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("stopped before"),
        "{state}"
    );

    // By hand, back to the binary it ran before the first update.
    let mut nm = c.node_management(address).await;
    nm.reboot(rollback_request())
        .await
        .expect_err("slot A failed its trial: nothing good to roll back to");
    // Install the original again and confirm, then roll back to image-1.
    let url = serve_file(&node_binary()).await;
    nm.update_node(update_req(&url, &original, ActivationMode::Reboot))
        .await
        .expect("update to the original");
    wait_nodes(
        &c.owner,
        "HEALTHY on the original",
        Duration::from_secs(60),
        |l| all_healthy_on(l, 1, &original),
    )
    .await;
    wait_for_state(&data_dir, |s| s["active"] == "a" && s["trial"].is_null()).await;
    let mut nm = c.node_management(address).await;
    nm.reboot(rollback_request()).await.expect("rollback");
    wait_nodes(
        &c.owner,
        "HEALTHY on image-1 again",
        Duration::from_secs(60),
        |l| all_healthy_on(l, 1, &new_sha),
    )
    .await;

    // SIGTERM reaches the node through its supervisor: both stop, and the
    // node's ports are free again.
    c.nodes[0].stop();
    assert!(
        std::net::TcpListener::bind((address, CURATOR_PORT)).is_ok(),
        "the supervised node stopped with its supervisor"
    );
}

/// The nodes as `metroctl node describe -o json` shows them (through
/// whichever node leads).
fn described(cfg: &Path) -> Vec<serde_json::Value> {
    let out = metroctl(cfg, &["node", "describe", "-o", "json"]);
    assert!(out.status.success(), "describe: {}", stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("json")
}

/// For polling while leadership may move (a member was just stopped): a
/// failed read is one more round, not a failure.
fn described_if_answered(cfg: &Path) -> Vec<serde_json::Value> {
    let out = metroctl(cfg, &["node", "describe", "-o", "json"]);
    if !out.status.success() {
        println!("describe (polling): {}", stderr(&out).trim());
        return Vec::new();
    }
    serde_json::from_str(&stdout(&out)).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_consensus_members_update_one_at_a_time() {
    metropolis_store::testing::find_etcd();
    let tmp = tempfile::tempdir().expect("tmp");
    let c = Cluster::start_on(tmp.path(), 3, true).await;
    let list = nodes(&mut ManagementClient::new(c.owner.clone()))
        .await
        .expect("nodes");
    let leader_addr = c.nodes[0].address.to_string();
    for n in list.iter().filter(|n| {
        n.status.as_ref().map(|s| s.external_address.as_str()) != Some(leader_addr.as_str())
    }) {
        let out = metroctl(&c.cfg, &["node", "add", "role", "ConsensusMember", &n.id]);
        assert!(out.status.success(), "add role: {}", stderr(&out));
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let out = metroctl(&c.cfg, &["cluster", "status", "-o", "json"]);
            let text = stdout(&out);
            let status: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            let voter = status["members"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["name"] == n.id.as_str() && m["isLearner"] != true);
            if voter {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not become a voter: {text}{}",
                n.id,
                stderr(&out)
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let before = described(&c.cfg);
    let image = marked_copy(tmp.path(), "image-ha");
    let new_sha = sha256_file(&image);
    let started = Instant::now();
    let out = metroctl(
        &c.cfg,
        &["node", "update", "--image", image.to_str().expect("utf-8")],
    );
    println!(
        "rolling update of 3 consensus members took {:.1}s\n{}{}",
        started.elapsed().as_secs_f64(),
        stdout(&out),
        stderr(&out)
    );
    assert!(out.status.success(), "update failed\n{}", c.logs());
    let text = stdout(&out);
    assert_eq!(text.matches(": HEALTHY on").count(), 3, "{text}");
    assert!(
        !text.contains("cluster API is unavailable"),
        "three members keep a quorum: {text}"
    );
    // One at a time: each member's install follows the previous member's
    // HEALTHY line.
    let events: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(": installing") || l.contains(": HEALTHY on"))
        .collect();
    for pair in events.chunks(2) {
        assert!(
            pair.len() == 2
                && pair[0].contains("installing")
                && pair[1].contains("HEALTHY")
                && pair[0].split(':').next() == pair[1].split(':').next(),
            "{text}"
        );
    }
    // The last member's restart may have moved the leadership: a node is
    // HEALTHY from its first beat to the new leader, UNKNOWN until then.
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let now = described_if_answered(&c.cfg);
        if now.len() == 3 && now.iter().all(|n| n["health"] == "HEALTH_HEALTHY") {
            break now;
        }
        assert!(Instant::now() < deadline, "not all HEALTHY: {now:#?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(after.len(), 3);
    for n in &after {
        assert_eq!(
            n["status"]["version"]["binarySha256"],
            new_sha.as_str(),
            "{n}"
        );
        let old = before
            .iter()
            .find(|b| b["id"] == n["id"])
            .expect("same node");
        assert_ne!(old["status"]["bootId"], n["status"]["bootId"], "{n}");
    }
    let out = metroctl(&c.cfg, &["cluster", "status", "-o", "json"]);
    let status: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("status json");
    let members = status["members"].as_array().cloned().unwrap_or_default();
    assert_eq!(members.len(), 3, "{status}");
    assert!(members.iter().all(|m| m["isLearner"] != true), "{status}");

    // With one member down, updating another would leave one of three:
    // metroctl refuses (after waiting --timeout for the member to return),
    // and touches nothing.
    let mut c = c;
    let down_addr = c.nodes[1].address.to_string();
    c.nodes[1].stop();
    let down = after
        .iter()
        .find(|n| n["status"]["externalAddress"] == down_addr.as_str())
        .and_then(|n| n["id"].as_str())
        .expect("the stopped node")
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    // (The stopped node may have led: the others reach the new leader
    // within a few seconds.)
    loop {
        let now = described_if_answered(&c.cfg);
        if now.len() == 3
            && now
                .iter()
                .all(|n| (n["id"] == down.as_str()) != (n["health"] == "HEALTH_HEALTHY"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{down} still HEALTHY, or the others not"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let out = metroctl(
        &c.cfg,
        &["node", "update", "--image", image.to_str().expect("utf-8")],
    );
    assert!(
        // HEARTBEAT_TIMEOUT, or UNKNOWN when the stopped node led: it never
        // beat to the new leader.
        !out.status.success()
            && (stderr(&out).contains(&format!("{down} (HEARTBEAT_TIMEOUT)"))
                || stderr(&out).contains(&format!("{down} (UNKNOWN)"))),
        "an unhealthy node is not updated: {}",
        stderr(&out)
    );
    let out = metroctl(
        &c.cfg,
        &[
            "node",
            "update",
            "--image",
            image.to_str().expect("utf-8"),
            "--exclude",
            &down,
            "--timeout",
            "3s",
        ],
    );
    let err = stderr(&out);
    assert!(
        !out.status.success()
            && err.contains("only 1 of the other 2 members are HEALTHY")
            && err.contains("0 of 2 node(s) were updated"),
        "{err}"
    );
    for n in described(&c.cfg)
        .iter()
        .filter(|n| n["id"] != down.as_str())
    {
        let old = after
            .iter()
            .find(|b| b["id"] == n["id"])
            .expect("same node");
        if old["status"]["bootId"] != n["status"]["bootId"] {
            panic!("a refused rollout restarted {}: {n}\n{}", n["id"], c.logs());
        }
    }
}

/// Processes running the hanging trial binary (`sleep 613`).
fn sleeping_trials() -> usize {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == b"sleep\x00613\x00")
                })
                .count()
        })
        .unwrap_or(0)
}

async fn wait_for_state(data_dir: &Path, pred: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = slot_state(data_dir)
            && pred(&s)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the slot state: {:?}",
            slot_state(data_dir)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
