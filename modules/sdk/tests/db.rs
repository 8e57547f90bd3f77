//! The SDK's database layer on both real databases: SQLite files and MariaDB.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use chimera_sdk::broker::{Publisher, connect};
use chimera_sdk::db::{Database, Migration};
use chimera_sdk::envelope::{Envelope, TraceParent};
use chimera_sdk::inbox;
use chimera_sdk::outbox::{RelaySettings, count, enqueue, relay_once};
use chimera_testenv::{TestDatabase, TestVhost, unique_name};
use futures::StreamExt;
use lapin::ExchangeKind;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use sqlx::Row;

const MODULE: &[Migration] = &[Migration {
    version: 100,
    description: "accounts",
    sql: "CREATE TABLE accounts (id VARCHAR(64) PRIMARY KEY, balance BIGINT NOT NULL)",
}];

async fn databases() -> Vec<(&'static str, TestDatabase)> {
    vec![
        ("sqlite", TestDatabase::sqlite("sdk-db")),
        ("mariadb", TestDatabase::mysql("sdk_db").await),
    ]
}

#[tokio::test]
async fn migrations_run_once_and_the_inbox_refuses_a_second_delivery() {
    for (backend, tdb) in databases().await {
        let db = Database::connect(&tdb.url, MODULE)
            .await
            .unwrap_or_else(|e| panic!("{backend}: {e}"));
        // Connecting again re-runs nothing (and does not fail on existing tables).
        let db2 = Database::connect(&tdb.url, MODULE)
            .await
            .unwrap_or_else(|e| panic!("{backend}: {e}"));
        db2.ping().await.unwrap();

        let envelope = Envelope::new("account.open", serde_json::json!({"id": "a1"}));
        for (round, expected_balance) in [(1, 10), (2, 10)] {
            let mut tx = db.pool().begin().await.unwrap();
            let first = inbox::record(&mut tx, "accounts-worker", &envelope)
                .await
                .unwrap();
            assert_eq!(first, round == 1, "{backend}: round {round}");
            if first {
                sqlx::query("INSERT INTO accounts (id, balance) VALUES (?, ?)")
                    .bind("a1")
                    .bind(10i64)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
            } else {
                tx.rollback().await.unwrap();
            }
            let balance: i64 = sqlx::query("SELECT balance FROM accounts WHERE id = ?")
                .bind("a1")
                .fetch_one(db.pool())
                .await
                .unwrap()
                .try_get("balance")
                .unwrap();
            assert_eq!(
                balance, expected_balance,
                "{backend}: a redelivery changes nothing twice"
            );
        }
        // Another consumer of the same message handles it independently.
        let mut tx = db.pool().begin().await.unwrap();
        assert!(
            inbox::record(&mut tx, "audit-worker", &envelope)
                .await
                .unwrap(),
            "{backend}"
        );
        tx.rollback().await.unwrap();
    }
}

/// The `chimera.bank.events` exchange and an `audit` queue bound to every event.
async fn declare_audit(vhost: &TestVhost) {
    let c = lapin::Connection::connect(&vhost.amqp_url, Default::default())
        .await
        .unwrap();
    let ch = c.create_channel().await.unwrap();
    ch.exchange_declare(
        "chimera.bank.events".into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "audit".into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "audit".into(),
        "chimera.bank.events".into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    c.close(200, "declared".into()).await.ok();
}

#[tokio::test]
async fn the_outbox_publishes_what_was_committed_in_order_and_nothing_else() {
    let vhost = TestVhost::create("sdk-outbox");
    declare_audit(&vhost).await;
    let connection = connect(&vhost.amqp_url, &unique_name("relay"))
        .await
        .unwrap();
    let publisher = Publisher::open(&connection).await.unwrap();
    for (backend, tdb) in databases().await {
        let db = Database::connect(&tdb.url, MODULE).await.unwrap();
        // A rolled back transaction leaves nothing to publish.
        let mut tx = db.pool().begin().await.unwrap();
        enqueue(
            &mut tx,
            "chimera.bank.events",
            &Envelope::new("account.ghost", serde_json::json!({})),
            None,
        )
        .await
        .unwrap();
        tx.rollback().await.unwrap();
        let trace = TraceParent::new_root();
        let mut sent = Vec::new();
        for i in 0..250 {
            let mut tx = db.pool().begin().await.unwrap();
            let e = Envelope::new(
                "account.opened",
                serde_json::json!({"n": i, "backend": backend}),
            );
            enqueue(&mut tx, "chimera.bank.events", &e, Some(trace.child()))
                .await
                .unwrap();
            tx.commit().await.unwrap();
            sent.push(e.id);
        }
        assert_eq!(count(db.pool(), "pending").await.unwrap(), 250);
        let first = relay_once(&db, &publisher, RelaySettings::default())
            .await
            .unwrap();
        let second = relay_once(&db, &publisher, RelaySettings::default())
            .await
            .unwrap();
        assert_eq!((first.sent, second.sent), (200, 50), "{backend}");
        assert_eq!(count(db.pool(), "sent").await.unwrap(), 250);
        assert_eq!(
            relay_once(&db, &publisher, RelaySettings::default())
                .await
                .unwrap()
                .sent,
            0,
            "{backend}: nothing twice"
        );

        let c = lapin::Connection::connect(&vhost.amqp_url, Default::default())
            .await
            .unwrap();
        let ch = c.create_channel().await.unwrap();
        let mut consumer = ch
            .basic_consume(
                "audit".into(),
                "t".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut received = Vec::new();
        while received.len() < 250 {
            let d = tokio::time::timeout(Duration::from_secs(5), consumer.next())
                .await
                .expect("relayed events arrive")
                .unwrap()
                .unwrap();
            let e = Envelope::decode(&d.data).unwrap();
            assert_ne!(
                e.kind, "account.ghost",
                "{backend}: a rolled back event was published"
            );
            received.push(e.id);
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
        assert_eq!(
            received, sent,
            "{backend}: every committed event, in commit order"
        );
        c.close(200, "done".into()).await.ok();
    }
    connection.close(200, "done".into()).await.ok();
}

/// Ids of the events waiting in `audit`, consumed until it stays empty for a second.
async fn drain_audit(vhost: &TestVhost) -> Vec<uuid::Uuid> {
    let c = lapin::Connection::connect(&vhost.amqp_url, Default::default())
        .await
        .unwrap();
    let ch = c.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            "audit".into(),
            "drain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut ids = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(1), consumer.next()).await
    {
        ids.push(Envelope::decode(&d.data).unwrap().id);
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    c.close(200, "drained".into()).await.ok();
    ids
}

/// Without a fault, an event is published once, also when the worker runs several replicas
/// whose relays share the database (one file under `chimera up`: it published 50 of 176
/// events twice when each relay read the same pending rows).
#[tokio::test]
async fn relays_of_several_replicas_publish_each_row_once() {
    let vhost = TestVhost::create("sdk-outbox-replicas");
    declare_audit(&vhost).await;
    let connection = connect(&vhost.amqp_url, &unique_name("relays"))
        .await
        .unwrap();
    let (pa, pb) = (
        Publisher::open(&connection).await.unwrap(),
        Publisher::open(&connection).await.unwrap(),
    );
    for (backend, tdb) in databases().await {
        // Three handles on one database, as three processes have.
        let a = Database::connect(&tdb.url, MODULE).await.unwrap();
        let b = Database::connect(&tdb.url, MODULE).await.unwrap();
        let writer = Database::connect(&tdb.url, MODULE).await.unwrap();
        let mut sent = Vec::new();
        let mut tx = a.begin().await.unwrap();
        for i in 0..300 {
            let e = Envelope::new("account.opened", serde_json::json!({"n": i}));
            enqueue(&mut tx, "chimera.bank.events", &e, None)
                .await
                .unwrap();
            sent.push(e.id);
        }
        tx.commit().await.unwrap();
        // Another process's transaction holds the write lock a moment while both relays read
        // the due rows: both see all of them, and both reach the broker before either can
        // mark a row sent.
        let held = writer.begin().await.unwrap();
        let release = async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            held.commit().await.unwrap();
        };
        let relay = |db: Database, publisher: &Publisher| {
            let publisher = publisher.clone();
            async move {
                let mut sent = 0;
                for _ in 0..3 {
                    sent += relay_once(&db, &publisher, RelaySettings::default())
                        .await
                        .unwrap_or_else(|e| panic!("{backend}: {e}"))
                        .sent;
                }
                sent
            }
        };
        let (by_a, by_b, ()) = tokio::join!(relay(a.clone(), &pa), relay(b.clone(), &pb), release);
        assert_eq!(
            by_a + by_b,
            300,
            "{backend}: rows marked sent ({by_a} + {by_b})"
        );
        assert_eq!(count(a.pool(), "sent").await.unwrap(), 300, "{backend}");
        let mut received = drain_audit(&vhost).await;
        let published = received.len();
        received.sort();
        received.dedup();
        sent.sort();
        assert_eq!(
            (published, received),
            (300, sent),
            "{backend}: every row published once"
        );
    }
    connection.close(200, "done".into()).await.ok();
}

/// A database with one outbox row for an exchange that does not exist.
async fn unsendable_row(tdb: &TestDatabase) -> Database {
    let db = Database::connect(&tdb.url, &[]).await.unwrap();
    let mut tx = db.pool().begin().await.unwrap();
    enqueue(
        &mut tx,
        "chimera.missing.events",
        &Envelope::new("x.happened", serde_json::json!({})),
        None,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    db
}

#[tokio::test]
async fn rows_that_cannot_be_sent_are_retried_then_dead() {
    let vhost = TestVhost::create("sdk-outbox-dead");
    let tdb = TestDatabase::sqlite("sdk-dead");
    let db = unsendable_row(&tdb).await;
    let settings = RelaySettings {
        max_attempts: 2,
        backoff: Duration::ZERO,
        ..RelaySettings::default()
    };
    for expected in [(0, 1, 0), (0, 0, 1)] {
        // Publishing to a missing exchange closes the channel: each round gets a fresh one.
        let connection = connect(&vhost.amqp_url, &unique_name("relay"))
            .await
            .unwrap();
        let publisher = Publisher::open(&connection).await.unwrap();
        let r = relay_once(&db, &publisher, settings).await.unwrap();
        assert_eq!((r.sent, r.retried, r.dead), expected);
        connection.close(200, "done".into()).await.ok();
    }
    assert_eq!(count(db.pool(), "dead").await.unwrap(), 1);
    let error: String = sqlx::query("SELECT last_error FROM chimera_outbox")
        .fetch_one(db.pool())
        .await
        .unwrap()
        .try_get("last_error")
        .unwrap();
    assert!(
        error.contains("chimera.missing.events")
            || error.contains("NOT_FOUND")
            || error.contains("404"),
        "{error}"
    );
}

#[tokio::test]
async fn the_relay_reports_rows_not_sent_yet_as_the_autoscaler_reads_them() {
    use chimera_sdk::http::HttpMetrics;
    use chimera_sdk::outbox::run_relay;
    use std::sync::Arc;
    use tokio::sync::Notify;

    let vhost = TestVhost::create("sdk-outbox-gauge");
    let tdb = TestDatabase::sqlite("sdk-gauge");
    // The row fails and waits an hour for its retry.
    let db = unsendable_row(&tdb).await;
    let connection = connect(&vhost.amqp_url, &unique_name("relay"))
        .await
        .unwrap();
    let publisher = Publisher::open(&connection).await.unwrap();
    let metrics = HttpMetrics::new();
    let settings = RelaySettings {
        backoff: Duration::from_secs(3600),
        ..RelaySettings::default()
    };
    let (wake, stop) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let relay = tokio::spawn(run_relay(
        db.clone(),
        publisher,
        settings,
        wake,
        stop.clone(),
        Duration::from_millis(100),
        metrics.outbox_pending.clone(),
    ));
    // As the autoscaler reads it (an error while the relay has not counted yet).
    let read = || chimera_core::autoscale::exposition::outbox_pending(&metrics.render());
    let until = |want: f64| async move {
        for _ in 0..100 {
            if read() == Ok(want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the gauge stayed at {:?} (wanted {want})", read());
    };
    until(1.0).await;
    let attempts: i64 = sqlx::query("SELECT attempts FROM chimera_outbox")
        .fetch_one(db.pool())
        .await
        .unwrap()
        .try_get("attempts")
        .unwrap();
    assert_eq!(attempts, 1, "counted while waiting for its retry");
    // A dead row is not waiting to be sent.
    sqlx::query("UPDATE chimera_outbox SET status = 'dead'")
        .execute(db.pool())
        .await
        .unwrap();
    until(0.0).await;
    stop.notify_one();
    relay.await.unwrap();
    connection.close(200, "done".into()).await.ok();
}
