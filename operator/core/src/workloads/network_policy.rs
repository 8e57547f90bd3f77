//! A NetworkPolicy per head, when the operator is asked for them: a domain's pods are fenced
//! off from the cluster's other pods. A query head accepts its HTTP port from its own namespace
//! (the domain's clients) and from the peer namespaces (the operator's, whose autoscaler
//! scrapes `/metrics`, and any the platform adds: an ingress controller, Prometheus). A worker
//! serves nothing but `/metrics` on that port: only the peer namespaces reach it. Egress is
//! left open: heads reach their database and broker, wherever those run.

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{HTTP_PORT_NAME, Head, Owner, selector_labels};

/// The label every namespace carries with its own name (set by the API server).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// What the policies let in besides a query head's own namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkPolicySettings {
    /// Namespaces whose pods may reach every head's HTTP port (the operator's own first).
    pub peer_namespaces: Vec<String>,
}

pub(crate) fn network_policy(
    owner: &Owner<'_>,
    head: Head,
    settings: &NetworkPolicySettings,
) -> NetworkPolicy {
    let http = Some(vec![NetworkPolicyPort {
        port: Some(IntOrString::String(HTTP_PORT_NAME.to_owned())),
        protocol: Some("TCP".to_owned()),
        ..NetworkPolicyPort::default()
    }]);
    let mut from = Vec::new();
    if head == Head::Query {
        // (a pod selector alone means: pods of this namespace)
        from.push(NetworkPolicyPeer {
            pod_selector: Some(LabelSelector::default()),
            ..NetworkPolicyPeer::default()
        });
    }
    let mut peers: Vec<String> = settings
        .peer_namespaces
        .iter()
        .filter(|ns| !ns.is_empty())
        .cloned()
        .collect();
    peers.sort();
    peers.dedup();
    if !peers.is_empty() {
        from.push(NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: NAMESPACE_NAME_LABEL.to_owned(),
                    operator: "In".to_owned(),
                    values: Some(peers),
                }]),
                match_labels: None,
            }),
            ..NetworkPolicyPeer::default()
        });
    }
    // No peer at all: a rule with no source would admit everyone, so none is written (and
    // the policy, selecting the pods for Ingress, admits nothing).
    let ingress = if from.is_empty() {
        vec![]
    } else {
        vec![NetworkPolicyIngressRule {
            from: Some(from),
            ports: http,
        }]
    };
    NetworkPolicy {
        metadata: owner.object_meta(head),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(owner.name, head)),
                match_expressions: None,
            }),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(ingress),
            egress: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use crate::workloads::fixtures::module;
    use crate::workloads::{NetworkPolicySettings, WorkloadSettings, desired_workloads};

    fn settings(peers: &[&str]) -> WorkloadSettings {
        WorkloadSettings {
            network_policies: Some(NetworkPolicySettings {
                peer_namespaces: peers.iter().map(|p| (*p).to_owned()).collect(),
            }),
            ..WorkloadSettings::default()
        }
    }

    #[test]
    fn no_policies_unless_asked() {
        let d = desired_workloads(&module("orders"), &WorkloadSettings::default()).unwrap();
        assert!(d.network_policies.is_empty());
    }

    #[test]
    fn each_head_selects_its_own_pods_and_admits_only_its_peers_on_http() {
        let d = desired_workloads(
            &module("orders"),
            &settings(&["ops", "chimera-system", "ops"]),
        )
        .unwrap();
        assert_eq!(d.network_policies.len(), 2);
        for (policy, deployment) in d.network_policies.iter().zip(&d.deployments) {
            let spec = policy.spec.clone().unwrap();
            // The pods it selects are the Deployment's.
            let pods = deployment
                .spec
                .as_ref()
                .unwrap()
                .selector
                .match_labels
                .clone();
            assert_eq!(spec.pod_selector.unwrap().match_labels, pods);
            assert_eq!(spec.policy_types, Some(vec!["Ingress".to_owned()]));
            assert!(spec.egress.is_none(), "egress stays open");
            let rules = spec.ingress.unwrap();
            assert_eq!(rules.len(), 1);
            let port = &rules[0].ports.as_ref().unwrap()[0];
            assert_eq!(
                port.port,
                Some(
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(
                        "http".into()
                    )
                )
            );
            let from = rules[0].from.clone().unwrap();
            let peers = from
                .iter()
                .find_map(|p| p.namespace_selector.clone())
                .unwrap()
                .match_expressions
                .unwrap();
            assert_eq!(
                peers[0].values,
                Some(vec!["chimera-system".to_owned(), "ops".to_owned()]),
                "sorted, once each"
            );
            let same_namespace = from
                .iter()
                .any(|p| p.pod_selector.is_some() && p.namespace_selector.is_none());
            let query = policy.metadata.name.as_deref() == Some("orders-query");
            assert_eq!(
                same_namespace, query,
                "only the query head admits its namespace"
            );
        }
    }

    #[test]
    fn a_worker_without_peers_admits_nothing() {
        let d = desired_workloads(&module("orders"), &settings(&[])).unwrap();
        let worker = d
            .network_policies
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some("orders-worker"))
            .unwrap();
        assert_eq!(worker.spec.clone().unwrap().ingress, Some(vec![]));
    }
}
