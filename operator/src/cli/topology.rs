//! `chimera topology plan|diff|migrate|apply`: the topology manager without Kubernetes.

use std::path::PathBuf;
use std::process::ExitCode;

use chimera_core::api::ChimeraModule;
use chimera_core::api::manifests::load;
use chimera_core::topology::plan::{TopologyPlan, plan};
use chimera_core::topology::render::{Format, render, render_conflicts, render_diff};
use chimera_core::topology::state::BrokerEndpoint;
use chimera_runtime::topology::declare::{apply, current_diff};
use chimera_runtime::topology::migrate::migrate;

use super::exit;

/// `chimera topology ...`
#[derive(Debug, clap::Subcommand)]
pub enum TopologyCommand {
    /// Print the topology the modules need and what is wrong with it; exit 1 on errors.
    Plan {
        /// Files or directories of ChimeraModule YAML.
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        paths: Vec<PathBuf>,
        /// Output format: text, json, mermaid, dot or asyncapi (an AsyncAPI 3.0 document).
        #[arg(long, default_value = "text")]
        format: Format,
    },
    /// Show what `apply` would change on the broker (and what it cannot change); exit 1 when
    /// the broker differs from the plan.
    Diff {
        /// Files or directories of ChimeraModule YAML.
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        broker: BrokerArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild queues whose immutable arguments changed (type, TTL, length...) under the same
    /// name without losing a message (see docs/topology.md); resumes an interrupted run.
    Migrate {
        /// Files or directories of ChimeraModule YAML.
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        broker: BrokerArgs,
        /// Only this queue (default: every queue whose arguments differ).
        #[arg(long)]
        queue: Option<String>,
        /// Longest wait for a queue to empty (its consumers to settle what they hold).
        #[arg(long, default_value_t = 300)]
        drain_timeout_seconds: u64,
    },
    /// Declare the plan on the broker, idempotently: create what is missing, unbind what left
    /// the spec; exit 1 on plan errors or conflicts it must not resolve by itself.
    Apply {
        /// Files or directories of ChimeraModule YAML.
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        broker: BrokerArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Where the broker is, for `topology apply`, `diff` and `migrate`.
#[derive(Debug, clap::Args)]
pub struct BrokerArgs {
    /// AMQP URL with the vhost, e.g. amqp://user:pass@host:5672/%2f
    #[arg(long = "amqp", env = "CHIMERA_AMQP_URL")]
    pub amqp: String,
    /// Management API URL (default: the AMQP host on port 15672, same credentials).
    #[arg(long = "management", env = "CHIMERA_RABBITMQ_MANAGEMENT_URL")]
    pub management: Option<String>,
}

/// Runs one topology command.
pub async fn run(command: TopologyCommand) -> anyhow::Result<ExitCode> {
    match command {
        TopologyCommand::Plan { paths, format } => {
            let Some(modules) = read_modules(&paths)? else {
                return Ok(ExitCode::FAILURE);
            };
            let plan = plan(&modules);
            super::print_out(&render(&modules, &plan, format))?;
            Ok(exit(!plan.has_errors()))
        }
        TopologyCommand::Diff {
            paths,
            broker,
            json,
        } => {
            let Some((plan, endpoint)) = plan_for_broker(&paths, &broker)? else {
                return Ok(ExitCode::FAILURE);
            };
            let diff = current_diff(&endpoint, &plan).await?;
            if json {
                super::print_out(&format!("{}\n", serde_json::to_string_pretty(&diff)?))?;
            } else {
                super::print_out(&render_diff(&diff))?;
            }
            Ok(exit(diff.is_converged() && !diff.has_conflicts()))
        }
        TopologyCommand::Migrate {
            paths,
            broker,
            queue,
            drain_timeout_seconds,
        } => {
            let Some((plan, endpoint)) = plan_for_broker(&paths, &broker)? else {
                return Ok(ExitCode::FAILURE);
            };
            let timeout = std::time::Duration::from_secs(drain_timeout_seconds);
            let done = migrate(&endpoint, &plan, queue.as_deref(), timeout).await?;
            if done.is_empty() {
                println!("no queue needs migrating");
            }
            for m in &done {
                println!(
                    "migrated {}: {} message(s) moved out and {} back",
                    m.queue, m.moved_out, m.moved_back
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        TopologyCommand::Apply {
            paths,
            broker,
            json,
        } => {
            let Some((plan, endpoint)) = plan_for_broker(&paths, &broker)? else {
                return Ok(ExitCode::FAILURE);
            };
            let report = apply(&endpoint, &plan).await?;
            if json {
                let out = serde_json::json!({"report": report, "findings": plan.findings});
                super::print_out(&format!("{}\n", serde_json::to_string_pretty(&out)?))?;
            } else {
                println!(
                    "declared {} exchange(s), {} queue(s), {} binding(s); removed {} stale binding(s)",
                    report.exchanges_declared,
                    report.queues_declared,
                    report.bindings_created,
                    report.bindings_removed
                );
                print!("{}", render_conflicts(&report.diff));
                for f in &plan.findings {
                    println!(
                        "{}: {}: {}: {}",
                        f.severity.as_str(),
                        f.module,
                        f.code.reason(),
                        f.message
                    );
                }
            }
            Ok(exit(!plan.has_errors() && !report.diff.has_conflicts()))
        }
    }
}

/// The plan of the modules in `paths` and the broker to compare it with; None (after printing
/// why) when a manifest is invalid.
fn plan_for_broker(
    paths: &[PathBuf],
    broker: &BrokerArgs,
) -> anyhow::Result<Option<(TopologyPlan, BrokerEndpoint)>> {
    let Some(modules) = read_modules(paths)? else {
        return Ok(None);
    };
    let endpoint = BrokerEndpoint::new(&broker.amqp, broker.management.as_deref())?;
    Ok(Some((plan(&modules), endpoint)))
}

/// Every valid ChimeraModule in `paths`. Prints each problem to stderr and returns None when a
/// manifest is invalid: planning half a set of modules would mislead.
fn read_modules(paths: &[PathBuf]) -> anyhow::Result<Option<Vec<ChimeraModule>>> {
    let loaded = load(paths)?;
    for problem in &loaded.problems {
        eprintln!("{problem}");
    }
    if !loaded.problems.is_empty() {
        eprintln!(
            "{} problem(s) in the manifests; fix them first (`chimera validate`)",
            loaded.problems.len()
        );
        return Ok(None);
    }
    if loaded.modules.is_empty() {
        eprintln!("no ChimeraModule found in the given paths");
        return Ok(None);
    }
    Ok(Some(loaded.modules))
}
