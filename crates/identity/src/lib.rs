//! Identities and credentials of a Metropolis cluster.
//!
//! Everything that touches keys and certificates lives here, so that the rest of the control
//! plane deals in node IDs, parsed [`Certificate`]s and ready-made rustls configurations:
//!
//! - Ed25519 keys and node IDs ([`generate_key`], [`node_id`]);
//! - the PEM files metroctl keeps ([`encode_owner_key_pem`], [`cert_to_pem`], ...) and the
//!   PKCS#8 key files etcd reads ([`encode_pkcs8_key_pem`]);
//! - the cluster CA and the certificates it issues ([`CertificateAuthority`]), the
//!   consensus CA's revocation lists ([`CertificateAuthority::issue_crl`], [`parse_crl`]),
//!   and the self-signed initial owner credentials ([`self_signed_certificate`]);
//! - parsing and verification of certificates ([`parse_certificate`], [`verify_signed_by`]);
//! - TLS configurations for nodes and clients ([`server_config`], [`client_config`]).
//!
//! All keys are Ed25519; certificates with any other key type are rejected when parsed.

mod ca;
mod cert;
mod crl;
mod encoding;
mod error;
mod tls;

pub use ca::{CertificateAuthority, NO_EXPIRY, self_signed_certificate};
pub use cert::{Certificate, parse_certificate, verify_self_signed, verify_signed_by};
pub use crl::{Revoked, parse_crl};
pub use ed25519_dalek::{SigningKey, VerifyingKey};
pub use encoding::{
    CERTIFICATE_PEM_TYPE, OWNER_KEY_PEM_TYPE, PKCS8_KEY_PEM_TYPE, cert_to_pem,
    decode_owner_key_pem, encode_owner_key_pem, encode_pkcs8_key_pem, fingerprint_sha256,
    pem_to_cert_der,
};
pub use error::{IdentityError, VerifyError};
pub use tls::{ServerTrust, client_config, server_config, verify_error};

/// Prefix of every node ID.
pub const NODE_ID_PREFIX: &str = "metropolis-";

/// The ID of the node owning the Ed25519 public key `pubkey`.
///
/// This is the contract's format: `metropolis-` followed by the lowercase hex of the first 16
/// bytes of the raw public key. It is what node certificates carry as CN and DNS SAN, and how
/// clients recognise a node independently of its address.
pub fn node_id(pubkey: &[u8; 32]) -> String {
    format!("{NODE_ID_PREFIX}{}", hex::encode(&pubkey[..16]))
}

/// A fresh Ed25519 key from the operating system's random number generator.
pub fn generate_key() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_format() {
        // RFC 8032 test vector 1: this seed has a well-known public key.
        let seed: [u8; 32] =
            hex::decode("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
                .unwrap()
                .try_into()
                .unwrap();
        let key = SigningKey::from_bytes(&seed);
        assert_eq!(
            hex::encode(key.verifying_key().as_bytes()),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
        assert_eq!(
            node_id(key.verifying_key().as_bytes()),
            "metropolis-d75a980182b10ab7d54bfed3c964073a"
        );
    }

    #[test]
    fn generated_keys_differ() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a.to_bytes(), b.to_bytes());
        assert_eq!(node_id(a.verifying_key().as_bytes()).len(), 11 + 32);
    }
}
