//! What a handler sees and returns: its [`Context`] (the message, the batch's transaction, the
//! events it emits), [`HandlerError`] (retry or reject), and the [`Handler`] trait.

use std::sync::Arc;

use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use sqlx::{Any, Transaction};

use crate::db::{DbError, WriteTransaction};
use crate::envelope::{Envelope, TraceParent};
use crate::outbox::PendingEvent;

/// Why a handler did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Might work later (a dependency was down): retried through the retry queues.
    #[error("{0}")]
    Retry(String),
    /// Will never work (invalid command, illegal state change): dead-lettered at once.
    #[error("{0}")]
    Reject(String),
}

impl HandlerError {
    /// A failure that may pass later (a dependency down, a row not there yet): retried.
    pub fn retry(reason: impl Into<String>) -> Self {
        Self::Retry(reason.into())
    }

    /// A message that will never work (invalid, illegal in the current state): dead-lettered at
    /// once with `reason`.
    pub fn reject(reason: impl Into<String>) -> Self {
        Self::Reject(reason.into())
    }
}

impl From<DbError> for HandlerError {
    fn from(e: DbError) -> Self {
        Self::Retry(e.to_string())
    }
}

impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        Self::Retry(format!("database: {e}"))
    }
}

/// What a handler works with: the message, the open transaction, and a way to emit events.
pub struct Context {
    pub(super) envelope: Arc<Envelope>,
    pub(super) attempt: i64,
    pub(super) last_attempt: bool,
    pub(super) tx: WriteTransaction,
    /// This handling's trace context (its span is the parent of the events it emits).
    pub(super) trace: TraceParent,
    pub(super) events_exchange: Arc<str>,
    /// Events emitted so far, written to the outbox with the batch (one statement for all).
    pub(super) events: Vec<PendingEvent>,
}

impl Context {
    /// The message being handled.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// Which attempt this is (1 on first delivery).
    pub fn attempt(&self) -> i64 {
        self.attempt
    }

    /// Whether a [`HandlerError::Retry`] now would dead-letter the message (no retry left):
    /// a handler waiting for data that may not have arrived yet decides on this one.
    pub fn is_last_attempt(&self) -> bool {
        self.last_attempt
    }

    /// The payload as `T`; a payload that does not fit is a [`HandlerError::Reject`] naming
    /// what is wrong.
    pub fn data<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        T::deserialize(&self.envelope.data).map_err(|e| {
            HandlerError::Reject(format!("invalid {} payload: {e}", self.envelope.kind))
        })
    }

    /// The transaction the handler's writes go in (committed only when the handler succeeds).
    pub fn tx(&mut self) -> &mut Transaction<'static, Any> {
        &mut self.tx
    }

    /// Emits an event of this domain: written to the outbox in the same transaction as the
    /// handler's writes (with the rest of the batch, when the handler succeeds), published by
    /// the relay after commit, carrying this message's trace.
    ///
    /// The payload is serialized now: a payload that cannot be (a map with non-string keys,
    /// a failing `Serialize`) rejects the message with the reason instead of emitting `null`.
    pub fn emit<T: serde::Serialize + ?Sized>(
        &mut self,
        kind: &str,
        data: &T,
    ) -> Result<(), HandlerError> {
        let data = serde_json::to_value(data).map_err(|e| {
            HandlerError::reject(format!(
                "the payload of event {kind} cannot be serialized: {e}"
            ))
        })?;
        let event = Envelope::new(kind, data);
        self.events.push(PendingEvent::new(
            &self.events_exchange,
            &event,
            Some(self.trace),
        ));
        Ok(())
    }
}

/// A message handler. It changes the database only through `ctx.tx()` and emits events only
/// through `ctx.emit`: when another handler of its batch fails, the batch runs again, so any
/// other side effect must be idempotent.
pub trait Handler: Send + Sync + 'static {
    /// Handles one message.
    fn handle<'a>(&'a self, ctx: &'a mut Context) -> BoxFuture<'a, Result<(), HandlerError>>;
}

impl<F> Handler for F
where
    F: for<'a> Fn(&'a mut Context) -> BoxFuture<'a, Result<(), HandlerError>>
        + Send
        + Sync
        + 'static,
{
    fn handle<'a>(&'a self, ctx: &'a mut Context) -> BoxFuture<'a, Result<(), HandlerError>> {
        self(ctx)
    }
}

/// A [`Handler`] from an `async fn(&mut Context) -> Result<(), HandlerError>`, without the
/// `Box::pin(async move { .. })` of the trait's boxed future:
///
/// ```text
/// async fn place(ctx: &mut Context) -> Result<(), HandlerError> { .. }
/// worker.on("order.place", handler!(place))
/// ```
///
/// (A plain `impl Fn(&mut Context) -> impl Future` cannot say that the future borrows the
/// context and is `Send`; a named fn with an explicit lifetime can, and this writes it.)
#[macro_export]
macro_rules! handler {
    ($handler:path) => {{
        fn boxed<'a>(
            ctx: &'a mut $crate::worker::Context,
        ) -> $crate::futures::future::BoxFuture<
            'a,
            ::std::result::Result<(), $crate::worker::HandlerError>,
        > {
            ::std::boxed::Box::pin($handler(ctx))
        }
        boxed
    }};
}
