//! The node's own metrics (upstream's `core` exporter): whether this curator
//! leads, nodes by state and health (from the leader only), RPCs by method
//! and code with latency histograms, heartbeats received, store operation
//! latency, process memory, seconds until this node's certificate expires.
//! [`server`] serves them on port 7840.

pub mod server;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use metropolis_curator::Cluster;
use metropolis_curator::heartbeat::Heartbeats;
use metropolis_store::{
    KeyValue, LeaseId, RangeResponse, Store, StoreError, Txn, TxnResponse, WatchStream,
};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

pub const METRICS_PORT: u16 = 7840;

pub struct Metrics {
    registry: Registry,
    rpc_calls: IntCounterVec,
    rpc_seconds: HistogramVec,
    store_seconds: HistogramVec,
    nodes: IntGaugeVec,
    leader: IntGauge,
    store_revision: IntGauge,
    heartbeats: IntCounter,
    heartbeats_seen: Mutex<u64>,
    certificate_expiry: IntGauge,
    /// The node's certificate as it is renewed ([`Metrics::watch_certificate`]).
    certificate: Mutex<Option<Arc<metropolis_identity::LiveCertificate>>>,
}

impl Metrics {
    pub fn new() -> anyhow::Result<Arc<Metrics>> {
        let registry = Registry::new();
        let rpc_calls = IntCounterVec::new(
            Opts::new(
                "metropolis_rpc_calls_total",
                "Finished gRPC calls by method and status code",
            ),
            &["method", "code"],
        )?;
        let rpc_seconds = HistogramVec::new(
            HistogramOpts::new(
                "metropolis_rpc_duration_seconds",
                "gRPC call latency by method (streams: until the end)",
            ),
            &["method"],
        )?;
        let store_seconds = HistogramVec::new(
            HistogramOpts::new(
                "metropolis_store_operation_duration_seconds",
                "Consensus store operation latency",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
            &["operation"],
        )?;
        let nodes = IntGaugeVec::new(
            Opts::new(
                "metropolis_nodes",
                "Nodes in the cluster by state and health (on the leading curator's node)",
            ),
            &["state", "health"],
        )?;
        let leader = IntGauge::new(
            "metropolis_curator_leader",
            "1 if this node's curator leads the cluster, else 0",
        )?;
        let store_revision = IntGauge::new(
            "metropolis_store_revision",
            "The consensus store's revision (one per write transaction), on consensus members",
        )?;
        let heartbeats = IntCounter::new(
            "metropolis_heartbeats_received_total",
            "Heartbeats received by this curator",
        )?;
        registry.register(Box::new(rpc_calls.clone()))?;
        registry.register(Box::new(rpc_seconds.clone()))?;
        registry.register(Box::new(store_seconds.clone()))?;
        registry.register(Box::new(nodes.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(store_revision.clone()))?;
        registry.register(Box::new(heartbeats.clone()))?;
        let certificate_expiry = IntGauge::new(
            "metropolis_node_certificate_expiry_seconds",
            "Seconds until this node's certificate expires (negative once it has); \
             the node renews it when a third of its lifetime is left",
        )?;
        registry.register(Box::new(certificate_expiry.clone()))?;
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        crate::update::register_metrics(&registry)?;
        Ok(Arc::new(Metrics {
            registry,
            rpc_calls,
            rpc_seconds,
            store_seconds,
            nodes,
            leader,
            store_revision,
            heartbeats,
            heartbeats_seen: Mutex::new(0),
            certificate_expiry,
            certificate: Mutex::new(None),
        }))
    }

    /// Reports `live`'s end of validity from now on.
    pub fn watch_certificate(&self, live: Arc<metropolis_identity::LiveCertificate>) {
        *self.certificate.lock().unwrap_or_else(|p| p.into_inner()) = Some(live);
    }

    /// The observer for `metropolis_rpc::observe::ObserveLayer`.
    pub fn rpc_observer(self: &Arc<Self>) -> metropolis_rpc::observe::Observer {
        let m = self.clone();
        Arc::new(move |path: &str, code: tonic::Code, took: Duration| {
            m.rpc_calls
                .with_label_values(&[path, &format!("{code:?}")])
                .inc();
            m.rpc_seconds
                .with_label_values(&[path])
                .observe(took.as_secs_f64());
        })
    }

    /// Wraps a store so every operation's latency is recorded.
    pub fn instrument(self: &Arc<Self>, store: Arc<dyn Store>) -> Arc<dyn Store> {
        Arc::new(InstrumentedStore {
            inner: store,
            metrics: self.clone(),
        })
    }

    /// Renders every metric, refreshing the ones computed from cluster state.
    pub async fn render(&self, cluster: Option<&(Arc<Cluster>, Arc<Heartbeats>)>) -> String {
        let live = self
            .certificate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(live) = live {
            let left = live.certificate().not_after - time::OffsetDateTime::now_utc();
            self.certificate_expiry.set(left.whole_seconds());
        }
        if let Some((cluster, heartbeats)) = cluster {
            let leading = heartbeats.is_leading();
            self.leader.set(i64::from(leading));
            match cluster.store().revision().await {
                Ok(revision) => self.store_revision.set(revision),
                Err(e) => tracing::warn!(error = %e, "metrics: cannot read the store revision"),
            }
            // Health is the leader's to judge: heartbeats go to the leader
            // only, so a follower's view would call every node timed out.
            self.nodes.reset();
            let nodes = if leading {
                cluster.nodes().await
            } else {
                Ok(Vec::new())
            };
            match nodes {
                Ok(nodes) => {
                    let now = Instant::now();
                    for e in nodes {
                        let (health, _) = heartbeats.health(&e.id, e.node.state, now);
                        let state = metropolis_curator::state::state_name(e.node.state);
                        self.nodes
                            .with_label_values(&[state, health.as_str_name()])
                            .inc();
                    }
                }
                Err(e) => tracing::warn!(error = %e, "metrics: cannot read nodes"),
            }
            let total = heartbeats.received_total();
            let mut seen = self
                .heartbeats_seen
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            self.heartbeats.inc_by(total.saturating_sub(*seen));
            *seen = total;
        }
        let mut out = Vec::new();
        if let Err(e) = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "metrics: encoding failed");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

struct InstrumentedStore {
    inner: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl InstrumentedStore {
    fn timer(&self, op: &str) -> prometheus::HistogramTimer {
        self.metrics
            .store_seconds
            .with_label_values(&[op])
            .start_timer()
    }
}

#[async_trait]
impl Store for InstrumentedStore {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        let _t = self.timer("get");
        self.inner.get(key).await
    }
    async fn range(&self, prefix: &[u8]) -> Result<RangeResponse, StoreError> {
        let _t = self.timer("range");
        self.inner.range(prefix).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let _t = self.timer("txn");
        self.inner.txn(txn).await
    }
    async fn watch(&self, prefix: &[u8], start_revision: i64) -> Result<WatchStream, StoreError> {
        let _t = self.timer("watch");
        self.inner.watch(prefix, start_revision).await
    }
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let _t = self.timer("grant_lease");
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let _t = self.timer("keep_alive");
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let _t = self.timer("revoke_lease");
        self.inner.revoke_lease(lease).await
    }
    async fn revision(&self) -> Result<i64, StoreError> {
        let _t = self.timer("revision");
        self.inner.revision().await
    }
    /// Times the start only: the pages stream for as long as the reader
    /// takes.
    async fn snapshot(
        &self,
        count_prefix: &[u8],
        page_keys: usize,
    ) -> Result<metropolis_store::Snapshot, StoreError> {
        let _t = self.timer("snapshot");
        self.inner.snapshot(count_prefix, page_keys).await
    }
}
