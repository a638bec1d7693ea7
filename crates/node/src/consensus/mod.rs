//! The etcd server that consensus members run as a child process.
//!
//! # Directory
//! The caller owns `<data-dir>/etcd` and passes it as `dir` (mode 0700):
//! - `config.pb`: what starting etcd again needs (name, peer address and
//!   port, initial cluster, initial cluster state, cluster token). Written
//!   last and atomically by [`configure`]; its presence is what
//!   [`is_configured`] reports.
//! - `ca.pem`, `peer.pem`, `peer-key.pem`: the consensus CA and this node's
//!   peer certificate and key (PKCS#8, mode 0600), for etcd's peer mTLS:
//!   etcd's peer port accepts certificates of the consensus CA only, which
//!   issues them to consensus members only. `peer.pem` is replaced
//!   atomically when the node renews it ([`replace_peer_certificate`]);
//!   etcd reads it at every new peer handshake.
//! - `ca-key`: the consensus CA's key seed (mode 0600), copied from the
//!   cluster state by [`crl::follow`]: what a member issues itself a
//!   stopgap peer certificate with ([`stopgap_peer_certificate`]) when every
//!   member's had expired.
//! - `peer.crl`: the consensus CA's CRL (former members' certificates),
//!   which etcd reads at every new peer connection; [`crl::follow`] keeps it
//!   current from the cluster state.
//! - `staged`: present while the member is staged ([`PeerConfig::staged`]):
//!   running, but not yet holding the node's cluster state.
//! - `data/`: etcd's `--data-dir`.
//! - `etcd.pid`: the PID of the current etcd process, rewritten on every
//!   (re)start and removed by [`Etcd::stop`].
//! - `client.sock:0`: the client socket (see below).
//!
//! # API
//! - [`configure`]`(dir, &`[`PeerConfig`]`, &key)` once, when the node becomes
//!   a consensus member; [`is_configured`]`(dir)` afterwards.
//! - [`Etcd::start`]`(dir, binary, logs)` on every start of the node; it
//!   returns once etcd accepts connections on [`Etcd::client_socket`], and
//!   keeps etcd running (restarts with backoff) until [`Etcd::stop`].
//! - [`find_binary`] locates etcd (`--etcd-binary` or `PATH`);
//!   `metropolis_curator::consensus::peer_url_on` builds the URLs of
//!   [`PeerConfig::initial_cluster`].
//!
//! etcd's output (zap JSON on stderr) goes into the log tree under
//! `LOG_DN`; the supervisor's own messages (starts, exits, restarts) are
//! tracing events under `root.consensus`.
//!
//! # etcd behaviour this works around
//! - etcd listens on a unix socket only as `unix://client.sock:0` (it wants
//!   a port in the URL), and creates the socket literally named
//!   `client.sock:0` relative to its working directory. So etcd runs in
//!   `dir`, and the socket is `dir/client.sock:0`, whose absolute path must
//!   fit the 107 bytes a unix socket path may have.
//! - Outgoing peer connections come from an address the kernel picks, not
//!   from the peer URL's address, so etcd's check of the client
//!   certificate's SAN against the source IP is turned off
//!   (`--experimental-peer-skip-client-san-verification`); the peer is still
//!   authenticated by its certificate's chain to the cluster CA.
//! - The `--initial-cluster*` flags are passed on every start; etcd ignores
//!   them once `data/member` exists.
//! - etcd reads any `ETCD_*` environment variable as a flag; the child gets
//!   none of them, so the node's environment cannot change its
//!   configuration.
//! - etcd 3.4 cannot restart a member that was killed after creating its WAL
//!   but before writing the first raft records into it (etcd-io/etcd#12578):
//!   it comes back with no voters, never elects a leader and never serves a
//!   client, without a word in its log. The window is easy to hit, since
//!   etcd listens on the client socket before it creates the WAL. Before
//!   every start the supervisor reads the WAL's record headers, and if it
//!   holds nothing but its header records, removes `data/` so that etcd
//!   bootstraps again (see `wal`).
mod config;
pub mod crl;
pub mod staging;
mod supervisor;
#[cfg(test)]
mod testing;
mod wal;

pub(crate) use config::{CA_KEY_FILE, PEER_KEY_FILE};
pub use config::{
    PeerConfig, configure, find_binary, is_configured, is_staged, peer_certificate,
    replace_peer_certificate, stopgap_peer_certificate, unstage,
};
pub use supervisor::Etcd;

/// etcd's `--initial-cluster-token`: only used when a new etcd cluster forms
/// (bootstrap, or a move from the embedded store), with one member.
pub const CLUSTER_TOKEN: &str = "metropolis";
