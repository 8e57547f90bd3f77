//! Reads for query heads: one API over both backends.
//!
//! On MySQL a read goes through the sqlx pool. On SQLite it runs in place, on the calling
//! thread, with a read-only connection of this process: an indexed lookup in a WAL database
//! takes microseconds, less than the hand-off to a driver thread and back that an async driver
//! pays on every statement (measured in `bench/`: the hand-off was most of the query head's
//! cost). WAL readers never wait for the writer, so the thread is held only as long as the read
//! itself; query handlers keep reads bounded (by key, or with a LIMIT).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::OpenFlags;
use rusqlite::types::Value as SqliteValue;
use sqlx::any::{AnyArguments, AnyRow};
use sqlx::query::Query;
use sqlx::{Any, Decode, Row as _, Type};

/// Read-only connections kept per process (a read holds one only while it runs, so about one
/// per runtime thread is in use at a time).
const IDLE_READERS: usize = 8;
/// Prepared statements cached per connection.
const STATEMENT_CACHE: usize = 64;

/// A value bound to a read's `?` placeholder.
#[derive(Clone, Debug, PartialEq)]
pub enum Param {
    /// SQL NULL.
    Null,
    /// An integer.
    Int(i64),
    /// Text.
    Text(String),
}

impl From<&str> for Param {
    fn from(s: &str) -> Self {
        Self::Text(s.to_owned())
    }
}

impl From<&String> for Param {
    fn from(s: &String) -> Self {
        Self::Text(s.clone())
    }
}

impl From<String> for Param {
    fn from(s: String) -> Self {
        Self::Text(s)
    }
}

impl From<i64> for Param {
    fn from(n: i64) -> Self {
        Self::Int(n)
    }
}

impl<T: Into<Param>> From<Option<T>> for Param {
    fn from(v: Option<T>) -> Self {
        v.map_or(Self::Null, Into::into)
    }
}

/// A row read by [`crate::db::Database::read_optional`] or `read_all`.
pub struct Record(RecordInner);

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            RecordInner::Any(row) => f
                .debug_struct("Record")
                .field("columns", &row.len())
                .finish(),
            RecordInner::Sqlite { columns, values } => {
                f.debug_map().entries(columns.iter().zip(values)).finish()
            }
        }
    }
}

enum RecordInner {
    Any(AnyRow),
    Sqlite {
        columns: Arc<[String]>,
        values: Vec<SqliteValue>,
    },
}

/// Reading a named column of a row, the same way for rows of a write transaction (sqlx's
/// `AnyRow`) and for [`Record`]s, so a module maps both with one function.
pub trait Columns {
    /// The value of column `name` as `T`.
    fn get<T: ColumnValue>(&self, name: &str) -> Result<T, sqlx::Error>;
}

impl Columns for AnyRow {
    fn get<T: ColumnValue>(&self, name: &str) -> Result<T, sqlx::Error> {
        self.try_get(name)
    }
}

impl Columns for Record {
    fn get<T: ColumnValue>(&self, name: &str) -> Result<T, sqlx::Error> {
        match &self.0 {
            RecordInner::Any(row) => row.try_get(name),
            RecordInner::Sqlite { columns, values } => {
                let value = columns
                    .iter()
                    .position(|c| c == name)
                    .and_then(|i| values.get(i))
                    .ok_or_else(|| sqlx::Error::ColumnNotFound(name.to_owned()))?;
                T::from_sqlite(value).ok_or_else(|| sqlx::Error::ColumnDecode {
                    index: name.to_owned(),
                    source: format!("a {} does not hold {value:?}", std::any::type_name::<T>())
                        .into(),
                })
            }
        }
    }
}

/// A Rust type a column can be read as.
pub trait ColumnValue: Sized + for<'r> Decode<'r, Any> + Type<Any> {
    /// The value from a SQLite column, if it fits.
    fn from_sqlite(value: &SqliteValue) -> Option<Self>;
}

impl ColumnValue for String {
    fn from_sqlite(value: &SqliteValue) -> Option<Self> {
        match value {
            SqliteValue::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
}

impl ColumnValue for i64 {
    fn from_sqlite(value: &SqliteValue) -> Option<Self> {
        match value {
            SqliteValue::Integer(n) => Some(*n),
            _ => None,
        }
    }
}

impl ColumnValue for f64 {
    fn from_sqlite(value: &SqliteValue) -> Option<Self> {
        match value {
            SqliteValue::Real(x) => Some(*x),
            // SQLite stores a whole REAL as an integer when it can.
            #[allow(clippy::cast_precision_loss)]
            SqliteValue::Integer(n) => Some(*n as f64),
            _ => None,
        }
    }
}

impl ColumnValue for bool {
    fn from_sqlite(value: &SqliteValue) -> Option<Self> {
        match value {
            SqliteValue::Integer(n) => Some(*n != 0),
            _ => None,
        }
    }
}

impl<T: ColumnValue> ColumnValue for Option<T> {
    fn from_sqlite(value: &SqliteValue) -> Option<Self> {
        match value {
            SqliteValue::Null => Some(None),
            v => T::from_sqlite(v).map(Some),
        }
    }
}

/// Binds `params` to a sqlx query in order.
pub(crate) fn bind_all<'q>(
    mut query: Query<'q, Any, AnyArguments>,
    params: &[Param],
) -> Query<'q, Any, AnyArguments> {
    for p in params {
        query = match p {
            Param::Null => query.bind(None::<String>),
            Param::Int(n) => query.bind(*n),
            Param::Text(s) => query.bind(s.clone()),
        };
    }
    query
}

pub(crate) fn any_record(row: AnyRow) -> Record {
    Record(RecordInner::Any(row))
}

/// This process's read-only connections to one SQLite file.
#[derive(Debug)]
pub(crate) struct SqliteReaders {
    path: PathBuf,
    idle: Mutex<Vec<rusqlite::Connection>>,
}

impl SqliteReaders {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self {
            path,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn open(&self) -> rusqlite::Result<rusqlite::Connection> {
        let conn = rusqlite::Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // Only while a checkpoint restarts the WAL can a reader wait.
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(conn)
    }

    /// Runs `sql` with `params` on an idle connection (opening one when none is idle) and
    /// returns at most `limit` rows.
    pub(crate) fn read(
        &self,
        sql: &str,
        params: &[Param],
        limit: usize,
    ) -> rusqlite::Result<Vec<Record>> {
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let conn = match idle {
            Some(conn) => conn,
            None => self.open()?,
        };
        let rows = read_with(&conn, sql, params, limit);
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < IDLE_READERS
        {
            idle.push(conn);
        }
        rows
    }
}

fn read_with(
    conn: &rusqlite::Connection,
    sql: &str,
    params: &[Param],
    limit: usize,
) -> rusqlite::Result<Vec<Record>> {
    let mut statement = conn.prepare_cached(sql)?;
    let columns: Arc<[String]> = statement
        .column_names()
        .into_iter()
        .map(str::to_owned)
        .collect();
    let bound = params.iter().map(|p| match p {
        Param::Null => SqliteValue::Null,
        Param::Int(n) => SqliteValue::Integer(*n),
        Param::Text(s) => SqliteValue::Text(s.clone()),
    });
    let mut rows = statement.query(rusqlite::params_from_iter(bound))?;
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(row) = rows.next()? else { break };
        let values = (0..columns.len())
            .map(|i| row.get::<_, SqliteValue>(i))
            .collect::<Result<Vec<_>, _>>()?;
        out.push(Record(RecordInner::Sqlite {
            columns: Arc::clone(&columns),
            values,
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(values: Vec<SqliteValue>) -> Record {
        let columns: Arc<[String]> = ["a", "b"].iter().map(|s| (*s).to_owned()).collect();
        Record(RecordInner::Sqlite { columns, values })
    }

    #[test]
    fn sqlite_records_read_by_name_and_type() {
        let r = record(vec![SqliteValue::Text("x".into()), SqliteValue::Integer(7)]);
        assert_eq!(r.get::<String>("a").ok(), Some("x".to_owned()));
        assert_eq!(r.get::<i64>("b").ok(), Some(7));
        assert_eq!(r.get::<Option<i64>>("b").ok(), Some(Some(7)));
        assert_eq!(r.get::<f64>("b").ok(), Some(7.0));
        assert_eq!(r.get::<bool>("b").ok(), Some(true));
    }

    #[test]
    fn nulls_read_as_none_and_mismatches_name_the_column() {
        let r = record(vec![SqliteValue::Null, SqliteValue::Text("7".into())]);
        assert_eq!(r.get::<Option<String>>("a").ok(), Some(None));
        let err = r.get::<i64>("b").err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("column b")),
            "{err:?}"
        );
        let missing = r.get::<String>("c").err().map(|e| e.to_string());
        assert!(
            missing
                .as_deref()
                .is_some_and(|e| e.contains("\"c\"") || e.contains('c'))
        );
        assert!(r.get::<String>("a").is_err(), "NULL is not a String");
    }

    #[test]
    fn reads_run_on_a_sqlite_file_and_reuse_connections() {
        let dir = std::env::temp_dir().join(format!("chimera-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.db");
        let writer = rusqlite::Connection::open(&path).unwrap();
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL; CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER, note TEXT);
                 INSERT INTO t VALUES ('a', 1, NULL), ('b', 2, 'two'), ('c', 3, NULL);",
            )
            .unwrap();
        let readers = SqliteReaders::new(path);
        let one = readers
            .read("SELECT id, n, note FROM t WHERE id = ?", &["b".into()], 1)
            .unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(
            one[0].get::<Option<String>>("note").unwrap().as_deref(),
            Some("two")
        );
        let capped = readers
            .read(
                "SELECT id FROM t WHERE n > ? ORDER BY id",
                &[Param::Int(0)],
                2,
            )
            .unwrap();
        let ids: Vec<String> = capped.iter().map(|r| r.get("id").unwrap()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(
            readers.idle.lock().unwrap().len(),
            1,
            "one connection, reused"
        );
        let bad = readers.read("SELECT nope FROM t", &[], 1).err();
        assert!(bad.is_some_and(|e| e.to_string().contains("nope")));
        assert!(
            readers
                .read("INSERT INTO t VALUES ('d', 4, NULL)", &[], 1)
                .is_err(),
            "readers cannot write"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
