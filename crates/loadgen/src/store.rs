//! The store side of the registration phase, on either backend: how many
//! store write transactions the registrations cost, and the raw transaction
//! rate of the same store code on the same disk, measured right after them.
//!
//! - The revision (every write transaction is one) is read just before and
//!   just after the registrations: from the node's etcd directly with
//!   `--store etcd`, from the node's `/metrics` (`metropolis_store_revision`)
//!   on the embedded store, whose file the node holds exclusively. A second
//!   of watching it idle beforehand shows whether anything else writes.
//! - The raw rate: as many compare-and-swap transactions as the
//!   registrations made (at least [`MIN_RAW_TXNS`]) with `--concurrency`
//!   writers, each creating one key under [`RAW_PREFIX`] and rewriting it on
//!   its last revision, with a node record's bytes as the value. On etcd
//!   they go to the node's own etcd (one connection); on the embedded store
//!   to an `EmbeddedStore` the loadgen opens next to the node's data, on the
//!   same disk, with the same code (and so the same group commit) as the
//!   node's.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use metropolis_store::{Compare, EmbeddedStore, EtcdStore, Op, Store, Txn};
use prost::Message;
use tokio::task::JoinSet;

use crate::StoreKind;
use crate::node::{self, NodeProcess};
use crate::progress::Progress;
use crate::register::Admitted;
use crate::report::{self, Report};
use crate::stats::{ErrorTally, Samples};

/// Keys of the raw measurement; outside every prefix the curator uses.
pub const RAW_PREFIX: &str = "/loadgen-raw/";
/// How long the store revision is watched with nothing in flight before
/// the registrations, to see writes that are not theirs.
const IDLE_WATCH: Duration = Duration::from_secs(1);
/// Fewest raw transactions: below this, start-up and the tail of the last
/// ones in flight weigh on the rate.
pub const MIN_RAW_TXNS: u64 = 2_000;
/// The embedded store the raw transactions go to, in the run's directory.
const RAW_EMBEDDED_FILE: &str = "loadgen-raw.redb";

/// Where the node's store revision is read.
enum RevisionSource {
    Etcd(Arc<EtcdStore>),
    Metrics(SocketAddr),
}

impl RevisionSource {
    async fn revision(&self) -> anyhow::Result<i64> {
        match self {
            RevisionSource::Etcd(store) => crate::etcd::revision(store).await,
            RevisionSource::Metrics(addr) => metrics_revision(*addr).await,
        }
    }
}

/// The node's store as the registrations find it.
pub struct Before {
    source: RevisionSource,
    /// With etcd: its client socket.
    socket: Option<PathBuf>,
    idle_drift: (i64, Duration),
    revision: i64,
    etcd_cpu: Option<Duration>,
    own_cpu: Option<Duration>,
}

pub async fn before_registration(kind: StoreKind, node: &NodeProcess) -> anyhow::Result<Before> {
    let (source, socket) = match kind {
        StoreKind::Etcd => {
            let socket = node.etcd_socket();
            let store = crate::etcd::connect(&socket).await?;
            (RevisionSource::Etcd(store), Some(socket))
        }
        StoreKind::Embedded => (
            RevisionSource::Metrics(SocketAddr::new(node.addr.ip(), node::PLAIN_METRICS_PORT)),
            None,
        ),
    };
    let idle_start = source.revision().await?;
    tokio::time::sleep(IDLE_WATCH).await;
    let revision = source.revision().await?;
    Ok(Before {
        source,
        socket,
        idle_drift: (revision - idle_start, IDLE_WATCH),
        revision,
        etcd_cpu: etcd_cpu(node),
        own_cpu: node::own_cpu_time().ok(),
    })
}

/// What the raw phase needs besides the node.
pub struct RawSetup<'a> {
    pub concurrency: usize,
    /// The run's temporary directory (the embedded raw store goes there).
    pub dir: &'a Path,
}

/// Reads what the registrations cost the store, then measures the raw
/// transaction rate of the same store. Problems are failures of the run,
/// but the heartbeat phases still run: their figures do not depend on these.
pub async fn after_registration(
    setup: RawSetup<'_>,
    node: &NodeProcess,
    before: Before,
    admitted: &[Admitted],
    registration_wall: Duration,
    r: &mut Report,
    progress: &Progress,
) {
    // Read first, so nothing else lands between the phase and the reading.
    let revision_after = before.source.revision().await;
    let etcd_cpu_registration = cpu_since(before.etcd_cpu, etcd_cpu(node));
    let loadgen_cpu_registration = cpu_since(before.own_cpu, node::own_cpu_time().ok());
    let mut backend = report::StoreBackend {
        etcd_socket: before.socket.as_ref().map(|s| s.display().to_string()),
        idle_drift: Some(before.idle_drift),
        revision_before: before.revision,
        revision_after: None,
        registrations: admitted.len(),
        registration_wall,
        etcd_cpu_registration,
        loadgen_cpu_registration,
        raw: None,
        etcd_rss: None,
        log: None,
    };
    let revision_after = match revision_after {
        Ok(rev) => rev,
        Err(e) => {
            r.failures.push(format!("{e:#}"));
            r.store_backend = Some(backend);
            return;
        }
    };
    backend.revision_after = Some(revision_after);
    match raw_phase(
        &setup,
        node,
        &before.source,
        admitted,
        revision_after - before.revision,
        progress,
    )
    .await
    {
        Ok(raw) => {
            if raw.results.errors.total() > 0 {
                r.failures.push(format!(
                    "{} of {} raw store transactions failed",
                    raw.results.errors.total(),
                    raw.results.attempted
                ));
            }
            backend.raw = Some(raw);
        }
        Err(e) => r.failures.push(format!("{e:#}")),
    }
    backend.etcd_rss = node.etcd_pid().and_then(node::pid_rss).ok();
    r.store_backend = Some(backend);
}

/// As many CAS transactions as the registrations made (at least
/// [`MIN_RAW_TXNS`]), each putting one node record's bytes.
async fn raw_phase(
    setup: &RawSetup<'_>,
    node: &NodeProcess,
    source: &RevisionSource,
    admitted: &[Admitted],
    registration_txns: i64,
    progress: &Progress,
) -> anyhow::Result<report::RawTxns> {
    let first = admitted.first().context(
        "no simulated node was admitted, so there is no node record to size the raw store transactions by",
    )?;
    let (store, record, target): (Arc<dyn Store>, Vec<u8>, String) = match source {
        RevisionSource::Etcd(etcd) => (
            etcd.clone(),
            crate::etcd::node_record(etcd, &first.id).await?,
            "the node's etcd, on one connection".into(),
        ),
        RevisionSource::Metrics(_) => {
            let path = setup.dir.join(RAW_EMBEDDED_FILE);
            let store = EmbeddedStore::open(&path)
                .await
                .with_context(|| format!("opening an embedded store at {}", path.display()))?;
            (
                store,
                node_record_like(first),
                format!(
                    "an embedded store at {} (same code and disk as the node's)",
                    path.display()
                ),
            )
        }
    };
    let total = u64::try_from(registration_txns)
        .unwrap_or(0)
        .max(MIN_RAW_TXNS);
    tracing::info!(
        txns = total,
        concurrency = setup.concurrency,
        value_bytes = record.len(),
        "measuring raw store transactions"
    );
    let value_len = record.len();
    let start_revision = store
        .revision()
        .await
        .context("reading the raw store's revision")?;
    let cpu = etcd_cpu(node);
    let own_cpu = node::own_cpu_time().ok();
    let results = raw_txns(store.clone(), total, setup.concurrency, record, progress).await;
    let etcd_cpu = cpu_since(cpu, etcd_cpu(node));
    let loadgen_cpu = cpu_since(own_cpu, node::own_cpu_time().ok());
    let revision_delta = store.revision().await.ok().map(|rev| rev - start_revision);
    Ok(report::RawTxns {
        target,
        value_len,
        concurrency: setup.concurrency,
        results,
        revision_delta,
        etcd_cpu,
        loadgen_cpu,
    })
}

/// A record of the size the curator stores for a node once it is UP (its
/// key, state, registration time, a certificate's worth of status): the
/// embedded store's file is the node's alone, so the real one cannot be read.
fn node_record_like(node: &Admitted) -> Vec<u8> {
    metropolis_api::private::Node {
        public_key: vec![0x42; 32],
        state: metropolis_api::common::NodeState::Up as i32,
        registered_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
        status: Some(metropolis_api::common::NodeStatus {
            external_address: "127.0.0.2".into(),
            ..Default::default()
        }),
        labels: Some(Default::default()),
        ..Default::default()
    }
    .encode_to_vec()
    .into_iter()
    .chain(node.id.bytes())
    .collect()
}

/// `metropolis_store_revision` from the node's `/metrics`.
async fn metrics_revision(addr: SocketAddr) -> anyhow::Result<i64> {
    use http_body_util::BodyExt;
    let url: hyper::Uri = format!("http://{addr}/metrics/core").parse()?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<hyper::body::Bytes>>();
    let resp = client
        .get(url.clone())
        .await
        .with_context(|| format!("cannot fetch {url}"))?;
    anyhow::ensure!(
        resp.status().is_success(),
        "{url} answered {}",
        resp.status()
    );
    let body = resp
        .into_body()
        .collect()
        .await
        .with_context(|| format!("reading {url}"))?
        .to_bytes();
    parse_revision(&String::from_utf8_lossy(&body)).with_context(|| {
        format!("{url} has no metropolis_store_revision (a node older than this loadgen?)")
    })
}

fn parse_revision(metrics: &str) -> Option<i64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("metropolis_store_revision "))
        .and_then(|v| v.trim().parse().ok())
}

/// CPU time of the node's etcd so far, if it runs one. The PID is read each
/// time: the node would restart a dead etcd under a new one, and a figure
/// across two processes means nothing (`cpu_since` then gives none).
fn etcd_cpu(node: &NodeProcess) -> Option<Duration> {
    node.etcd_pid().and_then(node::pid_cpu_time).ok()
}

fn cpu_since(before: Option<Duration>, now: Option<Duration>) -> Option<Duration> {
    now?.checked_sub(before?)
}

pub struct RawResults {
    /// Transactions that committed.
    pub committed: u64,
    /// Transactions attempted, committed or not.
    pub attempted: u64,
    pub keys: usize,
    pub wall: Duration,
    pub latency: Samples,
    pub errors: ErrorTally,
}

/// Runs `total` compare-and-swap transactions with `concurrency` tasks in
/// flight, all on `store`'s one connection, each writing `value`.
///
/// Each task owns one key, creates it (`Compare::absent`) and then rewrites
/// it on the revision its last write returned: the shape of the curator's
/// node writes (a CAS on the record's mod revision), without conflicts, so
/// that every transaction is one committed write, as every curator write
/// transaction is.
pub async fn raw_txns(
    store: Arc<dyn Store>,
    total: u64,
    concurrency: usize,
    value: Vec<u8>,
    progress: &Progress,
) -> RawResults {
    let value = Arc::new(value);
    let next = Arc::new(AtomicU64::new(0));
    let bar = progress.bar(total, "raw txns");
    let tasks = concurrency.min(total as usize).max(1);
    let start = Instant::now();
    let mut set = JoinSet::new();
    for task in 0..tasks {
        set.spawn(writer(Writer {
            store: store.clone(),
            key: format!("{RAW_PREFIX}{task}").into_bytes(),
            value: value.clone(),
            next: next.clone(),
            total,
            bar: bar.clone(),
        }));
    }
    let mut results = RawResults {
        committed: 0,
        attempted: 0,
        keys: tasks,
        wall: Duration::ZERO,
        latency: Samples::default(),
        errors: ErrorTally::default(),
    };
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(w) => {
                results.committed += w.committed;
                results.attempted += w.attempted;
                for d in w.latencies {
                    results.latency.push(d);
                }
                for (what, message) in w.errors {
                    results.errors.add(what, &message);
                }
            }
            Err(e) => results.errors.add("raw txn task", &e.to_string()),
        }
    }
    results.wall = start.elapsed();
    bar.finish();
    results
}

struct Writer {
    store: Arc<dyn Store>,
    key: Vec<u8>,
    value: Arc<Vec<u8>>,
    next: Arc<AtomicU64>,
    total: u64,
    bar: indicatif::ProgressBar,
}

#[derive(Default)]
struct Written {
    committed: u64,
    attempted: u64,
    /// Of committed transactions only: a failed one says nothing about
    /// the write path.
    latencies: Vec<Duration>,
    errors: Vec<(&'static str, String)>,
}

async fn writer(w: Writer) -> Written {
    let mut out = Written::default();
    // 0: the key does not exist yet.
    let mut rev = 0i64;
    while w.next.fetch_add(1, Ordering::Relaxed) < w.total {
        out.attempted += 1;
        let guard = if rev == 0 {
            Compare::absent(w.key.clone())
        } else {
            Compare::mod_revision(w.key.clone(), rev)
        };
        let txn = Txn::new()
            .when(guard)
            .and_then(Op::put(w.key.clone(), w.value.as_slice()));
        let t = Instant::now();
        let result = w.store.txn(txn).await;
        let took = t.elapsed();
        w.bar.inc(1);
        match result {
            // The put is the transaction's only write, so the revision
            // after it is the key's new mod revision.
            Ok(resp) if resp.succeeded => {
                out.committed += 1;
                out.latencies.push(took);
                rev = resp.revision;
                continue;
            }
            Ok(_) => out.errors.push((
                "raw txn",
                "compare failed although this task is the key's only writer".into(),
            )),
            Err(e) => out.errors.push(("raw txn", e.to_string())),
        }
        // After a failure the key's revision is unknown (a lost reply may
        // still have committed): read it back, and give up on this key if
        // even that fails, rather than spin on a broken store.
        match w.store.get(&w.key).await {
            Ok(kv) => rev = kv.map_or(0, |kv| kv.mod_revision),
            Err(e) => {
                out.errors.push(("raw txn re-read", e.to_string()));
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revision_from_metrics() {
        let text = "# HELP metropolis_store_revision x\n# TYPE metropolis_store_revision gauge\nmetropolis_store_revision 4711\nmetropolis_store_revision_other 3\n";
        assert_eq!(parse_revision(text), Some(4711));
        assert_eq!(parse_revision("metropolis_curator_leader 1\n"), None);
    }
}
