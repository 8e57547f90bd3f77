//! The chart as reviewers and GitOps tools render it (`helm template`, offline): what it runs,
//! what it refuses, and the rights it asks for.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

use serde_yaml::Value;

fn chart() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/chimera-operator")
        .display()
        .to_string()
}

/// `helm template` with `args`: Ok(the documents) or Err(what helm said).
fn template(args: &[&str]) -> Result<Vec<Value>, String> {
    let out = Command::new(chimera_testenv::helm())
        .args([
            "template",
            "chimera",
            &chart(),
            "--namespace",
            "chimera-system",
        ])
        .args(args)
        .output()
        .expect("run helm");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8(out.stdout).unwrap();
    Ok(serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect())
}

use serde::Deserialize;

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

#[test]
fn renders_offline_two_replicas_electing_a_leader_under_restricted_security() {
    // No cluster and no --kube-version: what `helm template` in a GitOps tool does.
    let docs = template(&[]).unwrap();
    let deployment = kind(&docs, "Deployment")[0];
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args.contains(&"--leader-elect"), "{args:?}");
    assert!(args.contains(&"--network-policies"), "{args:?}");
    // Restricted pod security.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let security = &container["securityContext"];
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["capabilities"]["drop"][0], "ALL");
    assert!(container["resources"]["requests"]["memory"].is_string());
    assert!(container["resources"]["limits"]["memory"].is_string());
    // A PDB for the two replicas, and a Service for their metrics.
    assert_eq!(
        kind(&docs, "PodDisruptionBudget")[0]["spec"]["maxUnavailable"],
        1
    );
    let metrics = kind(&docs, "Service")[0];
    assert_eq!(metrics["spec"]["ports"][0]["port"], 9090);
    // No ServiceMonitor unless asked (its CRD may not exist).
    assert!(kind(&docs, "ServiceMonitor").is_empty());
    let with_monitor = template(&["--set", "metrics.serviceMonitor.enabled=true"]).unwrap();
    assert_eq!(kind(&with_monitor, "ServiceMonitor").len(), 1);
}

#[test]
fn asks_for_no_wildcard_and_the_lease_only_in_its_own_namespace() {
    let docs = template(&[]).unwrap();
    for role in kind(&docs, "ClusterRole")
        .into_iter()
        .chain(kind(&docs, "Role"))
    {
        for rule in role["rules"].as_sequence().unwrap() {
            for field in ["apiGroups", "resources", "verbs"] {
                let values = rule[field].as_sequence().unwrap();
                assert!(
                    values.iter().all(|v| v.as_str() != Some("*")),
                    "{field} has *: {rule:?}"
                );
            }
        }
    }
    let cluster_rules = serde_yaml::to_string(&kind(&docs, "ClusterRole")[0]["rules"]).unwrap();
    assert!(
        !cluster_rules.contains("leases"),
        "leases are not cluster-wide"
    );
    let role = kind(&docs, "Role")[0];
    assert_eq!(role["metadata"]["name"], "chimera-leader");
    assert!(
        serde_yaml::to_string(&role["rules"])
            .unwrap()
            .contains("leases")
    );
    // The broker's credentials come from a Secret, never from values.
    let with_broker = template(&["--set", "brokerSecret=mq"]).unwrap();
    let env =
        &kind(&with_broker, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["env"];
    let amqp = env
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "CHIMERA_AMQP_URL")
        .unwrap();
    assert!(amqp["value"].is_null());
    assert_eq!(amqp["valueFrom"]["secretKeyRef"]["name"], "mq");
}

/// The verbs of the ClusterRole's rule on Secrets, and whether the operator runs with module
/// broker users.
fn secret_rights(args: &[&str]) -> (Vec<String>, bool) {
    let docs = template(args).unwrap();
    let rules = kind(&docs, "ClusterRole")[0]["rules"]
        .as_sequence()
        .unwrap()
        .clone();
    let rule = rules
        .iter()
        .find(|r| {
            r["resources"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|v| v == "secrets")
        })
        .unwrap();
    let verbs = rule["verbs"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    let args = serde_yaml::to_string(
        &kind(&docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"],
    )
    .unwrap();
    (verbs, args.contains("--module-broker-users"))
}

#[test]
fn secrets_are_made_only_for_module_broker_users() {
    // Without a broker there are no users to make: read only.
    assert_eq!(secret_rights(&[]), (vec!["get".to_owned()], false));
    // With one, each module's Secret is created and patched; never listed, watched, deleted.
    assert_eq!(
        secret_rights(&["--set", "brokerSecret=mq"]),
        (vec!["get".into(), "create".into(), "patch".into()], true)
    );
    assert_eq!(
        secret_rights(&[
            "--set",
            "brokerSecret=mq",
            "--set",
            "moduleBrokerUsers=false"
        ]),
        (vec!["get".to_owned()], false)
    );
}

#[test]
fn bad_values_are_refused_naming_the_value() {
    for (value, says) in [
        ("replicas=-1", "/replicas"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("resources.limits.memory=lots", "/resources/limits/memory"),
        ("resources.requests.gpu=1", "/resources/requests"),
        (
            "leaderElection.leaseSeconds=1",
            "/leaderElection/leaseSeconds",
        ),
        ("replica=2", "'replica' not allowed"),
        (
            "leaderElection.enabled=false",
            "replicas > 1 needs leaderElection.enabled",
        ),
    ] {
        let error = template(&["--set", value]).expect_err(value);
        assert!(error.contains(says), "{value}: {error}");
    }
    let error = template(&["--kube-version", "1.29.0"]).unwrap_err();
    assert!(error.contains("needs Kubernetes 1.30 or later"), "{error}");
    template(&["--kube-version", "1.34.0"]).unwrap();
    template(&[
        "--set",
        "replicas=1",
        "--set",
        "leaderElection.enabled=false",
    ])
    .unwrap();
}

#[test]
fn dashboards_ship_as_configmaps_and_the_monitors_keep_the_labels_they_select_on() {
    assert!(kind(&template(&[]).unwrap(), "ConfigMap").is_empty());
    let docs = template(&[
        "--set",
        "grafana.dashboards.enabled=true",
        "--set",
        "metrics.podMonitor.enabled=true",
        "--set",
        "metrics.serviceMonitor.enabled=true",
    ])
    .unwrap();
    let maps = kind(&docs, "ConfigMap");
    let mut names = Vec::new();
    for map in &maps {
        assert_eq!(map["metadata"]["labels"]["grafana_dashboard"], "1");
        assert_eq!(map["metadata"]["namespace"], "chimera-system");
        for (file, json) in map["data"].as_mapping().unwrap() {
            let file = file.as_str().unwrap();
            let shipped: serde_json::Value = serde_json::from_str(json.as_str().unwrap()).unwrap();
            let on_disk: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(PathBuf::from(chart()).join("dashboards").join(file))
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(shipped, on_disk, "{file} is shipped as it is in the chart");
            names.push(file.to_owned());
        }
    }
    names.sort();
    assert_eq!(names, ["chimera-modules.json", "chimera-operator.json"]);

    let pod_monitor = kind(&docs, "PodMonitor")[0];
    assert_eq!(pod_monitor["spec"]["namespaceSelector"]["any"], true);
    assert_eq!(
        pod_monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/part-of"],
        "chimera"
    );
    let endpoint = &pod_monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["port"], "http");
    let targets: Vec<&str> = endpoint["relabelings"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r["targetLabel"].as_str().unwrap())
        .collect();
    assert_eq!(targets, ["module", "domain", "head"]);
    let service_monitor = kind(&docs, "ServiceMonitor")[0];
    assert_eq!(service_monitor["spec"]["endpoints"][0]["honorLabels"], true);

    let error = template(&["--set", "metrics.podMonitor.interval=often"]).unwrap_err();
    assert!(error.contains("/metrics/podMonitor/interval"), "{error}");
    let error = template(&["--set", "grafana.dashboards.folder=x"]).unwrap_err();
    assert!(error.contains("'folder' not allowed"), "{error}");
}
