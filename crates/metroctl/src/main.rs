//! metroctl: the operator's command-line tool for Metropolis clusters.

mod cmd;
mod config;
mod conn;
mod output;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::conn::Ctx;
use crate::output::Format;

#[derive(Parser, Debug)]
#[command(
    name = "metroctl",
    version,
    about = "Manage Metropolis clusters",
    propagate_version = true,
    after_help = UPSTREAM_DIFFERENCES
)]
struct Cli {
    /// Configuration directory (default: $XDG_CONFIG_HOME/metroctl or ~/.config/metroctl).
    #[arg(long, global = true, value_name = "DIR")]
    config: Option<PathBuf>,
    /// Cluster endpoints, IP or IP:PORT, comma-separated (default: those remembered by takeownership).
    #[arg(long, global = true, value_delimiter = ',', value_name = "IP[,IP...]")]
    endpoints: Option<Vec<String>>,
    /// Answer yes to every confirmation prompt (for scripts).
    #[arg(long, short = 'y', global = true)]
    yes: bool,
    /// Trust and pin the cluster CA the first node presents without asking
    /// (as upstream's flag; as insecure as it sounds: for tests).
    #[arg(long, global = true)]
    insecure_accept_and_persist_first_encountered_ca: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate files needed to install nodes.
    #[command(subcommand)]
    Install(InstallCommand),
    /// Become the owner of a freshly bootstrapped cluster (pins its CA on first use);
    /// also `cluster takeownership`.
    Takeownership,
    /// Approve nodes waiting to join (as `node approve`); without IDs, list them.
    Approve { ids: Vec<String> },
    /// Get a certificate for a named identity the owner added (pins the CA on first use).
    Login(cmd::user::LoginArgs),
    /// Named identities and their roles.
    #[command(subcommand)]
    User(cmd::user::UserCommand),
    /// Show the record of mutating calls, newest first (owner only).
    Audit(cmd::audit::AuditArgs),
    /// Cluster-wide commands.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Node commands.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Serve a web page over the cluster on this machine, acting with your
    /// credentials: nodes live, cluster, audit log, node logs; approve, label,
    /// roles.
    Dashboard {
        /// Address to listen on (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Allow a --listen address other than loopback (anyone who reaches it
        /// acts with your credentials).
        #[arg(long)]
        insecure_listen: bool,
    },
    /// Write the pinned CA, your client certificate and its key (PKCS#8) into
    /// DIR, for curl, Prometheus and other TLS clients of the metrics port.
    #[command(subcommand)]
    Credentials(CredentialsCommand),
    /// Print a shell completion script (e.g. `source <(metroctl completion bash)`).
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// Show nodes: ID, state, address, health, roles, TPM, version, heartbeat age, labels.
    Describe {
        /// Only these nodes (`all`: every node).
        ids: Vec<String>,
        /// CEL expression over `node`, e.g. 'node.state == NODE_STATE_UP'.
        #[arg(long, default_value = "")]
        filter: String,
        /// Only these table columns, comma-separated, e.g. 'node id,state,labels'.
        #[arg(long, value_delimiter = ',')]
        columns: Vec<String>,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Keep watching: the table redraws on every change (state, roles,
        /// labels, status, health); json/yaml print one document per change.
        #[arg(short = 'w', long)]
        watch: bool,
    },
    /// Print node IDs, one a line.
    List {
        /// Only these nodes (`all`: every node).
        ids: Vec<String>,
        #[arg(long, default_value = "")]
        filter: String,
    },
    /// Approve nodes waiting to join; without IDs, list the nodes waiting.
    Approve { ids: Vec<String> },
    /// Give nodes a role.
    #[command(subcommand)]
    Add(RoleTarget),
    /// Take a role away from nodes.
    #[command(subcommand)]
    Remove(RoleTarget),
    /// Show a node's logs; -f follows new entries until Ctrl-C.
    Logs {
        id: String,
        #[arg(short = 'f', long)]
        follow: bool,
        /// Log tree DN to read, with its children (default: the whole tree).
        #[arg(long, default_value = "")]
        dn: String,
        /// Only the DN itself, not its children.
        #[arg(short = 'e', long)]
        exact: bool,
        /// One short line per entry: shortened DN, severity, message.
        #[arg(short = 'c', long)]
        concise: bool,
        /// Entries of the backlog: -1 all, 0 none (useful with -f), N the last N.
        #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
        backlog: i64,
        /// Only leveled entries at or above this severity.
        #[arg(long, value_enum)]
        min_severity: Option<cmd::node::Severity>,
    },
    /// Restart a node's daemon as a fresh process (asks unless --yes).
    Reboot {
        id: String,
        /// Ask for a kexec-style restart (same effect for a daemon).
        #[arg(long)]
        kexec: bool,
        /// Boot the binary the node ran before its last update (tried like
        /// an update: kept once HEALTHY), or give up an update on trial.
        #[arg(long)]
        rollback: bool,
        /// Boot into the firmware setup, as upstream's flag (refused: a
        /// daemon has no firmware to boot into).
        #[arg(long, conflicts_with_all = ["kexec", "rollback"])]
        firmware: bool,
    },
    /// Roll a new metropolis-node binary out to nodes: at most
    /// --max-unavailable at a time, consensus members one at a time; each
    /// node must come back HEALTHY on it (or rolls back by itself) before
    /// the next one starts.
    Update {
        /// Only these nodes (default: every UP node --filter selects).
        ids: Vec<String>,
        /// The new metropolis-node binary; metroctl serves it to the nodes
        /// over HTTP while the update runs.
        #[arg(long, value_name = "FILE")]
        image: PathBuf,
        /// How many nodes without the ConsensusMember role may restart at once.
        #[arg(long, default_value_t = 1)]
        max_unavailable: usize,
        /// Leave these nodes alone.
        #[arg(long, value_name = "ID", num_args = 1..)]
        exclude: Vec<String>,
        /// CEL expression over `node` selecting the nodes to update.
        #[arg(long, default_value = "")]
        filter: String,
        #[arg(long, value_enum, default_value_t = cmd::update::Activation::Reboot)]
        activation_mode: cmd::update::Activation,
        /// The address of this machine that the nodes reach (default: the one
        /// it sends from towards the first node).
        #[arg(long, value_name = "IP")]
        serve_address: Option<std::net::IpAddr>,
        /// How long one node may take to come back HEALTHY on the new binary.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Stop a node's daemon; it stays down until started again (asks unless --yes).
    Poweroff { id: String },
    /// Print a node's metrics (Prometheus text format) from one exporter:
    /// core (the node's own, default) or etcd (consensus members of HA clusters).
    Metrics {
        id: String,
        #[arg(default_value = "core")]
        exporter: String,
    },
    /// Ask a node (without roles) to wipe its credentials and data and leave for good.
    Decommission { id: String },
    /// Remove a node from the cluster state; its certificate stops working at once.
    Delete {
        id: String,
        /// Also delete a node that still has roles.
        #[arg(long)]
        bypass_has_roles: bool,
        /// Also delete a node that was not decommissioned.
        #[arg(long)]
        bypass_not_decommissioned: bool,
    },
    /// Set (key=value) and remove (key-) labels of a node, in one atomic change.
    Label {
        id: String,
        #[arg(required = true, value_name = "key=value|key-")]
        changes: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum CredentialsCommand {
    /// Write ca.pem, client.pem and client-key.pem into DIR (mode 0600).
    Export { dir: PathBuf },
}

#[derive(Subcommand, Debug)]
enum RoleTarget {
    /// ROLE: ConsensusMember (cm), KubernetesController (kc) or KubernetesWorker (kw), any case.
    Role {
        #[arg(value_enum, ignore_case = true)]
        role: cmd::node::Role,
        #[arg(required = true)]
        ids: Vec<String>,
        /// ConsensusMember: after the change is accepted, wait until every
        /// node named is a voting member (add) or no member at all (remove),
        /// showing each one's progress (pending, learner, voter).
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigureCommand {
    /// Show the cluster configuration.
    Get {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Change a mutable field: kubernetes.node_labels_to_synchronize=REGEXP[,REGEXP...].
    Set { assignment: String },
}

#[derive(Subcommand, Debug)]
enum InstallCommand {
    /// Write Node Parameters for a node's first start.
    Params(ParamsArgs),
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("mode").args(["bootstrap", "register"]).required(true)))]
struct ParamsArgs {
    /// Parameters that bootstrap a new cluster owned by your owner key (created if missing).
    #[arg(long)]
    bootstrap: bool,
    /// Parameters that register a node into the cluster you own.
    #[arg(long)]
    register: bool,
    /// With --bootstrap: keep cluster state in etcd, run by the consensus
    /// members, so that more members can be added later (high availability).
    /// Without it the cluster stays on the single node's embedded store.
    #[arg(long, requires = "bootstrap")]
    ha: bool,
    /// With --bootstrap: how long node certificates are valid (default 30
    /// days); nodes renew theirs when a third is left. A humantime duration
    /// such as `30days` or `1h`, at least 60s. Changeable later with
    /// `metroctl cluster configure set node_certificate_lifetime=D`.
    #[arg(long, requires = "bootstrap", value_name = "DURATION", value_parser = humantime::parse_duration)]
    node_certificate_lifetime: Option<std::time::Duration>,
    /// With --bootstrap: how long user certificates (owner, named identities)
    /// are valid (default 7 days); metroctl renews them when a third is left.
    #[arg(long, requires = "bootstrap", value_name = "DURATION", value_parser = humantime::parse_duration)]
    user_certificate_lifetime: Option<std::time::Duration>,
    /// Output file.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: PathBuf,
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Show the cluster directory, CA and configuration.
    Info {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Show the curator leader and the consensus store's members (learner or voter) with their health.
    Status {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Become the owner of a freshly bootstrapped cluster (as `metroctl takeownership`).
    Takeownership,
    /// Start a local cluster on loopback addresses, take ownership of it, and show how to go on.
    Launch {
        /// Number of nodes.
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// Directory for the nodes' data, logs and process IDs.
        #[arg(long, default_value = "metropolis-local")]
        dir: PathBuf,
        /// The metropolis-node binary (default: next to metroctl, then $PATH).
        #[arg(long)]
        node_binary: Option<PathBuf>,
        /// High availability: bootstrap on etcd and make three nodes consensus
        /// members (needs --nodes 3 or more and the `etcd` binary on PATH).
        #[arg(long)]
        ha: bool,
    },
    /// Stop the nodes of a local cluster started with `cluster launch`.
    Stop {
        #[arg(long, default_value = "metropolis-local")]
        dir: PathBuf,
    },
    /// Replace the register ticket (when it leaked); the old one stops working at once.
    RegenerateTicket,
    /// Write the whole cluster state, encrypted to the owner's key, to a
    /// file (owner only); `--inspect FILE` shows a backup's header.
    Backup(cmd::backup::BackupArgs),
    /// Read or change the cluster configuration.
    #[command(subcommand)]
    Configure(ConfigureCommand),
}

/// Shown by `metroctl --help`: where habits from upstream's metroctl do not
/// carry over, on purpose.
const UPSTREAM_DIFFERENCES: &str = "\
Differences from upstream metroctl:
  -o/--output selects the output format (table, json, yaml), kubectl-style; it does not
  name a file to write: redirect standard output instead.
  Node Parameters are written with `install params` (no installer images).";

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`metroctl node list | head`), like other
    // command-line tools, instead of panicking in println!.
    // SAFETY: resetting a signal disposition before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("METROCTL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("metroctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("metroctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let ctx = Ctx {
        config: config::ConfigDir::locate(cli.config)?,
        endpoints_flag: cli.endpoints,
        assume_yes: cli.yes,
        accept_first_ca: cli.insecure_accept_and_persist_first_encountered_ca,
    };
    match cli.command {
        Command::Install(InstallCommand::Params(p)) => {
            if p.bootstrap {
                let lifetimes = cmd::install::Lifetimes {
                    node: p.node_certificate_lifetime,
                    user: p.user_certificate_lifetime,
                };
                cmd::install::bootstrap_params(&ctx, &p.output, p.ha, lifetimes)
            } else {
                cmd::install::register_params(&ctx, &p.output).await
            }
        }
        Command::Takeownership | Command::Cluster(ClusterCommand::Takeownership) => {
            cmd::takeownership::run(&ctx).await
        }
        Command::Approve { ids } => cmd::node::approve(&ctx, &ids).await,
        Command::Login(args) => cmd::user::login(&ctx, args).await,
        Command::User(c) => cmd::user::run(&ctx, c).await,
        Command::Audit(args) => cmd::audit::run(&ctx, args).await,
        Command::Cluster(ClusterCommand::Info { format }) => cmd::cluster::info(&ctx, format).await,
        Command::Cluster(ClusterCommand::Status { format }) => {
            cmd::cluster::status(&ctx, format).await
        }
        Command::Cluster(ClusterCommand::Launch {
            nodes,
            dir,
            node_binary,
            ha,
        }) => cmd::launch::launch(&ctx, nodes, &dir, node_binary, ha).await,
        Command::Cluster(ClusterCommand::Stop { dir }) => cmd::launch::stop(&dir).await,
        Command::Cluster(ClusterCommand::RegenerateTicket) => {
            cmd::cluster::regenerate_ticket(&ctx).await
        }
        Command::Cluster(ClusterCommand::Backup(args)) => cmd::backup::run(&ctx, args).await,
        Command::Node(NodeCommand::Describe {
            ids,
            filter,
            columns,
            format,
            watch: true,
        }) => cmd::watch::describe_watch(&ctx, &ids, &filter, &columns, format).await,
        Command::Node(NodeCommand::Describe {
            ids,
            filter,
            columns,
            format,
            watch: false,
        }) => cmd::node::describe(&ctx, &ids, &filter, &columns, format).await,
        Command::Node(NodeCommand::List { ids, filter }) => {
            cmd::node::list(&ctx, &ids, &filter).await
        }
        Command::Node(NodeCommand::Approve { ids }) => cmd::node::approve(&ctx, &ids).await,
        Command::Node(NodeCommand::Label { id, changes }) => {
            cmd::node::label(&ctx, &id, &changes).await
        }
        Command::Node(NodeCommand::Add(RoleTarget::Role { role, ids, wait })) => {
            cmd::node::set_role(&ctx, role, true, &ids, wait).await
        }
        Command::Node(NodeCommand::Remove(RoleTarget::Role { role, ids, wait })) => {
            cmd::node::set_role(&ctx, role, false, &ids, wait).await
        }
        Command::Node(NodeCommand::Decommission { id }) => cmd::node::decommission(&ctx, &id).await,
        Command::Node(NodeCommand::Logs {
            id,
            follow,
            dn,
            exact,
            concise,
            backlog,
            min_severity,
        }) => {
            cmd::node::logs(
                &ctx,
                &id,
                cmd::node::LogsArgs {
                    follow,
                    dn,
                    exact,
                    concise,
                    backlog,
                    min_severity,
                },
            )
            .await
        }
        Command::Node(NodeCommand::Reboot {
            id,
            kexec,
            rollback,
            firmware,
        }) => {
            use metropolis_api::api::reboot_request::Type;
            if firmware {
                anyhow::bail!(
                    "--firmware: metropolis-node is a daemon, not a machine; there is no firmware \
                     setup to boot into (reboot without --firmware restarts the daemon)"
                );
            }
            let kind = if kexec { Type::Kexec } else { Type::Firmware };
            cmd::node::power(&ctx, &id, kind, rollback).await
        }
        Command::Node(NodeCommand::Update {
            ids,
            image,
            max_unavailable,
            exclude,
            filter,
            activation_mode,
            serve_address,
            timeout,
        }) => {
            cmd::update::run(
                &ctx,
                cmd::update::UpdateArgs {
                    ids,
                    image,
                    max_unavailable,
                    exclude,
                    filter,
                    activation: activation_mode,
                    serve_address,
                    timeout,
                },
            )
            .await
        }
        Command::Node(NodeCommand::Metrics { id, exporter }) => {
            cmd::node::metrics(&ctx, &id, &exporter).await
        }
        Command::Node(NodeCommand::Poweroff { id }) => {
            cmd::node::power(
                &ctx,
                &id,
                metropolis_api::api::reboot_request::Type::PowerOff,
                false,
            )
            .await
        }
        Command::Node(NodeCommand::Delete {
            id,
            bypass_has_roles,
            bypass_not_decommissioned,
        }) => cmd::node::delete(&ctx, &id, bypass_has_roles, bypass_not_decommissioned).await,
        Command::Dashboard {
            listen,
            insecure_listen,
        } => cmd::dashboard::run(ctx, listen, insecure_listen).await,
        Command::Credentials(CredentialsCommand::Export { dir }) => {
            cmd::credentials::export(&ctx, &dir).await
        }
        Command::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "metroctl", &mut std::io::stdout());
            Ok(())
        }
        Command::Cluster(ClusterCommand::Configure(ConfigureCommand::Get { format })) => {
            cmd::cluster::configure_get(&ctx, format).await
        }
        Command::Cluster(ClusterCommand::Configure(ConfigureCommand::Set { assignment })) => {
            cmd::cluster::configure_set(&ctx, &assignment).await
        }
    }
}
