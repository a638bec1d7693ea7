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
}

pub fn load(path: &Path) -> Result<Params, ParamsError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| ParamsError::Read {
        path: p.clone(),
        source,
    })?;
    let msg = NodeParameters::decode(bytes.as_slice()).map_err(|source| ParamsError::Decode {
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
        assert!(matches!(missing, ParamsError::Read { .. }));
        let garbage = load(&write(dir.path(), b"\xff\xff\xff\xff")).expect_err("garbage");
        assert!(matches!(garbage, ParamsError::Decode { .. }), "{garbage}");
        let empty = load(&write(dir.path(), b"")).expect_err("empty");
        assert!(matches!(empty, ParamsError::NoCluster { .. }));
        let short = load(&write(dir.path(), &bootstrap(vec![1; 31]))).expect_err("short key");
        assert!(short.to_string().contains("32-byte"), "{short}");
    }
}
