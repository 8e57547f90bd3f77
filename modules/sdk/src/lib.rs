//! The shared body of a Chimera module: what every head gets without writing it.
//!
//! - [`broker`]: RabbitMQ with automatic recovery and publisher confirms;
//! - [`head`]: `main` of a module binary: runs the query or the worker head;
//! - [`config`]: the head contract's environment, validated at start;
//! - [`db`]: the domain's database (SQLite or MySQL/MariaDB) with migrations;
//! - [`envelope`]: the message envelope, headers and trace context;
//! - [`inbox`] / [`outbox`]: effectively-once handling and reliable event publishing;
//! - [`http`]: the HTTP server every head runs (health, readiness, metrics, JSON errors);
//! - [`worker`]: the worker runtime (dispatch, retries, dead letters, graceful stop);
//! - [`validate`]: payload checks every domain needs;
//! - [`shutdown`]: SIGTERM / Ctrl-C as a future;
//! - [`telemetry`]: logs, and traces over OTLP when an endpoint is configured;
//! - [`usage`]: the program's command line (`query|worker`, `--help`, `--version`).
#![forbid(unsafe_code)]

pub mod config;
pub mod db;
pub mod head;
pub mod http;
pub mod inbox;
pub mod outbox;
pub mod shutdown;
pub mod telemetry;
pub mod usage;
pub mod validate;
pub mod worker;

/// The web framework of the query head's routes (the same version the SDK uses).
pub use axum;
/// RabbitMQ with automatic recovery and publisher confirms (shared with the control plane).
pub use chimera_broker as broker;
/// The head contract: names, environment, head kinds, metrics.
pub use chimera_contract as contract;
/// The message envelope and headers of the head contract.
pub use chimera_contract::envelope;
/// Futures helpers (handlers return boxed futures).
pub use futures;
/// The AMQP client the SDK uses, for code that needs it directly (tests, tools).
pub use lapin;
/// The SQL toolkit modules write their queries with (the same version the SDK uses).
pub use sqlx;
