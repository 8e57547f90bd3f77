//! The declarer: makes a RabbitMQ vhost hold a plan. Reads the actual state through the
//! management API, computes the diff, then over one AMQP channel declares what is missing and
//! unbinds what left the plan. Queues whose arguments differ are never redeclared (that would
//! be a 406 that closes the channel, forever): they are reported instead.

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind as AmqpExchangeKind};

use super::amqp::{Connections, amqp_error, arguments, bind, connect, unbind};
use std::time::Duration;

use super::management::{BrokerError, ManagementClient};
use super::snapshots::Snapshots;
use chimera_core::topology::diff::{TopologyDiff, diff};
use chimera_core::topology::plan::{ExchangeKind, TopologyPlan};
use chimera_core::topology::report::{ApplyReport, ReleaseReport};
use chimera_core::topology::state::{ActualQueue, BrokerEndpoint, BrokerState};

/// Reads the vhost and returns what separates it from `plan`.
pub async fn current_diff(
    endpoint: &BrokerEndpoint,
    plan: &TopologyPlan,
) -> Result<TopologyDiff, BrokerError> {
    let state = ManagementClient::new(endpoint)?.state().await?;
    Ok(diff(plan, &state))
}

/// Makes the vhost hold `plan`: idempotent, repairs drift, never redeclares a conflicting queue.
pub async fn apply(
    endpoint: &BrokerEndpoint,
    plan: &TopologyPlan,
) -> Result<ApplyReport, BrokerError> {
    let diff = current_diff(endpoint, plan).await?;
    let mut report = ApplyReport {
        diff,
        ..ApplyReport::default()
    };
    if report.diff.is_converged() {
        return Ok(report);
    }
    let connection = connect(endpoint).await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(amqp_error("opening a channel"))?;
    let outcome = apply_diff(&channel, &mut report).await;
    let _ = connection
        .close(200, "chimera topology applied".into())
        .await;
    outcome.map(|()| report)
}

/// [`apply`], comparing with the vhost's shared snapshot (read again when older than
/// `max_age`) instead of reading the whole vhost, and folding what it declared back in.
/// Declares on a channel of the kept connection in `connections`.
pub async fn apply_cached(
    endpoint: &BrokerEndpoint,
    plan: &TopologyPlan,
    snapshots: &Snapshots,
    connections: &Connections,
    max_age: Duration,
) -> Result<ApplyReport, BrokerError> {
    let diff = diff(plan, &snapshots.view(endpoint, plan, max_age).await?);
    let applied = apply_found(endpoint, connections, diff).await;
    match &applied {
        Ok(report) => snapshots.record(endpoint, &report.diff).await,
        // Part of the diff may have been applied: read the vhost again next time.
        Err(_) => snapshots.invalidate(endpoint).await,
    }
    applied
}

/// Applies `diff`, found against what the vhost holds, on a channel of the kept connection.
async fn apply_found(
    endpoint: &BrokerEndpoint,
    connections: &Connections,
    diff: TopologyDiff,
) -> Result<ApplyReport, BrokerError> {
    let mut report = ApplyReport {
        diff,
        ..ApplyReport::default()
    };
    if report.diff.is_converged() {
        return Ok(report);
    }
    let channel = connections.channel(endpoint).await?;
    let outcome = apply_diff(&channel, &mut report).await;
    if channel.status().connected() {
        let _ = channel.close(200, "chimera topology applied".into()).await;
    }
    outcome.map(|()| report)
}

async fn apply_diff(channel: &Channel, report: &mut ApplyReport) -> Result<(), BrokerError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    for exchange in &report.diff.missing_exchanges {
        let kind = match exchange.kind {
            ExchangeKind::Topic => AmqpExchangeKind::Topic,
            ExchangeKind::Direct => AmqpExchangeKind::Direct,
        };
        channel
            .exchange_declare(
                exchange.name.as_str().into(),
                kind,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(amqp_error(format!("declaring exchange {}", exchange.name)))?;
        report.exchanges_declared += 1;
    }
    for queue in &report.diff.missing_queues {
        channel
            .queue_declare(
                queue.name.as_str().into(),
                QueueDeclareOptions::durable(),
                arguments(queue),
            )
            .await
            .map_err(amqp_error(format!("declaring queue {}", queue.name)))?;
        report.queues_declared += 1;
    }
    for b in &report.diff.missing_bindings {
        bind(channel, &b.destination, &b.source, &b.routing_key).await?;
        report.bindings_created += 1;
    }
    for b in &report.diff.stale_bindings {
        unbind(channel, &b.destination, &b.source, &b.routing_key).await?;
        report.bindings_removed += 1;
    }
    Ok(())
}

/// Why a module's queues were not deleted.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// Queues still hold work and deletion was not forced.
    #[error("queues still hold unread messages ({}): drain them, switch to deletionPolicy Retain, or set the annotation chimera.dev/force-delete=true", .0.join(", "))]
    Unread(Vec<String>),
    /// The broker could not be reached or refused.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// Queues that hold (or may hold) messages, with why. Ready counts come from a passive declare
/// (exact, now); unacknowledged counts from the management API, which reports them seconds
/// late: an unreported count on a queue with consumers counts as unread.
async fn unread_queues(channel: &Channel, queues: &[&ActualQueue]) -> Vec<String> {
    let mut unread = Vec::new();
    for queue in queues {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let declared = channel
            .queue_declare(queue.name.as_str().into(), passive, FieldTable::default())
            .await;
        let (ready, consumers) = match declared {
            Ok(q) => (u64::from(q.message_count()), u64::from(q.consumer_count())),
            Err(e) => {
                unread.push(format!("{}: could not be inspected ({e})", queue.name));
                continue;
            }
        };
        let unacked = match queue.messages_unacknowledged {
            Some(n) => n,
            None if consumers > 0 => {
                unread.push(format!(
                    "{}: {consumers} consumer(s), unacknowledged count not reported yet",
                    queue.name
                ));
                continue;
            }
            None => 0,
        };
        if ready + unacked > 0 {
            unread.push(format!(
                "{}: {ready} ready, {unacked} unacknowledged",
                queue.name
            ));
        }
    }
    unread
}

/// Releases a deleted module's topology. `Retain` keeps its queues and their messages but
/// unbinds them from other domains' exchanges, so nothing new piles up unread. `Delete` removes
/// its queues, but only when none holds a message (ready or unacknowledged), unless `force`.
/// Exchanges stay: other domains may still be bound to them, and they hold nothing.
///
/// `state` is what the vhost holds of `owned` (its queues and the bindings into them: a
/// snapshot's view does). Whether a queue holds messages is asked of the broker itself.
pub async fn release(
    endpoint: &BrokerEndpoint,
    state: &BrokerState,
    owned: &TopologyPlan,
    domain: &str,
    delete_queues: bool,
    force: bool,
) -> Result<ReleaseReport, ReleaseError> {
    let queues: Vec<&str> = owned.queues.iter().map(|q| q.name.as_str()).collect();
    let own_exchanges = chimera_contract::names::own_exchanges(domain);
    let existing: Vec<&ActualQueue> = state
        .queues
        .iter()
        .filter(|q| queues.contains(&q.name.as_str()))
        .collect();
    let foreign_bindings: Vec<_> = state
        .bindings
        .iter()
        .filter(|b| b.destination_type == "queue" && queues.contains(&b.destination.as_str()))
        .filter(|b| !b.source.is_empty() && !own_exchanges.contains(&b.source))
        .collect();
    let mut report = ReleaseReport::default();
    if existing.is_empty() || (!delete_queues && foreign_bindings.is_empty()) {
        return Ok(report);
    }
    let connection = connect(endpoint).await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(amqp_error("opening a channel"))?;
    let outcome: Result<(), ReleaseError> = async {
        if delete_queues && !force {
            let unread = unread_queues(&channel, &existing).await;
            if !unread.is_empty() {
                return Err(ReleaseError::Unread(unread));
            }
        }
        if delete_queues {
            for queue in &existing {
                // if_empty: the broker itself refuses when a message arrived since the check
                // (classic queues only: quorum queues do not support it).
                let options = lapin::options::QueueDeleteOptions {
                    if_empty: !force && !queue.is_quorum(),
                    ..Default::default()
                };
                channel
                    .queue_delete(queue.name.as_str().into(), options)
                    .await
                    .map_err(amqp_error(format!("deleting queue {}", queue.name)))?;
                report.queues_deleted.push(queue.name.clone());
            }
        } else {
            for b in &foreign_bindings {
                unbind(&channel, &b.destination, &b.source, &b.routing_key).await?;
                report.bindings_removed += 1;
            }
        }
        Ok(())
    }
    .await;
    let _ = connection
        .close(200, "chimera topology released".into())
        .await;
    outcome.map(|()| report)
}
