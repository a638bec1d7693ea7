//! metropolis-node: the daemon on every node of a cluster.
//!
//! On its first start it bootstraps a new cluster or registers into an
//! existing one, as its Node Parameters say; afterwards it rejoins from the
//! credentials sealed in its data directory.

mod consensus;
mod datadir;
#[cfg(feature = "debug")]
mod debug;
mod logtree;
mod membership;
mod metrics;
mod node_mgmt;
mod params;
mod renewal;
mod restore;
mod serve;
mod update;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use metropolis_curator::{BootstrapRequest, Cluster};
use metropolis_identity::CertificateAuthority;
use metropolis_store::{EmbeddedStore, EtcdStore, Store};

use crate::datadir::{Credentials, DataDir};
use crate::params::Params;

#[derive(Parser, Debug)]
#[command(
    name = "metropolis-node",
    version = update::VERSION,
    about = "The Metropolis node daemon"
)]
struct Args {
    /// Directory for the node's sealed credentials and local state.
    #[arg(long)]
    data_dir: PathBuf,
    /// Node Parameters file (binary NodeParameters); needed on the first start
    /// only. Later starts check that they are this cluster's and ignore them.
    #[arg(long)]
    params: Option<PathBuf>,
    /// IP address to serve on; every port of the node binds this address.
    #[arg(long)]
    address: IpAddr,
    /// How often the node sends a heartbeat to the curator.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// After how long without a heartbeat the curator reports a node as timed out.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    heartbeat_timeout: Duration,
    /// TTL of the curator leader's lease: a dead leader is replaced after about this long.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    leader_lease_ttl: Duration,
    /// The etcd server binary consensus members of a high-availability
    /// cluster run (default: `etcd` on PATH).
    #[arg(long)]
    etcd_binary: Option<PathBuf>,
    /// Also serve the metrics port's paths over plain HTTP, without client
    /// certificates, on this loopback address and port (e.g. 127.0.0.1:7841).
    /// Off by default: port 7840 serves them over TLS to cluster certificates.
    #[arg(long, value_name = "LOOPBACK_IP:PORT")]
    metrics_plain_http: Option<SocketAddr>,
    /// How long a newly installed binary has to rejoin the cluster and
    /// become HEALTHY before the node rolls back to the previous one.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    update_trial_timeout: Duration,
    /// Restore a cluster from this backup file (`metroctl cluster backup`)
    /// into the empty --data-dir and become its only consensus member.
    #[arg(
        long,
        value_name = "FILE",
        requires = "owner_key",
        conflicts_with = "params"
    )]
    restore: Option<PathBuf>,
    /// The owner's private key that decrypts the backup (metroctl's
    /// owner-key.pem).
    #[arg(long, value_name = "PEM", requires = "restore")]
    owner_key: Option<PathBuf>,
    /// Close gRPC connections that carry no stream for this long (tests
    /// shorten it; the default is `metropolis_rpc::server::Limits`').
    #[arg(long, hide = true, value_parser = humantime::parse_duration)]
    connection_idle_timeout: Option<Duration>,
    /// HTTP/2 PING interval of every gRPC port, and how long a peer has to
    /// answer before its connection is dropped (tests shorten them; the
    /// defaults are `metropolis_rpc::server::Limits`').
    #[arg(long, hide = true, value_parser = humantime::parse_duration)]
    connection_keepalive_interval: Option<Duration>,
    #[arg(long, hide = true, value_parser = humantime::parse_duration)]
    connection_keepalive_timeout: Option<Duration>,
}

impl Args {
    /// The transport limits of every gRPC port.
    fn limits(&self) -> metropolis_rpc::server::Limits {
        let mut limits = metropolis_rpc::server::Limits::default();
        if let Some(t) = self.connection_idle_timeout {
            limits.idle_timeout = t;
        }
        if let Some(t) = self.connection_keepalive_interval {
            limits.keepalive_interval = t;
        }
        if let Some(t) = self.connection_keepalive_timeout {
            limits.keepalive_timeout = t;
        }
        limits
    }
}

impl Args {
    /// Durations clap accepts but the daemon cannot work with.
    fn check(&self) -> Result<(), String> {
        if self.heartbeat_interval.is_zero() || self.heartbeat_timeout.is_zero() {
            return Err(
                "--heartbeat-interval and --heartbeat-timeout must be longer than zero".into(),
            );
        }
        if let Some(a) = self.metrics_plain_http
            && !a.ip().is_loopback()
        {
            return Err(format!(
                "--metrics-plain-http {a}: plain HTTP has no authentication, so it is only \
                 served on loopback addresses (127.0.0.0/8, ::1)"
            ));
        }
        // etcd leases are whole seconds; a shorter TTL would be rounded up
        // and the leader would renew it in a busy loop.
        if self.leader_lease_ttl < Duration::from_secs(1) {
            return Err(format!(
                "--leader-lease-ttl must be at least 1s (got {}); the default is 3s",
                humantime::format_duration(self.leader_lease_ttl)
            ));
        }
        Ok(())
    }
}

/// See the `jemalloc` feature in Cargo.toml.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its first allocation (`_RJEM_MALLOC_CONF` in
/// the environment still overrides them): a background thread returns
/// freed pages to the system after 1 s, instead of waiting 10 s for the
/// next allocation to do it, and two arenas (the runtime has two workers)
/// fragment less than the default of four per core. Measured with the
/// loadgen's 19,000 nodes (issue #13): a connected node costs ~1 KiB less.
#[cfg(feature = "jemalloc")]
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_CONF: &[u8; 53] = b"background_thread:true,dirty_decay_ms:1000,narenas:2\0";

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.check() {
        eprintln!("metropolis-node: {e}");
        return ExitCode::FAILURE;
    }
    raise_fd_limit();
    // Logs go to stderr and into the log tree that NodeManagement.Logs serves.
    let logs = logtree::LogTree::new();
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let stderr = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
        tracing_subscriber::registry()
            .with(filter)
            .with(stderr)
            .with(logtree::LogTreeLayer::new(logs.clone()))
            .init();
    }
    // A node with update slots: this process supervises the node's slot.
    if let Some(code) = update::start(update::Start {
        data_dir: &args.data_dir,
        address: args.address,
        trial_timeout: args.update_trial_timeout,
    }) {
        return code;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("metropolis-node: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, logs)) {
        // Reconfigured consensus membership is turned into a restart by run().
        Ok(
            serve::Exit::Stopped
            | serve::Exit::Consensus(_)
            | serve::Exit::CuratorReady
            | serve::Exit::MovedToEtcd,
        ) => ExitCode::SUCCESS,
        Ok(serve::Exit::Restart) => {
            drop(runtime);
            restart()
        }
        Err(e) => {
            eprintln!("metropolis-node: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Every node in the cluster keeps a connection to the curator, so the
/// default soft limit of open files (often 1024) caps the cluster size.
/// Raise it to the hard limit the administrator allows.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Replaces this process with a fresh copy of itself (a Reboot): same
/// arguments, except the Node Parameters, which only the first start uses.
/// Listening sockets are close-on-exec, so the new process can bind them.
/// A node run by its update supervisor exits instead, to be started again
/// from whichever slot boots next.
fn restart() -> ExitCode {
    use std::os::unix::process::CommandExt;
    if let Some(code) = update::restart_supervised() {
        return code;
    }
    let keep = update::forwarded_args();
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("metropolis-node: cannot restart: {e}");
            return ExitCode::FAILURE;
        }
    };
    let err = std::process::Command::new(exe).args(keep).exec();
    eprintln!("metropolis-node: cannot restart: {err}");
    ExitCode::FAILURE
}

async fn run(args: Args, logs: Arc<logtree::LogTree>) -> anyhow::Result<serve::Exit> {
    // Damaged or exposed credentials stop the node before any port opens or
    // anything is written.
    let data = DataDir::new(args.data_dir.clone());
    // A restore starts from an empty directory and leaves a member's.
    let restored = match (&args.restore, &args.owner_key) {
        (Some(file), Some(owner_key)) => {
            let r = restore::Restore {
                file,
                owner_key,
                address: args.address,
                etcd_binary: args.etcd_binary.as_deref(),
                logs: logs.clone(),
            };
            Some(restore::restore(&data, r).await?)
        }
        _ => None,
    };
    let sealed = if restored.is_none() && data.is_member() {
        Some(data.unseal()?)
    } else {
        None
    };
    #[cfg(feature = "debug")]
    let view: debug::View = {
        let view = Arc::new(std::sync::Mutex::new(serde_json::json!({
            "address": args.address.to_string(),
            "data_dir": args.data_dir.display().to_string(),
            "phase": "starting",
        })));
        debug::start(args.address, logs.clone(), view.clone()).await?;
        view
    };
    let (creds, held) = if let Some((creds, store)) = restored {
        let held = match store {
            restore::Restored::Embedded(store) => Held::Embedded(store),
            restore::Restored::Etcd { etcd, store } => Held::Etcd { etcd, store },
        };
        (creds, held)
    } else if let Some(creds) = sealed {
        if let Some(p) = &args.params {
            params::check_on_restart(p, &creds.ca_certificate, data.bootstrap_owner()?)?;
        }
        tracing::info!(node = %creds.node_id(), "rejoining cluster from sealed credentials");
        // A move to etcd that a crash interrupted ends here, either way.
        data.settle()?;
        let held = if consensus::is_configured(&data.etcd_dir()) {
            let etcd = start_etcd(&args, &data, &logs).await?;
            match tokio::time::timeout(ETCD_PATIENCE, etcd.connect()).await {
                Ok(store) => Held::Etcd { etcd, store },
                Err(_) => {
                    tracing::info!(
                        "this node's etcd member does not serve yet (a new member serves once it has \
                         caught up and was promoted; a restarted one once its cluster has quorum); \
                         serving as a plain node until it does"
                    );
                    Held::CatchingUp(etcd)
                }
            }
        } else if data.has_store() {
            Held::Embedded(open_store(&data).await?)
        } else {
            Held::Nothing
        };
        (creds, held)
    } else {
        data.check_fresh()?;
        let path = args.params.as_ref().with_context(|| {
            format!(
                "data directory {} holds no cluster credentials; the first start needs --params FILE \
                 (create one with `metroctl install params`)",
                data.root().display()
            )
        })?;
        match params::load(path)? {
            Params::Bootstrap {
                owner_public_key,
                configuration,
                labels,
                high_availability,
            } => {
                let boot = Bootstrap {
                    owner_public_key,
                    configuration,
                    labels,
                    address: args.address,
                };
                bootstrap(&args, &data, &logs, boot, high_availability).await?
            }
            Params::Register {
                directory,
                ticket,
                ca_certificate,
                labels,
            } => {
                let creds =
                    membership::register(&data, &directory, ticket, ca_certificate, labels).await?;
                data.save_directory(&directory)?;
                data.seal(&creds)?;
                (creds, Held::Nothing)
            }
        }
    };

    #[cfg(feature = "debug")]
    if let Ok(mut v) = view.lock() {
        v["phase"] = "member".into();
        v["node_id"] = creds.node_id().into();
        v["ca_fingerprint"] = metropolis_identity::fingerprint_sha256(&creds.ca_certificate).into();
    }
    let metrics = metrics::Metrics::new()?;
    let live = metropolis_identity::LiveCertificate::new(
        creds.node_certificate.clone(),
        creds.key.clone(),
    )
    .context("loading the node certificate")?;
    metrics.watch_certificate(live.clone());
    warn_about_expiry(&live, &creds.ca_certificate);
    let creds = Arc::new(creds);
    let mut held = held;
    loop {
        let mut until_curator = None;
        let mut moved_to_etcd = None;
        let mut staging = None;
        let mut crl_follower = None;
        // The connection that ends the catching-up phase is the one the
        // curator then uses.
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (cluster, etcd) = match held {
            Held::Nothing => (None, None),
            Held::Embedded(store) => {
                let cluster = Cluster::open(metrics.instrument(store)).await?;
                // A second consensus member moves the cluster to etcd, on
                // this node.
                let (host, switched) = consensus::staging::Staging::new(
                    creds.key.clone(),
                    args.address,
                    args.etcd_binary.clone(),
                    logs.clone(),
                    data.clone(),
                );
                cluster.set_etcd_host(host.clone());
                staging = Some(host);
                moved_to_etcd = Some(switched);
                (Some(cluster), None)
            }
            Held::Etcd { etcd, store } => {
                let consensus: Arc<dyn metropolis_store::Consensus> = store.clone();
                crl_follower = Some(tokio::spawn(consensus::crl::follow(
                    store.clone(),
                    data.etcd_dir(),
                )));
                let cluster =
                    Cluster::open_replicated(metrics.instrument(store), consensus, creds.node_id())
                        .await?;
                (Some(cluster), Some(etcd))
            }
            Held::CatchingUp(etcd) => {
                let ready = etcd.connect();
                until_curator = Some(Box::pin(async move {
                    let _ = ready_tx.send(ready.await);
                })
                    as futures::future::BoxFuture<'static, ()>);
                (None, Some(etcd))
            }
        };
        #[cfg(feature = "debug")]
        if let Ok(mut v) = view.lock() {
            v["runs_curator"] = cluster.is_some().into();
        }
        // Consensus members ask their own curator first (it leads, or knows
        // who does); every node then falls back on the cluster directory it
        // saved.
        let mut curators = Vec::new();
        if cluster.is_some() {
            curators.push(SocketAddr::new(args.address, serve::CURATOR_PORT));
        }
        if let Some(dir) = data.directory()? {
            for e in membership::directory_endpoints(&dir) {
                if !curators.contains(&e) {
                    curators.push(e);
                }
            }
        }
        if curators.is_empty() {
            bail!("this node runs no curator and knows no cluster directory");
        }
        let exit = serve::run(serve::Config {
            address: args.address,
            creds: creds.clone(),
            live: live.clone(),
            cluster,
            runs_etcd: etcd.is_some(),
            until_curator,
            moved_to_etcd,
            curators,
            heartbeat_interval: args.heartbeat_interval,
            heartbeat_timeout: args.heartbeat_timeout,
            leader_lease_ttl: args.leader_lease_ttl,
            data_dir: args.data_dir.clone(),
            logs: logs.clone(),
            metrics: metrics.clone(),
            etcd_socket: etcd.as_ref().map(|e| e.client_socket()),
            metrics_plain_http: args.metrics_plain_http,
            limits: args.limits(),
        })
        .await;
        if let Some(follower) = crl_follower {
            follower.abort();
        }
        match (exit, etcd) {
            (Ok(serve::Exit::CuratorReady), Some(etcd)) => {
                tracing::info!("this node's etcd member serves now; starting its curator");
                let store = match ready_rx.await {
                    Ok(store) => store,
                    Err(_) => etcd.connect().await,
                };
                held = Held::Etcd { etcd, store };
            }
            (Ok(serve::Exit::MovedToEtcd), None) => {
                let switched = match &staging {
                    Some(host) => host.take_switched().await,
                    None => None,
                };
                let (etcd, store) = switched
                    .context("the cluster state moved to etcd, but its member is not at hand")?;
                tracing::info!("serving on etcd now, which holds the cluster state");
                data.settle()?;
                held = Held::Etcd { etcd, store };
            }
            (exit, etcd) => {
                if let Some(etcd) = etcd {
                    etcd.stop().await;
                }
                return match exit? {
                    serve::Exit::Consensus(role) => {
                        reconfigure(&args, &data, role)?;
                        Ok(serve::Exit::Restart)
                    }
                    other => Ok(other),
                };
            }
        }
    }
}

/// Says in the log when the node certificate expired (it is renewed with the
/// node key once the node reaches its cluster) and when the cluster CA has
/// less than a year left (it cannot be replaced yet: ARCHITECTURE.md, "CA
/// rotation").
fn warn_about_expiry(live: &metropolis_identity::LiveCertificate, ca_der: &[u8]) {
    let now = time::OffsetDateTime::now_utc();
    let cert = live.certificate();
    if cert.not_after < now {
        tracing::warn!(
            expired_at = %metropolis_identity::rfc3339(cert.not_after),
            "the node certificate expired while the node was down; renewing it with the node key"
        );
    }
    if let Ok(ca) = metropolis_identity::parse_certificate(ca_der)
        && ca.not_after - now < time::Duration::days(365)
    {
        tracing::warn!(
            ca_expires_at = %metropolis_identity::rfc3339(ca.not_after),
            "the cluster CA expires in less than a year; nothing it issued is valid after that"
        );
    }
}

/// The consensus store a node holds, if it is a consensus member.
enum Held {
    Nothing,
    Embedded(Arc<dyn Store>),
    Etcd {
        etcd: consensus::Etcd,
        store: Arc<EtcdStore>,
    },
    /// An etcd member that does not serve clients yet: a learner catching
    /// up, or a member whose cluster has no quorum. The node serves as a
    /// plain node meanwhile (reachable, heartbeating, its logs readable)
    /// and starts its curator once the member serves.
    CatchingUp(consensus::Etcd),
}

/// How long a starting consensus member waits for its etcd member before
/// serving as a plain node until it is ready. A restarted voter of a healthy
/// cluster serves within about a second.
const ETCD_PATIENCE: Duration = Duration::from_secs(2);

/// The node gained or lost the ConsensusMember role: set up (or tear down)
/// its etcd directory; the restart that follows starts the node as what it
/// now is.
fn reconfigure(
    args: &Args,
    data: &DataDir,
    role: Option<metropolis_api::common::node_roles::ConsensusMember>,
) -> anyhow::Result<()> {
    let creds = data.unseal()?;
    // Whatever was there belongs to a membership that has ended: a member
    // admitted again joins with a new identity in etcd and nothing of the
    // old one.
    let dir = data.etcd_dir();
    if let Err(e) = std::fs::remove_dir_all(&dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return Err(e).with_context(|| format!("removing {}", dir.display()));
    }
    if let Some(role) = role {
        let cfg = consensus::PeerConfig {
            name: creds.node_id(),
            address: args.address,
            peer_port: metropolis_curator::consensus::PEER_PORT,
            ca_der: role.ca_certificate,
            peer_cert_der: role.peer_certificate,
            crl_der: role.initial_crl,
            initial_cluster: role.peers.into_iter().map(|p| (p.name, p.url)).collect(),
            new_cluster: false,
            cluster_token: consensus::CLUSTER_TOKEN.into(),
            staged: false,
        };
        consensus::configure(&dir, &cfg, &creds.key)
            .context("setting up this node's etcd member")?;
    }
    Ok(())
}

async fn start_etcd(
    args: &Args,
    data: &DataDir,
    logs: &Arc<logtree::LogTree>,
) -> anyhow::Result<consensus::Etcd> {
    let binary = consensus::find_binary(args.etcd_binary.as_deref())?;
    consensus::Etcd::start(&data.etcd_dir(), &binary, logs.clone()).await
}

async fn open_store(data: &DataDir) -> anyhow::Result<Arc<dyn Store>> {
    let store = EmbeddedStore::open(&data.store_path())
        .await
        .with_context(|| format!("opening consensus store {}", data.store_path().display()))?;
    Ok(store)
}

struct Bootstrap {
    owner_public_key: [u8; 32],
    configuration: metropolis_api::common::ClusterConfiguration,
    labels: Option<metropolis_api::common::NodeLabels>,
    address: IpAddr,
}

/// Creates a new cluster with this node as its only member, on the embedded
/// store or (high availability) on an etcd cluster of one that this node runs.
async fn bootstrap(
    args: &Args,
    data: &DataDir,
    logs: &Arc<logtree::LogTree>,
    boot: Bootstrap,
    high_availability: bool,
) -> anyhow::Result<(Credentials, Held)> {
    let (labels, dropped) = metropolis_curator::labels::sanitize_initial(boot.labels);
    for problem in dropped {
        tracing::warn!(%problem, "dropping invalid label from node parameters");
    }
    let key = metropolis_identity::generate_key();
    let node_id = metropolis_identity::node_id(key.verifying_key().as_bytes());
    let ca = CertificateAuthority::generate().context("generating the cluster CA")?;
    let pki = metropolis_curator::consensus::pki::ConsensusPki::generate()?;
    data.create()?;
    let mut consensus_role = metropolis_api::common::node_roles::ConsensusMember::default();
    let (store, held): (Arc<dyn Store>, _) = if high_availability {
        // etcd needs its peer certificate (and so the CA) before the store
        // exists; find the binary before writing anything.
        consensus::find_binary(args.etcd_binary.as_deref())?;
        let peer_cert = pki
            .issue_peer_certificate(
                key.verifying_key().as_bytes(),
                boot.address,
                // What the configuration sets; bootstrap_with_ca refuses
                // what is out of bounds, before anything is served.
                metropolis_curator::state::Lifetimes::of(&boot.configuration).node,
            )
            .context("issuing this node's etcd peer certificate")?;
        let crl = pki.crl()?;
        let url = metropolis_curator::consensus::peer_url(boot.address);
        let cfg = consensus::PeerConfig {
            name: node_id.clone(),
            address: boot.address,
            peer_port: metropolis_curator::consensus::PEER_PORT,
            ca_der: pki.ca_certificate().to_vec(),
            peer_cert_der: peer_cert.clone(),
            crl_der: crl.clone(),
            initial_cluster: vec![(node_id.clone(), url.clone())],
            new_cluster: true,
            cluster_token: consensus::CLUSTER_TOKEN.into(),
            staged: false,
        };
        consensus::configure(&data.etcd_dir(), &cfg, &key)?;
        consensus_role = metropolis_api::common::node_roles::ConsensusMember {
            ca_certificate: pki.ca_certificate().to_vec(),
            peer_certificate: peer_cert,
            initial_crl: crl,
            peers: vec![metropolis_api::common::node_roles::consensus_member::Peer {
                name: node_id.clone(),
                url,
            }],
        };
        let etcd = start_etcd(args, data, logs).await?;
        let store = etcd.connect().await;
        (store.clone() as Arc<dyn Store>, Held::Etcd { etcd, store })
    } else {
        data.create_store()?;
        let store = open_store(data).await?;
        (store.clone(), Held::Embedded(store))
    };
    let out = metropolis_curator::state::bootstrap_with_ca(
        store.as_ref(),
        BootstrapRequest {
            owner_public_key: boot.owner_public_key,
            initial_configuration: Some(boot.configuration),
            labels,
            node_public_key: key.verifying_key().to_bytes(),
            node_address: boot.address.to_string(),
            consensus_role,
            consensus_pki: Some(pki),
        },
        &ca,
    )
    .await?;
    let creds = Credentials {
        key,
        node_certificate: out.node_certificate,
        ca_certificate: out.ca_certificate,
    };
    data.save_bootstrap_owner(&boot.owner_public_key)?;
    data.seal(&creds)?;
    tracing::info!(
        node = %creds.node_id(),
        ca = %metropolis_identity::fingerprint_sha256(&creds.ca_certificate),
        store = if high_availability { "etcd" } else { "embedded" },
        "bootstrapped a new cluster"
    );
    Ok((creds, held))
}
