//! The declarer: makes a RabbitMQ vhost hold a plan. Reads the actual state through the
//! management API, computes the diff, then over one AMQP channel declares what is missing and
//! unbinds what left the plan. Queues whose arguments differ are never redeclared (that would
//! be a 406 that closes the channel, forever): they are reported instead.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind as AmqpExchangeKind};
use serde::Serialize;

use super::broker::{BrokerEndpoint, BrokerError, ManagementClient, redact};
use super::diff::{TopologyDiff, diff};
use super::plan::{ArgValue, ExchangeKind, PlannedQueue, TopologyPlan};

/// What an apply did.
#[derive(Serialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// The differences found before acting (what was done, and the conflicts left alone).
    pub diff: TopologyDiff,
    /// Exchanges declared.
    pub exchanges_declared: usize,
    /// Queues declared.
    pub queues_declared: usize,
    /// Bindings created.
    pub bindings_created: usize,
    /// Bindings removed.
    pub bindings_removed: usize,
}

fn amqp_error(action: impl Into<String>) -> impl FnOnce(lapin::Error) -> BrokerError {
    let action = action.into();
    move |cause| BrokerError::Amqp { action, cause }
}

fn arguments(queue: &PlannedQueue) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in &queue.arguments {
        let value = match value {
            ArgValue::Str(s) => AMQPValue::LongString(LongString::from(s.as_str())),
            ArgValue::Int(i) => AMQPValue::LongLongInt(*i),
        };
        table.insert(ShortString::from(key.as_str()), value);
    }
    table
}

/// Opens an AMQP connection to the endpoint.
pub async fn connect(endpoint: &BrokerEndpoint) -> Result<Connection, BrokerError> {
    Connection::connect(&endpoint.amqp_url, ConnectionProperties::default())
        .await
        .map_err(amqp_error(format!(
            "connection to {}",
            redact(&endpoint.amqp_url)
        )))
}

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
    for binding in &report.diff.missing_bindings {
        channel
            .queue_bind(
                binding.destination.as_str().into(),
                binding.source.as_str().into(),
                binding.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp_error(format!(
                "binding {} to {} ({})",
                binding.destination, binding.source, binding.routing_key
            )))?;
        report.bindings_created += 1;
    }
    for binding in &report.diff.stale_bindings {
        channel
            .queue_unbind(
                binding.destination.as_str().into(),
                binding.source.as_str().into(),
                binding.routing_key.as_str().into(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp_error(format!(
                "unbinding {} from {} ({})",
                binding.destination, binding.source, binding.routing_key
            )))?;
        report.bindings_removed += 1;
    }
    Ok(())
}
