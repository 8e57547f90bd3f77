//! Chimera on the dev node, end to end: the chart's operator pod runs the marketplace's modules
//! as real pods (the images `scripts/images` imports) in a namespace enforcing the `restricted`
//! Pod Security Standard; clients reach the query heads through their ClusterIP Services and
//! send commands over AMQP; the autoscaler scales real pods, which the kubelet starts and stops.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use chimera_core::api::ChimeraModule;
use chimera_sdk::broker::{Publisher, connect};
use chimera_sdk::db::Database;
use chimera_sdk::sqlx::{self, Row};
use chimera_testenv::unique_name;
use common::flow;
use common::node::{NodeHarness, example_module, register_user, users_with_slow_workers};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{DeleteParams, ListParams};
use serde_json::json;

const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// The chart's operator gives every head a NetworkPolicy; the API server accepted them and
/// each selects exactly its head's pods. (The dev node's bridge CNI does not enforce them.)
async fn assert_policies_select_their_heads(h: &NodeHarness, modules: &[&str]) {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    let policies = h
        .api::<NetworkPolicy>()
        .list(&ListParams::default())
        .await
        .unwrap();
    for module in modules {
        for head in ["query", "worker"] {
            let name = format!("{module}-{head}");
            let policy = policies
                .items
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(name.as_str()))
                .unwrap_or_else(|| panic!("no NetworkPolicy {name}"));
            let selector = policy.spec.as_ref().unwrap().pod_selector.clone().unwrap();
            let labels = selector
                .match_labels
                .unwrap()
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            let selected = h
                .api::<Pod>()
                .list(&ListParams::default().labels(&labels))
                .await
                .unwrap();
            let heads = h
                .api::<Pod>()
                .list(&ListParams::default().labels(&format!(
                    "chimera.dev/module={module},chimera.dev/head={head}"
                )))
                .await
                .unwrap();
            let names = |l: &kube::api::ObjectList<Pod>| {
                let mut n: Vec<String> = l.items.iter().map(|p| p.name_any()).collect();
                n.sort();
                n
            };
            assert!(!heads.items.is_empty(), "{name}: no pods");
            assert_eq!(
                names(&selected),
                names(&heads),
                "{name} selects its head's pods"
            );
        }
    }
}

/// Every container of every pod in the namespace has CPU and memory requests and limits, and
/// the heads' pods carry no API token.
async fn assert_pods_are_bounded(h: &NodeHarness) {
    let pods = h.api::<Pod>().list(&ListParams::default()).await.unwrap();
    assert!(!pods.items.is_empty(), "no pods in {}", h.ns.name);
    for pod in pods.items {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let head = pod.labels().contains_key("chimera.dev/head");
        let spec = pod.spec.unwrap();
        if head {
            assert_eq!(
                spec.automount_service_account_token,
                Some(false),
                "pod {name}: a head gets no token"
            );
            let mounts = spec.containers[0].volume_mounts.clone().unwrap_or_default();
            assert!(
                !mounts
                    .iter()
                    .any(|m| m.mount_path.contains("serviceaccount")),
                "pod {name}: {mounts:?}"
            );
        }
        for c in spec.containers {
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
    assert_policies_select_their_heads(&h, &["users", "gigs", "orders"]).await;
    // The namespace enforces `restricted`, so the heads' pods passed it: a pod that breaks it
    // is refused.
    let refused = h
        .api::<Pod>()
        .create(
            &kube::api::PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "privileged"},
                "spec": {"containers": [{
                    "name": "c", "image": "chimera/users:dev",
                    "securityContext": {"privileged": true}
                }]}
            }))
            .unwrap(),
        )
        .await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(e)) if e.code == 403 && e.message.contains("PodSecurity")),
        "a privileged pod must be refused: {refused:?}"
    );
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

/// The Python module on the node: its image (an interpreter and its packages, no SDK) as two
/// pods on MariaDB under the `restricted` policy; a buyer's name and an order's event, published
/// as the users and orders domains would, become the buyer's notification, read through the
/// module's Service. Its worker starts from zero replicas on the queue's depth.
#[tokio::test]
async fn the_python_module_serves_on_the_node() {
    let mut h = NodeHarness::start("node-python", &[]).await;
    // Beside the marketplace: the domains it subscribes to exist (its topology is Ready).
    let domains = ["users", "gigs", "orders", "notifications"];
    for domain in domains {
        h.database(domain).await;
    }
    for domain in domains {
        h.apply_module(&example_module(domain)).await;
    }
    for domain in domains {
        h.wait_ready(domain, READY_TIMEOUT).await;
    }
    let url = h.query_url("notifications").await;
    let connection = connect(&h.vhost.amqp_url, &unique_name("client"))
        .await
        .unwrap();
    let publisher = Publisher::open(&connection).await.unwrap();
    let buyer = unique_name("buyer");
    // A real user.registered, from the users worker; then an order's event as orders sends it.
    publisher
        .publish(&register_user(&buyer), true)
        .await
        .unwrap();
    let http = reqwest::Client::new();
    // Registered (and its event in the notifications queue, ahead of the order's) once the
    // users query head has the user.
    let users = h.query_url("users").await;
    common::eventually("the buyer registered", READY_TIMEOUT, || async {
        let r = http
            .get(format!("{users}/users/{buyer}"))
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let placed = chimera_sdk::broker::Outgoing::new(
        "chimera.orders.events",
        chimera_sdk::envelope::Envelope::new(
            "order.placed",
            json!({"order_id": "o-node", "buyer_id": buyer}),
        ),
    );
    publisher.publish(&placed, true).await.unwrap();
    let items = common::eventually("the buyer's notification", READY_TIMEOUT, || async {
        let body: serde_json::Value = http
            .get(format!("{url}/notifications?user_id={buyer}"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let items = body["items"].as_array()?.clone();
        (!items.is_empty()).then_some(items)
    })
    .await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["kind"], "order.placed");
    assert_eq!(items[0]["order_id"], "o-node");
    assert!(
        items[0]["text"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{buyer}: ")),
        "the buyer's name came from users' event: {items:?}"
    );
    let bad = http
        .get(format!("{url}/notifications"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    connection.close(200, "done".into()).await.ok();
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

/// Waits until all `sent` commands with ids starting `prefix` were applied, then checks each
/// was applied exactly once (one row, one event) and nothing was dead-lettered.
async fn applied_exactly_once(h: &NodeHarness, db: &Database, prefix: &str, sent: i64) {
    common::eventually(
        &format!("every {prefix}* command applied"),
        Duration::from_secs(180),
        || async { (users_written(db, prefix).await.0 == sent).then_some(()) },
    )
    .await;
    assert_eq!(
        users_written(db, prefix).await,
        (sent, sent),
        "every command applied once, and one event each"
    );
    let dlq = h.vhost.management_get(&format!(
        "/api/queues/{}/chimera.users.worker.dlq",
        h.vhost.name
    ));
    assert_eq!(dlq["messages"], 0, "nothing dead-lettered: {dlq}");
}

#[tokio::test]
async fn a_backlog_scales_worker_pods_out_and_back_to_the_floor() {
    let mut h = NodeHarness::start("node-worker-scale", &[]).await;
    h.database("users").await;
    let users = users_with_slow_workers(4);
    h.apply_module(&users).await;
    h.wait_ready("users", READY_TIMEOUT).await;
    assert_eq!(h.ready_pods("users", "worker").await, 1);

    // A backlog the floor's one pod would need far longer than 5 s to drain.
    let total = 4000;
    let connection = connect(&h.vhost.amqp_url, &unique_name("client"))
        .await
        .unwrap();
    let publisher = Publisher::open(&connection).await.unwrap();
    // Published in the background: the scaler sees the backlog while it grows, and the clock
    // runs from the first command.
    let backlog = Instant::now();
    let publishing = tokio::spawn(async move {
        for i in 0..total {
            let command = register_user(&format!("load-{i}"));
            publisher.publish(&command, true).await.unwrap();
        }
        backlog.elapsed()
    });
    let written = common::eventually("worker scaled out", Duration::from_secs(90), || async {
        (h.replicas("users-worker").await > 1).then(Instant::now)
    })
    .await;
    let ready = common::eventually(
        "more Ready worker pods",
        Duration::from_secs(90),
        || async { (h.ready_pods("users", "worker").await > 1).then(Instant::now) },
    )
    .await;
    let published = publishing.await.unwrap();
    println!(
        "measured: backlog of {total} (published in {:.1} s) -> replicas written {:.1} s, -> >1 Ready pods {:.1} s",
        published.as_secs_f64(),
        (written - backlog).as_secs_f64(),
        (ready - backlog).as_secs_f64()
    );
    // The law plans with the start-up time of these very pods, not the operator's default (10 s).
    let startup = common::eventually(
        "a measured pod start-up time",
        Duration::from_secs(60),
        || async {
            let module = h.api::<ChimeraModule>().get("users").await.ok()?;
            let worker = module.status?.autoscaling?.worker?;
            (worker.pod_startup_measured_pods > 1).then_some(worker)
        },
    )
    .await;
    println!(
        "measured: worker pod start-up (created -> Ready) {:.1} s, from {} pods",
        startup.pod_startup_seconds.unwrap(),
        startup.pod_startup_measured_pods
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
    applied_exactly_once(&h, &db, "load-", total).await;
    connection.close(200, "done".into()).await.ok();
}

/// Traffic that runs until stopped: GETs on a query Service (a fresh connection each, as many
/// clients arriving would) and `user.register` commands; counts what failed.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    http: tokio::task::JoinHandle<(u64, Vec<String>)>,
    commands: tokio::task::JoinHandle<u64>,
}

impl Load {
    fn start(publisher: Publisher, query_url: String, prefix: &'static str) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let http = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(0)
                    // Generous: four node tests share two cores; a slow answer is not a failure.
                    .timeout(Duration::from_secs(10))
                    .build()
                    .unwrap();
                let (mut ok, mut failures) = (0, vec![]);
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let at = started.elapsed().as_secs_f64();
                    match client
                        .get(format!("{query_url}/users?limit=5"))
                        .send()
                        .await
                    {
                        Ok(r) if r.status().is_success() => ok += 1,
                        Ok(r) => failures.push(format!("{at:.1} s: HTTP {}", r.status())),
                        Err(e) => failures.push(format!("{at:.1} s: {e:?}")),
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                (ok, failures)
            })
        };
        let commands = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut sent = 0;
                while !stop.load(Ordering::Relaxed) {
                    let command = register_user(&format!("{prefix}{sent}"));
                    publisher.publish(&command, true).await.unwrap();
                    sent += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                sent
            })
        };
        Self {
            stop,
            http,
            commands,
        }
    }

    /// Stops the traffic: (successful GETs, failed GETs, commands sent).
    async fn finish(self) -> (u64, Vec<String>, i64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (ok, failures) = self.http.await.unwrap();
        let sent = self.commands.await.unwrap();
        (ok, failures, i64::try_from(sent).unwrap())
    }
}

/// Gives the images already imported a second tag, as a new release of the module would be.
fn tag_images(tag: &str) {
    let out = chimera_testenv::ctr(&[
        "images",
        "tag",
        "--force",
        "docker.io/chimera/users:dev",
        &format!("docker.io/chimera/users:{tag}"),
    ]);
    assert!(out.status.success(), "ctr images tag: {out:?}");
}

/// Waits until every pod of the module runs `image` and the old ones are gone.
async fn rolled_out(h: &NodeHarness, image: &str) {
    common::eventually("the rollout", Duration::from_secs(180), || async {
        let pods = h
            .api::<Pod>()
            .list(&ListParams::default().labels("chimera.dev/module=users"))
            .await
            .ok()?;
        let done = !pods.items.is_empty()
            && pods.items.iter().all(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && p.spec
                        .as_ref()
                        .is_some_and(|s| s.containers[0].image.as_deref() == Some(image))
            });
        (done
            && h.ready_pods("users", "query").await >= 1
            && h.ready_pods("users", "worker").await >= 1)
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_rolling_update_and_a_killed_worker_lose_nothing_under_load() {
    let mut h = NodeHarness::start("node-rollout", &[]).await;
    h.database("users").await;
    let mut users = example_module("users");
    users["spec"]["worker"]["replicas"] = json!({"min": 1, "max": 3});
    users["spec"]["query"]["replicas"] = json!({"min": 2, "max": 2});
    h.apply_module(&users).await;
    h.wait_ready("users", READY_TIMEOUT).await;
    let query_url = h.query_url("users").await;
    let connection = connect(&h.vhost.amqp_url, &unique_name("client"))
        .await
        .unwrap();
    let publisher = Publisher::open(&connection).await.unwrap();
    let db = Database::connect(h.database_url("users"), &[])
        .await
        .unwrap();

    // The Service serves before the rollout (a module is Ready when its pods are; kube-proxy
    // programs the Service's rules a moment later).
    common::eventually(
        "the query Service answers",
        Duration::from_secs(30),
        || async {
            let answered = flow::get(&format!("{query_url}/users?limit=1")).await.0 == 200;
            answered.then_some(())
        },
    )
    .await;

    // A new image tag under load.
    tag_images("rollout");
    let load = Load::start(publisher.clone(), query_url.clone(), "roll-");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    users["spec"]["image"] = json!("chimera/users:rollout");
    h.apply_module(&users).await;
    rolled_out(&h, "chimera/users:rollout").await;
    println!(
        "measured: rolling update of both heads (2 query + 1 worker pods): {:.1} s",
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok, failures, sent) = load.finish().await;
    assert!(ok > 0, "the query Service answered nothing");
    assert!(
        failures.is_empty(),
        "{} of {} GETs failed during the rollout: {:?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(5)]
    );
    applied_exactly_once(&h, &db, "roll-", sent).await;

    // A worker killed outright (SIGKILL: no drain, no goodbye to the broker) while it consumes.
    let load = Load::start(publisher.clone(), query_url, "kill-");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let workers = h
        .api::<Pod>()
        .list(&ListParams::default().labels("chimera.dev/module=users,chimera.dev/head=worker"))
        .await
        .unwrap();
    let container = common::node::container_id(&workers.items[0]);
    let killed = chimera_testenv::ctr(&["tasks", "kill", "--signal", "SIGKILL", &container]);
    assert!(killed.status.success(), "ctr tasks kill: {killed:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ok, failures, sent) = load.finish().await;
    assert!(
        ok > 0 && failures.is_empty(),
        "the query head is untouched by a worker's crash: {} ok, failed {:?}",
        ok,
        &failures[..failures.len().min(5)]
    );
    common::eventually(
        "the killed worker restarted",
        Duration::from_secs(60),
        || async {
            let pod = h
                .api::<Pod>()
                .get(workers.items[0].metadata.name.as_deref()?)
                .await
                .ok()?;
            let restarts = pod.status?.container_statuses?.first()?.restart_count;
            (restarts > 0).then_some(())
        },
    )
    .await;
    applied_exactly_once(&h, &db, "kill-", sent).await;
    connection.close(200, "done".into()).await.ok();
}

#[tokio::test]
async fn slow_query_pods_scale_the_query_head_out_then_in() {
    let mut h = NodeHarness::start("node-query-scale", &[]).await;
    h.database("users").await;
    let mut users = example_module("users");
    // Pods starved of CPU (2 ms of every 100) answer slowly under a load one pod with a core
    // would serve at once: latency, not demand alone, must bring more pods.
    users["spec"]["query"]["resources"] = json!({
        "requests": {"cpu": "10m", "memory": "32Mi"},
        "limits": {"cpu": "20m", "memory": "256Mi"}
    });
    users["spec"]["query"]["replicas"] = json!({"min": 1, "max": 4});
    users["spec"]["query"]["autoscale"] = json!({"latency": {"percentile": 95, "targetMs": 100}});
    h.apply_module(&users).await;
    h.wait_ready("users", READY_TIMEOUT).await;
    let url = format!("{}/users?limit=20", h.query_url("users").await);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (stop, url) = (stop.clone(), url.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = client
                        .get(&url)
                        .timeout(Duration::from_secs(10))
                        .send()
                        .await;
                }
            })
        })
        .collect();
    let loaded = Instant::now();
    let out = common::eventually(
        "the query head scaled out",
        Duration::from_secs(90),
        || async { (h.replicas("users-query").await > 1).then(Instant::now) },
    )
    .await;
    common::eventually("more Ready query pods", Duration::from_secs(60), || async {
        (h.ready_pods("users", "query").await > 1).then_some(())
    })
    .await;
    println!(
        "measured: slow query pods -> scale-out written after {:.1} s",
        (out - loaded).as_secs_f64()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let idle = Instant::now();
    common::eventually(
        "the query head back to its floor",
        Duration::from_secs(240),
        || async { (h.replicas("users-query").await == 1).then_some(()) },
    )
    .await;
    println!(
        "measured: idle -> query head back to 1 after {:.1} s",
        idle.elapsed().as_secs_f64()
    );
    let module = h.api::<ChimeraModule>().get("users").await.unwrap();
    let status = serde_json::to_value(module.status).unwrap();
    assert!(
        status["autoscaling"]["query"]["reason"].is_string(),
        "the decision is explained in status: {status}"
    );
}
