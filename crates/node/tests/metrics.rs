//! The metrics port as upstream lays it out: TLS with cluster client
//! certificates, `/metrics/<exporter>` and `/discovery`, driven with curl
//! as an operator (or Prometheus) would, with the credentials
//! `metroctl credentials export` writes.

mod support;

use std::path::Path;
use std::process::Command;

use support::*;

/// curl's status code and body.
fn curl(args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "-m", "20", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl (scripts/setup installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_string(), body.to_string())
}

fn s(p: &Path) -> String {
    p.to_str().expect("utf-8").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_discovery_need_a_cluster_certificate() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cluster = OperatorCluster::start(tmp.path(), 2, &[]).await;
    let creds = tmp.path().join("creds");
    let out = metroctl(&cluster.cfg, &["credentials", "export", &s(&creds)]);
    assert!(out.status.success(), "export: {}", stderr(&out));
    let (ca, cert, key) = (
        creds.join("ca.pem"),
        creds.join("client.pem"),
        creds.join("client-key.pem"),
    );
    let (first, second) = (&cluster.nodes[0], &cluster.nodes[1]);
    let first_id = &cluster.ids[0];

    // The owner's certificate, the node verified by the cluster CA under its
    // ID (node certificates name the node, not its address).
    let url = |id: &str, path: &str| format!("https://{id}:7840{path}");
    let resolve = format!("{first_id}:7840:{}", first.address);
    let owner = |path: &str| {
        curl(&[
            "--cacert",
            &s(&ca),
            "--cert",
            &s(&cert),
            "--key",
            &s(&key),
            "--resolve",
            &resolve,
            &url(first_id, path),
        ])
    };
    let (code, body) = owner("/discovery");
    assert_eq!(code, "200", "{body}");
    println!("/discovery: {body}");
    let groups: serde_json::Value = serde_json::from_str(&body).expect("discovery JSON");
    let groups = groups.as_array().expect("a list of target groups");
    assert_eq!(groups.len(), 2, "{body}");
    for (node, id) in cluster.nodes.iter().zip(&cluster.ids) {
        let g = groups
            .iter()
            .find(|g| g["labels"]["__meta_metropolis_node"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} not in {body}"));
        assert_eq!(g["targets"], serde_json::json!([node.address.to_string()]));
        let cm = if id == first_id { "true" } else { "false" };
        assert_eq!(g["labels"]["__meta_metropolis_role_consensus_member"], cm);
        assert_eq!(
            g["labels"]["__meta_metropolis_role_kubernetes_worker"],
            "false"
        );
        assert_eq!(
            g["labels"]["__meta_metropolis_role_kubernetes_controller"],
            "false"
        );
    }
    let (code, body) = owner("/metrics/core");
    assert_eq!(code, "200");
    assert!(
        body.contains("metropolis_nodes{health=\"HEALTH_HEALTHY\",state=\"NODE_STATE_UP\"} 2"),
        "{body}"
    );
    let (code, body) = owner("/metrics/etcd");
    assert_eq!(code, "404", "no etcd on the embedded store: {body}");
    assert!(body.contains("runs no etcd"), "{body}");
    let (code, body) = owner("/metrics/node");
    assert_eq!(code, "404", "{body}");
    assert!(body.contains("it has: core"), "{body}");

    // Without a certificate: refused, saying why.
    let (code, body) = curl(&[
        "--cacert",
        &s(&ca),
        "--resolve",
        &resolve,
        &url(first_id, "/discovery"),
    ]);
    assert_eq!(code, "401", "{body}");
    assert!(body.contains("no client certificate"), "{body}");
    println!("without a certificate: {code} {body}");
    // A certificate of another CA: refused.
    let other = metropolis_identity::CertificateAuthority::generate().expect("ca");
    let k = metropolis_identity::generate_key();
    let foreign = other
        .issue_user_certificate(
            "owner",
            &k.verifying_key().to_bytes(),
            std::time::Duration::from_secs(86_400),
        )
        .expect("cert");
    let (fc, fk) = (
        tmp.path().join("foreign.pem"),
        tmp.path().join("foreign-key.pem"),
    );
    std::fs::write(&fc, metropolis_identity::cert_to_pem(&foreign)).expect("write");
    std::fs::write(&fk, metropolis_identity::encode_pkcs8_key_pem(&k)).expect("write");
    let (code, body) = curl(&[
        "--cacert",
        &s(&ca),
        "--cert",
        &s(&fc),
        "--key",
        &s(&fk),
        "--resolve",
        &resolve,
        &url(first_id, "/metrics/core"),
    ]);
    assert_eq!(code, "401", "{body}");
    assert!(body.contains("not valid for this cluster"), "{body}");
    // Plain HTTP: nothing there by default.
    let (code, _) = curl(&[&format!("http://{}:7840/metrics/core", first.address)]);
    assert_ne!(code, "200", "plain HTTP served");

    // A node without the cluster state has no discovery to give.
    let second_id = &cluster.ids[1];
    let (code, body) = curl(&[
        "--cacert",
        &s(&ca),
        "--cert",
        &s(&cert),
        "--key",
        &s(&key),
        "--resolve",
        &format!("{second_id}:7840:{}", second.address),
        &url(second_id, "/discovery"),
    ]);
    assert_eq!(code, "503", "{body}");
    // metroctl reads the same, verifying the node.
    let out = metroctl(&cluster.cfg, &["node", "metrics", second_id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("process_resident_memory_bytes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_metrics_only_on_loopback_and_only_when_asked() {
    let refused = run_node(&[
        "--data-dir",
        "/nonexistent",
        "--address",
        "127.0.0.2",
        "--metrics-plain-http",
        "10.1.2.3:7841",
    ]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("only served on loopback"), "{err}");

    let tmp = tempfile::tempdir().expect("tmp");
    let owner = metropolis_identity::generate_key();
    let params = tmp.path().join("bootstrap.pb");
    write_bootstrap_params(&params, &owner);
    let address = fresh_address();
    let plain = format!("{address}:7841");
    let node = TestNode::spawn_with(
        address,
        &tmp.path().join("node"),
        Some(&params),
        &["--metrics-plain-http", &plain],
    );
    node.wait_leading().await;
    let (code, body) = curl(&[&format!("http://{plain}/metrics/core")]);
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("metropolis_curator_leader 1"), "{body}");
}
