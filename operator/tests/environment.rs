//! The real servers answer: a fresh namespace on the kube-apiserver (with RBAC on) and a fresh
//! vhost on RabbitMQ that speaks AMQP. Fails, never skips, when they are missing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use chimera_testenv::{TestNamespace, TestVhost, kube_client};
use k8s_openapi::api::authorization::v1::{SelfSubjectRulesReview, SelfSubjectRulesReviewSpec};
use kube::Api;
use kube::api::PostParams;

#[tokio::test]
async fn kube_apiserver_answers_with_rbac_enabled() {
    let client = kube_client().await;
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1");
    let ns = TestNamespace::create(&client, "env").await;
    // RBAC is the authorizer: a rules review is answered by it (AlwaysAllow would not list rules).
    let reviews: Api<SelfSubjectRulesReview> = Api::all(client.clone());
    let review = SelfSubjectRulesReview {
        spec: SelfSubjectRulesReviewSpec {
            namespace: Some(ns.name.clone()),
        },
        ..Default::default()
    };
    let answer = reviews
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    let rules = answer.status.expect("rules review status").resource_rules;
    assert!(
        rules.iter().any(|r| r.verbs.contains(&"*".to_owned())),
        "the admin (system:masters) may do anything"
    );
}

#[tokio::test]
async fn rabbitmq_answers_amqp_on_a_fresh_vhost() {
    let vhost = TestVhost::create("env");
    assert!(vhost.amqp_url.ends_with(&format!("/{}", vhost.name)));
    vhost.assert_amqp_answers();
}
