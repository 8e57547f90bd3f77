//! The `chimera` command line: the arguments of each command and where it goes. What a command
//! does lives in `chimera_core` (pure) and `chimera_runtime` (I/O); the files here parse, call
//! and print.
//!
//! Commands: `up`, `status`, `load` (the local runtime, [`local`]), `operator` ([`operator`]),
//! `crd` and `validate` ([`manifests`]), `topology plan|diff|migrate|apply` ([`topology`]),
//! `publish` ([`publish`]), `sim` ([`sim`]) and `conformance` ([`conformance`]).

pub mod conformance;
pub mod local;
pub mod manifests;
pub mod operator;
pub mod publish;
pub mod sim;
pub mod topology;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Chimera: event-driven domain modules on Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "chimera", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CHIMERA_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How logs are written.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// What `chimera` does.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the ChimeraModule CustomResourceDefinition (YAML).
    Crd,
    /// Check ChimeraModule YAML offline with the API server's rules; exit 1 on any problem.
    Validate(manifests::ValidateArgs),
    /// Plan, diff and declare the RabbitMQ topology of ChimeraModules without Kubernetes.
    #[command(subcommand)]
    Topology(topology::TopologyCommand),
    /// Send a command (or, with --event, an event) in the contract's envelope and wait for the
    /// broker's confirm; fails when no queue is bound for it.
    Publish(publish::PublishArgs),
    /// Run the modules of a directory on this machine: broker, topology, heads as processes,
    /// balancers, autoscaling and a dashboard (see README).
    Up(chimera_runtime::local::UpArgs),
    /// Marketplace traffic against a running `chimera up`, at a rate that follows a profile.
    Load(chimera_runtime::local::load::LoadArgs),
    /// What a running `chimera up` runs: heads, replicas, queues, latencies, base URLs.
    Status(local::StatusArgs),
    /// Run an autoscaling scenario in the reference model and score a policy (see
    /// docs/autoscaling.md and bench/autoscale/).
    Sim(sim::SimArgs),
    /// Run a module's heads on a broker and database of their own and check each clause of the
    /// head contract (docs/contract.md); exit 1 on any failure.
    Conformance(chimera_runtime::conformance::ConformanceArgs),
    /// Run the operator against the cluster of the current kubeconfig.
    Operator(operator::OperatorArgs),
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Crd => manifests::crd(),
        Command::Validate(args) => manifests::validate(&args),
        Command::Topology(command) => topology::run(command).await,
        Command::Publish(args) => publish::run(&args).await,
        Command::Up(args) => chimera_runtime::local::up(args).await,
        Command::Load(args) => local::load(&args).await,
        Command::Status(args) => local::status(&args).await,
        Command::Sim(args) => sim::run(&args),
        Command::Conformance(args) => conformance::run(&args).await,
        Command::Operator(args) => {
            init_tracing(cli.log_format);
            operator::run(args).await
        }
    }
}

/// Installs the tracing subscriber (RUST_LOG filters; default `info`).
fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours for a terminal only: a log file or a pod's log gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Writes `text` to stdout. A reader that left early (`chimera crd | head`) is not an error:
/// the rest of the output is not wanted.
pub fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("writing to stdout"))
        }
        _ => Ok(()),
    }
}

/// Exit 0 on success, 1 otherwise.
fn exit(success: bool) -> ExitCode {
    if success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
