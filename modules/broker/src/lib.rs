//! A connection to RabbitMQ for heads and the control plane: automatic recovery (connection, channels, QoS and
//! consumers come back after a broker restart or a dropped connection), publishing with
//! publisher confirms, pipelined.
#![forbid(unsafe_code)]

use futures::future::try_join_all;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};

use chimera_contract::envelope::{ATTEMPT, CONTENT_TYPE, Envelope, TRACEPARENT, TraceParent};

/// Broker failures.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// An AMQP operation failed.
    #[error("AMQP {action} failed: {cause}")]
    Amqp {
        /// What was being done.
        action: &'static str,
        /// What lapin said.
        cause: lapin::Error,
    },
    /// The broker refused a message (queue full with reject-publish, ...).
    #[error("the broker refused the message {id} ({kind})")]
    Nacked {
        /// Message id.
        id: String,
        /// Message type.
        kind: String,
    },
    /// A batch could not commit; its messages go back to the queue.
    #[error("the batch transaction failed; the message returns to the queue")]
    Requeued,
    /// A mandatory message matched no binding.
    #[error(
        "no queue is bound for {routing_key:?} on exchange {exchange:?}: the message was returned"
    )]
    Unroutable {
        /// Exchange.
        exchange: String,
        /// Routing key.
        routing_key: String,
    },
}

fn amqp(action: &'static str) -> impl FnOnce(lapin::Error) -> BrokerError {
    move |cause| BrokerError::Amqp { action, cause }
}

/// Opens a connection that recovers by itself, named after the head in the broker's
/// connection list (`connection_name`).
pub async fn connect(url: &str, name: &str) -> Result<Connection, BrokerError> {
    let properties = ConnectionProperties::default()
        .with_connection_name(LongString::from(name))
        .enable_auto_recover();
    Connection::connect(url, properties)
        .await
        .map_err(amqp("connect"))
}

/// Where and how to publish one envelope.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// The exchange (`chimera.<domain>.events` or `.commands`; `""` for a queue by name).
    pub exchange: String,
    /// Routing key; the envelope's type unless sending to a queue by name.
    pub routing_key: String,
    /// The message.
    pub envelope: Envelope,
    /// Trace context to carry.
    pub trace: Option<TraceParent>,
    /// Attempt number (1 unless retrying).
    pub attempt: u32,
    /// Extra headers (reason, original routing key, ...).
    pub headers: Vec<(String, String)>,
}

impl Outgoing {
    /// An envelope for `exchange`, routed by its type, first attempt.
    pub fn new(exchange: impl Into<String>, envelope: Envelope) -> Self {
        Self {
            exchange: exchange.into(),
            routing_key: envelope.kind.clone(),
            envelope,
            trace: None,
            attempt: 1,
            headers: Vec::new(),
        }
    }

    /// The AMQP properties of the contract: message id, type, content type, persistent, headers.
    pub fn properties(&self) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from(ATTEMPT),
            AMQPValue::LongLongInt(i64::from(self.attempt)),
        );
        if let Some(trace) = self.trace {
            headers.insert(
                ShortString::from(TRACEPARENT),
                AMQPValue::LongString(LongString::from(trace.to_string())),
            );
        }
        for (k, v) in &self.headers {
            headers.insert(
                ShortString::from(k.as_str()),
                AMQPValue::LongString(LongString::from(v.as_str())),
            );
        }
        BasicProperties::default()
            .with_message_id(ShortString::from(self.envelope.id.to_string()))
            .with_type(ShortString::from(self.envelope.kind.as_str()))
            .with_content_type(ShortString::from(CONTENT_TYPE))
            .with_delivery_mode(2)
            .with_timestamp(self.envelope.occurred_at.as_second().max(0) as u64)
            .with_headers(headers)
    }
}

/// A channel in confirm mode that publishes envelopes.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    /// Opens a confirming channel on `connection`.
    pub async fn open(connection: &Connection) -> Result<Self, BrokerError> {
        let channel = connection
            .create_channel()
            .await
            .map_err(amqp("open a channel"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(amqp("enable publisher confirms"))?;
        Ok(Self { channel })
    }

    /// Publishes one message and waits for the broker's confirm. With `mandatory`, a message
    /// no queue is bound for is an error instead of vanishing.
    pub async fn publish(&self, message: &Outgoing, mandatory: bool) -> Result<(), BrokerError> {
        self.publish_all(std::slice::from_ref(message), mandatory)
            .await
    }

    /// Publishes messages back to back, then waits for all the confirms (pipelined: one round
    /// trip for the batch, not one per message).
    pub async fn publish_all(
        &self,
        messages: &[Outgoing],
        mandatory: bool,
    ) -> Result<(), BrokerError> {
        let options = BasicPublishOptions {
            mandatory,
            ..BasicPublishOptions::default()
        };
        let mut pending = Vec::with_capacity(messages.len());
        for m in messages {
            let body = m.envelope.encode();
            let confirm = self
                .channel
                .basic_publish(
                    m.exchange.as_str().into(),
                    m.routing_key.as_str().into(),
                    options,
                    &body,
                    m.properties(),
                )
                .await
                .map_err(amqp("publish"))?;
            pending.push(confirm);
        }
        let confirmations = try_join_all(pending)
            .await
            .map_err(amqp("await a publisher confirm"))?;
        for (m, confirmation) in messages.iter().zip(confirmations) {
            match confirmation {
                Confirmation::Ack(None) | Confirmation::NotRequested => {}
                Confirmation::Ack(Some(_)) => {
                    return Err(BrokerError::Unroutable {
                        exchange: m.exchange.clone(),
                        routing_key: m.routing_key.clone(),
                    });
                }
                Confirmation::Nack(_) => {
                    return Err(BrokerError::Nacked {
                        id: m.envelope.id.to_string(),
                        kind: m.envelope.kind.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

impl Publisher {
    /// Publishes raw bytes to `exchange` with the routing key `queue` (a direct exchange that
    /// routes by queue name, or `""` for the default exchange), keeping `properties` and adding
    /// `headers`: for parking a message that is not a valid envelope exactly as it came.
    pub async fn publish_raw(
        &self,
        exchange: &str,
        queue: &str,
        body: &[u8],
        properties: &BasicProperties,
        headers: &[(&str, &str)],
    ) -> Result<(), BrokerError> {
        let mut table = properties.headers().clone().unwrap_or_default();
        for (k, v) in headers {
            table.insert(
                ShortString::from(*k),
                AMQPValue::LongString(LongString::from(*v)),
            );
        }
        let properties = properties.clone().with_headers(table).with_delivery_mode(2);
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirmation = self
            .channel
            .basic_publish(exchange.into(), queue.into(), options, body, properties)
            .await
            .map_err(amqp("publish"))?
            .await
            .map_err(amqp("await a publisher confirm"))?;
        match confirmation {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => Err(BrokerError::Unroutable {
                exchange: exchange.to_owned(),
                routing_key: queue.to_owned(),
            }),
            Confirmation::Nack(_) => Err(BrokerError::Nacked {
                id: "<raw>".to_owned(),
                kind: "<raw>".to_owned(),
            }),
        }
    }
}

/// Starts consuming `queue` on a new channel with `prefetch` unacknowledged messages at most.
/// Recovery re-applies the QoS and the consumer.
pub async fn consume(
    connection: &Connection,
    queue: &str,
    prefetch: u16,
    tag: &str,
) -> Result<(Channel, Consumer), BrokerError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(amqp("open a channel"))?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(amqp("set the prefetch"))?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(amqp("start consuming"))?;
    Ok((channel, consumer))
}
