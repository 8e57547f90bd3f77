//! The operator works under exactly the RBAC rules the Helm chart grants, and no more.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Harness, eventually, example, repo_root};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

/// The rules of the chart's ClusterRole as helm renders it with a broker (and so with module
/// broker users, the widest it gets).
fn chart_rules() -> Vec<PolicyRule> {
    let chart = repo_root().join("charts/chimera-operator");
    let out = std::process::Command::new(chimera_testenv::helm())
        .args(["template", "chimera"])
        .arg(&chart)
        .args([
            "--set",
            "brokerSecret=mq",
            "--show-only",
            "templates/clusterrole.yaml",
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run helm: {e}"));
    assert!(out.status.success(), "helm template: {out:?}");
    let role: serde_json::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    serde_json::from_value(role["rules"].clone()).unwrap()
}

async fn client_as(user: &str) -> Client {
    let kubeconfig = Kubeconfig::read().expect("KUBECONFIG");
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    config.auth_info.impersonate = Some(user.to_owned());
    Client::try_from(config).unwrap()
}

#[tokio::test]
async fn the_operator_runs_with_the_charts_cluster_role() {
    let admin = chimera_testenv::kube_client().await;
    let setup = Harness::new("rbac").await;
    let ns = setup.ns.name.clone();
    let sa = "chimera-operator";
    Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": sa}})).unwrap(),
        )
        .await
        .unwrap();
    let role_name = format!("chimera-operator-{ns}");
    let roles: Api<ClusterRole> = Api::all(admin.clone());
    let bindings: Api<ClusterRoleBinding> = Api::all(admin.clone());
    let mut role = ClusterRole {
        rules: Some(chart_rules()),
        ..Default::default()
    };
    role.metadata.name = Some(role_name.clone());
    roles.create(&PostParams::default(), &role).await.unwrap();
    let mut binding = ClusterRoleBinding {
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: role_name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: sa.into(),
            namespace: Some(ns.clone()),
            api_group: None,
        }]),
        ..Default::default()
    };
    binding.metadata.name = Some(role_name.clone());
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();

    let operator_user = format!("system:serviceaccount:{ns}:{sa}");
    // Without the binding's rules the identity can do nothing: prove the impersonation bites.
    let denied =
        Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client_as(&operator_user).await, &ns)
            .list(&Default::default())
            .await;
    assert!(
        denied.is_err(),
        "the operator's identity must not read Secrets"
    );

    // Run the operator under that identity in the harness's namespace.
    let h = Harness::with_operator_as("rbac-run", Some(client_as(&operator_user).await)).await;
    h.apply_module(&example("users")).await;
    let deployments: Api<Deployment> = h.api();
    eventually(
        "Deployments created by the RBAC-limited operator",
        Duration::from_secs(60),
        || async {
            deployments.get("users-query").await.ok()?;
            deployments.get("users-worker").await.ok()
        },
    )
    .await;
    eventually(
        "status written by the RBAC-limited operator",
        Duration::from_secs(60),
        || async {
            h.api::<chimera_core::api::ChimeraModule>()
                .get("users")
                .await
                .ok()?
                .status?
                .condition("Ready")
                .map(|_| ())
        },
    )
    .await;

    let _ = bindings.delete(&role_name, &DeleteParams::default()).await;
    let _ = roles.delete(&role_name, &DeleteParams::default()).await;
}
