//! Node Parameters: how a node learns, on its first start, which cluster to
//! bootstrap or join. Everything is validated here, before the node writes a
//! single byte to its data directory.

use std::path::Path;

use metropolis_api::api::{NodeParameters, node_parameters};
use metropolis_api::common::{ClusterConfiguration, ClusterDirectory, NodeLabels};
use prost::Message;

/// Validated parameters.
#[derive(Debug)]
pub enum Params {
    Bootstrap {
        owner_public_key: [u8; 32],
        configuration: ClusterConfiguration,
        labels: Option<NodeLabels>,
        /// Keep cluster state in etcd (run by this node) rather than the
        /// embedded store, so that more consensus members can join.
        high_availability: bool,
    },
    Register {
        directory: ClusterDirectory,
        ticket: Vec<u8>,
        ca_certificate: Vec<u8>,
        labels: Option<NodeLabels>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    #[error("cannot read node parameters {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a binary NodeParameters message: {source}")]
    Decode {
        path: String,
        source: prost::DecodeError,
    },
    #[error("{path}: node parameters set neither cluster_bootstrap nor cluster_register")]
    NoCluster { path: String },
    #[error("{path}: {problem}")]
    Invalid { path: String, problem: String },
    #[error(
        "{path} is larger than {MAX_PARAMS_BYTES} bytes; node parameters are a few KiB \
         (made by `metroctl install params`): is this the right file?"
    )]
    TooLarge { path: String },
}

/// The largest Node Parameters file read. Real ones are a few KiB (a CA
/// certificate, a ticket, a directory, labels).
pub const MAX_PARAMS_BYTES: u64 = 1024 * 1024;

pub fn load(path: &Path) -> Result<Params, ParamsError> {
    let p = path.display().to_string();
    let read_err = |source| ParamsError::Read {
        path: p.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    if file.metadata().map_err(read_err)?.len() > MAX_PARAMS_BYTES {
        return Err(ParamsError::TooLarge { path: p.clone() });
    }
    // The size can change after the check (or lie: devices, pipes): read
    // at most one byte more than the limit.
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, MAX_PARAMS_BYTES + 1),
        &mut bytes,
    )
    .map_err(read_err)?;
    if bytes.len() as u64 > MAX_PARAMS_BYTES {
        return Err(ParamsError::TooLarge { path: p.clone() });
    }
    parse(&p, &bytes)
}

/// Validates the bytes of a Node Parameters file; `p` names it in errors.
pub fn parse(p: &str, bytes: &[u8]) -> Result<Params, ParamsError> {
    let p = p.to_string();
    let msg = NodeParameters::decode(bytes).map_err(|source| ParamsError::Decode {
        path: p.clone(),
        source,
    })?;
    if msg.network_config.is_some() {
        tracing::warn!(
            path = %p,
            "node parameters carry network_config; this implementation does not configure interfaces and ignores it (use --address)"
        );
    }
    let invalid = |problem: String| ParamsError::Invalid {
        path: p.clone(),
        problem,
    };
    match msg.cluster {
        None => Err(ParamsError::NoCluster { path: p }),
        Some(node_parameters::Cluster::ClusterBootstrap(b)) => {
            let owner_public_key: [u8; 32] = b.owner_public_key.as_slice().try_into().map_err(|_| {
                invalid(format!(
                    "cluster_bootstrap.owner_public_key must be a 32-byte Ed25519 public key, got {} bytes",
                    b.owner_public_key.len()
                ))
            })?;
            ed25519_check(&owner_public_key)
                .map_err(|e| invalid(format!("cluster_bootstrap.owner_public_key: {e}")))?;
            let configuration =
                metropolis_curator::state::initial_configuration(b.initial_cluster_configuration)
                    .map_err(|e| {
                    invalid(format!(
                        "cluster_bootstrap.initial_cluster_configuration: {e}"
                    ))
                })?;
            Ok(Params::Bootstrap {
                owner_public_key,
                configuration,
                labels: b.labels,
                high_availability: b.high_availability,
            })
        }
        Some(node_parameters::Cluster::ClusterRegister(r)) => {
            let directory = r.cluster_directory.unwrap_or_default();
            if !directory.nodes.iter().any(|n| !n.addresses.is_empty()) {
                return Err(invalid(
                    "cluster_register.cluster_directory lists no node addresses".into(),
                ));
            }
            if r.register_ticket.is_empty() {
                return Err(invalid("cluster_register.register_ticket is empty".into()));
            }
            metropolis_identity::parse_certificate(&r.ca_certificate)
                .map_err(|e| invalid(format!("cluster_register.ca_certificate: {e}")))?;
            Ok(Params::Register {
                directory,
                ticket: r.register_ticket,
                ca_certificate: r.ca_certificate,
                labels: r.labels,
            })
        }
    }
}

fn ed25519_check(key: &[u8; 32]) -> Result<(), String> {
    metropolis_identity::VerifyingKey::from_bytes(key)
        .map(|_| ())
        .map_err(|_| "not a valid Ed25519 public key".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use metropolis_api::api::node_parameters::ClusterBootstrap;

    fn write(dir: &Path, bytes: &[u8]) -> std::path::PathBuf {
        let p = dir.join("params.pb");
        std::fs::write(&p, bytes).expect("write");
        p
    }

    fn bootstrap(owner: Vec<u8>) -> Vec<u8> {
        NodeParameters {
            cluster: Some(node_parameters::Cluster::ClusterBootstrap(
                ClusterBootstrap {
                    owner_public_key: owner,
                    ..Default::default()
                },
            )),
            network_config: None,
        }
        .encode_to_vec()
    }

    #[test]
    fn accepts_bootstrap() {
        let dir = tempfile::tempdir().expect("tmp");
        let key = metropolis_identity::generate_key()
            .verifying_key()
            .to_bytes();
        let p = write(dir.path(), &bootstrap(key.to_vec()));
        match load(&p).expect("valid") {
            Params::Bootstrap {
                owner_public_key,
                configuration,
                ..
            } => {
                assert_eq!(owner_public_key, key);
                assert_eq!(configuration.cluster_domain, "cluster.local");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn rejects_bad_parameters_with_a_reason() {
        let dir = tempfile::tempdir().expect("tmp");
        let missing = load(&dir.path().join("nope")).expect_err("missing");
        let huge = std::fs::File::create(dir.path().join("huge")).expect("create");
        huge.set_len(256 << 20).expect("sparse 256 MiB");
        let huge = load(&dir.path().join("huge")).expect_err("huge");
        assert!(matches!(huge, ParamsError::TooLarge { .. }), "{huge}");
        assert!(matches!(missing, ParamsError::Read { .. }));
        let garbage = load(&write(dir.path(), b"\xff\xff\xff\xff")).expect_err("garbage");
        assert!(matches!(garbage, ParamsError::Decode { .. }), "{garbage}");
        let empty = load(&write(dir.path(), b"")).expect_err("empty");
        assert!(matches!(empty, ParamsError::NoCluster { .. }));
        let short = load(&write(dir.path(), &bootstrap(vec![1; 31]))).expect_err("short key");
        assert!(short.to_string().contains("32-byte"), "{short}");
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use metropolis_api::api::node_parameters::{ClusterBootstrap, ClusterRegister};
    use metropolis_api::common::{ClusterDirectory, cluster_directory};
    use metropolis_api::testing::props;
    use metropolis_api::testing::proptest::prelude::*;

    fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>(), 0..max)
    }

    fn structured() -> impl Strategy<Value = NodeParameters> {
        let labels =
            prop::collection::vec((any::<String>(), any::<String>()), 0..3).prop_map(|pairs| {
                NodeLabels {
                    pairs: pairs
                        .into_iter()
                        .map(|(key, value)| metropolis_api::common::node_labels::Pair {
                            key,
                            value,
                        })
                        .collect(),
                }
            });
        let bootstrap = (bytes(40), any::<bool>(), labels.clone()).prop_map(|(key, ha, labels)| {
            node_parameters::Cluster::ClusterBootstrap(ClusterBootstrap {
                owner_public_key: key,
                high_availability: ha,
                labels: Some(labels),
                ..Default::default()
            })
        });
        let register = (
            bytes(64),
            bytes(600),
            prop::collection::vec(any::<String>(), 0..3),
            labels,
        )
            .prop_map(|(ticket, ca, addresses, labels)| {
                node_parameters::Cluster::ClusterRegister(ClusterRegister {
                    register_ticket: ticket,
                    ca_certificate: ca,
                    cluster_directory: Some(ClusterDirectory {
                        nodes: vec![cluster_directory::Node {
                            addresses: addresses
                                .into_iter()
                                .map(|host| cluster_directory::node::Address { host })
                                .collect(),
                            ..Default::default()
                        }],
                    }),
                    labels: Some(labels),
                })
            });
        prop::option::of(prop_oneof![bootstrap, register]).prop_map(|cluster| NodeParameters {
            cluster,
            network_config: None,
        })
    }

    #[test]
    fn props_node_parameters() {
        let input = prop_oneof![bytes(4096), structured().prop_map(|m| m.encode_to_vec())];
        props("Node Parameters", input, |bytes| {
            match parse("params.pb", &bytes) {
                Ok(Params::Bootstrap {
                    owner_public_key, ..
                }) => {
                    prop_assert!(ed25519_check(&owner_public_key).is_ok());
                }
                Ok(Params::Register { ca_certificate, .. }) => {
                    prop_assert!(metropolis_identity::parse_certificate(&ca_certificate).is_ok());
                }
                Err(e) => prop_assert!(e.to_string().len() < 1024, "{e}"),
            }
            Ok(())
        });
    }
}
