//! Each module's own broker user, on a real kube-apiserver and a real RabbitMQ: the operator
//! makes the user and its Secret, the credentials reach only the module's own queues and
//! exchanges, drift on the broker is repaired, and the user goes with the module.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use chimera_core::api::ChimeraModule;
use chimera_core::topology::state::BrokerEndpoint;
use chimera_core::workloads::WorkloadSettings;
use chimera_runtime::operator::OperatorConfig;
use chimera_testenv::TestVhost;
use common::{Harness, eventually, example};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::DeleteParams;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};

const WAIT: Duration = Duration::from_secs(60);

async fn harness(prefix: &str, vhost: &TestVhost) -> Harness {
    let config = OperatorConfig {
        broker: Some(BrokerEndpoint::new(&vhost.amqp_url, Some(vhost.management_url())).unwrap()),
        topology_resync: Some(Duration::from_secs(1)),
        workloads: WorkloadSettings {
            module_broker_users: true,
            ..WorkloadSettings::default()
        },
        ..OperatorConfig::default()
    };
    Harness::with_operator_config(prefix, None, config).await
}

async fn topology_ready(h: &Harness, name: &str) {
    eventually(&format!("{name} TopologyReady=True"), WAIT, || async {
        let m = h.api::<ChimeraModule>().get(name).await.ok()?;
        let c = m.status?.condition("TopologyReady")?.clone();
        (c.status == "True").then_some(())
    })
    .await;
}

fn value(secret: &Secret, key: &str) -> String {
    String::from_utf8(secret.data.as_ref().unwrap()[key].0.clone()).unwrap()
}

/// Whether lapin's error is the broker's 403 ACCESS_REFUSED.
fn refused(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e) if e.get_id() == 403)
}

/// Publishes one message with confirms on a fresh channel: Ok(routed) or the broker's error.
async fn publish(connection: &Connection, exchange: &str, key: &str) -> Result<bool, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel.confirm_select(Default::default()).await?;
    let confirm = channel
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            b"{}",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await?
        .await?;
    // Refused publishes close the channel; a later call on it reports the 403 too.
    channel.basic_qos(1, Default::default()).await?;
    Ok(matches!(confirm, Confirmation::Ack(None)))
}

/// Whether the broker lets the user publish there (routed or not: an event nobody subscribes
/// to is dropped, and that is no refusal).
async fn may_publish(connection: &Connection, exchange: &str, key: &str) -> bool {
    match publish(connection, exchange, key).await {
        Ok(_) => true,
        Err(e) if refused(&e) => false,
        Err(e) => panic!("publishing to {exchange} {key}: {e}"),
    }
}

async fn may_read(connection: &Connection, queue: &str) -> bool {
    let channel = connection.create_channel().await.unwrap();
    match channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
    {
        Ok(_) => true,
        Err(e) if refused(&e) => false,
        Err(e) => panic!("reading {queue}: {e}"),
    }
}

async fn connect(url: &str) -> Result<Connection, lapin::Error> {
    Connection::connect(url, ConnectionProperties::default()).await
}

fn management(vhost: &TestVhost, method: &str, path: &str, body: Option<serde_json::Value>) -> u16 {
    // The management URL holds the admin's credentials: curl reads them from it.
    let (scheme, rest) = vhost.management_url().split_once("://").unwrap();
    let (creds, host) = rest.rsplit_once('@').unwrap();
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-u",
        creds,
        "-X",
        method,
    ]);
    if let Some(body) = body {
        cmd.args([
            "-H",
            "content-type: application/json",
            "-d",
            &body.to_string(),
        ]);
    }
    let out = cmd
        .arg(format!("{scheme}://{host}{path}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn encode(s: &str) -> String {
    chimera_core::topology::state::percent_encode(s)
}

#[tokio::test]
async fn each_module_gets_a_fenced_broker_user_that_goes_with_it() {
    let vhost = TestVhost::create("users-fence");
    let h = harness("users-fence", &vhost).await;
    for name in ["users", "gigs", "orders"] {
        h.apply_module(&example(name)).await;
    }
    for name in ["users", "gigs", "orders"] {
        topology_ready(&h, name).await;
    }

    // The Secret: the user's name and URL, owned by the module; the heads read it.
    let secret = h.api::<Secret>().get("orders-broker").await.unwrap();
    let user = value(&secret, "username");
    assert_eq!(user, format!("chimera:{}:orders@{}", h.ns.name, vhost.name));
    let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("ChimeraModule", "orders")
    );
    let worker = h.api::<Deployment>().get("orders-worker").await.unwrap();
    let env = worker.spec.unwrap().template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    let amqp = env.iter().find(|e| e.name == "CHIMERA_AMQP_URL").unwrap();
    let from = amqp
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!(
        (from.name.as_str(), from.key.as_str()),
        ("orders-broker", "url")
    );
    assert!(amqp.value.is_none(), "credentials only through the Secret");

    let orders_url = value(&secret, "url");
    let orders = connect(&orders_url).await.unwrap();
    // Its own: consume its worker queue, publish its events, route its failures.
    let channel = orders.create_channel().await.unwrap();
    channel
        .basic_consume(
            "chimera.orders.worker".into(),
            "fence-test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert!(may_publish(&orders, "chimera.orders.events", "order.placed").await);
    // (routed: the failures exchange reaches the dlq)
    let routed = publish(
        &orders,
        "chimera.orders.worker.failures",
        "chimera.orders.worker.dlq",
    )
    .await
    .unwrap();
    assert!(routed, "the failures exchange does not route to the dlq");
    // Someone else's: the users domain's queue and events, its failures, any queue through
    // the default exchange, an event orders does not declare, and declaring anything.
    assert!(!may_read(&orders, "chimera.users.worker").await);
    assert!(!may_read(&orders, "chimera.orders.worker.dlq").await);
    assert!(!may_publish(&orders, "chimera.users.events", "user.registered").await);
    assert!(
        !may_publish(
            &orders,
            "chimera.users.worker.failures",
            "chimera.users.worker.dlq"
        )
        .await
    );
    assert!(!may_publish(&orders, "", "chimera.users.worker").await);
    assert!(!may_publish(&orders, "chimera.orders.events", "user.registered").await);
    let declare = orders
        .create_channel()
        .await
        .unwrap()
        .queue_declare(
            "mine".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert!(declare.as_ref().is_err_and(refused), "{declare:?}");
    // And the other module's credentials are fenced the same way, the other way round.
    let users_url = value(&h.api::<Secret>().get("users-broker").await.unwrap(), "url");
    let users = connect(&users_url).await.unwrap();
    assert!(may_read(&users, "chimera.users.worker").await);
    assert!(!may_read(&users, "chimera.orders.worker").await);
    users.close(200, "done".into()).await.ok();
    orders.close(200, "done".into()).await.ok();

    // Drift on the broker: permissions widened by hand are narrowed, a deleted user is made
    // again with the Secret's password.
    let permissions = format!("/api/permissions/{}/{}", encode(&vhost.name), encode(&user));
    let all = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
    assert_eq!(management(&vhost, "PUT", &permissions, Some(all)), 204);
    eventually("widened permissions narrowed again", WAIT, || async {
        let orders = connect(&orders_url).await.ok()?;
        let fenced = !may_read(&orders, "chimera.users.worker").await;
        orders.close(200, "done".into()).await.ok();
        fenced.then_some(())
    })
    .await;
    assert_eq!(
        management(
            &vhost,
            "DELETE",
            &format!("/api/users/{}", encode(&user)),
            None
        ),
        204
    );
    eventually("a deleted user made again", WAIT, || async {
        let orders = connect(&orders_url).await.ok()?;
        let reads = may_read(&orders, "chimera.orders.worker").await;
        orders.close(200, "done".into()).await.ok();
        reads.then_some(())
    })
    .await;

    // Deleting the module deletes its user; the other module's stays.
    h.api::<ChimeraModule>()
        .delete("orders", &DeleteParams::default())
        .await
        .unwrap();
    let user_path = format!("/api/users/{}", encode(&user));
    eventually("the orders user deleted with its module", WAIT, || async {
        (management(&vhost, "GET", &user_path, None) == 404).then_some(())
    })
    .await;
    let refused_now = connect(&orders_url).await;
    assert!(refused_now.is_err(), "the deleted user still connects");
    let users_user = format!("chimera:{}:users@{}", h.ns.name, vhost.name);
    assert_eq!(
        management(
            &vhost,
            "GET",
            &format!("/api/users/{}", encode(&users_user)),
            None
        ),
        200
    );
}

#[tokio::test]
async fn a_user_the_operator_did_not_make_is_never_taken_over() {
    let vhost = TestVhost::create("users-taken");
    let h = harness("users-taken", &vhost).await;
    let user = format!("chimera:{}:users@{}", h.ns.name, vhost.name);
    let path = format!("/api/users/{}", encode(&user));
    let theirs = serde_json::json!({"password": "theirs", "tags": "management"});
    assert_eq!(management(&vhost, "PUT", &path, Some(theirs)), 201);
    h.apply_module(&example("users")).await;
    let message = eventually("TopologyReady=False (BrokerUserFailed)", WAIT, || async {
        let m = h.api::<ChimeraModule>().get("users").await.ok()?;
        let c = m.status?.condition("TopologyReady")?.clone();
        (c.status == "False" && c.reason == "BrokerUserFailed").then_some(c.message)
    })
    .await;
    assert!(
        message.contains("was not made by the operator"),
        "{message}"
    );
    // Their user keeps its password, and deleting the module leaves it in place.
    h.api::<ChimeraModule>()
        .delete("users", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the module gone", WAIT, || async {
        h.api::<ChimeraModule>()
            .get_opt("users")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(management(&vhost, "GET", &path, None), 200);
    management(&vhost, "DELETE", &path, None);
}
