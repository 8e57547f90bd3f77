//! The inbox: which messages a consumer has handled, written in the same transaction as the
//! business change, so a redelivered message changes nothing twice.

use sqlx::{Any, Transaction};

use crate::db::DbError;
use crate::envelope::Envelope;

/// Records that `consumer` handles `envelope` in this transaction. Returns false when it was
/// handled before (the caller then acknowledges the message and changes nothing).
pub async fn record(
    tx: &mut Transaction<'_, Any>,
    consumer: &str,
    envelope: &Envelope,
) -> Result<bool, DbError> {
    let inserted = sqlx::query(
        "INSERT INTO chimera_inbox (consumer, message_id, message_type, processed_at) VALUES (?, ?, ?, ?)",
    )
    .bind(consumer)
    .bind(envelope.id.to_string())
    .bind(envelope.kind.as_str())
    .bind(jiff::Timestamp::now().as_millisecond())
    .execute(&mut **tx)
    .await;
    match inserted {
        Ok(_) => Ok(true),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(false),
        Err(cause) => Err(DbError::Query {
            what: "record in the inbox",
            cause,
        }),
    }
}
