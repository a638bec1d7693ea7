//! Watches: live events from the broadcast channel that every commit
//! publishes to, and replay from the on-disk history for a start in the past
//! or a watcher that fell behind.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};

use redb::ReadableDatabase;
use tokio::sync::broadcast;

use super::codec::decode_events;
use super::tables::{HISTORY, META, META_COMPACTED, META_REVISION, backend, meta_get};
use super::{Inner, run_blocking};
use crate::{StoreError, WatchEvent};

/// All events of one committed revision, as published to live watchers.
#[derive(Debug)]
pub(super) struct Revision {
    pub(super) revision: i64,
    pub(super) events: Vec<WatchEvent>,
}

pub(super) struct Replay {
    events: Vec<WatchEvent>,
    /// Store revision of the snapshot the events were read from.
    revision: i64,
}

impl Inner {
    /// Reads the recorded events under `prefix` from revision `from` (0: from
    /// the current revision on, i.e. nothing) up to a snapshot. Returns the
    /// events and the snapshot's revision.
    pub(super) fn read_history(&self, prefix: &[u8], from: i64) -> Result<Replay, StoreError> {
        let txn = self
            .db
            .begin_read()
            .map_err(backend("begin read transaction"))?;
        let meta = txn.open_table(META).map_err(backend("open meta table"))?;
        let history = txn
            .open_table(HISTORY)
            .map_err(backend("open history table"))?;
        let revision = meta_get(&meta, META_REVISION)?;
        let compacted = meta_get(&meta, META_COMPACTED)?;
        let from = if from == 0 { revision + 1 } else { from };
        if from <= compacted {
            return Err(StoreError::Compacted {
                requested: from,
                oldest: compacted + 1,
            });
        }
        let mut events = Vec::new();
        if from <= revision {
            for entry in history
                .range(from..=revision)
                .map_err(backend("read history"))?
            {
                let (rev, data) = entry.map_err(backend("read history"))?;
                decode_events(rev.value(), data.value(), prefix, &mut events)?;
            }
        }
        Ok(Replay { events, revision })
    }
}

/// State of one watch stream. It owns no task: dropping the stream drops the
/// broadcast receiver and with it every resource of the watch.
pub(super) struct Watcher {
    /// Weak so that an open watch does not keep the database open.
    pub(super) inner: Weak<Inner>,
    pub(super) prefix: Vec<u8>,
    pub(super) rx: broadcast::Receiver<Arc<Revision>>,
    pub(super) pending: VecDeque<Result<WatchEvent, StoreError>>,
    /// Events of revisions below this were delivered (or skipped) already.
    pub(super) next_revision: i64,
    pub(super) finished: bool,
}

impl Watcher {
    pub(super) async fn step(mut self) -> Option<(Result<WatchEvent, StoreError>, Self)> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some((item, self));
            }
            if self.finished {
                return None;
            }
            match self.rx.recv().await {
                Ok(published) => {
                    // Revisions at or below the replayed snapshot were already
                    // delivered from the history.
                    if published.revision >= self.next_revision {
                        self.next_revision = published.revision + 1;
                        let events = published
                            .events
                            .iter()
                            .filter(|e| e.kv.key.starts_with(&self.prefix));
                        self.pending.extend(events.cloned().map(Ok));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(
                        missed,
                        from = self.next_revision,
                        "watcher lagged, replaying history"
                    );
                    self.catch_up().await;
                }
                Err(broadcast::error::RecvError::Closed) => {
                    self.fail(StoreError::Unavailable("store was closed".into()));
                }
            }
        }
    }

    /// Recovers from falling behind the live channel by replaying the missed
    /// revisions from the on-disk history, the same way a new watch starts.
    async fn catch_up(&mut self) {
        self.rx = self.rx.resubscribe();
        let Some(inner) = self.inner.upgrade() else {
            return self.fail(StoreError::Unavailable("store was closed".into()));
        };
        let prefix = self.prefix.clone();
        let from = self.next_revision;
        match run_blocking(inner, move |inner| inner.read_history(&prefix, from)).await {
            Ok(replay) => self.absorb(replay),
            Err(e) => {
                tracing::warn!(error = %e, "watcher fell too far behind and is cancelled");
                self.fail(e);
            }
        }
    }

    pub(super) fn absorb(&mut self, replay: Replay) {
        self.pending.extend(replay.events.into_iter().map(Ok));
        self.next_revision = self.next_revision.max(replay.revision + 1);
    }

    pub(super) fn fail(&mut self, error: StoreError) {
        self.pending.push_back(Err(error));
        self.finished = true;
    }
}
