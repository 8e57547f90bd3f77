//! The chart's Grafana dashboards against a real Prometheus (Debian's package) that scrapes the
//! operator's two replicas and a module's heads on the dev node, relabeled as
//! `examples/prometheus/prometheus.yml` says: every panel's query and every variable's query
//! returns data. Debian builds Prometheus without Kubernetes discovery, so the test lists the
//! pods itself and hands Prometheus the same `__meta_kubernetes_*` labels through a file.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use chimera_sdk::broker::{Publisher, connect};
use chimera_testenv::prometheus::Prometheus;
use common::node::{NodeHarness, example_module, register_user};
use common::repo_root;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use serde_json::{Value, json};

/// What Grafana would put in place of the dashboards' variables.
fn substitute(expr: &str, namespace: &str) -> String {
    let out = expr
        .replace("$__rate_interval", "20s")
        .replace("$namespace", namespace)
        .replace("$module", "users");
    assert!(
        !out.contains('$'),
        "a variable the test does not know: {expr}"
    );
    out
}

/// The chart's dashboards: (file, JSON).
fn dashboards() -> Vec<(String, Value)> {
    let dir = repo_root().join("charts/chimera-operator/dashboards");
    let mut found: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, json)
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(found.len(), 2, "the operator's and the modules' dashboards");
    found
}

/// Each panel's queries: (where, PromQL).
fn panel_queries(dashboards: &[(String, Value)]) -> Vec<(String, String)> {
    let mut queries = Vec::new();
    for (file, dashboard) in dashboards {
        for panel in dashboard["panels"].as_array().unwrap() {
            let targets = panel["targets"].as_array().unwrap();
            assert!(
                !targets.is_empty(),
                "{file}: {} has no query",
                panel["title"]
            );
            for target in targets {
                let expr = target["expr"].as_str().unwrap();
                queries.push((format!("{file}: {}", panel["title"]), expr.to_owned()));
            }
        }
    }
    queries
}

/// Each query variable: (where, selector, label) of its `label_values(selector, label)`.
fn variable_queries(dashboards: &[(String, Value)]) -> Vec<(String, String, String)> {
    let mut queries = Vec::new();
    for (file, dashboard) in dashboards {
        for variable in dashboard["templating"]["list"].as_array().unwrap() {
            if variable["type"] != "query" {
                continue;
            }
            let query = variable["query"]["query"].as_str().unwrap();
            let inner = query
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
                .unwrap_or_else(|| panic!("{file}: {query} is not label_values(..)"));
            let (selector, label) = inner.rsplit_once(',').unwrap();
            queries.push((
                format!("{file}: ${}", variable["name"].as_str().unwrap()),
                selector.trim().to_owned(),
                label.trim().to_owned(),
            ));
        }
    }
    queries
}

/// examples/prometheus/prometheus.yml, scraping every 2 s, its Kubernetes service discovery
/// swapped for the file `targets` (Debian's Prometheus is built without Kubernetes discovery):
/// the relabeling, which the dashboards' labels depend on, is the example's as it is.
fn scrape_config(targets: &Path) -> String {
    let path = repo_root().join("examples/prometheus/prometheus.yml");
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    config["global"]["scrape_interval"] = "2s".into();
    for job in config["scrape_configs"].as_sequence_mut().unwrap() {
        let job = job.as_mapping_mut().unwrap();
        let sd = job.remove("kubernetes_sd_configs").unwrap();
        assert_eq!(
            sd,
            serde_yaml::from_str::<serde_yaml::Value>("[{role: pod}]").unwrap()
        );
        job.insert(
            "file_sd_configs".into(),
            serde_yaml::from_str(&format!(
                "[{{files: [{}], refresh_interval: 2s}}]",
                targets.display()
            ))
            .unwrap(),
        );
    }
    serde_yaml::to_string(&config).unwrap()
}

/// A label name as Prometheus's Kubernetes discovery writes it (`chimera.dev/module` →
/// `chimera_dev_module`).
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// What Prometheus's Kubernetes discovery (`role: pod`) finds in `namespace`, as file_sd
/// target groups: one per container port, with the `__meta_kubernetes_*` labels it sets.
async fn pod_targets(pods: &Api<Pod>, namespace: &str) -> Value {
    let mut groups = Vec::new();
    for pod in pods.list(&ListParams::default()).await.unwrap() {
        let status = pod.status.clone().unwrap_or_default();
        let Some(ip) = status.pod_ip.clone() else {
            continue;
        };
        let mut labels = serde_json::Map::new();
        labels.insert("__meta_kubernetes_namespace".into(), namespace.into());
        labels.insert("__meta_kubernetes_pod_name".into(), pod.name_any().into());
        labels.insert("__meta_kubernetes_pod_ip".into(), ip.clone().into());
        labels.insert(
            "__meta_kubernetes_pod_phase".into(),
            status.phase.unwrap_or_default().into(),
        );
        for (k, v) in pod.labels() {
            labels.insert(
                format!("__meta_kubernetes_pod_label_{}", sanitize(k)),
                v.clone().into(),
            );
        }
        for container in pod.spec.iter().flat_map(|s| &s.containers) {
            for port in container.ports.iter().flatten() {
                let mut labels = labels.clone();
                labels.insert(
                    "__meta_kubernetes_pod_container_name".into(),
                    container.name.clone().into(),
                );
                labels.insert(
                    "__meta_kubernetes_pod_container_port_name".into(),
                    port.name.clone().unwrap_or_default().into(),
                );
                labels.insert(
                    "__meta_kubernetes_pod_container_port_number".into(),
                    port.container_port.to_string().into(),
                );
                groups.push(json!({
                    "targets": [format!("{ip}:{}", port.container_port)],
                    "labels": labels,
                }));
            }
        }
    }
    Value::Array(groups)
}

/// Writes the target groups where Prometheus reads them (whole, never half a file).
fn write_targets(path: &Path, groups: &Value) {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, groups.to_string()).unwrap();
    std::fs::rename(&partial, path).unwrap();
}

/// Scrape targets that are up, by job.
fn up_targets(prometheus: &Prometheus, job: &str) -> usize {
    let data = prometheus.api("/api/v1/targets", &[("state", "active")]);
    data["activeTargets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["labels"]["job"] == job && t["health"] == "up")
        .count()
}

#[tokio::test]
async fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let dashboards = dashboards();
    let mut h = NodeHarness::start("node-dashboards", &[]).await;
    h.database("users").await;
    let mut users = example_module("users");
    // (a worker that stays up between messages: its metrics are scraped all along)
    users["spec"]["worker"]["replicas"] = json!({"min": 1, "max": 3});
    h.apply_module(&users).await;
    // A module whose query Service's name someone else holds: its reconciles fail, which the
    // operator dashboard's errors panel shows.
    h.api::<Service>()
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "gigs-query"},
                "spec": {"ports": [{"port": 80}]}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    h.apply_module(&example_module("gigs")).await;
    h.wait_ready("users", Duration::from_secs(180)).await;

    let pods = h.api::<Pod>();
    let targets_dir = std::env::temp_dir().join(chimera_testenv::unique_name("prometheus-targets"));
    std::fs::create_dir_all(&targets_dir).unwrap();
    let targets = targets_dir.join("pods.json");
    write_targets(&targets, &pod_targets(&pods, &h.ns.name).await);
    let prometheus = Prometheus::start(&scrape_config(&targets));

    // Reads: found, bad input, unknown route.
    let query = h.query_url("users").await;
    for path in ["/users", "/users/not-a-uuid", "/nope"] {
        for _ in 0..5 {
            reqwest::get(format!("{query}{path}")).await.unwrap();
        }
    }
    // And steady reads, so that the autoscaler has a percentile to hold (it needs about 7
    // requests a second in its window).
    let steady = tokio::spawn(async move {
        let client = reqwest::Client::new();
        loop {
            let _ = client.get(format!("{query}/users")).send().await;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    // Commands, and one that cannot be decoded (dead-lettered).
    let connection = connect(&h.vhost.amqp_url, &chimera_testenv::unique_name("client"))
        .await
        .unwrap();
    let publisher = Publisher::open(&connection).await.unwrap();
    for i in 0..20 {
        let id = format!("dash-{i}");
        let command = register_user(&id);
        publisher.publish(&command, true).await.unwrap();
    }
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_publish(
            "chimera.users.commands".into(),
            "user.register".into(),
            BasicPublishOptions::default(),
            b"not json",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    // Both operator replicas and both heads are scraped.
    let deadline = Instant::now() + Duration::from_secs(60);
    while up_targets(&prometheus, "chimera-operator") < 2
        || up_targets(&prometheus, "chimera-heads") < 2
    {
        write_targets(&targets, &pod_targets(&pods, &h.ns.name).await);
        assert!(
            Instant::now() < deadline,
            "targets not up after 60 s: {}\n{}",
            prometheus.api("/api/v1/targets", &[]),
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    let ns = h.ns.name.clone();
    let panels: Vec<(String, String)> = panel_queries(&dashboards)
        .into_iter()
        .map(|(at, expr)| (at, substitute(&expr, &ns)))
        .collect();
    let variables: Vec<(String, String, String)> = variable_queries(&dashboards)
        .into_iter()
        .map(|(at, selector, label)| (at, substitute(&selector, &ns), label))
        .collect();
    assert!(panels.len() >= 20, "{panels:?}");
    assert_eq!(
        variables.len(),
        4,
        "namespace and module, on both dashboards"
    );

    // Each query returns data once a few scrapes are in (rates need two samples).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut empty: Vec<String> = panels
            .iter()
            .filter(|(_, expr)| prometheus.query(expr).is_empty())
            .map(|(at, expr)| format!("{at}: {expr}"))
            .collect();
        for (at, selector, label) in &variables {
            let expected = if label == "namespace" {
                ns.as_str()
            } else {
                "users"
            };
            let values: Vec<Value> = prometheus
                .query(selector)
                .iter()
                .map(|s| s["metric"][label].clone())
                .collect();
            if !values.iter().any(|v| v == expected) {
                empty.push(format!(
                    "{at}: {selector} has no {label}={expected}: {values:?}"
                ));
            }
        }
        if empty.is_empty() {
            break;
        }
        write_targets(&targets, &pod_targets(&pods, &h.ns.name).await);
        assert!(
            Instant::now() < deadline,
            "dashboard queries without data after 120 s:\n{}",
            empty.join("\n")
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    // The data is what happened: the failed reconciles are the taken name, the bad message
    // was dead-lettered, and one replica leads.
    let errors =
        prometheus.query(r#"sum by (error) (chimera_operator_reconciles_total{result="error"})"#);
    assert!(
        errors.iter().any(|s| s["metric"]["error"] == "name_taken"),
        "{errors:?}"
    );
    let dead = prometheus.query(&format!(
        r#"sum(chimera_worker_messages_total{{namespace="{ns}", module="users", outcome="dead_lettered"}})"#
    ));
    assert_eq!(dead[0]["value"][1], "1", "{dead:?}");
    let leaders = prometheus.query("sum(chimera_operator_leader)");
    assert_eq!(leaders[0]["value"][1], "1", "{leaders:?}");
    steady.abort();
    connection.close(200, "done".into()).await.ok();
    std::fs::remove_dir_all(&targets_dir).ok();
}
