//! Leader election on the real API server: one replica leads at a time, another takes over
//! only after the leader stopped renewing (and after it stopped leading), a release hands the
//! Lease over at once, and an operator that follows writes nothing until it leads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use chimera_core::leader::Timing;
use chimera_runtime::leader::{Elector, LeaderSettings, Leadership};
use chimera_runtime::operator::OperatorConfig;
use chimera_testenv::TestNamespace;
use common::{Harness, eventually, example};

const LEASE: &str = "chimera-operator";

/// A short timing, so the test takes seconds: the Lease holds 3 s, a leader stops 2 s after
/// its last renewal, everyone reads every 0.4 s.
fn timing() -> Timing {
    Timing {
        lease_duration: 3.0,
        renew_deadline: 2.0,
        retry_period: 0.4,
    }
}

fn settings(namespace: &str, identity: &str) -> LeaderSettings {
    LeaderSettings {
        namespace: namespace.to_owned(),
        lease: LEASE.to_owned(),
        identity: identity.to_owned(),
        timing: timing(),
    }
}

fn elector(client: &Client, namespace: &str, identity: &str) -> (Arc<Elector>, Leadership) {
    let leadership = Leadership::elected();
    let elector = Elector::new(
        client.clone(),
        settings(namespace, identity),
        leadership.clone(),
    )
    .unwrap();
    (Arc::new(elector), leadership)
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt(LEASE)
        .await
        .unwrap()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
}

/// Samples both replicas every 20 ms for `how_long` (or until `until` holds), failing if
/// both lead at once; returns the instant `until` first held.
async fn watch_pair(
    a: &Leadership,
    b: &Leadership,
    how_long: Duration,
    until: impl Fn() -> bool,
) -> Option<Instant> {
    let start = Instant::now();
    while start.elapsed() < how_long {
        assert!(
            !(a.is_leading() && b.is_leading()),
            "two replicas lead at once"
        );
        if until() {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test]
async fn one_replica_leads_at_a_time_and_the_lease_passes_on_expiry_and_on_release() {
    let client = chimera_testenv::kube_client().await;
    let ns = TestNamespace::create(&client, "leader").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);

    let (a, a_leads) = elector(&client, &ns.name, "replica-a");
    let a_run = tokio::spawn(Arc::clone(&a).run());
    eventually("replica-a leads", Duration::from_secs(10), || async {
        a_leads.is_leading().then_some(())
    })
    .await;
    assert_eq!(holder(&leases).await.as_deref(), Some("replica-a"));

    // b follows while a renews: three lease durations.
    let (b, b_leads) = elector(&client, &ns.name, "replica-b");
    let b_run = tokio::spawn(Arc::clone(&b).run());
    let b_took = watch_pair(&a_leads, &b_leads, Duration::from_secs(9), || {
        b_leads.is_leading()
    })
    .await;
    assert!(b_took.is_none(), "b took the Lease while a renewed it");
    assert!(a_leads.is_leading());

    // a's process dies: no release, no more renewals.
    a_run.abort();
    let died = Instant::now();
    let b_took = watch_pair(&a_leads, &b_leads, Duration::from_secs(10), || {
        b_leads.is_leading()
    })
    .await
    .expect("b takes over within the lease duration and a few reads");
    let waited = b_took - died;
    // a renewed at most one retry period before it died; b must wait for the Lease to stand
    // still a whole lease duration from when it last saw it change.
    assert!(
        waited >= Duration::from_secs_f64(3.0 - 0.4 - 0.1),
        "b took over after {waited:?}: before the Lease expired"
    );
    assert!(!a_leads.is_leading(), "a stopped leading at its deadline");
    let lease = leases.get(LEASE).await.unwrap().spec.unwrap();
    assert_eq!(lease.holder_identity.as_deref(), Some("replica-b"));
    assert_eq!(lease.lease_transitions, Some(1));

    // b stops cleanly and releases: c takes over without waiting for an expiry.
    let (c, c_leads) = elector(&client, &ns.name, "replica-c");
    let c_run = tokio::spawn(Arc::clone(&c).run());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!c_leads.is_leading(), "c follows while b leads");
    b_run.abort();
    b.release().await;
    assert!(!b_leads.is_leading(), "a release stops leading at once");
    let released = Instant::now();
    watch_pair(&b_leads, &c_leads, Duration::from_secs(3), || {
        c_leads.is_leading()
    })
    .await
    .expect("c leads soon after the release");
    assert!(
        released.elapsed() < Duration::from_secs(2),
        "c took over within a few reads, not after the lease duration"
    );
    assert_eq!(holder(&leases).await.as_deref(), Some("replica-c"));
    c_run.abort();
}

/// Holds the Lease as `identity`, renewing it every 300 ms, until aborted.
async fn hold_lease(leases: Api<Lease>, identity: &str) {
    let now = || MicroTime(k8s_openapi::jiff::Timestamp::now());
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(LEASE.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(identity.to_owned()),
            lease_duration_seconds: Some(3),
            renew_time: Some(now()),
            ..LeaseSpec::default()
        }),
    };
    leases.create(&PostParams::default(), &lease).await.unwrap();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut lease = leases.get(LEASE).await.unwrap();
        lease.spec.as_mut().unwrap().renew_time = Some(now());
        leases
            .replace(LEASE, &PostParams::default(), &lease)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_following_operator_writes_nothing_until_it_leads_then_reconciles_every_module() {
    let mut h = Harness::new("leader-op").await;
    let leases: Api<Lease> = h.api();
    let other = tokio::spawn(hold_lease(leases.clone(), "another-replica"));
    eventually(
        "the other replica holds the Lease",
        Duration::from_secs(5),
        || async { (holder(&leases).await.as_deref() == Some("another-replica")).then_some(()) },
    )
    .await;
    let config = OperatorConfig {
        leader: Some(settings(&h.ns.name, "this-replica")),
        ..OperatorConfig::default()
    };
    let client = h.client.clone();
    h.start_operator(client, config);
    h.apply_module(&example("orders")).await;
    let deployments: Api<Deployment> = h.api();

    // Following for several lease durations: the module gets nothing.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        deployments.get_opt("orders-query").await.unwrap().is_none(),
        "a follower created a Deployment"
    );
    let module = h
        .api::<chimera_core::api::ChimeraModule>()
        .get("orders")
        .await
        .unwrap();
    assert!(module.status.is_none(), "a follower wrote a status");

    // The other replica dies: this one takes the Lease and reconciles the module it already
    // had in its cache (no event of the module comes to trigger it).
    other.abort();
    eventually(
        "the operator creates the heads as leader",
        Duration::from_secs(20),
        || async { deployments.get_opt("orders-query").await.ok().flatten() },
    )
    .await;
    assert_eq!(holder(&leases).await.as_deref(), Some("this-replica"));
}
