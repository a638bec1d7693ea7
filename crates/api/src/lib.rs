//! The Metropolis wire contract as Rust types.
//!
//! Modules mirror the protobuf packages (prost's generated code refers to other
//! packages by relative path, so the nesting must match). Besides the generated
//! messages and tonic services this crate carries two things derived from the
//! same .proto files at build time: the method authorization table
//! ([`authorization::METHODS`]) and the encoded descriptors, used to render
//! messages in the canonical protobuf JSON mapping ([`json`]).

#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

pub mod codec;

pub mod metropolis {
    pub mod proto {
        pub mod ext {
            tonic::include_proto!("metropolis.proto.ext");
        }
        pub mod common {
            tonic::include_proto!("metropolis.proto.common");
        }
        pub mod api {
            tonic::include_proto!("metropolis.proto.api");
        }
        pub mod admin {
            tonic::include_proto!("metropolis.proto.admin");
        }
        pub mod storage {
            tonic::include_proto!("metropolis.proto.storage");
        }
    }
    pub mod node {
        pub mod core {
            pub mod curator {
                pub mod proto {
                    pub mod api {
                        tonic::include_proto!("metropolis.node.core.curator.proto.api");
                    }
                }
            }
        }
    }
}

pub mod osbase {
    pub mod logtree {
        pub mod proto {
            tonic::include_proto!("osbase.logtree.proto");
        }
    }
    pub mod net {
        pub mod proto {
            tonic::include_proto!("osbase.net.proto");
        }
    }
}

pub mod version {
    pub mod spec {
        tonic::include_proto!("version.spec");
    }
}

// Short names for the packages used everywhere.
pub use metropolis::node::core::curator::proto::api as curator;
pub use metropolis::proto::admin;
pub use metropolis::proto::api;
pub use metropolis::proto::common;
pub use metropolis::proto::ext;
/// The curator's stored records (package `metropolis.proto.storage`).
pub use metropolis::proto::storage as private;

pub mod authorization;
pub mod json;
pub mod quote;
pub use quote::quote;
#[cfg(feature = "testing")]
pub mod testing;

/// Limits of UpdateNode's project-owned fields: the node enforces them,
/// metroctl checks them first to say so before anything is sent.
pub mod update {
    /// The largest node binary a node downloads (a release build is about
    /// 30 MiB, a debug build about 70 MiB).
    pub const MAX_BINARY_BYTES: u64 = 512 * 1024 * 1024;
}
