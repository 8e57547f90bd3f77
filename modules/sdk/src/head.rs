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
    match config.head {
        Head::Query => run_query(&config, &module, db, stop).await,
        Head::Worker => run_worker(&config, &module, db, stop).await,
    }
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
    let http = {
        // Ready when the database answers and the broker connection is up.
        let (db_check, status) = (db.clone(), connection.status().clone());
        let options = ServerOptions {
            metrics,
            ..ServerOptions::new()
        }
        .readiness(move || {
            let (db, status) = (db_check.clone(), status.clone());
            async move {
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
