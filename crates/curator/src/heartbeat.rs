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
    /// Health transitions, for watchers (see [`HealthChange`]).
    changes: tokio::sync::broadcast::Sender<HealthChange>,
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
            changes: tokio::sync::broadcast::channel(HEALTH_CHANGES_BUFFER).0,
        }
    }

    /// This curator became leader: forget every beat, as the contract asks
    /// of a new leader (health is UNKNOWN for one timeout).
    pub fn start_leading(&self) {
        *self.leader_since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.leading
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.notify(HealthChange::All);
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
        // Whether this beat ends a timeout (or is the first since this
        // curator leads): then health may have turned HEALTHY.
        let revived = match last.get_mut(node_id) {
            Some(t) => now.saturating_duration_since(std::mem::replace(t, now)) >= self.timeout,
            None => {
                last.insert(node_id.to_string(), now);
                true
            }
        };
        drop(last);
        if revived && self.changes.receiver_count() > 0 {
            self.notify(HealthChange::Node(node_id.to_string()));
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
        if self
            .last_heard(node_id)
            .is_some_and(|age| age < self.timeout)
        {
            return Some(true);
        }
        match self.health(node_id, NodeState::Up as i32, Instant::now()).0 {
            Health::Healthy => Some(true),
            Health::HeartbeatTimeout => Some(false),
            _ => None,
        }
    }

    fn last_heard(&self, node_id: &str) -> Option<Duration> {
        let now = Instant::now();
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node_id)
            .map(|t| now.saturating_duration_since(*t))
    }
}

/// How many health changes a slow watcher may have pending before it lags
/// (and then re-reads every node's health, see [`HealthChange`]).
const HEALTH_CHANGES_BUFFER: usize = 1024;

/// A node's health as [`Heartbeats::health`] reports it may have changed.
/// Heartbeats are in memory and timeouts happen by time passing, so nothing
/// in the store shows these; watchers (`node_watch`) subscribe here and
/// compute the health again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthChange {
    /// This node beat after a timeout (or for the first time since this
    /// curator leads), or its last beat just became a timeout ago.
    Node(String),
    /// Every node's: this curator started leading (health UNKNOWN), or its
    /// first timeout as leader passed (health known).
    All,
}

impl Heartbeats {
    /// Health changes from now on. A receiver that lags has missed some:
    /// treat that as [`HealthChange::All`].
    pub fn subscribe_changes(&self) -> tokio::sync::broadcast::Receiver<HealthChange> {
        self.changes.subscribe()
    }

    fn notify(&self, change: HealthChange) {
        // No receivers is not an error: nobody watches.
        let _ = self.changes.send(change);
    }

    /// How often [`Self::report_timeouts`] looks for new timeouts: late by
    /// at most this much, and cheap (one pass over the beats, only while
    /// someone watches).
    pub fn timeout_resolution(&self) -> Duration {
        (self.timeout / 50).clamp(Duration::from_millis(10), Duration::from_millis(100))
    }

    /// Reports nodes whose last beat becomes a timeout ago, and the end of
    /// the first timeout as leader, as they happen; runs until dropped.
    /// Beats that end a timeout are reported by the beat itself.
    pub async fn report_timeouts(self: std::sync::Arc<Self>) {
        let mut checked = Instant::now();
        let mut tick = tokio::time::interval(self.timeout_resolution());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = Instant::now();
            if self.changes.receiver_count() > 0 && self.is_leading() {
                for change in self.timeouts_between(checked, now) {
                    self.notify(change);
                }
            }
            checked = now;
        }
    }

    /// The changes whose moment falls in `(after, until]`: a node whose
    /// last beat was exactly one timeout before a moment in there timed out
    /// then (a later beat would have moved its last beat).
    fn timeouts_between(&self, after: Instant, until: Instant) -> Vec<HealthChange> {
        let crossed = |t: Instant| {
            let due = t + self.timeout;
            after < due && due <= until
        };
        if crossed(self.leader_since()) {
            return vec![HealthChange::All];
        }
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, t)| crossed(**t))
            .map(|(id, _)| HealthChange::Node(id.clone()))
            .collect()
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

    #[test]
    fn health_changes_are_reported_at_the_transitions() {
        let hb = Heartbeats::new(Duration::from_secs(5));
        let mut rx = hb.subscribe_changes();
        let t0 = hb.leader_since();
        let s = Duration::from_secs;
        // The first beat since leading, then beats within the timeout: one
        // change only.
        hb.beat_at("a", t0);
        hb.beat_at("a", t0 + s(1));
        assert_eq!(rx.try_recv().ok(), Some(HealthChange::Node("a".into())));
        assert!(
            rx.try_recv().is_err(),
            "a beat within the timeout changes nothing"
        );
        // The first timeout as leader passes: every node's health is known.
        assert_eq!(
            hb.timeouts_between(t0 + s(4), t0 + s(5)),
            vec![HealthChange::All]
        );
        // a's last beat (t0+1s) becomes a timeout ago at t0+6s, not before
        // and not twice.
        assert_eq!(
            hb.timeouts_between(t0 + s(5), t0 + s(5) + Duration::from_millis(999)),
            vec![]
        );
        assert_eq!(
            hb.timeouts_between(t0 + s(5), t0 + s(6)),
            vec![HealthChange::Node("a".into())]
        );
        assert_eq!(hb.timeouts_between(t0 + s(6), t0 + s(7)), vec![]);
        // A beat after the timeout: HEALTHY again, reported by the beat.
        hb.beat_at("a", t0 + s(8));
        assert_eq!(rx.try_recv().ok(), Some(HealthChange::Node("a".into())));
        assert_eq!(
            hb.health("a", NodeState::Up as i32, t0 + s(8)).0,
            Health::Healthy
        );
        // Leading anew: every node's health is unknown again.
        hb.start_leading();
        assert_eq!(rx.try_recv().ok(), Some(HealthChange::All));
    }
}
