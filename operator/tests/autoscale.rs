//! The autoscaler against a real kube-apiserver and a real RabbitMQ: a backlog in a module's
//! worker queue raises the worker Deployment's replicas, and they fall back once a
//! consumer drains the queue; a broker outage holds replicas steady and says so; a query head
//! whose pods report slow requests scales out, then back in once the latency recovers.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chimera_core::api::ChimeraModule;
use chimera_core::autoscale::histogram::Histogram;
use chimera_core::topology::state::BrokerEndpoint;
use chimera_runtime::cluster::REPLICAS_MANAGER;
use chimera_sdk::broker::{Outgoing, Publisher, connect};
use chimera_sdk::envelope::Envelope;
use chimera_testenv::{TestVhost, free_port, unique_name};
use common::{Harness, eventually};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use lapin::options::{BasicAckOptions, BasicGetOptions};
use serde_json::json;

fn endpoint(vhost: &TestVhost) -> BrokerEndpoint {
    BrokerEndpoint::new(&vhost.amqp_url, Some(vhost.management_url())).unwrap()
}

fn metrics_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

async fn replicas(h: &Harness, deployment: &str) -> Option<i32> {
    h.api::<Deployment>()
        .get(deployment)
        .await
        .ok()?
        .spec?
        .replicas
}

async fn autoscaling(h: &Harness, module: &str, head: &str) -> Option<serde_json::Value> {
    let m = h.api::<ChimeraModule>().get(module).await.ok()?;
    let a = serde_json::to_value(m.status?.autoscaling?).ok()?;
    a.get(head).cloned()
}

#[tokio::test]
async fn a_worker_backlog_scales_out_and_back_in_when_drained() {
    let vhost = TestVhost::create("autoscale");
    let addr = metrics_addr();
    let h = Harness::with_autoscaling_operator("autoscale", endpoint(&vhost), addr).await;
    h.apply_module(&json!({
        "apiVersion": "chimera.dev/v1alpha1",
        "kind": "ChimeraModule",
        "metadata": {"name": "ledger"},
        "spec": {
            "image": "example/ledger:1",
            "commands": ["ledger.post"],
            "worker": {"prefetch": 10, "replicas": {"min": 1, "max": 8}},
        }
    }))
    .await;
    eventually(
        "the worker Deployment at 1 replica",
        Duration::from_secs(30),
        || async { (replicas(&h, "ledger-worker").await? == 1).then_some(()) },
    )
    .await;
    // The queue exists once the topology is declared; the autoscaler reports on it.
    eventually(
        "a first decision in status",
        Duration::from_secs(30),
        || async {
            let w = autoscaling(&h, "ledger", "worker").await?;
            (w["metricsStale"] == false).then_some(())
        },
    )
    .await;

    let connection = connect(&vhost.amqp_url, &unique_name("test-publisher"))
        .await
        .unwrap();
    let publisher = Publisher::open(&connection).await.unwrap();
    let backlog: Vec<Outgoing> = (0..200)
        .map(|i| {
            Outgoing::new(
                "chimera.ledger.commands",
                Envelope::new("ledger.post", json!({"entry": i})),
            )
        })
        .collect();
    publisher.publish_all(&backlog, true).await.unwrap();
    let published = Instant::now();
    // How fast is a benchmark's question (bench/autoscale); here: it scales out at all.
    eventually(
        "a scale-out after the backlog",
        Duration::from_secs(30),
        || async { (replicas(&h, "ledger-worker").await? > 1).then_some(()) },
    )
    .await;
    let scaled = published.elapsed();
    eprintln!("scaled out {scaled:?} after the backlog was published");
    // 200 waiting at a prefetch of 10, the rate not known yet (no pod runs here): the max.
    eventually("8 worker replicas", Duration::from_secs(10), || async {
        (replicas(&h, "ledger-worker").await? == 8).then_some(())
    })
    .await;
    let decision = eventually(
        "the decision in status",
        Duration::from_secs(20),
        || async {
            let w = autoscaling(&h, "ledger", "worker").await?;
            (w["desiredReplicas"] == 8).then_some(w)
        },
    )
    .await;
    assert!(
        decision["signal"].as_str().unwrap().contains("backlog 200"),
        "{decision}"
    );
    assert!(
        decision["reason"].as_str().unwrap().contains("prefetch"),
        "{decision}"
    );
    let events = eventually("a ScaledOut event", Duration::from_secs(10), || async {
        let list = h.api::<Event>().list(&ListParams::default()).await.ok()?;
        list.items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("ScaledOut"))
    })
    .await;
    assert!(
        events
            .note
            .unwrap_or_default()
            .contains("worker head 1 -> "),
        "the event says what changed"
    );
    let metrics = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("chimera_autoscaler_desired_replicas{")
            && metrics.contains("module=\"ledger\"")
            && metrics.contains("chimera_autoscaler_scale_actions_total{"),
        "{metrics}"
    );
    // The controller's own: reconciles by result, their duration, and who leads (alone: it).
    assert!(
        metrics.contains(r#"chimera_operator_reconciles_total{result="ok",error=""}"#)
            && metrics.contains("chimera_operator_reconcile_duration_seconds_count")
            && metrics.contains("chimera_operator_topology_drift_repairs_total")
            && metrics.contains("chimera_operator_leader 1"),
        "{metrics}"
    );

    // A consumer drains the queue; the replicas come back after the scale-in window.
    let channel = connection.create_channel().await.unwrap();
    let mut drained = 0;
    while drained < 200 {
        match channel
            .basic_get("chimera.ledger.worker".into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            Some(m) => {
                m.delivery.ack(BasicAckOptions::default()).await.unwrap();
                drained += 1;
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    eventually("back to 1 replica", Duration::from_secs(60), || async {
        (replicas(&h, "ledger-worker").await? == 1).then_some(())
    })
    .await;
    // The Event is recorded after the replicas are written: it may land a moment later.
    eventually("a ScaledIn event", Duration::from_secs(20), || async {
        let list = h.api::<Event>().list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("ScaledIn"))
            .then_some(())
    })
    .await;
    connection.close(200, "done".into()).await.ok();
}

#[tokio::test]
async fn a_broker_outage_holds_replicas_and_says_so() {
    let vhost = TestVhost::create("outage");
    let h = Harness::with_autoscaling_operator("outage", endpoint(&vhost), metrics_addr()).await;
    // This module's broker does not answer.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = h.api();
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "dead-broker"},
                "stringData": {
                    "url": "amqp://guest:guest@127.0.0.1:1/%2f",
                    "managementUrl": "http://guest:guest@127.0.0.1:1"
                }
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    h.apply_module(&json!({
        "apiVersion": "chimera.dev/v1alpha1",
        "kind": "ChimeraModule",
        "metadata": {"name": "orphan"},
        "spec": {
            "image": "example/orphan:1",
            "commands": ["orphan.do"],
            "broker": {"secretRef": {"name": "dead-broker", "key": "url"}},
            "worker": {"replicas": {"min": 1, "max": 5}},
        }
    }))
    .await;
    eventually("the worker Deployment", Duration::from_secs(30), || async {
        replicas(&h, "orphan-worker").await
    })
    .await;
    // Someone had scaled it to 3; without metrics the autoscaler must not scale in.
    h.api::<Deployment>()
        .patch(
            "orphan-worker",
            &PatchParams::apply(REPLICAS_MANAGER).force(),
            &Patch::Apply(json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "orphan-worker"}, "spec": {"replicas": 3}
            })),
        )
        .await
        .unwrap();
    let decision = eventually(
        "a stale decision in status",
        Duration::from_secs(30),
        || async {
            let w = autoscaling(&h, "orphan", "worker").await?;
            (w["metricsStale"] == true && w["currentReplicas"] == 3).then_some(w)
        },
    )
    .await;
    assert!(
        decision["reason"]
            .as_str()
            .unwrap()
            .contains("metrics unavailable, holding 3"),
        "{decision}"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(replicas(&h, "orphan-worker").await, Some(3), "held steady");
}

/// What the fake query pod reports: a cumulative histogram the test advances.
#[derive(Clone)]
struct FakePod {
    state: Arc<Mutex<(Histogram, f64)>>,
}

impl FakePod {
    fn render(&self) -> String {
        let (h, in_flight) = self.state.lock().unwrap().clone();
        let mut out = String::from("# TYPE chimera_http_request_duration_seconds histogram\n");
        let labels = r#"route="/orders/{id}",method="GET",status="200""#;
        for (bound, count) in h.bounds.iter().zip(&h.counts) {
            out.push_str(&format!(
                "chimera_http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {count}\n"
            ));
        }
        out.push_str(&format!(
            "chimera_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}\n",
            h.total
        ));
        out.push_str(&format!(
            "chimera_http_request_duration_seconds_sum{{{labels}}} {}\n",
            h.sum
        ));
        out.push_str(&format!(
            "chimera_http_request_duration_seconds_count{{{labels}}} {}\n",
            h.total
        ));
        out.push_str(&format!("chimera_http_requests_in_flight {in_flight}\n"));
        out
    }

    /// A second of `rate` requests on `ready` pods that serve 100 requests/s each in 10 ms:
    /// beyond that they queue (300 ms) and complete only what they can.
    fn tick(&self, rate: f64, ready: i32) {
        let capacity = 100.0 * f64::from(ready.max(0));
        let (served, latency) = if rate <= capacity {
            (rate, 0.01)
        } else {
            (capacity, 0.3)
        };
        let mut s = self.state.lock().unwrap();
        s.0.observe_n(latency, served);
        s.1 = rate * latency;
    }
}

/// Stands in for the kubelet: marks the head's pods Running and Ready.
async fn mark_pods_ready(h: &Harness, selector: &str, metrics_at: Option<std::net::IpAddr>) {
    let pods: Api<Pod> = h.api();
    let Ok(list) = pods.list(&ListParams::default().labels(selector)).await else {
        return;
    };
    // One live pod carries the address of the test's metrics server (the autoscaler scrapes
    // every ready pod with an address: one server stands for the head's pods).
    let mut addressed = list.items.iter().any(|p| {
        p.metadata.deletion_timestamp.is_none()
            && chimera_testenv::pod_is_ready(p)
            && p.status.as_ref().is_some_and(|s| s.pod_ip.is_some())
    });
    for pod in list.items {
        let give_address = metrics_at.is_some() && !addressed;
        if (chimera_testenv::pod_is_ready(&pod) && !give_address)
            || pod.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        let name = pod.metadata.name.clone().unwrap_or_default();
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let mut status = json!({
            "phase": "Running",
            "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now}
            ]
        });
        if let (true, Some(ip)) = (give_address, metrics_at) {
            status["podIP"] = json!(ip.to_string());
            status["podIPs"] = json!([{"ip": ip.to_string()}]);
            addressed = true;
        }
        let _ = pods
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await;
    }
}

#[tokio::test]
async fn slow_query_pods_scale_the_query_head_out_then_in() {
    let vhost = TestVhost::create("query-scale");
    let h =
        Harness::with_autoscaling_operator("query-scale", endpoint(&vhost), metrics_addr()).await;
    // The pods' /metrics server, on the node's bridge address (only this machine and its pods
    // reach it), bound before the module names its port: a port free on loopback may be
    // taken on another address.
    let ip = chimera_testenv::node_ip();
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    h.apply_module(&json!({
        "apiVersion": "chimera.dev/v1alpha1",
        "kind": "ChimeraModule",
        "metadata": {"name": "catalog"},
        "spec": {
            "image": "example/catalog:1",
            "query": {
                "port": port,
                "replicas": {"min": 1, "max": 6},
                "autoscale": {"latency": {"percentile": 95, "targetMs": 100}}
            }
        }
    }))
    .await;
    eventually("the query Deployment", Duration::from_secs(30), || async {
        replicas(&h, "catalog-query").await
    })
    .await;

    // The head's pods, as the autoscaler finds them: one ready pod whose address is a real
    // HTTP server serving the pods' /metrics on the head's port.
    let pod = FakePod {
        state: Arc::new(Mutex::new((
            Histogram::empty(&chimera_contract::metrics::BUCKETS),
            0.0,
        ))),
    };
    let served = pod.clone();
    let app = chimera_sdk::axum::Router::new().route(
        "/metrics",
        chimera_sdk::axum::routing::get(move || {
            let text = served.render();
            async move { text }
        }),
    );
    tokio::spawn(async move { chimera_sdk::axum::serve(listener, app).await });

    // 250 requests/s: more than one pod serves within the 100 ms target.
    let rate = Arc::new(std::sync::atomic::AtomicU64::new(250));
    let traffic = {
        let (pod, rate) = (pod.clone(), rate.clone());
        let deployments: Api<Deployment> = h.api();
        tokio::spawn(async move {
            loop {
                let ready = deployments
                    .get("catalog-query")
                    .await
                    .ok()
                    .and_then(|d| d.status?.ready_replicas)
                    .unwrap_or(0);
                #[allow(clippy::cast_precision_loss)]
                pod.tick(
                    rate.load(std::sync::atomic::Ordering::Relaxed) as f64,
                    ready,
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let selector = "chimera.dev/module=catalog,chimera.dev/head=query";
    let scaled_out = eventually(
        "the query head scales out to 3 or more",
        Duration::from_secs(60),
        || async {
            mark_pods_ready(&h, selector, Some(ip)).await;
            let r = replicas(&h, "catalog-query").await?;
            (r >= 3).then_some(r)
        },
    )
    .await;
    eprintln!("query head scaled out to {scaled_out}");
    let decision = eventually(
        "the decision in status",
        Duration::from_secs(20),
        || async {
            let q = autoscaling(&h, "catalog", "query").await?;
            (q["desiredReplicas"].as_i64()? >= 3).then_some(q)
        },
    )
    .await;
    assert!(
        decision["signal"].as_str().unwrap().contains("p95"),
        "{decision}"
    );

    // The load falls to what one pod serves: the head scales back in, slowly.
    rate.store(50, std::sync::atomic::Ordering::Relaxed);
    // Each new decision is printed: a failure's log then says why the head held.
    let last = Mutex::new(String::new());
    eventually(
        "the query head scales back in",
        Duration::from_secs(90),
        || async {
            mark_pods_ready(&h, selector, Some(ip)).await;
            if let Some(q) = autoscaling(&h, "catalog", "query").await {
                let said = format!("{} | {}", q["reason"], q["signal"]);
                let mut last = last.lock().unwrap();
                if *last != said {
                    eprintln!("decision: {said}");
                    *last = said;
                }
            }
            (replicas(&h, "catalog-query").await? < scaled_out).then_some(())
        },
    )
    .await;
    traffic.abort();
}
