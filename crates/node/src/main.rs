//! metropolis-node: the daemon on every node of a cluster.
//!
//! On its first start it bootstraps a new cluster or registers into an
//! existing one, as its Node Parameters say; afterwards it rejoins from the
//! credentials sealed in its data directory.

mod datadir;
#[cfg(feature = "debug")]
mod debug;
mod logtree;
mod membership;
mod metrics;
mod node_mgmt;
mod params;
mod serve;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use metropolis_curator::{BootstrapRequest, Cluster};
use metropolis_store::{EmbeddedStore, Store};

use crate::datadir::{Credentials, DataDir};
use crate::params::Params;

#[derive(Parser, Debug)]
#[command(
    name = "metropolis-node",
    version,
    about = "The Metropolis node daemon"
)]
struct Args {
    /// Directory for the node's sealed credentials and local state.
    #[arg(long)]
    data_dir: PathBuf,
    /// Node Parameters file (binary NodeParameters); needed on the first start only.
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
}

fn main() -> ExitCode {
    let args = Args::parse();
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
        Ok(serve::Exit::Stopped) => ExitCode::SUCCESS,
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
fn restart() -> ExitCode {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os().skip(1).peekable();
    let mut keep = Vec::new();
    while let Some(a) = args.next() {
        if a == "--params" {
            args.next();
        } else if !a.to_string_lossy().starts_with("--params=") {
            keep.push(a);
        }
    }
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
    let data = DataDir::new(args.data_dir.clone());
    let (creds, store) = if data.is_member() {
        if let Some(p) = &args.params {
            bail!(
                "data directory {} already belongs to a cluster; refusing to use node parameters {} again. \
                 Start without --params to rejoin, or remove the data directory to start over",
                data.root().display(),
                p.display()
            );
        }
        let creds = data.unseal()?;
        let store = if data.has_store() {
            Some(open_store(&data).await?)
        } else {
            None
        };
        tracing::info!(node = %creds.node_id(), "rejoining cluster from sealed credentials");
        (creds, store)
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
            } => {
                let (creds, store) =
                    bootstrap(&data, owner_public_key, configuration, labels, args.address).await?;
                (creds, Some(store))
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
                (creds, None)
            }
        }
    };

    #[cfg(feature = "debug")]
    if let Ok(mut v) = view.lock() {
        v["phase"] = "member".into();
        v["node_id"] = creds.node_id().into();
        v["ca_fingerprint"] = metropolis_identity::fingerprint_sha256(&creds.ca_certificate).into();
        v["runs_curator"] = store.is_some().into();
    }
    let metrics = metrics::Metrics::new()?;
    let cluster = match store {
        Some(store) => Some(Cluster::open(metrics.instrument(store)).await?),
        None => None,
    };
    // Consensus members talk to their own curator; other nodes to the ones
    // they learnt about when they registered.
    let curators = match &cluster {
        Some(_) => vec![SocketAddr::new(args.address, serve::CURATOR_PORT)],
        None => {
            let dir = data
                .directory()?
                .context("this node runs no curator and knows no cluster directory")?;
            membership::directory_endpoints(&dir)
        }
    };
    serve::run(serve::Config {
        address: args.address,
        creds: Arc::new(creds),
        cluster,
        curators,
        heartbeat_interval: args.heartbeat_interval,
        heartbeat_timeout: args.heartbeat_timeout,
        data_dir: args.data_dir.clone(),
        logs,
        metrics,
    })
    .await
}

async fn open_store(data: &DataDir) -> anyhow::Result<Arc<dyn Store>> {
    let store = EmbeddedStore::open(&data.store_path())
        .await
        .with_context(|| format!("opening consensus store {}", data.store_path().display()))?;
    Ok(store)
}

async fn bootstrap(
    data: &DataDir,
    owner_public_key: [u8; 32],
    configuration: metropolis_api::common::ClusterConfiguration,
    labels: Option<metropolis_api::common::NodeLabels>,
    address: IpAddr,
) -> anyhow::Result<(Credentials, Arc<dyn Store>)> {
    let (labels, dropped) = metropolis_curator::labels::sanitize_initial(labels);
    for problem in dropped {
        tracing::warn!(%problem, "dropping invalid label from node parameters");
    }
    let key = metropolis_identity::generate_key();
    data.create()?;
    data.create_store_dir()?;
    let store = open_store(data).await?;
    let out = metropolis_curator::state::bootstrap(
        store.as_ref(),
        BootstrapRequest {
            owner_public_key,
            initial_configuration: Some(configuration),
            labels,
            node_public_key: key.verifying_key().to_bytes(),
            node_address: address.to_string(),
        },
    )
    .await?;
    let creds = Credentials {
        key,
        node_certificate: out.node_certificate,
        ca_certificate: out.ca_certificate,
    };
    data.seal(&creds)?;
    tracing::info!(
        node = %creds.node_id(),
        ca = %metropolis_identity::fingerprint_sha256(&creds.ca_certificate),
        "bootstrapped a new cluster"
    );
    Ok((creds, store))
}
