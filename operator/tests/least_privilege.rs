//! What the chart's ServiceAccount may do, asked of the API server's own authorizer (what
//! `kubectl auth can-i --as=system:serviceaccount:NS:NAME` asks): everything a module's
//! lifecycle needs, and not a thing more. The node tests run that lifecycle as this very
//! account (the operator pod the chart installs).
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::node::NodeHarness;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::Api;
use kube::api::PostParams;

/// Whether `user` may `verb` the `resource` (of `group`, optionally a subresource, optionally
/// the one named after `#`) in `namespace` (None: across the cluster).
async fn can(
    h: &NodeHarness,
    user: &str,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
) -> bool {
    let (resource, name) = match resource.split_once('#') {
        Some((r, n)) => (r, Some(n.to_owned())),
        None => (resource, None),
    };
    let (resource, subresource) = match resource.split_once('/') {
        Some((r, s)) => (r, Some(s.to_owned())),
        None => (resource, None),
    };
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_owned()),
            groups: Some(vec!["system:serviceaccounts".to_owned()]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.to_owned()),
                group: Some(group.to_owned()),
                resource: Some(resource.to_owned()),
                subresource,
                name,
                namespace: namespace.map(str::to_owned),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let api: Api<SubjectAccessReview> = Api::all(h.client.clone());
    api.create(&PostParams::default(), &review)
        .await
        .unwrap()
        .status
        .unwrap()
        .allowed
}

#[tokio::test]
async fn the_operators_account_can_run_modules_and_nothing_more() {
    let h = NodeHarness::start("node-rights", &[]).await;
    // The chart names the ServiceAccount after the release, which the harness names after
    // the namespace.
    let me = format!("system:serviceaccount:{0}:{0}", h.ns.name);
    let ns = Some(h.ns.name.as_str());
    let other = Some("some-other-namespace");
    // (verb, API group, resource[/subresource][#name], namespace or cluster-wide, allowed)
    let cases = [
        // What a module's lifecycle needs.
        ("watch", "chimera.dev", "chimeramodules", None, true),
        ("patch", "chimera.dev", "chimeramodules/status", other, true),
        ("create", "apps", "deployments", other, true),
        ("delete", "", "services", other, true),
        ("patch", "policy", "poddisruptionbudgets", other, true),
        (
            "create",
            "networking.k8s.io",
            "networkpolicies",
            other,
            true,
        ),
        ("watch", "", "pods", None, true),
        ("get", "", "secrets", other, true),
        ("create", "events.k8s.io", "events", other, true),
        (
            "update",
            "coordination.k8s.io",
            "leases#chimera-operator",
            ns,
            true,
        ),
        ("create", "coordination.k8s.io", "leases", ns, true),
        // Secrets: one by name where a module points, and each module's broker Secret
        // (created and patched; deleted by the garbage collector), never all of them.
        ("create", "", "secrets", other, true),
        ("patch", "", "secrets", other, true),
        ("list", "", "secrets", None, false),
        ("list", "", "secrets", other, false),
        ("watch", "", "secrets", other, false),
        ("delete", "", "secrets", other, false),
        ("update", "", "secrets", other, false),
        // No shell in anybody's pod, no pods of its own.
        ("create", "", "pods/exec", other, false),
        ("create", "", "pods", other, false),
        ("delete", "", "pods", other, false),
        // Unrelated kinds.
        ("get", "", "configmaps", other, false),
        (
            "create",
            "rbac.authorization.k8s.io",
            "clusterrolebindings",
            None,
            false,
        ),
        ("delete", "", "namespaces", None, false),
        (
            "delete",
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            None,
            false,
        ),
        ("create", "chimera.dev", "chimeramodules", other, false),
        // Its one Lease, only in its own namespace.
        (
            "update",
            "coordination.k8s.io",
            "leases#chimera-operator",
            other,
            false,
        ),
        (
            "update",
            "coordination.k8s.io",
            "leases#kube-scheduler",
            ns,
            false,
        ),
        ("list", "coordination.k8s.io", "leases", ns, false),
    ];
    for (verb, group, resource, namespace, allowed) in cases {
        assert_eq!(
            can(&h, &me, verb, group, resource, namespace).await,
            allowed,
            "{me}: may {verb} {resource} in {namespace:?}?"
        );
    }
}
