//! Tests on the dev node: the operator installed by helm from charts/ as a pod (its image, its
//! ServiceAccount, the chart's RBAC), modules as real pods behind real Services, in a namespace
//! that enforces the `restricted` Pod Security Standard.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use chimera_core::api::ChimeraModule;
use chimera_sdk::broker::Outgoing;
use chimera_sdk::envelope::Envelope;
use chimera_testenv::{TestDatabase, TestNamespace, TestVhost};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use super::{eventually, install_crd, repo_root};

/// The images the node tests run (`scripts/images --debug` builds and imports them).
pub const IMAGES: [&str; 5] = [
    "chimera/operator:dev",
    "chimera/users:dev",
    "chimera/gigs:dev",
    "chimera/orders:dev",
    "chimera/notifications:dev",
];

/// The containerd id of `pod`'s first container (for `ctr tasks kill`).
pub fn container_id(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .container_id
        .clone()
        .unwrap()
        .trim_start_matches("containerd://")
        .to_owned()
}

/// A namespace on the node with its own broker vhost and its own operator release.
pub struct NodeHarness {
    pub client: Client,
    pub vhost: TestVhost,
    pub databases: Vec<(String, TestDatabase)>,
    release: String,
    // Last: dropped after the release is uninstalled.
    pub ns: TestNamespace,
}

/// Runs helm, failing the test with its output when it fails.
pub fn helm(args: &[&str]) -> String {
    let out = Command::new(chimera_testenv::helm())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run helm: {e}"));
    assert!(
        out.status.success(),
        "helm {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl NodeHarness {
    /// A restricted namespace, its broker Secret, and the chart installed into it (operator
    /// watching only this namespace, declaring topology on the test's vhost, autoscaling).
    pub async fn start(prefix: &str, extra_values: &[&str]) -> Self {
        chimera_testenv::require_images(&IMAGES);
        let client = chimera_testenv::kube_client().await;
        install_crd(&client).await;
        let ns = TestNamespace::on_node(&client, prefix).await;
        let vhost = TestVhost::create(prefix);
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
        secrets
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": "chimera-broker"},
                    "stringData": {
                        "url": vhost.cluster_amqp_url(),
                        "managementUrl": vhost.cluster_management_url()
                    }
                }))
                .unwrap(),
            )
            .await
            .unwrap();
        let release = ns.name.clone();
        let chart = repo_root().join("charts/chimera-operator");
        let watch = format!("watchNamespace={}", ns.name);
        let mut args = vec![
            "install",
            &release,
            chart.to_str().unwrap(),
            "--namespace",
            &ns.name,
            "--set",
            "image.tag=dev",
            "--set",
            "image.pullPolicy=Never",
            "--set",
            "brokerSecret=chimera-broker",
            "--set",
            &watch,
            "--set",
            "logFormat=text",
            "--set",
            "topologyResyncSeconds=5",
        ];
        for value in extra_values {
            args.extend(["--set", value]);
        }
        args.extend(["--wait", "--timeout", "120s"]);
        // A failed install must not leave the release's cluster-wide RBAC behind.
        let installed = std::panic::catch_unwind(|| helm(&args));
        if let Err(failure) = installed {
            let _ = Command::new(chimera_testenv::helm())
                .args(["uninstall", &release, "--namespace", &ns.name])
                .output();
            std::panic::resume_unwind(failure);
        }
        Self {
            client,
            vhost,
            databases: vec![],
            release,
            ns,
        }
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.ns.name)
    }

    /// A MariaDB database of the domain's own and its Secret `<domain>-db` (key `url`), as the
    /// examples name it.
    pub async fn database(&mut self, domain: &str) {
        let db = TestDatabase::mysql(domain).await;
        let url = db.cluster_url().expect("a MariaDB database");
        self.api::<Secret>()
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": format!("{domain}-db")},
                    "stringData": {"url": url}
                }))
                .unwrap(),
            )
            .await
            .unwrap();
        self.databases.push((domain.to_owned(), db));
    }

    /// The host's URL of a domain's database (for reading what the pods wrote).
    pub fn database_url(&self, domain: &str) -> &str {
        &self
            .databases
            .iter()
            .find(|(d, _)| d == domain)
            .expect("a database made by NodeHarness::database")
            .1
            .url
    }

    /// Server-side applies a module as kubectl would.
    pub async fn apply_module(&self, module: &serde_json::Value) {
        super::apply_module(&self.api(), module).await;
    }

    /// Waits until the module's Ready condition is True; returns how long that took.
    pub async fn wait_ready(&self, name: &str, timeout: Duration) -> Duration {
        let started = Instant::now();
        let modules = self.api::<ChimeraModule>();
        let deadline = started + timeout;
        loop {
            let module = modules.get_opt(name).await.ok().flatten();
            let ready = module
                .as_ref()
                .and_then(|m| m.status.as_ref())
                .is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                });
            if ready {
                return started.elapsed();
            }
            if Instant::now() > deadline {
                let pods = self.pod_report().await;
                panic!(
                    "module {name} not Ready after {timeout:?}: status {:?}\npods:\n{pods}",
                    module.and_then(|m| m.status)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One line per pod: name, phase, readiness and the last container state (for failures).
    pub async fn pod_report(&self) -> String {
        let pods = self
            .api::<Pod>()
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        pods.iter()
            .map(|p| {
                let status = p.status.clone().unwrap_or_default();
                format!(
                    "{} {:?} {:?}",
                    p.metadata.name.clone().unwrap_or_default(),
                    status.phase,
                    status.container_statuses.map(|c| c
                        .into_iter()
                        .map(|c| (c.ready, c.state, c.last_state))
                        .collect::<Vec<_>>())
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `http://<ClusterIP>:<port>` of the module's query Service, once it answers `/readyz`.
    pub async fn query_url(&self, module: &str) -> String {
        let service = self
            .api::<Service>()
            .get(&format!("{module}-query"))
            .await
            .unwrap();
        let spec = service.spec.unwrap();
        let ip = spec.cluster_ip.unwrap();
        let port = spec.ports.unwrap()[0].port;
        let url = format!("http://{ip}:{port}");
        // Ready pods are not yet a Service that answers: kube-proxy programs it a moment later
        // (until then the ClusterIP refuses connections).
        eventually(
            &format!("{module}-query answering on {url}"),
            Duration::from_secs(60),
            || async {
                let answer = reqwest::get(format!("{url}/readyz")).await.ok()?;
                answer.status().is_success().then_some(())
            },
        )
        .await;
        url
    }

    /// The Ready pods of one head (label selector of the operator's head labels).
    pub async fn ready_pods(&self, module: &str, head: &str) -> usize {
        let selector = format!("chimera.dev/module={module},chimera.dev/head={head}");
        let pods = self
            .api::<Pod>()
            .list(&ListParams::default().labels(&selector))
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        pods.iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| chimera_testenv::pod_is_ready(p))
            .count()
    }

    /// The replicas written on a head's Deployment.
    pub async fn replicas(&self, deployment: &str) -> i32 {
        eventually(deployment, Duration::from_secs(60), || async {
            self.api::<Deployment>()
                .get_opt(deployment)
                .await
                .ok()
                .flatten()
                .and_then(|d| d.spec)
                .and_then(|s| s.replicas)
        })
        .await
    }
}

impl Drop for NodeHarness {
    fn drop(&mut self) {
        // The release's cluster-wide RBAC would outlive the namespace.
        let _ = Command::new(chimera_testenv::helm())
            .args(["uninstall", &self.release, "--namespace", &self.ns.name])
            .output();
    }
}

/// A marketplace module from examples/, ready for the node: the examples already name the
/// images `scripts/images` tags.
pub fn example_module(name: &str) -> serde_json::Value {
    super::example(name)
}

/// The users module with a worker of 1 to `max` pods, each given a tenth of a core: one pod
/// cannot keep up with a backlog, more can (the autoscaler has something to do).
pub fn users_with_slow_workers(max: u32) -> serde_json::Value {
    let mut users = example_module("users");
    users["spec"]["worker"]["replicas"] = json!({"min": 1, "max": max});
    users["spec"]["worker"]["autoscale"] = json!({"drainSeconds": 5});
    users["spec"]["worker"]["resources"] = json!({
        "requests": {"cpu": "50m", "memory": "32Mi"},
        "limits": {"cpu": "100m", "memory": "256Mi"}
    });
    users
}

/// The command that registers user `id` (the users module's `user.register`).
pub fn register_user(id: &str) -> Outgoing {
    Outgoing::new(
        "chimera.users.commands",
        Envelope::new(
            "user.register",
            json!({"user_id": id, "name": id, "email": format!("{id}@example.com")}),
        ),
    )
}
