//! Error types. Messages are meant to be shown to operators as they are.

use time::OffsetDateTime;

/// Failure to decode, build or issue a key, certificate or TLS configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The input is not PEM at all.
    #[error("invalid PEM: {0}")]
    Pem(String),
    /// The PEM block is of another kind than expected.
    #[error("unexpected PEM block type {found:?}, expected {expected:?}")]
    WrongPemType {
        /// The block type wanted.
        expected: &'static str,
        /// The block type found.
        found: String,
    },
    /// The owner key has the wrong size.
    #[error(
        "owner key must be 64 bytes (32-byte seed followed by 32-byte public key), got {0} bytes"
    )]
    WrongKeyLength(usize),
    /// The public half stored with an owner key is not the public key of its seed.
    #[error("owner key is corrupt: its public key half does not match its seed")]
    KeyPairMismatch,
    /// The bytes are not a well-formed X.509 certificate.
    #[error("malformed certificate: {0}")]
    MalformedCertificate(String),
    /// The certificate's key is not Ed25519.
    #[error("certificate key is not Ed25519 (algorithm {0}); only Ed25519 is supported")]
    NotEd25519(String),
    /// The certificate given as a CA is not a CA certificate.
    #[error("certificate is not a CA certificate (basic constraints CA is not set)")]
    NotCa,
    /// The CA key does not belong to the CA certificate.
    #[error("CA private key does not match the public key of the CA certificate")]
    CaKeyMismatch,
    /// The certificate is not for the private key it is used with.
    #[error("certificate does not match the private key (its public key is another one)")]
    CertificateKeyMismatch,
    /// Bytes that are not a usable Ed25519 public key.
    #[error("invalid Ed25519 public key: {0}")]
    InvalidPublicKey(&'static str),
    /// A name that cannot go into a certificate.
    #[error("invalid identity name {0:?}: {1}")]
    InvalidName(String, &'static str),
    /// A validity window that ends before it begins.
    #[error("invalid validity: not_after {not_after} is before not_before {not_before}")]
    InvalidValidity {
        /// Requested start.
        not_before: OffsetDateTime,
        /// Requested end.
        not_after: OffsetDateTime,
    },
    /// The CA's own validity ended, so it cannot issue anything.
    #[error(
        "the cluster CA expired at {}; it cannot issue certificates (see \"CA rotation\" in ARCHITECTURE.md)",
        crate::rfc3339(*.0)
    )]
    CaExpired(OffsetDateTime),
    /// rcgen refused to build the certificate.
    #[error("certificate generation failed: {0}")]
    Generation(String),
    /// rustls refused the configuration (for example a key not matching its certificate).
    #[error("TLS configuration failed: {0}")]
    Tls(#[from] rustls::Error),
}

impl From<rcgen::Error> for IdentityError {
    fn from(e: rcgen::Error) -> Self {
        IdentityError::Generation(e.to_string())
    }
}

/// Why a certificate was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The certificate given as the issuer could not be used.
    #[error("invalid CA certificate: {0}")]
    InvalidCa(String),
    /// The certificate could not be parsed.
    #[error("invalid certificate: {0}")]
    Malformed(String),
    /// The issuer name of the certificate is not the subject of the CA.
    #[error("certificate issued by {issuer:?}, not by the CA {ca_subject:?}")]
    IssuerMismatch {
        /// The certificate's issuer.
        issuer: String,
        /// The CA's subject.
        ca_subject: String,
    },
    /// The certificate is signed with something else than Ed25519.
    #[error("unsupported certificate signature algorithm {0}; only Ed25519 is supported")]
    UnsupportedSignatureAlgorithm(String),
    /// The signature does not verify.
    #[error("certificate signature is invalid: {0}")]
    BadSignature(&'static str),
    /// The certificate's validity ended.
    #[error(
        "certificate expired at {} (now {})",
        crate::rfc3339(*not_after),
        crate::rfc3339(*now)
    )]
    Expired {
        /// End of validity.
        not_after: OffsetDateTime,
        /// The time checked against.
        now: OffsetDateTime,
    },
    /// The certificate's validity has not started.
    #[error(
        "certificate is not valid before {} (now {}; is a clock wrong?)",
        crate::rfc3339(*not_before),
        crate::rfc3339(*now)
    )]
    NotYetValid {
        /// Start of validity.
        not_before: OffsetDateTime,
        /// The time checked against.
        now: OffsetDateTime,
    },
    /// A certificate expected to be self-signed is not.
    #[error("certificate is not self-signed: {0}")]
    NotSelfSigned(String),
    /// The peer's certificate does not chain to the cluster CA the client trusts (for
    /// example, it belongs to another cluster).
    #[error("certificate was not issued by the trusted cluster CA ({0})")]
    NotIssuedByClusterCa(String),
    /// The peer's certificate is not a node certificate.
    #[error("not a node certificate: {0}")]
    NotNodeCertificate(String),
    /// The peer is a node, but not the one expected.
    #[error("connected to node {found}, expected node {expected}")]
    NodeIdMismatch {
        /// The node ID wanted.
        expected: String,
        /// The node ID in the certificate.
        found: String,
    },
}
