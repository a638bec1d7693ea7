//! Membership of the consensus cluster: which etcd members exist, adding a
//! member as a learner, promoting it to a voter, removing it, the raft
//! status of one member, and moving raft leadership.
//!
//! Every operation is safe to retry after an error or a lost reply: adding a
//! member whose peer URL is already registered returns that member, promoting
//! a voter succeeds, removing a missing member succeeds. A role change the
//! curator repeats after a crash therefore converges instead of failing.

use async_trait::async_trait;

use crate::StoreError;

/// One member of the consensus cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// etcd's member ID (never 0).
    pub id: u64,
    /// The name the member started with; empty until it has started and
    /// published its attributes to the cluster.
    pub name: String,
    /// URLs the other members reach this one at.
    pub peer_urls: Vec<String>,
    /// A learner replicates the log but does not vote and does not count
    /// towards quorum.
    pub is_learner: bool,
}

/// The raft status of one member, as that member sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsensusStatus {
    /// The member that answered.
    pub member_id: u64,
    /// The member it believes leads (0: no leader known).
    pub leader_id: u64,
    pub raft_term: u64,
    /// The store revision at that member.
    pub revision: i64,
    /// Size of the member's database file, including free pages.
    pub db_size_bytes: i64,
}

/// Changes to and status of the consensus cluster's membership.
#[async_trait]
pub trait Consensus: Send + Sync + 'static {
    /// Every member, voters and learners.
    async fn members(&self) -> Result<Vec<Member>, StoreError>;

    /// Adds a learner with this peer URL; if a member with exactly this peer
    /// URL exists already, returns it unchanged (so a retried role change is
    /// harmless).
    async fn add_learner(&self, peer_url: &str) -> Result<Member, StoreError>;

    /// Promotes a learner to voter. Ok(false) while etcd says the learner is
    /// not yet in sync (its "can only promote a learner member which is in
    /// sync with leader" error); Ok(true) when promoted or already a voter.
    async fn promote(&self, id: u64) -> Result<bool, StoreError>;

    /// Removes a member; Ok(()) if it is already gone.
    async fn remove(&self, id: u64) -> Result<(), StoreError>;

    /// Status of the member this client is connected to.
    async fn status(&self) -> Result<ConsensusStatus, StoreError>;

    /// Hands raft leadership to the voter `to`. Only the leader can: the
    /// member this client is connected to must lead. Writes stall for about
    /// one raft heartbeat while leadership moves.
    async fn move_leader(&self, to: u64) -> Result<(), StoreError>;
}
