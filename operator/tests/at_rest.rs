//! The operator at rest writes nothing to the API server. Fifty modules (query and worker,
//! subscriptions in a chain, topology on a real broker checked for drift every second, the
//! autoscaler on a 1 s tick) converge; then, for a window in which the operator keeps working
//! (it repairs a retry queue deleted by hand, the autoscaler decides every tick), the API server's
//! own counters must show no write on what the operator writes.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use chimera_core::api::ChimeraModule;
use chimera_core::topology::state::BrokerEndpoint;
use chimera_testenv::apiserver::{self, OPERATOR_RESOURCES};
use chimera_testenv::{TestVhost, free_port};
use common::{Harness, eventually};
use k8s_openapi::api::core::v1::{Namespace, ResourceQuota};
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

const MODULES: usize = 50;
const WINDOW: Duration = Duration::from_secs(20);

fn module(i: usize) -> serde_json::Value {
    let name = format!("r{i:02}");
    let subscribes = if i == 0 {
        json!([])
    } else {
        json!([{"from": format!("r{:02}", i - 1), "events": [format!("r{:02}.changed", i - 1)]}])
    };
    json!({
        "apiVersion": "chimera.dev/v1alpha1",
        "kind": "ChimeraModule",
        "metadata": {"name": name},
        "spec": {
            "image": "example/rest:1",
            "commands": [format!("{name}.change")],
            "events": {"publishes": [format!("{name}.changed")], "subscribes": subscribes},
            "query": {"replicas": {"min": 1, "max": 3}},
            "worker": {"replicas": {"min": 1, "max": 3}, "retry": {"delaysSeconds": [5]},
                       "queue": {"type": "classic"}}
        }
    })
}

fn converged(m: &ChimeraModule) -> bool {
    let Some(status) = &m.status else {
        return false;
    };
    status.observed_generation == m.metadata.generation
        && status.autoscaling.is_some()
        && status
            .condition("TopologyReady")
            .is_some_and(|c| c.status == "True")
}

/// Every module's resourceVersion, by name.
async fn versions(modules: &Api<ChimeraModule>) -> BTreeMap<String, String> {
    modules
        .list(&ListParams::default())
        .await
        .expect("list modules")
        .into_iter()
        .map(|m| (m.name_any(), m.resource_version().unwrap_or_default()))
        .collect()
}

/// The autoscaler's heartbeat: the latest decision time over all heads.
async fn last_decision(metrics: &str) -> f64 {
    let text = reqwest::get(metrics)
        .await
        .and_then(reqwest::Response::error_for_status)
        .expect("the operator's /metrics")
        .text()
        .await
        .expect("the operator's /metrics");
    text.lines()
        .filter(|l| l.starts_with("chimera_autoscaler_last_decision_timestamp_seconds{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .fold(0.0, f64::max)
}

#[tokio::test]
async fn fifty_converged_modules_cost_the_api_server_no_write() {
    let vhost = TestVhost::create("at-rest");
    let endpoint = BrokerEndpoint::new(&vhost.amqp_url, Some(vhost.management_url())).unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let h = Harness::with_autoscaling_operator("at-rest", endpoint, addr).await;
    // No pods: pending pods would bring the scheduler's writes, and pods are not the point.
    let quota: ResourceQuota = serde_json::from_value(
        json!({"metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}}),
    )
    .unwrap();
    let quotas: Api<ResourceQuota> = h.api();
    quotas.create(&PostParams::default(), &quota).await.unwrap();
    eventually("the quota counted", Duration::from_secs(30), || async {
        quotas
            .get("no-pods")
            .await
            .ok()?
            .status?
            .hard?
            .get("pods")
            .map(|_| ())
    })
    .await;

    for i in 0..MODULES {
        h.apply_module(&module(i)).await;
    }
    let modules: Api<ChimeraModule> = h.api();
    eventually(
        "every module observed, with its topology and a scaling decision",
        Duration::from_secs(180),
        || async {
            let list = modules.list(&ListParams::default()).await.ok()?;
            (list.items.len() == MODULES && list.items.iter().all(converged)).then_some(())
        },
    )
    .await;
    // Settled: the first rounds (Deployments' first statuses, first decisions) are over.
    let settled = eventually(
        "no module written for 5 s",
        Duration::from_secs(90),
        || async {
            let before = versions(&modules).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            (versions(&modules).await == before).then_some(before)
        },
    )
    .await;
    // Namespaces of earlier tests being emptied would count as deletions here.
    let namespaces: Api<Namespace> = Api::all(h.client.clone());
    eventually(
        "no namespace terminating",
        Duration::from_secs(120),
        || async {
            let list = namespaces.list(&ListParams::default()).await.ok()?;
            list.items
                .iter()
                .all(|n| n.metadata.deletion_timestamp.is_none())
                .then_some(())
        },
    )
    .await;

    let metrics = format!("http://{addr}/metrics");
    let heartbeat = last_decision(&metrics).await;
    let before = apiserver::read(&h.client, &OPERATOR_RESOURCES)
        .await
        .unwrap();
    // Mid-window, a retry queue deleted by hand: the operator is busy repairing the broker.
    // (Not the worker queue: its metrics going missing is news the status rightly reports.)
    tokio::time::sleep(WINDOW / 2).await;
    let queue = "chimera.r10.worker.retry.1";
    vhost.rabbitmqctl(&["delete_queue", queue]);
    eventually("the deleted queue is back", WINDOW / 2, || async {
        vhost
            .rabbitmqctl(&["list_queues", "-q", "name"])
            .lines()
            .any(|l| l.trim() == queue)
            .then_some(())
    })
    .await;
    tokio::time::sleep(WINDOW / 2).await;
    let after = apiserver::read(&h.client, &OPERATOR_RESOURCES)
        .await
        .unwrap();

    let written = after.since(&before);
    assert_eq!(
        written.operator_writes(),
        0.0,
        "the operator wrote at rest: {:?}",
        written.lines()
    );
    assert_eq!(
        versions(&modules).await,
        settled,
        "a module was written at rest"
    );
    assert!(
        last_decision(&metrics).await > heartbeat,
        "the autoscaler decided nothing during the window"
    );
    // The repair was counted where an operator looks for it (and nowhere in the API server).
    let text = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
    let repairs: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("chimera_operator_topology_drift_repairs_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no drift repair counter in\n{text}"));
    assert!(
        repairs >= 1.0,
        "the repair of {queue} was not counted: {repairs}"
    );

    // Leave nothing behind: the modules go while their operator runs (their finalizer
    // releases the topology), so the namespace does not stay Terminating, its fifty
    // Deployments churning in the controller-manager while later tests run.
    modules
        .delete_collection(&Default::default(), &ListParams::default())
        .await
        .unwrap();
    eventually(
        "every module released and gone",
        Duration::from_secs(120),
        || async {
            modules
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .is_empty()
                .then_some(())
        },
    )
    .await;
}
