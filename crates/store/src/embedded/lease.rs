//! Lease deadlines: kept in memory only (a reopened store gives every
//! surviving lease a fresh deadline of now + TTL, like etcd after a leader
//! change), and the task that revokes leases whose deadline passed.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::Inner;
use super::commit::Write;
use crate::{LeaseId, StoreError};

/// How long the expiry task waits before retrying a lease whose revocation hit
/// a backend error, so that a failing disk does not turn into a busy loop.
const EXPIRY_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
pub(super) struct LeaseState {
    pub(super) ttl: Duration,
    pub(super) deadline: Instant,
}

/// `now + ttl`, saturating far in the future for absurd TTLs instead of
/// panicking on overflow.
pub(super) fn deadline_after(now: Instant, ttl: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now.checked_add(ttl.min(FAR))
        .unwrap_or_else(|| now + Duration::from_secs(24 * 3600))
}

/// Revokes leases whose deadline passed. Holds only a Weak reference and is
/// additionally aborted by `EmbeddedStore::drop`.
pub(super) async fn expire_leases(inner: Weak<Inner>, wakeup: Arc<Notify>) {
    loop {
        let next_deadline = match inner.upgrade() {
            Some(inner) => inner.lock_leases().values().map(|l| l.deadline).min(),
            None => return,
        };
        // Created before sleeping so that a grant in between is not missed
        // (notify_one stores a permit if nobody is waiting yet).
        let notified = wakeup.notified();
        match next_deadline {
            Some(deadline) => tokio::select! {
                () = tokio::time::sleep_until(deadline) => {}
                () = notified => continue,
            },
            None => {
                notified.await;
                continue;
            }
        }

        let Some(strong) = inner.upgrade() else {
            return;
        };
        let now = Instant::now();
        let due: Vec<(LeaseId, LeaseState)> = {
            let mut leases = strong.lock_leases();
            let ids: Vec<LeaseId> = leases
                .iter()
                .filter(|(_, l)| l.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .filter_map(|id| leases.remove(&id).map(|l| (id, l)))
                .collect()
        };
        for (id, state) in due {
            match strong.submit(Write::Expire(id)).await {
                Ok(_) => tracing::debug!(lease = id, "lease expired"),
                Err(StoreError::LeaseNotFound(_)) => {}
                Err(e) => {
                    tracing::warn!(lease = id, error = %e, "failed to expire lease, retrying");
                    strong.lock_leases().insert(
                        id,
                        LeaseState {
                            deadline: deadline_after(Instant::now(), EXPIRY_RETRY),
                            ..state
                        },
                    );
                }
            }
        }
    }
}
