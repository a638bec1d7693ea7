use std::pin::Pin;

use futures::Stream;

/// A lease identifier, as in etcd (non-zero).
pub type LeaseId = i64;

/// A stored key with its metadata, as etcd's `mvccpb.KeyValue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// Revision of the transaction that created this key (since its last delete).
    pub create_revision: i64,
    /// Revision of the transaction that last wrote this key.
    pub mod_revision: i64,
    /// Number of writes since creation (1 after the first put).
    pub version: i64,
    /// Lease attached to the key, 0 for none.
    pub lease: LeaseId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeResponse {
    pub kvs: Vec<KeyValue>,
    pub revision: i64,
}

/// What a [`Compare`] looks at. A missing key has value "absent" (never equal to
/// any value), and create_revision / mod_revision / version 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareTarget {
    Value(Vec<u8>),
    CreateRevision(i64),
    ModRevision(i64),
    Version(i64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Greater,
    Less,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    pub key: Vec<u8>,
    pub op: CompareOp,
    pub target: CompareTarget,
}

impl Compare {
    /// The key does not exist.
    pub fn absent(key: impl Into<Vec<u8>>) -> Self {
        Compare {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::CreateRevision(0),
        }
    }
    /// The key was last written at `rev` (0: it does not exist).
    pub fn mod_revision(key: impl Into<Vec<u8>>, rev: i64) -> Self {
        Compare {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::ModRevision(rev),
        }
    }
    pub fn value_equals(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Compare {
            key: key.into(),
            op: CompareOp::Equal,
            target: CompareTarget::Value(value.into()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: LeaseId,
    },
    Delete {
        key: Vec<u8>,
    },
    DeletePrefix {
        prefix: Vec<u8>,
    },
    Get {
        key: Vec<u8>,
    },
    GetPrefix {
        prefix: Vec<u8>,
    },
}

impl Op {
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: 0,
        }
    }
    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        Op::Delete { key: key.into() }
    }
    pub fn get(key: impl Into<Vec<u8>>) -> Self {
        Op::Get { key: key.into() }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn when(mut self, c: Compare) -> Self {
        self.compares.push(c);
        self
    }
    pub fn and_then(mut self, op: Op) -> Self {
        self.success.push(op);
        self
    }
    pub fn or_else(mut self, op: Op) -> Self {
        self.failure.push(op);
        self
    }
}

/// Result of one [`Op`] in the branch that ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    Put,
    /// Number of keys deleted.
    Delete(i64),
    Get(Vec<KeyValue>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResponse {
    /// Whether the compares held (and `success` ran).
    pub succeeded: bool,
    /// Store revision after the transaction.
    pub revision: i64,
    pub results: Vec<OpResult>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    /// For a delete: key set, value empty, mod_revision = the delete's revision.
    pub kv: KeyValue,
}

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, StoreError>> + Send>>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store backend error: {0}")]
    Backend(String),
    #[error("store is unavailable: {0}")]
    Unavailable(String),
    #[error("requested revision {requested} has been compacted (oldest available: {oldest})")]
    Compacted { requested: i64, oldest: i64 },
    #[error("lease {0} not found or expired")]
    LeaseNotFound(LeaseId),
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The store refuses the request in its current state (e.g. a
    /// membership change it considers unsafe); retrying later may succeed.
    #[error("{0}")]
    FailedPrecondition(String),
}

/// Every key of a store at one revision, delivered page by page (see
/// [`crate::Store::snapshot`]).
pub struct Snapshot {
    /// The revision every page is read at.
    pub revision: i64,
    /// Number of keys under the prefix the caller asked to count, at
    /// `revision`.
    pub counted: u64,
    /// Pages of keys in ascending key order; together they hold every key
    /// once.
    pub pages: PageStream,
}

pub type PageStream = Pin<Box<dyn Stream<Item = Result<Vec<KeyValue>, StoreError>> + Send>>;
