//! The move from the embedded store to etcd, killed at every step: the
//! debug build's `migration::*` failpoints (action `return(crash)`) abort
//! the node there, as a SIGKILL would. Each time, the data directory holds
//! exactly one live store (the embedded one before the switch, etcd after
//! it), the restarted node carries on from the records (the next run is
//! killed at the next step, set through METROPOLIS_FAILPOINTS), and no write
//! a client had acknowledged is lost.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use metropolis_api::admin::ConsensusProgress;
use metropolis_api::api::{ApproveNodeRequest, management_client::ManagementClient};
use metropolis_api::common::NodeState;

use support::*;

/// The failpoints of the move, in the order the steps run; the same list as
/// `metropolis_curator::consensus::migration::FAILPOINTS`.
const STEPS: &[&str] = &[
    "migration::etcd_started",
    "migration::paused",
    "migration::copied",
    "migration::verified",
    "migration::switched",
];

/// Which store a stopped node's data directory would start on.
#[derive(Debug, PartialEq)]
enum Live {
    Embedded,
    Etcd,
}

fn live_store(data: &Path) -> Live {
    // A staged member (the marker `staged`) does not hold the state yet.
    let etcd = data.join("etcd/config.pb").exists() && !data.join("etcd/staged").exists();
    let embedded = data.join("store/cluster.redb").exists();
    match (etcd, embedded) {
        (false, true) => Live::Embedded,
        (true, false) => Live::Etcd,
        // etcd wins at start (DataDir::settle sets the embedded store aside),
        // but the switch leaves it aside itself: both would be a bug.
        other => panic!(
            "the data directory {} holds (etcd, embedded) = {other:?}",
            data.display()
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_any_step_of_the_move_leaves_one_store_and_every_write() {
    metropolis_store::testing::find_etcd();
    let binary = debug_binary();
    let tmp = tempfile::tempdir().expect("tmp");
    let owner_key = metropolis_identity::generate_key();
    let params = tmp.path().join("bootstrap.pb");
    write_bootstrap_params(&params, &owner_key);
    let n1_dir = tmp.path().join("n1");
    let a1 = fresh_address();
    let fault = |step: &str| format!("{step}=return(crash)");
    let first_fault = fault(STEPS[0]);
    let mut n1 = TestNode::spawn_custom(
        &binary,
        a1,
        &n1_dir,
        Some(&params),
        &[],
        &[("METROPOLIS_FAILPOINTS", &first_fault)],
    );
    n1.wait_leading().await;
    let ca = fetch_ca(n1.endpoint()).await.expect("ca");
    let cert = escrow_owner(n1.endpoint(), &ca, &owner_key).await;
    let owner = Arc::new(Owner {
        key: owner_key,
        cert,
        ca,
    });
    let ch = leader_now(&owner, &[n1.endpoint()]).await;
    let reg = tmp.path().join("register.pb");
    fetch_register_params(&mut ManagementClient::new(ch.clone()), &owner.ca, &reg).await;
    let a2 = fresh_address();
    let _n2 = TestNode::spawn(a2, &tmp.path().join("n2"), Some(&reg));
    let addrs = vec![n1.endpoint(), _n2.endpoint()];
    let n2_id: String = eventually("the second node UP", &owner, &addrs, |ch| async move {
        let list = nodes(ch.clone()).await.ok()?;
        for n in list.iter().filter(|n| n.state == NodeState::New as i32) {
            let _ = ManagementClient::new(ch.clone())
                .approve_node(ApproveNodeRequest {
                    pubkey: n.pubkey.clone(),
                })
                .await;
        }
        list.iter()
            .find(|n| {
                n.state == NodeState::Up as i32
                    && n.status
                        .as_ref()
                        .is_some_and(|s| s.external_address == a2.to_string())
            })
            .map(|n| n.id.clone())
    })
    .await;
    let n1_id = nodes(ch.clone())
        .await
        .expect("nodes")
        .into_iter()
        .find(|n| n.id != n2_id)
        .expect("the bootstrap node")
        .id;
    for i in 0..10 {
        set_label(ch.clone(), &n1_id, &format!("before-{i}"), "yes")
            .await
            .expect("a write before the move");
    }

    // A client writes throughout; the role is asked for once (the crash may
    // come before the answer: the record is what counts).
    let (writes, stop, writer) = start_writer(owner.clone(), addrs.clone(), n1_id.clone());
    let asked = make_member(ch, &n2_id, true).await;
    println!("UpdateNodeRoles answered: {asked:?}");

    for (i, step) in STEPS.iter().enumerate() {
        let status = n1
            .wait_exit(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("the node did not crash at {step}:\n{}", n1.log_text()));
        assert_eq!(
            status.signal(),
            Some(SIGABRT),
            "crashed at {step}: {status:?}"
        );
        assert!(
            n1.log_text().contains(step),
            "the failpoint {step} was configured"
        );
        let live = live_store(&n1_dir);
        let switched = *step == "migration::switched";
        assert_eq!(
            live,
            if switched { Live::Etcd } else { Live::Embedded },
            "after a crash at {step}"
        );
        println!("crash at {step}: the node would start on {live:?}");
        // Again, killed at the next step (or not at all after the last).
        let next = STEPS.get(i + 1).map(|s| fault(s));
        let env: Vec<(&str, &str)> = next
            .as_deref()
            .map(|f| ("METROPOLIS_FAILPOINTS", f))
            .into_iter()
            .collect();
        n1 = TestNode::spawn_custom(&binary, a1, &n1_dir, None, &[], &env);
        n1.wait_serving().await;
        if asked.is_err() && i == 0 {
            // Not known whether the role was recorded before the crash:
            // asking again is harmless.
            let ch = leader_now(&owner, &addrs).await;
            let _ = make_member(ch, &n2_id, true).await;
        }
    }

    // The last run moves for good; the second node joins etcd.
    let n2_for = n2_id.clone();
    eventually("the second node a voter on etcd", &owner, &addrs, |ch| {
        let n2_id = n2_for.clone();
        async move {
            let s = consensus(ch.clone()).await.ok()?;
            let list = nodes(ch).await.ok()?;
            let n2 = list.iter().find(|n| n.id == n2_id)?;
            (s.backend == 2 && n2.consensus_progress == ConsensusProgress::Voter as i32)
                .then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.expect("writer");
    let writes = std::mem::take(&mut *writes.lock().unwrap());
    let (last, _) = *writes.acked.last().expect("acknowledged writes");
    println!(
        "{} writes acknowledged across {} crashes, {} refused while migrating",
        writes.acked.len(),
        STEPS.len(),
        writes.refused_migrating
    );

    let list = eventually("the nodes", &owner, &addrs, |ch| async move {
        nodes(ch).await.ok()
    })
    .await;
    let n1_rec = list.iter().find(|n| n.id == n1_id).expect("n1");
    for i in 0..10 {
        assert_eq!(
            label(n1_rec, &format!("before-{i}")).as_deref(),
            Some("yes")
        );
    }
    // The writer's last acknowledged write, or the one after it if that was
    // committed when a crash cut its answer off.
    let stored: u64 = label(n1_rec, "w")
        .and_then(|v| v.parse().ok())
        .expect("the writer's label");
    assert!(
        stored == last || stored == last + 1,
        "stored {stored}, last acknowledged {last}"
    );
    assert_eq!(live_store(&n1_dir), Live::Etcd);
    assert!(n1_dir.join("store.pre-etcd/cluster.redb").exists());
    assert!(!n1_dir.join("etcd/staged").exists());
}

/// What `std::process::abort` ends a process with.
const SIGABRT: i32 = 6;
