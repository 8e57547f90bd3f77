//! `chimera-bench worker|query|control-plane|replay`: the SDK and the operator against baselines
//! measured in the same run on the same machine, reported as ratios (see bench/README.md).

mod control_plane;
mod query;
mod replay;
mod worker;

use clap::{Parser, Subcommand};

/// Benchmarks of the module SDK.
#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Worker pipeline (decode, handler, SQLite write with inbox and outbox, ack, events relayed)
    /// against raw lapin consume+ack on the same kind of queue.
    Worker {
        /// Messages per run.
        #[arg(long, default_value_t = 20_000)]
        messages: usize,
        /// Rounds (baseline then pipeline each); the median ratio is reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// AMQP URL of the broker (its management API must be on the usual port or given).
        #[arg(long, env = "CHIMERA_AMQP_URL")]
        amqp: String,
        /// Management API URL.
        #[arg(long, env = "CHIMERA_RABBITMQ_MANAGEMENT_URL")]
        management: Option<String>,
    },
    /// Query head `GET /orders/{id}` against a bare axum handler returning a constant.
    Query {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Concurrent connections of the closed-loop load generator.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
    },
    /// N modules created at once in the real API server: the operator's convergence, memory,
    /// CPU and API requests, against `kubectl apply --server-side` of the same objects.
    ControlPlane(control_plane::Args),
    /// One worker scenario replayed against real pods on the dev node, the simulator's
    /// prediction of the same arrivals beside it.
    Replay(replay::Args),
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match Cli::parse().command {
        Command::Worker {
            messages,
            rounds,
            amqp,
            management,
        } => runtime.block_on(worker::run(messages, rounds, &amqp, management.as_deref())),
        Command::Query {
            seconds,
            concurrency,
        } => runtime.block_on(query::run(seconds, concurrency)),
        Command::ControlPlane(args) => runtime.block_on(control_plane::run(args)),
        Command::Replay(args) => runtime.block_on(replay::run(args)),
    }
}
