//! Costs of `GetNodes` filters: compiling once per request, matching once per
//! node.
//!
//! `cargo bench --bench filter -- --quick` for a short run.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use metropolis_api::api::{self, node::Health};
use metropolis_api::common::{self, NodeState, node_labels, node_roles, node_status};
use metropolis_curator::filter::Filter;

const SEED_FILTERS: [&str; 4] = [
    "node.state == NODE_STATE_UP",
    "has(node.roles.kubernetes_worker)",
    "node.time_since_heartbeat < duration('6s')",
    r#"node.labels.pairs.exists(p, p.key == "zone")"#,
];

const STATE: &str = SEED_FILTERS[0];
const LABELS: &str = SEED_FILTERS[3];

/// Close to the cost limit: 25 keys against every label of the node.
fn expensive_filter() -> String {
    let keys = (0..25)
        .map(|i| format!("'key-{i}'"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("[{keys}].exists(k, node.labels.pairs.exists(p, p.key == k))")
}

/// Node `i` of a cluster: states, roles, labels and heartbeats vary, and about
/// a third of the nodes have no status, roles or labels at all.
fn node(i: usize) -> api::Node {
    let states = [
        NodeState::Up,
        NodeState::Up,
        NodeState::Up,
        NodeState::New,
        NodeState::Standby,
        NodeState::Decommissioned,
    ];
    let mut node = api::Node {
        pubkey: vec![(i % 251) as u8; 32],
        id: format!("metropolis-{i:032x}"),
        state: states[i % states.len()] as i32,
        health: if i.is_multiple_of(7) {
            Health::HeartbeatTimeout
        } else {
            Health::Healthy
        } as i32,
        ..Default::default()
    };
    if i.is_multiple_of(3) {
        return node;
    }
    node.status = Some(common::NodeStatus {
        external_address: format!("10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255),
        running_curator: i
            .is_multiple_of(5)
            .then_some(node_status::RunningCurator { port: 7835 }),
        ..Default::default()
    });
    node.roles = Some(common::NodeRoles {
        kubernetes_worker: i
            .is_multiple_of(2)
            .then_some(node_roles::KubernetesWorker {}),
        kubernetes_controller: (i % 10 == 1).then_some(node_roles::KubernetesController {}),
        consensus_member: None,
    });
    node.time_since_heartbeat = Some(prost_types::Duration {
        seconds: (i % 13) as i64,
        nanos: 0,
    });
    let pairs = [
        ("rack", "r1"),
        ("row", "a"),
        ("owner", "ops"),
        ("zone", "eu"),
    ];
    node.labels = Some(common::NodeLabels {
        // The zone, when there is one, comes last: the worst case for exists().
        pairs: pairs[..=(i % pairs.len())]
            .iter()
            .map(|(k, v)| node_labels::Pair {
                key: (*k).to_owned(),
                value: format!("{v}-{}", i % 4),
            })
            .collect(),
    });
    node
}

/// The node whose labels `expensive_filter` walks in full, 16 of them.
fn labelled_node() -> api::Node {
    let mut node = node(1);
    node.labels = Some(common::NodeLabels {
        pairs: (0..16)
            .map(|i| node_labels::Pair {
                key: format!("label-{i}"),
                value: "x".to_owned(),
            })
            .collect(),
    });
    node
}

fn compile(c: &mut Criterion) {
    let mut group = c.benchmark_group("compile");
    for src in SEED_FILTERS {
        group.bench_function(src, |b| {
            b.iter(|| Filter::compile(black_box(src)).expect("compiles"))
        });
    }
    let expensive = expensive_filter();
    group.bench_function("near the cost limit", |b| {
        b.iter(|| Filter::compile(black_box(&expensive)).expect("compiles"))
    });
    group.finish();
}

fn match_one(c: &mut Criterion) {
    let mut group = c.benchmark_group("match one node");
    let full = node(4);
    let bare = node(3);
    for (name, src) in [("state", STATE), ("labels exists", LABELS)] {
        let filter = Filter::compile(src).expect("compiles");
        group.bench_function(format!("{name}, full node"), |b| {
            b.iter(|| filter.matches(black_box(&full)).expect("matches"))
        });
        group.bench_function(format!("{name}, bare node"), |b| {
            b.iter(|| filter.matches(black_box(&bare)).expect("matches"))
        });
    }
    let filter = Filter::compile(&expensive_filter()).expect("compiles");
    let labelled = labelled_node();
    group.bench_function("near the cost limit, 16 labels", |b| {
        b.iter(|| filter.matches(black_box(&labelled)).expect("matches"))
    });
    group.finish();
}

fn match_cluster(c: &mut Criterion) {
    let mut group = c.benchmark_group("match 10000 nodes");
    group.sample_size(20);
    let nodes: Vec<api::Node> = (0..10_000).map(node).collect();
    for src in SEED_FILTERS {
        let filter = Filter::compile(src).expect("compiles");
        group.bench_function(src, |b| {
            b.iter(|| {
                nodes
                    .iter()
                    .filter(|n| filter.matches(n).expect("matches"))
                    .count()
            })
        });
    }
    // Compiling included, as a request does it.
    group.bench_function("compile + state filter", |b| {
        b.iter_batched(
            || STATE,
            |src| {
                let filter = Filter::compile(src).expect("compiles");
                nodes
                    .iter()
                    .filter(|n| filter.matches(n).expect("matches"))
                    .count()
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, compile, match_one, match_cluster);
criterion_main!(benches);
