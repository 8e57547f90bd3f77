//! The SDK's worker runtime on the topology the control plane declares, with a real RabbitMQ
//! and both real databases: effectively-once handling, events through the outbox, retries
//! through the retry queues, and dead letters with reasons, without stopping.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use chimera_core::api::validation::modules_from_yaml;
use chimera_core::topology::plan::plan;
use chimera_core::topology::state::BrokerEndpoint;
use chimera_runtime::topology::declare::apply;
use chimera_sdk::broker::{Outgoing, Publisher, connect};
use chimera_sdk::config::WorkerConfig;
use chimera_sdk::db::{Database, Migration};
use chimera_sdk::envelope::{Envelope, ORIGINAL_ROUTING_KEY, REASON, TRACEPARENT, TraceParent};
use chimera_sdk::http::HttpMetrics;
use chimera_sdk::outbox::{RelaySettings, run_relay};
use chimera_sdk::sqlx;
use chimera_sdk::sqlx::Row;
use chimera_sdk::worker::{Context, HandlerError, Outcome, Worker};
use chimera_testenv::{TestDatabase, TestVhost, unique_name};
use futures::StreamExt;
use futures::future::BoxFuture;
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use serde::Deserialize;
use tokio::sync::Notify;

const BANK: &str = "apiVersion: chimera.dev/v1alpha1\nkind: ChimeraModule\nmetadata: {name: bank}\nspec:\n  image: x\n  commands: [account.open, account.flaky, account.close, account.tag]\n  events: {publishes: [account.opened]}\n  worker: {prefetch: 20, retry: {delaysSeconds: [1]}}\n";

const MIGRATIONS: &[Migration] = &[Migration {
    version: 100,
    description: "accounts",
    sql: "CREATE TABLE accounts (id VARCHAR(64) PRIMARY KEY, owner VARCHAR(255) NOT NULL)",
}];

#[derive(Deserialize)]
struct Open {
    id: String,
    owner: String,
}

fn open(ctx: &mut Context) -> BoxFuture<'_, Result<(), HandlerError>> {
    Box::pin(async move {
        let cmd: Open = ctx.data()?;
        if cmd.owner.is_empty() {
            return Err(HandlerError::Reject("owner must not be empty".into()));
        }
        sqlx::query("INSERT INTO accounts (id, owner) VALUES (?, ?)")
            .bind(&cmd.id)
            .bind(&cmd.owner)
            .execute(&mut **ctx.tx())
            .await?;
        ctx.emit("account.opened", &serde_json::json!({"id": cmd.id}))?;
        // Fails after writing and emitting: what it did must be undone, and only that.
        if cmd.owner == "!" {
            return Err(HandlerError::Reject("refused after writing".into()));
        }
        Ok(())
    })
}

/// Emits an event whose payload JSON cannot hold (a map with non-string keys).
fn tag(ctx: &mut Context) -> BoxFuture<'_, Result<(), HandlerError>> {
    Box::pin(async move {
        let tags: std::collections::HashMap<(u8, u8), u8> = [((1, 2), 3)].into();
        ctx.emit("account.tagged", &tags)
    })
}

fn flaky(_ctx: &mut Context) -> BoxFuture<'_, Result<(), HandlerError>> {
    Box::pin(async { Err(HandlerError::Retry("the ledger is down".into())) })
}

fn worker_config() -> WorkerConfig {
    WorkerConfig {
        queue: "chimera.bank.worker".into(),
        dead_letter_queue: "chimera.bank.worker.dlq".into(),
        failures_exchange: "chimera.bank.worker.failures".into(),
        retry_delays_seconds: vec![1],
        max_attempts: 2,
        prefetch: 20,
        commands: [
            "account.open",
            "account.flaky",
            "account.close",
            "account.tag",
        ]
        .map(str::to_owned)
        .to_vec(),
        subscriptions: Some(vec![("ledger".into(), "ledger.*".into())]),
        schemas: [(
            "account.open".to_owned(),
            serde_json::json!({"type": "object", "required": ["id", "owner"],
                "properties": {"id": {"type": "string"}, "owner": {"type": "string"}}}),
        )]
        .into(),
    }
}

async fn get(
    channel: &lapin::Channel,
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

fn header(m: &lapin::message::BasicGetMessage, key: &str) -> String {
    match m
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(key).cloned())
    {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => format!("{other:?}"),
    }
}

fn reason(m: &lapin::message::BasicGetMessage) -> String {
    header(m, REASON)
}

#[tokio::test]
async fn the_worker_handles_once_retries_and_dead_letters_on_both_databases() {
    for backend in ["sqlite", "mariadb"] {
        let tdb = if backend == "sqlite" {
            TestDatabase::sqlite("worker")
        } else {
            TestDatabase::mysql("worker").await
        };
        let vhost = TestVhost::create("worker");
        let endpoint = BrokerEndpoint::new(&vhost.amqp_url, Some(vhost.management_url())).unwrap();
        let (modules, problems) = modules_from_yaml(BANK);
        assert!(problems.is_empty(), "{problems:?}");
        apply(&endpoint, &plan(&modules)).await.unwrap();

        let db = Database::connect(&tdb.url, MIGRATIONS).await.unwrap();
        let connection = connect(&vhost.amqp_url, &unique_name("bank-worker"))
            .await
            .unwrap();
        let publisher = Publisher::open(&connection).await.unwrap();
        // Someone listening to the bank's events.
        let probe = lapin::Connection::connect(&vhost.amqp_url, Default::default())
            .await
            .unwrap();
        let channel = probe.create_channel().await.unwrap();
        channel
            .queue_declare(
                "audit".into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                "audit".into(),
                "chimera.bank.events".into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();

        let metrics = HttpMetrics::new();
        let worker = Arc::new(
            Worker::new(worker_config(), "bank", "chimera.bank.events")
                .on("account.open", open)
                .on("account.flaky", flaky)
                .on("account.tag", tag)
                .with_metrics(metrics.clone()),
        );
        let (relay_wake, stop_relay, stop_worker) = (
            Arc::new(Notify::new()),
            Arc::new(Notify::new()),
            Arc::new(Notify::new()),
        );
        let relay = tokio::spawn(run_relay(
            db.clone(),
            publisher.clone(),
            RelaySettings::default(),
            relay_wake.clone(),
            stop_relay.clone(),
            Duration::from_millis(200),
            metrics.outbox_pending.clone(),
        ));
        let running = {
            let (worker, db, publisher, wake, stop) = (
                worker.clone(),
                db.clone(),
                publisher.clone(),
                relay_wake.clone(),
                stop_worker.clone(),
            );
            let vhost_url = vhost.amqp_url.clone();
            tokio::spawn(async move {
                let connection = connect(&vhost_url, &unique_name("bank-consumer"))
                    .await
                    .unwrap();
                worker
                    .run(db, &connection, publisher, wake, stop, "bank-worker")
                    .await
                    .unwrap();
            })
        };

        // Every command of the test is sent in one trace: its dead letters stay in it.
        let trace = TraceParent::new_root();
        let send = |kind: &str, data: serde_json::Value| {
            let mut m = Outgoing::new("chimera.bank.commands", Envelope::new(kind, data));
            m.trace = Some(trace);
            m.headers.push(("x-tenant".into(), "blue".into()));
            m
        };
        let open_cmd = send(
            "account.open",
            serde_json::json!({"id": "a1", "owner": "Ada"}),
        );
        publisher.publish(&open_cmd, true).await.unwrap();
        publisher.publish(&open_cmd, true).await.unwrap(); // the same message id, delivered twice
        publisher
            .publish(&send("account.flaky", serde_json::json!({})), true)
            .await
            .unwrap();
        publisher
            .publish(
                &send("account.open", serde_json::json!({"id": "a2", "owner": ""})),
                true,
            )
            .await
            .unwrap();
        publisher
            .publish(
                &send("account.close", serde_json::json!({"id": "a1"})),
                true,
            )
            .await
            .unwrap();
        publisher
            .publish(&send("account.tag", serde_json::json!({"id": "a1"})), true)
            .await
            .unwrap();
        channel
            .basic_publish(
                "chimera.bank.commands".into(),
                "account.open".into(),
                BasicPublishOptions::default(),
                b"{not json",
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        // An event of a subscription the bank has no handler for (the ledger's newer event,
        // straight into the queue as its binding would route it): acknowledged, not parked.
        let mut ledger = Outgoing::new(
            "",
            Envelope::new("ledger.closed", serde_json::json!({"day": 1})),
        );
        ledger.routing_key = "chimera.bank.worker".into();
        publisher.publish(&ledger, true).await.unwrap();
        // A payload its schema refuses (the id is a number): parked with the schema's words.
        publisher
            .publish(
                &send("account.open", serde_json::json!({"id": 5, "owner": "Ada"})),
                true,
            )
            .await
            .unwrap();
        // After all that, the worker still works.
        publisher
            .publish(
                &send(
                    "account.open",
                    serde_json::json!({"id": "a3", "owner": "Grace"}),
                ),
                true,
            )
            .await
            .unwrap();

        let mut reasons = Vec::new();
        while reasons.len() < 6 {
            let m = get(&channel, "chimera.bank.worker.dlq", Duration::from_secs(15))
                .await
                .unwrap_or_else(|| {
                    panic!(
                        "{backend}: only {} dead letters: {reasons:?}",
                        reasons.len()
                    )
                });
            let why = reason(&m);
            // Decoded messages keep the trace they were sent in, retried ones too; bytes that
            // were no envelope are kept as they came (sent without a trace here).
            if !why.contains("not a Chimera envelope") {
                let kept = TraceParent::parse(&header(&m, TRACEPARENT));
                assert_eq!(
                    kept.map(|t| t.trace_id),
                    Some(trace.trace_id),
                    "{backend}: the dead letter for {why:?} left the trace"
                );
                assert_eq!(
                    header(&m, "x-tenant"),
                    "blue",
                    "{backend}: the dead letter for {why:?} lost the sender's header"
                );
                let kind = m.delivery.properties.kind().as_ref().map(|k| k.to_string());
                assert_eq!(
                    Some(header(&m, ORIGINAL_ROUTING_KEY)),
                    kind,
                    "{backend}: {why:?} was published with its type as routing key (retries too)"
                );
            }
            reasons.push(why);
            m.delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        assert!(
            get(&channel, "chimera.bank.worker.dlq", Duration::from_secs(1))
                .await
                .is_none(),
            "{backend}: a seventh dead letter (the ignored event?)"
        );
        reasons.sort();
        let expect = [
            "failed 2 time(s); last error: the ledger is down",
            "no handler for command \"account.close\"",
            "not a Chimera envelope",
            "owner must not be empty",
            "the payload does not match the schema of account.open: 5 is not of type \"string\" (at /id)",
            "the payload of event account.tagged cannot be serialized",
        ];
        for e in expect {
            assert!(
                reasons.iter().any(|r| r.contains(e)),
                "{backend}: no dead letter saying {e:?}: {reasons:?}"
            );
        }

        let deadline = Instant::now() + Duration::from_secs(10);
        let owners = loop {
            let rows = sqlx::query("SELECT owner FROM accounts ORDER BY id")
                .fetch_all(db.pool())
                .await
                .unwrap();
            let owners: Vec<String> = rows.iter().map(|r| r.try_get("owner").unwrap()).collect();
            if owners.len() >= 2 || Instant::now() > deadline {
                break owners;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            owners,
            ["Ada", "Grace"],
            "{backend}: a1 once (despite the duplicate), a3 after the bad messages"
        );

        let mut opened = Vec::new();
        while let Some(m) = get(&channel, "audit", Duration::from_secs(3)).await {
            opened.push(
                Envelope::decode(&m.delivery.data).unwrap().data["id"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
            m.delivery.ack(BasicAckOptions::default()).await.unwrap();
            if opened.len() == 2 {
                break;
            }
        }
        assert_eq!(
            opened,
            ["a1", "a3"],
            "{backend}: one account.opened per account, through the outbox"
        );

        // The worker's /metrics counts what it settled, by type and outcome.
        let text = metrics.render();
        for line in [
            r#"chimera_worker_messages_total{kind="account.open",outcome="handled"} 2"#,
            r#"chimera_worker_messages_total{kind="account.open",outcome="duplicate"} 1"#,
            r#"chimera_worker_messages_total{kind="account.flaky",outcome="retried"} 1"#,
            r#"chimera_worker_messages_total{kind="account.close",outcome="dead_lettered"} 1"#,
            r#"chimera_worker_messages_total{kind="ledger.closed",outcome="ignored"} 1"#,
        ] {
            assert!(text.contains(line), "{backend}: no {line} in\n{text}");
        }
        stop_worker.notify_one();
        tokio::time::timeout(Duration::from_secs(10), running)
            .await
            .expect("the worker stops when asked")
            .unwrap();
        stop_relay.notify_one();
        relay.await.unwrap();
        probe.close(200, "done".into()).await.ok();
        connection.close(200, "done".into()).await.ok();
    }
}

/// One batch, dispatched as such: what succeeded commits once, a duplicate inside the batch
/// changes nothing, and a handler that fails after writing and emitting leaves no row and no
/// event behind (the batch reruns with a savepoint per message).
#[tokio::test]
async fn a_batch_commits_what_succeeded_and_undoes_only_what_failed() {
    for backend in ["sqlite", "mariadb"] {
        let tdb = if backend == "sqlite" {
            TestDatabase::sqlite("batch")
        } else {
            TestDatabase::mysql("batch").await
        };
        let vhost = TestVhost::create("batch");
        let endpoint = BrokerEndpoint::new(&vhost.amqp_url, Some(vhost.management_url())).unwrap();
        apply(&endpoint, &plan(&modules_from_yaml(BANK).0))
            .await
            .unwrap();
        let db = Database::connect(&tdb.url, MIGRATIONS).await.unwrap();
        let connection = connect(&vhost.amqp_url, &unique_name("batch"))
            .await
            .unwrap();
        let publisher = Publisher::open(&connection).await.unwrap();
        let send = |kind: &str, data: serde_json::Value| {
            Outgoing::new("chimera.bank.commands", Envelope::new(kind, data))
        };
        let a1 = send(
            "account.open",
            serde_json::json!({"id": "a1", "owner": "Ada"}),
        );
        let batch = [
            a1.clone(),
            a1.clone(),
            send(
                "account.open",
                serde_json::json!({"id": "b1", "owner": "!"}),
            ),
            send(
                "account.open",
                serde_json::json!({"id": "a2", "owner": "Bob"}),
            ),
            send("account.flaky", serde_json::json!({})),
        ];
        publisher.publish_all(&batch, true).await.unwrap();

        let channel = connection.create_channel().await.unwrap();
        channel
            .basic_qos(20, BasicQosOptions::default())
            .await
            .unwrap();
        let mut consumer = channel
            .basic_consume(
                "chimera.bank.worker".into(),
                "batch".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut deliveries = Vec::new();
        while deliveries.len() < batch.len() {
            let next = tokio::time::timeout(Duration::from_secs(10), consumer.next())
                .await
                .expect("the published commands arrive")
                .unwrap()
                .unwrap();
            deliveries.push(next);
        }
        let worker = Worker::new(worker_config(), "bank", "chimera.bank.events")
            .on("account.open", open)
            .on("account.flaky", flaky);
        let outcomes: Vec<Outcome> = worker
            .dispatch_batch(&db, &publisher, &Notify::new(), deliveries)
            .await
            .into_iter()
            .map(|(_, o)| o)
            .collect();
        assert_eq!(
            outcomes,
            [
                Outcome::Handled,
                Outcome::Duplicate,
                Outcome::DeadLettered("refused after writing".into()),
                Outcome::Handled,
                Outcome::Retried(1),
            ],
            "{backend}"
        );
        let ids: Vec<String> = sqlx::query("SELECT id FROM accounts ORDER BY id")
            .fetch_all(db.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| r.try_get("id").unwrap())
            .collect();
        assert_eq!(ids, ["a1", "a2"], "{backend}: b1's row undone");
        let events: Vec<String> = sqlx::query("SELECT body FROM chimera_outbox")
            .fetch_all(db.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| r.try_get::<String, _>("body").unwrap())
            .collect();
        assert_eq!(events.len(), 2, "{backend}: b1's event undone: {events:?}");
        assert!(events.iter().all(|e| !e.contains("\"b1\"")), "{events:?}");

        // The same message in a later batch changes nothing.
        publisher.publish(&a1, true).await.unwrap();
        let again = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("the redelivery arrives")
            .unwrap()
            .unwrap();
        let outcome = worker
            .dispatch_batch(&db, &publisher, &Notify::new(), vec![again])
            .await;
        assert_eq!(outcome[0].1, Outcome::Duplicate, "{backend}");
        connection.close(200, "done".into()).await.ok();
    }
}

/// A database that fails (SQLite locked by another process; MariaDB's pool gone) is a failure
/// that may pass: the batch's messages take the retry ladder with the database's error as
/// reason, instead of returning to the queue forever without an attempt count.
#[tokio::test]
async fn a_batch_whose_database_fails_is_retried_not_requeued() {
    for backend in ["sqlite", "mariadb"] {
        let tdb = if backend == "sqlite" {
            TestDatabase::sqlite("dbfail")
        } else {
            TestDatabase::mysql("dbfail").await
        };
        let vhost = TestVhost::create("dbfail");
        let endpoint = BrokerEndpoint::new(&vhost.amqp_url, Some(vhost.management_url())).unwrap();
        apply(&endpoint, &plan(&modules_from_yaml(BANK).0))
            .await
            .unwrap();
        let db = Database::connect(&tdb.url, MIGRATIONS).await.unwrap();
        // The fault: another connection holds SQLite's write lock; MariaDB's pool is closed.
        let mut lock = None;
        if backend == "sqlite" {
            use sqlx::Connection as _;
            let mut other = sqlx::SqliteConnection::connect(&tdb.url).await.unwrap();
            sqlx::query("BEGIN EXCLUSIVE")
                .execute(&mut other)
                .await
                .unwrap();
            lock = Some(other);
        } else {
            db.pool().close().await;
        }
        let connection = connect(&vhost.amqp_url, &unique_name("dbfail"))
            .await
            .unwrap();
        let publisher = Publisher::open(&connection).await.unwrap();
        let command = Outgoing::new(
            "chimera.bank.commands",
            Envelope::new(
                "account.open",
                serde_json::json!({"id": "a1", "owner": "Ada"}),
            ),
        );
        publisher.publish(&command, true).await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        let mut consumer = channel
            .basic_consume(
                "chimera.bank.worker".into(),
                "dbfail".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("the command arrives")
            .unwrap()
            .unwrap();
        let worker =
            Worker::new(worker_config(), "bank", "chimera.bank.events").on("account.open", open);
        let outcomes = worker
            .dispatch_batch(&db, &publisher, &Notify::new(), vec![delivery])
            .await;
        assert_eq!(outcomes[0].1, Outcome::Retried(1), "{backend}");
        let retry = get(
            &channel,
            "chimera.bank.worker.retry.1",
            Duration::from_secs(5),
        )
        .await
        .expect("the message waits in the retry queue");
        assert!(
            reason(&retry).contains("the database failed"),
            "{backend}: {}",
            reason(&retry)
        );
        assert_eq!(
            header(&retry, chimera_sdk::envelope::ATTEMPT),
            "Some(LongLongInt(2))",
            "{backend}"
        );
        drop(lock);
        connection.close(200, "done".into()).await.ok();
    }
}

/// The broker cancels a worker's consumer when its queue is deleted (as `chimera topology
/// migrate` does while it re-declares a queue): the worker keeps running and consumes again
/// once the queue is back, instead of exiting with its work undone.
#[tokio::test]
async fn a_consumer_the_broker_cancels_consumes_again_when_its_queue_is_back() {
    let tdb = TestDatabase::sqlite("reconsume");
    let vhost = TestVhost::create("reconsume");
    let endpoint = BrokerEndpoint::new(&vhost.amqp_url, Some(vhost.management_url())).unwrap();
    let topology = plan(&modules_from_yaml(BANK).0);
    apply(&endpoint, &topology).await.unwrap();
    let db = Database::connect(&tdb.url, MIGRATIONS).await.unwrap();
    let connection = connect(&vhost.amqp_url, &unique_name("reconsume"))
        .await
        .unwrap();
    let publisher = Publisher::open(&connection).await.unwrap();
    let worker = Arc::new(
        Worker::new(worker_config(), "bank", "chimera.bank.events").on("account.open", open),
    );
    let stop = Arc::new(Notify::new());
    let running = {
        let (worker, db, publisher, stop) =
            (worker.clone(), db.clone(), publisher.clone(), stop.clone());
        let url = vhost.amqp_url.clone();
        tokio::spawn(async move {
            let connection = connect(&url, &unique_name("reconsume-consumer"))
                .await
                .unwrap();
            worker
                .run(
                    db,
                    &connection,
                    publisher,
                    Arc::new(Notify::new()),
                    stop,
                    "bank-worker",
                )
                .await
        })
    };
    let opened = |id: &'static str| {
        let db = db.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM accounts WHERE id = ?")
                    .bind(id)
                    .fetch_one(db.pool())
                    .await
                    .unwrap()
                    .try_get("n")
                    .unwrap();
                if n == 1 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("account {id} was never opened");
        }
    };
    let open_account = |id: &str| {
        Outgoing::new(
            "chimera.bank.commands",
            Envelope::new(
                "account.open",
                serde_json::json!({"id": id, "owner": "Ada"}),
            ),
        )
    };
    publisher.publish(&open_account("a1"), true).await.unwrap();
    opened("a1").await;

    // The queue goes away: the broker cancels the consumer.
    let admin = connection.create_channel().await.unwrap();
    admin
        .queue_delete("chimera.bank.worker".into(), Default::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !running.is_finished(),
        "the worker exited when its consumer was cancelled"
    );
    // The queue is back (declared again with its bindings), and so is the consumer.
    apply(&endpoint, &topology).await.unwrap();
    publisher.publish(&open_account("a2"), true).await.unwrap();
    opened("a2").await;

    stop.notify_one();
    let outcome = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the worker stops when asked")
        .unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
    connection.close(200, "done".into()).await.ok();
}
