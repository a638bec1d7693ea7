//! AAA.Escrow: initial credentials for the owner and for named identities.
//!
//! The order of checks and answers is the contract's ("Escrow behaviour" in
//! API.md); clients written against upstream rely on each code. A named
//! identity (see [`crate::identities`]) goes through the same steps as the
//! owner, with its own name and key:
//!
//! 1. connection already authenticated with a cluster certificate →
//!    INVALID_ARGUMENT;
//! 2. `parameters` unset → INVALID_ARGUMENT;
//! 3. name neither `owner` nor a known identity → UNIMPLEMENTED;
//! 4. `public_key` not 32 bytes → INVALID_ARGUMENT;
//! 5. no client certificate → `needed = [KIND_REFRESH_CERTIFICATE]`, then
//!    UNAUTHENTICATED;
//! 6. `public_key` differs from the certificate's key → UNIMPLEMENTED;
//! 7. key is not that identity's key → PERMISSION_DENIED;
//! 8. one response with the certificate (CN = the identity name).

use metropolis_api::quote;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use metropolis_api::api::{
    EscrowRequest, EscrowResponse,
    aaa_server::Aaa,
    escrow_response::{ProofRequest, proof_request::Kind},
};
use metropolis_rpc::Caller;
use tonic::{Request, Response, Status, Streaming};

use crate::identities;
use crate::state::Cluster;

/// The bootstrap owner's identity name, reserved for it.
pub const OWNER: &str = "owner";

pub struct AaaService {
    cluster: Arc<Cluster>,
}

impl AaaService {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        AaaService { cluster }
    }
}

type EscrowStream = Pin<Box<dyn Stream<Item = Result<EscrowResponse, Status>> + Send>>;

fn proof(kind: Kind) -> ProofRequest {
    ProofRequest { kind: kind as i32 }
}

#[tonic::async_trait]
impl Aaa for AaaService {
    type EscrowStream = EscrowStream;

    async fn escrow(
        &self,
        request: Request<Streaming<EscrowRequest>>,
    ) -> Result<Response<EscrowStream>, Status> {
        let caller = Caller::of(&request)?.clone();
        let mut incoming = request.into_inner();
        let first = incoming.next().await.ok_or_else(|| {
            Status::invalid_argument("escrow stream closed before the first request")
        })??;

        if caller.principal.is_some() {
            return Err(Status::invalid_argument(
                "this connection is already authenticated with a cluster certificate; \
                 escrow is only for obtaining initial credentials",
            ));
        }
        let params = first
            .parameters
            .ok_or_else(|| Status::invalid_argument("parameters must be set"))?;
        let name = params.requested_identity_name;
        // The identity's key as the cluster knows it, read once: removing the
        // identity afterwards still takes effect, because every call with the
        // certificate is authorized against the current state.
        let expected_key: Option<Vec<u8>> = if name == OWNER {
            None
        } else {
            match identities::get(self.cluster.store().as_ref(), &name).await? {
                Some(identity) => Some(identity.public_key),
                None => {
                    return Err(Status::unimplemented(format!(
                        "escrow of identity {} is not supported: it is neither {OWNER:?} \
                         nor an identity this cluster knows (the owner adds identities with \
                         `metroctl user add`)",
                        quote(&name)
                    )));
                }
            }
        };
        let public_key: [u8; 32] = params.public_key.as_slice().try_into().map_err(|_| {
            Status::invalid_argument(format!(
                "public_key must be 32 bytes (Ed25519), got {}",
                params.public_key.len()
            ))
        })?;
        let Some(cert) = caller.certificate else {
            let needed = EscrowResponse {
                needed: vec![proof(Kind::RefreshCertificate)],
                ..Default::default()
            };
            let tail = Status::unauthenticated(
                "present a self-signed certificate over the requested public key at the TLS layer",
            );
            let s: EscrowStream = Box::pin(futures::stream::iter([Ok(needed), Err(tail)]));
            return Ok(Response::new(s));
        };
        if cert.public_key != public_key {
            return Err(Status::unimplemented(
                "the requested public_key differs from the key of the TLS client certificate; \
                 escrow for a key other than the presented one is not supported",
            ));
        }
        match expected_key {
            None => {
                let owner = self.cluster.owner_public_key().await?;
                if public_key != owner {
                    return Err(Status::permission_denied(
                        "this key is not the cluster owner's key; use the owner key the cluster was bootstrapped with",
                    ));
                }
            }
            Some(expected) => {
                if expected != public_key {
                    return Err(Status::permission_denied(format!(
                        "this key is not the key registered for identity {}; use the key \
                         whose public half the owner registered (`metroctl user keygen` wrote it)",
                        quote(&name)
                    )));
                }
            }
        }
        let lifetime = self.cluster.lifetimes().await?.user;
        let emitted = self
            .cluster
            .ca()
            .issue_user_certificate(&name, &public_key, lifetime)
            .map_err(|e| {
                Status::internal(format!("issuing certificate for {}: {e}", quote(&name)))
            })?;
        tracing::info!(identity = %name, "issued user certificate through escrow");
        let resp = EscrowResponse {
            fulfilled: vec![proof(Kind::RefreshCertificate)],
            emitted_certificate: emitted,
            ..Default::default()
        };
        let s: EscrowStream = Box::pin(futures::stream::iter([Ok(resp)]));
        Ok(Response::new(s))
    }
}
