//! The outbox: events a handler emits are written in its transaction, and a relay publishes
//! them with confirms and marks them sent. Rows are picked by status and due time (never by an
//! auto-increment cursor, which skips rows that commit late); a row that cannot be sent is
//! retried with backoff and, after `max_attempts`, set `dead` for someone to look at.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use sqlx::{Any, AnyPool, Row, Transaction};
use tokio::sync::Notify;

use crate::broker::{Outgoing, Publisher};
use crate::db::{Backend, Columns, Database, DbError, Param};
use crate::envelope::{Envelope, TraceParent};

/// Microseconds since the epoch, strictly increasing within the process: rows written one after
/// the other by this process are relayed in that order even within one microsecond.
fn monotonic_micros() -> i64 {
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = jiff::Timestamp::now().as_microsecond();
    let mut prev = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(prev + 1);
        match LAST.compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(actual) => prev = actual,
        }
    }
}

/// An event waiting to be written to the outbox with the rest of its transaction.
#[derive(Clone, Debug)]
pub struct PendingEvent {
    id: String,
    exchange: String,
    routing_key: String,
    body: String,
    traceparent: Option<String>,
    /// Taken when the event is emitted, so events keep the order their handlers emitted them.
    created_at: i64,
}

impl PendingEvent {
    /// `envelope` for `exchange`, caused by the message whose trace is `trace`.
    pub fn new(exchange: &str, envelope: &Envelope, trace: Option<TraceParent>) -> Self {
        Self {
            id: envelope.id.to_string(),
            exchange: exchange.to_owned(),
            routing_key: envelope.kind.clone(),
            body: String::from_utf8_lossy(&envelope.encode()).into_owned(),
            traceparent: trace.map(|t| t.to_string()),
            created_at: monotonic_micros(),
        }
    }
}

/// Rows per insert statement (7 parameters each: well under SQLite's and MySQL's limits).
const INSERT_CHUNK: usize = 500;

/// Writes `envelope` for `exchange` into the outbox, inside the caller's transaction.
pub async fn enqueue(
    tx: &mut Transaction<'_, Any>,
    exchange: &str,
    envelope: &Envelope,
    trace: Option<TraceParent>,
) -> Result<(), DbError> {
    enqueue_all(tx, &[PendingEvent::new(exchange, envelope, trace)]).await
}

/// Writes `events` into the outbox inside the caller's transaction, a chunk per statement.
pub async fn enqueue_all(
    tx: &mut Transaction<'_, Any>,
    events: &[PendingEvent],
) -> Result<(), DbError> {
    for chunk in events.chunks(INSERT_CHUNK) {
        let sql = format!(
            "INSERT INTO chimera_outbox (id, exchange_name, routing_key, body, traceparent, status, attempts, created_at, next_attempt_at) VALUES {}",
            vec!["(?, ?, ?, ?, ?, 'pending', 0, ?, ?)"; chunk.len()].join(", ")
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for e in chunk {
            query = query
                .bind(e.id.as_str())
                .bind(e.exchange.as_str())
                .bind(e.routing_key.as_str())
                .bind(e.body.as_str())
                .bind(e.traceparent.as_deref())
                .bind(e.created_at)
                .bind(e.created_at);
        }
        query
            .execute(&mut **tx)
            .await
            .map_err(q("write to the outbox"))?;
    }
    Ok(())
}

/// How the relay works.
#[derive(Clone, Copy, Debug)]
pub struct RelaySettings {
    /// Rows per round.
    pub batch: i64,
    /// Attempts before a row is set dead.
    pub max_attempts: i64,
    /// First retry delay; doubles per attempt, capped at 5 minutes.
    pub backoff: Duration,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            batch: 200,
            max_attempts: 10,
            backoff: Duration::from_secs(1),
        }
    }
}

/// What one relay round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayReport {
    /// Rows published and marked sent.
    pub sent: usize,
    /// Rows that failed and will be retried.
    pub retried: usize,
    /// Rows set dead.
    pub dead: usize,
}

struct OutboxRow {
    id: String,
    exchange: String,
    routing_key: String,
    body: String,
    traceparent: Option<String>,
    attempts: i64,
}

fn q(what: &'static str) -> impl FnOnce(sqlx::Error) -> DbError {
    move |cause| DbError::Query { what, cause }
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// Delay before retry number `attempt` (from 1).
pub fn retry_delay(base: Duration, attempt: i64) -> Duration {
    let factor =
        2u32.saturating_pow(u32::try_from(attempt.saturating_sub(1).clamp(0, 16)).unwrap_or(16));
    base.saturating_mul(factor).min(Duration::from_secs(300))
}

fn outbox_row(r: &impl Columns) -> Result<OutboxRow, sqlx::Error> {
    Ok(OutboxRow {
        id: r.get("id")?,
        exchange: r.get("exchange_name")?,
        routing_key: r.get("routing_key")?,
        body: r.get("body")?,
        traceparent: r.get("traceparent")?,
        attempts: r.get("attempts")?,
    })
}

/// How long a relay on SQLite owns the rows it claimed: rows it claimed and never marked (its
/// process died mid-round) are due again after this, for any relay. Well above a round's
/// publish (confirms within seconds), so no live relay's rows are taken from it.
const CLAIM_LEASE: Duration = Duration::from_secs(60);

/// Publishes the due pending rows once.
///
/// Several replicas' relays share one database and each row is published by one of them
/// (without a fault, an event is published once). On MySQL the rows are read
/// `FOR UPDATE SKIP LOCKED` in the transaction that marks them. On SQLite (one writer) the
/// write lock is not held while the broker confirms, so workers are not held up: the due rows
/// are read without it, then claimed in a short write transaction that moves their due time a
/// lease ahead (only rows still due are claimed: another relay's claim wins), then published,
/// then marked.
pub async fn relay_once(
    db: &Database,
    publisher: &Publisher,
    settings: RelaySettings,
) -> Result<RelayReport, DbError> {
    // Times in the outbox are microseconds since the epoch.
    let now = monotonic_micros();
    let select =
        "SELECT id, exchange_name, routing_key, body, traceparent, attempts FROM chimera_outbox
         WHERE status = 'pending' AND next_attempt_at <= ? ORDER BY created_at, id LIMIT ?";
    let mut held = None;
    let rows: Vec<OutboxRow> = if db.backend() == Backend::MySql {
        let tx = held.insert(db.begin().await?);
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "{select} FOR UPDATE SKIP LOCKED"
        )))
        .bind(now)
        .bind(settings.batch)
        .fetch_all(&mut ***tx)
        .await
        .map_err(q("read the outbox"))?
        .iter()
        .map(outbox_row)
        .collect::<Result<_, _>>()
    } else {
        db.read_all(select, &[Param::Int(now), Param::Int(settings.batch)])
            .await?
            .iter()
            .map(outbox_row)
            .collect::<Result<_, _>>()
    }
    .map_err(q("decode outbox rows"))?;
    let rows = if held.is_none() && !rows.is_empty() {
        claim(db, rows, now).await?
    } else {
        rows
    };
    let mut report = RelayReport::default();
    if rows.is_empty() {
        return Ok(report);
    }
    let mut messages = Vec::with_capacity(rows.len());
    let mut ids = Vec::with_capacity(rows.len());
    let mut undecodable = Vec::new();
    for row in &rows {
        match Envelope::decode(row.body.as_bytes()) {
            Ok(envelope) => {
                let mut m = Outgoing::new(row.exchange.clone(), envelope);
                m.routing_key = row.routing_key.clone();
                m.trace = row.traceparent.as_deref().and_then(TraceParent::parse);
                messages.push(m);
                ids.push(row.id.as_str());
            }
            Err(e) => undecodable.push((row.id.clone(), e.to_string())),
        }
    }
    let published = publisher.publish_all(&messages, false).await;
    let mut tx = match held {
        Some(tx) => tx,
        None => db.begin().await?,
    };
    for (id, error) in &undecodable {
        mark_dead(&mut tx, id, error).await?;
        report.dead += 1;
    }
    match published {
        Ok(()) if ids.is_empty() => {} // every row was undecodable (marked dead above)
        Ok(()) => {
            let sql = format!(
                "UPDATE chimera_outbox SET status = 'sent', attempts = attempts + 1 WHERE status = 'pending' AND id IN ({})",
                placeholders(ids.len())
            );
            let mut update = sqlx::query(sqlx::AssertSqlSafe(sql));
            for id in &ids {
                update = update.bind(*id);
            }
            update
                .execute(&mut **tx)
                .await
                .map_err(q("mark outbox rows sent"))?;
            report.sent = ids.len();
        }
        Err(error) => {
            let message = error.to_string();
            tracing::warn!(%message, rows = rows.len(), "outbox relay could not publish; will retry");
            for row in rows
                .iter()
                .filter(|r| !undecodable.iter().any(|(id, _)| *id == r.id))
            {
                let attempts = row.attempts + 1;
                if attempts >= settings.max_attempts {
                    mark_dead(&mut tx, &row.id, &message).await?;
                    report.dead += 1;
                } else {
                    let next = now
                        + i64::try_from(retry_delay(settings.backoff, attempts).as_micros())
                            .unwrap_or(i64::MAX / 2);
                    sqlx::query("UPDATE chimera_outbox SET attempts = ?, next_attempt_at = ?, last_error = ? WHERE id = ?")
                        .bind(attempts)
                        .bind(next)
                        .bind(message.as_str())
                        .bind(row.id.as_str())
                        .execute(&mut **tx)
                        .await
                        .map_err(q("reschedule an outbox row"))?;
                    report.retried += 1;
                }
            }
        }
    }
    tx.commit()
        .await
        .map_err(q("commit the relay transaction"))?;
    Ok(report)
}

/// The rows of `rows` this relay now owns: those still due (no other relay claimed them since
/// they were read), their due time moved [`CLAIM_LEASE`] ahead, in one short write transaction.
async fn claim(db: &Database, rows: Vec<OutboxRow>, now: i64) -> Result<Vec<OutboxRow>, DbError> {
    let lease_until = now + i64::try_from(CLAIM_LEASE.as_micros()).unwrap_or(i64::MAX / 2);
    let sql = format!(
        "UPDATE chimera_outbox SET next_attempt_at = ? WHERE status = 'pending' AND next_attempt_at <= ? AND id IN ({}) RETURNING id",
        placeholders(rows.len())
    );
    let mut update = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(lease_until)
        .bind(now);
    for row in &rows {
        update = update.bind(row.id.as_str());
    }
    let mut tx = db.begin().await?;
    let claimed: std::collections::HashSet<String> = update
        .fetch_all(&mut **tx)
        .await
        .map_err(q("claim outbox rows"))?
        .iter()
        .map(|r| r.try_get::<String, _>("id"))
        .collect::<Result<_, _>>()
        .map_err(q("decode claimed outbox rows"))?;
    tx.commit().await.map_err(q("commit the outbox claim"))?;
    // The rows keep the order they were read in (commit order).
    Ok(rows
        .into_iter()
        .filter(|r| claimed.contains(&r.id))
        .collect())
}

async fn mark_dead(tx: &mut Transaction<'_, Any>, id: &str, error: &str) -> Result<(), DbError> {
    sqlx::query("UPDATE chimera_outbox SET status = 'dead', attempts = attempts + 1, last_error = ? WHERE id = ?")
        .bind(error)
        .bind(id)
        .execute(&mut **tx)
        .await
        .map(|_| ())
        .map_err(q("mark an outbox row dead"))
}

/// Counts outbox rows by status (for metrics and tests).
pub async fn count(pool: &AnyPool, status: &str) -> Result<i64, DbError> {
    sqlx::query("SELECT COUNT(*) AS n FROM chimera_outbox WHERE status = ?")
        .bind(status)
        .fetch_one(pool)
        .await
        .and_then(|r| r.try_get::<i64, _>("n"))
        .map_err(q("count outbox rows"))
}

/// Rows not sent yet: pending, due now or waiting for a retry.
pub async fn pending(db: &Database) -> Result<i64, DbError> {
    let rows = db
        .read_all(
            "SELECT COUNT(*) AS n FROM chimera_outbox WHERE status = 'pending'",
            &[],
        )
        .await?;
    rows.first()
        .map_or(Ok(0), |r| r.get::<i64>("n"))
        .map_err(q("count pending outbox rows"))
}

/// The gauge's value while the rows are not known (before the first count, or when counting
/// failed): the autoscaler then does not take the head to zero.
const UNKNOWN: i64 = -1;

/// How often the relay counts what is pending for its gauge (a count per round would be a
/// query per handler commit).
const PENDING_EVERY: Duration = Duration::from_secs(1);

/// Runs the relay until `stop` is notified: a round whenever `wake` is notified (a handler
/// committed events) or every `idle` otherwise, and `pending` set to the rows not sent yet at
/// most every second. Finishes with a last round, so a graceful shutdown flushes what is
/// pending.
pub async fn run_relay(
    db: Database,
    publisher: Publisher,
    settings: RelaySettings,
    wake: Arc<Notify>,
    stop: Arc<Notify>,
    idle: Duration,
    pending_rows: Gauge,
) {
    let mut counted: Option<tokio::time::Instant> = None;
    pending_rows.set(UNKNOWN); // until the first count
    loop {
        match relay_once(&db, &publisher, settings).await {
            Ok(report) if report.sent as i64 == settings.batch => continue, // more is waiting
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "outbox relay round failed"),
        }
        if counted.is_none_or(|at| at.elapsed() >= PENDING_EVERY) {
            match pending(&db).await {
                Ok(n) => {
                    pending_rows.set(n);
                    counted = Some(tokio::time::Instant::now());
                }
                Err(error) => {
                    pending_rows.set(UNKNOWN);
                    tracing::warn!(%error, "could not count the pending outbox rows");
                }
            }
        }
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(idle) => {}
            () = stop.notified() => {
                // Flush every due row, a batch at a time (rows waiting for a retry stay for
                // the next head of this domain).
                loop {
                    match relay_once(&db, &publisher, settings).await {
                        Ok(report) if report.sent as i64 == settings.batch => continue,
                        Ok(_) => return,
                        Err(error) => {
                            tracing::warn!(%error, "last outbox relay round failed");
                            return;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_and_cap() {
        let base = Duration::from_secs(1);
        assert_eq!(retry_delay(base, 1), Duration::from_secs(1));
        assert_eq!(retry_delay(base, 3), Duration::from_secs(4));
        assert_eq!(retry_delay(base, 100), Duration::from_secs(300));
        assert_eq!(placeholders(3), "?, ?, ?");
    }
}
