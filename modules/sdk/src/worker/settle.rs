//! Settling a handled message per the head contract: nothing more (committed or a
//! duplicate), to its retry queue with the attempt raised, or to the dead-letter queue with the
//! reason; then the ack, only once what replaces the message is confirmed.

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};

use super::{HandleResult, HandlerError, Outcome, Prepared, Worker, header_str};
use crate::broker::{BrokerError, Outgoing, Publisher};
use lapin::types::AMQPValue;

use crate::envelope::{ATTEMPT, Envelope, ORIGINAL_ROUTING_KEY, REASON, TRACEPARENT, TraceParent};

impl Worker {
    /// Settles the outcome of a handled message: retry, dead-letter, or nothing more to do.
    pub(super) async fn conclude(
        &self,
        publisher: &Publisher,
        p: &Prepared,
        result: Result<HandleResult, HandlerError>,
    ) -> Result<Outcome, BrokerError> {
        match result {
            Ok(HandleResult::Committed) => Ok(Outcome::Handled),
            Ok(HandleResult::Duplicate) => Ok(Outcome::Duplicate),
            Err(HandlerError::Reject(reason)) => {
                self.dead_letter(
                    publisher,
                    &p.delivery,
                    Some((p.envelope.as_ref(), Some(p.trace))),
                    p.attempt,
                    &reason,
                )
                .await
            }
            Err(HandlerError::Retry(reason)) => {
                if let Some(n) = self.config.retry_after(p.attempt) {
                    let mut retry = Outgoing::new(
                        &*self.config.failures_exchange,
                        Envelope::clone(&p.envelope),
                    );
                    retry.routing_key = self.config.retry_queue(n);
                    retry.attempt = u32::try_from(p.attempt + 1).unwrap_or(u32::MAX);
                    retry.trace = Some(p.trace);
                    retry.headers = carried_headers(&p.delivery);
                    retry.headers.push((REASON.to_owned(), reason));
                    // The retry queue sends it back under the worker queue's name: the
                    // routing key it came with is kept here, for the dlq after the last try.
                    retry.headers.push((
                        ORIGINAL_ROUTING_KEY.to_owned(),
                        original_routing_key(&p.delivery),
                    ));
                    publisher.publish(&retry, true).await?;
                    Ok(Outcome::Retried(n))
                } else {
                    let reason = format!("failed {} time(s); last error: {reason}", p.attempt);
                    self.dead_letter(
                        publisher,
                        &p.delivery,
                        Some((p.envelope.as_ref(), Some(p.trace))),
                        p.attempt,
                        &reason,
                    )
                    .await
                }
            }
        }
    }

    /// Publishes the message to the dead-letter queue with `reason`: a decoded one re-encoded
    /// with its trace (the one its handling ran in), undecodable bytes as they came.
    pub(super) async fn dead_letter(
        &self,
        publisher: &Publisher,
        delivery: &Delivery,
        envelope: Option<(&Envelope, Option<TraceParent>)>,
        attempt: i64,
        reason: &str,
    ) -> Result<Outcome, BrokerError> {
        tracing::warn!(reason, "dead-lettering a message");
        let original = original_routing_key(delivery);
        match envelope {
            Some((envelope, trace)) => {
                let mut parked = Outgoing::new(&self.config.failures_exchange, envelope.clone());
                parked.trace = trace;
                parked.headers = carried_headers(delivery);
                parked.routing_key = self.config.dead_letter_queue.clone();
                parked.attempt = u32::try_from(attempt).unwrap_or(u32::MAX);
                parked.headers.push((REASON.to_owned(), reason.to_owned()));
                parked
                    .headers
                    .push((ORIGINAL_ROUTING_KEY.to_owned(), original));
                publisher.publish(&parked, true).await?;
            }
            // Undecodable: keep the bytes exactly as they came.
            None => {
                publisher
                    .publish_raw(
                        &self.config.failures_exchange,
                        &self.config.dead_letter_queue,
                        &delivery.data,
                        &delivery.properties,
                        &[(REASON, reason), (ORIGINAL_ROUTING_KEY, &original)],
                    )
                    .await?;
            }
        }
        Ok(Outcome::DeadLettered(reason.to_owned()))
    }
}

/// The sender's own text headers (a correlation id, a tenant), carried to the retry and the
/// dead letter; the contract's headers are set afresh, and the broker's (`x-death`) dropped.
fn carried_headers(delivery: &Delivery) -> Vec<(String, String)> {
    let Some(headers) = delivery.properties.headers().as_ref() else {
        return Vec::new();
    };
    headers
        .inner()
        .iter()
        .filter(|(k, _)| {
            let k = k.as_str();
            ![TRACEPARENT, ATTEMPT, REASON, ORIGINAL_ROUTING_KEY].contains(&k)
                && !k.starts_with("x-death")
                && !k.starts_with("x-first-death")
                && !k.starts_with("x-last-death")
        })
        .filter_map(|(k, v)| match v {
            AMQPValue::LongString(s) => Some((k.to_string(), s.to_string())),
            AMQPValue::ShortString(s) => Some((k.to_string(), s.to_string())),
            _ => None,
        })
        .collect()
}

/// The routing key the message was first published with: kept in a header through retries.
fn original_routing_key(delivery: &Delivery) -> String {
    header_str(delivery, ORIGINAL_ROUTING_KEY).unwrap_or_else(|| delivery.routing_key.to_string())
}

/// Acks a settled message; nacks (requeue) one whose settlement failed, so it comes back.
pub(super) async fn settle(delivery: &Delivery, outcome: Result<Outcome, BrokerError>) -> Outcome {
    let settled = match &outcome {
        Ok(_) => delivery.acker.ack(BasicAckOptions::default()).await,
        Err(_) => {
            delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
        }
    };
    if let Err(error) = settled {
        tracing::warn!(%error, "could not settle a delivery; the broker will redeliver it");
    }
    outcome.unwrap_or_else(|error| {
        tracing::warn!(%error, "message returned to the queue");
        Outcome::Requeued
    })
}
