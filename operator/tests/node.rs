//! Chimera on the dev node, end to end: the chart's operator pod runs the marketplace's modules
//! as real pods (the images `scripts/images` imports) in a namespace enforcing the `restricted`
//! Pod Security Standard; clients reach the query heads through their ClusterIP Services and
//! send commands over AMQP; the autoscaler scales real pods, which the kubelet starts and stops.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use chimera_core::api::ChimeraModule;
use chimera_sdk::broker::{Outgoing, Publisher, connect};
use chimera_sdk::db::Database;
use chimera_sdk::envelope::Envelope;
use chimera_sdk::sqlx::{self, Row};
use chimera_testenv::unique_name;
use common::flow;
use common::node::{NodeHarness, example_module};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams};
use serde_json::json;

const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// Every container of every pod in the namespace has CPU and memory requests and limits.
async fn assert_pods_are_bounded(h: &NodeHarness) {
    let pods = h.api::<Pod>().list(&ListParams::default()).await.unwrap();
    assert!(!pods.items.is_empty(), "no pods in {}", h.ns.name);
    for pod in pods.items {
        let name = pod.metadata.name.clone().unwrap_or_default();
        for c in pod.spec.unwrap().containers {
            let r = c.resources.unwrap_or_default();
            let (requests, limits) = (r.requests.unwrap_or_default(), r.limits.unwrap_or_default());
            assert!(
                requests.contains_key("cpu") && requests.contains_key("memory"),
                "pod {name} container {}: requests {requests:?}",
                c.name
            );
            assert!(
                limits.contains_key("memory"),
                "pod {name} container {}: limits {limits:?}",
                c.name
            );
        }
    }
}

#[tokio::test]
async fn the_marketplace_serves_through_services_on_the_node() {
    let mut h = NodeHarness::start("node-flow", &[]).await;
    for domain in ["users", "gigs", "orders"] {
        h.database(domain).await;
    }
    let applied = Instant::now();
    for domain in ["users", "gigs", "orders"] {
        h.apply_module(&example_module(domain)).await;
    }
    for domain in ["users", "gigs", "orders"] {
        h.wait_ready(domain, READY_TIMEOUT).await;
    }
    println!(
        "measured: apply -> all three modules Ready: {:.1} s",
        applied.elapsed().as_secs_f64()
    );
    // The namespace enforces `restricted`: a pod that broke it would not exist at all.
    assert_pods_are_bounded(&h).await;

    let urls = flow::QueryUrls {
        users: h.query_url("users").await,
        gigs: h.query_url("gigs").await,
        orders: h.query_url("orders").await,
    };
    let connection = connect(&h.vhost.amqp_url, &unique_name("client"))
        .await
        .unwrap();
    let publisher = Publisher::open(&connection).await.unwrap();
    flow::marketplace_flow(&publisher, &urls, h.database_url("gigs")).await;
    connection.close(200, "done".into()).await.ok();

    // Deleting a module removes its heads: Deployments, Services and pods.
    h.api::<ChimeraModule>()
        .delete("orders", &DeleteParams::default())
        .await
        .unwrap();
    common::eventually("orders' pods gone", Duration::from_secs(90), || async {
        let pods = h
            .api::<Pod>()
            .list(&ListParams::default().labels("chimera.dev/module=orders"))
            .await
            .ok()?;
        let deployments = h
            .api::<Deployment>()
            .list(&ListParams::default().labels("chimera.dev/module=orders"))
            .await
            .ok()?;
        (pods.items.is_empty() && deployments.items.is_empty()).then_some(())
    })
    .await;
}

/// users' rows and the events its worker published for them.
async fn users_written(db: &Database, prefix: &str) -> (i64, i64) {
    let users: i64 = sqlx::query("SELECT COUNT(*) AS n FROM users WHERE user_id LIKE ?")
        .bind(format!("{prefix}%"))
        .fetch_one(db.pool())
        .await
        .unwrap()
        .try_get("n")
        .unwrap();
    let events: i64 = sqlx::query(
        "SELECT COUNT(*) AS n FROM chimera_outbox WHERE routing_key = 'user.registered' AND body LIKE ?",
    )
    .bind(format!("%\"{prefix}%"))
    .fetch_one(db.pool())
    .await
    .unwrap()
    .try_get("n")
    .unwrap();
    (users, events)
}

#[tokio::test]
async fn a_backlog_scales_worker_pods_out_and_back_to_the_floor() {
    let mut h = NodeHarness::start("node-worker-scale", &[]).await;
    h.database("users").await;
    let mut users = example_module("users");
    users["spec"]["worker"]["replicas"] = json!({"min": 1, "max": 4});
    users["spec"]["worker"]["autoscale"] = json!({"drainSeconds": 5});
    h.apply_module(&users).await;
    h.wait_ready("users", READY_TIMEOUT).await;
    assert_eq!(h.ready_pods("users", "worker").await, 1);

    // A backlog the floor's one pod would need far longer than 5 s to drain.
    let total = 4000;
    let connection = connect(&h.vhost.amqp_url, &unique_name("client"))
        .await
        .unwrap();
    let publisher = Publisher::open(&connection).await.unwrap();
    for i in 0..total {
        let id = format!("load-{i}");
        let command = Outgoing::new(
            "chimera.users.commands",
            Envelope::new(
                "user.register",
                json!({"user_id": id, "name": id, "email": format!("{id}@example.com")}),
            ),
        );
        publisher.publish(&command, true).await.unwrap();
    }
    let backlog = Instant::now();

    let written = common::eventually("worker scaled out", Duration::from_secs(60), || async {
        (h.replicas("users-worker").await > 1).then(Instant::now)
    })
    .await;
    let ready = common::eventually(
        "more Ready worker pods",
        Duration::from_secs(90),
        || async { (h.ready_pods("users", "worker").await > 1).then(Instant::now) },
    )
    .await;
    println!(
        "measured: backlog of {total} -> replicas written {:.1} s, -> >1 Ready pods {:.1} s",
        (written - backlog).as_secs_f64(),
        (ready - backlog).as_secs_f64()
    );

    // Drained: every command applied exactly once (one row and one event per user).
    let db = Database::connect(h.database_url("users"), &[])
        .await
        .unwrap();
    common::eventually("the backlog drained", Duration::from_secs(180), || async {
        (users_written(&db, "load-").await.0 == total).then_some(())
    })
    .await;
    // Back to the floor, the extra pods stopped by the kubelet (SIGTERM, then drained).
    common::eventually(
        "back to one worker pod",
        Duration::from_secs(180),
        || async {
            let pods = h
                .api::<Pod>()
                .list(
                    &ListParams::default()
                        .labels("chimera.dev/module=users,chimera.dev/head=worker"),
                )
                .await
                .ok()?;
            (h.replicas("users-worker").await == 1 && pods.items.len() == 1).then_some(())
        },
    )
    .await;
    assert_eq!(
        users_written(&db, "load-").await,
        (total, total),
        "every command applied once, and one event each"
    );
    let dlq = h.vhost.management_get(&format!(
        "/api/queues/{}/chimera.users.worker.dlq",
        h.vhost.name
    ));
    assert_eq!(dlq["messages"], 0, "nothing dead-lettered: {dlq}");
    connection.close(200, "done".into()).await.ok();
}
