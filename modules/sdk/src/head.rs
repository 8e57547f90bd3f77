//! Running a module: one binary, two heads. `chimera_sdk::head::main(module)` reads the head
//! contract, connects what the head needs and runs it until SIGTERM:
//!
//! - `query`: the database (migrations at start) and the HTTP server with the module's routes;
//! - `worker`: the database, the broker, the worker runtime, the outbox relay, and the HTTP
//!   server for health and metrics.
//!
//! Shutdown order for the worker: stop consuming, finish the messages in flight, flush the
//! outbox, close the broker connection, stop serving.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::sync::Notify;

use crate::broker::{BrokerError, Publisher, connect};
use crate::config::{ConfigError, Head, HeadConfig};
use crate::db::{Database, DbError, Migration};
use crate::http::{ServerOptions, router, serve};
use crate::outbox::{RelaySettings, run_relay};
use crate::telemetry::{Service, Telemetry};
use crate::usage::{Invocation, Program};
use crate::worker::{Worker, WorkerError};

/// What a module provides; the SDK does the rest.
pub struct Module {
    /// The program's name, version and one line on what it does (`--help`, `--version`).
    pub program: Program,
    /// The module's tables, versions from 100 up.
    pub migrations: &'static [Migration],
    /// The query head's REST routes, given the database.
    pub query: fn(Database) -> Router,
    /// The worker's handlers, registered on the given worker.
    pub worker: fn(Worker) -> Worker,
}

/// Why a head stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// The environment is incomplete or wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The worker failed.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
    /// The command line names no head, or another one than CHIMERA_HEAD.
    #[error("{0}")]
    Usage(String),
    /// The drain did not finish within the head's budget (`CHIMERA_DRAIN_SECONDS`): it stopped
    /// before its kill, so that its logs and spans still go out; what was in flight is
    /// redelivered (messages) or was cut (requests).
    #[error("the drain did not finish within {0:?} of the stop (CHIMERA_DRAIN_SECONDS)")]
    DrainOverrun(Duration),
}

/// Entry point of a module binary: `<binary> query|worker`, `--help`, `--version`.
pub fn main(module: Module) -> ExitCode {
    let program = module.program;
    let head = match crate::usage::parse(std::env::args().skip(1)) {
        Invocation::Run(head) => head,
        Invocation::Help(head) => {
            print!("{}", crate::usage::help(&program, head));
            return ExitCode::SUCCESS;
        }
        Invocation::Version => {
            print!("{}", crate::usage::version(&program));
            return ExitCode::SUCCESS;
        }
        Invocation::Invalid(reason) => {
            eprint!(
                "{}: {reason}\n{}",
                program.name,
                crate::usage::usage(&program)
            );
            return ExitCode::from(2);
        }
    };
    if head.is_none() && std::env::var_os("CHIMERA_HEAD").is_none() {
        eprint!(
            "{}: no head named (on the command line or in CHIMERA_HEAD)\n{}",
            program.name,
            crate::usage::usage(&program)
        );
        return ExitCode::from(2);
    }
    let telemetry = Telemetry::init(&service(&program, head.as_deref()));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            telemetry.shutdown();
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(run(module, head)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "head stopped");
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    };
    // The runtime first (its tasks may still end spans), then the last spans out.
    drop(runtime);
    telemetry.shutdown();
    code
}

/// The OTel resource of this head: `OTEL_SERVICE_NAME`, else `<domain>-<head>`.
fn service(program: &Program, head: Option<&str>) -> Service {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let domain = var("CHIMERA_DOMAIN").unwrap_or_else(|| program.name.to_owned());
    let head = head
        .map(str::to_owned)
        .or_else(|| var("CHIMERA_HEAD"))
        .unwrap_or_default();
    Service {
        name: var("OTEL_SERVICE_NAME").unwrap_or_else(|| format!("{domain}-{head}")),
        version: program.version.to_owned(),
        domain,
        head,
    }
}

/// Runs the head named by `arg` (or CHIMERA_HEAD) until SIGTERM / Ctrl-C.
pub async fn run(module: Module, arg: Option<String>) -> Result<(), HeadError> {
    let stop = Arc::new(Notify::new());
    let signal = {
        let stop = stop.clone();
        async move {
            crate::shutdown::signal().await;
            stop.notify_one();
        }
    };
    tokio::spawn(signal);
    run_with(module, arg, std::env::vars().collect(), stop).await
}

/// Runs a head from explicit contract variables until `stop` is notified (what `run` does with
/// the process environment and signals; tests and local runtimes use it directly).
pub async fn run_with(
    module: Module,
    arg: Option<String>,
    mut vars: std::collections::HashMap<String, String>,
    stop: Arc<Notify>,
) -> Result<(), HeadError> {
    match (arg.as_deref(), vars.get("CHIMERA_HEAD").map(String::as_str)) {
        (Some(a), Some(env)) if a != env => {
            return Err(HeadError::Usage(format!(
                "the command line says {a:?} but CHIMERA_HEAD says {env:?}"
            )));
        }
        (Some(a @ ("query" | "worker")), _) => {
            vars.insert("CHIMERA_HEAD".into(), a.to_owned());
        }
        (Some(other), _) => {
            return Err(HeadError::Usage(format!(
                "unknown head {other:?}: expected `query` or `worker`"
            )));
        }
        (None, _) => {}
    }
    let config = HeadConfig::from_vars(&vars)?;
    let url = config
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}.db", config.domain));
    let db = Database::connect(&url, module.migrations).await?;
    let (stop, deadline) = drain_deadline(stop, config.drain.map(drain_budget));
    let head = async {
        match config.head {
            Head::Query => run_query(&config, &module, db, stop).await,
            Head::Worker => run_worker(&config, &module, db, stop).await,
        }
    };
    tokio::select! {
        outcome = head => outcome,
        budget = deadline => {
            tracing::warn!(?budget, "the drain overran its budget: stopping before the kill");
            Err(HeadError::DrainOverrun(budget))
        }
    }
}

/// What of the `drain` seconds a head spends draining: the rest (a tenth, at least a second,
/// at most half) is for closing the connection and sending the last logs and spans.
pub fn drain_budget(drain: Duration) -> Duration {
    let margin = (drain / 10).max(Duration::from_secs(1)).min(drain / 2);
    drain - margin
}

/// Forwards `stop` to the stop the head waits on, and completes `budget` after it (never
/// without a budget).
fn drain_deadline(
    stop: Arc<Notify>,
    budget: Option<Duration>,
) -> (Arc<Notify>, impl Future<Output = Duration>) {
    let head_stop = Arc::new(Notify::new());
    let forward = head_stop.clone();
    let deadline = async move {
        stop.notified().await;
        forward.notify_one();
        match budget {
            Some(budget) => {
                tokio::time::sleep(budget).await;
                budget
            }
            None => std::future::pending().await,
        }
    };
    (head_stop, deadline)
}

fn readiness(db: &Database) -> ServerOptions {
    let db = db.clone();
    ServerOptions::new().readiness(move || {
        let db = db.clone();
        async move { db.ping().await.map_err(|e| e.to_string()) }
    })
}

async fn run_query(
    config: &HeadConfig,
    module: &Module,
    db: Database,
    stop: Arc<Notify>,
) -> Result<(), HeadError> {
    let app = router((module.query)(db.clone()), readiness(&db));
    serve(config.http_addr, app, async move { stop.notified().await }).await?;
    Ok(())
}

async fn run_worker(
    config: &HeadConfig,
    module: &Module,
    db: Database,
    stop: Arc<Notify>,
) -> Result<(), HeadError> {
    let worker_config = config
        .worker
        .clone()
        .ok_or(ConfigError::Missing("CHIMERA_WORKER_QUEUE"))?;
    let connection = connect(
        &config.amqp_url,
        &format!("{}-worker {}", config.domain, config.instance),
    )
    .await?;
    let publisher = Publisher::open(&connection).await?;
    let metrics = crate::http::HttpMetrics::new();
    let worker = Arc::new(
        (module.worker)(Worker::new(
            worker_config,
            config.domain.clone(),
            config.events_exchange.clone(),
        ))
        .with_metrics(metrics.clone()),
    );

    let (relay_wake, relay_stop, worker_stop, http_stop) = (
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
    );
    let relay = tokio::spawn(run_relay(
        db.clone(),
        publisher.clone(),
        RelaySettings::default(),
        relay_wake.clone(),
        relay_stop.clone(),
        Duration::from_secs(1),
        metrics.outbox_pending.clone(),
    ));
    // Set once the head is asked to stop: it drains, and says so on /readyz.
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let http = {
        // Ready when the database answers and the broker connection is up, until the stop.
        let (db_check, status) = (db.clone(), connection.status().clone());
        let stopping = stopping.clone();
        let options = ServerOptions {
            metrics,
            ..ServerOptions::new()
        }
        .readiness(move || {
            let (db, status) = (db_check.clone(), status.clone());
            let stopping = stopping.load(std::sync::atomic::Ordering::Relaxed);
            async move {
                if stopping {
                    return Err("stopping: finishing the messages in flight".to_owned());
                }
                if !status.connected() {
                    return Err("the broker connection is down (recovering)".to_owned());
                }
                db.ping().await.map_err(|e| e.to_string())
            }
        });
        let app = router(Router::new(), options);
        let (addr, http_stop) = (config.http_addr, http_stop.clone());
        tokio::spawn(
            async move { serve(addr, app, async move { http_stop.notified().await }).await },
        )
    };
    {
        let worker_stop = worker_stop.clone();
        tokio::spawn(async move {
            stop.notified().await;
            stopping.store(true, std::sync::atomic::Ordering::Relaxed);
            worker_stop.notify_one();
        });
    }
    let outcome = worker
        .run(
            db,
            &connection,
            publisher,
            relay_wake,
            worker_stop,
            &config.instance,
        )
        .await;
    tracing::info!("worker stopped consuming; flushing the outbox");
    relay_stop.notify_one();
    let _ = relay.await;
    let _ = connection.close(200, "worker stopped".into()).await;
    http_stop.notify_one();
    let _ = http.await;
    outcome.map_err(HeadError::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::Program;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn the_drain_keeps_a_margin_to_close_and_flush() {
        let s = Duration::from_secs;
        assert_eq!(drain_budget(s(60)), s(54));
        assert_eq!(drain_budget(s(25)), Duration::from_millis(22_500));
        assert_eq!(drain_budget(s(5)), s(4));
        assert_eq!(drain_budget(s(1)), Duration::from_millis(500));
        assert_eq!(drain_budget(s(0)), s(0));
    }

    fn slow_routes(_: Database) -> Router {
        Router::new().route(
            "/slow",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        )
    }

    fn module() -> Module {
        Module {
            program: Program {
                name: "drain",
                version: "0",
                about: "a head that drains",
            },
            migrations: &[],
            query: slow_routes,
            worker: |w| w,
        }
    }

    /// A query head on a SQLite file and a free port, stopped by `stop`.
    fn query_head(
        drain: Option<&str>,
    ) -> (
        std::net::SocketAddr,
        impl Future<Output = Result<(), HeadError>>,
        Arc<Notify>,
    ) {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap_or_else(|e| panic!("a free port: {e}"));
        let file = std::env::temp_dir().join(format!("chimera-drain-{}.db", uuid::Uuid::new_v4()));
        let mut vars: std::collections::HashMap<String, String> = [
            ("CHIMERA_HEAD", "query".to_owned()),
            ("CHIMERA_DOMAIN", "drain".to_owned()),
            ("CHIMERA_HTTP_ADDR", addr.to_string()),
            (
                "CHIMERA_AMQP_URL",
                "amqp://unused:unused@127.0.0.1:1/%2f".to_owned(),
            ),
            (
                "CHIMERA_DATABASE_URL",
                format!("sqlite://{}", file.display()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        if let Some(d) = drain {
            vars.insert("CHIMERA_DRAIN_SECONDS".into(), d.to_owned());
        }
        let stop = Arc::new(Notify::new());
        (addr, run_with(module(), None, vars, stop.clone()), stop)
    }

    /// Sends a request to `/slow` once the head listens, and keeps the connection open.
    async fn request_in_flight(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
        for _ in 0..200 {
            if let Ok(mut c) = tokio::net::TcpStream::connect(addr).await {
                c.write_all(b"GET /slow HTTP/1.1\r\nhost: head\r\n\r\n")
                    .await
                    .unwrap_or_else(|e| panic!("request: {e}"));
                tokio::time::sleep(Duration::from_millis(200)).await;
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the head never listened on {addr}");
    }

    #[tokio::test]
    async fn a_head_that_cannot_drain_in_time_stops_before_its_kill() {
        let (addr, head, stop) = query_head(Some("2"));
        let head = tokio::spawn(head);
        let _connection = request_in_flight(addr).await;
        stop.notify_one();
        let outcome = head.await.unwrap_or_else(|e| panic!("{e}"));
        assert!(
            matches!(outcome, Err(HeadError::DrainOverrun(b)) if b == Duration::from_secs(1)),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn a_head_with_nothing_in_flight_stops_cleanly_within_its_budget() {
        let (addr, head, stop) = query_head(Some("2"));
        let head = tokio::spawn(head);
        // Up and answering first.
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.notify_one();
        let outcome = head.await.unwrap_or_else(|e| panic!("{e}"));
        assert!(outcome.is_ok(), "{outcome:?}");
    }
}
