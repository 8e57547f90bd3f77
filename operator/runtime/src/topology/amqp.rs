//! The AMQP side of the topology manager, shared by the declarer and the migration: connect,
//! declare arguments, bind and unbind, and lapin errors as [`BrokerError`]s.

use lapin::options::QueueBindOptions;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties};

use super::management::BrokerError;
use chimera_core::topology::plan::{ArgValue, PlannedQueue};
use chimera_core::topology::state::{BrokerEndpoint, redact};

/// Maps a lapin error to a [`BrokerError`] saying what was being done.
pub(crate) fn amqp_error(action: impl Into<String>) -> impl FnOnce(lapin::Error) -> BrokerError {
    let action = action.into();
    move |cause| BrokerError::Amqp { action, cause }
}

/// A planned queue's arguments as AMQP declares them.
pub(crate) fn arguments(queue: &PlannedQueue) -> FieldTable {
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

/// Binds `queue` to `exchange` with `key`.
pub(crate) async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    key: &str,
) -> Result<(), BrokerError> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp_error(format!("binding {queue} to {exchange} ({key})")))
}

/// Removes the binding of `queue` to `exchange` with `key`.
pub(crate) async fn unbind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    key: &str,
) -> Result<(), BrokerError> {
    channel
        .queue_unbind(
            queue.into(),
            exchange.into(),
            key.into(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp_error(format!(
            "unbinding {queue} from {exchange} ({key})"
        )))
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
