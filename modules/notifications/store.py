"""The notifications database: SQLite (`sqlite://PATH`, under `chimera up`) or MySQL/MariaDB
(`mysql://USER:PASS@HOST:PORT/DB`, on Kubernetes, where the two heads run in different pods),
as docs/contract.md section 7 says. Statements are written once, with `?` placeholders."""

import sqlite3
import time
from urllib.parse import unquote, urlsplit


class ConfigError(Exception):
    """A setting the head cannot start with; the message names it (never its credentials)."""


# Both engines: VARCHAR keys (MySQL cannot key a TEXT column), no separate index (MySQL has no
# CREATE INDEX IF NOT EXISTS): a buyer's notifications are the primary key's prefix.
MIGRATIONS = [
    "CREATE TABLE IF NOT EXISTS chimera_inbox (consumer VARCHAR(190) NOT NULL, "
    "message_id VARCHAR(64) NOT NULL, message_type VARCHAR(255) NOT NULL, "
    "processed_at BIGINT NOT NULL, PRIMARY KEY (consumer, message_id))",
    "CREATE TABLE IF NOT EXISTS buyers (user_id VARCHAR(190) NOT NULL PRIMARY KEY, "
    "name TEXT NOT NULL, email TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS notifications (user_id VARCHAR(190) NOT NULL, "
    "notification_id VARCHAR(64) NOT NULL, order_id VARCHAR(190) NOT NULL, "
    "kind VARCHAR(64) NOT NULL, text TEXT NOT NULL, created_at VARCHAR(32) NOT NULL, "
    "PRIMARY KEY (user_id, notification_id))",
]


class Database:
    """Where the database is, and how each engine says the few things that differ."""

    def __init__(self, url):
        scheme = url.split("://", 1)[0] if "://" in url else ""
        if scheme == "sqlite":
            self.kind = "sqlite"
            self.path = url[len("sqlite://"):].split("?", 1)[0]
            if not self.path:
                raise ConfigError("CHIMERA_DATABASE_URL: sqlite:// needs a path (sqlite://PATH)")
        elif scheme in ("mysql", "mariadb"):
            self.kind = "mysql"
            parts = urlsplit(url)
            if not parts.hostname or not parts.path.strip("/"):
                raise ConfigError("CHIMERA_DATABASE_URL: expected mysql://USER:PASS@HOST:PORT/DB")
            self.mysql = {
                "host": parts.hostname,
                "port": parts.port or 3306,
                "user": unquote(parts.username or ""),
                "password": unquote(parts.password or ""),
                "database": parts.path.strip("/"),
            }
        else:
            raise ConfigError("CHIMERA_DATABASE_URL: expected sqlite://PATH or mysql://USER:PASS@HOST:PORT/DB")
        if self.kind == "mysql":
            import pymysql
            self.transient = (pymysql.err.OperationalError, pymysql.err.InterfaceError,
                              pymysql.err.InternalError)
            self.duplicate = pymysql.err.IntegrityError
        else:
            self.transient = (sqlite3.OperationalError, sqlite3.DatabaseError)
            self.duplicate = sqlite3.IntegrityError
        self.errors = self.transient + (self.duplicate,)

    def connect(self, read_only=False, timeout=5.0):
        if self.kind == "sqlite":
            if read_only:
                raw = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=timeout)
            else:
                raw = sqlite3.connect(self.path, timeout=timeout, isolation_level=None,
                                      check_same_thread=False)
                raw.execute("PRAGMA journal_mode=WAL")
                raw.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
            return Connection(self, raw)
        import pymysql
        raw = pymysql.connect(**self.mysql, connect_timeout=timeout, read_timeout=30,
                              write_timeout=30, autocommit=True, charset="utf8mb4")
        return Connection(self, raw)

    def upsert_buyer(self):
        if self.kind == "sqlite":
            return ("INSERT INTO buyers (user_id, name, email) VALUES (?, ?, ?) ON CONFLICT(user_id) "
                    "DO UPDATE SET name = excluded.name, email = excluded.email")
        return ("INSERT INTO buyers (user_id, name, email) VALUES (?, ?, ?) "
                "ON DUPLICATE KEY UPDATE name = VALUES(name), email = VALUES(email)")

    def migrate(self, log):
        """Both heads migrate at start: the statements are idempotent; a race is retried."""
        for attempt in range(10):
            try:
                db = self.connect()
                try:
                    for statement in MIGRATIONS:
                        db.execute(statement)
                finally:
                    db.close()
                return
            except self.errors as error:
                log("warn", "migration failed; retrying", error=type(error).__name__)
                time.sleep(0.2 * (attempt + 1))
        raise RuntimeError("the migrations did not complete in 10 attempts")

    def answers(self):
        """None when a read succeeds (what /readyz needs), else why not."""
        try:
            db = self.connect(read_only=True, timeout=1.0)
            try:
                db.execute("SELECT 1").fetchone()
            finally:
                db.close()
            return None
        except self.errors as error:
            return f"the database does not answer: {type(error).__name__}"


class Connection:
    """One connection; `?` placeholders on both engines; explicit transactions."""

    def __init__(self, database, raw):
        self.database = database
        self.raw = raw

    def execute(self, sql, params=()):
        if self.database.kind == "sqlite":
            return self.raw.execute(sql, params)
        cursor = self.raw.cursor()
        # (No statement here has a `?` or `%` in a literal; without parameters PyMySQL leaves
        # the text alone.)
        cursor.execute(sql.replace("?", "%s"), params or None)
        return cursor

    def begin(self):
        if self.database.kind == "sqlite":
            # The write lock at once: a busy database fails here, before any work.
            self.raw.execute("BEGIN IMMEDIATE")
        else:
            # A connection the server dropped (a restart) is opened again first.
            self.raw.ping(reconnect=True)
            self.raw.begin()

    def commit(self):
        if self.database.kind == "sqlite":
            self.raw.execute("COMMIT")
        else:
            self.raw.commit()

    def rollback(self):
        try:
            if self.database.kind == "sqlite":
                self.raw.execute("ROLLBACK")
            else:
                self.raw.rollback()
        except self.database.errors:
            pass  # nothing to undo, or the connection is gone (and its transaction with it)

    def close(self):
        self.raw.close()
