//! Heartbeats and node health.
//!
//! Heartbeats live in the curator's memory only: a store write per beat would
//! cost an fsync (or a Raft round) per node per interval, which does not
//! scale. The price is that a new leader knows nothing about past beats, so
//! for one timeout after it took over it reports health UNKNOWN for the nodes
//! that have not beaten to it yet, as the contract defines; a node is HEALTHY
//! from its first beat to the new leader.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use metropolis_api::api::node::Health;
use metropolis_api::common::NodeState;

pub struct Heartbeats {
    /// When this curator last became leader; beats from before do not count.
    leader_since: Mutex<Instant>,
    /// Whether this curator leads now. Heartbeat streams end when it stops,
    /// so that nodes move to the new leader instead of beating into a
    /// curator whose view nobody reads.
    leading: std::sync::atomic::AtomicBool,
    timeout: Duration,
    last: Mutex<HashMap<String, Instant>>,
    /// Nodes deleted while this curator leads: their open heartbeat streams
    /// are cut at the next beat. (After a restart the authentication layer
    /// refuses them before any stream opens.)
    removed: Mutex<HashSet<String>>,
    received: std::sync::atomic::AtomicU64,
}

impl Heartbeats {
    pub fn new(timeout: Duration) -> Self {
        Heartbeats {
            leader_since: Mutex::new(Instant::now()),
            leading: std::sync::atomic::AtomicBool::new(true),
            timeout,
            last: Mutex::new(HashMap::new()),
            removed: Mutex::new(HashSet::new()),
            received: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// This curator became leader: forget every beat, as the contract asks
    /// of a new leader (health is UNKNOWN for one timeout).
    pub fn start_leading(&self) {
        *self.leader_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.leading
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// This curator no longer leads.
    pub fn stop_leading(&self) {
        self.leading
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_leading(&self) -> bool {
        self.leading.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn leader_since(&self) -> Instant {
        *self.leader_since.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Heartbeats received since this curator started (for metrics).
    pub fn received_total(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn beat(&self, node_id: &str) {
        self.received
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.beat_at(node_id, Instant::now());
    }

    fn beat_at(&self, node_id: &str, now: Instant) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match last.get_mut(node_id) {
            Some(t) => *t = now,
            None => {
                last.insert(node_id.to_string(), now);
            }
        }
    }

    /// The node was deleted from the cluster.
    pub fn remove(&self, node_id: &str) {
        self.forget(node_id);
        self.removed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node_id.to_string());
    }

    pub fn is_removed(&self, node_id: &str) -> bool {
        self.removed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(node_id)
    }

    pub fn forget(&self, node_id: &str) {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node_id);
    }

    /// Health of a node in `state`, and the time since its last heartbeat:
    /// set whenever the node has beaten to this leader, and for a node that
    /// never did the time since leadership began once that is longer than a
    /// timeout.
    pub fn health(&self, node_id: &str, state: i32, now: Instant) -> (Health, Option<Duration>) {
        let last = self
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node_id)
            .copied();
        let since_beat = last.map(|t| now.saturating_duration_since(t));
        if state != NodeState::Up as i32 {
            return (Health::Unknown, since_beat);
        }
        match since_beat {
            Some(since) if since < self.timeout => (Health::Healthy, Some(since)),
            Some(since) => (Health::HeartbeatTimeout, Some(since)),
            // A node that never beat since this curator became leader has
            // been silent at least that long.
            None => {
                let leading = now.saturating_duration_since(self.leader_since());
                if leading < self.timeout {
                    (Health::Unknown, None)
                } else {
                    (Health::HeartbeatTimeout, Some(leading))
                }
            }
        }
    }

    /// Heartbeats held in memory (for metrics and the benchmark).
    pub fn tracked(&self) -> usize {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Consensus membership changes ask whether the other members are alive.
/// They are UP nodes by construction, so health is theirs.
/// A beat this leader received within the timeout proves a node alive.
impl crate::consensus::Liveness for Heartbeats {
    fn is_live(&self, node_id: &str) -> Option<bool> {
        let now = Instant::now();
        let recent = self
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node_id)
            .is_some_and(|t| now.saturating_duration_since(*t) < self.timeout);
        if recent {
            return Some(true);
        }
        match self.health(node_id, NodeState::Up as i32, now).0 {
            Health::Healthy => Some(true),
            Health::HeartbeatTimeout => Some(false),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_the_contract() {
        let hb = Heartbeats::new(Duration::from_secs(5));
        let up = NodeState::Up as i32;
        let t0 = hb.leader_since();
        // A fresh leader knows nothing of a node that has not beaten yet...
        assert_eq!(
            hb.health("a", up, t0 + Duration::from_secs(1)),
            (Health::Unknown, None)
        );
        // ...and a node is healthy from its first beat to it.
        hb.beat_at("a", t0 + Duration::from_millis(500));
        assert_eq!(
            hb.health("a", up, t0 + Duration::from_secs(1)),
            (Health::Healthy, Some(Duration::from_millis(500)))
        );
        let later = t0 + Duration::from_secs(6);
        // Not UP: unknown, whatever the beats (the time since is still told).
        assert_eq!(
            hb.health("a", NodeState::New as i32, later),
            (Health::Unknown, Some(Duration::from_millis(5500)))
        );
        // Beat at t0+0.5s, read at t0+6s: timed out.
        assert_eq!(
            hb.health("a", up, later),
            (Health::HeartbeatTimeout, Some(Duration::from_millis(5500)))
        );
        // Never beat: counted from leadership.
        assert_eq!(
            hb.health("b", up, later),
            (Health::HeartbeatTimeout, Some(Duration::from_secs(6)))
        );
        // A beat a second ago: healthy.
        hb.beat_at("a", t0 + Duration::from_secs(5));
        assert_eq!(
            hb.health("a", up, later),
            (Health::Healthy, Some(Duration::from_secs(1)))
        );
        hb.forget("a");
        assert_eq!(hb.tracked(), 0);
    }

    #[test]
    fn a_fresh_beat_proves_liveness_before_health_is_known() {
        use crate::consensus::Liveness;
        let hb = Heartbeats::new(Duration::from_secs(60));
        hb.start_leading();
        assert_eq!(hb.is_live("a"), None, "nothing heard yet");
        hb.beat("a");
        assert_eq!(hb.is_live("a"), Some(true));
        assert_eq!(
            hb.health("a", NodeState::Up as i32, Instant::now()).0,
            Health::Healthy
        );
        // A new leadership forgets it.
        hb.start_leading();
        assert_eq!(hb.is_live("a"), None);
    }
}
