//! The figures of one run and the plain-text report they print as.

use std::fmt::Write;
use std::time::Duration;

use crate::getnodes::{HealthCount, HealthReport, Timings, UP_FILTER};
use crate::stats::{ErrorTally, Samples, fmt_bytes, fmt_duration, fmt_opt_duration};

/// GetNodes with a filter must answer within this.
const FILTERED_TARGET: Duration = Duration::from_millis(100);
/// ... and take at most this many times as long as without one.
const RATIO_TARGET: f64 = 1.5;
/// Curator memory per node.
const BYTES_PER_NODE_TARGET: f64 = 4096.0;
/// Node memory per connected node: its state, TLS, HTTP/2 and heartbeat stream.
const BYTES_PER_CONNECTED_NODE_TARGET: f64 = 16.0 * 1024.0;
/// The curator's store-write rate while registering, as a share of what the
/// same store commits for bare CAS transactions.
const RAW_SHARE_TARGET: f64 = 50.0;

#[derive(Default)]
pub struct Report {
    pub command_line: String,
    pub node_binary: String,
    pub node_addr: String,
    pub node_pid: u32,
    pub data_dir: String,
    /// The data directory survives the run (--keep).
    pub kept: bool,
    pub nodes: usize,
    pub concurrency: usize,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub duration: Duration,
    /// The node's store backend (`--store`).
    pub store: &'static str,
    pub node_ready_after: Option<Duration>,

    pub registration: Option<Registration>,
    pub store_backend: Option<StoreBackend>,
    pub connections: Option<Connections>,
    pub heartbeats: Option<Heartbeats>,
    pub get_nodes: Option<Timings>,
    pub health: Option<HealthReport>,
    pub memory: Memory,
    pub node_nofile: Option<(String, String)>,
    pub node_fds_during_heartbeats: Option<usize>,
    pub node_threads: Option<u64>,
    pub loadgen_nofile: Option<(crate::node::Rlim, crate::node::Rlim)>,
    pub loadgen_rss: Option<u64>,
    pub loadgen_cpu: Option<Duration>,
    pub wall: Duration,
    pub node_exit: Option<String>,

    /// Things that went wrong; any makes the run fail.
    pub failures: Vec<String>,
    /// Things worth knowing that are not failures.
    pub notes: Vec<String>,
}

pub struct Registration {
    pub admitted: usize,
    pub errors: ErrorTally,
    pub wall: Duration,
    pub cycle: Samples,
    pub connect: Samples,
    pub register: Samples,
    pub approve: Samples,
    pub commit: Samples,
    pub node_cpu: Option<Duration>,
}

/// The store side of the registration phase, and the same store's raw
/// transaction rate measured right after it.
pub struct StoreBackend {
    /// With `--store etcd`: the etcd client socket the loadgen used.
    pub etcd_socket: Option<String>,
    /// Revision movement while nothing was asked of the node, just before
    /// the registrations: writes the delta below includes that are not
    /// theirs.
    pub idle_drift: Option<(i64, Duration)>,
    pub revision_before: i64,
    pub revision_after: Option<i64>,
    /// Nodes admitted and the registration phase's wall time.
    pub registrations: usize,
    pub registration_wall: Duration,
    pub etcd_cpu_registration: Option<Duration>,
    /// The loadgen's own CPU over the registrations: it shares the machine
    /// with the node and etcd, and its client-side crypto is not small.
    pub loadgen_cpu_registration: Option<Duration>,
    pub raw: Option<RawTxns>,
    pub etcd_rss: Option<u64>,
    /// Read at the end of the run.
    pub log: Option<crate::etcd::EtcdLog>,
}

pub struct RawTxns {
    /// Which store the raw transactions went to.
    pub target: String,
    /// Size of the value each transaction puts: one real node record.
    pub value_len: usize,
    pub concurrency: usize,
    pub results: crate::store::RawResults,
    /// How far the revision moved over the raw phase.
    pub revision_delta: Option<i64>,
    pub etcd_cpu: Option<Duration>,
    pub loadgen_cpu: Option<Duration>,
}

impl StoreBackend {
    /// Write transactions per admitted node.
    pub fn txns_per_registration(&self) -> Option<f64> {
        let delta = self.revision_after? - self.revision_before;
        (self.registrations > 0).then(|| delta as f64 / self.registrations as f64)
    }

    pub fn registrations_per_sec(&self) -> f64 {
        self.registrations as f64 / self.registration_wall.as_secs_f64().max(1e-9)
    }
}

impl RawTxns {
    pub fn per_sec(&self) -> f64 {
        self.results.committed as f64 / self.results.wall.as_secs_f64().max(1e-9)
    }
}

pub struct Connections {
    pub attempted: usize,
    pub opened: usize,
    pub errors: ErrorTally,
    pub connect_retries: u64,
    pub wall: Duration,
    pub total: Samples,
    pub connect: Samples,
    pub join: Samples,
    pub status: Samples,
    pub open: Samples,
    pub node_cpu: Option<Duration>,
}

pub struct Heartbeats {
    /// From all streams open to the stop.
    pub window: Duration,
    pub first_beats_after: Duration,
    pub sent: u64,
    pub acked: u64,
    pub errors: ErrorTally,
    /// Beat round trips by when the beat was sent.
    pub round_trips: RoundTrips,
    pub unclosed: usize,
    /// The part of the window without GetNodes calls.
    pub steady: Option<Steady>,
}

#[derive(Default)]
pub struct RoundTrips {
    pub all: Samples,
    /// Sent while other nodes were still connecting.
    pub connecting: Samples,
    /// Sent while waiting for first beats and during the GetNodes calls.
    pub measuring: Samples,
    /// Sent in the steady state: heartbeats only.
    pub steady: Samples,
}

pub struct Steady {
    pub length: Duration,
    pub acked: u64,
    pub node_cpu: Option<Duration>,
    pub loadgen_cpu: Option<Duration>,
}

#[derive(Default)]
pub struct Memory {
    pub baseline: Option<u64>,
    pub after_registration: Option<u64>,
    pub during_heartbeats: Option<u64>,
    pub after_get_nodes: Option<u64>,
    pub peak: Option<u64>,
}

impl Report {
    pub fn failed(&self) -> bool {
        !self.failures.is_empty()
    }

    fn admitted(&self) -> usize {
        self.registration.as_ref().map_or(0, |r| r.admitted)
    }

    /// (figure - baseline) / admitted nodes, in bytes.
    fn per_node(&self, figure: Option<u64>) -> Option<f64> {
        let admitted = self.admitted();
        (admitted > 0).then_some(())?;
        Some((figure? as i64 - self.memory.baseline? as i64) as f64 / admitted as f64)
    }

    /// Fewest simulated nodes HEALTHY over every GetNodes read.
    fn healthy_min(&self) -> Option<usize> {
        let admitted = self.admitted();
        let reads = self
            .get_nodes
            .iter()
            .flat_map(|g| g.unhealthy_per_read.iter())
            .map(|&unhealthy| admitted.saturating_sub(unhealthy));
        let health = self.health.as_ref().map(|h| h.simulated.healthy);
        reads.chain(health).min()
    }

    /// The figures of `--summary-json`, one key per goal of the scale issue.
    pub fn summary(&self) -> serde_json::Value {
        let store = self.store_backend.as_ref();
        let per_reg = store.and_then(StoreBackend::txns_per_registration);
        let raw_rate = store.and_then(|s| s.raw.as_ref()).map(RawTxns::per_sec);
        let reg_rate = self
            .registration
            .as_ref()
            .map(|r| r.admitted as f64 / r.wall.as_secs_f64().max(1e-9));
        let ratio = match (reg_rate, per_reg, raw_rate) {
            (Some(reg), Some(per), Some(raw)) if raw > 0.0 => Some(reg * per / raw),
            _ => None,
        };
        let steady = self.heartbeats.as_ref().and_then(|h| h.steady.as_ref());
        let rtt_p99 = self.heartbeats.as_ref().and_then(|h| {
            let rt = &h.round_trips;
            let mut s = if rt.steady.len() > 0 {
                rt.steady.clone()
            } else {
                rt.all.clone()
            };
            s.percentile(99.0)
        });
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
        let get_nodes = self.get_nodes.as_ref();
        let throughput = get_nodes.and_then(Timings::unfiltered_throughput);
        serde_json::json!({
            "nodes": self.nodes,
            "store": self.store,
            "healthy_min": self.healthy_min(),
            "bytes_per_connected_node": self.per_node(self.memory.during_heartbeats),
            "bytes_per_node_state": self.per_node(self.memory.after_registration),
            "registrations_per_s": reg_rate,
            "store_txns_per_registration": per_reg,
            "raw_store_txns_per_s": raw_rate,
            "store_ratio": ratio,
            "heartbeats_per_s": steady.map(|s| s.acked as f64 / s.length.as_secs_f64().max(1e-9)),
            "heartbeat_rtt_p99_ms": ms(rtt_p99),
            "get_nodes_ms": {
                "unfiltered": ms(get_nodes.and_then(|g| g.unfiltered.clone().median())),
                "filtered": ms(get_nodes.and_then(|g| g.filtered.clone().median())),
            },
            "get_nodes_unfiltered_nodes_per_s": throughput.map(|t| t.0),
            "get_nodes_unfiltered_mb_per_s": throughput.map(|t| t.1),
            "failed": self.failed(),
        })
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        self.render_into(&mut o);
        o
    }

    fn render_into(&self, o: &mut String) {
        // Writing to a String cannot fail; the results are ignored below.
        let _ = writeln!(o, "\n=== metropolis-loadgen report ===");
        let _ = writeln!(o, "command:      {}", self.command_line);
        let _ = writeln!(
            o,
            "node:         {} (pid {}) on {}, --heartbeat-timeout {}",
            self.node_binary,
            self.node_pid,
            self.node_addr,
            humantime::format_duration(self.heartbeat_timeout)
        );
        let _ = writeln!(
            o,
            "data dir:     {} ({})",
            self.data_dir,
            if self.kept {
                "kept"
            } else {
                "removed at exit; --keep keeps it"
            }
        );
        let _ = writeln!(
            o,
            "simulated:    {} nodes, {} in flight, heartbeat every {}, heartbeats run {}",
            self.nodes,
            self.concurrency,
            humantime::format_duration(self.heartbeat_interval),
            humantime::format_duration(self.duration)
        );
        let _ = writeln!(o, "store:        {}", self.store);
        if let Some(d) = self.node_ready_after {
            let _ = writeln!(o, "node serving after {}", fmt_duration(d));
        }
        let _ = writeln!(o, "total wall time: {}", fmt_duration(self.wall));

        if let Some(r) = &self.registration {
            let _ = writeln!(
                o,
                "\n-- Registration (key + self-signed cert + TLS + RegisterNode + owner ApproveNode + CommitNode)"
            );
            let _ = writeln!(
                o,
                "  admitted {} of {}, errors {}, in {}",
                r.admitted,
                self.nodes,
                r.errors.total(),
                fmt_duration(r.wall)
            );
            let _ = writeln!(
                o,
                "  throughput  {:.1} nodes/s (full cycles completed / wall time)",
                r.admitted as f64 / r.wall.as_secs_f64().max(1e-9)
            );
            cpu_line(o, "  node CPU   ", r.node_cpu, r.wall);
            latency_header(o);
            latency_row(o, "full cycle", &mut r.cycle.clone());
            latency_row(o, "TLS connect", &mut r.connect.clone());
            latency_row(o, "RegisterNode", &mut r.register.clone());
            latency_row(o, "ApproveNode", &mut r.approve.clone());
            latency_row(o, "CommitNode", &mut r.commit.clone());
            errors(o, &r.errors);
        }

        if let Some(e) = &self.store_backend {
            render_store(o, e);
        }

        if let Some(c) = &self.connections {
            let _ = writeln!(
                o,
                "\n-- Heartbeat connections (TLS with node cert + JoinNode + UpdateNodeStatus + open Heartbeat stream)"
            );
            let _ = writeln!(
                o,
                "  opened {} of {}, errors {}, in {} ({:.1} connections/s)",
                c.opened,
                c.attempted,
                c.errors.total(),
                fmt_duration(c.wall),
                c.opened as f64 / c.wall.as_secs_f64().max(1e-9)
            );
            if c.connect_retries > 0 {
                let _ = writeln!(
                    o,
                    "  connection attempts that failed and were retried (as a node would): {}",
                    c.connect_retries
                );
            }
            cpu_line(o, "  node CPU   ", c.node_cpu, c.wall);
            latency_header(o);
            latency_row(o, "whole setup", &mut c.total.clone());
            latency_row(o, "TLS connect", &mut c.connect.clone());
            latency_row(o, "JoinNode", &mut c.join.clone());
            latency_row(o, "UpdateNodeStatus", &mut c.status.clone());
            latency_row(o, "open Heartbeat", &mut c.open.clone());
            errors(o, &c.errors);
        }

        if let Some(h) = &self.heartbeats {
            let _ = writeln!(
                o,
                "\n-- Heartbeats (one stream per node, jittered start, window from all streams open to stop)"
            );
            let _ = writeln!(
                o,
                "  window {}, every node's first beat acknowledged after {}",
                fmt_duration(h.window),
                fmt_duration(h.first_beats_after)
            );
            let _ = writeln!(
                o,
                "  beats sent {}, acknowledged {}, unacknowledged {}, errors {}, streams not closed after stop {}",
                h.sent,
                h.acked,
                h.sent.saturating_sub(h.acked),
                h.errors.total(),
                h.unclosed
            );
            if let Some(s) = &h.steady {
                let expected = self.connections.as_ref().map_or(0, |c| c.opened) as f64
                    / self.heartbeat_interval.as_secs_f64().max(1e-9);
                let _ = writeln!(
                    o,
                    "  steady state ({} without GetNodes): {:.0} beats/s acknowledged (expected {:.0})",
                    fmt_duration(s.length),
                    s.acked as f64 / s.length.as_secs_f64().max(1e-9),
                    expected
                );
                cpu_line(o, "  node CPU    ", s.node_cpu, s.length);
                cpu_line(o, "  loadgen CPU ", s.loadgen_cpu, s.length);
            }
            latency_header(o);
            let rt = &h.round_trips;
            latency_row(o, "beat round trip", &mut rt.all.clone());
            latency_row(o, "  while connecting", &mut rt.connecting.clone());
            latency_row(o, "  wait + GetNodes", &mut rt.measuring.clone());
            latency_row(o, "  steady state", &mut rt.steady.clone());
            errors(o, &h.errors);
        }

        if let Some(g) = &self.get_nodes {
            let mut unf = g.unfiltered.clone();
            let mut fil = g.filtered.clone();
            let _ = writeln!(
                o,
                "\n-- Management.GetNodes as owner ({} calls each, alternating, stream fully read, during heartbeats)",
                unf.len()
            );
            let _ = writeln!(
                o,
                "  {:<30} {:>10} {:>10} {:>10} {:>10} {:>8}",
                "filter", "median", "p90", "min", "max", "nodes"
            );
            for (name, s, n) in [
                ("(none)", &mut unf, g.unfiltered_count),
                (UP_FILTER, &mut fil, g.filtered_count),
            ] {
                let _ = writeln!(
                    o,
                    "  {:<30} {:>10} {:>10} {:>10} {:>10} {:>8}",
                    name,
                    fmt_opt_duration(s.median()),
                    fmt_opt_duration(s.percentile(90.0)),
                    fmt_opt_duration(s.min()),
                    fmt_opt_duration(s.max()),
                    n
                );
            }
            if let (Some(f), Some(u)) = (fil.median(), unf.median()) {
                let ratio = f.as_secs_f64() / u.as_secs_f64().max(1e-9);
                let _ = writeln!(
                    o,
                    "  filtered median {}   target < {}: {}",
                    fmt_duration(f),
                    fmt_duration(FILTERED_TARGET),
                    verdict(f < FILTERED_TARGET)
                );
                let _ = writeln!(
                    o,
                    "  ratio filtered/unfiltered (medians) {ratio:.2}   target <= {RATIO_TARGET}: {}",
                    verdict(ratio <= RATIO_TARGET)
                );
            }
            if let Some((nodes_s, mb_s)) = g.unfiltered_throughput() {
                let _ = writeln!(
                    o,
                    "  unfiltered median streams {nodes_s:.0} nodes/s, {mb_s:.1} MB/s ({} of encoded nodes per read)",
                    fmt_bytes(g.unfiltered_bytes)
                );
            }
            let reads = &g.unhealthy_per_read;
            let _ = writeln!(
                o,
                "  simulated nodes not HEALTHY per read (unfiltered, filtered alternating): {} (reads with any: {} of {})",
                reads
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
                reads.iter().filter(|&&n| n > 0).count(),
                reads.len()
            );
        }

        if let Some(h) = &self.health {
            let _ = writeln!(
                o,
                "\n-- Health (one unfiltered GetNodes at node uptime {})",
                fmt_duration(h.at_uptime)
            );
            let _ = writeln!(
                o,
                "  {:<22} {:>8} {:>18} {:>8} {:>8} {:>8}",
                "", "HEALTHY", "HEARTBEAT_TIMEOUT", "UNKNOWN", "other", "missing"
            );
            health_row(o, "simulated nodes", &h.simulated, Some(h.missing));
            health_row(o, "other (bootstrap node)", &h.others, None);
            let _ = writeln!(
                o,
                "  largest time since heartbeat among simulated nodes: {}",
                fmt_opt_duration(h.max_since_heartbeat)
            );
            let all = h.simulated.healthy == self.nodes && h.missing == 0;
            let _ = writeln!(
                o,
                "  target all {} simulated nodes HEALTHY: {}",
                self.nodes,
                verdict(all)
            );
        }

        let m = &self.memory;
        let _ = writeln!(
            o,
            "\n-- Node process memory (VmRSS from /proc/{}/status)",
            self.node_pid
        );
        let admitted = self.registration.as_ref().map_or(0, |r| r.admitted).max(1) as i64;
        let per_node = |v: Option<u64>| -> Option<f64> {
            Some((v? as i64 - m.baseline? as i64) as f64 / admitted as f64)
        };
        let row = |o: &mut String, label: &str, v: Option<u64>, per: Option<(f64, f64)>| {
            // Exact bytes: the figure is compared with the target, and a
            // rounded "4.0 KiB" next to "met" would read as a contradiction.
            let per = per.map_or(String::new(), |(p, target)| {
                format!(
                    "  {:>7.0} B = {:>5.2} KiB/node  target < {:.0} KiB: {}",
                    p,
                    p / 1024.0,
                    target / 1024.0,
                    verdict(p < target)
                )
            });
            let _ = writeln!(
                o,
                "  {:<58} {:>10}{per}",
                label,
                v.map_or("-".into(), fmt_bytes)
            );
        };
        row(
            o,
            "baseline: after bootstrap, before any registration",
            m.baseline,
            None,
        );
        row(
            o,
            "after all registrations (before heartbeat connections)",
            m.after_registration,
            per_node(m.after_registration).map(|p| (p, BYTES_PER_NODE_TARGET)),
        );
        row(
            o,
            "during heartbeats, all connections open (incl. TLS/HTTP2)",
            m.during_heartbeats,
            per_node(m.during_heartbeats).map(|p| (p, BYTES_PER_CONNECTED_NODE_TARGET)),
        );
        row(
            o,
            "after the GetNodes calls (heartbeats still running)",
            m.after_get_nodes,
            None,
        );
        row(o, "peak (VmHWM)", m.peak, None);
        let _ = writeln!(
            o,
            "  (per node = (figure - baseline) / {admitted} admitted nodes)"
        );
        if let Some(fds) = self.node_fds_during_heartbeats {
            let _ = writeln!(o, "  node open fds during heartbeats: {fds}");
        }
        if let Some((soft, hard)) = &self.node_nofile {
            let _ = writeln!(o, "  node RLIMIT_NOFILE: soft {soft}, hard {hard}");
        }
        if let Some(t) = self.node_threads {
            let _ = writeln!(o, "  node threads: {t}");
        }

        let _ = writeln!(o, "\n-- Load generator");
        if let Some((soft, hard)) = self.loadgen_nofile {
            let _ = writeln!(o, "  RLIMIT_NOFILE soft raised from {soft} to {hard}");
        }
        if let Some(rss) = self.loadgen_rss {
            let _ = writeln!(
                o,
                "  VmRSS at the end of the heartbeats: {}",
                fmt_bytes(rss)
            );
        }
        if let Some(cpu) = self.loadgen_cpu {
            let _ = writeln!(o, "  CPU time: {}", fmt_duration(cpu));
        }
        if let Some(e) = &self.node_exit {
            let _ = writeln!(o, "  node stop: {e}");
        }

        if !self.notes.is_empty() {
            let _ = writeln!(o, "\n-- Notes");
            for n in &self.notes {
                let _ = writeln!(o, "  * {n}");
            }
        }
        let _ = writeln!(o);
        if self.failures.is_empty() {
            let _ = writeln!(o, "RESULT: OK (no errors; targets above are informational)");
        } else {
            let _ = writeln!(o, "RESULT: FAILED");
            for f in &self.failures {
                let _ = writeln!(o, "  - {f}");
            }
        }
    }
}

fn render_store(o: &mut String, e: &StoreBackend) {
    match &e.etcd_socket {
        Some(socket) => {
            let _ = writeln!(
                o,
                "\n-- Store: etcd (the node's own etcd, read and written directly at {socket})"
            );
        }
        None => {
            let _ = writeln!(
                o,
                "\n-- Store: embedded (revision from the node's /metrics/core; raw txns on a store of the same code and disk)"
            );
        }
    }
    if let Some((moved, over)) = e.idle_drift {
        let _ = writeln!(
            o,
            "  idle before registering     revision moved by {moved} in {} with no calls in flight{}",
            fmt_duration(over),
            if moved == 0 {
                ""
            } else {
                " (background writes; counted in the delta below)"
            }
        );
    }
    let _ = writeln!(
        o,
        "  store revision              {} before registration, {} after: {} write txns",
        e.revision_before,
        e.revision_after.map_or("-".into(), |r| r.to_string()),
        e.revision_after
            .map_or("-".into(), |r| (r - e.revision_before).to_string())
    );
    let reg_rate = e.registrations_per_sec();
    let _ = writeln!(
        o,
        "  registrations+approvals     {} in {} = {reg_rate:.1} /s",
        e.registrations,
        fmt_duration(e.registration_wall)
    );
    let per_reg = e.txns_per_registration();
    let _ = writeln!(
        o,
        "  store txns per registration {} (revision delta / admitted nodes; each write txn is one revision)",
        per_reg.map_or("-".into(), |t| format!("{t:.2}"))
    );
    let ours = per_reg.map(|t| reg_rate * t);
    let _ = writeln!(
        o,
        "  our store-write rate        {} (registrations/s x txns per registration)",
        ours.map_or("-".into(), |r| format!("{r:.1} txns/s"))
    );
    cpu_line(
        o,
        "  etcd CPU, registrations    ",
        e.etcd_cpu_registration,
        e.registration_wall,
    );
    cpu_line(
        o,
        "  loadgen CPU, registrations ",
        e.loadgen_cpu_registration,
        e.registration_wall,
    );
    match &e.raw {
        Some(raw) => render_raw(o, raw, ours),
        None => {
            let _ = writeln!(o, "  raw store txns              not measured");
        }
    }
    if let Some(rss) = e.etcd_rss {
        let _ = writeln!(o, "  etcd VmRSS after raw txns   {}", fmt_bytes(rss));
    }
    if let Some(log) = &e.log {
        let levels: Vec<String> = log
            .by_level
            .iter()
            .map(|(level, n)| format!("{level} {n}"))
            .collect();
        let _ = writeln!(
            o,
            "  etcd log, whole run         {} entries the node still held: {}",
            log.entries,
            if levels.is_empty() {
                "-".into()
            } else {
                levels.join(", ")
            }
        );
        for (message, n) in log.notable.messages() {
            let _ = writeln!(o, "    x{n} {message}");
        }
    }
}

/// The raw rate, and our store-write rate (`ours`, txns/s) as a share of it.
fn render_raw(o: &mut String, raw: &RawTxns, ours: Option<f64>) {
    let res = &raw.results;
    let _ = writeln!(
        o,
        "  raw store txns              {} CAS puts of {} B (one node record's size) on {} keys under {}, \
         {} in flight, to {}: {} committed in {}",
        res.attempted,
        raw.value_len,
        res.keys,
        crate::store::RAW_PREFIX,
        raw.concurrency,
        raw.target,
        res.committed,
        fmt_duration(res.wall)
    );
    if let Some(delta) = raw.revision_delta
        && delta != res.committed as i64
    {
        let _ = writeln!(
            o,
            "  (the revision moved by {delta} over the raw phase, not {}: other writers were active)",
            res.committed
        );
    }
    let raw_rate = raw.per_sec();
    let _ = writeln!(o, "  raw store txn rate          {raw_rate:.1} txns/s");
    cpu_line(o, "  etcd CPU, raw txns         ", raw.etcd_cpu, res.wall);
    cpu_line(
        o,
        "  loadgen CPU, raw txns      ",
        raw.loadgen_cpu,
        res.wall,
    );
    latency_header(o);
    latency_row(o, "raw CAS txn", &mut res.latency.clone());
    errors(o, &res.errors);
    if let Some(ours) = ours
        && raw_rate > 0.0
    {
        let share = 100.0 * ours / raw_rate;
        let _ = writeln!(
            o,
            "  ours/raw                    {share:.1}%   target at least {RAW_SHARE_TARGET:.0}% of raw: {}",
            verdict(share >= RAW_SHARE_TARGET)
        );
        let _ = writeln!(
            o,
            "    = registrations/s / (raw txns/s / txns per registration): the share of the \
             registration rate this store could carry if a registration cost nothing but its \
             store transactions"
        );
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

fn cpu_line(o: &mut String, label: &str, cpu: Option<Duration>, over: Duration) {
    if let Some(cpu) = cpu {
        let _ = writeln!(
            o,
            "{label} {} ({:.0}% of one core)",
            fmt_duration(cpu),
            100.0 * cpu.as_secs_f64() / over.as_secs_f64().max(1e-9)
        );
    }
}

fn latency_header(o: &mut String) {
    let _ = writeln!(
        o,
        "  {:<18} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "latency", "p50", "p90", "p99", "max", "samples"
    );
}

fn latency_row(o: &mut String, name: &str, s: &mut Samples) {
    let _ = writeln!(
        o,
        "  {:<18} {:>10} {:>10} {:>10} {:>10} {:>10}",
        name,
        fmt_opt_duration(s.percentile(50.0)),
        fmt_opt_duration(s.percentile(90.0)),
        fmt_opt_duration(s.percentile(99.0)),
        fmt_opt_duration(s.max()),
        s.len()
    );
}

fn health_row(o: &mut String, name: &str, h: &HealthCount, missing: Option<usize>) {
    let _ = writeln!(
        o,
        "  {:<22} {:>8} {:>18} {:>8} {:>8} {:>8}",
        name,
        h.healthy,
        h.timeout,
        h.unknown,
        h.other,
        missing.map_or("-".into(), |m| m.to_string())
    );
}

fn errors(o: &mut String, tally: &ErrorTally) {
    for (message, n) in tally.messages() {
        let _ = writeln!(o, "  error x{n}: {message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RawResults;

    #[test]
    fn etcd_share_of_raw() {
        let s = Duration::from_secs;
        let e = StoreBackend {
            etcd_socket: Some("/d/etcd/client.sock:0".into()),
            idle_drift: Some((0, s(1))),
            revision_before: 10,
            revision_after: Some(4010),
            registrations: 1000,
            registration_wall: s(2),
            etcd_cpu_registration: None,
            loadgen_cpu_registration: None,
            raw: Some(RawTxns {
                target: "the node's etcd".into(),
                value_len: 53,
                concurrency: 64,
                results: RawResults {
                    committed: 4000,
                    attempted: 4000,
                    keys: 64,
                    wall: s(1),
                    latency: Samples::default(),
                    errors: ErrorTally::default(),
                },
                revision_delta: Some(4000),
                etcd_cpu: None,
                loadgen_cpu: None,
            }),
            etcd_rss: None,
            log: None,
        };
        let mut o = String::new();
        render_store(&mut o, &e);
        // 500 registrations/s at 4 txns each is 2000 txns/s, half of 4000.
        assert!(o.contains("store txns per registration 4.00 "), "{o}");
        assert!(
            o.contains("our store-write rate        2000.0 txns/s"),
            "{o}"
        );
        assert!(
            o.contains("raw store txn rate          4000.0 txns/s"),
            "{o}"
        );
        assert!(
            o.contains("ours/raw                    50.0%   target at least 50% of raw: met"),
            "{o}"
        );
        assert!(!o.contains("other writers"), "{o}");
    }
}
