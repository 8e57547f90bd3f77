//! Two operator replicas on the dev node, as the chart installs them. The leader pod is killed
//! (no clean shutdown, so no release of the Lease); the other replica takes the Lease within
//! the lease duration and a few reads, and runs the module created while nobody led.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use chimera_core::api::ChimeraModule;
use common::eventually;
use common::node::{NodeHarness, example_module};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{DeleteParams, ListParams};
use serde_json::json;

/// The chart's defaults: a 15 s Lease, read every 2 s.
const LEASE_SECONDS: u64 = 15;

/// The operator's running pods (not terminating): name and address.
async fn operator_pods(h: &NodeHarness) -> Vec<(String, String)> {
    let pods = h
        .api::<Pod>()
        .list(&ListParams::default().labels("app.kubernetes.io/name=chimera-operator"))
        .await
        .unwrap();
    pods.items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let ip = p.status.as_ref()?.pod_ip.clone()?;
            Some((p.name_any(), ip))
        })
        .collect()
}

async fn holder(h: &NodeHarness) -> Option<String> {
    h.api::<Lease>()
        .get_opt("chimera-operator")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
}

/// The `chimera_operator_leader` gauge of the pod at `ip`.
async fn leader_gauge(ip: &str) -> Option<u8> {
    let text = reqwest::get(format!("http://{ip}:9090/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("chimera_operator_leader "))
        .and_then(|v| v.trim().parse().ok())
}

/// The pod an identity on the Lease belongs to (`POD_NAME_<process>`).
fn pod_of(identity: &str) -> &str {
    identity.rsplit_once('_').map_or(identity, |(pod, _)| pod)
}

#[tokio::test]
async fn the_other_replica_takes_over_when_the_leader_crashes_or_stops() {
    let mut h = NodeHarness::start("node-failover", &[]).await;
    let pods = eventually("two operator pods", Duration::from_secs(60), || async {
        let pods = operator_pods(&h).await;
        (pods.len() == 2).then_some(pods)
    })
    .await;
    let leader = eventually("one of them leads", Duration::from_secs(30), || async {
        let holder = holder(&h).await?;
        pods.iter()
            .any(|(name, _)| name == pod_of(&holder))
            .then_some(holder)
    })
    .await;
    // Each replica says on /metrics whether it leads: the holder 1, the other 0.
    for (name, ip) in &pods {
        let expected = u8::from(name == pod_of(&leader));
        eventually(
            &format!("{name} reports chimera_operator_leader {expected}"),
            Duration::from_secs(10),
            || async { (leader_gauge(ip).await? == expected).then_some(()) },
        )
        .await;
    }

    // The leader's process crashes (SIGKILL: no release). Its container restarts as a new
    // candidate; the Lease must expire before anyone takes it.
    let leader_pod = h.api::<Pod>().get(pod_of(&leader)).await.unwrap();
    let killed = chimera_testenv::ctr(&[
        "tasks",
        "kill",
        "--signal",
        "SIGKILL",
        &common::node::container_id(&leader_pod),
    ]);
    assert!(killed.status.success(), "ctr tasks kill: {killed:?}");
    let crashed = Instant::now();
    // A module created while nobody leads.
    h.database("users").await;
    let mut users = example_module("users");
    users["spec"]["worker"]["replicas"] = json!({"min": 1, "max": 3});
    h.apply_module(&users).await;

    let second = eventually(
        "another process holds the Lease",
        Duration::from_secs(60),
        || async { holder(&h).await.filter(|holder| *holder != leader) },
    )
    .await;
    let took = crashed.elapsed();
    println!(
        "measured: {second} took over {:.1} s after {leader} crashed (lease {LEASE_SECONDS} s)",
        took.as_secs_f64()
    );
    // The Lease stood still for its duration, then a read of another replica took it: not
    // before the lease duration less one renewal period, not long after it.
    assert!(
        took >= Duration::from_secs(LEASE_SECONDS - 3),
        "taken over after {took:?}: before the Lease expired"
    );
    assert!(
        took <= Duration::from_secs(LEASE_SECONDS + 10),
        "taken over only after {took:?}"
    );
    // The new leader runs the module created meanwhile, and its autoscaler decides for it.
    h.wait_ready("users", Duration::from_secs(180)).await;
    eventually(
        "the new leader's autoscaling status",
        Duration::from_secs(60),
        || async {
            let module = h.api::<ChimeraModule>().get("users").await.ok()?;
            module.status?.autoscaling?.worker
        },
    )
    .await;

    // The new leader's pod is deleted (SIGTERM): it releases the Lease, and another process
    // takes it within a few reads instead of a lease duration.
    h.api::<Pod>()
        .delete(pod_of(&second), &DeleteParams::default())
        .await
        .unwrap();
    let stopped = Instant::now();
    let third = eventually(
        "a third process holds the Lease",
        Duration::from_secs(60),
        || async { holder(&h).await.filter(|holder| *holder != second) },
    )
    .await;
    let took = stopped.elapsed();
    println!(
        "measured: {third} took over {:.1} s after {second} was stopped",
        took.as_secs_f64()
    );
    assert!(
        took < Duration::from_secs(LEASE_SECONDS - 3),
        "a clean stop hands the Lease over without waiting for it to expire: {took:?}"
    );
}
