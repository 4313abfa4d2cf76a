//! Lease leader election between two replicas on the fake API server.

use std::time::Duration;

use mesh_controller::sources::kubernetes::leader::{self, LeaseConfig};
use tokio::sync::watch;

use crate::eventually;
use crate::fake::FakeApi;

fn config(identity: &str) -> LeaseConfig {
    LeaseConfig {
        lease_duration: Duration::from_millis(1500),
        renew_deadline: Duration::from_millis(1000),
        retry_period: Duration::from_millis(100),
        ..LeaseConfig::new("mesh-system", "mesh-controller", identity)
    }
}

#[tokio::test]
async fn one_leader_at_a_time_and_a_takeover_when_it_goes() {
    let fake = FakeApi::new();
    let (tx_a, rx_a) = watch::channel(false);
    let (tx_b, rx_b) = watch::channel(false);
    let a = tokio::spawn(leader::run(fake.client("a"), config("replica-a"), tx_a));
    let b = tokio::spawn(leader::run(fake.client("b"), config("replica-b"), tx_b));
    let wait = Duration::from_secs(10);
    eventually(wait, "a leader", || async { *rx_a.borrow() || *rx_b.borrow() }).await;
    // Never two at once, over a few renewals: checked at every change either replica reports,
    // until the lease's renewTime has moved three times.
    let renewed =
        || fake.get("leases", "mesh-system", "mesh-controller").unwrap()["spec"]["renewTime"].clone();
    let (mut seen_a, mut seen_b) = (rx_a.clone(), rx_b.clone());
    let mut renewals = vec![renewed()];
    let deadline = tokio::time::Instant::now() + wait;
    while renewals.len() < 4 {
        assert!(
            !(*seen_a.borrow_and_update() && *seen_b.borrow_and_update()),
            "two leaders"
        );
        let now = renewed();
        if renewals.last() != Some(&now) {
            renewals.push(now);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "three renewals; saw {renewals:?}"
        );
        tokio::select! {
            _ = seen_a.changed() => {}
            _ = seen_b.changed() => {}
            // The fake has no watch on leases: look at the renewal again after a while.
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
    let (leader_task, follower_rx, follower) = if *rx_a.borrow() {
        (a, rx_b, "replica-b")
    } else {
        (b, rx_a, "replica-a")
    };
    // (Under a loaded test machine the lease may already have changed hands; count from here.)
    let before = fake.get("leases", "mesh-system", "mesh-controller").unwrap()["spec"]["leaseTransitions"]
        .as_i64()
        .unwrap();

    // The leader dies without releasing the lease: the other takes over once it expired.
    leader_task.abort();
    eventually(wait, "the takeover", || async { *follower_rx.borrow() }).await;
    let lease = fake.get("leases", "mesh-system", "mesh-controller").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], follower);
    assert!(lease["spec"]["leaseTransitions"].as_i64().unwrap() > before);
}

#[tokio::test]
async fn a_leader_that_cannot_renew_steps_down() {
    let fake = FakeApi::new();
    let (tx, rx) = watch::channel(false);
    let _task = tokio::spawn(leader::run(fake.client("a"), config("replica-a"), tx));
    let wait = Duration::from_secs(10);
    eventually(wait, "leading", || async { *rx.borrow() }).await;
    fake.forbid(crate::fake::Verb::Get, "leases");
    eventually(wait, "stepped down", || async { !*rx.borrow() }).await;
    fake.allow_all();
    eventually(wait, "leading again", || async { *rx.borrow() }).await;
}
