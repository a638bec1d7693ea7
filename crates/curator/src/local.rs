//! CuratorLocal: unauthenticated, public information every node serves.

use std::pin::Pin;

use futures::Stream;
use futures::StreamExt;
use metropolis_api::curator::{
    GetCaCertificateRequest, GetCaCertificateResponse, GetCurrentLeaderRequest,
    GetCurrentLeaderResponse, curator_local_server::CuratorLocal,
};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

/// Who leads the curator, as this node knows it.
pub type LeaderWatch = watch::Receiver<GetCurrentLeaderResponse>;

pub struct CuratorLocalService {
    ca_der: Vec<u8>,
    leader: LeaderWatch,
}

impl CuratorLocalService {
    pub fn new(ca_der: Vec<u8>, leader: LeaderWatch) -> Self {
        CuratorLocalService { ca_der, leader }
    }
}

type LeaderStream = Pin<Box<dyn Stream<Item = Result<GetCurrentLeaderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl CuratorLocal for CuratorLocalService {
    async fn get_ca_certificate(
        &self,
        _: Request<GetCaCertificateRequest>,
    ) -> Result<Response<GetCaCertificateResponse>, Status> {
        Ok(Response::new(GetCaCertificateResponse {
            identity_ca_certificate: self.ca_der.clone(),
        }))
    }

    type GetCurrentLeaderStream = LeaderStream;

    async fn get_current_leader(
        &self,
        _: Request<GetCurrentLeaderRequest>,
    ) -> Result<Response<LeaderStream>, Status> {
        // The current value first, then every change, until the client leaves.
        let s = WatchStream::new(self.leader.clone()).map(Ok);
        Ok(Response::new(Box::pin(s)))
    }
}
