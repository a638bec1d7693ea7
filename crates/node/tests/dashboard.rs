//! `metroctl dashboard` in a real headless Chromium, driven over WebDriver
//! (Debian's chromium and chromium-driver, which `scripts/setup` installs):
//! the node table shows every node, a label set through metroctl appears
//! without a reload, an action through the page (labels, confirmed in its
//! dialog) reaches the cluster, a bad filter shows the server's message (as
//! text: the message quotes the input). And the server side of CSRF safety:
//! no token, wrong Host or a cross-origin action are refused.
//!
//! Screenshots go to the test's output directory; their paths are printed.

mod support;

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};

use support::*;

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A program the test cannot do without: on PATH or at one of `places`.
fn require(name: &str, places: &[&str]) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    places
        .iter()
        .map(PathBuf::from)
        .chain(on_path)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed: the dashboard test drives a real headless Chromium. \
                 Run `bash scripts/setup` (installs Debian's chromium and chromium-driver), \
                 then test again"
            )
        })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Starts `metroctl dashboard` on a free loopback port; its URL.
fn start_dashboard(cfg: &Path) -> (Child, String) {
    let mut child = Command::new(metroctl_binary())
        .arg("--config")
        .arg(cfg)
        .args(["dashboard", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn metroctl dashboard");
    let out = child.stdout.take().expect("stdout");
    let mut first = String::new();
    std::io::BufReader::new(out)
        .read_line(&mut first)
        .expect("dashboard prints its URL");
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {first:?}"))
        .to_string();
    (Child(child), url)
}

/// chromedriver on a free port, and a headless Chromium session through it.
async fn browser(profile: &Path) -> (Child, Client) {
    let driver = require("chromedriver", &["/usr/lib/chromium/chromedriver"]);
    // The real binary, not Debian's wrapper script.
    let chromium = require("chromium", &["/usr/lib/chromium/chromium"]);
    let port = free_port();
    let child = Child(
        Command::new(&driver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chromedriver"),
    );
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            // Without the background-networking flags Chromium reaches out
            // to the internet, which this machine's closed network refuses.
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--window-size=1400,1100",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = loop {
        let mut b = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
        b.capabilities(caps.clone());
        match b.connect(&url).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no WebDriver session from {} at {url}: {e}",
                    driver.display()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    (child, client)
}

/// Polls the page until `check` says yes (Some), up to 30 s.
async fn wait_page<T>(
    c: &Client,
    what: &str,
    mut check: impl AsyncFnMut(&Client) -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = check(c).await {
            return v;
        }
        if Instant::now() > deadline {
            let src = c.source().await.unwrap_or_default();
            panic!("the page never showed {what}; it is now:\n{src}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn text_of(c: &Client, css: &str) -> Option<String> {
    c.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

async fn row_texts(c: &Client) -> Vec<String> {
    let mut out = Vec::new();
    for row in c
        .find_all(Locator::Css("#node-rows tr"))
        .await
        .unwrap_or_default()
    {
        out.push(row.text().await.unwrap_or_default());
    }
    out
}

fn shot_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    let path = shot_dir().join(name);
    std::fs::write(&path, png).expect("write screenshot");
    println!("screenshot: {}", path.display());
}

/// curl's HTTP status for a request to the dashboard.
fn curl_status(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(args)
        .output()
        .expect("curl (install it: scripts/setup)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_cluster_live_in_chromium() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cluster = OperatorCluster::start(tmp.path(), 2, &[]).await;
    let (first, second) = (cluster.ids[0].clone(), cluster.ids[1].clone());
    let (_dashboard, url) = start_dashboard(&cluster.cfg);
    let (_driver, c) = browser(&tmp.path().join("chromium-profile")).await;

    c.goto(&url).await.expect("open the dashboard");
    // Every node, live.
    let rows = wait_page(&c, "both nodes", async |c| {
        let rows = row_texts(c).await;
        (rows.len() == 2 && rows.iter().all(|r| r.contains("HEALTHY"))).then_some(rows)
    })
    .await;
    for id in [&first, &second] {
        assert!(
            rows.iter().any(|r| r.contains(id.as_str())),
            "{id} not in {rows:#?}"
        );
    }
    wait_page(&c, "the live indicator", async |c| {
        text_of(c, "#live").await.filter(|t| t.starts_with("Live"))
    })
    .await;
    // The cluster pane: the CA fingerprint metroctl prints.
    let info = stdout(&metroctl(&cluster.cfg, &["cluster", "info"]));
    wait_page(&c, "the CA fingerprint", async |c| {
        let text = text_of(c, "#cluster").await?;
        let fp = text
            .lines()
            .find(|l| l.contains(':') && l.len() > 90)?
            .trim()
            .to_string();
        info.contains(&fp).then_some(())
    })
    .await;

    // A label set through metroctl appears without a reload.
    let t0 = Instant::now();
    let out = metroctl(&cluster.cfg, &["node", "label", &second, "zone=eu-west-3"]);
    assert!(out.status.success(), "label: {}", stderr(&out));
    wait_page(&c, "the label set through metroctl", async |c| {
        row_texts(c)
            .await
            .iter()
            .any(|r| r.contains(second.as_str()) && r.contains("zone=eu-west-3"))
            .then_some(())
    })
    .await;
    println!("label set through metroctl shown after {:?}", t0.elapsed());

    // An action through the page: the first node's labels, confirmed.
    let button = c
        .find(Locator::Css(&format!(
            "#node-rows tr[data-node='{first}'] button[aria-label^='Labels']"
        )))
        .await
        .expect("labels button");
    button.click().await.expect("open the labels dialog");
    let input = c
        .find(Locator::Css("#label-changes"))
        .await
        .expect("label input");
    input.send_keys("rack=r7").await.expect("type");
    let plan = text_of(&c, "#dialog-plan").await.unwrap_or_default();
    assert!(plan.contains("set rack=r7"), "dialog says {plan:?}");
    c.find(Locator::Css("#dialog-ok"))
        .await
        .expect("confirm")
        .click()
        .await
        .expect("confirm");
    wait_page(&c, "the label set through the page", async |c| {
        row_texts(c)
            .await
            .iter()
            .any(|r| r.contains(first.as_str()) && r.contains("rack=r7"))
            .then_some(())
    })
    .await;
    let described = stdout(&metroctl(
        &cluster.cfg,
        &["node", "describe", &first, "-o", "json"],
    ));
    assert!(described.contains("\"r7\""), "{described}");

    // A role through the page.
    c.find(Locator::Css(&format!(
        "#node-rows tr[data-node='{second}'] button[aria-label^='Roles']"
    )))
    .await
    .expect("roles button")
    .click()
    .await
    .expect("open the roles dialog");
    c.find(Locator::Id("role-KubernetesWorker"))
        .await
        .expect("worker box")
        .click()
        .await
        .expect("tick");
    let plan = text_of(&c, "#dialog-plan").await.unwrap_or_default();
    assert!(
        plan.contains("add KubernetesWorker"),
        "dialog says {plan:?}"
    );
    c.find(Locator::Css("#dialog-ok"))
        .await
        .expect("confirm")
        .click()
        .await
        .expect("confirm");
    wait_page(&c, "the role given through the page", async |c| {
        row_texts(c)
            .await
            .iter()
            .any(|r| r.contains(second.as_str()) && r.contains("KubernetesWorker"))
            .then_some(())
    })
    .await;

    // The audit pane (reloaded after a page action) shows the page's calls,
    // made with the operator's own credentials.
    let audit = wait_page(&c, "the page's calls in the audit log", async |c| {
        text_of(c, "#audit")
            .await
            .filter(|t| t.contains("UpdateNodeRoles") && t.contains("UpdateNodeLabels"))
    })
    .await;
    assert!(audit.contains("owner"), "audit pane: {audit}");
    // The cluster pane: CA expiry, configuration, the leader and the
    // consensus members (the first node, which bootstrapped, is both).
    let pane = text_of(&c, "#cluster").await.unwrap_or_default();
    for want in [
        "CA valid until",
        "Cluster domain",
        "Storage security",
        "Curator leader",
        "Consensus",
    ] {
        assert!(
            pane.contains(want),
            "no {want:?} in the cluster pane: {pane}"
        );
    }
    assert!(
        pane.matches(first.as_str()).count() >= 2,
        "the first node as leader and member: {pane}"
    );

    screenshot(&c, "dashboard-nodes.png").await;

    // A node's logs, followed.
    c.find(Locator::Css(&format!(
        "#node-rows tr[data-node='{first}'] button[aria-label^='Logs']"
    )))
    .await
    .expect("logs button")
    .click()
    .await
    .expect("follow logs");
    let logs = wait_page(&c, "the node's logs", async |c| {
        text_of(c, "#logs").await.filter(|t| t.contains("root"))
    })
    .await;
    println!("log lines shown: {}", logs.lines().count());
    screenshot(&c, "dashboard-logs.png").await;

    // A bad filter: the server's message, as text (it quotes the input).
    let filter = c.find(Locator::Id("filter")).await.expect("filter box");
    filter
        .send_keys("node.id == \"<img id=injected src=x>\" &&")
        .await
        .expect("type");
    c.find(Locator::Css("#filter-form button[type=submit]"))
        .await
        .expect("apply")
        .click()
        .await
        .expect("apply");
    let msg = wait_page(&c, "the filter error", async |c| {
        text_of(c, "#filter-error").await.filter(|t| !t.is_empty())
    })
    .await;
    println!("filter error shown: {msg}");
    assert!(
        msg.contains("WatchNodes failed") && msg.contains("CEL"),
        "{msg}"
    );
    assert!(
        msg.contains("<img id=injected"),
        "the message quotes the input: {msg}"
    );
    assert!(
        c.find(Locator::Id("injected")).await.is_err(),
        "cluster text was rendered as HTML"
    );
    screenshot(&c, "dashboard-filter-error.png").await;
    c.close().await.expect("close the browser");

    // The server refuses requests that do not come from its own page.
    let addr: SocketAddr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("dashboard address");
    let api = format!("{url}api/nodes/{second}/labels");
    assert_eq!(
        curl_status(&[&format!("{url}api/cluster")]),
        "403",
        "no token"
    );
    assert_eq!(
        curl_status(&[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            "{}",
            &api
        ]),
        "403",
        "action without token"
    );
    assert_eq!(
        curl_status(&["-H", "Host: evil.example", &url]),
        "421",
        "another host name (DNS rebinding)"
    );
    let page = Command::new("curl")
        .args(["-s", &url])
        .output()
        .expect("curl");
    let page = String::from_utf8_lossy(&page.stdout);
    let token = page
        .split("name=\"dashboard-token\" content=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("token in the page")
        .to_string();
    let tok = format!("x-dashboard-token: {token}");
    let body = r#"{"upsert":[{"key":"csrf","value":"x"}]}"#;
    assert_eq!(
        curl_status(&[
            "-X",
            "POST",
            "-H",
            &tok,
            "-H",
            "origin: http://evil.example",
            "-H",
            "content-type: application/json",
            "-d",
            body,
            &api,
        ]),
        "403",
        "cross-origin action"
    );
    assert_eq!(
        curl_status(&["-X", "POST", "-H", &tok, "-d", "upsert=x", &api]),
        "403",
        "form-encoded action"
    );
    assert_eq!(
        curl_status(&[
            "-X",
            "POST",
            "-H",
            &tok,
            "-H",
            &format!("origin: http://{addr}"),
            "-H",
            "content-type: application/json",
            "-d",
            body,
            &api,
        ]),
        "200",
        "the page's own action"
    );
}

#[test]
fn a_non_loopback_listen_address_needs_insecure_listen() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = metroctl(tmp.path(), &["dashboard", "--listen", "0.0.0.0:0"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--insecure-listen"),
        "{}",
        stderr(&out)
    );
}
