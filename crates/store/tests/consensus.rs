//! [`Consensus`] on a real single-member etcd, reached over its unix socket.
//!
//! The learners added here have peer URLs nobody serves: they never start,
//! so etcd keeps them unnamed and never considers them in sync.

use std::time::{Duration, Instant};

use metropolis_store::{Consensus, StoreError};

use metropolis_store::testing::{EtcdServer, Listen, NAME, free_port};

fn unserved_peer_url() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

#[tokio::test]
async fn members_lists_the_started_member() {
    let server = EtcdServer::start(Listen::Unix).await;
    let store = server.connect().await;
    let members = store.members().await.unwrap();
    assert_eq!(members.len(), 1, "{members:?}");
    let me = &members[0];
    assert_ne!(me.id, 0);
    assert_eq!(me.name, NAME);
    assert_eq!(me.peer_urls, [server.peer_url()]);
    assert!(!me.is_learner);
    // A voter is already promoted.
    assert!(store.promote(me.id).await.unwrap());
}

#[tokio::test]
async fn learner_add_promote_remove() {
    let server = EtcdServer::start(Listen::Unix).await;
    let store = server.connect().await;
    let url = unserved_peer_url();

    let learner = store.add_learner(&url).await.unwrap();
    assert_ne!(learner.id, 0);
    assert!(learner.is_learner);
    assert_eq!(learner.name, "", "a member that never started has no name");
    assert_eq!(learner.peer_urls, [url.as_str()]);
    let members = store.members().await.unwrap();
    assert_eq!(members.len(), 2, "{members:?}");
    assert!(members.contains(&learner), "{members:?}");

    // Retried: the same member, nothing added.
    assert_eq!(store.add_learner(&url).await.unwrap(), learner);
    assert_eq!(store.members().await.unwrap().len(), 2);

    // etcd 3.4 allows one learner at a time.
    let err = store.add_learner(&unserved_peer_url()).await.unwrap_err();
    eprintln!("second learner: {err}");
    assert!(matches!(err, StoreError::FailedPrecondition(_)), "{err}");
    assert!(err.to_string().contains("wait until"), "{err}");

    // It never caught up, so it is not promoted.
    assert!(!store.promote(learner.id).await.unwrap());
    assert!(store.members().await.unwrap().contains(&learner));

    store.remove(learner.id).await.unwrap();
    let members = store.members().await.unwrap();
    assert_eq!(members.len(), 1, "{members:?}");
    assert_eq!(members[0].name, NAME);
    // Removing it again, or a member that never existed, is not an error.
    store.remove(learner.id).await.unwrap();
    store.remove(0x1234_5678).await.unwrap();

    // Promoting a member that does not exist is.
    let err = store.promote(learner.id).await.unwrap_err();
    eprintln!("promote a removed member: {err}");
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
}

#[tokio::test]
async fn invalid_peer_url_is_invalid() {
    let server = EtcdServer::start(Listen::Unix).await;
    let store = server.connect().await;
    for url in ["", "not a url"] {
        let err = store.add_learner(url).await.unwrap_err();
        eprintln!("add_learner({url:?}): {err}");
        assert!(matches!(err, StoreError::Invalid(_)), "{url:?}: {err}");
    }
}

#[tokio::test]
async fn status_reports_the_leader() {
    let server = EtcdServer::start(Listen::Unix).await;
    let store = server.connect().await;
    let members = store.members().await.unwrap();
    let status = store.status().await.unwrap();
    assert_eq!(status.member_id, members[0].id);
    assert_eq!(status.leader_id, status.member_id);
    assert!(status.raft_term >= 1, "{status:?}");
    assert!(status.revision > 0, "{status:?}");
    assert!(status.db_size_bytes > 0, "{status:?}");
}

/// The path a new consensus member takes: added as a learner, started,
/// named once it runs, refusing clients until promoted, then a voter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_learner_is_promoted_once_in_sync() {
    let first = EtcdServer::start(Listen::Unix).await;
    let store = first.connect().await;
    let url = unserved_peer_url();
    let learner = store.add_learner(&url).await.unwrap();
    let mut second = EtcdServer::join(Listen::Unix, "second", &url, &first);

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        second.assert_running();
        let members = store.members().await.unwrap();
        if members
            .iter()
            .any(|m| m.id == learner.id && m.name == "second")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "learner never named: {members:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A learner serves clients nothing that connecting checks.
    let err = second.try_connect().await.unwrap_err();
    eprintln!("connect to a learner: {err}");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");

    while !store.promote(learner.id).await.unwrap() {
        second.assert_running();
        assert!(Instant::now() < deadline, "learner never in sync");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(store.promote(learner.id).await.unwrap());
    let members = store.members().await.unwrap();
    assert_eq!(members.len(), 2, "{members:?}");
    assert!(members.iter().all(|m| !m.is_learner), "{members:?}");

    // The new voter serves clients (once it has applied its promotion).
    let second_store = loop {
        match second.try_connect().await {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => panic!("promoted member does not serve: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let status = second_store.status().await.unwrap();
    assert_eq!(status.member_id, learner.id);
    let first_id = store.status().await.unwrap().member_id;
    assert_eq!(status.leader_id, first_id);
}
