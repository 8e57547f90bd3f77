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

/// Each domain's database is fenced: the user in one domain's URL cannot read another's.
#[tokio::test]
async fn a_domains_database_user_cannot_read_another_domains_database() {
    use chimera_sdk::sqlx::{self, Connection};
    sqlx::any::install_default_drivers();
    let users = chimera_testenv::TestDatabase::mysql("fence-users").await;
    let orders = chimera_testenv::TestDatabase::mysql("fence-orders").await;
    let mut as_users = sqlx::AnyConnection::connect(&users.url).await.unwrap();
    sqlx::query("CREATE TABLE users (id VARCHAR(10) PRIMARY KEY)")
        .execute(&mut as_users)
        .await
        .unwrap();
    sqlx::query("INSERT INTO users VALUES ('ada')")
        .execute(&mut as_users)
        .await
        .unwrap();
    let users_db = users.url.rsplit('/').next().unwrap().to_owned();

    let mut as_orders = sqlx::AnyConnection::connect(&orders.url).await.unwrap();
    // Its own database: everything.
    sqlx::query("CREATE TABLE orders (id VARCHAR(10) PRIMARY KEY)")
        .execute(&mut as_orders)
        .await
        .unwrap();
    // The users database: refused, reading or writing.
    for statement in [
        format!("SELECT id FROM `{users_db}`.users"),
        format!("INSERT INTO `{users_db}`.users VALUES ('eve')"),
    ] {
        let error = sqlx::query(sqlx::AssertSqlSafe(statement.clone()))
            .execute(&mut as_orders)
            .await
            .expect_err(&statement)
            .to_string();
        assert!(error.contains("denied"), "{statement}: {error}");
    }
    // Nor can it connect to it.
    let other = orders.url.rsplit_once('/').unwrap().0.to_owned() + "/" + &users_db;
    let error = sqlx::AnyConnection::connect(&other)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("denied"), "{error}");
}
