//! `metropolis-robustness run`: the scenarios one after another, each on
//! its kind of cluster (clusters are made once and shared by the scenarios
//! that need them), with clients recording into one history; then the
//! check, the summary and the table.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::{SeedableRng, rngs::StdRng};
use serde::Serialize;

use metropolis_robustness::checker::{self, Limits, Violation};
use metropolis_robustness::history::{self, Outcome, Recorder};

use crate::cluster::{Addresses, Cluster};
use crate::scenario::{ClusterKind, Scenario};
use crate::workload::{self, Register, Target};

pub struct Options {
    pub duration: Duration,
    pub scenarios: Vec<Scenario>,
    pub seed: u64,
    pub summary_json: Option<PathBuf>,
    pub history: Option<PathBuf>,
    pub dir: Option<PathBuf>,
    pub node_binary: PathBuf,
    pub debug_node_binary: PathBuf,
    pub writers: u32,
    pub readers: u32,
    pub keys: usize,
}

#[derive(Serialize)]
pub struct Summary {
    pub seed: u64,
    pub duration_ms: u64,
    pub operations: usize,
    pub faults: usize,
    pub violations: usize,
    pub undecided: usize,
    pub scenarios: Vec<ScenarioSummary>,
    pub history: String,
    pub violation_details: Vec<Violation>,
}

#[derive(Serialize)]
pub struct ScenarioSummary {
    pub name: String,
    pub operations: usize,
    pub acknowledged: usize,
    pub unknown: usize,
    pub faults: usize,
    pub violations: usize,
    /// The longest stretch in which no client operation succeeded.
    pub unavailable_ms_max: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    pub fault_log: Vec<String>,
}

/// A scenario's stretch of the history and what was injected in it.
struct Window {
    scenario: Scenario,
    start_ns: u64,
    end_ns: u64,
    faults: Vec<String>,
    skipped: Option<String>,
}

/// The least time a scenario's clients run, whatever `--duration` says.
const MIN_PER_SCENARIO: Duration = Duration::from_secs(5);
/// Clients run this long before the first fault and after the last.
const QUIET: Duration = Duration::from_millis(1000);

/// Runs in `--dir`, or in a temporary directory that is removed after a
/// clean run and kept (node logs, history) after a failed one.
pub async fn run(opts: Options) -> anyhow::Result<Summary> {
    let Some(dir) = opts.dir.clone() else {
        let tmp = tempfile::Builder::new()
            .prefix("metropolis-robustness-")
            .tempdir()
            .context("creating a temporary directory")?;
        let result = run_in(&opts, tmp.path().to_path_buf()).await;
        if result
            .as_ref()
            .is_ok_and(|s| s.violations == 0 && s.undecided == 0)
        {
            return result;
        }
        let kept = tmp.keep();
        eprintln!("node logs and history kept in {}", kept.display());
        return result;
    };
    run_in(&opts, dir).await
}

async fn run_in(opts: &Options, dir: PathBuf) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut addrs = Addresses::new(&mut rng);
    let debug_available = opts.debug_node_binary.is_file();
    let runnable: Vec<Scenario> = opts
        .scenarios
        .iter()
        .copied()
        .filter(|s| s.cluster() != ClusterKind::EmbeddedDebug || debug_available)
        .collect();
    let per = (opts.duration / runnable.len().max(1) as u32).max(MIN_PER_SCENARIO);
    let rec = Recorder::new();
    let mut clusters: Vec<(ClusterKind, Cluster)> = Vec::new();
    let mut windows = Vec::new();

    for (index, &scenario) in opts.scenarios.iter().enumerate() {
        let name = scenario.name();
        if !runnable.contains(&scenario) {
            let why = format!(
                "skipped: no debug build of metropolis-node at {} (build it with `cargo build -p metropolis-node --features debug --target-dir target/debug-feature`, or pass --debug-node-binary)",
                opts.debug_node_binary.display()
            );
            println!("{name}: {why}");
            windows.push(Window {
                scenario,
                start_ns: 0,
                end_ns: 0,
                faults: vec![],
                skipped: Some(why),
            });
            continue;
        }
        let kind = scenario.cluster();
        if !clusters.iter().any(|(k, _)| *k == kind) {
            let t = Instant::now();
            let c = match kind {
                ClusterKind::Embedded => {
                    Cluster::single(&opts.node_binary, &dir.join("embedded"), &mut addrs).await?
                }
                ClusterKind::EmbeddedDebug => {
                    Cluster::single(&opts.debug_node_binary, &dir.join("debug"), &mut addrs).await?
                }
                ClusterKind::Ha => {
                    Cluster::ha(&opts.node_binary, &dir.join("ha"), &mut addrs).await?
                }
            };
            println!(
                "cluster {kind:?}: {} node(s) up in {:.1?} ({})",
                c.nodes.len(),
                t.elapsed(),
                c.nodes
                    .iter()
                    .map(|n| format!("{} {}", n.name, n.address))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            clusters.push((kind, c));
        }
        let cluster = &mut clusters
            .iter_mut()
            .find(|(k, _)| *k == kind)
            .context("cluster just made")?
            .1;
        cluster.wait_settled(Duration::from_secs(60)).await?;
        let registers: Vec<Register> = (0..opts.keys)
            .map(|i| Register {
                node_id: cluster.nodes[i % cluster.nodes.len()].id.clone(),
                label: format!("{name}-k{i}"),
            })
            .collect();
        let target = Target {
            endpoints: cluster.endpoints(),
            tls: cluster.tls.clone(),
            registers: Arc::new(registers),
            scenario: name.to_string(),
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let base = (index as u32 + 1) * 100;
        let start_ns = rec.now_ns();
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..opts.writers + opts.readers {
            tasks.push(tokio::spawn(workload::client(
                base + c,
                c < opts.writers,
                opts.seed,
                target.clone(),
                rec.clone(),
                stop_rx.clone(),
            )));
        }
        let mut faults = Vec::new();
        println!("{name}: clients running for {per:?}");
        loop {
            tokio::time::sleep(QUIET).await;
            let t = t0.elapsed();
            let what = scenario
                .inject(cluster, faults.len(), &mut rng)
                .await
                .with_context(|| format!("{name}: fault {}", faults.len() + 1))?;
            println!("{name}: fault {} at {:.1?}: {what}", faults.len() + 1, t);
            faults.push(format!("at {:.1?}: {what}", t));
            // Another fault only if it has time to heal within the budget
            // (assume it takes as long as the last one).
            if t0.elapsed() + (t0.elapsed() - t) + QUIET > per {
                break;
            }
        }
        if let Some(rest) = per.checked_sub(t0.elapsed()) {
            tokio::time::sleep(rest.max(QUIET)).await;
        } else {
            tokio::time::sleep(QUIET).await;
        }
        let end_ns = rec.now_ns();
        let _ = stop_tx.send(true);
        for t in tasks {
            t.await.context("a client task panicked")?;
        }
        cluster.wait_settled(Duration::from_secs(60)).await?;
        workload::final_reads(&target, &rec, base + 99, Duration::from_secs(60)).await?;
        windows.push(Window {
            scenario,
            start_ns,
            end_ns,
            faults,
            skipped: None,
        });
    }
    drop(clusters);

    let events = rec.events();
    let history_path = opts
        .history
        .clone()
        .unwrap_or_else(|| dir.join("history.jsonl"));
    history::write_file(&history_path, &events)?;
    let ops = history::operations(&events)?;
    let report = checker::check(&ops, Limits::default())?;

    let scenarios = windows
        .iter()
        .map(|w| {
            let name = w.scenario.name();
            let mine: Vec<_> = ops.iter().filter(|o| o.scenario == name).collect();
            let mut ok_times: Vec<u64> = mine
                .iter()
                .filter(|o| o.outcome == Outcome::Ok)
                .filter_map(|o| o.complete)
                .filter(|t| *t >= w.start_ns && *t <= w.end_ns)
                .collect();
            ok_times.sort_unstable();
            ScenarioSummary {
                name: name.to_string(),
                operations: mine.len(),
                acknowledged: mine.iter().filter(|o| o.outcome == Outcome::Ok).count(),
                unknown: mine
                    .iter()
                    .filter(|o| o.outcome == Outcome::Unknown)
                    .count(),
                faults: w.faults.len(),
                violations: report
                    .violations
                    .iter()
                    .filter(|v| v.scenario == name)
                    .count(),
                unavailable_ms_max: if w.skipped.is_some() {
                    0
                } else {
                    longest_gap(w.start_ns, w.end_ns, &ok_times) / 1_000_000
                },
                skipped: w.skipped.clone(),
                fault_log: w.faults.clone(),
            }
        })
        .collect::<Vec<_>>();
    let summary = Summary {
        seed: opts.seed,
        duration_ms: started.elapsed().as_millis() as u64,
        operations: ops.len(),
        faults: scenarios.iter().map(|s| s.faults).sum(),
        violations: report.violations.len(),
        undecided: report.undecided.len(),
        scenarios,
        history: history_path.display().to_string(),
        violation_details: report.violations.clone(),
    };
    if let Some(p) = &opts.summary_json {
        std::fs::write(p, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(summary)
}

/// The longest stretch of [start, end] without a time from `sorted`.
fn longest_gap(start: u64, end: u64, sorted: &[u64]) -> u64 {
    let mut last = start;
    let mut gap = 0;
    for &t in sorted {
        gap = gap.max(t.saturating_sub(last));
        last = t;
    }
    gap.max(end.saturating_sub(last))
}

#[cfg(test)]
mod tests {
    #[test]
    fn longest_gap_counts_the_edges() {
        assert_eq!(super::longest_gap(0, 100, &[]), 100);
        assert_eq!(super::longest_gap(0, 100, &[10, 20, 70]), 50);
        assert_eq!(super::longest_gap(0, 100, &[60, 70]), 60);
        assert_eq!(super::longest_gap(0, 100, &[10, 20]), 80);
    }
}
