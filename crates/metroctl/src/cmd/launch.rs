//! `metroctl cluster launch` / `stop`: a local cluster on loopback addresses,
//! the newcomer's first command.
//!
//! Layout of the launch directory:
//! - `nodeN/data/`: the node's data directory,
//! - `nodeN/node.log`: its output,
//! - `nodeN/pid`: its process ID while it runs,
//! - `nodeN/address`: the loopback address it serves on.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::CURATOR_PORT;
use crate::conn::Ctx;

/// How long a node may take to start serving.
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn launch(
    ctx: &Ctx,
    nodes: usize,
    dir: &Path,
    node_binary: Option<PathBuf>,
    ha: bool,
) -> anyhow::Result<()> {
    if nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    if ha && nodes < 3 {
        bail!(
            "--ha needs --nodes 3 or more: three consensus members survive the loss of one, two do not"
        );
    }
    let binary = find_node_binary(node_binary)?;
    if dir.exists()
        && std::fs::read_dir(dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!(
            "{} already exists and is not empty; stop that cluster with `metroctl cluster stop --dir {}` \
             and remove the directory, or choose another --dir",
            dir.display(),
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let addresses = free_loopback_addresses(nodes)?;

    // A new cluster gets a new CA: forget the previous cluster's credentials
    // (the owner key stays).
    if let Some(moved) = ctx.config.forget_cluster()? {
        eprintln!(
            "The credentials of the cluster pinned before were moved to {} (the owner key stays).",
            moved.display()
        );
    }
    let params = dir.join("bootstrap-params.pb");
    super::install::bootstrap_params(ctx, &params, ha)?;

    let spinner = ProgressBar::new_spinner().with_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    spinner.enable_steady_tick(Duration::from_millis(100));
    spinner.set_message(format!("starting node1 on {}", addresses[0]));
    let node_dir = dir.join("node1");
    start_node(&binary, &node_dir, addresses[0], Some(&params))?;
    wait_serving(&node_dir, SocketAddr::new(addresses[0], CURATOR_PORT)).await?;
    spinner.set_message("taking ownership");
    let owner_ctx = Ctx {
        config: crate::config::ConfigDir::locate(Some(ctx.config.root().to_path_buf()))?,
        endpoints_flag: Some(addresses.iter().map(|a| a.to_string()).collect()),
        assume_yes: true,
    };
    super::takeownership::run(&owner_ctx).await?;

    if nodes > 1 {
        let register = dir.join("register-params.pb");
        super::install::register_params(&owner_ctx, &register).await?;
        for (i, addr) in addresses.iter().enumerate().skip(1) {
            spinner.set_message(format!("starting node{} on {addr}", i + 1));
            start_node(
                &binary,
                &dir.join(format!("node{}", i + 1)),
                *addr,
                Some(&register),
            )?;
        }
        wait_all_up(&owner_ctx, nodes, &spinner, &dir).await?;
    }
    if ha {
        make_consensus_members(&owner_ctx, &spinner, &dir).await?;
    }
    spinner.finish_and_clear();

    let info = super::cluster::get_info(&owner_ctx).await?;
    println!();
    super::cluster::print_info_table(&info);
    println!();
    super::node::describe(&owner_ctx, &[], "", crate::output::Format::Table).await?;
    let cfg_flag = format!(" --config {}", ctx.config.root().display());
    println!();
    println!(
        "The cluster runs in the background; its data and logs are in {}.",
        dir.display()
    );
    println!("Next steps:");
    println!("  metroctl{cfg_flag} cluster info");
    println!("  metroctl{cfg_flag} install params --register -o register.pb");
    println!("  metroctl cluster stop --dir {}", dir.display());
    Ok(())
}

/// Gives the second and third node the ConsensusMember role, in one go:
/// the cluster admits them one after the other (etcd takes one learner at a
/// time); returns once both are voters.
async fn make_consensus_members(
    ctx: &Ctx,
    spinner: &ProgressBar,
    dir: &Path,
) -> anyhow::Result<()> {
    use metropolis_api::admin::ConsensusProgress;
    let nodes = super::node::get_nodes(ctx, "", &[]).await?;
    let candidates: Vec<String> = nodes
        .iter()
        .filter(|n| {
            n.roles
                .as_ref()
                .is_none_or(|r| r.consensus_member.is_none())
        })
        .map(|n| n.id.clone())
        .take(2)
        .collect();
    spinner.set_message(format!(
        "making {} consensus members",
        candidates.join(" and ")
    ));
    for id in &candidates {
        super::node::update_role(ctx, super::node::Role::ConsensusMember, true, id).await?;
    }
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let voters = super::node::get_nodes(ctx, "", &candidates)
            .await
            .map(|list| {
                list.iter()
                    .filter(|n| n.consensus_progress == ConsensusProgress::Voter as i32)
                    .count()
            })
            .unwrap_or(0);
        if voters == candidates.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not become voting consensus members within {START_TIMEOUT:?}; see the node logs in {}",
                candidates.join(" and "),
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Approves every node that registered and waits until all `want` nodes are
/// UP and HEALTHY.
async fn wait_all_up(
    ctx: &Ctx,
    want: usize,
    spinner: &ProgressBar,
    dir: &Path,
) -> anyhow::Result<()> {
    use metropolis_api::api::node::Health;
    use metropolis_api::common::NodeState;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let nodes = super::node::get_nodes(ctx, "", &[]).await?;
        for n in nodes.iter().filter(|n| n.state == NodeState::New as i32) {
            super::node::approve(ctx, Some(&n.id)).await?;
        }
        let up = nodes
            .iter()
            .filter(|n| n.state == NodeState::Up as i32)
            .count();
        let healthy = nodes
            .iter()
            .filter(|n| n.health == Health::Healthy as i32)
            .count();
        spinner.set_message(format!("{up}/{want} nodes up, {healthy}/{want} healthy"));
        if up >= want && healthy >= want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "only {up} of {want} nodes came up within {START_TIMEOUT:?}; see the node logs in {}",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn find_node_binary(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p);
    }
    if let Some(sibling) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("metropolis-node")))
        && sibling.is_file()
    {
        return Ok(sibling);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("metropolis-node"))
        .find(|p| p.is_file())
        .context("cannot find the metropolis-node binary next to metroctl or on $PATH; build it with `cargo build --workspace` or pass --node-binary")
}

/// Picks loopback addresses where nothing listens on the curator port yet,
/// so a launched cluster does not collide with one already running.
fn free_loopback_addresses(n: usize) -> anyhow::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for last in 2..=254u8 {
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, last));
        if std::net::TcpListener::bind(SocketAddr::new(ip, CURATOR_PORT)).is_ok() {
            out.push(ip);
            if out.len() == n {
                return Ok(out);
            }
        }
    }
    bail!("not enough free loopback addresses (127.0.0.2-254) with port {CURATOR_PORT} unused")
}

/// Starts a node in the background, in its own process group so it outlives
/// metroctl and is not hit by the terminal's Ctrl-C.
pub fn start_node(
    binary: &Path,
    node_dir: &Path,
    address: IpAddr,
    params: Option<&Path>,
) -> anyhow::Result<u32> {
    std::fs::create_dir_all(node_dir)
        .with_context(|| format!("creating {}", node_dir.display()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(node_dir.join("node.log"))
        .with_context(|| format!("creating {}", node_dir.join("node.log").display()))?;
    let mut cmd = std::process::Command::new(binary);
    cmd.arg("--data-dir")
        .arg(node_dir.join("data"))
        .arg("--address")
        .arg(address.to_string());
    if let Some(p) = params {
        cmd.arg("--params").arg(p);
    }
    use std::os::unix::process::CommandExt;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    std::fs::write(node_dir.join("pid"), child.id().to_string())?;
    std::fs::write(node_dir.join("address"), address.to_string())?;
    Ok(child.id())
}

async fn wait_serving(node_dir: &Path, addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    let pid = read_pid(node_dir)?;
    loop {
        if super::takeownership::fetch_ca_trust_on_first_use(&[addr])
            .await
            .is_ok()
        {
            return Ok(());
        }
        if !alive(pid) {
            bail!(
                "the node on {addr} exited; last lines of its log:\n{}",
                tail(&node_dir.join("node.log"), 10)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the node on {addr} did not start serving within {START_TIMEOUT:?}; see {}",
                node_dir.join("node.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn read_pid(node_dir: &Path) -> anyhow::Result<i32> {
    let s = std::fs::read_to_string(node_dir.join("pid"))
        .with_context(|| format!("reading {}", node_dir.join("pid").display()))?;
    s.trim().parse().with_context(|| {
        format!(
            "{} does not hold a process ID",
            node_dir.join("pid").display()
        )
    })
}

fn alive(pid: i32) -> bool {
    // Signal 0 checks existence without touching the process. A zombie (our
    // own exited child) still "exists"; check its state too.
    let exists = unsafe { libc::kill(pid, 0) } == 0;
    exists
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
}

pub async fn stop(dir: &Path) -> anyhow::Result<()> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("reading {} (is this a launch directory?)", dir.display()))?;
    let mut stopped = 0;
    for entry in entries {
        let node_dir = entry?.path();
        if !node_dir.join("pid").exists() {
            continue;
        }
        let pid = read_pid(&node_dir)?;
        if alive(pid) {
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while alive(pid) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if alive(pid) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            stopped += 1;
        }
        std::fs::remove_file(node_dir.join("pid"))?;
    }
    println!(
        "Stopped {stopped} node(s); their data stays in {}.",
        dir.display()
    );
    Ok(())
}
