//! The domain's own database: SQLite (the embedded default, in WAL mode) or MySQL/MariaDB (the
//! production path), through one code path. Migrations run at start: the SDK's own (inbox,
//! outbox) and the module's.
//!
//! SQL here is written once for both: `?` placeholders, portable types, one statement per
//! migration.

mod read;

use std::sync::Arc;
use std::time::Duration;

pub use read::{ColumnValue, Columns, Param, Record};
use read::{SqliteReaders, any_record, bind_all};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::migrate::{Migration as SqlxMigration, MigrationType, Migrator};
use sqlx::{AnyPool, Executor, SqlSafeStr};

/// Database failures.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL names no supported database.
    #[error(
        "unsupported database URL {0:?}: expected sqlite://PATH or mysql://USER:PASS@HOST:PORT/DB"
    )]
    UnsupportedUrl(String),
    /// Connecting failed.
    #[error("cannot connect to the database: {0}")]
    Connect(sqlx::Error),
    /// A migration failed.
    #[error("database migration failed: {0}")]
    Migrate(sqlx::migrate::MigrateError),
    /// The database handle was closed.
    #[error("the database handle is closed")]
    Closed,
    /// A read on SQLite's in-process connections failed.
    #[error("database read failed: {0}")]
    Read(#[source] rusqlite::Error),
    /// A query failed.
    #[error("database query failed ({what}): {cause}")]
    Query {
        /// What was being done.
        what: &'static str,
        /// What the driver said.
        cause: sqlx::Error,
    },
}

impl DbError {
    /// Whether the database refused a duplicate key: another consumer recorded the same inbox
    /// row at the same time (the batch returns to the queue, and its redelivery is a
    /// duplicate), unlike a database that failed.
    pub fn is_unique_violation(&self) -> bool {
        matches!(self, Self::Query { cause: sqlx::Error::Database(e), .. } if e.is_unique_violation())
    }
}

/// Which database is behind the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// SQLite.
    Sqlite,
    /// MySQL or MariaDB.
    MySql,
}

/// A schema change of a module: versions from 100 up (below is the SDK's).
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    /// Version, applied in order, once.
    pub version: i64,
    /// What it does.
    pub description: &'static str,
    /// One SQL statement, valid on SQLite and MySQL.
    pub sql: &'static str,
}

/// The SDK's tables: the inbox (what was handled, for effectively-once) and the outbox (events
/// to publish, written in the handler's transaction).
pub const SDK_MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "chimera inbox",
        sql: "CREATE TABLE IF NOT EXISTS chimera_inbox (
            consumer VARCHAR(190) NOT NULL,
            message_id VARCHAR(64) NOT NULL,
            message_type VARCHAR(255) NOT NULL,
            processed_at BIGINT NOT NULL,
            PRIMARY KEY (consumer, message_id))",
    },
    Migration {
        version: 2,
        description: "chimera outbox",
        sql: "CREATE TABLE IF NOT EXISTS chimera_outbox (
            id VARCHAR(64) NOT NULL PRIMARY KEY,
            exchange_name VARCHAR(255) NOT NULL,
            routing_key VARCHAR(255) NOT NULL,
            body TEXT NOT NULL,
            traceparent VARCHAR(64),
            status VARCHAR(16) NOT NULL,
            attempts INTEGER NOT NULL,
            created_at BIGINT NOT NULL,
            next_attempt_at BIGINT NOT NULL,
            last_error TEXT)",
    },
    Migration {
        version: 3,
        description: "chimera outbox due index",
        sql: "CREATE INDEX chimera_outbox_due ON chimera_outbox (status, next_attempt_at, created_at)",
    },
];

/// A pool to the domain's database.
#[derive(Clone, Debug)]
pub struct Database {
    pool: AnyPool,
    backend: Backend,
    /// SQLite's single writer, as an async lock (None on MySQL).
    writer: Option<Arc<Semaphore>>,
    /// Read-only connections used in place (SQLite files only).
    readers: Option<Arc<SqliteReaders>>,
}

/// A write transaction (holding this process's SQLite write lock, if any, until it ends).
pub struct WriteTransaction {
    tx: sqlx::Transaction<'static, sqlx::Any>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl WriteTransaction {
    /// Commits.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }

    /// Rolls back.
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        self.tx.rollback().await
    }
}

impl std::ops::Deref for WriteTransaction {
    type Target = sqlx::Transaction<'static, sqlx::Any>;
    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTransaction {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tx
    }
}

/// The file behind a SQLite URL; None for an in-memory database (which only the pool's
/// connections share).
fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    use std::str::FromStr as _;
    if !url.starts_with("sqlite:") || url.contains(":memory:") || url.contains("mode=memory") {
        return None;
    }
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url).ok()?;
    Some(options.get_filename().to_path_buf())
}

fn backend_of(url: &str) -> Result<Backend, DbError> {
    if url.starts_with("sqlite:") {
        Ok(Backend::Sqlite)
    } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
        Ok(Backend::MySql)
    } else {
        Err(DbError::UnsupportedUrl(
            url.split('@').next_back().unwrap_or_default().to_owned(),
        ))
    }
}

impl Database {
    /// Connects, creating a SQLite file if needed, and runs the SDK's and `module`'s migrations.
    pub async fn connect(url: &str, module: &[Migration]) -> Result<Self, DbError> {
        install_default_drivers();
        let backend = backend_of(url)?;
        let url = match backend {
            Backend::Sqlite if !url.contains("mode=") => {
                format!("{url}{}mode=rwc", if url.contains('?') { '&' } else { '?' })
            }
            Backend::MySql => url.replacen("mariadb://", "mysql://", 1),
            Backend::Sqlite => url.to_owned(),
        };
        let options = AnyPoolOptions::new()
            .max_connections(match backend {
                // Readers run in parallel in WAL mode; writers take turns (see `begin`).
                Backend::Sqlite => 8,
                Backend::MySql => 16,
            })
            .acquire_timeout(Duration::from_secs(10))
            // A SQLite connection is a file handle in this process: it cannot go stale, and a
            // ping before each use would cost a round trip to its thread. A MySQL connection
            // can (server restarts, idle timeouts), so it is checked.
            .test_before_acquire(backend == Backend::MySql);
        let options = if backend == Backend::Sqlite {
            options.after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    conn.execute("PRAGMA busy_timeout = 5000").await?;
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    Ok(())
                })
            })
        } else {
            options
        };
        let pool = options.connect(&url).await.map_err(DbError::Connect)?;
        let writer = (backend == Backend::Sqlite).then(|| Arc::new(Semaphore::new(1)));
        let readers = sqlite_file(&url).map(|path| Arc::new(SqliteReaders::new(path)));
        let db = Self {
            pool,
            backend,
            writer,
            readers,
        };
        db.migrate(module).await?;
        Ok(db)
    }

    async fn migrate(&self, module: &[Migration]) -> Result<(), DbError> {
        let migrations = SDK_MIGRATIONS
            .iter()
            .chain(module)
            .map(|m| {
                SqlxMigration::new(
                    m.version,
                    m.description.into(),
                    MigrationType::Simple,
                    m.sql.into_sql_str(),
                    false,
                )
            })
            .collect();
        let mut migrator = Migrator::with_migrations(migrations);
        // During a rolling update the old version's pods restart against a schema the new
        // version already migrated: they must start (schema changes are additive).
        migrator.set_ignore_missing(true);
        // Heads starting together (query and worker, or several replicas) race to migrate, and
        // through the Any driver neither backend takes a migration lock: the loser of a race
        // fails on what the winner just applied, and sees it applied when it runs again.
        // On MySQL, heads of one database take turns through a named server lock.
        let mut lock = None;
        if self.backend == Backend::MySql {
            let mut conn = self.pool.acquire().await.map_err(DbError::Connect)?;
            sqlx::query("SELECT GET_LOCK(CONCAT('chimera_migrate_', DATABASE()), 60)")
                .execute(&mut *conn)
                .await
                .map_err(|cause| DbError::Query {
                    what: "take the migration lock",
                    cause,
                })?;
            lock = Some(conn);
        }
        let outcome = self.run_migrator(&migrator).await;
        if let Some(mut conn) = lock {
            let _ = sqlx::query("SELECT RELEASE_LOCK(CONCAT('chimera_migrate_', DATABASE()))")
                .execute(&mut *conn)
                .await;
        }
        outcome
    }

    async fn run_migrator(&self, migrator: &Migrator) -> Result<(), DbError> {
        let mut attempt = 0;
        loop {
            match migrator.run(&self.pool).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < 10 => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "migration raced another process; retrying");
                    tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                }
                Err(e) => return Err(DbError::Migrate(e)),
            }
        }
    }

    /// Begins a transaction that will write. SQLite has one writer at a time: here writers of
    /// this process queue on an async lock instead of spinning on SQLite's busy timeout, and the
    /// transaction takes SQLite's write lock up front (`BEGIN IMMEDIATE`) so one that read first
    /// cannot fail when it starts writing (other processes still wait on the busy timeout).
    pub async fn begin(&self) -> Result<WriteTransaction, DbError> {
        let permit = match &self.writer {
            Some(lock) => Some(
                lock.clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| DbError::Closed)?,
            ),
            None => None,
        };
        let begun = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Backend::MySql => self.pool.begin().await,
        };
        let tx = begun.map_err(|cause| DbError::Query {
            what: "begin a transaction",
            cause,
        })?;
        Ok(WriteTransaction {
            tx,
            _permit: permit,
        })
    }

    /// Reads at most one row: the query heads' lookups (see [`Record`] and [`Columns`]).
    pub async fn read_optional(
        &self,
        sql: &str,
        params: &[Param],
    ) -> Result<Option<Record>, DbError> {
        Ok(self.read(sql, params, 1).await?.into_iter().next())
    }

    /// Reads every row; keep the query bounded (a key or a LIMIT): on SQLite it runs on the
    /// calling thread.
    pub async fn read_all(&self, sql: &str, params: &[Param]) -> Result<Vec<Record>, DbError> {
        self.read(sql, params, usize::MAX).await
    }

    async fn read(
        &self,
        sql: &str,
        params: &[Param],
        limit: usize,
    ) -> Result<Vec<Record>, DbError> {
        if let Some(readers) = &self.readers {
            return readers.read(sql, params, limit).map_err(DbError::Read);
        }
        let query = bind_all(sqlx::query(sqlx::AssertSqlSafe(sql.to_owned())), params);
        let q = |cause| DbError::Query {
            what: "read",
            cause,
        };
        if limit == 1 {
            Ok(query
                .fetch_optional(&self.pool)
                .await
                .map_err(q)?
                .map(any_record)
                .into_iter()
                .collect())
        } else {
            Ok(query
                .fetch_all(&self.pool)
                .await
                .map_err(q)?
                .into_iter()
                .map(any_record)
                .collect())
        }
    }

    /// The pool, for the module's own queries.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// SQLite or MySQL.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Whether the database answers (the heads' readiness).
    pub async fn ping(&self) -> Result<(), DbError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|cause| DbError::Query {
                what: "ping",
                cause,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_pick_the_backend() {
        assert_eq!(
            backend_of("sqlite://data/users.db").ok(),
            Some(Backend::Sqlite)
        );
        assert_eq!(backend_of("sqlite::memory:").ok(), Some(Backend::Sqlite));
        assert_eq!(backend_of("mysql://u:p@h/db").ok(), Some(Backend::MySql));
        let err = backend_of("postgres://u:secret@h/db")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("unsupported") && !err.contains("secret"),
            "{err}"
        );
    }
}
