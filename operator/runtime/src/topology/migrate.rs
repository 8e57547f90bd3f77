//! Safe migration of a queue whose immutable arguments changed (type, TTL, length, ...).
//!
//! RabbitMQ cannot change a queue's declaration arguments in place, and the queue's name is
//! part of the head contract, so the queue is rebuilt under the same name through a temporary
//! queue `<name>.migrating`, without losing a message:
//!
//! 1. declare `<name>.migrating` with the new arguments and give it the queue's bindings, then
//!    unbind the old queue: new messages now land in the temporary queue;
//! 2. move every message of the old queue to the temporary one (publish with confirm, then ack;
//!    workers may keep consuming the old queue meanwhile), and wait until it holds nothing,
//!    ready or unacknowledged;
//! 3. delete the old queue (only if empty), declare it again with the new arguments and its
//!    bindings, unbind the temporary queue;
//! 4. move the temporary queue's messages back, and delete it.
//!
//! While `<name>.migrating` exists the declarer leaves that queue's bindings alone (see
//! `diff`), so an operator resync cannot bind both queues at once. A message published in the
//! instant both are bound may be delivered twice: handlers are idempotent by message id (the
//! inbox of the head contract).

use std::time::{Duration, Instant};

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};

use super::amqp::{amqp_error, arguments, bind, connect, unbind};
use super::management::{BrokerError, ManagementClient};
use chimera_core::topology::diff::diff;
use chimera_core::topology::plan::{PlannedBinding, PlannedQueue, TopologyPlan};
use chimera_core::topology::report::{MIGRATING_SUFFIX, QueueMigration};
use chimera_core::topology::state::{ActualQueue, BrokerEndpoint};

/// Slightly more than RabbitMQ's default statistics interval (5 s).
const STATS_INTERVAL: Duration = Duration::from_millis(5500);

/// Why a migration stopped.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A queue did not empty in time (a consumer holds messages without settling them).
    #[error(
        "queue {queue} still holds {messages} message(s) after {waited:?}; the migration stopped at a safe point and can be run again"
    )]
    NotDraining {
        /// The queue.
        queue: String,
        /// Messages left.
        messages: u64,
        /// How long it waited.
        waited: Duration,
    },
}

/// Migrates every queue of `plan` whose arguments differ on the broker (or only `only`).
/// `drain_timeout` bounds each wait for a queue to empty.
pub async fn migrate(
    endpoint: &BrokerEndpoint,
    plan: &TopologyPlan,
    only: Option<&str>,
    drain_timeout: Duration,
) -> Result<Vec<QueueMigration>, MigrationError> {
    let management = ManagementClient::new(endpoint)?;
    let state = management.state().await?;
    let differences = diff(plan, &state);
    // Queues whose arguments differ, and those an interrupted migration left half done.
    let mut pending: Vec<String> = differences
        .conflicting_queues()
        .into_iter()
        .map(str::to_owned)
        .collect();
    pending.extend(differences.migrating.iter().cloned());
    let targets: Vec<&PlannedQueue> = plan
        .queues
        .iter()
        .filter(|q| pending.contains(&q.name) && only.is_none_or(|o| o == q.name))
        .collect();
    let mut done = Vec::new();
    if targets.is_empty() {
        return Ok(done);
    }
    let connection = connect(endpoint).await?;
    let mut outcome = Ok(());
    for queue in targets {
        let bindings: Vec<&PlannedBinding> = plan
            .bindings
            .iter()
            .filter(|b| b.destination == queue.name)
            .collect();
        let existing = state.queues.iter().find(|q| q.name == queue.name);
        match migrate_queue(
            &connection,
            &management,
            queue,
            existing,
            &bindings,
            drain_timeout,
        )
        .await
        {
            Ok(m) => done.push(m),
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    let _ = connection
        .close(200, "chimera topology migrated".into())
        .await;
    outcome.map(|()| done)
}

async fn bind_all(
    channel: &Channel,
    queue: &str,
    bindings: &[&PlannedBinding],
) -> Result<(), BrokerError> {
    for b in bindings {
        bind(channel, queue, &b.source, &b.routing_key).await?;
    }
    Ok(())
}

async fn unbind_all(
    channel: &Channel,
    queue: &str,
    bindings: &[&PlannedBinding],
) -> Result<(), BrokerError> {
    for b in bindings {
        unbind(channel, queue, &b.source, &b.routing_key).await?;
    }
    Ok(())
}

/// A channel with publisher confirms on.
async fn confirming_channel(connection: &Connection) -> Result<Channel, BrokerError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(amqp_error("opening a channel"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(amqp_error("enabling publisher confirms"))?;
    Ok(channel)
}

async fn migrate_queue(
    connection: &Connection,
    management: &ManagementClient,
    queue: &PlannedQueue,
    existing: Option<&ActualQueue>,
    bindings: &[&PlannedBinding],
    drain_timeout: Duration,
) -> Result<QueueMigration, MigrationError> {
    let name = queue.name.as_str();
    let temporary = format!("{name}{MIGRATING_SUFFIX}");
    let new_args = arguments(queue);
    let channel = &confirming_channel(connection).await?;

    channel
        .queue_declare(
            temporary.as_str().into(),
            QueueDeclareOptions::durable(),
            new_args.clone(),
        )
        .await
        .map_err(amqp_error(format!("declaring {temporary}")))?;
    bind_all(channel, &temporary, bindings).await?;
    // A resumed migration may find the old queue already gone (deleted in step 3).
    let mut moved_out = 0;
    if let Some(old) = existing {
        let old_is_quorum = old.is_quorum();
        unbind_all(channel, name, bindings).await?;
        moved_out = drain(channel, management, name, &temporary, drain_timeout).await?;
        channel
            .queue_delete(
                name.into(),
                QueueDeleteOptions {
                    // Drained above; classic queues also get the broker's own check.
                    if_empty: !old_is_quorum,
                    ..QueueDeleteOptions::default()
                },
            )
            .await
            .map_err(amqp_error(format!("deleting the old {name}")))?;
    }
    // A channel that routed to the old queue caches its queue type (RabbitMQ 3.10): publishing
    // to the rebuilt queue of another type through it fails. Continue on a fresh one.
    let _ = channel.close(200, "old queue gone".into()).await;
    let channel = &confirming_channel(connection).await?;
    channel
        .queue_declare(name.into(), QueueDeclareOptions::durable(), new_args)
        .await
        .map_err(amqp_error(format!("declaring the new {name}")))?;
    bind_all(channel, name, bindings).await?;
    unbind_all(channel, &temporary, bindings).await?;
    let moved_back = drain(channel, management, &temporary, name, drain_timeout).await?;
    channel
        .queue_delete(
            temporary.as_str().into(),
            QueueDeleteOptions {
                if_empty: !queue.is_quorum(),
                ..QueueDeleteOptions::default()
            },
        )
        .await
        .map_err(amqp_error(format!("deleting {temporary}")))?;
    Ok(QueueMigration {
        queue: name.to_owned(),
        moved_out,
        moved_back,
    })
}

/// Moves every message of `from` to `to` (confirm, then ack) until `from` holds nothing ready
/// and its consumers have settled what they hold.
async fn drain(
    channel: &Channel,
    management: &ManagementClient,
    from: &str,
    to: &str,
    timeout: Duration,
) -> Result<u64, MigrationError> {
    let started = Instant::now();
    let mut moved = 0;
    let mut settled_since: Option<Instant> = None;
    loop {
        while let Some(message) = channel
            .basic_get(from.into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(amqp_error(format!("reading {from}")))?
        {
            let delivery = message.delivery;
            let mut headers = delivery.properties.headers().clone().unwrap_or_default();
            if !headers
                .inner()
                .contains_key(chimera_contract::envelope::ORIGINAL_ROUTING_KEY)
            {
                headers.insert(
                    ShortString::from(chimera_contract::envelope::ORIGINAL_ROUTING_KEY),
                    AMQPValue::LongString(LongString::from(delivery.routing_key.as_str())),
                );
            }
            let properties: BasicProperties = delivery.properties.clone().with_headers(headers);
            channel
                .basic_publish(
                    "".into(),
                    to.into(),
                    BasicPublishOptions::default(),
                    &delivery.data,
                    properties,
                )
                .await
                .map_err(amqp_error(format!("moving a message to {to}")))?
                .await
                .map_err(amqp_error(format!("confirming a message moved to {to}")))?;
            delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .map_err(amqp_error(format!("acking a message of {from}")))?;
            moved += 1;
        }
        // Messages consumers hold come back when they nack, or are gone when they ack.
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let q = channel
            .queue_declare(from.into(), passive, FieldTable::default())
            .await
            .map_err(amqp_error(format!("inspecting {from}")))?;
        if q.message_count() == 0 {
            if q.consumer_count() == 0 {
                return Ok(moved);
            }
            // Workers still consume: only the management API knows what they hold, and it
            // reports seconds late, so it must say "nothing unacknowledged" twice, a stats
            // interval apart, after the queue ran dry.
            let held = management.queue(from).await?.messages_unacknowledged;
            let now = Instant::now();
            match (held, settled_since) {
                (Some(0), Some(since)) if now.duration_since(since) >= STATS_INTERVAL => {
                    return Ok(moved);
                }
                (Some(0), None) => settled_since = Some(now),
                (Some(0), Some(_)) => {}
                _ => settled_since = None,
            }
        } else {
            settled_since = None;
        }
        if started.elapsed() > timeout {
            return Err(MigrationError::NotDraining {
                queue: from.to_owned(),
                messages: u64::from(q.message_count()),
                waited: started.elapsed(),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
