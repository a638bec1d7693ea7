//! NodeWatch.WatchNodes against real node processes: a label change and a
//! node's SIGKILL (its health turning HEARTBEAT_TIMEOUT) reach a watcher,
//! and `metroctl node describe --watch -o json`, within one heartbeat
//! timeout; a bad filter is refused with the reason.

mod support;

use std::io::BufRead;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metropolis_api::admin::{
    WatchNodesEvent, WatchNodesRequest, node_watch_client::NodeWatchClient, watch_nodes_event::Kind,
};
use metropolis_api::api::node::Health;

use support::*;

const INTERVAL: Duration = Duration::from_millis(300);
const TIMEOUT: Duration = Duration::from_secs(2);
const FLAGS: &[&str] = &["--heartbeat-interval", "300ms", "--heartbeat-timeout", "2s"];

/// Lines a child process printed, with when they arrived.
type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_collecting(cfg: &std::path::Path, args: &[&str]) -> (Child, Lines) {
    let mut child = std::process::Command::new(metroctl_binary())
        .arg("--config")
        .arg(cfg)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("spawn metroctl");
    let out = child.stdout.take().expect("stdout");
    let lines: Lines = Default::default();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            sink.lock().expect("lock").push((Instant::now(), line));
        }
    });
    (Child(child), lines)
}

/// Waits for a line matching `pred`; when it arrived.
async fn wait_line(
    lines: &Lines,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(at) = lines.lock().expect("lock").iter().find_map(|(at, l)| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .filter(|v| pred(v))
                .map(|_| *at)
        }) {
            return at;
        }
        assert!(
            Instant::now() < deadline,
            "metroctl describe --watch never printed {what}; it printed:\n{:#?}",
            lines.lock().expect("lock")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next event whose nodes satisfy `pred`; when it arrived.
async fn wait_event(
    s: &mut tonic::Streaming<WatchNodesEvent>,
    what: &str,
    pred: impl Fn(&metropolis_api::api::Node) -> bool,
) -> (Instant, metropolis_api::api::Node) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = tokio::time::timeout(left, s.message())
            .await
            .unwrap_or_else(|_| panic!("no event with {what} in 30 s"))
            .expect("watch goes on")
            .expect("watch open");
        if let Some(n) = ev.nodes.into_iter().find(|n| pred(n)) {
            return (Instant::now(), n);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_sees_a_label_change_and_a_killed_node_time_out() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut cluster = OperatorCluster::start(tmp.path(), 2, FLAGS).await;
    let (first, second) = (cluster.ids[0].clone(), cluster.ids[1].clone());

    let mut watch = NodeWatchClient::new(cluster.owner_channel().await);
    // A bad filter: the server's reason, at once.
    let err = watch
        .watch_nodes(WatchNodesRequest {
            filter: "node.state ==".into(),
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    println!("bad filter: {}", err.message());
    let out = metroctl(
        &cluster.cfg,
        &["node", "describe", "--watch", "--filter", "node.state =="],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("WatchNodes failed"),
        "{}",
        stderr(&out)
    );

    let mut s = watch
        .watch_nodes(WatchNodesRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let snap = s.message().await.expect("snapshot").expect("event");
    assert_eq!(snap.kind, Kind::SnapshotDone as i32);
    assert_eq!(snap.nodes.len(), 2, "{snap:?}");
    assert_eq!(snap.leader_node_id, first);
    let (_cli, lines) =
        spawn_collecting(&cluster.cfg, &["node", "describe", "--watch", "-o", "json"]);
    for id in [&first, &second] {
        wait_line(&lines, "both nodes ADDED", |v| {
            v["type"] == "ADDED" && v["node"]["id"] == id.as_str()
        })
        .await;
    }

    // A label set through metroctl.
    let has_label = |n: &metropolis_api::api::Node| {
        n.id == second
            && n.labels.as_ref().is_some_and(|l| {
                l.pairs
                    .iter()
                    .any(|p| p.key == "watched" && p.value == "yes")
            })
    };
    let t0 = Instant::now();
    let out = metroctl(&cluster.cfg, &["node", "label", &second, "watched=yes"]);
    assert!(out.status.success(), "label: {}", stderr(&out));
    let (seen, _) = wait_event(&mut s, "the label", has_label).await;
    let label_grpc = seen - t0;
    let at = wait_line(&lines, "the label change", |v| {
        v["type"] == "MODIFIED"
            && v["node"]["id"] == second.as_str()
            && v["node"]["labels"]["pairs"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["key"] == "watched"))
    })
    .await;
    let label_cli = at.saturating_duration_since(t0);

    // SIGKILL: no goodbye, the heartbeats just stop.
    let t1 = Instant::now();
    cluster.nodes[1].kill();
    let (seen, node) = wait_event(&mut s, "HEARTBEAT_TIMEOUT", |n| {
        n.id == second && n.health == Health::HeartbeatTimeout as i32
    })
    .await;
    let timeout_grpc = seen - t1;
    let at = wait_line(&lines, "the timeout", |v| {
        v["node"]["id"] == second.as_str() && v["node"]["health"] == "HEALTH_HEARTBEAT_TIMEOUT"
    })
    .await;
    let timeout_cli = at.saturating_duration_since(t1);
    let since = node
        .time_since_heartbeat
        .and_then(|d| Duration::try_from(d).ok())
        .expect("time since heartbeat");
    println!(
        "heartbeat interval {INTERVAL:?}, timeout {TIMEOUT:?}\n\
         label change seen: watch {label_grpc:?}, metroctl --watch {label_cli:?} after `node label`\n\
         HEARTBEAT_TIMEOUT seen: watch {timeout_grpc:?}, metroctl --watch {timeout_cli:?} after SIGKILL\n\
         reported with time_since_heartbeat {since:?} (late by {:?} past the timeout)",
        since.saturating_sub(TIMEOUT)
    );
    // A label change needs no timeout at all; a timeout is due one timeout
    // after the last beat, which came before the kill. The bounds are
    // generous (slow machines): the figures above are the measurement.
    assert!(
        label_grpc < TIMEOUT && label_cli < TIMEOUT,
        "label change too late"
    );
    assert!(since >= TIMEOUT, "reported before the timeout: {since:?}");
    assert!(
        timeout_grpc < 2 * TIMEOUT && timeout_cli < 2 * TIMEOUT,
        "timeout reported more than a timeout late"
    );
}
