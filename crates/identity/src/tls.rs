//! rustls configurations for nodes (servers) and their clients (metroctl, other nodes).
//!
//! Both sides use TLS 1.3 only, ALPN `h2` (gRPC), and the ring provider passed explicitly, so
//! nothing depends on a process-wide default provider.
//!
//! Trust is not hostname-based: clients reach nodes by IP address (sending no SNI), and check
//! the server's chain to the cluster CA and the node ID in its certificate instead. Servers
//! accept any client certificate at the TLS layer, or none, and leave authorization to the
//! RPC layer, which sees the peer certificate of each call; the TLS layer only makes sure the
//! client holds the key of the certificate it presented.
//!
//! Note on errors: in TLS 1.3 the client sends its certificate after it considers the
//! handshake done, so if a server rejects it the client only learns at its first read (as an
//! alert, for example `DecryptError` or `CertificateUnknown`), not when connecting. Callers
//! should word such errors as "certificate rejected by the server".

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use ed25519_dalek::SigningKey;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

use crate::{Certificate, IdentityError, VerifyError, parse_certificate};

/// The only application protocol spoken: gRPC over HTTP/2.
const ALPN_H2: &[u8] = b"h2";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// PKCS#8 v1 (RFC 8410) encoding of an Ed25519 key: a fixed prefix and the 32-byte seed.
fn private_key_der(key: &SigningKey) -> PrivateKeyDer<'static> {
    const PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let mut der = Vec::with_capacity(48);
    der.extend_from_slice(&PREFIX);
    der.extend_from_slice(key.as_bytes());
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der))
}

/// A key and its current certificate, which can be replaced (a renewed certificate) while
/// the TLS configurations built on it are in use: every handshake presents the certificate
/// held when it starts, as a server ([`server_config_live`]) and as a client
/// ([`client_config_live`]); connections already established keep the one they began with.
pub struct LiveCertificate {
    key: SigningKey,
    signer: Arc<dyn rustls::sign::SigningKey>,
    current: RwLock<Current>,
}

#[derive(Clone)]
struct Current {
    cert: Arc<Certificate>,
    certified: Arc<CertifiedKey>,
}

impl fmt::Debug for LiveCertificate {
    /// Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cert = self.certificate();
        f.debug_struct("LiveCertificate")
            .field("subject", &cert.common_name)
            .field("not_after", &crate::rfc3339(cert.not_after))
            .finish_non_exhaustive()
    }
}

impl LiveCertificate {
    /// Holds `cert_der`, which must be an Ed25519 certificate for `key` (rustls would check
    /// too, but say less).
    pub fn new(cert_der: Vec<u8>, key: SigningKey) -> Result<Arc<Self>, IdentityError> {
        let signer = provider()
            .key_provider
            .load_private_key(private_key_der(&key))?;
        let current = Self::prepare(&key, &signer, cert_der)?;
        Ok(Arc::new(Self {
            key,
            signer,
            current: RwLock::new(current),
        }))
    }

    fn prepare(
        key: &SigningKey,
        signer: &Arc<dyn rustls::sign::SigningKey>,
        cert_der: Vec<u8>,
    ) -> Result<Current, IdentityError> {
        let cert = parse_certificate(&cert_der)?;
        if cert.public_key != key.verifying_key().to_bytes() {
            return Err(IdentityError::CertificateKeyMismatch);
        }
        let certified = CertifiedKey::new(vec![CertificateDer::from(cert_der)], signer.clone());
        Ok(Current {
            cert: Arc::new(cert),
            certified: Arc::new(certified),
        })
    }

    /// The certificate held now.
    pub fn certificate(&self) -> Arc<Certificate> {
        self.read().cert
    }

    /// The key the certificates are for.
    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    /// Holds `cert_der` from now on; the next handshakes present it. It must be for the same
    /// key (a renewal, not another identity).
    pub fn replace(&self, cert_der: Vec<u8>) -> Result<(), IdentityError> {
        let next = Self::prepare(&self.key, &self.signer, cert_der)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = next;
        Ok(())
    }

    fn read(&self) -> Current {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl ResolvesServerCert for LiveCertificate {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.read().certified)
    }
}

impl ResolvesClientCert for LiveCertificate {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.read().certified)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A [`VerifyError`] as rustls carries it: rustls prints the `Debug` form of the errors of
/// custom verifiers, so this wrapper's `Debug` is the human message.
struct Rejected(VerifyError);

impl fmt::Debug for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Rejected {}

fn rejected(e: VerifyError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Rejected(e)))))
}

/// The [`VerifyError`] behind a rustls error, if the server certificate verifier of
/// [`client_config`] refused the server for one of this crate's reasons (not a node
/// certificate, wrong node, not issued by the cluster CA). Other errors, such as expiry
/// found by webpki, are left to rustls' own messages.
pub fn verify_error(err: &rustls::Error) -> Option<&VerifyError> {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<Rejected>().map(|r| &r.0)
        }
        _ => None,
    }
}

/// The node side: presents `cert_der` (the node certificate) with `key`.
///
/// Client certificates are requested but optional, and accepted from any issuer: a client
/// without a certificate must reach the unauthenticated services, and one with self-signed
/// initial owner credentials must reach Escrow. The handshake signature is still verified, so
/// a presented certificate proves possession of its key. No SNI is required, and no CA names
/// are hinted to clients (they should send whatever certificate they have).
pub fn server_config(
    cert_der: Vec<u8>,
    key: &SigningKey,
) -> Result<Arc<ServerConfig>, IdentityError> {
    server_config_live(LiveCertificate::new(cert_der, key.clone())?)
}

/// [`server_config`] presenting whatever certificate `live` holds when a handshake starts.
pub fn server_config_live(live: Arc<LiveCertificate>) -> Result<Arc<ServerConfig>, IdentityError> {
    let provider = provider();
    let verifier = Arc::new(AnyClientCertificate {
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(live);
    // No resumption: a resumed session carries the certificates of the handshake it resumes,
    // so a renewed certificate (either side's) would not be seen until the session ends.
    // Every handshake is full, which costs one signature per side.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// How a client decides to trust the node it connects to.
#[derive(Debug, Clone)]
pub enum ServerTrust {
    /// The server must present a node certificate issued by the cluster CA `ca_der`, valid
    /// now, and (if `node_id` is set) be that node. The server's name (an IP address, usually)
    /// plays no part.
    ClusterCa {
        /// The cluster CA certificate, DER.
        ca_der: Vec<u8>,
        /// The node expected, if a particular one is.
        node_id: Option<String>,
    },
    /// Trust on first use: accept any server certificate and record it so the caller can show
    /// its fingerprint and pin the CA.
    ///
    /// The certificate (the server's end-entity certificate, DER) is recorded only once the
    /// server has proven possession of its key in the handshake. It is the node's certificate,
    /// not the CA: the caller should fetch the CA (CuratorLocal.GetCACertificate), check that
    /// the recorded certificate verifies against it, and have the fingerprint confirmed.
    Capture(Arc<Mutex<Option<Vec<u8>>>>),
}

/// The client side, trusting servers as `trust` says, and presenting `client_identity`
/// (certificate DER and its key) if given: a node or user certificate, or self-signed initial
/// owner credentials.
///
/// Fails if the certificate is not for the key. See the module documentation for when a
/// rejected client certificate shows up as an error.
pub fn client_config(
    trust: ServerTrust,
    client_identity: Option<(Vec<u8>, SigningKey)>,
) -> Result<Arc<ClientConfig>, IdentityError> {
    let live = match client_identity {
        Some((cert_der, key)) => Some(LiveCertificate::new(cert_der, key)?),
        None => None,
    };
    client_config_live(trust, live)
}

/// [`client_config`] presenting whatever certificate `live` holds when a handshake starts.
pub fn client_config_live(
    trust: ServerTrust,
    live: Option<Arc<LiveCertificate>>,
) -> Result<Arc<ClientConfig>, IdentityError> {
    let provider = provider();
    let algorithms = provider.signature_verification_algorithms;
    let verifier: Arc<dyn ServerCertVerifier> = match trust {
        ServerTrust::ClusterCa { ca_der, node_id } => {
            let ca = parse_certificate(&ca_der)?;
            if !ca.is_ca {
                return Err(IdentityError::NotCa);
            }
            let mut roots = RootCertStore::empty();
            roots.add(CertificateDer::from(ca_der))?;
            Arc::new(ClusterCaVerifier {
                roots,
                node_id,
                algorithms,
            })
        }
        ServerTrust::Capture(slot) => Arc::new(CaptureVerifier { slot, algorithms }),
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match live {
        Some(live) => builder.with_client_cert_resolver(live),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Server side: any client certificate, or none; key possession still verified.
#[derive(Debug)]
struct AnyClientCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyClientCertificate {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Only well-formedness: issuer, usage and validity are the RPC layer's business, so
        // that it can answer with a meaningful status instead of a bare TLS alert.
        ParsedCertificate::try_from(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Client side, [`ServerTrust::ClusterCa`].
#[derive(Debug)]
struct ClusterCaVerifier {
    roots: RootCertStore,
    node_id: Option<String>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ClusterCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Chain, validity and serverAuth usage, by webpki.
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )
        .map_err(|e| match e {
            // All cluster CAs share one subject name, so another cluster's node certificate
            // finds our CA as its issuer and fails on the signature rather than as unknown.
            rustls::Error::InvalidCertificate(
                e @ (CertificateError::UnknownIssuer | CertificateError::BadSignature),
            ) => rejected(VerifyError::NotIssuedByClusterCa(format!("{e:?}"))),
            e => e,
        })?;
        // Then what makes it a node, and the node wanted; never the server name.
        let cert = parse_certificate(end_entity.as_ref())
            .map_err(|e| rejected(VerifyError::Malformed(e.to_string())))?;
        if let Some(problem) = cert.node_certificate_problem() {
            return Err(rejected(VerifyError::NotNodeCertificate(problem)));
        }
        match &self.node_id {
            Some(expected) if cert.common_name != *expected => {
                Err(rejected(VerifyError::NodeIdMismatch {
                    expected: expected.clone(),
                    found: cert.common_name,
                }))
            }
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Client side, [`ServerTrust::Capture`].
struct CaptureVerifier {
    slot: Arc<Mutex<Option<Vec<u8>>>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for CaptureVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaptureVerifier").finish_non_exhaustive()
    }
}

impl CaptureVerifier {
    /// Records the certificate once its key has signed the handshake, never before.
    fn record(
        &self,
        cert: &CertificateDer<'_>,
        verified: Result<HandshakeSignatureValid, rustls::Error>,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let verified = verified?;
        // A panic elsewhere while holding the lock does not make the slot unusable.
        *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(cert.to_vec());
        Ok(verified)
    }
}

impl ServerCertVerifier for CaptureVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        ParsedCertificate::try_from(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let verified = rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms);
        self.record(cert, verified)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let verified = rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms);
        self.record(cert, verified)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        CertificateAuthority, fingerprint_sha256, generate_key, node_id, self_signed_certificate,
        verify_self_signed, verify_signed_by,
    };

    const DAY: std::time::Duration = std::time::Duration::from_secs(86_400);
    use time::{Duration, OffsetDateTime};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

    struct Node {
        key: SigningKey,
        cert: Vec<u8>,
        id: String,
    }

    fn node(ca: &CertificateAuthority) -> Node {
        let key = generate_key();
        let pubkey = key.verifying_key().to_bytes();
        Node {
            cert: ca.issue_node_certificate(&pubkey, DAY).unwrap(),
            id: node_id(&pubkey),
            key,
        }
    }

    fn trust(ca: &CertificateAuthority, node_id: Option<&str>) -> ServerTrust {
        ServerTrust::ClusterCa {
            ca_der: ca.cert_der().to_vec(),
            node_id: node_id.map(str::to_string),
        }
    }

    /// Runs a handshake over an in-memory pipe, addressing the server by IP (so no SNI), and
    /// on success checks that data flows both ways.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> (
        std::io::Result<server::TlsStream<tokio::io::DuplexStream>>,
        std::io::Result<client::TlsStream<tokio::io::DuplexStream>>,
    ) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let name = ServerName::try_from("192.0.2.1").unwrap();
        assert!(matches!(name, ServerName::IpAddress(_)));
        let (mut s, mut c) = tokio::join!(
            TlsAcceptor::from(server).accept(server_io),
            TlsConnector::from(client).connect(name, client_io),
        );
        if let (Ok(s), Ok(c)) = (&mut s, &mut c) {
            assert_eq!(s.get_ref().1.alpn_protocol(), Some(ALPN_H2));
            assert_eq!(c.get_ref().1.alpn_protocol(), Some(ALPN_H2));
            assert_eq!(s.get_ref().1.server_name(), None);
            c.write_all(b"ping").await.unwrap();
            c.flush().await.unwrap();
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"ping");
            s.write_all(b"pong").await.unwrap();
            s.flush().await.unwrap();
            c.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"pong");
        }
        (s, c)
    }

    fn peer_certificate(s: &server::TlsStream<tokio::io::DuplexStream>) -> Option<Vec<u8>> {
        s.get_ref()
            .1
            .peer_certificates()
            .map(|certs| certs[0].to_vec())
    }

    #[tokio::test]
    async fn node_to_node_with_client_certificate() {
        let ca = CertificateAuthority::generate().unwrap();
        let a = node(&ca);
        let b = node(&ca);
        let server = server_config(a.cert.clone(), &a.key).unwrap();
        let client = client_config(
            trust(&ca, Some(&a.id)),
            Some((b.cert.clone(), b.key.clone())),
        )
        .unwrap();
        let (s, c) = handshake(server, client).await;
        let (s, c) = (s.unwrap(), c.unwrap());
        let seen = crate::parse_certificate(&peer_certificate(&s).unwrap()).unwrap();
        assert_eq!(seen.der, b.cert);
        assert!(seen.is_node_certificate());
        assert_eq!(seen.node_id(), b.id);
        verify_signed_by(&seen, ca.cert_der(), OffsetDateTime::now_utc()).unwrap();
        let server_seen = c.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        assert_eq!(server_seen, a.cert);
    }

    #[tokio::test]
    async fn a_replaced_certificate_is_served_to_new_connections_only() {
        let ca = CertificateAuthority::generate().unwrap();
        let a = node(&ca);
        let b = node(&ca);
        let live = LiveCertificate::new(a.cert.clone(), a.key.clone()).unwrap();
        let server = server_config_live(live.clone()).unwrap();
        let client_live = LiveCertificate::new(b.cert.clone(), b.key.clone()).unwrap();
        let client =
            client_config_live(trust(&ca, Some(&a.id)), Some(client_live.clone())).unwrap();
        let (s1, c1) = handshake(server.clone(), client.clone()).await;
        let (mut s1, mut c1) = (s1.unwrap(), c1.unwrap());

        let renewed = ca
            .issue_node_certificate(a.key.verifying_key().as_bytes(), DAY)
            .unwrap();
        live.replace(renewed.clone()).unwrap();
        let b_renewed = ca
            .issue_node_certificate(b.key.verifying_key().as_bytes(), DAY)
            .unwrap();
        client_live.replace(b_renewed.clone()).unwrap();
        assert_eq!(live.certificate().der, renewed);
        // Another key's certificate is not a renewal.
        assert!(matches!(
            live.replace(b.cert.clone()),
            Err(IdentityError::CertificateKeyMismatch)
        ));

        let (s2, c2) = handshake(server, client).await;
        let (s2, c2) = (s2.unwrap(), c2.unwrap());
        assert_eq!(
            c2.get_ref().1.peer_certificates().unwrap()[0].to_vec(),
            renewed
        );
        assert_eq!(peer_certificate(&s2).unwrap(), b_renewed);
        // The first connection still works, on the certificates it began with.
        assert_eq!(
            c1.get_ref().1.peer_certificates().unwrap()[0].to_vec(),
            a.cert
        );
        c1.write_all(b"more").await.unwrap();
        c1.flush().await.unwrap();
        let mut buf = [0u8; 4];
        s1.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"more");
    }

    #[tokio::test]
    async fn client_without_certificate() {
        let ca = CertificateAuthority::generate().unwrap();
        let a = node(&ca);
        let server = server_config(a.cert.clone(), &a.key).unwrap();
        let client = client_config(trust(&ca, None), None).unwrap();
        let (s, c) = handshake(server, client).await;
        c.unwrap();
        assert!(peer_certificate(&s.unwrap()).is_none());
    }

    #[tokio::test]
    async fn self_signed_owner_credentials_reach_the_server() {
        let ca = CertificateAuthority::generate().unwrap();
        let a = node(&ca);
        let owner = generate_key();
        let owner_cert = self_signed_certificate(&owner, "owner").unwrap();
        let server = server_config(a.cert.clone(), &a.key).unwrap();
        let client = client_config(trust(&ca, None), Some((owner_cert.clone(), owner))).unwrap();
        let (s, c) = handshake(server, client).await;
        c.unwrap();
        let seen = crate::parse_certificate(&peer_certificate(&s.unwrap()).unwrap()).unwrap();
        assert_eq!(seen.der, owner_cert);
        verify_self_signed(&seen).unwrap();
        assert!(verify_signed_by(&seen, ca.cert_der(), OffsetDateTime::now_utc()).is_err());
    }

    fn client_error(c: std::io::Result<client::TlsStream<tokio::io::DuplexStream>>) -> String {
        match c {
            Ok(_) => panic!("handshake succeeded"),
            Err(e) => e.to_string(),
        }
    }

    fn client_verify_error(
        c: std::io::Result<client::TlsStream<tokio::io::DuplexStream>>,
    ) -> VerifyError {
        let Err(e) = c else {
            panic!("handshake succeeded")
        };
        let e = e.into_inner().unwrap().downcast::<rustls::Error>().unwrap();
        verify_error(&e).unwrap().clone()
    }

    #[tokio::test]
    async fn foreign_ca_rejected() {
        let ca = CertificateAuthority::generate().unwrap();
        let foreign = CertificateAuthority::generate().unwrap();
        let a = node(&ca);
        let server = server_config(a.cert.clone(), &a.key).unwrap();
        let client = client_config(trust(&foreign, None), None).unwrap();
        let (s, c) = handshake(server, client).await;
        assert!(s.is_err());
        let err = client_error(c);
        assert!(
            err.contains("certificate was not issued by the trusted cluster CA"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn wrong_node_rejected() {
        let ca = CertificateAuthority::generate().unwrap();
        let a = node(&ca);
        let b = node(&ca);
        let server = server_config(a.cert.clone(), &a.key).unwrap();
        let client = client_config(trust(&ca, Some(&b.id)), None).unwrap();
        let (s, c) = handshake(server, client).await;
        assert!(s.is_err());
        assert_eq!(
            client_verify_error(c),
            VerifyError::NodeIdMismatch {
                expected: b.id.clone(),
                found: a.id.clone(),
            }
        );
    }

    #[tokio::test]
    async fn server_without_node_certificate_rejected() {
        let ca = CertificateAuthority::generate().unwrap();
        let key = generate_key();
        let user_cert = ca
            .issue_user_certificate("owner", key.verifying_key().as_bytes(), DAY)
            .unwrap();
        let server = server_config(user_cert, &key).unwrap();
        let client = client_config(trust(&ca, None), None).unwrap();
        let (_, c) = handshake(server, client).await;
        let err = client_error(c);
        // webpki already refuses it for lack of serverAuth.
        assert!(err.contains("invalid peer certificate"), "{err}");
    }

    #[tokio::test]
    async fn expired_server_certificate_rejected() {
        let ca = CertificateAuthority::generate().unwrap();
        let key = generate_key();
        let now = OffsetDateTime::now_utc();
        let cert = ca
            .issue_node_certificate_with_validity(
                key.verifying_key().as_bytes(),
                now - Duration::days(2),
                now - Duration::DAY,
            )
            .unwrap();
        let server = server_config(cert, &key).unwrap();
        let client = client_config(trust(&ca, None), None).unwrap();
        let (_, c) = handshake(server, client).await;
        let err = client_error(c);
        assert!(err.contains("expired"), "{err}");
    }

    #[tokio::test]
    async fn capture_records_server_certificate() {
        let ca = CertificateAuthority::generate().unwrap();
        let a = node(&ca);
        let slot = Arc::new(Mutex::new(None));
        let server = server_config(a.cert.clone(), &a.key).unwrap();
        let client = client_config(ServerTrust::Capture(slot.clone()), None).unwrap();
        let (s, c) = handshake(server, client).await;
        s.unwrap();
        c.unwrap();
        let captured = slot.lock().unwrap().clone().unwrap();
        assert_eq!(captured, a.cert);
        assert_eq!(fingerprint_sha256(&captured), fingerprint_sha256(&a.cert));
        // What the caller does next: check the captured certificate against the CA it got.
        let captured = crate::parse_certificate(&captured).unwrap();
        verify_signed_by(&captured, ca.cert_der(), OffsetDateTime::now_utc()).unwrap();
    }

    #[test]
    fn certificate_for_another_key_rejected() {
        let ca = CertificateAuthority::generate().unwrap();
        let a = node(&ca);
        let other = generate_key();
        let err = server_config(a.cert.clone(), &other).unwrap_err();
        assert!(
            matches!(err, IdentityError::CertificateKeyMismatch),
            "{err}"
        );
        let err = client_config(trust(&ca, None), Some((a.cert.clone(), other))).unwrap_err();
        assert!(
            matches!(err, IdentityError::CertificateKeyMismatch),
            "{err}"
        );
        // A leaf is no trust anchor.
        let err = client_config(
            ServerTrust::ClusterCa {
                ca_der: a.cert,
                node_id: None,
            },
            None,
        )
        .unwrap_err();
        assert!(matches!(err, IdentityError::NotCa), "{err}");
    }

    #[test]
    fn rustls_also_checks_key_consistency() {
        // Bypass our own check: rustls itself refuses a key that is not the certificate's.
        let ca = CertificateAuthority::generate().unwrap();
        let a = node(&ca);
        let err = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(a.cert)],
                private_key_der(&generate_key()),
            )
            .unwrap_err();
        assert!(matches!(err, rustls::Error::InconsistentKeys(_)), "{err}");
    }
}
