//! The SDK's broker against a real RabbitMQ: pipelined confirms, unroutable messages, and
//! recovery after the connection is cut (consumption resumes with its prefetch re-applied).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chimera_sdk::broker::{BrokerError, Outgoing, Publisher, connect, consume};
use chimera_sdk::envelope::Envelope;
use chimera_testenv::{TestVhost, unique_name};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

async fn declare_queue(url: &str, queue: &str) {
    let c = lapin::Connection::connect(url, Default::default())
        .await
        .unwrap();
    let ch = c.create_channel().await.unwrap();
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    c.close(200, "declared".into()).await.ok();
}

#[tokio::test]
async fn consumption_survives_a_cut_connection_with_its_prefetch() {
    let vhost = TestVhost::create("sdk-recover");
    declare_queue(&vhost.amqp_url, "work").await;
    let name = unique_name("worker");
    let connection = connect(&vhost.amqp_url, &name).await.unwrap();
    let publisher = Publisher::open(&connection).await.unwrap();
    let messages: Vec<Outgoing> = (0..500)
        .map(|i| {
            let mut m = Outgoing::new("", Envelope::new("job.run", serde_json::json!({"n": i})));
            m.routing_key = "work".into();
            m
        })
        .collect();
    publisher.publish_all(&messages, true).await.unwrap();

    let (channel, mut consumer) = consume(&connection, "work", 7, "test-consumer")
        .await
        .unwrap();
    let mut seen = BTreeSet::new();
    let mut cut = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < 500 {
        assert!(
            Instant::now() < deadline,
            "only {} of 500 messages consumed",
            seen.len()
        );
        let Ok(Some(next)) = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await
        else {
            panic!("consumer stalled after {} messages", seen.len());
        };
        match next {
            Ok(delivery) => {
                let envelope = Envelope::decode(&delivery.data).unwrap();
                seen.insert(envelope.id);
                delivery.ack(BasicAckOptions::default()).await.ok();
            }
            Err(error) => channel.wait_for_recovery(error).await.unwrap(),
        }
        if seen.len() == 100 && !cut {
            // The broker lists a new connection after a moment.
            let listed = Instant::now() + Duration::from_secs(15);
            while vhost.close_connections_named(&name) == 0 {
                assert!(
                    Instant::now() < listed,
                    "the worker's connection is never listed by name"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            cut = true;
        }
    }
    assert!(cut);
    let ids: BTreeSet<_> = messages.iter().map(|m| m.envelope.id).collect();
    assert_eq!(seen, ids, "every message consumed, none lost");

    // The recovered consumer has its prefetch again (statistics lag a few seconds).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let consumers = vhost.management_get(&format!("/api/consumers/{}", vhost.name));
        let prefetch = consumers
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["consumer_tag"] == "test-consumer")
            .and_then(|c| c["prefetch_count"].as_u64());
        if prefetch == Some(7) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "recovered consumer's prefetch is {prefetch:?}, expected 7"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    connection.close(200, "done".into()).await.ok();
}

#[tokio::test]
async fn a_message_no_queue_takes_is_an_error_not_a_silent_loss() {
    let vhost = TestVhost::create("sdk-unroutable");
    let connection = connect(&vhost.amqp_url, &unique_name("publisher"))
        .await
        .unwrap();
    let publisher = Publisher::open(&connection).await.unwrap();
    let mut m = Outgoing::new("", Envelope::new("job.run", serde_json::json!({})));
    m.routing_key = "nobody-listens".into();
    let err = publisher.publish(&m, true).await.unwrap_err();
    assert!(matches!(err, BrokerError::Unroutable { .. }), "{err}");
    assert!(err.to_string().contains("nobody-listens"));
    connection.close(200, "done".into()).await.ok();
}
