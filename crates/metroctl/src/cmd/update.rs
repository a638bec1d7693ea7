//! `metroctl node update --image FILE`: rolls a new metropolis-node binary
//! out to the cluster.
//!
//! metroctl serves the file itself over plain HTTP, on an ephemeral port of
//! the address this machine reaches the nodes from (or `--serve-address`),
//! for as long as the rollout runs; each node gets its URL and SHA-256 in
//! UpdateNode and downloads it. Nodes without the ConsensusMember role go
//! first, at most `--max-unavailable` at a time; then the consensus members,
//! one at a time, the curator leader last, each only while the other members
//! keep a quorum. A node is done when it is HEALTHY with a new boot ID on
//! the new binary; the rollout stops at the first node that refuses the
//! binary, rolls back, or does not come back.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use http_body_util::Full;
use hyper::body::Bytes;
use metropolis_api::api::{
    ActivationMode, Node, UpdateNodeRequest, node::Health,
    node_management_client::NodeManagementClient,
};
use metropolis_api::common::NodeState;
use sha2::{Digest, Sha256};

use super::node::{get_nodes, health_name, node_management_of, short_sha, version};
use crate::conn::Ctx;

/// How often a waiting rollout looks at a node.
const POLL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Activation {
    /// Restart the node into the new binary at once.
    Reboot,
    /// The same as reboot for metropolis-node (a process, not a machine).
    Kexec,
    /// Install only; the new binary boots at the node's next restart.
    None,
}

pub struct UpdateArgs {
    pub ids: Vec<String>,
    pub image: PathBuf,
    pub max_unavailable: usize,
    pub exclude: Vec<String>,
    pub filter: String,
    pub activation: Activation,
    pub serve_address: Option<IpAddr>,
    pub timeout: Duration,
}

/// The binary to roll out.
struct Image {
    bytes: Bytes,
    sha256: String,
}

impl Image {
    fn read(path: &Path) -> anyhow::Result<Image> {
        let max = metropolis_api::update::MAX_BINARY_BYTES;
        let meta =
            std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        if !meta.is_file() {
            bail!("{} is not a file", path.display());
        }
        if meta.len() > max {
            bail!(
                "{} is {} bytes; nodes accept a binary of at most {max} bytes (is it the metropolis-node binary?)",
                path.display(),
                meta.len()
            );
        }
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        Ok(Image {
            bytes: Bytes::from(bytes),
            sha256,
        })
    }
}

pub async fn run(ctx: &Ctx, a: UpdateArgs) -> anyhow::Result<()> {
    if a.max_unavailable == 0 {
        bail!("--max-unavailable must be at least 1");
    }
    let image = Image::read(&a.image)?;
    let selected = get_nodes(ctx, &a.filter, &a.ids).await?;
    let mut chosen = Vec::new();
    for n in selected {
        if a.exclude.contains(&n.id) {
            continue;
        }
        if n.state != NodeState::Up as i32 {
            println!(
                "Skipping {} ({}): only UP nodes are updated.",
                n.id,
                super::node::state_name(n.state)
            );
            continue;
        }
        chosen.push(n);
    }
    if chosen.is_empty() {
        bail!("no UP node to update among the selected ones");
    }
    // A node that is not HEALTHY now would not be HEALTHY after either, and
    // a rollout waits for exactly that.
    let unhealthy: Vec<String> = chosen
        .iter()
        .filter(|n| n.health != Health::Healthy as i32)
        .map(|n| format!("{} ({})", n.id, health_name(n.health)))
        .collect();
    if !unhealthy.is_empty() {
        bail!(
            "not HEALTHY, so not updated: {}; bring them back first, or leave them out with --exclude ID",
            unhealthy.join(", ")
        );
    }
    let leader = super::cluster::current_leader(ctx.owner_channel().await?)
        .await
        .map(|l| l.leader_node_id)
        .unwrap_or_default();
    let (mut members, workers): (Vec<Node>, Vec<Node>) =
        chosen.into_iter().partition(is_consensus_member);
    members.sort_by_key(|n| n.id == leader);
    let total = workers.len() + members.len();

    let serve_ip = match a.serve_address {
        Some(ip) => ip,
        None => local_address_towards(&workers, &members)?,
    };
    let served = Served::start(serve_ip, &image).await?;
    let req = UpdateNodeRequest {
        os_image: None,
        activation_mode: match a.activation {
            Activation::Reboot => ActivationMode::Reboot,
            Activation::Kexec => ActivationMode::Kexec,
            Activation::None => ActivationMode::None,
        } as i32,
        binary_url: served.url.clone(),
        binary_sha256: image.sha256.clone(),
    };
    println!(
        "Updating {total} node(s) to sha256:{} ({} bytes, served at {}): {} at a time, consensus members one at a time.",
        short_sha(&image.sha256),
        image.bytes.len(),
        served.url,
        a.max_unavailable
    );
    let progress = indicatif::ProgressBar::new(total as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {wide_msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let roll = Rollout {
        ctx,
        req,
        sha256: image.sha256.clone(),
        wait: a.activation != Activation::None,
        timeout: a.timeout,
        progress: progress.clone(),
    };

    let mut done = 0usize;
    let mut failure: Option<String> = None;
    let mut queue = workers.iter();
    let mut running = FuturesUnordered::new();
    loop {
        while failure.is_none() && running.len() < a.max_unavailable {
            match queue.next() {
                Some(n) => running.push(roll.one(n)),
                None => break,
            }
        }
        match running.next().await {
            Some(Ok(())) => done += 1,
            Some(Err(e)) => {
                failure.get_or_insert(e);
            }
            None => break,
        }
    }
    if failure.is_none() {
        for m in &members {
            if let Err(e) = roll.quorum_without(m).await {
                failure = Some(e);
                break;
            }
            match roll.one(m).await {
                Ok(()) => done += 1,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
    }
    progress.finish_and_clear();
    drop(served);
    match failure {
        None if roll.wait => {
            println!(
                "All {done} node(s) run sha256:{}.",
                short_sha(&image.sha256)
            );
            Ok(())
        }
        None => {
            println!(
                "Installed on {done} node(s); each boots it at its next restart (`metroctl node reboot ID`)."
            );
            Ok(())
        }
        Some(e) => bail!(
            "update stopped: {e}\n{done} of {total} node(s) were updated; no further node was touched"
        ),
    }
}

fn is_consensus_member(n: &Node) -> bool {
    n.roles
        .as_ref()
        .is_some_and(|r| r.consensus_member.is_some())
}

fn address_of(n: &Node) -> Option<IpAddr> {
    n.status.as_ref()?.external_address.parse().ok()
}

/// The address this machine would send from to reach the first node: the
/// one the nodes can reach it on, if they can reach it at all.
fn local_address_towards(workers: &[Node], members: &[Node]) -> anyhow::Result<IpAddr> {
    let target = workers
        .iter()
        .chain(members)
        .find_map(address_of)
        .context("no selected node has reported its address yet")?;
    let any: IpAddr = if target.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    // A UDP "connection" only picks a route; nothing is sent.
    let sock = std::net::UdpSocket::bind(SocketAddr::new(any, 0))?;
    sock.connect(SocketAddr::new(target, 7839))
        .with_context(|| format!("no route to node address {target}; pass --serve-address"))?;
    Ok(sock.local_addr()?.ip())
}

/// The image, served over HTTP until dropped.
struct Served {
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Served {
    async fn start(ip: IpAddr, image: &Image) -> anyhow::Result<Served> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
            .await
            .with_context(|| {
                format!("cannot listen on {ip} to serve the image; pass --serve-address")
            })?;
        let addr = listener.local_addr()?;
        let path: Arc<str> = Arc::from(format!("/{}/metropolis-node", image.sha256));
        let url = format!("http://{addr}{path}");
        let bytes = image.bytes.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                let (path, bytes) = (path.clone(), bytes.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let ok = req.method() == hyper::Method::GET && req.uri().path() == &*path;
                        tracing::debug!(%peer, path = req.uri().path(), ok, "image request");
                        let resp = if ok {
                            hyper::Response::builder()
                                .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
                                .body(Full::new(bytes.clone()))
                        } else {
                            hyper::Response::builder()
                                .status(hyper::StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::new()))
                        };
                        async move { resp }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Served { url, task })
    }
}

struct Rollout<'a> {
    ctx: &'a Ctx,
    req: UpdateNodeRequest,
    sha256: String,
    wait: bool,
    timeout: Duration,
    progress: indicatif::ProgressBar,
}

impl Rollout<'_> {
    fn say(&self, line: String) {
        self.progress.suspend(|| println!("{line}"));
    }

    /// Updates one node and waits until it is HEALTHY on the new binary.
    /// Err: which node failed, and why.
    async fn one(&self, n: &Node) -> Result<(), String> {
        let id = &n.id;
        let started = Instant::now();
        let before_boot = n
            .status
            .as_ref()
            .map(|s| s.boot_id.clone())
            .unwrap_or_default();
        let before_sha = running_sha(n);
        self.say(format!("{id}: installing (was {})", version(n)));
        self.progress.set_message(format!("{id}: installing"));
        let channel = node_management_of(self.ctx, n)
            .await
            .map_err(|e| format!("node {id} cannot be reached: {e:#}"))?;
        NodeManagementClient::new(channel)
            .update_node(self.req.clone())
            .await
            .map_err(|s| {
                format!(
                    "node {id} refused the update: {}",
                    metropolis_rpc::client::explain_status(&s)
                )
            })?;
        if !self.wait {
            self.progress.inc(1);
            self.say(format!(
                "{id}: installed; it boots the new binary at its next restart"
            ));
            return Ok(());
        }
        let deadline = started + self.timeout;
        let mut seen = String::from("no answer yet");
        loop {
            tokio::time::sleep(POLL).await;
            match get_nodes(self.ctx, &format!("node.id == {id:?}"), &[]).await {
                Ok(list) => {
                    if let Some(now) = list.into_iter().find(|m| &m.id == id) {
                        let boot = now
                            .status
                            .as_ref()
                            .map(|s| s.boot_id.clone())
                            .unwrap_or_default();
                        let sha = running_sha(&now);
                        let restarted = !boot.is_empty() && boot != before_boot;
                        let healthy = now.health == Health::Healthy as i32;
                        if restarted && healthy && sha == self.sha256 {
                            self.progress.inc(1);
                            self.say(format!(
                                "{id}: HEALTHY on {} after {:.1}s",
                                version(&now),
                                started.elapsed().as_secs_f64()
                            ));
                            return Ok(());
                        }
                        if restarted && healthy && sha == before_sha {
                            let why = self.rollback_reason(&now).await;
                            return Err(format!(
                                "node {id} rolled back to its previous binary (sha256:{}): {why}",
                                short_sha(&sha)
                            ));
                        }
                        seen = format!(
                            "{}, {}, binary sha256:{}",
                            if restarted {
                                "restarted"
                            } else {
                                "not restarted yet"
                            },
                            health_name(now.health),
                            short_sha(&sha)
                        );
                    }
                }
                Err(e) => seen = format!("{e:#}"),
            }
            self.progress.set_message(format!(
                "{id}: waiting ({seen}, {:.0}s)",
                started.elapsed().as_secs_f64()
            ));
            if Instant::now() >= deadline {
                return Err(format!(
                    "node {id} did not come back HEALTHY on the new binary within {} (last seen: {seen}); \
                     see `metroctl node logs {id} --dn root.update`",
                    humantime::format_duration(self.timeout)
                ));
            }
        }
    }

    /// What the node logged about its rollback.
    async fn rollback_reason(&self, n: &Node) -> String {
        use metropolis_api::api::{LogsRequest, logs_request};
        use metropolis_api::osbase::logtree::proto::log_entry::Kind;
        let unknown =
            || "the node's log (`metroctl node logs ID --dn root.update`) says why".to_string();
        let Ok(channel) = node_management_of(self.ctx, n).await else {
            return unknown();
        };
        let req = LogsRequest {
            dn: "root.update".into(),
            filters: Vec::new(),
            backlog_mode: logs_request::BacklogMode::All as i32,
            backlog_count: 0,
            stream_mode: logs_request::StreamMode::Disable as i32,
        };
        let Ok(resp) = NodeManagementClient::new(channel).logs(req).await else {
            return unknown();
        };
        let mut stream = resp.into_inner();
        let mut last = None;
        while let Ok(Some(msg)) = stream.message().await {
            for e in msg.backlog_entries {
                if let Some(Kind::Leveled(l)) = e.kind {
                    let text = l.lines.join(" ");
                    // The node logs "update to SHA (slot S) rolled back: WHY".
                    if let Some((_, why)) = text.split_once(" rolled back: ") {
                        last = Some(why.to_string());
                    }
                }
            }
        }
        last.unwrap_or_else(unknown)
    }

    /// Waits until updating consensus member `m` leaves a quorum of HEALTHY
    /// members; with one or two members there is none to keep.
    async fn quorum_without(&self, m: &Node) -> Result<(), String> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let all = get_nodes(self.ctx, "", &[])
                .await
                .map_err(|e| format!("cannot check the consensus members: {e:#}"))?;
            let members: Vec<&Node> = all.iter().filter(|n| is_consensus_member(n)).collect();
            let total = members.len();
            if total <= 2 {
                self.say(format!(
                    "{}: the cluster has {total} consensus member(s), so the cluster API is unavailable while it restarts",
                    m.id
                ));
                return Ok(());
            }
            let quorum = total / 2 + 1;
            let healthy = members
                .iter()
                .filter(|n| n.id != m.id && n.health == Health::Healthy as i32)
                .count();
            if healthy >= quorum {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not updating consensus member {}: only {healthy} of the other {} members are HEALTHY, \
                     and {quorum} of {total} must stay up for quorum; bring the others back first",
                    m.id,
                    total - 1
                ));
            }
            self.progress.set_message(format!(
                "{}: waiting for {quorum} other HEALTHY consensus members (now {healthy})",
                m.id
            ));
            tokio::time::sleep(POLL).await;
        }
    }
}

fn running_sha(n: &Node) -> String {
    n.status
        .as_ref()
        .and_then(|s| s.version.as_ref())
        .map(|v| v.binary_sha256.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_over_the_limit_are_refused_before_reading() {
        let tmp = tempfile::tempdir().expect("tmp");
        let big = tmp.path().join("big");
        let f = std::fs::File::create(&big).expect("create");
        // Sparse: no disk used.
        f.set_len(metropolis_api::update::MAX_BINARY_BYTES + 1)
            .expect("set_len");
        let e = Image::read(&big).err().expect("refused").to_string();
        assert!(e.contains("at most"), "{e}");
        let small = tmp.path().join("small");
        std::fs::write(&small, b"abc").expect("write");
        let img = Image::read(&small).expect("read");
        assert_eq!(
            img.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(Image::read(tmp.path()).is_err(), "a directory");
    }

    #[tokio::test]
    async fn serves_the_image_at_its_url_only() {
        use http_body_util::{BodyExt, Empty};
        let img = Image {
            bytes: Bytes::from_static(b"binary"),
            sha256: "00".repeat(32),
        };
        let served = Served::start("127.0.0.1".parse().expect("ip"), &img)
            .await
            .expect("serve");
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Empty<Bytes>>();
        let resp = client
            .get(served.url.parse().expect("uri"))
            .await
            .expect("get");
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"binary");
        let other = served.url.replace("metropolis-node", "other");
        let resp = client.get(other.parse().expect("uri")).await.expect("get");
        assert_eq!(resp.status(), 404);
    }
}
