//! Authentication and authorization, in one tower layer in front of every
//! service.
//!
//! The layer sees the gRPC path before any handler runs, looks the method up in
//! the table generated from the `(metropolis.proto.ext.authorization)` options,
//! establishes who the caller is from the TLS client certificate, and asks an
//! [`Authorizer`] what that principal may do. Handlers never re-check
//! permissions; they read the established [`Caller`] from the request
//! extensions when they need to know who called (e.g. a node acting on itself).

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use async_trait::async_trait;
use metropolis_api::authorization::{self, MethodAuthorization};
use metropolis_api::ext::Permission;
use metropolis_api::quote;
use metropolis_identity::Certificate;
use tonic::Status;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// An authenticated caller: the holder of a certificate issued by the cluster
/// CA.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// A node, by its node certificate.
    Node { id: String, public_key: [u8; 32] },
    /// A person or program, by a user certificate (CN = identity name).
    User { name: String, public_key: [u8; 32] },
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Node { id, .. } => write!(f, "node {id}"),
            Principal::User { name, .. } => write!(f, "identity {name:?}"),
        }
    }
}

/// What the layer established about a call, inserted into the request
/// extensions for handlers.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// The client certificate presented at the TLS layer, if any, whoever
    /// issued it. Unauthenticated methods (Escrow, RegisterNode) use it as
    /// proof of key possession: the TLS handshake already verified that the
    /// peer holds the certificate's private key.
    pub certificate: Option<Arc<Certificate>>,
    /// Set when the certificate chains to the cluster CA.
    pub principal: Option<Principal>,
}

impl Caller {
    /// The caller of a request that went through the [`AuthLayer`].
    pub fn of<T>(req: &tonic::Request<T>) -> Result<&Caller, Status> {
        req.extensions()
            .get::<Caller>()
            .ok_or_else(|| Status::internal("request did not pass the authentication layer"))
    }

    /// The calling node's ID, for methods only nodes may use on themselves.
    pub fn node_id(&self) -> Result<&str, Status> {
        match &self.principal {
            Some(Principal::Node { id, .. }) => Ok(id),
            Some(other) => Err(Status::permission_denied(format!(
                "{other} is not a node; only nodes may call this method"
            ))),
            None => Err(Status::unauthenticated(
                "this method needs a node certificate",
            )),
        }
    }
}

/// A set of [`Permission`]s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Permissions(u64);

impl Permissions {
    pub const NONE: Permissions = Permissions(0);
    pub const ALL: Permissions = Permissions(u64::MAX);

    pub fn of(perms: &[Permission]) -> Self {
        Permissions(perms.iter().fold(0, |acc, p| acc | Self::bit(*p)))
    }

    pub fn contains(self, p: Permission) -> bool {
        self.0 & Self::bit(p) != 0
    }

    pub fn without(self, p: Permission) -> Self {
        Permissions(self.0 & !Self::bit(p))
    }

    fn bit(p: Permission) -> u64 {
        // Enum numbers are small (the contract has 13); anything out of range
        // maps to no bit, which denies.
        u32::try_from(p as i32)
            .ok()
            .and_then(|n| 1u64.checked_shl(n))
            .unwrap_or(0)
    }
}

/// Decides what an authenticated principal may do. The node daemon plugs in
/// the cluster's view (identities, removed nodes).
#[async_trait]
pub trait Authorizer: Send + Sync + 'static {
    /// The principal's permissions, or an error status when it may do nothing
    /// at all (e.g. a removed node), which is returned to the caller as is.
    async fn permissions(&self, principal: &Principal) -> Result<Permissions, Status>;
}

struct Shared {
    ca_der: Vec<u8>,
    authorizer: Arc<dyn Authorizer>,
    verified: Verified,
}

/// Certificates recently found to chain to the CA, so that a client making
/// many calls on one connection (an operator, a node) is not parsed and
/// signature-checked again on every call.
const VERIFIED_CAPACITY: usize = 64;

/// That a given DER certificate was signed by the CA never changes (the CA is
/// fixed for the layer's lifetime), so this caches only that fact and the
/// principal the certificate names. Everything that can change is still
/// decided per call: validity times here, and whether the principal may still
/// act (removed nodes and identities) by the [`Authorizer`].
#[derive(Default)]
struct Verified {
    /// Oldest first; looked up by the whole DER, not a digest of it.
    entries: Mutex<VecDeque<(Arc<Certificate>, Principal)>>,
}

impl Verified {
    fn get(&self, der: &[u8], now: time::OffsetDateTime) -> Option<(Arc<Certificate>, Principal)> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (cert, principal) = entries.iter().find(|(c, _)| c.der == der)?;
        // Outside its validity the slow path refuses it with the reason.
        cert.validity_at(now)
            .is_ok()
            .then(|| (cert.clone(), principal.clone()))
    }

    fn insert(&self, cert: Arc<Certificate>, principal: Principal) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.iter().any(|(c, _)| c.der == cert.der) {
            return;
        }
        if entries.len() >= VERIFIED_CAPACITY {
            entries.pop_front();
        }
        entries.push_back((cert, principal));
    }
}

/// The tower layer; add it with `Server::builder().layer(..)`.
#[derive(Clone)]
pub struct AuthLayer {
    shared: Arc<Shared>,
}

impl AuthLayer {
    pub fn new(ca_der: Vec<u8>, authorizer: Arc<dyn Authorizer>) -> Self {
        AuthLayer {
            shared: Arc::new(Shared {
                ca_der,
                authorizer,
                verified: Verified::default(),
            }),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B, R> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The clone is not necessarily ready; keep the one that was polled
        // ready and leave the fresh clone in its place (tower's documented
        // pattern).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(async move {
            let certs = req
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.peer_certs());
            let leaf = certs.as_ref().and_then(|c| c.first()).map(|c| c.as_ref());
            match check(&shared, req.uri().path(), leaf).await {
                Ok(caller) => {
                    req.extensions_mut().insert(caller);
                    inner.call(req).await
                }
                Err(status) => {
                    tracing::debug!(path = req.uri().path(), %status, "call refused");
                    Ok(status.into_http())
                }
            }
        })
    }
}

async fn check(shared: &Shared, path: &str, leaf: Option<&[u8]>) -> Result<Caller, Status> {
    check_at(shared, path, leaf, time::OffsetDateTime::now_utc()).await
}

async fn check_at(
    shared: &Shared,
    path: &str,
    leaf: Option<&[u8]>,
    now: time::OffsetDateTime,
) -> Result<Caller, Status> {
    let method = authorization::lookup(path)
        .ok_or_else(|| Status::unimplemented(format!("unknown method {}", quote(path))))?;
    let cached = leaf.and_then(|der| shared.verified.get(der, now));
    let (certificate, principal) = match (cached, leaf) {
        (Some((cert, principal)), _) => (Some(cert), Some(principal)),
        (None, Some(der)) => {
            let cert = Arc::new(metropolis_identity::parse_certificate(der).map_err(|e| {
                Status::unauthenticated(format!("client certificate could not be parsed: {e}"))
            })?);
            let principal = match authenticate_at(&shared.ca_der, &cert, now) {
                Ok(p) => {
                    shared.verified.insert(cert.clone(), p.clone());
                    Some(p)
                }
                // A certificate the cluster did not issue is still useful to
                // unauthenticated methods (proof of key possession).
                Err(_) if method.allow_unauthenticated => None,
                Err(status) => return Err(status),
            };
            (Some(cert), principal)
        }
        (None, None) => (None, None),
    };
    if method.allow_unauthenticated {
        return Ok(Caller {
            certificate,
            principal,
        });
    }
    let Some(principal) = principal else {
        return Err(Status::unauthenticated(
            "no client certificate was presented; this method needs a certificate issued by \
             the cluster CA (for operators: run `metroctl takeownership`)",
        ));
    };
    let perms = shared.authorizer.permissions(&principal).await?;
    authorize(method, &principal, perms)?;
    Ok(Caller {
        certificate,
        principal: Some(principal),
    })
}

/// Establishes who holds `cert`: it must chain to the cluster CA and be a node
/// or a user certificate.
pub fn authenticate(ca_der: &[u8], cert: &Certificate) -> Result<Principal, Status> {
    authenticate_at(ca_der, cert, time::OffsetDateTime::now_utc())
}

fn authenticate_at(
    ca_der: &[u8],
    cert: &Certificate,
    now: time::OffsetDateTime,
) -> Result<Principal, Status> {
    metropolis_identity::verify_signed_by(cert, ca_der, now).map_err(|e| match e {
        // The one refusal every holder meets in time: say when, and how to
        // get a new one.
        metropolis_identity::VerifyError::Expired { not_after, .. } => {
            Status::unauthenticated(expired_message(cert, not_after))
        }
        e => Status::unauthenticated(format!(
            "client certificate {} is not valid for this cluster: {e}",
            quote(&cert.common_name)
        )),
    })?;
    if cert.is_node_certificate() {
        Ok(Principal::Node {
            id: cert.common_name.clone(),
            public_key: cert.public_key,
        })
    } else if cert.is_user_certificate() {
        Ok(Principal::User {
            name: cert.common_name.clone(),
            public_key: cert.public_key,
        })
    } else {
        Err(Status::unauthenticated(format!(
            "client certificate {} is neither a node nor a user certificate",
            quote(&cert.common_name)
        )))
    }
}

/// What an expired certificate's holder reads.
fn expired_message(cert: &Certificate, not_after: time::OffsetDateTime) -> String {
    let at = metropolis_identity::rfc3339(not_after);
    if cert.is_node_certificate() {
        format!(
            "certificate of node {} expired at {at}; a node renews its certificate by itself \
             (NodeCurator.RenewNodeCertificate with its node key): restart it if it did not",
            quote(&cert.common_name)
        )
    } else {
        format!(
            "certificate {} expired at {at}; run `metroctl takeownership` (the owner) or \
             `metroctl login` (a named identity) to get a new one",
            quote(&cert.common_name)
        )
    }
}

fn authorize(
    method: &MethodAuthorization,
    principal: &Principal,
    perms: Permissions,
) -> Result<(), Status> {
    let missing: Vec<&str> = method
        .need()
        .filter(|p| !perms.contains(*p))
        .map(|p| p.as_str_name())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "{principal} may not call {}: it lacks {}",
            method.path,
            missing.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: std::time::Duration = std::time::Duration::from_secs(86_400);

    #[test]
    fn permission_sets() {
        let p = Permissions::of(&[Permission::ReadClusterStatus, Permission::UpdateNodeSelf]);
        assert!(p.contains(Permission::ReadClusterStatus));
        assert!(!p.contains(Permission::DeleteNode));
        assert!(Permissions::ALL.contains(Permission::ConfigureCluster));
        assert!(
            !Permissions::ALL
                .without(Permission::ConfigureCluster)
                .contains(Permission::ConfigureCluster)
        );
        assert!(!Permissions::NONE.contains(Permission::GetRegisterTicket));
    }

    #[test]
    fn missing_permissions_are_named() {
        let m =
            authorization::lookup("/metropolis.proto.api.Management/DeleteNode").expect("method");
        let who = Principal::User {
            name: "reader".into(),
            public_key: [0; 32],
        };
        let err = authorize(m, &who, Permissions::of(&[Permission::ReadClusterStatus]))
            .expect_err("denied");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            err.message().contains("PERMISSION_DELETE_NODE"),
            "{}",
            err.message()
        );
        assert!(authorize(m, &who, Permissions::ALL).is_ok());
    }

    /// Counts the authorizer's calls, and refuses once told to: a cached
    /// certificate must not bypass it.
    #[derive(Default)]
    struct Counting {
        calls: std::sync::atomic::AtomicUsize,
        refuse: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl Authorizer for Counting {
        async fn permissions(&self, _: &Principal) -> Result<Permissions, Status> {
            use std::sync::atomic::Ordering;
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.refuse.load(Ordering::SeqCst) {
                Err(Status::permission_denied("removed"))
            } else {
                Ok(Permissions::ALL)
            }
        }
    }

    #[test]
    fn verified_certificates_are_cached_but_authorized_per_call() {
        use std::sync::atomic::Ordering;
        let ca = metropolis_identity::CertificateAuthority::generate().expect("ca");
        let key = metropolis_identity::generate_key();
        let der = ca
            .issue_user_certificate("alice", &key.verifying_key().to_bytes(), DAY)
            .expect("cert");
        let authorizer = Arc::new(Counting::default());
        let shared = Shared {
            ca_der: ca.cert_der().to_vec(),
            authorizer: authorizer.clone(),
            verified: Verified::default(),
        };
        let path = "/metropolis.proto.api.Management/DeleteNode";
        for _ in 0..3 {
            let caller =
                futures::executor::block_on(check(&shared, path, Some(&der))).expect("allowed");
            assert!(
                matches!(caller.principal, Some(Principal::User { ref name, .. }) if name == "alice")
            );
        }
        assert_eq!(shared.verified.entries.lock().expect("lock").len(), 1);
        assert_eq!(authorizer.calls.load(Ordering::SeqCst), 3);
        authorizer.refuse.store(true, Ordering::SeqCst);
        let err = futures::executor::block_on(check(&shared, path, Some(&der)))
            .expect_err("refused at once");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn cached_certificates_expire() {
        let ca = metropolis_identity::CertificateAuthority::generate().expect("ca");
        let other = metropolis_identity::CertificateAuthority::generate().expect("other ca");
        let key = metropolis_identity::generate_key()
            .verifying_key()
            .to_bytes();
        let now = time::OffsetDateTime::now_utc();
        let der = ca
            .issue_user_certificate_with_validity(
                "bob",
                &key,
                now - time::Duration::hours(2),
                now + time::Duration::seconds(1),
            )
            .expect("cert");
        let shared = Shared {
            ca_der: ca.cert_der().to_vec(),
            authorizer: Arc::new(Counting::default()),
            verified: Verified::default(),
        };
        let path = "/metropolis.proto.api.Management/DeleteNode";
        futures::executor::block_on(check(&shared, path, Some(&der))).expect("valid now");
        assert!(shared.verified.get(&der, now).is_some());
        let later = now + time::Duration::minutes(1);
        assert!(shared.verified.get(&der, later).is_none(), "expired");
        let err = futures::executor::block_on(check_at(&shared, path, Some(&der), later))
            .expect_err("expired");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let at = metropolis_identity::rfc3339(now + time::Duration::seconds(1));
        assert!(
            err.message().contains(&format!("expired at {at}"))
                && err.message().contains("metroctl takeownership"),
            "{}",
            err.message()
        );
        // A certificate of another CA is never found, whatever the cache holds.
        let foreign = other
            .issue_user_certificate("bob", &key, DAY)
            .expect("cert");
        assert!(shared.verified.get(&foreign, now).is_none());
        let err = futures::executor::block_on(check(&shared, path, Some(&foreign)))
            .expect_err("other CA");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }
}
