//! The topology declarer against a real RabbitMQ, one fresh vhost per test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chimera_core::api::validation::modules_from_yaml;
use chimera_core::topology::plan::{TopologyPlan, plan};
use chimera_core::topology::state::BrokerEndpoint;
use chimera_core::topology::verdict::BrokerFailureKind;
use chimera_runtime::topology::amqp::connect;
use chimera_runtime::topology::declare::{apply, current_diff};
use chimera_runtime::topology::management::BrokerError;
use chimera_runtime::topology::migrate::migrate;
use chimera_testenv::TestVhost;
use common::repo_root;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};

fn endpoint(vhost: &TestVhost) -> BrokerEndpoint {
    BrokerEndpoint::new(&vhost.amqp_url, Some(vhost.management_url())).unwrap()
}

fn marketplace_plan() -> TopologyPlan {
    let mut all = Vec::new();
    for name in ["users", "gigs", "orders", "notifications"] {
        let path = repo_root().join(format!("examples/marketplace/{name}.yaml"));
        let (modules, problems) = modules_from_yaml(&std::fs::read_to_string(path).unwrap());
        assert!(problems.is_empty(), "{problems:?}");
        all.extend(modules);
    }
    plan(&all)
}

fn plan_of(yaml: &str) -> TopologyPlan {
    let (modules, problems) = modules_from_yaml(yaml);
    assert!(problems.is_empty(), "{problems:?}");
    plan(&modules)
}

/// (source, destination, routing key) of every binding rabbitmqctl lists, default exchange aside.
fn listed_bindings(vhost: &TestVhost) -> BTreeSet<(String, String, String)> {
    vhost
        .rabbitmqctl(&[
            "list_bindings",
            "-q",
            "source_name",
            "destination_name",
            "routing_key",
        ])
        .lines()
        .skip(1) // header
        .filter_map(|line| {
            let cols: Vec<&str> = line.split('\t').collect();
            (cols.len() == 3 && !cols[0].is_empty())
                .then(|| (cols[0].into(), cols[1].into(), cols[2].into()))
        })
        .collect()
}

fn listed_names(vhost: &TestVhost, what: &str) -> BTreeSet<String> {
    vhost
        .rabbitmqctl(&[what, "-q", "name"])
        .lines()
        .skip(1)
        .filter(|n| n.starts_with("chimera."))
        .map(str::to_owned)
        .collect()
}

fn planned_bindings(p: &TopologyPlan) -> BTreeSet<(String, String, String)> {
    p.bindings
        .iter()
        .map(|b| {
            (
                b.source.clone(),
                b.destination.clone(),
                b.routing_key.clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_fresh_broker_gets_exactly_the_plan_and_a_second_apply_changes_nothing() {
    let vhost = TestVhost::create("topo-fresh");
    let p = marketplace_plan();
    let report = apply(&endpoint(&vhost), &p).await.unwrap();
    assert_eq!(report.exchanges_declared, p.exchanges.len());
    assert_eq!(report.queues_declared, p.queues.len());
    assert_eq!(report.bindings_created, p.bindings.len());

    assert_eq!(listed_bindings(&vhost), planned_bindings(&p));
    let queues: BTreeSet<String> = p.queues.iter().map(|q| q.name.clone()).collect();
    assert_eq!(listed_names(&vhost, "list_queues"), queues);
    let exchanges: BTreeSet<String> = p.exchanges.iter().map(|e| e.name.clone()).collect();
    assert_eq!(listed_names(&vhost, "list_exchanges"), exchanges);
    let types = vhost.rabbitmqctl(&["list_queues", "-q", "name", "type"]);
    assert!(
        types.lines().any(|l| l == "chimera.orders.worker\tquorum"),
        "{types}"
    );

    let again = apply(&endpoint(&vhost), &p).await.unwrap();
    assert!(again.diff.is_converged(), "{:?}", again.diff);
    assert_eq!(
        (
            again.exchanges_declared,
            again.queues_declared,
            again.bindings_created
        ),
        (0, 0, 0)
    );
}

#[tokio::test]
async fn drift_is_repaired_and_a_removed_subscription_is_unbound() {
    let vhost = TestVhost::create("topo-drift");
    let e = endpoint(&vhost);
    let p = marketplace_plan();
    apply(&e, &p).await.unwrap();

    // By hand: delete a queue (its bindings go with it) and a binding.
    let connection = connect(&e).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_delete("chimera.gigs.worker".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    channel
        .queue_unbind(
            "chimera.orders.worker".into(),
            "chimera.users.events".into(),
            "user.deleted".into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let drift = current_diff(&e, &p).await.unwrap();
    assert!(
        drift
            .missing_queues
            .iter()
            .any(|q| q.name == "chimera.gigs.worker")
    );
    assert!(
        drift
            .missing_bindings
            .iter()
            .any(|b| b.destination == "chimera.orders.worker" && b.routing_key == "user.deleted")
    );
    // The gigs worker queue's bindings went with it, and come back with it.
    assert!(
        drift
            .missing_bindings
            .iter()
            .filter(|b| b.destination == "chimera.gigs.worker")
            .count()
            >= 4
    );

    apply(&e, &p).await.unwrap();
    assert_eq!(listed_bindings(&vhost), planned_bindings(&p));

    // orders stops subscribing to user.deleted: that binding, and only it, goes.
    let mut yaml = String::new();
    for name in ["users", "gigs", "orders", "notifications"] {
        yaml.push_str(
            &std::fs::read_to_string(repo_root().join(format!("examples/marketplace/{name}.yaml")))
                .unwrap(),
        );
        yaml.push_str("\n---\n");
    }
    let yaml = yaml.replace(
        "events: [user.registered, user.deleted]",
        "events: [user.registered]",
    );
    let smaller = plan_of(&yaml);
    assert_eq!(smaller.bindings.len() + 1, p.bindings.len());
    let report = apply(&e, &smaller).await.unwrap();
    assert_eq!(report.bindings_removed, 1);
    assert_eq!(report.diff.stale_bindings[0].routing_key, "user.deleted");
    assert_eq!(listed_bindings(&vhost), planned_bindings(&smaller));
    connection.close(200, "done".into()).await.ok();
}

#[tokio::test]
async fn a_changed_queue_type_is_reported_not_retried_into_a_406_loop() {
    let vhost = TestVhost::create("topo-type");
    let e = endpoint(&vhost);
    let quorum = "apiVersion: chimera.dev/v1alpha1\nkind: ChimeraModule\nmetadata: {name: pay}\nspec:\n  image: x\n  commands: [pay.charge]\n  worker: {retry: {delaysSeconds: [1]}}\n";
    apply(&e, &plan_of(quorum)).await.unwrap();

    // The spec moves to a classic queue and adds a command in the same change.
    let classic = quorum
        .replace(
            "commands: [pay.charge]",
            "commands: [pay.charge, pay.refund]",
        )
        .replace(
            "worker: {retry: {delaysSeconds: [1]}}",
            "worker: {retry: {delaysSeconds: [1]}, queue: {type: classic}}",
        );
    let p = plan_of(&classic);
    for round in 0..3 {
        let report = apply(&e, &p)
            .await
            .unwrap_or_else(|err| panic!("round {round}: {err}"));
        assert!(report.diff.has_conflicts());
        let types: Vec<_> = report
            .diff
            .argument_conflicts
            .iter()
            .filter(|c| c.argument == "x-queue-type")
            .map(|c| (c.queue.as_str(), c.current.as_deref(), c.wanted.as_deref()))
            .collect();
        assert!(
            types.contains(&("chimera.pay.worker", Some("quorum"), Some("classic"))),
            "{types:?}"
        );
    }
    // The old queue still serves, and the new command was bound to it anyway.
    let bindings = listed_bindings(&vhost);
    assert!(bindings.contains(&(
        "chimera.pay.commands".into(),
        "chimera.pay.worker".into(),
        "pay.refund".into()
    )));
    let types = vhost.rabbitmqctl(&["list_queues", "-q", "name", "type"]);
    assert!(
        types.lines().any(|l| l == "chimera.pay.worker\tquorum"),
        "{types}"
    );
}

fn header<'a>(props: &'a BasicProperties, key: &str) -> Option<&'a AMQPValue> {
    props.headers().as_ref()?.inner().get(key)
}

fn attempt_of(props: &BasicProperties) -> i64 {
    match header(props, "x-chimera-attempt") {
        Some(AMQPValue::LongLongInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => i64::from(*n),
        _ => 1,
    }
}

async fn publish(channel: &Channel, exchange: &str, key: &str, body: &[u8], headers: FieldTable) {
    channel
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default()
                .with_headers(headers)
                .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Polls a queue until a message arrives or `timeout` passes.
async fn next_message(
    channel: &Channel,
    queue: &str,
    timeout: Duration,
) -> Option<lapin::message::BasicGetMessage> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(m) = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            return Some(m);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Acts as a worker whose handler always fails, following the contract's settlement rules: a
/// retry goes to retry queue n with the attempt count raised, the last attempt to the dlq with
/// the reason. The topology must bring each retry back after its delay.
#[tokio::test]
async fn a_failing_message_passes_every_retry_delay_and_lands_in_the_dlq_with_its_reason() {
    let vhost = TestVhost::create("topo-retry");
    let e = endpoint(&vhost);
    let yaml = "apiVersion: chimera.dev/v1alpha1\nkind: ChimeraModule\nmetadata: {name: pay}\nspec:\n  image: x\n  commands: [pay.charge]\n  worker: {retry: {delaysSeconds: [1, 2]}}\n";
    apply(&e, &plan_of(yaml)).await.unwrap();
    let connection = connect(&e).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();

    publish(
        &channel,
        "chimera.pay.commands",
        "pay.charge",
        b"{\"id\":\"1\"}",
        FieldTable::default(),
    )
    .await;
    let delays = [1u64, 2];
    let mut sent_back_at = Instant::now();
    for attempt in 1..=3i64 {
        let m = next_message(&channel, "chimera.pay.worker", Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("attempt {attempt} never reached the worker queue"));
        if attempt > 1 {
            let waited = sent_back_at.elapsed();
            let delay = Duration::from_secs(delays[(attempt - 2) as usize]);
            assert!(
                waited >= delay - Duration::from_millis(100),
                "attempt {attempt} came back after {waited:?}, before its {delay:?} delay"
            );
        }
        assert_eq!(attempt_of(&m.delivery.properties), attempt);
        let mut headers = FieldTable::default();
        if attempt <= delays.len() as i64 {
            headers.insert(
                ShortString::from("x-chimera-attempt"),
                AMQPValue::LongLongInt(attempt + 1),
            );
            publish(
                &channel,
                "",
                &format!("chimera.pay.worker.retry.{attempt}"),
                &m.delivery.data,
                headers,
            )
            .await;
        } else {
            headers.insert(
                ShortString::from("x-chimera-attempt"),
                AMQPValue::LongLongInt(attempt),
            );
            headers.insert(
                ShortString::from("x-chimera-reason"),
                AMQPValue::LongString(LongString::from("handler failed 3 times: card declined")),
            );
            headers.insert(
                ShortString::from("x-chimera-original-routing-key"),
                AMQPValue::LongString(LongString::from("pay.charge")),
            );
            publish(
                &channel,
                "",
                "chimera.pay.worker.dlq",
                &m.delivery.data,
                headers,
            )
            .await;
        }
        m.delivery.ack(BasicAckOptions::default()).await.unwrap();
        sent_back_at = Instant::now();
    }
    let parked = next_message(&channel, "chimera.pay.worker.dlq", Duration::from_secs(5))
        .await
        .expect("message in the dlq");
    assert_eq!(parked.delivery.data, b"{\"id\":\"1\"}");
    match header(&parked.delivery.properties, "x-chimera-reason") {
        Some(AMQPValue::LongString(reason)) => {
            assert!(reason.to_string().contains("card declined"))
        }
        other => panic!("no reason header: {other:?}"),
    }
    assert!(
        next_message(&channel, "chimera.pay.worker", Duration::from_millis(300))
            .await
            .is_none(),
        "nothing left to work on"
    );
    connection.close(200, "done".into()).await.ok();
}

#[tokio::test]
async fn bad_brokers_fail_clearly_and_change_nothing() {
    let vhost = TestVhost::create("topo-bad");
    let p = marketplace_plan();
    let missing = BrokerEndpoint::new(
        &format!("{}-missing", vhost.amqp_url),
        Some(vhost.management_url()),
    )
    .unwrap();
    let err = apply(&missing, &p).await.unwrap_err();
    assert!(matches!(err, BrokerError::VhostNotFound { .. }), "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");
    assert_eq!(err.failure().kind, BrokerFailureKind::VhostNotFound);

    let wrong_password = vhost.amqp_url.replacen("guest:guest@", "guest:wrong@", 1);
    let err = apply(
        &BrokerEndpoint::new(&wrong_password, Some(vhost.management_url())).unwrap(),
        &p,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("ACCESS_REFUSED"), "{err}");
    // Classified by the AMQP reply code (403), not by the message's text.
    assert_eq!(
        err.failure().kind,
        BrokerFailureKind::AccessRefused,
        "{err:?}"
    );
    assert!(
        !err.to_string().contains("wrong"),
        "the password must not be printed: {err}"
    );

    let unreachable = BrokerEndpoint::new(
        "amqp://guest:guest@127.0.0.1:1/%2f",
        Some("http://guest:guest@127.0.0.1:1"),
    )
    .unwrap();
    let err = apply(&unreachable, &p).await.unwrap_err();
    assert!(err.to_string().contains("unreachable"), "{err}");

    // Nothing was declared by any of the failed attempts.
    assert!(listed_names(&vhost, "list_queues").is_empty());
}

#[tokio::test]
async fn migrating_a_queue_type_keeps_every_message_and_binding() {
    let vhost = TestVhost::create("topo-migrate");
    let e = endpoint(&vhost);
    let classic = "apiVersion: chimera.dev/v1alpha1\nkind: ChimeraModule\nmetadata: {name: pay}\nspec:\n  image: x\n  commands: [pay.charge, pay.refund]\n  worker: {retry: {delaysSeconds: []}, queue: {type: classic}}\n";
    apply(&e, &plan_of(classic)).await.unwrap();
    let connection = connect(&e).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..50 {
        publish(
            &channel,
            "chimera.pay.commands",
            "pay.charge",
            format!("{{\"n\":{i}}}").as_bytes(),
            FieldTable::default(),
        )
        .await;
    }

    let quorum = plan_of(&classic.replace("type: classic", "type: quorum"));
    let blocked = apply(&e, &quorum).await.unwrap();
    assert!(blocked.diff.has_conflicts());
    let done = migrate(&e, &quorum, None, Duration::from_secs(60))
        .await
        .unwrap();
    let moved: Vec<_> = done
        .iter()
        .map(|m| (m.queue.as_str(), m.moved_out, m.moved_back))
        .collect();
    assert!(moved.contains(&("chimera.pay.worker", 50, 50)), "{moved:?}");

    let types = vhost.rabbitmqctl(&["list_queues", "-q", "name", "type"]);
    assert!(
        types.lines().any(|l| l == "chimera.pay.worker\tquorum"),
        "{types}"
    );
    assert!(!types.contains(".migrating"), "{types}");
    assert_eq!(listed_bindings(&vhost), planned_bindings(&quorum));
    let after = current_diff(&e, &quorum).await.unwrap();
    assert!(after.is_converged() && !after.has_conflicts(), "{after:?}");
    // Every message is there, in order.
    for i in 0..50 {
        let m = next_message(&channel, "chimera.pay.worker", Duration::from_secs(5))
            .await
            .expect("message after migration");
        assert_eq!(m.delivery.data, format!("{{\"n\":{i}}}").into_bytes());
        m.delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert!(
        next_message(&channel, "chimera.pay.worker", Duration::from_millis(300))
            .await
            .is_none()
    );
    connection.close(200, "done".into()).await.ok();
}

/// The Done criterion as a user types it: the CLI on a fresh broker.
#[tokio::test]
async fn the_cli_applies_the_marketplace_and_diff_then_reports_no_change() {
    let vhost = TestVhost::create("topo-cli");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_chimera"))
            .args(args)
            .args([
                "-f",
                repo_root().join("examples/marketplace").to_str().unwrap(),
            ])
            .args([
                "--amqp",
                &vhost.amqp_url,
                "--management",
                vhost.management_url(),
            ])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = run(&["topology", "diff"]);
    assert_eq!(code, Some(1), "a fresh broker differs: {out}");
    assert!(out.contains("+ queue chimera.orders.worker"), "{out}");
    let (code, out) = run(&["topology", "apply"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("declared 12 exchange(s), 20 queue(s), 36 binding(s)"),
        "{out}"
    );
    assert_eq!(
        listed_bindings(&vhost),
        planned_bindings(&marketplace_plan())
    );
    let (code, out) = run(&["topology", "diff"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("broker matches the plan"), "{out}");
}

/// `chimera publish` sends the contract's envelope to the commands exchange and waits for the
/// confirm; a command no queue takes is an error.
#[tokio::test]
async fn chimera_publish_sends_a_command_in_the_contract_envelope() {
    let vhost = TestVhost::create("topo-publish");
    apply(&endpoint(&vhost), &marketplace_plan()).await.unwrap();
    let publish = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_chimera"))
            .arg("publish")
            .args(args)
            .args(["--amqp", &vhost.amqp_url])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let id = "6d6f1f9e-8d0e-4c35-9f55-6c2b8b1c2a11";
    let (code, out) = publish(&[
        "--domain",
        "users",
        "--type",
        "user.register",
        "--data",
        r#"{"user_id":"u1","name":"Ada","email":"ada@example.com"}"#,
        "--id",
        id,
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("confirmed"), "{out}");

    let connection = connect(&endpoint(&vhost)).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let m = next_message(&channel, "chimera.users.worker", Duration::from_secs(5))
        .await
        .expect("the command reached the users worker queue");
    let props = &m.delivery.properties;
    assert_eq!(
        props.message_id().as_ref().map(|s| s.to_string()),
        Some(id.to_owned())
    );
    assert_eq!(
        props.kind().as_ref().map(|s| s.to_string()),
        Some("user.register".to_owned())
    );
    assert_eq!(
        props.content_type().as_ref().map(|s| s.to_string()),
        Some("application/json".to_owned())
    );
    assert_eq!(*props.delivery_mode(), Some(2));
    assert_eq!(attempt_of(props), 1);
    match header(props, "traceparent") {
        Some(AMQPValue::LongString(t)) => assert!(t.to_string().starts_with("00-"), "{t}"),
        other => panic!("no traceparent: {other:?}"),
    }
    let body: serde_json::Value = serde_json::from_slice(&m.delivery.data).unwrap();
    assert_eq!(body["id"], id);
    assert_eq!(body["type"], "user.register");
    assert_eq!(body["data"]["name"], "Ada");
    assert!(body["occurred_at"].as_str().is_some());
    connection.close(200, "done".into()).await.ok();

    let (code, out) = publish(&["--domain", "users", "--type", "user.frobnicate"]);
    assert_eq!(code, Some(1));
    assert!(
        out.contains("no queue is bound for \"user.frobnicate\""),
        "{out}"
    );
    let (code, out) = publish(&[
        "--domain",
        "users",
        "--type",
        "user.register",
        "--data",
        "[1,2]",
    ]);
    assert_eq!(code, Some(1));
    assert!(out.contains("must be a JSON object"), "{out}");
    let (code, out) = publish(&["--domain", "users", "--type", "user.register", "--id", "42"]);
    assert_eq!(code, Some(1));
    assert!(out.contains("is not a UUID"), "{out}");
}
