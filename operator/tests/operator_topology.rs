//! The operator with a broker: a real kube-apiserver and a real RabbitMQ (a vhost per test).
//! Modules get their topology, report it as TopologyReady, keep it under hand-made drift, and
//! release it on deletion per their deletion policy.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use chimera_core::api::ChimeraModule;
use chimera_core::api::validation::modules_from_yaml;
use chimera_core::topology::plan::plan;
use chimera_core::topology::state::BrokerEndpoint;
use chimera_runtime::topology::amqp::connect;
use chimera_testenv::TestVhost;
use common::{Harness, eventually, example, repo_root};
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::FieldTable;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

fn endpoint(vhost: &TestVhost) -> BrokerEndpoint {
    BrokerEndpoint::new(&vhost.amqp_url, Some(vhost.management_url())).unwrap()
}

fn bindings(vhost: &TestVhost) -> BTreeSet<(String, String, String)> {
    vhost
        .rabbitmqctl(&[
            "list_bindings",
            "-q",
            "source_name",
            "destination_name",
            "routing_key",
        ])
        .lines()
        .skip(1)
        .filter_map(|line| {
            let c: Vec<&str> = line.split('\t').collect();
            (c.len() == 3 && !c[0].is_empty()).then(|| (c[0].into(), c[1].into(), c[2].into()))
        })
        .collect()
}

fn queues(vhost: &TestVhost) -> BTreeSet<String> {
    vhost
        .rabbitmqctl(&["list_queues", "-q", "name"])
        .lines()
        .skip(1)
        .map(str::to_owned)
        .collect()
}

async fn topology_condition(h: &Harness, name: &str) -> Option<(String, String, String)> {
    let m = h.api::<ChimeraModule>().get(name).await.ok()?;
    let c = m.status?.condition("TopologyReady")?.clone();
    Some((c.status, c.reason, c.message))
}

async fn wait_topology(h: &Harness, name: &str, status: &str, reason: &str) -> String {
    eventually(
        &format!("{name} TopologyReady={status} ({reason})"),
        WAIT,
        || async {
            let (s, r, m) = topology_condition(h, name).await?;
            (s == status && r == reason).then_some(m)
        },
    )
    .await
}

async fn publish_command(vhost: &TestVhost, exchange: &str, key: &str) {
    let connection = connect(&endpoint(vhost)).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    channel
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    connection.close(200, "done".into()).await.ok();
}

#[tokio::test]
async fn the_marketplace_gets_its_topology_and_keeps_it_under_drift() {
    let vhost = TestVhost::create("op-topo");
    let h = Harness::with_operator_on_broker("op-topo", endpoint(&vhost)).await;
    let mut modules = Vec::new();
    for name in ["users", "gigs", "orders"] {
        h.apply_module(&example(name)).await;
        let text =
            std::fs::read_to_string(repo_root().join(format!("examples/marketplace/{name}.yaml")))
                .unwrap();
        modules.extend(modules_from_yaml(&text).0);
    }
    for name in ["users", "gigs", "orders"] {
        wait_topology(&h, name, "True", "Declared").await;
    }
    let expected: BTreeSet<_> = plan(&modules)
        .bindings
        .iter()
        .map(|b| {
            (
                b.source.clone(),
                b.destination.clone(),
                b.routing_key.clone(),
            )
        })
        .collect();
    eventually("every planned binding on the broker", WAIT, || async {
        (bindings(&vhost) == expected).then_some(())
    })
    .await;

    // Drift by hand, no Kubernetes change: the operator puts it back.
    let connection = connect(&endpoint(&vhost)).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_unbind(
            "chimera.gigs.worker".into(),
            "chimera.users.events".into(),
            "user.registered".into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_delete("chimera.orders.worker.retry.2".into(), Default::default())
        .await
        .unwrap();
    connection.close(200, "drift".into()).await.ok();
    eventually("drift repaired", WAIT, || async {
        (bindings(&vhost) == expected && queues(&vhost).contains("chimera.orders.worker.retry.2"))
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_subscription_to_an_unknown_domain_is_reported_and_heals_when_the_domain_arrives() {
    let vhost = TestVhost::create("op-unknown");
    let h = Harness::with_operator_on_broker("op-unknown", endpoint(&vhost)).await;
    h.apply_module(&example("gigs")).await; // subscribes to users, which does not exist yet
    let message = wait_topology(&h, "gigs", "False", "UnknownDomain").await;
    assert!(
        message.contains("no module owns domain \"users\""),
        "{message}"
    );
    let ready = h
        .api::<ChimeraModule>()
        .get("gigs")
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(
        ready.condition("Ready").map(|c| c.status.as_str()),
        Some("False")
    );
    // The bindings exist anyway, so delivery starts as soon as users publishes.
    assert!(bindings(&vhost).contains(&(
        "chimera.users.events".into(),
        "chimera.gigs.worker".into(),
        "user.registered".into()
    )));

    h.apply_module(&example("users")).await;
    wait_topology(&h, "gigs", "True", "Declared").await;
}

#[tokio::test]
async fn a_changed_queue_type_is_reported_with_both_values() {
    let vhost = TestVhost::create("op-type");
    let h = Harness::with_operator_on_broker("op-type", endpoint(&vhost)).await;
    h.apply_module(&example("users")).await;
    wait_topology(&h, "users", "True", "Declared").await;
    let mut classic = example("users");
    classic["spec"]["worker"]["queue"] = json!({"type": "classic"});
    h.apply_module(&classic).await;
    let message = wait_topology(&h, "users", "False", "QueueArgumentsChanged").await;
    assert!(
        message
            .contains("chimera.users.worker x-queue-type: broker has quorum, spec wants classic"),
        "{message}"
    );
    let events: Api<Event> = h.api();
    eventually("a QueueArgumentsChanged event", WAIT, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        let found = list
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("QueueArgumentsChanged"));
        found.then_some(())
    })
    .await;
    assert!(
        queues(&vhost).contains("chimera.users.worker"),
        "the old queue keeps serving"
    );
}

#[tokio::test]
async fn retain_keeps_queues_and_messages_but_stops_the_inflow() {
    let vhost = TestVhost::create("op-retain");
    let h = Harness::with_operator_on_broker("op-retain", endpoint(&vhost)).await;
    h.apply_module(&example("users")).await;
    h.apply_module(&example("gigs")).await;
    wait_topology(&h, "gigs", "True", "Declared").await;
    publish_command(&vhost, "chimera.gigs.commands", "gig.publish").await;

    h.api::<ChimeraModule>()
        .delete("gigs", &DeleteParams::default())
        .await
        .unwrap();
    eventually("gigs gone", WAIT, || async {
        h.api::<ChimeraModule>()
            .get_opt("gigs")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let left = bindings(&vhost);
    assert!(
        queues(&vhost).contains("chimera.gigs.worker"),
        "Retain keeps the queue"
    );
    // Queue statistics lag by a few seconds.
    eventually(
        "the retained queue still holds the message",
        WAIT,
        || async {
            let depth = vhost.rabbitmqctl(&["list_queues", "-q", "name", "messages"]);
            depth
                .lines()
                .any(|l| l == "chimera.gigs.worker\t1")
                .then_some(())
        },
    )
    .await;
    assert!(
        !left
            .iter()
            .any(|(s, d, _)| s == "chimera.users.events" && d == "chimera.gigs.worker"),
        "no inflow from other domains: {left:?}"
    );
}

#[tokio::test]
async fn delete_waits_for_unread_messages_unless_forced() {
    let vhost = TestVhost::create("op-delete");
    let h = Harness::with_operator_on_broker("op-delete", endpoint(&vhost)).await;
    let mut users = example("users");
    users["spec"]["topology"] = json!({"deletionPolicy": "Delete"});
    h.apply_module(&users).await;
    wait_topology(&h, "users", "True", "Declared").await;
    publish_command(&vhost, "chimera.users.commands", "user.register").await;

    let modules = h.api::<ChimeraModule>();
    modules
        .delete("users", &DeleteParams::default())
        .await
        .unwrap();
    let events: Api<Event> = h.api();
    eventually("a DeletionBlocked event", WAIT, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .find(|e| e.reason.as_deref() == Some("DeletionBlocked"))
            .and_then(|e| e.note.clone())
    })
    .await;
    assert!(
        modules.get_opt("users").await.unwrap().is_some(),
        "the finalizer holds the module"
    );
    assert!(
        queues(&vhost).contains("chimera.users.worker"),
        "nothing deleted while unread"
    );

    let force = json!({"metadata": {"annotations": {"chimera.dev/force-delete": "true"}}});
    modules
        .patch("users", &PatchParams::default(), &Patch::Merge(&force))
        .await
        .unwrap();
    eventually("users gone and its queues deleted", WAIT, || async {
        let gone = modules.get_opt("users").await.ok()?.is_none();
        (gone
            && !queues(&vhost)
                .iter()
                .any(|q| q.starts_with("chimera.users.")))
        .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_missing_vhost_is_a_clear_condition_and_nothing_is_deleted() {
    let vhost = TestVhost::create("op-novhost");
    let missing = BrokerEndpoint::new(
        &format!("{}-gone", vhost.amqp_url),
        Some(vhost.management_url()),
    )
    .unwrap();
    let h = Harness::with_operator_on_broker("op-novhost", missing).await;
    h.apply_module(&example("users")).await;
    let message = wait_topology(&h, "users", "False", "VhostNotFound").await;
    assert!(message.contains("does not exist"), "{message}");
    assert!(queues(&vhost).is_empty());
}

#[tokio::test]
async fn delete_removes_empty_queues_without_force() {
    let vhost = TestVhost::create("op-delete-empty");
    let h = Harness::with_operator_on_broker("op-delete-empty", endpoint(&vhost)).await;
    let mut users = example("users");
    users["spec"]["topology"] = json!({"deletionPolicy": "Delete"});
    h.apply_module(&users).await;
    wait_topology(&h, "users", "True", "Declared").await;
    assert!(queues(&vhost).contains("chimera.users.worker"));
    let modules = h.api::<ChimeraModule>();
    modules
        .delete("users", &DeleteParams::default())
        .await
        .unwrap();
    eventually("users gone with its (quorum) queues", WAIT, || async {
        let gone = modules.get_opt("users").await.ok()?.is_none();
        (gone
            && !queues(&vhost)
                .iter()
                .any(|q| q.starts_with("chimera.users.")))
        .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_module_with_its_own_broker_secret_is_declared_there() {
    let operator_vhost = TestVhost::create("op-default");
    let own_vhost = TestVhost::create("op-own");
    let h = Harness::with_operator_on_broker("op-own", endpoint(&operator_vhost)).await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = h.api();
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": "own-mq"},
        "stringData": {"url": own_vhost.amqp_url, "managementUrl": own_vhost.management_url()}
    }))
    .unwrap();
    secrets.create(&Default::default(), &secret).await.unwrap();
    let mut users = example("users");
    users["spec"]["broker"] = json!({"secretRef": {"name": "own-mq"}});
    h.apply_module(&users).await;
    wait_topology(&h, "users", "True", "Declared").await;
    assert!(queues(&own_vhost).contains("chimera.users.worker"));
    assert!(
        queues(&operator_vhost).is_empty(),
        "nothing on the operator's broker"
    );

    users["spec"]["broker"] = json!({"secretRef": {"name": "missing-mq"}});
    h.apply_module(&users).await;
    let message = wait_topology(&h, "users", "False", "BrokerSecretUnreadable").await;
    assert!(message.contains("missing-mq"), "{message}");

    // Retain: with its broker Secret gone, the module is still let go (its queues stay).
    let modules = h.api::<ChimeraModule>();
    modules
        .delete("users", &DeleteParams::default())
        .await
        .unwrap();
    eventually("users gone despite the missing Secret", WAIT, || async {
        modules.get_opt("users").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(queues(&own_vhost).contains("chimera.users.worker"));
}
