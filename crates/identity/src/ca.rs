//! The cluster CA and the certificates it issues, plus self-signed owner credentials.
//!
//! rcgen does the DER encoding; signing is done by ed25519-dalek through a small
//! [`rcgen::SigningKey`] adapter, and subjects are given to rcgen as bare 32-byte public keys
//! through a [`rcgen::PublicKeyData`] impl, so no private key ever has to pass through rcgen's
//! own `KeyPair` (and a certificate can be issued for a key the issuer does not hold).

use std::fmt;
use std::net::IpAddr;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyUsagePurpose, PKCS_ED25519, SanType, SerialNumber, SignatureAlgorithm,
};
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

use crate::{IdentityError, fingerprint_sha256, generate_key, node_id, parse_certificate};

/// RFC 5280's (4.1.2.5) "no well-defined expiration date", 9999-12-31T23:59:59Z: the end of
/// validity of the self-signed initial owner credentials (whose worth is the key alone), and of
/// every certificate issued before certificates had lifetimes. [`Certificate::renew_at`] treats
/// such a certificate as due for renewal at once.
///
/// [`Certificate::renew_at`]: crate::Certificate::renew_at
pub const NO_EXPIRY: OffsetDateTime = match OffsetDateTime::from_unix_timestamp(253_402_300_799) {
    Ok(t) => t,
    Err(_) => panic!("9999-12-31T23:59:59Z is representable"),
};

/// How long a new cluster CA is valid: ten years. The CA cannot be replaced yet (see
/// ARCHITECTURE.md, "CA rotation"), so this is the cluster's lifetime; what it issues never
/// outlives it.
pub const CA_LIFETIME: Duration = Duration::days(3653);

/// How far clocks may disagree: certificates start this long before they are issued, and a
/// certificate whose start is at most this far in the future is accepted
/// ([`Certificate::validity_at`]).
///
/// [`Certificate::validity_at`]: crate::Certificate::validity_at
pub const CLOCK_SKEW: Duration = Duration::minutes(5);

/// Start of validity of what this crate issues now.
fn default_not_before() -> OffsetDateTime {
    OffsetDateTime::now_utc() - CLOCK_SKEW
}

/// Subject common name of the cluster CA.
const CA_COMMON_NAME: &str = "Metropolis Cluster CA";

/// An ed25519-dalek key as rcgen's signer.
pub(crate) struct Ed25519Signer<'a> {
    key: &'a SigningKey,
    public: [u8; 32],
}

impl<'a> Ed25519Signer<'a> {
    fn new(key: &'a SigningKey) -> Self {
        Self {
            key,
            public: key.verifying_key().to_bytes(),
        }
    }
}

impl rcgen::PublicKeyData for Ed25519Signer<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.public
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ED25519
    }
}

impl rcgen::SigningKey for Ed25519Signer<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        Ok(self.key.sign(msg).to_bytes().to_vec())
    }
}

/// A bare Ed25519 public key as the subject key of a certificate.
struct Ed25519PublicKey([u8; 32]);

impl Ed25519PublicKey {
    /// Rejects bytes that are not a point, and small-order points (which any signature
    /// would verify against, so a certificate for them proves nothing).
    fn new(bytes: &[u8; 32]) -> Result<Self, IdentityError> {
        let key = VerifyingKey::from_bytes(bytes)
            .map_err(|_| IdentityError::InvalidPublicKey("not a point on the curve"))?;
        if key.is_weak() {
            return Err(IdentityError::InvalidPublicKey("small-order (weak) key"));
        }
        Ok(Self(*bytes))
    }
}

impl rcgen::PublicKeyData for Ed25519PublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ED25519
    }
}

/// A random positive 128-bit serial number. rcgen would otherwise derive the serial from a
/// hash of the subject key, so every certificate for one key would share a serial.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    // Positive, and a non-zero first byte so the encoding is always 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

/// Accepts names that make sense as a certificate's CN: 1 to 64 characters (the X.520 upper
/// bound), no control characters.
fn check_name(name: &str) -> Result<(), IdentityError> {
    let invalid = |why| Err(IdentityError::InvalidName(name.to_string(), why));
    if name.is_empty() {
        return invalid("empty");
    }
    if name.chars().count() > 64 {
        return invalid("longer than 64 characters");
    }
    if name.chars().any(char::is_control) {
        return invalid("contains control characters");
    }
    Ok(())
}

/// Parameters shared by every leaf certificate.
fn leaf_params(
    name: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, IdentityError> {
    if not_after < not_before {
        return Err(IdentityError::InvalidValidity {
            not_before,
            not_after,
        });
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(name);
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Parameters of a node certificate: CN and DNS SAN the node ID, server and client auth.
fn node_params(
    node_pubkey: &[u8; 32],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, IdentityError> {
    let id = node_id(node_pubkey);
    let mut params = leaf_params(&id, not_before, not_after)?;
    params.subject_alt_names = vec![SanType::DnsName(id.try_into()?)];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    Ok(params)
}

/// The cluster CA: its certificate and its private key.
///
/// Issues node and user certificates directly (there are no intermediates).
#[derive(Clone)]
pub struct CertificateAuthority {
    cert_der: Vec<u8>,
    key: SigningKey,
    /// End of the CA certificate's validity: nothing it issues lasts longer.
    not_after: OffsetDateTime,
}

impl fmt::Debug for CertificateAuthority {
    /// Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &fingerprint_sha256(&self.cert_der))
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new CA with a fresh key: self-signed, CN `Metropolis Cluster CA`, key usage cert sign
    /// and CRL sign, basic constraints CA, valid for [`CA_LIFETIME`].
    pub fn generate() -> Result<Self, IdentityError> {
        Self::generate_named(CA_COMMON_NAME)
    }

    /// [`Self::generate`] with another common name: a cluster has a second CA that issues
    /// etcd peer certificates only (the consensus CA), so that etcd, which trusts whatever
    /// its CA signed, trusts consensus members and nobody else.
    pub fn generate_named(name: &str) -> Result<Self, IdentityError> {
        check_name(name)?;
        let key = generate_key();
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(name);
        params.not_before = default_not_before();
        // Whole seconds, as the certificate encodes it.
        let end = OffsetDateTime::now_utc() + CA_LIFETIME;
        params.not_after = end.replace_nanosecond(0).unwrap_or(end);
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&Ed25519Signer::new(&key))?;
        Ok(Self {
            cert_der: cert.der().to_vec(),
            key,
            not_after: params.not_after,
        })
    }

    /// A CA restored from storage. Fails unless `cert_der` is an Ed25519 CA certificate whose
    /// public key is that of `key_seed`.
    pub fn from_parts(cert_der: Vec<u8>, key_seed: [u8; 32]) -> Result<Self, IdentityError> {
        let cert = parse_certificate(&cert_der)?;
        if !cert.is_ca {
            return Err(IdentityError::NotCa);
        }
        let key = SigningKey::from_bytes(&key_seed);
        if key.verifying_key().to_bytes() != cert.public_key {
            return Err(IdentityError::CaKeyMismatch);
        }
        let ca = Self {
            cert_der,
            key,
            not_after: cert.not_after,
        };
        // Fail now rather than at the first issuance if rcgen cannot read it as an issuer.
        ca.issuer()?;
        Ok(ca)
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA private key's seed, for storage.
    pub fn key_seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The CA's public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// End of the CA's validity ([`NO_EXPIRY`] for CAs made before CAs had a lifetime).
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// How long the CA is valid from `now` on (zero once it expired): the longest lifetime a
    /// certificate issued now can have.
    pub fn remaining(&self, now: OffsetDateTime) -> std::time::Duration {
        std::time::Duration::try_from(self.not_after - now).unwrap_or_default()
    }

    /// The validity of a certificate issued now for `lifetime`: from [`CLOCK_SKEW`] ago until
    /// `lifetime` from now, cut at the CA's own end. Fails once the CA expired.
    fn validity(
        &self,
        lifetime: std::time::Duration,
    ) -> Result<(OffsetDateTime, OffsetDateTime), IdentityError> {
        let now = OffsetDateTime::now_utc();
        if now >= self.not_after {
            return Err(IdentityError::CaExpired(self.not_after));
        }
        let end = Duration::try_from(lifetime)
            .ok()
            .and_then(|l| now.checked_add(l))
            .map_or(self.not_after, |end| end.min(self.not_after));
        Ok((now - CLOCK_SKEW, end))
    }

    /// The issuer as rcgen wants it. Built from the stored certificate so that the issuer
    /// name and authority key identifier are exactly the CA certificate's.
    pub(crate) fn issuer(&self) -> Result<Issuer<'static, Ed25519Signer<'_>>, IdentityError> {
        Ok(Issuer::from_ca_cert_der(
            &CertificateDer::from(self.cert_der.as_slice()),
            Ed25519Signer::new(&self.key),
        )?)
    }

    fn issue(
        &self,
        params: &CertificateParams,
        pubkey: &[u8; 32],
    ) -> Result<Vec<u8>, IdentityError> {
        let subject = Ed25519PublicKey::new(pubkey)?;
        Ok(params.signed_by(&subject, &self.issuer()?)?.der().to_vec())
    }

    /// A node certificate for `node_pubkey`, valid for `lifetime` from now (see
    /// [`Self::validity`]).
    pub fn issue_node_certificate(
        &self,
        node_pubkey: &[u8; 32],
        lifetime: std::time::Duration,
    ) -> Result<Vec<u8>, IdentityError> {
        let (not_before, not_after) = self.validity(lifetime)?;
        self.issue_node_certificate_with_validity(node_pubkey, not_before, not_after)
    }

    /// A node certificate with an explicit validity (for tests of expiry handling).
    ///
    /// CN and DNS SAN are the node ID, extended key usage server and client auth: nodes
    /// present the same certificate as servers and as clients.
    pub fn issue_node_certificate_with_validity(
        &self,
        node_pubkey: &[u8; 32],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Vec<u8>, IdentityError> {
        let params = node_params(node_pubkey, not_before, not_after)?;
        self.issue(&params, node_pubkey)
    }

    /// A consensus peer certificate for `node_pubkey` at `address`, valid for `lifetime` from
    /// now (see [`Self::validity`]): a node certificate (CN and DNS SAN the node ID, server and
    /// client auth) with `address` as an IP SAN as well.
    ///
    /// etcd (Go's crypto/tls) verifies a peer's server certificate against the IP in the
    /// peer URL, which is why the address has to be in the certificate; the node's own
    /// certificate does not carry it, since clients verify nodes by node ID, not address.
    pub fn issue_peer_certificate(
        &self,
        node_pubkey: &[u8; 32],
        address: IpAddr,
        lifetime: std::time::Duration,
    ) -> Result<Vec<u8>, IdentityError> {
        let (not_before, not_after) = self.validity(lifetime)?;
        self.issue_peer_certificate_with_validity(node_pubkey, address, not_before, not_after)
    }

    /// [`Self::issue_peer_certificate`] with an explicit validity.
    pub fn issue_peer_certificate_with_validity(
        &self,
        node_pubkey: &[u8; 32],
        address: IpAddr,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Vec<u8>, IdentityError> {
        let mut params = node_params(node_pubkey, not_before, not_after)?;
        params.subject_alt_names.push(SanType::IpAddress(address));
        self.issue(&params, node_pubkey)
    }

    /// A user certificate (the owner or another named identity) for `pubkey`, valid for
    /// `lifetime` from now (see [`Self::validity`]).
    pub fn issue_user_certificate(
        &self,
        name: &str,
        pubkey: &[u8; 32],
        lifetime: std::time::Duration,
    ) -> Result<Vec<u8>, IdentityError> {
        let (not_before, not_after) = self.validity(lifetime)?;
        self.issue_user_certificate_with_validity(name, pubkey, not_before, not_after)
    }

    /// A user certificate with an explicit validity (for tests of expiry handling).
    ///
    /// CN is `name`, extended key usage client auth only.
    pub fn issue_user_certificate_with_validity(
        &self,
        name: &str,
        pubkey: &[u8; 32],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Vec<u8>, IdentityError> {
        check_name(name)?;
        let mut params = leaf_params(name, not_before, not_after)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(&params, pubkey)
    }
}

/// A self-signed client certificate over `key`: the initial owner credentials, which a client
/// presents only to Escrow to trade them for a CA-issued owner certificate.
///
/// CN is `common_name`, or no subject at all if it is empty (as upstream's ephemeral
/// credentials); extended key usage client auth; valid until [`NO_EXPIRY`] (the key is what
/// counts, and Escrow does not look at the validity).
pub fn self_signed_certificate(
    key: &SigningKey,
    common_name: &str,
) -> Result<Vec<u8>, IdentityError> {
    let mut params = if common_name.is_empty() {
        let mut params = leaf_params(CA_COMMON_NAME, default_not_before(), NO_EXPIRY)?;
        params.distinguished_name = DistinguishedName::new();
        params
    } else {
        check_name(common_name)?;
        leaf_params(common_name, default_not_before(), NO_EXPIRY)?
    };
    // An authority key identifier would just repeat the subject key identifier.
    params.use_authority_key_identifier_extension = false;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params.self_signed(&Ed25519Signer::new(key))?.der().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{VerifyError, verify_self_signed, verify_signed_by};

    const DAY: std::time::Duration = std::time::Duration::from_secs(86_400);

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    #[test]
    fn ca_certificate_fields() {
        let ca = CertificateAuthority::generate().unwrap();
        let cert = parse_certificate(ca.cert_der()).unwrap();
        assert!(cert.is_ca);
        assert_eq!(cert.common_name, CA_COMMON_NAME);
        assert_eq!(cert.public_key, ca.public_key());
        let life = cert.not_after - now();
        assert!(
            life > CA_LIFETIME - Duration::minutes(1) && life <= CA_LIFETIME,
            "{life}"
        );
        assert_eq!(ca.not_after(), cert.not_after);
        verify_self_signed(&cert).unwrap();
        verify_signed_by(&cert, ca.cert_der(), now()).unwrap();

        let (_, x509) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        let ku = x509.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        assert!(!ku.digital_signature());
    }

    #[test]
    fn ca_from_parts() {
        let ca = CertificateAuthority::generate().unwrap();
        let restored =
            CertificateAuthority::from_parts(ca.cert_der().to_vec(), ca.key_seed()).unwrap();
        assert_eq!(restored.cert_der(), ca.cert_der());
        let node = generate_key();
        let der = restored
            .issue_node_certificate(node.verifying_key().as_bytes(), DAY)
            .unwrap();
        verify_signed_by(&parse_certificate(&der).unwrap(), ca.cert_der(), now()).unwrap();

        let other = generate_key();
        let err =
            CertificateAuthority::from_parts(ca.cert_der().to_vec(), other.to_bytes()).unwrap_err();
        assert!(matches!(err, IdentityError::CaKeyMismatch), "{err}");

        let err = CertificateAuthority::from_parts(der, node.to_bytes()).unwrap_err();
        assert!(matches!(err, IdentityError::NotCa), "{err}");

        let err = CertificateAuthority::from_parts(vec![1, 2, 3], ca.key_seed()).unwrap_err();
        assert!(
            matches!(err, IdentityError::MalformedCertificate(_)),
            "{err}"
        );
    }

    #[test]
    fn ca_debug_hides_key() {
        let ca = CertificateAuthority::generate().unwrap();
        let debug = format!("{ca:?}");
        assert!(debug.contains(&fingerprint_sha256(ca.cert_der())));
        assert!(!debug.contains(&hex::encode(ca.key_seed())));
    }

    #[test]
    fn node_certificate_fields() {
        let ca = CertificateAuthority::generate().unwrap();
        let node = generate_key();
        let pubkey = node.verifying_key().to_bytes();
        let der = ca.issue_node_certificate(&pubkey, DAY).unwrap();
        let cert = parse_certificate(&der).unwrap();
        let id = node_id(&pubkey);
        assert_eq!(cert.common_name, id);
        assert_eq!(cert.dns_names, vec![id.clone()]);
        assert_eq!(cert.node_id(), id);
        assert_eq!(cert.public_key, pubkey);
        assert!(cert.server_auth && cert.client_auth);
        assert!(!cert.is_ca);
        assert!(cert.is_node_certificate());
        assert!(!cert.is_user_certificate());
        assert!(cert.not_before < now() && cert.not_after <= now() + DAY);
        assert!(cert.not_after > now() + DAY - Duration::minutes(1));
        assert_eq!(cert.lifetime(), DAY);
        verify_signed_by(&cert, ca.cert_der(), now()).unwrap();
        assert!(matches!(
            verify_self_signed(&cert),
            Err(VerifyError::NotSelfSigned(_))
        ));

        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        let (_, ca_x509) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        assert_eq!(x509.issuer(), ca_x509.subject());
        let ku = x509.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
    }

    #[test]
    fn peer_certificate_fields() {
        use x509_parser::extensions::GeneralName;

        let ca = CertificateAuthority::generate().unwrap();
        let pubkey = generate_key().verifying_key().to_bytes();
        let id = node_id(&pubkey);
        for address in [
            "127.3.4.5".parse::<IpAddr>().unwrap(),
            "fd00::1".parse().unwrap(),
        ] {
            let der = ca.issue_peer_certificate(&pubkey, address, DAY).unwrap();
            // Still a node certificate as far as the RPC layer is concerned.
            let cert = parse_certificate(&der).unwrap();
            assert!(cert.is_node_certificate());
            assert_eq!(cert.common_name, id);
            assert_eq!(cert.public_key, pubkey);
            assert_eq!(cert.lifetime(), DAY);
            assert_eq!(cert.ip_addresses, vec![address]);
            verify_signed_by(&cert, ca.cert_der(), now()).unwrap();

            let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
            let san = x509.subject_alternative_name().unwrap().unwrap().value;
            let want_ip = match address {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            };
            assert_eq!(
                san.general_names,
                vec![GeneralName::DNSName(&id), GeneralName::IPAddress(&want_ip)]
            );
            let eku = x509.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.server_auth && eku.client_auth);
            assert!(!eku.any && !eku.code_signing && eku.other.is_empty());
            assert!(!x509.is_ca());
        }
    }

    #[test]
    fn serials_are_random() {
        let ca = CertificateAuthority::generate().unwrap();
        let pubkey = generate_key().verifying_key().to_bytes();
        let a = ca.issue_node_certificate(&pubkey, DAY).unwrap();
        let b = ca.issue_node_certificate(&pubkey, DAY).unwrap();
        let (_, a) = x509_parser::parse_x509_certificate(&a).unwrap();
        let (_, b) = x509_parser::parse_x509_certificate(&b).unwrap();
        assert_ne!(a.raw_serial(), b.raw_serial());
        assert_eq!(a.raw_serial().len(), 16);
    }

    #[test]
    fn user_certificate_fields() {
        let ca = CertificateAuthority::generate().unwrap();
        let owner = generate_key();
        let pubkey = owner.verifying_key().to_bytes();
        let der = ca.issue_user_certificate("owner", &pubkey, DAY).unwrap();
        let cert = parse_certificate(&der).unwrap();
        assert_eq!(cert.common_name, "owner");
        assert!(cert.dns_names.is_empty());
        assert!(cert.client_auth && !cert.server_auth && !cert.is_ca);
        assert!(!cert.is_node_certificate());
        assert!(cert.is_user_certificate());
        verify_signed_by(&cert, ca.cert_der(), now()).unwrap();
    }

    #[test]
    fn bad_names_and_keys_rejected() {
        let ca = CertificateAuthority::generate().unwrap();
        let pubkey = generate_key().verifying_key().to_bytes();
        for name in ["", "a\nb", &"x".repeat(65)] {
            let err = ca.issue_user_certificate(name, &pubkey, DAY).unwrap_err();
            assert!(matches!(err, IdentityError::InvalidName(..)), "{err}");
        }
        // The identity point is of small order.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let err = ca.issue_node_certificate(&identity, DAY).unwrap_err();
        assert!(matches!(err, IdentityError::InvalidPublicKey(_)), "{err}");
        let err = ca
            .issue_user_certificate_with_validity("owner", &pubkey, now(), now() - Duration::DAY)
            .unwrap_err();
        assert!(
            matches!(err, IdentityError::InvalidValidity { .. }),
            "{err}"
        );
    }

    #[test]
    fn foreign_ca_rejected() {
        let ca = CertificateAuthority::generate().unwrap();
        let foreign = CertificateAuthority::generate().unwrap();
        let pubkey = generate_key().verifying_key().to_bytes();
        let cert = parse_certificate(&ca.issue_node_certificate(&pubkey, DAY).unwrap()).unwrap();
        // Both CAs share the subject name, so this gets as far as the signature.
        let err = verify_signed_by(&cert, foreign.cert_der(), now()).unwrap_err();
        assert!(matches!(err, VerifyError::BadSignature(_)), "{err}");
        // A leaf is not a CA.
        let leaf = ca.issue_node_certificate(&pubkey, DAY).unwrap();
        let err = verify_signed_by(&cert, &leaf, now()).unwrap_err();
        assert!(matches!(err, VerifyError::InvalidCa(_)), "{err}");
    }

    #[test]
    fn validity_window_enforced() {
        let ca = CertificateAuthority::generate().unwrap();
        let pubkey = generate_key().verifying_key().to_bytes();
        let t = now();

        let expired = ca
            .issue_user_certificate_with_validity(
                "owner",
                &pubkey,
                t - Duration::days(2),
                t - Duration::DAY,
            )
            .unwrap();
        let expired = parse_certificate(&expired).unwrap();
        let err = verify_signed_by(&expired, ca.cert_der(), t).unwrap_err();
        assert!(matches!(err, VerifyError::Expired { .. }), "{err}");
        assert!(err.to_string().contains("expired"), "{err}");
        // Still fine at a time inside its window.
        verify_signed_by(&expired, ca.cert_der(), t - Duration::hours(36)).unwrap();

        let future = ca
            .issue_user_certificate_with_validity(
                "owner",
                &pubkey,
                t + Duration::DAY,
                t + Duration::days(2),
            )
            .unwrap();
        let future = parse_certificate(&future).unwrap();
        let err = verify_signed_by(&future, ca.cert_der(), t).unwrap_err();
        assert!(matches!(err, VerifyError::NotYetValid { .. }), "{err}");

        let node = ca
            .issue_node_certificate_with_validity(&pubkey, t - Duration::days(2), t - Duration::DAY)
            .unwrap();
        let node = parse_certificate(&node).unwrap();
        assert!(node.is_node_certificate());
        let err = verify_signed_by(&node, ca.cert_der(), t).unwrap_err();
        assert!(matches!(err, VerifyError::Expired { .. }), "{err}");
    }

    #[test]
    fn self_signed_owner_certificate() {
        let ca = CertificateAuthority::generate().unwrap();
        let owner = generate_key();
        let der = self_signed_certificate(&owner, "owner").unwrap();
        let cert = parse_certificate(&der).unwrap();
        assert_eq!(cert.common_name, "owner");
        assert_eq!(cert.public_key, owner.verifying_key().to_bytes());
        assert!(cert.client_auth && !cert.server_auth && !cert.is_ca);
        verify_self_signed(&cert).unwrap();
        let err = verify_signed_by(&cert, ca.cert_der(), now()).unwrap_err();
        assert!(matches!(err, VerifyError::IssuerMismatch { .. }), "{err}");

        // Even under the CA's name it does not pass as CA-issued.
        let impostor =
            parse_certificate(&self_signed_certificate(&owner, CA_COMMON_NAME).unwrap()).unwrap();
        let err = verify_signed_by(&impostor, ca.cert_der(), now()).unwrap_err();
        assert!(matches!(err, VerifyError::BadSignature(_)), "{err}");

        // Upstream-style: no subject at all.
        let anonymous = parse_certificate(&self_signed_certificate(&owner, "").unwrap()).unwrap();
        assert_eq!(anonymous.common_name, "");
        verify_self_signed(&anonymous).unwrap();
    }

    #[test]
    fn tampered_certificate_rejected() {
        let owner = generate_key();
        let der = self_signed_certificate(&owner, "owner").unwrap();

        // Rename issuer and subject alike ("owner" -> "ownes"): the signature no longer fits.
        let mut renamed = der.clone();
        for i in 0..renamed.len() - 5 {
            if &renamed[i..i + 5] == b"owner" {
                renamed[i + 4] = b's';
            }
        }
        let cert = parse_certificate(&renamed).unwrap();
        assert_eq!(cert.common_name, "ownes");
        let err = verify_self_signed(&cert).unwrap_err();
        assert_eq!(
            err,
            VerifyError::NotSelfSigned("not signed by its own key".into())
        );

        // A corrupted signature.
        let mut corrupted = der;
        *corrupted.last_mut().unwrap() ^= 1;
        let err = verify_self_signed(&parse_certificate(&corrupted).unwrap()).unwrap_err();
        assert!(matches!(err, VerifyError::NotSelfSigned(_)), "{err}");
    }

    #[test]
    fn lifetimes_are_cut_at_the_ca_end_and_renewal_is_at_a_third_left() {
        let ca = CertificateAuthority::generate().unwrap();
        let pubkey = generate_key().verifying_key().to_bytes();
        // Longer than the CA: ends with it.
        let long = std::time::Duration::from_secs(20 * 365 * 86_400);
        let cert = parse_certificate(&ca.issue_node_certificate(&pubkey, long).unwrap()).unwrap();
        assert_eq!(cert.not_after, ca.not_after());
        assert!(ca.remaining(now()) <= std::time::Duration::try_from(CA_LIFETIME).unwrap());

        let minute = std::time::Duration::from_secs(60);
        let cert = parse_certificate(&ca.issue_user_certificate("owner", &pubkey, minute).unwrap())
            .unwrap();
        assert_eq!(cert.lifetime(), minute);
        assert_eq!(cert.renew_at(), cert.not_after - Duration::seconds(20));
        assert!(!cert.renewal_due(now()));
        assert!(cert.renewal_due(now() + Duration::seconds(41)));
        // Not-before skew: a clock up to CLOCK_SKEW behind still accepts it.
        cert.validity_at(now() - CLOCK_SKEW - CLOCK_SKEW + Duration::seconds(5))
            .unwrap();
        let err = cert.validity_at(now() + Duration::seconds(61)).unwrap_err();
        assert!(err.to_string().contains("expired at"), "{err}");

        // Certificates without an end (issued before lifetimes) are due at once.
        let forever = ca
            .issue_node_certificate_with_validity(&pubkey, now() - Duration::HOUR, NO_EXPIRY)
            .unwrap();
        assert!(parse_certificate(&forever).unwrap().renewal_due(now()));

        // An expired CA issues nothing.
        let key = generate_key();
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(CA_COMMON_NAME);
        params.not_before = now() - Duration::days(2);
        params.not_after = now() - Duration::DAY;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let old = params.self_signed(&Ed25519Signer::new(&key)).unwrap();
        let old = CertificateAuthority::from_parts(old.der().to_vec(), key.to_bytes()).unwrap();
        let err = old.issue_node_certificate(&pubkey, minute).unwrap_err();
        assert!(matches!(err, IdentityError::CaExpired(_)), "{err}");
        assert_eq!(old.remaining(now()), std::time::Duration::ZERO);
    }
}
