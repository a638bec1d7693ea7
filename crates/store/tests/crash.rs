//! The embedded store answers a write only once the group commit that holds
//! it is durable: a writer process killed with SIGKILL while 64 tasks write
//! loses none of the writes it was told had committed.
//!
//! A killed process leaves what it wrote in the page cache, so this proves
//! the order "commit, then answer" (and that redb reopens cleanly after a
//! kill in the middle of a commit), not what a power cut would leave.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metropolis_store::{Compare, EmbeddedStore, Op, Store, Txn};

/// Set for the child: the database path it writes to.
const CHILD_ENV: &str = "METROPOLIS_STORE_CRASH_CHILD";
/// Acknowledged writes to see before the kill.
const ACKED_BEFORE_KILL: usize = 2_000;
/// Generous: other builds share the machine.
const DEADLINE: Duration = Duration::from_secs(180);

#[test]
#[ignore = "the writing half of killed_writer_loses_no_acknowledged_write, which runs it as a child"]
fn crash_writer_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let store = EmbeddedStore::open(std::path::Path::new(&path))
            .await
            .unwrap();
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    for j in 0.. {
                        let key = format!("w{i:02}/{j:06}");
                        let resp = store
                            .txn(
                                Txn::new()
                                    .when(Compare::absent(key.as_str()))
                                    .and_then(Op::put(key.as_str(), vec![7u8; 512])),
                            )
                            .await
                            .unwrap();
                        assert!(resp.succeeded);
                        println!("ack {key} {}", resp.revision);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[test]
fn killed_writer_loses_no_acknowledged_write() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("store.redb");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_writer_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let started = Instant::now();
    let mut acked = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let Some(rest) = line.strip_prefix("ack ") else {
            continue;
        };
        let (key, revision) = rest.split_once(' ').unwrap();
        acked.push((key.to_string(), revision.parse::<i64>().unwrap()));
        if acked.len() >= ACKED_BEFORE_KILL {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "only {} writes acknowledged in {DEADLINE:?}",
            acked.len()
        );
    }
    assert_eq!(
        acked.len(),
        ACKED_BEFORE_KILL,
        "the writer ended before it was killed"
    );
    child.kill().unwrap();
    child.wait().unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = EmbeddedStore::open(&path).await.unwrap();
        let stored = store.range(b"w").await.unwrap();
        let newest = acked.iter().map(|(_, r)| *r).max().unwrap();
        assert!(stored.revision >= newest);
        for (key, revision) in &acked {
            let kv = store
                .get(key.as_bytes())
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("{key} was acknowledged at {revision} but is gone"));
            assert_eq!(kv.mod_revision, *revision, "{key}");
        }
        println!(
            "{} writes acknowledged before the kill, {} in the store after it",
            acked.len(),
            stored.kvs.len()
        );
    });
}
