//! The operator against a real kube-apiserver (and kube-controller-manager for Deployments,
//! ReplicaSets and garbage collection): apply a module, see its objects and status; change it,
//! remove a head, delete it. No kubelet runs, so tests mark pods Ready themselves through the
//! pod status subresource, as a kubelet would.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use chimera_core::api::ChimeraModule;
use chimera_runtime::cluster::{FIELD_MANAGER, REPLICAS_MANAGER};
use common::{Harness, eventually, example};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

fn env_value(d: &Deployment, name: &str) -> Option<String> {
    d.spec.as_ref()?.template.spec.as_ref()?.containers[0]
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

async fn module_status(h: &Harness, name: &str) -> Option<chimera_core::api::ChimeraModuleStatus> {
    h.api::<ChimeraModule>().get(name).await.ok()?.status
}

async fn condition(h: &Harness, name: &str, type_: &str) -> Option<(String, String)> {
    let status = module_status(h, name).await?;
    status
        .condition(type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// Marks every pod of a head Ready, as a kubelet would once its readiness probe passes.
async fn make_pods_ready(h: &Harness, module: &str, head: &str) -> usize {
    let pods: Api<Pod> = h.api();
    let selector = format!("chimera.dev/module={module},chimera.dev/head={head}");
    let list = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .expect("list pods");
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    for pod in &list {
        let patch = json!({"status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": now}
        ]}});
        pods.patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .expect("mark pod ready");
    }
    list.items.len()
}

#[tokio::test]
async fn a_module_gets_both_heads_and_a_status() {
    let h = Harness::with_operator("ctl-create").await;
    h.apply_module(&example("orders")).await;
    let deployments: Api<Deployment> = h.api();

    let query = eventually("orders-query Deployment", WAIT, || async {
        deployments.get("orders-query").await.ok()
    })
    .await;
    let worker = eventually("orders-worker Deployment", WAIT, || async {
        deployments.get("orders-worker").await.ok()
    })
    .await;
    let service = eventually("orders-query Service", WAIT, || async {
        h.api::<Service>().get("orders-query").await.ok()
    })
    .await;
    let pdb = eventually("orders-query PDB", WAIT, || async {
        h.api::<PodDisruptionBudget>()
            .get("orders-query")
            .await
            .ok()
    })
    .await;

    // Same image, own args, head contract env, labels and owner.
    for (d, head) in [(&query, "query"), (&worker, "worker")] {
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert_eq!(
            pod.containers[0].image.as_deref(),
            Some("chimera/orders:dev")
        );
        assert_eq!(pod.containers[0].args, Some(vec![head.to_owned()]));
        assert_eq!(env_value(d, "CHIMERA_HEAD").as_deref(), Some(head));
        assert_eq!(env_value(d, "CHIMERA_DOMAIN").as_deref(), Some("orders"));
        assert_eq!(
            d.labels().get("chimera.dev/head").map(String::as_str),
            Some(head)
        );
        assert_eq!(
            d.labels()
                .get("app.kubernetes.io/managed-by")
                .map(String::as_str),
            Some("chimera-operator")
        );
        let owner = &d.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("ChimeraModule", "orders", Some(true))
        );
    }
    assert_eq!(
        env_value(&worker, "CHIMERA_WORKER_QUEUE").as_deref(),
        Some("chimera.orders.worker")
    );
    assert_eq!(
        env_value(&worker, "CHIMERA_PREFETCH").as_deref(),
        Some("200")
    );
    assert_eq!(service.spec.unwrap().ports.unwrap()[0].port, 8080);
    assert!(pdb.spec.unwrap().max_unavailable.is_some());

    // No kubelet: the heads are not available yet, and the status says so.
    let (status, reason) = eventually("QueryAvailable=False", WAIT, || {
        condition(&h, "orders", "QueryAvailable")
    })
    .await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "NoReplicasAvailable")
    );
    let s = module_status(&h, "orders").await.unwrap();
    assert_eq!(s.observed_generation, Some(1));
    assert_eq!(s.domain.as_deref(), Some("orders"));

    // Pods turn ready: the module becomes Ready and the counts follow.
    eventually("query pods exist", WAIT, || async {
        (make_pods_ready(&h, "orders", "query").await > 0).then_some(())
    })
    .await;
    eventually("worker pods exist", WAIT, || async {
        (make_pods_ready(&h, "orders", "worker").await > 0).then_some(())
    })
    .await;
    eventually("Ready=True", WAIT, || async {
        (condition(&h, "orders", "Ready").await? == ("True".into(), "AllHeadsAvailable".into()))
            .then_some(())
    })
    .await;
    let s = module_status(&h, "orders").await.unwrap();
    assert_eq!(s.query.map(|q| q.summary), Some("1/1".to_owned()));
    assert_eq!(
        s.worker.map(|w| (w.ready_replicas, w.desired_replicas)),
        Some((1, 1))
    );
}

#[tokio::test]
async fn a_changed_field_reaches_the_deployment() {
    let h = Harness::with_operator("ctl-change").await;
    h.apply_module(&example("orders")).await;
    let deployments: Api<Deployment> = h.api();
    eventually("worker with prefetch 200", WAIT, || async {
        let d = deployments.get("orders-worker").await.ok()?;
        (env_value(&d, "CHIMERA_PREFETCH")? == "200").then_some(())
    })
    .await;

    let mut changed = example("orders");
    changed["spec"]["worker"]["prefetch"] = json!(50);
    changed["spec"]["image"] = json!("chimera/orders:v2");
    h.apply_module(&changed).await;
    eventually(
        "worker with prefetch 50 and the new image",
        WAIT,
        || async {
            let d = deployments.get("orders-worker").await.ok()?;
            let image = d.spec.as_ref()?.template.spec.as_ref()?.containers[0]
                .image
                .clone()?;
            (env_value(&d, "CHIMERA_PREFETCH")? == "50" && image == "chimera/orders:v2")
                .then_some(())
        },
    )
    .await;
    eventually("status observes generation 2", WAIT, || async {
        (module_status(&h, "orders").await?.observed_generation == Some(2)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn removing_a_head_removes_its_objects_and_deleting_the_module_removes_everything() {
    let h = Harness::with_operator("ctl-remove").await;
    h.apply_module(&example("orders")).await;
    let deployments: Api<Deployment> = h.api();
    let services: Api<Service> = h.api();
    let pdbs: Api<PodDisruptionBudget> = h.api();
    eventually("query objects", WAIT, || async {
        deployments.get("orders-query").await.ok()?;
        services.get("orders-query").await.ok()?;
        pdbs.get("orders-query").await.ok()
    })
    .await;
    eventually("QueryAvailable condition", WAIT, || {
        condition(&h, "orders", "QueryAvailable")
    })
    .await;

    let mut worker_only = example("orders");
    worker_only["spec"].as_object_mut().unwrap().remove("query");
    h.apply_module(&worker_only).await;
    eventually("query Deployment, Service and PDB gone", WAIT, || async {
        let gone = deployments.get_opt("orders-query").await.ok()?.is_none()
            && services.get_opt("orders-query").await.ok()?.is_none()
            && pdbs.get_opt("orders-query").await.ok()?.is_none();
        gone.then_some(())
    })
    .await;
    assert!(
        deployments
            .get_opt("orders-worker")
            .await
            .unwrap()
            .is_some(),
        "the worker head stays"
    );
    eventually("status without the query head", WAIT, || async {
        let s = module_status(&h, "orders").await?;
        (s.query.is_none() && s.condition("QueryAvailable").is_none() && s.worker.is_some())
            .then_some(())
    })
    .await;
    let events: Api<Event> = h.api();
    eventually("a HeadRemoved event", WAIT, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("HeadRemoved"))
            .then_some(())
    })
    .await;

    // Deleting the module: the garbage collector follows the owner references.
    h.api::<ChimeraModule>()
        .delete("orders", &DeleteParams::foreground())
        .await
        .unwrap();
    eventually("worker Deployment garbage-collected", WAIT, || async {
        deployments
            .get_opt("orders-worker")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn replicas_have_a_single_owner_that_holds_them_within_bounds() {
    let h = Harness::with_operator("ctl-replicas").await;
    let mut module = example("orders");
    module["spec"]["query"]["replicas"] = json!({"min": 2, "max": 4});
    h.apply_module(&module).await;
    let deployments: Api<Deployment> = h.api();
    let replicas = |d: &Deployment| d.spec.as_ref().and_then(|s| s.replicas);
    eventually("query at min replicas", WAIT, || async {
        let d = deployments.get("orders-query").await.ok()?;
        (replicas(&d) == Some(2)).then_some(())
    })
    .await;

    // Someone scales by hand beyond max: the operator brings it back within bounds.
    deployments
        .patch_scale(
            "orders-query",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"replicas": 9}})),
        )
        .await
        .unwrap();
    // Any change to the module (here a label) triggers a reconcile.
    h.apply_module(&{
        let mut m = module.clone();
        m["metadata"]["labels"] = json!({"touched": "yes"});
        m
    })
    .await;
    let d = eventually("query back at max", WAIT, || async {
        let d = deployments.get("orders-query").await.ok()?;
        (replicas(&d) == Some(4)).then_some(d)
    })
    .await;

    // spec.replicas belongs to the replicas manager alone; the template manager never sets it.
    let owners_of_replicas: Vec<String> = d
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.pointer("/f:spec/f:replicas").is_some())
        })
        .filter_map(|m| m.manager)
        .collect();
    assert_eq!(owners_of_replicas, vec![REPLICAS_MANAGER.to_owned()]);
    assert_ne!(FIELD_MANAGER, REPLICAS_MANAGER);
}

#[tokio::test]
async fn a_settled_module_is_not_rewritten() {
    let h = Harness::with_operator("ctl-steady").await;
    h.apply_module(&example("users")).await;
    let modules: Api<ChimeraModule> = h.api();
    eventually("status written", WAIT, || async {
        module_status(&h, "users")
            .await?
            .condition("Ready")
            .map(|_| ())
    })
    .await;
    // Let the first rounds (ReplicaSets appearing, status counts) settle.
    let (settled, settled_status) = eventually("resourceVersion stable for 3s", WAIT, || async {
        let before = modules.get("users").await.ok()?.resource_version()?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let module = modules.get("users").await.ok()?;
        let after = module.resource_version()?;
        (before == after).then_some((after, module.status))
    })
    .await;

    // An unrelated change to an owned Deployment triggers reconciles, but nothing in the
    // module's world changed: no status write, no resourceVersion bump.
    let deployments: Api<Deployment> = h.api();
    for i in 0..3 {
        let patch = json!({"metadata": {"annotations": {"test/poke": i.to_string()}}});
        deployments
            .patch(
                "users-query",
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let module = modules.get("users").await.unwrap();
    assert_eq!(
        settled,
        module.resource_version().unwrap(),
        "reconciles of an unchanged module must not write its status:\nsettled {settled_status:#?}\nnow {:#?}",
        module.status
    );
}

#[tokio::test]
async fn an_object_someone_else_owns_is_never_taken_over_and_the_module_says_why() {
    let h = Harness::with_operator("ctl-foreign").await;
    let services: Api<Service> = h.api();
    let foreign: Service = serde_json::from_value(json!({
        "metadata": {"name": "users-query", "labels": {"team": "billing"}},
        "spec": {"ports": [{"port": 80}], "selector": {"app": "billing"}}
    }))
    .unwrap();
    services
        .create(&Default::default(), &foreign)
        .await
        .unwrap();

    h.apply_module(&example("users")).await;
    let message = eventually("Ready=False with ReconcileFailed", WAIT, || async {
        let s = module_status(&h, "users").await?;
        let ready = s.condition("Ready")?;
        (ready.reason == "ReconcileFailed").then(|| ready.message.clone())
    })
    .await;
    assert!(
        message.contains("Service users-query already exists"),
        "{message}"
    );
    let events: Api<Event> = h.api();
    eventually("a ReconcileFailed event", WAIT, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("ReconcileFailed"))
            .then_some(())
    })
    .await;
    let untouched = services.get("users-query").await.unwrap();
    assert_eq!(
        untouched.labels().get("team").map(String::as_str),
        Some("billing")
    );
    assert!(untouched.owner_references().is_empty());

    // Once the name is free, the next retry makes the module whole.
    services
        .delete("users-query", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the module's own Service and a recovered status",
        WAIT,
        || async {
            let svc = services.get("users-query").await.ok()?;
            let ready = module_status(&h, "users")
                .await?
                .condition("Ready")?
                .reason
                .clone();
            (!svc.owner_references().is_empty() && ready != "ReconcileFailed").then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn with_network_policies_each_head_gets_one_selecting_its_pods() {
    use chimera_core::workloads::{NetworkPolicySettings, WorkloadSettings};
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    let mut h = Harness::new("ctl-netpol").await;
    let config = chimera_runtime::operator::OperatorConfig {
        workloads: WorkloadSettings {
            network_policies: Some(NetworkPolicySettings {
                peer_namespaces: vec!["chimera-system".into()],
            }),
            ..WorkloadSettings::default()
        },
        ..Default::default()
    };
    let client = h.client.clone();
    h.start_operator(client, config);
    h.apply_module(&example("orders")).await;
    let policies: Api<NetworkPolicy> = h.api();
    let deployments: Api<Deployment> = h.api();
    for head in ["query", "worker"] {
        let name = format!("orders-{head}");
        // Accepted by the API server's validation, owned by the module.
        let policy = eventually(&format!("NetworkPolicy {name}"), WAIT, || async {
            policies.get_opt(&name).await.ok().flatten()
        })
        .await;
        let deployment = deployments.get(&name).await.unwrap();
        let spec = policy.spec.unwrap();
        assert_eq!(
            spec.pod_selector.unwrap().match_labels,
            deployment.spec.unwrap().selector.match_labels,
            "{name}: selects the head's pods"
        );
        let owner = &policy.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("ChimeraModule", "orders")
        );
        let from = spec.ingress.unwrap()[0].from.clone().unwrap();
        assert_eq!(
            from.len(),
            if head == "query" { 2 } else { 1 },
            "{name}: {from:?}"
        );
    }
}
