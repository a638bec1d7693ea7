//! The curator: the cluster's brain.
//!
//! It keeps cluster state (CA, owner, configuration, register ticket, nodes) in
//! the consensus store through [`metropolis_store::Store`] only, and serves the
//! cluster-wide gRPC services on top of it. Everything that decides cluster
//! state lives in [`state::Cluster`]; the service modules translate between
//! the wire and that API and hold no state of their own.

pub mod aaa;
pub mod admin;
pub mod audit;
pub mod authz;
pub mod backup;
pub mod consensus;
pub mod dns;
pub mod error;
pub mod filter;
pub mod heartbeat;
pub mod identities;
pub mod labels;
pub mod leader;
pub mod local;
pub mod management;
pub mod node_watch;
pub mod nodes;
pub mod state;
pub mod watch;

pub use error::CuratorError;
pub use state::{BootstrapRequest, Bootstrapped, Cluster};
