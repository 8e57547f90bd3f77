//! Two operator replicas on the dev node, as the chart installs them. The leader pod is killed
//! (no clean shutdown, so no release of the Lease); the other replica takes the Lease within
//! the lease duration and a few reads, and runs the module created while nobody led.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use chimera_core::api::ChimeraModule;
use common::eventually;
use common::node::{NodeHarness, example_module, register_user, users_with_slow_workers};
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

/// The operator pod's metrics (Prometheus text), from its metrics port.
async fn operator_metrics(ip: &str) -> Option<String> {
    reqwest::get(format!("http://{ip}:9090/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// The `chimera_operator_leader` gauge of the pod at `ip`.
async fn leader_gauge(ip: &str) -> Option<u8> {
    let text = operator_metrics(ip).await?;
    text.lines()
        .find_map(|l| l.strip_prefix("chimera_operator_leader "))
        .and_then(|v| v.trim().parse().ok())
}

/// The chart's two operator pods, once both exist.
async fn two_operator_pods(h: &NodeHarness) -> Vec<(String, String)> {
    eventually("two operator pods", Duration::from_secs(60), || async {
        let pods = operator_pods(h).await;
        (pods.len() == 2).then_some(pods)
    })
    .await
}

/// The pod an identity on the Lease belongs to (`POD_NAME_<process>`).
fn pod_of(identity: &str) -> &str {
    identity.rsplit_once('_').map_or(identity, |(pod, _)| pod)
}

#[tokio::test]
async fn the_other_replica_takes_over_when_the_leader_crashes_or_stops() {
    let mut h = NodeHarness::start("node-failover", &[]).await;
    let pods = two_operator_pods(&h).await;
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

/// A cut between one pod and the API server, made with iptables on the node (the pod reaches
/// the API server at the node's own address, so its packets meet the host's INPUT chain):
/// the pod keeps running and serving /metrics, but none of its API requests get through.
/// Healed when dropped.
struct Partition {
    rule: Vec<String>,
}

impl Partition {
    fn cut(pod_ip: &str, api_port: i32) -> Self {
        let rule: Vec<String> = [
            "INPUT",
            "-s",
            pod_ip,
            "-p",
            "tcp",
            "--dport",
            &api_port.to_string(),
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ]
        .map(str::to_owned)
        .to_vec();
        Self::iptables("-I", &rule);
        Self { rule }
    }

    fn iptables(action: &str, rule: &[String]) {
        let out = std::process::Command::new("iptables")
            .arg(action)
            .args(rule)
            .output()
            .unwrap_or_else(|e| panic!("iptables is needed to cut a pod off the API server: {e}"));
        assert!(out.status.success(), "iptables {action} {rule:?}: {out:?}");
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        Self::iptables("-D", &self.rule);
    }
}

/// The port the API server serves pods on (the `kubernetes` Service's endpoint).
async fn api_server_port(h: &NodeHarness) -> i32 {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let slices: kube::Api<EndpointSlice> = kube::Api::namespaced(h.client.clone(), "default");
    let slice = slices.get("kubernetes").await.unwrap();
    slice.ports.unwrap()[0].port.unwrap()
}

/// The scale actions a pod's autoscaler made on the users worker (both directions).
async fn scale_actions(ip: &str) -> Option<u64> {
    let text = operator_metrics(ip).await?;
    Some(
        text.lines()
            .filter(|l| l.starts_with("chimera_autoscaler_scale_actions_total{"))
            .filter(|l| l.contains("module=\"users\"") && l.contains("head=\"worker\""))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
            .sum(),
    )
}

/// Every value `spec.replicas` of a Deployment took, in order, as a watch on the API server
/// sees it: one entry per write that changed it.
fn replica_writes(h: &NodeHarness, name: &str) -> std::sync::Arc<std::sync::Mutex<Vec<i32>>> {
    use futures::StreamExt;
    use k8s_openapi::api::apps::v1::Deployment;
    use kube::runtime::watcher;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let api = h.api::<Deployment>();
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let record = seen.clone();
    tokio::spawn(async move {
        let mut events = watcher::watcher(api, config).boxed();
        while let Some(event) = events.next().await {
            let deployment = match event {
                Ok(watcher::Event::Apply(d) | watcher::Event::InitApply(d)) => d,
                _ => continue,
            };
            let Some(replicas) = deployment.spec.and_then(|s| s.replicas) else {
                continue;
            };
            let mut seen = record.lock().unwrap();
            if seen.last() != Some(&replicas) {
                seen.push(replicas);
            }
        }
    });
    seen
}

#[tokio::test]
async fn a_partitioned_leader_stops_scaling_and_each_decision_is_written_once() {
    use chimera_sdk::broker::{Publisher, connect};

    let mut h = NodeHarness::start("node-partition", &[]).await;
    let pods = two_operator_pods(&h).await;
    h.database("users").await;
    let users = users_with_slow_workers(4);
    h.apply_module(&users).await;
    h.wait_ready("users", Duration::from_secs(180)).await;
    let writes = replica_writes(&h, "users-worker");
    let leader = eventually("a leader", Duration::from_secs(30), || async {
        let holder = holder(&h).await?;
        pods.iter()
            .find(|(name, _)| name == pod_of(&holder))
            .cloned()
    })
    .await;
    let follower = pods.iter().find(|p| *p != &leader).unwrap().clone();

    // A backlog, published in the background.
    let total = 6000;
    let connection = connect(&h.vhost.amqp_url, &chimera_testenv::unique_name("client"))
        .await
        .unwrap();
    let publisher = Publisher::open(&connection).await.unwrap();
    let publishing = tokio::spawn(async move {
        for i in 0..total {
            let id = format!("part-{i}");
            let command = register_user(&id);
            publisher.publish(&command, true).await.unwrap();
        }
    });
    eventually("the leader scaled out", Duration::from_secs(90), || async {
        (h.replicas("users-worker").await > 1).then_some(())
    })
    .await;

    // The leader is cut off the API server while the backlog is still there: within the
    // renew deadline it stops leading, and after the lease the follower takes over.
    let partition = Partition::cut(&leader.1, api_server_port(&h).await);
    let cut = Instant::now();
    eventually(
        "the partitioned leader steps down",
        Duration::from_secs(LEASE_SECONDS),
        || async { (leader_gauge(&leader.1).await? == 0).then_some(()) },
    )
    .await;
    let stepped_down = cut.elapsed();
    let old_actions = scale_actions(&leader.1).await.unwrap();
    // The follower made no decision before it leads.
    assert_eq!(scale_actions(&follower.1).await, Some(0));
    eventually("the follower leads", Duration::from_secs(60), || async {
        (pod_of(&holder(&h).await?) == follower.0 && leader_gauge(&follower.1).await? == 1)
            .then_some(())
    })
    .await;
    println!(
        "measured: partitioned leader stepped down after {:.1} s, follower led after {:.1} s",
        stepped_down.as_secs_f64(),
        cut.elapsed().as_secs_f64()
    );
    assert!(
        stepped_down < Duration::from_secs(LEASE_SECONDS - 2),
        "the old leader must stop before the Lease can expire: {stepped_down:?}"
    );
    drop(partition);

    // The new leader finishes the job: the backlog drains and the worker goes back to the
    // floor; the old leader, back on the network, follows and writes nothing.
    publishing.await.unwrap();
    eventually("back to one worker", Duration::from_secs(240), || async {
        let depth = h.vhost.management_get(&format!(
            "/api/queues/{}/chimera.users.worker",
            h.vhost.name
        ))["messages"]
            .as_u64()?;
        (depth == 0 && h.replicas("users-worker").await == 1).then_some(())
    })
    .await;
    // (a last look after the decisions settle)
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen = writes.lock().unwrap().clone();
    let old_final = scale_actions(&leader.1).await.unwrap();
    let new_final = scale_actions(&follower.1).await.unwrap();
    println!(
        "measured: replicas went {seen:?}; writes by the old leader {old_final}, by the new {new_final}"
    );
    // What each replica says it did, and when (read when an assertion below fails).
    for (name, _) in [&leader, &follower] {
        let logs = h
            .api::<Pod>()
            .logs(name, &kube::api::LogParams::default())
            .await
            .unwrap_or_default();
        let told: Vec<&str> = logs
            .lines()
            .filter(|l| {
                ["scale", "abandoned", "leading", "following", "Lease"]
                    .iter()
                    .any(|w| l.contains(w))
            })
            .collect();
        println!("{name}:\n{}", told.join("\n"));
    }
    assert_eq!(
        old_final, old_actions,
        "the old leader wrote after it stepped down"
    );
    assert!(
        old_final > 0 && new_final > 0,
        "both replicas led: {old_final}, {new_final}"
    );
    // Each write the replicas counted changed the Deployment, and each change was counted:
    // no decision written twice, none lost.
    assert_eq!(
        old_final + new_final,
        u64::try_from(seen.len() - 1).unwrap(),
        "scale actions counted by the replicas vs. replica changes seen: {seen:?}"
    );
    // Neither operator pod restarted (the counters above are whole).
    for (name, _) in [&leader, &follower] {
        let pod = h.api::<Pod>().get(name).await.unwrap();
        let restarts = pod.status.unwrap().container_statuses.unwrap()[0].restart_count;
        assert_eq!(restarts, 0, "{name} restarted");
    }
    connection.close(200, "done".into()).await.ok();
}
