//! The worker runtime: consume the worker queue, dispatch each message by type to its handler
//! inside a database transaction (with the inbox row and the events it emits), and settle it
//! per the head contract:
//!
//! - success: commit, then ack;
//! - a message seen before (inbox): ack, nothing changes;
//! - [`HandlerError::Retry`]: to retry queue n with the attempt count raised, then ack; after
//!   the last attempt, to the dead-letter queue with the reason;
//! - [`HandlerError::Reject`], an undecodable message, or a type with no handler: to the
//!   dead-letter queue at once, with the reason.
//!
//! Nothing is acknowledged before what replaces it (commit, retry or dead-letter publish) is
//! confirmed, so a crash at any point redelivers instead of losing; the inbox makes the
//! redelivery harmless. A worker never crash-loops on one bad message.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions};
use lapin::types::AMQPValue;
use tokio::sync::Notify;

use crate::broker::{BrokerError, Publisher, consume};
use crate::config::WorkerConfig;
use crate::db::{Database, DbError, WriteTransaction};
use crate::envelope::{ATTEMPT, Envelope, TRACEPARENT, TraceParent};
use crate::http::{HttpMetrics, MessageLabels};
use crate::{inbox, outbox};

mod handler;
mod settle;

use settle::settle;

pub use handler::{Context, Handler, HandlerError};

/// What happened to one delivery (for metrics, logs and tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Handled and committed.
    Handled,
    /// Seen before: acknowledged without change.
    Duplicate,
    /// Sent to retry queue n.
    Retried(usize),
    /// Parked in the dead-letter queue, with the reason.
    DeadLettered(String),
    /// Returned to the queue (its settlement failed, or another consumer recorded it at the same
    /// moment): it will be redelivered.
    Requeued,
    /// An event the queue is bound to that the worker has no handler for (a wildcard
    /// subscription's newer event): acknowledged, nothing done.
    Ignored,
}

/// The worker: handlers by message type, and where messages go.
pub struct Worker {
    handlers: HashMap<String, Arc<dyn Handler>>,
    /// The payload schemas by message type (`CHIMERA_SCHEMAS`).
    validators: HashMap<String, Arc<jsonschema::Validator>>,
    metrics: Option<HttpMetrics>,
    consumer_name: String,
    config: WorkerConfig,
    events_exchange: Arc<str>,
}

/// Worker failures that stop it.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

fn header_i64(delivery: &Delivery, key: &str) -> Option<i64> {
    match delivery.properties.headers().as_ref()?.inner().get(key)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::LongString(s) => s.to_string().parse().ok(),
        _ => None,
    }
}

fn header_str(delivery: &Delivery, key: &str) -> Option<String> {
    match delivery.properties.headers().as_ref()?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

impl Worker {
    /// A worker for `config`, named `consumer_name` in the inbox (the domain, usually).
    pub fn new(
        config: WorkerConfig,
        consumer_name: impl Into<String>,
        events_exchange: impl Into<String>,
    ) -> Self {
        let mut validators = HashMap::new();
        for (kind, schema) in &config.schemas {
            match jsonschema::validator_for(schema) {
                Ok(v) => {
                    validators.insert(kind.clone(), Arc::new(v));
                }
                // The configuration read from the environment refuses such a schema; one
                // built in code that does not compile validates nothing, and says so.
                Err(error) => {
                    tracing::error!(%kind, %error, "the payload schema does not compile: not validating")
                }
            }
        }
        Self {
            handlers: HashMap::new(),
            validators,
            metrics: None,
            consumer_name: consumer_name.into(),
            config,
            events_exchange: Arc::from(events_exchange.into()),
        }
    }

    /// Counts settled messages and times batches in `metrics` (the head's `/metrics`).
    pub fn with_metrics(mut self, metrics: HttpMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Handles messages of type `kind` with `handler`.
    pub fn on(mut self, kind: &str, handler: impl Handler) -> Self {
        self.handlers.insert(kind.to_owned(), Arc::new(handler));
        self
    }

    /// Handles the deliveries at hand in one database transaction (group commit: one commit
    /// for the batch, a savepoint per message so a failing handler undoes only its own work),
    /// then settles each. If the batch's transaction fails, every message of it takes the retry
    /// ladder (nothing of it committed); if another consumer recorded one of its messages at the
    /// same moment, the batch goes back to the queue, where the redelivery is a duplicate.
    pub async fn dispatch_batch(
        &self,
        db: &Database,
        publisher: &Publisher,
        relay: &Notify,
        deliveries: Vec<Delivery>,
    ) -> Vec<(String, Outcome)> {
        let started = std::time::Instant::now();
        let labelled = self.settle_batch(db, publisher, relay, deliveries).await;
        if let Some(metrics) = &self.metrics {
            metrics
                .worker_batch
                .observe(started.elapsed().as_secs_f64());
            for (kind, outcome) in &labelled {
                let outcome = match outcome {
                    Outcome::Handled => "handled",
                    Outcome::Duplicate => "duplicate",
                    Outcome::Retried(_) => "retried",
                    Outcome::DeadLettered(_) => "dead_lettered",
                    Outcome::Requeued => "requeued",
                    Outcome::Ignored => "ignored",
                };
                metrics
                    .worker_messages
                    .get_or_create(&MessageLabels {
                        kind: kind.clone(),
                        outcome: outcome.to_owned(),
                    })
                    .inc();
            }
        }
        labelled
    }

    async fn settle_batch(
        &self,
        db: &Database,
        publisher: &Publisher,
        relay: &Notify,
        deliveries: Vec<Delivery>,
    ) -> Vec<(String, Outcome)> {
        let mut outcomes = Vec::with_capacity(deliveries.len());
        let mut prepared = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match self.prepare(delivery) {
                Ok(p) => prepared.push(p),
                Err(u) if u.ignored => {
                    tracing::debug!(kind = %kind_of(&u.delivery), "no handler for a subscribed event: ignored");
                    let outcome = settle(&u.delivery, Ok(Outcome::Ignored)).await;
                    outcomes.push((kind_of(&u.delivery), outcome));
                }
                Err(u) => {
                    let outcome = self
                        .dead_letter(
                            publisher,
                            &u.delivery,
                            u.envelope.as_ref().map(|e| {
                                let trace = header_str(&u.delivery, TRACEPARENT)
                                    .as_deref()
                                    .and_then(TraceParent::parse);
                                (e, trace)
                            }),
                            u.attempt,
                            &u.reason,
                        )
                        .await;
                    outcomes.push((kind_of(&u.delivery), settle(&u.delivery, outcome).await));
                }
            }
        }
        if prepared.is_empty() {
            return outcomes;
        }
        let results = match self.handle_batch(db, &prepared).await {
            Ok((results, emitted)) => {
                if emitted > 0 {
                    relay.notify_one();
                }
                results
            }
            Err(error) if !error.is_unique_violation() => {
                // The database failed (down, locked, a commit refused): a failure that may
                // pass, so each message takes the retry ladder like a handler's `retry`
                // (nothing of the batch committed). Requeueing instead would loop on a
                // database that stays down, without attempts, reason or end.
                tracing::warn!(%error, messages = prepared.len(), "batch transaction failed; its messages are retried");
                let reason = format!("the database failed: {error}");
                prepared
                    .iter()
                    .map(|_| Err(HandlerError::retry(reason.clone())))
                    .collect()
            }
            Err(error) => {
                tracing::warn!(%error, messages = prepared.len(), "another consumer handled a message of the batch at the same time; the batch returns to the queue");
                for p in &prepared {
                    outcomes.push((
                        p.envelope.kind.clone(),
                        settle(&p.delivery, Err(BrokerError::Requeued)).await,
                    ));
                }
                return outcomes;
            }
        };
        let mut concluded = Vec::with_capacity(prepared.len());
        for (p, result) in prepared.iter().zip(results) {
            concluded.push(self.conclude(publisher, p, result).await);
        }
        // Everything settled: one `multiple` ack for the batch (the deliveries of a channel are
        // numbered in order, and the ones dead-lettered above are already acked).
        if concluded.iter().all(Result::is_ok)
            && let Some(last) = prepared.iter().max_by_key(|p| p.delivery.delivery_tag)
        {
            let ack = BasicAckOptions { multiple: true };
            if let Err(error) = last.delivery.acker.ack(ack).await {
                tracing::warn!(%error, "could not ack the batch; the broker will redeliver it");
            }
            outcomes.extend(
                prepared
                    .iter()
                    .zip(concluded)
                    .map(|(p, o)| (p.envelope.kind.clone(), o.unwrap_or(Outcome::Requeued))),
            );
            return outcomes;
        }
        for (p, outcome) in prepared.iter().zip(concluded) {
            outcomes.push((p.envelope.kind.clone(), settle(&p.delivery, outcome).await));
        }
        outcomes
    }

    /// Reads a delivery's envelope, attempt and trace and finds its handler; what cannot be
    /// handled comes back with the reason to dead-letter it.
    fn prepare(&self, delivery: Delivery) -> Result<Prepared, Box<Unhandleable>> {
        let attempt = header_i64(&delivery, ATTEMPT).unwrap_or(1).max(1);
        let trace = header_str(&delivery, TRACEPARENT)
            .as_deref()
            .and_then(TraceParent::parse)
            .unwrap_or_else(TraceParent::new_root);
        let envelope = match Envelope::decode(&delivery.data) {
            Ok(e) => e,
            Err(e) => {
                return Err(Box::new(Unhandleable {
                    delivery,
                    envelope: None,
                    attempt,
                    reason: e.to_string(),
                    ignored: false,
                }));
            }
        };
        let Some(handler) = self.handlers.get(&envelope.kind).cloned() else {
            let ignored = self.config.subscribed_event(&envelope.kind);
            let reason = if self.config.commands.contains(&envelope.kind) {
                format!("no handler for command {:?}", envelope.kind)
            } else {
                format!("no handler for message type {:?}", envelope.kind)
            };
            return Err(Box::new(Unhandleable {
                delivery,
                envelope: Some(envelope),
                attempt,
                reason,
                ignored,
            }));
        };
        if let Some(reason) = self.schema_violation(&envelope) {
            return Err(Box::new(Unhandleable {
                delivery,
                envelope: Some(envelope),
                attempt,
                reason,
                ignored: false,
            }));
        }
        Ok(Prepared {
            delivery,
            attempt,
            trace,
            envelope: Arc::new(envelope),
            handler,
        })
    }

    /// Runs the handlers of a batch in one transaction, then records the inbox rows and writes
    /// the emitted events with one statement each. The first pass takes no savepoints; if a
    /// handler fails, that pass is rolled back and the batch runs again with a savepoint around
    /// each message, so a failing handler undoes only its own work. Failures are rare, so most
    /// batches pay two statements plus the handlers' own.
    async fn handle_batch(
        &self,
        db: &Database,
        prepared: &[Prepared],
    ) -> Result<(Vec<Result<HandleResult, HandlerError>>, usize), DbError> {
        if let Some(done) = self.handle_batch_once(db, prepared, false).await? {
            return Ok(done);
        }
        tracing::debug!(
            messages = prepared.len(),
            "a handler failed; running the batch again with a savepoint per message"
        );
        // With savepoints a pass always completes (a failing handler is undone on its own).
        self.handle_batch_once(db, prepared, true)
            .await?
            .ok_or(DbError::Closed)
    }

    /// One pass over the batch. Without savepoints, returns None (after rolling back) as soon
    /// as a handler fails.
    async fn handle_batch_once(
        &self,
        db: &Database,
        prepared: &[Prepared],
        savepoints: bool,
    ) -> Result<Option<(Vec<Result<HandleResult, HandlerError>>, usize)>, DbError> {
        let q = |what: &'static str| move |cause| DbError::Query { what, cause };
        let mut tx = db.begin().await?;
        let ids: Vec<String> = prepared.iter().map(|p| p.envelope.id.to_string()).collect();
        let mut seen = inbox::handled(&mut tx, &self.consumer_name, &ids).await?;
        let mut results = Vec::with_capacity(prepared.len());
        let mut handled: Vec<(&str, &str)> = Vec::with_capacity(prepared.len());
        let mut events = Vec::new();
        for (p, id) in prepared.iter().zip(&ids) {
            // Handled before, or twice in this batch (a publisher that sent it twice).
            if !seen.insert(id.clone()) {
                results.push(Ok(HandleResult::Duplicate));
                continue;
            }
            if savepoints {
                sqlx::query("SAVEPOINT chimera_message")
                    .execute(&mut **tx)
                    .await
                    .map_err(q("savepoint"))?;
            }
            let last_attempt = self.config.retry_after(p.attempt).is_none();
            let span = handling_span(p, &self.config.queue);
            let mut ctx = Context {
                envelope: Arc::clone(&p.envelope),
                attempt: p.attempt,
                last_attempt,
                tx,
                trace: crate::telemetry::continue_trace(&span, p.trace),
                events_exchange: Arc::clone(&self.events_exchange),
                events: Vec::new(),
            };
            let result =
                tracing::Instrument::instrument(p.handler.handle(&mut ctx), span.clone()).await;
            if let Err(e) = &result {
                use tracing_opentelemetry::OpenTelemetrySpanExt;
                span.set_status(opentelemetry::trace::Status::error(e.to_string()));
            }
            tx = ctx.tx;
            match result {
                Ok(()) => {
                    if savepoints {
                        sqlx::query("RELEASE SAVEPOINT chimera_message")
                            .execute(&mut **tx)
                            .await
                            .map_err(q("release"))?;
                    }
                    events.extend(ctx.events);
                    handled.push((id.as_str(), p.envelope.kind.as_str()));
                    results.push(Ok(HandleResult::Committed));
                }
                Err(_) if !savepoints => {
                    tx.rollback().await.map_err(q("rollback"))?;
                    return Ok(None);
                }
                Err(e) => {
                    undo(&mut tx).await?;
                    results.push(Err(e));
                }
            }
        }
        // A unique violation here means another consumer handled one of these messages at
        // the same time: nothing commits, the batch returns to the queue, and its redelivery
        // finds them in the inbox.
        inbox::record_all(&mut tx, &self.consumer_name, &handled).await?;
        outbox::enqueue_all(&mut tx, &events).await?;
        tx.commit().await.map_err(q("commit"))?;
        Ok(Some((results, events.len())))
    }

    /// Consumes the worker queue until `stop` is notified, then stops consuming, finishes the
    /// messages in flight and returns.
    ///
    /// A queue missing at start is an error (the head exits and is restarted). A consumer the
    /// broker cancels later (its queue deleted, or moved by `chimera topology migrate`) is
    /// consumed again once the queue is back, with a backoff, until `stop`.
    pub async fn run(
        self: Arc<Self>,
        db: Database,
        connection: &lapin::Connection,
        publisher: Publisher,
        relay: Arc<Notify>,
        stop: Arc<Notify>,
        consumer_tag: &str,
    ) -> Result<(), WorkerError> {
        let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
        let watcher = tokio::spawn(async move {
            stop.notified().await;
            let _ = stopping_tx.send(true);
        });
        let stopped = || *stopping.borrow();
        let wait_for_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let mut consumed = consume(
            connection,
            &self.config.queue,
            self.config.prefetch,
            consumer_tag,
        )
        .await;
        let (mut backoff, mut consumed_before) = (RECONSUME_FIRST, false);
        loop {
            match consumed {
                Ok((channel, consumer)) => {
                    (backoff, consumed_before) = (RECONSUME_FIRST, true);
                    let tag = consumer_tag.to_owned();
                    let cancel_channel = channel.clone();
                    let stop = wait_for_stop(stopping.clone());
                    let stopper = tokio::spawn(async move {
                        stop.await;
                        // The consumer stream ends after the cancel; deliveries already
                        // received finish.
                        let _ = cancel_channel
                            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                            .await;
                    });
                    self.consume_until_cancelled(&db, &publisher, &relay, &channel, consumer)
                        .await;
                    stopper.abort();
                    if stopped() {
                        break;
                    }
                    tracing::warn!(
                        queue = %self.config.queue,
                        "the broker cancelled the consumer (its queue deleted or moved): consuming again when it is back"
                    );
                }
                Err(error) if !consumed_before => {
                    watcher.abort();
                    return Err(error.into());
                }
                Err(error) => {
                    tracing::warn!(%error, queue = %self.config.queue, ?backoff, "cannot consume yet");
                    backoff = (backoff * 2).min(RECONSUME_MAX);
                }
            }
            tokio::select! {
                () = wait_for_stop(stopping.clone()) => break,
                () = tokio::time::sleep(backoff) => {}
            }
            consumed = consume(
                connection,
                &self.config.queue,
                self.config.prefetch,
                consumer_tag,
            )
            .await;
        }
        watcher.abort();
        Ok(())
    }

    /// Dispatches what the consumer delivers, batch by batch, until its stream ends (cancelled
    /// by `stop` or by the broker).
    async fn consume_until_cancelled(
        &self,
        db: &Database,
        publisher: &Publisher,
        relay: &Notify,
        channel: &lapin::Channel,
        consumer: lapin::Consumer,
    ) {
        // What the broker has delivered so far forms the next batch (up to the prefetch).
        let mut batches = consumer.ready_chunks(usize::from(self.config.prefetch));
        while let Some(items) = batches.next().await {
            let mut deliveries = Vec::with_capacity(items.len());
            for item in items {
                match item {
                    Ok(delivery) => deliveries.push(delivery),
                    Err(error) => {
                        if let Err(error) = channel.wait_for_recovery(error).await {
                            tracing::error!(%error, "consumer channel did not recover");
                        }
                    }
                }
            }
            if !deliveries.is_empty() {
                self.dispatch_batch(db, publisher, relay, deliveries).await;
            }
        }
    }
}

impl Worker {
    /// Why the payload of `envelope` does not match its type's schema (the first few errors,
    /// each with where in `data`), if it has one and does not.
    fn schema_violation(&self, envelope: &Envelope) -> Option<String> {
        let validator = self.validators.get(&envelope.kind)?;
        let errors: Vec<String> = validator
            .iter_errors(&envelope.data)
            .take(3)
            .map(|e| {
                let at = e.instance_path().to_string();
                if at.is_empty() {
                    e.to_string()
                } else {
                    format!("{e} (at {at})")
                }
            })
            .collect();
        (!errors.is_empty()).then(|| {
            format!(
                "the payload does not match the schema of {}: {}",
                envelope.kind,
                errors.join("; ")
            )
        })
    }
}

/// First wait before consuming again after the broker cancelled the consumer; doubles up to
/// [`RECONSUME_MAX`] while the queue stays away.
const RECONSUME_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
const RECONSUME_MAX: std::time::Duration = std::time::Duration::from_secs(30);

enum HandleResult {
    Committed,
    Duplicate,
}

/// A delivery that cannot be handled (undecodable, or no handler), with why.
struct Unhandleable {
    delivery: Delivery,
    envelope: Option<Envelope>,
    attempt: i64,
    reason: String,
    /// A subscribed event without a handler: acknowledged, not dead-lettered.
    ignored: bool,
}

/// A delivery ready for its handler.
struct Prepared {
    delivery: Delivery,
    attempt: i64,
    trace: TraceParent,
    envelope: Arc<Envelope>,
    handler: Arc<dyn Handler>,
}

/// The type a delivery says it is (for metrics), before it is decoded.
fn kind_of(delivery: &Delivery) -> String {
    delivery
        .properties
        .kind()
        .as_ref()
        .map(|k| k.to_string())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Undoes one message's work inside the batch transaction.
async fn undo(tx: &mut WriteTransaction) -> Result<(), DbError> {
    for statement in [
        "ROLLBACK TO SAVEPOINT chimera_message",
        "RELEASE SAVEPOINT chimera_message",
    ] {
        sqlx::query(statement)
            .execute(&mut ***tx)
            .await
            .map_err(|cause| DbError::Query {
                what: "roll back to the savepoint",
                cause,
            })?;
    }
    Ok(())
}

/// The span of one message's handling: a log span with the message's trace id, and an OTel
/// consumer span (messaging semantic conventions) when traces are exported.
fn handling_span(p: &Prepared, queue: &str) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let span = tracing::info_span!(
        "handle",
        kind = %p.envelope.kind,
        id = %p.envelope.id,
        attempt = p.attempt,
        trace_id = %format!("{:032x}", p.trace.trace_id),
        otel.name = %format!("handle {}", p.envelope.kind),
        otel.kind = "consumer",
    );
    // (OTel attributes only: the log line has the kind and id already)
    span.set_attribute("messaging.system", "rabbitmq");
    span.set_attribute("messaging.operation.type", "process");
    span.set_attribute("messaging.destination.name", queue.to_owned());
    span.set_attribute("messaging.message.id", p.envelope.id.to_string());
    span.set_attribute("messaging.message.type", p.envelope.kind.clone());
    span
}
