//! gRPC plumbing shared by every server and client in the project.
//!
//! - [`server`]: the one accept loop: TCP → TLS handshake → tonic.
//! - [`auth`]: the one authentication and authorization layer in front of every
//!   service, driven by the method table generated from the .proto options.
//! - [`client`]: TLS channels to nodes, addressed by IP and verified by CA and
//!   node certificate rather than hostname.

pub mod auth;
pub mod client;
pub mod observe;
pub mod server;

pub use auth::{AuthLayer, Authorizer, Caller, Permissions, Principal};
