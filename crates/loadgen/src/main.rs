//! metropolis-loadgen: how one curator copes with thousands of nodes.
//!
//! It starts one real `metropolis-node` that bootstraps a fresh cluster on a
//! loopback address, and plays every other node of the cluster itself, over
//! the same gRPC/mTLS API real nodes use:
//!
//! 1. **Registration**: each simulated node generates an Ed25519 key,
//!    connects with a self-signed certificate over it, calls
//!    `Curator.RegisterNode` with the register ticket, is approved by the
//!    owner (`Management.ApproveNode`, on one shared owner connection) and
//!    calls `Curator.CommitNode` to get its node certificate. Reports
//!    throughput and latency percentiles of the full cycle and its steps.
//! 2. **Heartbeats**: each node opens its own TLS connection with its node
//!    certificate (identity comes from the certificate, so nodes cannot
//!    share connections), calls `JoinNode` and `UpdateNodeStatus` once, and
//!    keeps a `Curator.Heartbeat` stream beating every
//!    `--heartbeat-interval`, starting at a random point in the first
//!    interval so the load is smooth.
//! 3. **Reads**, while the heartbeats run and once the curator can know
//!    every node's health: `Management.GetNodes` without a filter and with
//!    `node.state == NODE_STATE_UP` (median and p90 of several calls, stream
//!    read to the end), and the health of every simulated node.
//! 4. **Memory** of the node process (VmRSS) after bootstrap, after the
//!    registrations and with all heartbeat connections open, per node.
//!
//! With `--store etcd` the node bootstraps a high-availability cluster
//! (`ClusterBootstrap.high_availability`): it runs etcd as a child process
//! and keeps cluster state there.
//!
//! On either store, a "Store" section (`store`) puts the registrations'
//! store transactions next to the same store's raw rate: the revision just
//! before and after the registrations (from the node's etcd, or from the
//! node's `/metrics/core` over plain HTTP on the embedded store) gives the
//! write transactions per registration; right after, as many
//! compare-and-swap transactions as they made (at least 2,000) run with
//! `--concurrency` writers, each on its own key with a node record's bytes,
//! on the node's etcd or on an embedded store the loadgen opens in the run's
//! directory (same code, same disk).
//! The share of the raw rate the registrations reached is reported (target:
//! at least 50%), and with etcd also etcd's CPU and its own log lines by
//! level (they go to the node's log tree, read through
//! `NodeManagement.Logs`, not to the node's stderr).
//!
//! The node's memory figures are then the node process alone; etcd's CPU
//! and memory are reported separately.
//!
//! It prints a plain-text report (stdout; progress and logs go to stderr),
//! stops the node with SIGTERM and removes its data, and exits non-zero if
//! anything failed: an error in any call, or the node dying. The targets in
//! the report (all nodes HEALTHY, filtered GetNodes under 100 ms and at most
//! 1.5x unfiltered, curator memory under 4 KiB per node) are informational.
//!
//! # Running
//!
//! Build it together with the node, so that the default `--node-binary`
//! (`metropolis-node` next to this executable) exists:
//!
//! ```text
//! cargo build --release -p metropolis-loadgen -p metropolis-node
//! target/release/metropolis-loadgen --nodes 200 --duration 10s   # quick check
//! target/release/metropolis-loadgen                               # 10,000 nodes, 30 s
//! target/release/metropolis-loadgen --store etcd --nodes 2000 --duration 10s
//! ```
//!
//! `--store etcd` needs `etcd` (3.4 or later) on PATH, and the etcd peer
//! port 7834 on `--address` free as well. etcd's client socket lives in
//! the temporary directory, whose path must stay under the 107 bytes a unix
//! socket path may have.
//!
//! The node runs on `--address` (127.0.0.2 by default; its ports 7835 and
//! 7841, where it serves plain-HTTP metrics to the loadgen, must be
//! free) and keeps its data in a temporary directory (`TMPDIR` decides
//! where; the store fsyncs every commit, so the disk under it matters).
//! Each simulated node holds one connection, so the loadgen raises its
//! soft open-file limit to the hard limit, which must be above `--nodes`.
//! The node does not inherit the raised limit: it is started first, with the
//! limits of the shell, as a real deployment would start it.
//!
//! Other flags: `--concurrency` (registrations and connection setups in
//! flight), `--heartbeat-timeout` (passed to the node), `--duration` (how long
//! the heartbeats run once all streams are open), `--get-nodes-repeats`,
//! `--node-log` (the node's `RUST_LOG`), `--keep` (keep the data directory
//! and the node's log), `--store` (`embedded`, the default, or `etcd`),
//! `--summary-json FILE` (the key figures as JSON: `nodes`, `healthy_min`,
//! `bytes_per_connected_node`, `bytes_per_node_state`, `registrations_per_s`,
//! `store_txns_per_registration`, `raw_store_txns_per_s`, `store_ratio`,
//! `heartbeats_per_s`, `heartbeat_rtt_p99_ms`, `get_nodes_ms`), `--backup
//! FILE` (a `ClusterAdmin.Backup` after GetNodes, under the heartbeats: its
//! size and time are in the report's notes).
//! `RUST_LOG` sets the loadgen's own log level.

mod backup;
mod cluster;
mod etcd;
mod getnodes;
mod heartbeat;
mod node;
mod progress;
mod register;
mod report;
mod stats;
mod store;

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use metropolis_api::api::management_client::ManagementClient;

use crate::node::NodeProcess;
use crate::progress::Progress;
use crate::report::Report;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "metropolis-loadgen",
    version,
    about = "Starts one metropolis-node and simulates thousands of nodes registering and heartbeating against its curator"
)]
struct Args {
    /// The metropolis-node binary to start [default: metropolis-node next to this executable].
    #[arg(long)]
    node_binary: Option<PathBuf>,
    /// Loopback address for the node; its port 7835 must be free.
    #[arg(long, default_value = "127.0.0.2")]
    address: IpAddr,
    /// How many nodes to simulate.
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    /// Registrations (and later connection setups) in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// How often each simulated node sends a heartbeat.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// Passed to the node: after how long without a heartbeat a node is reported as timed out.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    heartbeat_timeout: Duration,
    /// Passed to the node: its curator's leader lease; the node's own
    /// default. (Renewals run on the election's own thread, so thousands of
    /// handshakes queued on the node's runtime no longer make the lease
    /// expire and cut every heartbeat stream.)
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    leader_lease_ttl: Duration,
    /// How long the heartbeats run once every node's stream is open.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// How many times each GetNodes variant is timed.
    #[arg(long, default_value_t = 10)]
    get_nodes_repeats: usize,
    /// RUST_LOG for the node process.
    #[arg(long, default_value = "info")]
    node_log: String,
    /// Keep the temporary directory (node data and log) instead of removing it.
    #[arg(long)]
    keep: bool,
    /// The node's store: its embedded one, or an etcd it runs as a child
    /// (high-availability bootstrap; `etcd` must be on PATH).
    #[arg(long, value_enum, default_value_t = StoreKind::Embedded)]
    store: StoreKind,
    /// Also write the run's key figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    summary_json: Option<PathBuf>,
    /// After GetNodes, while the nodes heartbeat: take a backup of the
    /// cluster (`ClusterAdmin.Backup`) into FILE and report its size and
    /// time.
    #[arg(long, value_name = "FILE")]
    backup: Option<PathBuf>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Embedded,
    Etcd,
}

impl StoreKind {
    fn describe(self) -> &'static str {
        match self {
            StoreKind::Embedded => "embedded (redb)",
            StoreKind::Etcd => "etcd (high-availability bootstrap, etcd as the node's child)",
        }
    }
}

impl Args {
    fn check(&self) -> anyhow::Result<()> {
        if self.nodes == 0 {
            bail!("--nodes must be at least 1");
        }
        if self.concurrency == 0 {
            bail!("--concurrency must be at least 1");
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_timeout.is_zero() {
            bail!("--heartbeat-interval and --heartbeat-timeout must be more than zero");
        }
        if self.get_nodes_repeats == 0 {
            bail!("--get-nodes-repeats must be at least 1");
        }
        // Everything this tool sends goes to the node it started; a routable
        // address would put thousands of connections on a real network.
        if !self.address.is_loopback() {
            bail!(
                "--address {} is not a loopback address; use one in 127.0.0.0/8",
                self.address
            );
        }
        Ok(())
    }
}

/// File descriptors the loadgen needs besides one per simulated node.
const FD_HEADROOM: node::Rlim = 256;
/// Below this many nodes, per-node memory figures mean little.
const SMALL_RUN: usize = 2_000;
/// How long the node may take to start serving.
const STARTUP_LIMIT: Duration = Duration::from_secs(30);
/// How long to wait for streams and the node to close after the stop.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Slack on top of the heartbeat timeout before health is read: the
/// curator's clock starts a little after the process does.
const HEALTH_SLACK: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    let args = Args::parse();
    let progress = Progress::new();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(progress.log_writer())
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = args.check() {
        eprintln!("metropolis-loadgen: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("metropolis-loadgen: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let summary_json = args.summary_json.clone();
    match runtime.block_on(run(args, progress)) {
        Ok(report) => {
            print!("{}", report.render());
            if let Some(path) = summary_json {
                let text = format!("{:#}\n", report.summary());
                if let Err(e) = std::fs::write(&path, text) {
                    eprintln!(
                        "metropolis-loadgen: cannot write the summary to {}: {e}",
                        path.display()
                    );
                    return ExitCode::FAILURE;
                }
            }
            if report.failed() {
                // The report has the details; one line each is enough here.
                let summary: Vec<&str> = report
                    .failures
                    .iter()
                    .map(|f| f.lines().next().unwrap_or_default())
                    .collect();
                eprintln!("metropolis-loadgen: the run failed: {}", summary.join("; "));
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("metropolis-loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Sets up, runs the phases, and always stops the node and cleans up; an
/// error here means no report could be made at all.
async fn run(args: Args, progress: Progress) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut report = Report {
        command_line: stats::shell_join(std::env::args()),
        nodes: args.nodes,
        concurrency: args.concurrency,
        heartbeat_interval: args.heartbeat_interval,
        heartbeat_timeout: args.heartbeat_timeout,
        duration: args.duration,
        store: args.store.describe(),
        ..Default::default()
    };
    // Fail before spending minutes on registrations if the heartbeat phase
    // could never open its connections.
    let needed_fds = args.nodes as node::Rlim + FD_HEADROOM;
    node::check_nofile(needed_fds)?;
    node::check_port_free(args.address, node::CURATOR_PORT)?;
    node::check_port_free(args.address, node::PLAIN_METRICS_PORT)?;
    if args.store == StoreKind::Etcd {
        node::check_port_free(args.address, node::ETCD_PEER_PORT)?;
    }
    let binary = match &args.node_binary {
        Some(p) => p.clone(),
        None => node::default_binary()?,
    };

    let dir = tempfile::Builder::new()
        .prefix("metropolis-loadgen-")
        .tempdir()
        .context("creating a temporary directory for the node")?;
    report.data_dir = dir.path().display().to_string();
    let owner = metropolis_identity::generate_key();
    let mut node = NodeProcess::spawn(node::Spawn {
        binary: &binary,
        dir: dir.path(),
        address: args.address,
        owner: &owner,
        heartbeat_timeout: args.heartbeat_timeout,
        leader_lease_ttl: args.leader_lease_ttl,
        log_level: &args.node_log,
        high_availability: args.store == StoreKind::Etcd,
    })?;
    report.node_binary = node.binary.display().to_string();
    report.node_addr = node.addr.to_string();
    report.node_pid = node.pid;
    tracing::info!(pid = node.pid, addr = %node.addr, dir = %dir.path().display(), "started the node");

    let outcome = tokio::select! {
        r = phases(&args, dir.path(), &mut node, &owner, &mut report, &progress) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    let phases_failed = outcome.is_err();
    if let Err(e) = outcome {
        report.failures.push(format!("{e:#}"));
    }

    report.memory.peak = node.peak_rss().ok();
    report.loadgen_cpu = node::own_cpu_time().ok();
    match node.stop(STOP_GRACE).await {
        Ok(node::Stopped::Terminated(status)) if status.success() => {
            report.node_exit = Some("exited cleanly after SIGTERM".into());
        }
        Ok(node::Stopped::Terminated(status)) => {
            report.node_exit = Some(format!("exited with {status} after SIGTERM"));
            report.failures.push(format!(
                "the node exited with {status} when asked to stop; last lines of its log:\n{}",
                node.log_tail(20)
            ));
        }
        Ok(node::Stopped::AlreadyExited(status)) => {
            report.node_exit = Some(format!("had already exited ({status})"));
            // A death during the phases is already the failure they report.
            if !phases_failed {
                report.failures.push(format!(
                    "the node exited ({status}) before it was asked to stop; last lines of its log:\n{}",
                    node.log_tail(20)
                ));
            }
        }
        Ok(node::Stopped::Killed) => {
            report.node_exit = Some(format!(
                "ignored SIGTERM for {} and was killed",
                human(STOP_GRACE)
            ));
            report.failures.push(format!(
                "the node did not exit within {} of SIGTERM",
                human(STOP_GRACE)
            ));
        }
        Err(e) => report.failures.push(format!("stopping the node: {e:#}")),
    }
    report.wall = started.elapsed();
    if args.keep {
        // Its path is already in the report.
        let _ = dir.keep();
        report.kept = true;
    }
    Ok(report)
}

async fn phases(
    args: &Args,
    dir: &std::path::Path,
    node: &mut NodeProcess,
    owner_key: &metropolis_identity::SigningKey,
    r: &mut Report,
    progress: &Progress,
) -> anyhow::Result<()> {
    let ca = Arc::new(cluster::wait_serving(node, STARTUP_LIMIT).await?);
    r.node_ready_after = Some(node.uptime());
    let owner_cert = cluster::escrow_owner(node.addr, &ca, owner_key).await?;
    let owner_channel = cluster::channel(node.addr, &ca, (owner_cert.clone(), owner_key.clone()))
        .await
        .context("connecting as the owner")?;
    let mut owner = ManagementClient::new(owner_channel.clone());
    let ticket = cluster::register_ticket(&mut owner).await?;
    r.memory.baseline = Some(node.rss()?);

    tracing::info!(
        nodes = args.nodes,
        concurrency = args.concurrency,
        "registering"
    );
    let store_before = store::before_registration(args.store, node).await?;
    let cpu = node.cpu_time()?;
    let mut reg = register::run(
        register::Setup {
            addr: node.addr,
            ca: ca.clone(),
            ticket: Arc::new(ticket),
            owner: owner.clone(),
        },
        args.nodes,
        args.concurrency,
        progress,
    )
    .await;
    node.check_alive()?;
    let node_cpu = node.cpu_time().ok().map(|c| c.saturating_sub(cpu));
    r.memory.after_registration = Some(node.rss()?);
    if args.nodes < SMALL_RUN {
        r.notes.push(format!(
            "with fewer than {SMALL_RUN} nodes the per-node memory figures are dominated by \
             one-off allocations (allocator arenas, runtime and store caches) and overstate \
             the cost of a node"
        ));
    }
    let admitted = std::mem::take(&mut reg.admitted);
    if reg.errors.total() > 0 {
        r.failures.push(format!(
            "{} of {} registrations failed",
            reg.errors.total(),
            args.nodes
        ));
    }
    r.registration = Some(report::Registration {
        admitted: admitted.len(),
        errors: reg.errors,
        wall: reg.wall,
        cycle: reg.cycle,
        connect: reg.connect,
        register: reg.register,
        approve: reg.approve,
        commit: reg.commit,
        node_cpu,
    });
    let wall = r.registration.as_ref().map_or(Duration::ZERO, |g| g.wall);
    let raw = store::RawSetup {
        concurrency: args.concurrency,
        dir,
    };
    store::after_registration(raw, node, store_before, &admitted, wall, r, progress).await;
    if admitted.is_empty() {
        bail!("no simulated node was admitted; nothing left to heartbeat");
    }
    let simulated: HashSet<String> = admitted.iter().map(|a| a.id.clone()).collect();

    let needed_fds = admitted.len() as node::Rlim + FD_HEADROOM;
    r.loadgen_nofile = Some(node::raise_nofile(needed_fds)?);
    r.node_nofile = node.nofile_limit().ok();
    if let Some((soft, _)) = &r.node_nofile
        && let Ok(soft) = soft.parse::<node::Rlim>()
        && soft < needed_fds
    {
        r.notes.push(format!(
            "the node's soft RLIMIT_NOFILE is {soft}, below the {needed_fds} descriptors \
             {} heartbeat connections need: expect accept failures in the node",
            admitted.len()
        ));
    }

    tracing::info!(nodes = admitted.len(), "opening heartbeat connections");
    let cpu = node.cpu_time()?;
    let attempted = admitted.len();
    let connected = heartbeat::connect_all(
        node.addr,
        ca.clone(),
        admitted,
        args.concurrency,
        args.heartbeat_interval,
        progress,
    )
    .await;
    node.check_alive()?;
    let fleet = connected.fleet;
    let opened = fleet.streams();
    if connected.errors.total() > 0 {
        r.failures.push(format!(
            "{} of {attempted} heartbeat connections failed to open",
            connected.errors.total()
        ));
    }
    r.connections = Some(report::Connections {
        attempted,
        opened,
        errors: connected.errors,
        connect_retries: connected.connect_retries,
        wall: connected.wall,
        total: connected.total,
        connect: connected.connect,
        join: connected.join,
        status: connected.status,
        open: connected.open,
        node_cpu: node.cpu_time().ok().map(|c| c.saturating_sub(cpu)),
    });

    // The curator reports UNKNOWN for its first heartbeat timeout, and a
    // node that has not beaten yet as timed out: read health only once both
    // are past.
    let window_start = Instant::now();
    let counters = fleet.counters.clone();
    let wait_limit = args.heartbeat_interval + Duration::from_secs(10);
    tracing::info!(streams = opened, "waiting for every node's first heartbeat");
    loop {
        node.check_alive()?;
        let settled =
            counters.beating.load(Ordering::Relaxed) + counters.failed.load(Ordering::Relaxed);
        let ready =
            settled >= opened as u64 && node.uptime() > args.heartbeat_timeout + HEALTH_SLACK;
        if ready {
            break;
        }
        if window_start.elapsed() > wait_limit {
            r.notes.push(format!(
                "only {} of {opened} nodes had a heartbeat acknowledged {} after all streams \
                 were open; measuring anyway",
                counters.beating.load(Ordering::Relaxed),
                human(wait_limit)
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first_beats_after = window_start.elapsed();
    r.memory.during_heartbeats = Some(node.rss()?);
    r.node_fds_during_heartbeats = node.open_fds().ok();
    r.node_threads = node.threads().ok();

    tracing::info!(repeats = args.get_nodes_repeats, "timing GetNodes");
    match getnodes::measure(&mut owner, args.get_nodes_repeats, &simulated).await {
        Ok(t) => r.get_nodes = Some(t),
        Err(e) => r.failures.push(format!("{e:#}")),
    }
    match getnodes::health(&mut owner, &simulated, node.started).await {
        Ok(h) => {
            if h.missing > 0 {
                r.failures.push(format!(
                    "GetNodes did not return {} of the admitted nodes",
                    h.missing
                ));
            }
            r.health = Some(h);
        }
        Err(e) => r.failures.push(format!("{e:#}")),
    }
    r.memory.after_get_nodes = node.rss().ok();
    if let Some(file) = &args.backup {
        tracing::info!(file = %file.display(), "taking a backup");
        let mib = |b: anyhow::Result<u64>| {
            b.map(|b| format!("{} MiB", b >> 20))
                .unwrap_or_else(|_| "?".into())
        };
        let rss_before = mib(node.rss());
        match backup::take(owner_channel.clone(), file).await {
            Ok(b) => r.notes.push(format!(
                "backup: {} nodes, {} keys, {} bytes of keys and values, {} bytes encrypted in {}, in {:.2}s; node RSS {rss_before} before, {} after, peak {}",
                b.nodes,
                b.keys,
                b.state_bytes,
                b.file_bytes,
                file.display(),
                b.time.as_secs_f64(),
                mib(node.rss()),
                mib(node.peak_rss())
            )),
            Err(e) => r.failures.push(format!("backup: {e:#}")),
        }
    }
    if args.heartbeat_interval >= args.heartbeat_timeout {
        r.notes.push(format!(
            "the heartbeat interval ({}) is not shorter than the timeout ({}): a node whose next \
             beat is due, or in flight, when GetNodes reads health is reported HEARTBEAT_TIMEOUT, \
             so a few such nodes per read are expected",
            human(args.heartbeat_interval),
            human(args.heartbeat_timeout)
        ));
    }

    // The rest of the window has nothing but heartbeats: the steady-state
    // cost of N nodes.
    let steady_start = Instant::now();
    let node_cpu = node.cpu_time().ok();
    let own_cpu = node::own_cpu_time().ok();
    let acked = counters.acked.load(Ordering::Relaxed);
    let window_end = window_start + args.duration;
    if steady_start >= window_end {
        r.notes.push(format!(
            "the first-heartbeat wait and the GetNodes calls took {}, longer than --duration {}; \
             the heartbeats ran that long instead",
            human(steady_start - window_start),
            human(args.duration)
        ));
    }
    while Instant::now() < window_end {
        node.check_alive()?;
        let left = window_end.saturating_duration_since(Instant::now());
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
    }
    let steady_len = steady_start.elapsed();
    let steady = (steady_len >= Duration::from_secs(1)).then(|| report::Steady {
        length: steady_len,
        acked: counters.acked.load(Ordering::Relaxed) - acked,
        node_cpu: node_cpu.and_then(|c| Some(node.cpu_time().ok()?.saturating_sub(c))),
        loadgen_cpu: own_cpu.and_then(|c| Some(node::own_cpu_time().ok()?.saturating_sub(c))),
    });
    r.loadgen_rss = node::own_rss().ok();
    node.check_alive()?;

    tracing::info!("stopping the heartbeats");
    let window = window_start.elapsed();
    let stopped = fleet.stop(STOP_GRACE).await;
    if stopped.errors.total() > 0 {
        r.failures.push(format!(
            "{} heartbeat streams failed",
            stopped.errors.total()
        ));
    }
    if stopped.unclosed > 0 {
        r.failures.push(format!(
            "{} heartbeat streams were still open {} after the stop",
            stopped.unclosed,
            human(STOP_GRACE)
        ));
    }
    if stopped.sent != stopped.acked {
        r.failures.push(format!(
            "{} of {} heartbeats were never acknowledged",
            stopped.sent.saturating_sub(stopped.acked),
            stopped.sent
        ));
    }
    let mut round_trips = report::RoundTrips::default();
    for &(sent, rtt) in &stopped.round_trips {
        round_trips.all.push(rtt);
        if sent < window_start {
            round_trips.connecting.push(rtt);
        } else if sent < steady_start {
            round_trips.measuring.push(rtt);
        } else {
            round_trips.steady.push(rtt);
        }
    }
    r.heartbeats = Some(report::Heartbeats {
        window,
        first_beats_after,
        sent: stopped.sent,
        acked: stopped.acked,
        errors: stopped.errors,
        round_trips,
        unclosed: stopped.unclosed,
        steady,
    });
    drop(owner);
    node.check_alive()?;
    if let Some(e) = r.store_backend.as_mut().filter(|e| e.etcd_socket.is_some()) {
        let addr = SocketAddr::new(args.address, node::NODE_MGMT_PORT);
        match etcd::log(addr, &ca, (owner_cert, owner_key.clone())).await {
            Ok(log) => e.log = Some(log),
            // Only a look at etcd's side; the run's figures stand without it.
            Err(e) => r
                .notes
                .push(format!("could not read etcd's log from the node: {e:#}")),
        }
    }
    Ok(())
}

fn human(d: Duration) -> String {
    stats::fmt_duration(d)
}
