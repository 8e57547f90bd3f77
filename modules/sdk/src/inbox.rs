//! The inbox: which messages a consumer has handled, written in the same transaction as the
//! business change, so a redelivered message changes nothing twice.

use std::collections::HashSet;

use sqlx::{Any, Row, Transaction};

use crate::db::DbError;
use crate::envelope::Envelope;

/// Rows per statement when a batch is read or written at once (well under SQLite's and MySQL's
/// limits on bound parameters).
const CHUNK: usize = 500;

/// Records that `consumer` handles `envelope` in this transaction. Returns false when it was
/// handled before (the caller then acknowledges the message and changes nothing).
pub async fn record(
    tx: &mut Transaction<'_, Any>,
    consumer: &str,
    envelope: &Envelope,
) -> Result<bool, DbError> {
    let id = envelope.id.to_string();
    match record_all(tx, consumer, &[(id.as_str(), envelope.kind.as_str())]).await {
        Ok(()) => Ok(true),
        Err(DbError::Query {
            cause: sqlx::Error::Database(e),
            ..
        }) if e.is_unique_violation() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Which of `ids` `consumer` has already handled, read inside the batch's transaction.
pub async fn handled(
    tx: &mut Transaction<'_, Any>,
    consumer: &str,
    ids: &[String],
) -> Result<HashSet<String>, DbError> {
    let mut seen = HashSet::new();
    for chunk in ids.chunks(CHUNK) {
        let sql = format!(
            "SELECT message_id FROM chimera_inbox WHERE consumer = ? AND message_id IN ({})",
            vec!["?"; chunk.len()].join(", ")
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(consumer);
        for id in chunk {
            query = query.bind(id.as_str());
        }
        let rows = query
            .fetch_all(&mut **tx)
            .await
            .map_err(|cause| DbError::Query {
                what: "read the inbox",
                cause,
            })?;
        for row in rows {
            let id: String = row.try_get("message_id").map_err(|cause| DbError::Query {
                what: "read the inbox",
                cause,
            })?;
            seen.insert(id);
        }
    }
    Ok(seen)
}

/// Records `(message id, type)` pairs as handled by `consumer`, a chunk per statement. A row
/// that is already there fails the statement with a unique violation: another consumer handled
/// that message concurrently, and the caller's transaction must not commit.
pub async fn record_all(
    tx: &mut Transaction<'_, Any>,
    consumer: &str,
    messages: &[(&str, &str)],
) -> Result<(), DbError> {
    let now = jiff::Timestamp::now().as_millisecond();
    for chunk in messages.chunks(CHUNK) {
        let sql = format!(
            "INSERT INTO chimera_inbox (consumer, message_id, message_type, processed_at) VALUES {}",
            vec!["(?, ?, ?, ?)"; chunk.len()].join(", ")
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (id, kind) in chunk {
            query = query.bind(consumer).bind(*id).bind(*kind).bind(now);
        }
        query
            .execute(&mut **tx)
            .await
            .map_err(|cause| DbError::Query {
                what: "record in the inbox",
                cause,
            })?;
    }
    Ok(())
}
