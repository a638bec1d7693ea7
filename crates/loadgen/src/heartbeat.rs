//! Phase 2: every admitted node connects with its own node certificate
//! (identity comes from the TLS client certificate, so connections cannot be
//! shared), joins, reports its status once, and heartbeats on its own stream
//! until told to stop, as the node's `membership::session` does.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use futures::StreamExt;
use metropolis_api::common::NodeStatus;
use metropolis_api::curator::{
    HeartbeatRequest, HeartbeatResponse, JoinNodeRequest, UpdateNodeStatusRequest,
    curator_client::CuratorClient,
};
use metropolis_api::version::spec::{Version, version::Release};
use metropolis_rpc::client::explain_status;
use rand::{Rng, RngCore};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::progress::Progress;
use crate::register::Admitted;
use crate::stats::{ErrorTally, Samples};

/// Live counts over all simulated nodes, read while the beats run.
#[derive(Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    /// Nodes whose first beat was acknowledged.
    pub beating: AtomicU64,
    /// Streams that ended in an error.
    pub failed: AtomicU64,
}

/// An open heartbeat stream.
struct Session {
    index: usize,
    // Held so the connection outlives setup for as long as the stream runs.
    _curator: CuratorClient<Channel>,
    replies: Streaming<HeartbeatResponse>,
    beats: mpsc::Sender<HeartbeatRequest>,
}

/// Retries of a connection that failed (timed out under load), with
/// exponential backoff from [`CONNECT_RETRY_MIN`].
const CONNECT_RETRIES: usize = 3;
const CONNECT_RETRY_MIN: Duration = Duration::from_millis(500);

struct SetupTimings {
    /// Failed connection attempts before the one that worked.
    retries: u64,
    total: Duration,
    connect: Duration,
    join: Duration,
    status: Duration,
    open: Duration,
}

struct Failed {
    step: &'static str,
    message: String,
}

fn status_error(step: &'static str) -> impl FnOnce(tonic::Status) -> Failed {
    move |s| Failed {
        step,
        message: format!("{:?}: {}", s.code(), explain_status(&s)),
    }
}

/// A made-up external address per node: it is only data stored in the
/// node's status, nothing ever connects to it.
fn external_address(index: usize) -> Ipv4Addr {
    let n = (index as u32).wrapping_add(1) & 0x00ff_ffff;
    Ipv4Addr::from(0x0a00_0000 | n)
}

fn status(index: usize) -> NodeStatus {
    let version = |s: &str| s.parse::<i64>().unwrap_or(0);
    let mut boot_id = vec![0u8; 16];
    rand::thread_rng().fill_bytes(&mut boot_id);
    NodeStatus {
        external_address: external_address(index).to_string(),
        running_curator: None,
        timestamp: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
        version: Some(Version {
            release: Some(Release {
                major: version(env!("CARGO_PKG_VERSION_MAJOR")),
                minor: version(env!("CARGO_PKG_VERSION_MINOR")),
                patch: version(env!("CARGO_PKG_VERSION_PATCH")),
            }),
            git_information: None,
            binary_sha256: String::new(),
        }),
        boot_id,
    }
}

async fn open_session(
    addr: SocketAddr,
    ca: Arc<Vec<u8>>,
    node: Admitted,
    index: usize,
) -> Result<(Session, SetupTimings), Failed> {
    let start = Instant::now();
    // A real node retries a connection that timed out (membership's
    // backoff); so does a simulated one, a few times, and says so.
    let identity = (node.certificate, node.key);
    let retries = AtomicU64::new(0);
    let ch = (|| crate::cluster::channel(addr, &ca, identity.clone()))
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(CONNECT_RETRY_MIN)
                .with_max_times(CONNECT_RETRIES)
                .with_jitter(),
        )
        .notify(|_, _| {
            retries.fetch_add(1, Ordering::Relaxed);
        })
        .await
        .map_err(|e| Failed {
            step: "TLS connect",
            message: format!("{e:#}"),
        })?;
    let connect = start.elapsed();
    let mut curator = CuratorClient::new(ch);

    let t = Instant::now();
    curator
        .join_node(JoinNodeRequest::default())
        .await
        .map_err(status_error("JoinNode"))?;
    let join = t.elapsed();

    let t = Instant::now();
    curator
        .update_node_status(UpdateNodeStatusRequest {
            node_id: node.id,
            status: Some(status(index)),
        })
        .await
        .map_err(status_error("UpdateNodeStatus"))?;
    let status = t.elapsed();

    let t = Instant::now();
    // Room for one beat: the encoder takes it right away unless the
    // connection is stuck, and then more queueing would only hide that.
    let (beats, rx) = mpsc::channel(1);
    let replies = curator
        .heartbeat(ReceiverStream::new(rx))
        .await
        .map_err(status_error("Heartbeat"))?
        .into_inner();
    let open = t.elapsed();
    Ok((
        Session {
            index,
            _curator: curator,
            replies,
            beats,
        },
        SetupTimings {
            retries: retries.into_inner(),
            total: start.elapsed(),
            connect,
            join,
            status,
            open,
        },
    ))
}

#[derive(Default)]
pub struct BeatOutcome {
    pub sent: u64,
    pub acked: u64,
    /// When each acknowledged beat was sent, and how long the answer took.
    pub round_trips: Vec<(Instant, Duration)>,
    pub error: Option<String>,
}

/// Beats every `interval` from a random point in the first interval, so
/// that N nodes give a steady N/interval beats per second rather than bursts.
async fn beat(
    mut s: Session,
    mut stop: watch::Receiver<bool>,
    interval: Duration,
    counters: Arc<Counters>,
) -> BeatOutcome {
    let mut out = BeatOutcome::default();
    let first = tokio::time::Instant::now() + interval.mul_f64(rand::thread_rng().r#gen::<f64>());
    let mut ticker = tokio::time::interval_at(first, interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sender = Some(s.beats);
    let mut in_flight: VecDeque<Instant> = VecDeque::new();
    loop {
        tokio::select! {
            // Stop first: a task woken by its ticker and the stop at once must
            // not send one more beat into the burst of streams closing.
            biased;
            // Ending the request stream is the graceful close: the curator
            // then ends its side, after answering every beat it received.
            _ = stop.wait_for(|stop| *stop), if sender.is_some() => {
                sender = None;
            }
            reply = s.replies.next() => match reply {
                Some(Ok(_)) => {
                    out.acked += 1;
                    counters.acked.fetch_add(1, Ordering::Relaxed);
                    if out.acked == 1 {
                        counters.beating.fetch_add(1, Ordering::Relaxed);
                    }
                    match in_flight.pop_front() {
                        Some(sent) => out.round_trips.push((sent, sent.elapsed())),
                        None => {
                            out.error = Some("the curator acknowledged a beat that was never sent".into());
                            break;
                        }
                    }
                }
                Some(Err(status)) => {
                    out.error = Some(format!("{:?}: {}", status.code(), explain_status(&status)));
                    break;
                }
                None => {
                    if sender.is_some() {
                        out.error = Some("the curator ended the heartbeat stream".into());
                    }
                    break;
                }
            },
            _ = ticker.tick(), if sender.is_some() => {
                let Some(tx) = &sender else { continue };
                match tx.try_send(HeartbeatRequest {}) {
                    Ok(()) => {
                        in_flight.push_back(Instant::now());
                        out.sent += 1;
                        counters.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        out.error = Some(format!(
                            "node #{}: the previous beat was still not sent after {interval:?} \
                             (connection stalled)",
                            s.index
                        ));
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        out.error = Some("the request stream was closed by the client library".into());
                        break;
                    }
                }
            }
        }
    }
    if out.error.is_some() {
        counters.failed.fetch_add(1, Ordering::Relaxed);
    }
    out
}

/// All simulated nodes, heartbeating.
pub struct Fleet {
    tasks: JoinSet<BeatOutcome>,
    stop: watch::Sender<bool>,
    pub counters: Arc<Counters>,
}

pub struct Connected {
    pub fleet: Fleet,
    pub errors: ErrorTally,
    /// Connection attempts that failed and were retried.
    pub connect_retries: u64,
    pub wall: Duration,
    pub total: Samples,
    pub connect: Samples,
    pub join: Samples,
    pub status: Samples,
    pub open: Samples,
}

/// Opens a session per node, at most `concurrency` handshakes in flight,
/// and leaves each one beating in its own task.
pub async fn connect_all(
    addr: SocketAddr,
    ca: Arc<Vec<u8>>,
    nodes: Vec<Admitted>,
    concurrency: usize,
    interval: Duration,
    progress: &Progress,
) -> Connected {
    let (stop, stop_rx) = watch::channel(false);
    let counters = Arc::new(Counters::default());
    let mut out = Connected {
        fleet: Fleet {
            tasks: JoinSet::new(),
            stop,
            counters: counters.clone(),
        },
        errors: ErrorTally::default(),
        connect_retries: 0,
        wall: Duration::ZERO,
        total: Samples::default(),
        connect: Samples::default(),
        join: Samples::default(),
        status: Samples::default(),
        open: Samples::default(),
    };
    let bar = progress.bar(nodes.len() as u64, "connect");
    let start = Instant::now();
    let mut setups = futures::stream::iter(nodes.into_iter().enumerate())
        .map(|(index, node)| tokio::spawn(open_session(addr, ca.clone(), node, index)))
        .buffer_unordered(concurrency);
    while let Some(joined) = setups.next().await {
        match joined {
            Ok(Ok((session, t))) => {
                out.connect_retries += t.retries;
                out.total.push(t.total);
                out.connect.push(t.connect);
                out.join.push(t.join);
                out.status.push(t.status);
                out.open.push(t.open);
                out.fleet
                    .tasks
                    .spawn(beat(session, stop_rx.clone(), interval, counters.clone()));
            }
            Ok(Err(f)) => {
                if out.errors.total() == 0 {
                    tracing::warn!(step = f.step, error = %f.message, "heartbeat setup failed (further failures are counted in the report)");
                }
                out.errors.add(f.step, &f.message);
                bar.set_message(format!("{} errors", out.errors.total()));
            }
            Err(e) => out.errors.add("heartbeat setup task", &e.to_string()),
        }
        bar.inc(1);
    }
    out.wall = start.elapsed();
    bar.finish();
    out
}

pub struct Stopped {
    pub sent: u64,
    pub acked: u64,
    pub errors: ErrorTally,
    pub round_trips: Vec<(Instant, Duration)>,
    /// Streams still open `grace` after the stop.
    pub unclosed: usize,
}

impl Fleet {
    pub fn streams(&self) -> usize {
        self.tasks.len()
    }

    /// Ends every request stream and collects what each node saw.
    pub async fn stop(mut self, grace: Duration) -> Stopped {
        let _ = self.stop.send(true);
        let mut out = Stopped {
            sent: 0,
            acked: 0,
            errors: ErrorTally::default(),
            round_trips: Vec::new(),
            unclosed: 0,
        };
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            match tokio::time::timeout_at(deadline, self.tasks.join_next()).await {
                Ok(Some(Ok(o))) => {
                    out.sent += o.sent;
                    out.acked += o.acked;
                    out.round_trips.extend(o.round_trips);
                    if let Some(e) = o.error {
                        out.errors.add("Heartbeat", &e);
                    }
                }
                Ok(Some(Err(e))) => out.errors.add("heartbeat task", &e.to_string()),
                Ok(None) => break,
                Err(_) => {
                    out.unclosed = self.tasks.len();
                    self.tasks.abort_all();
                    // Their beats were counted live; the per-task tallies
                    // are lost with the tasks.
                    out.sent = self.counters.sent.load(Ordering::Relaxed);
                    out.acked = self.counters.acked.load(Ordering::Relaxed);
                    break;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_addresses_are_distinct_and_private() {
        assert_eq!(external_address(0), Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(external_address(9_999), Ipv4Addr::new(10, 0, 39, 16));
        assert_eq!(external_address(255), Ipv4Addr::new(10, 0, 1, 0));
    }
}
