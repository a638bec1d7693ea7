use metropolis_store::StoreError;
use tonic::Status;

/// Errors of cluster operations, each mapped to the gRPC code a caller can act
/// on.
#[derive(Debug, thiserror::Error)]
pub enum CuratorError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// A call of the contract this implementation does not serve.
    #[error("{0}")]
    Unimplemented(String),
    /// Nothing was done, and the same call may succeed shortly (for example
    /// at a new leader).
    #[error("{0}")]
    Unavailable(String),
    #[error("cluster state is corrupt: {0}")]
    Corrupt(String),
    #[error("consensus store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

impl From<CuratorError> for Status {
    fn from(e: CuratorError) -> Status {
        let msg = e.to_string();
        match e {
            CuratorError::InvalidArgument(_) => Status::invalid_argument(msg),
            CuratorError::NotFound(_) => Status::not_found(msg),
            CuratorError::FailedPrecondition(_) => Status::failed_precondition(msg),
            CuratorError::PermissionDenied(_) => Status::permission_denied(msg),
            CuratorError::AlreadyExists(_) => Status::already_exists(msg),
            CuratorError::Unimplemented(_) => Status::unimplemented(msg),
            CuratorError::Unavailable(_) => Status::unavailable(msg),
            CuratorError::Store(StoreError::Unavailable(_)) => Status::unavailable(msg),
            CuratorError::Store(StoreError::FailedPrecondition(_)) => {
                Status::failed_precondition(msg)
            }
            CuratorError::Corrupt(_) | CuratorError::Store(_) | CuratorError::Internal(_) => {
                tracing::error!(error = %msg, "internal error");
                Status::internal(msg)
            }
        }
    }
}
