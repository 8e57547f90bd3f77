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
/// One AMQP connection per broker URL, kept between declares: each declare opens (and
/// closes) a channel on it, so a thousand modules do not mean a thousand connections. A 406
/// closes only its channel; a lost connection is opened again by the next declare.
#[derive(Default)]
pub struct Connections {
    by_url: std::sync::Mutex<
        std::collections::HashMap<String, std::sync::Arc<tokio::sync::Mutex<Option<Connection>>>>,
    >,
}

impl Connections {
    /// A new channel on `endpoint`'s connection.
    pub async fn channel(&self, endpoint: &BrokerEndpoint) -> Result<lapin::Channel, BrokerError> {
        let cell = {
            let mut by_url = self.by_url.lock().unwrap_or_else(|p| p.into_inner());
            std::sync::Arc::clone(by_url.entry(endpoint.amqp_url.clone()).or_default())
        };
        let mut connection = cell.lock().await;
        let channel = match connection.as_ref() {
            Some(c) if c.status().connected() => c.create_channel().await,
            _ => {
                let fresh = connect(endpoint).await?;
                let channel = fresh.create_channel().await;
                *connection = Some(fresh);
                channel
            }
        };
        channel.map_err(amqp_error("opening a channel"))
    }
}

pub async fn connect(endpoint: &BrokerEndpoint) -> Result<Connection, BrokerError> {
    Connection::connect(&endpoint.amqp_url, ConnectionProperties::default())
        .await
        .map_err(amqp_error(format!(
            "connection to {}",
            redact(&endpoint.amqp_url)
        )))
}
