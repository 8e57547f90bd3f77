//! The `chimera` command line: `up`, `status`, `load` (the local runtime), `operator`, `crd`,
//! `validate`, `topology plan|diff|migrate|apply`, `publish` and `sim`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use crate::api::crd::chimera_module_crd_yaml;
use crate::api::validation::modules_from_yaml;
use crate::api::validation::{DocumentReport, validate_yaml};
use crate::api::{ChimeraModule, SecretKeyRef};
use crate::controller::{OperatorConfig, Scope};
use crate::topology::broker::BrokerEndpoint;
use crate::topology::declare::{apply, current_diff};
use crate::topology::migrate::migrate;
use crate::topology::render::{Format, render, render_conflicts, render_diff};
use crate::workloads::WorkloadSettings;

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
    Validate {
        /// Files or directories (every *.yaml / *.yml inside) to check.
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        paths: Vec<PathBuf>,
    },
    /// Plan, diff and declare the RabbitMQ topology of ChimeraModules without Kubernetes.
    #[command(subcommand)]
    Topology(TopologyCommand),
    /// Send a command (or, with --event, an event) in the contract's envelope and wait for the
    /// broker's confirm; fails when no queue is bound for it.
    Publish {
        /// The domain whose commands (or events) exchange receives it.
        #[arg(long)]
        domain: String,
        /// The command or event name (also the routing key).
        #[arg(long = "type")]
        kind: String,
        /// The payload, a JSON object.
        #[arg(long, default_value = "{}")]
        data: String,
        /// Message id (a UUID; default: a new one). Reuse one to test idempotency.
        #[arg(long)]
        id: Option<String>,
        /// Publish on the domain's events exchange instead of its commands exchange.
        #[arg(long)]
        event: bool,
        /// AMQP URL with the vhost.
        #[arg(long = "amqp", env = "CHIMERA_AMQP_URL")]
        amqp: String,
    },
    /// Run the modules of a directory on this machine: broker, topology, heads as processes,
    /// balancers, autoscaling and a dashboard (see README).
    Up(crate::local::UpArgs),
    /// Marketplace traffic against a running `chimera up`, at a rate that follows a profile.
    Load(crate::local::load::LoadArgs),
    /// What a running `chimera up` runs: heads, replicas, queues, latencies, base URLs.
    Status {
        /// The state directory of that `chimera up`.
        #[arg(long, default_value = ".chimera")]
        state_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run an autoscaling scenario in the reference model and score a policy (see
    /// docs/autoscaling.md and bench/autoscale/).
    Sim(SimArgs),
    /// Run the operator against the cluster of the current kubeconfig.
    Operator {
        /// Watch one namespace only (default: all namespaces).
        #[arg(long, env = "CHIMERA_WATCH_NAMESPACE")]
        namespace: Option<String>,
        /// The broker the operator declares topology on (modules may name their own in
        /// spec.broker). Without it, RabbitMQ topology is not managed.
        #[arg(long, env = "CHIMERA_AMQP_URL")]
        amqp_url: Option<String>,
        /// Management API of that broker (default: its host, port 15672, same credentials).
        #[arg(long, env = "CHIMERA_RABBITMQ_MANAGEMENT_URL")]
        management_url: Option<String>,
        /// Seconds between drift checks of each module's topology.
        #[arg(long, default_value_t = 30)]
        topology_resync_seconds: u64,
        /// Secret (`name` or `name/key`, key defaults to `url`) in each module's namespace that
        /// holds the AMQP URL of modules without spec.broker.
        #[arg(
            long,
            default_value = "chimera-broker/url",
            env = "CHIMERA_DEFAULT_BROKER_SECRET"
        )]
        default_broker_secret: String,
        /// The autoscaler's tick in milliseconds; 0 turns the autoscaler off (replicas then
        /// stay within spec bounds where they are).
        #[arg(long, default_value_t = 1000, env = "CHIMERA_AUTOSCALE_INTERVAL_MS")]
        autoscale_interval_ms: u64,
        /// Seconds a new pod takes to serve, which the control laws plan around.
        #[arg(long, default_value_t = 10.0)]
        pod_startup_seconds: f64,
        /// Where to serve /metrics and /healthz (empty: nowhere).
        #[arg(long, default_value = "0.0.0.0:9090", env = "CHIMERA_METRICS_ADDR")]
        metrics_addr: String,
    },
}

/// `chimera topology ...`
#[derive(Debug, Subcommand)]
pub enum TopologyCommand {
    /// Print the topology the modules need and what is wrong with it; exit 1 on errors.
    Plan {
        /// Files or directories of ChimeraModule YAML.
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        paths: Vec<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
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

/// Where the broker is, for `topology apply` and `topology diff`.
#[derive(Debug, clap::Args)]
pub struct BrokerArgs {
    /// AMQP URL with the vhost, e.g. amqp://user:pass@host:5672/%2f
    #[arg(long = "amqp", env = "CHIMERA_AMQP_URL")]
    pub amqp: String,
    /// Management API URL (default: the AMQP host on port 15672, same credentials).
    #[arg(long = "management", env = "CHIMERA_RABBITMQ_MANAGEMENT_URL")]
    pub management: Option<String>,
}

/// Parses `name` or `name/key`.
pub fn parse_secret_key_ref(s: &str) -> anyhow::Result<SecretKeyRef> {
    let (name, key) = s.split_once('/').unwrap_or((s, "url"));
    anyhow::ensure!(
        !name.is_empty() && !key.is_empty(),
        "expected NAME or NAME/KEY, got {s:?}"
    );
    Ok(SecretKeyRef {
        name: name.to_owned(),
        key: key.to_owned(),
    })
}

/// Installs the tracing subscriber (RUST_LOG filters; default `info`).
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Crd => {
            print!(
                "{}",
                chimera_module_crd_yaml().context("rendering the CRD")?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { paths } => validate(&paths),
        Command::Sim(args) => simulate(&args),
        Command::Up(args) => crate::local::up(args).await,
        Command::Load(args) => {
            let summary = crate::local::load::load(&args).await?;
            crate::local::load::print(&summary, args.json)?;
            Ok(if summary.errors == 0 && summary.read_errors == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Status { state_dir, json } => status(&state_dir, json).await,
        Command::Topology(TopologyCommand::Plan { paths, format }) => {
            let Some(modules) = read_modules(&paths)? else {
                return Ok(ExitCode::FAILURE);
            };
            let plan = crate::topology::plan::plan(&modules);
            print!("{}", render(&plan, format));
            Ok(exit(!plan.has_errors()))
        }
        Command::Topology(TopologyCommand::Diff {
            paths,
            broker,
            json,
        }) => {
            let Some((plan, endpoint)) = plan_for_broker(&paths, &broker)? else {
                return Ok(ExitCode::FAILURE);
            };
            let diff = current_diff(&endpoint, &plan).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&diff)?);
            } else {
                print!("{}", render_diff(&diff));
            }
            Ok(exit(diff.is_converged() && !diff.has_conflicts()))
        }
        Command::Topology(TopologyCommand::Migrate {
            paths,
            broker,
            queue,
            drain_timeout_seconds,
        }) => {
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
        Command::Topology(TopologyCommand::Apply {
            paths,
            broker,
            json,
        }) => {
            let Some((plan, endpoint)) = plan_for_broker(&paths, &broker)? else {
                return Ok(ExitCode::FAILURE);
            };
            let report = apply(&endpoint, &plan).await?;
            if json {
                let out = serde_json::json!({"report": report, "findings": plan.findings});
                println!("{}", serde_json::to_string_pretty(&out)?);
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
                        "{:?}: {}: {:?}: {}",
                        f.severity, f.module, f.code, f.message
                    );
                }
            }
            Ok(exit(!plan.has_errors() && !report.diff.has_conflicts()))
        }
        Command::Publish {
            domain,
            kind,
            data,
            id,
            event,
            amqp,
        } => publish(&domain, &kind, &data, id.as_deref(), event, &amqp).await,
        Command::Operator {
            namespace,
            amqp_url,
            management_url,
            topology_resync_seconds,
            default_broker_secret,
            autoscale_interval_ms,
            pod_startup_seconds,
            metrics_addr,
        } => {
            init_tracing(cli.log_format);
            let broker = amqp_url
                .map(|url| BrokerEndpoint::new(&url, management_url.as_deref()))
                .transpose()
                .context("--amqp-url")?;
            let config = OperatorConfig {
                scope: namespace.map(Scope::Namespace).unwrap_or_default(),
                workloads: WorkloadSettings {
                    default_broker: parse_secret_key_ref(&default_broker_secret)
                        .context("--default-broker-secret")?,
                },
                broker,
                topology_resync: Some(std::time::Duration::from_secs(
                    topology_resync_seconds.max(1),
                )),
                autoscale: (autoscale_interval_ms > 0).then(|| crate::scaler::ScalerSettings {
                    interval: std::time::Duration::from_millis(autoscale_interval_ms),
                    startup_seconds: pod_startup_seconds.max(0.0),
                }),
                metrics_addr: if metrics_addr.is_empty() {
                    None
                } else {
                    Some(metrics_addr.parse().with_context(|| {
                        format!("--metrics-addr {metrics_addr:?} is not HOST:PORT")
                    })?)
                },
            };
            let client = kube::Client::try_default().await.context(
                "connecting to Kubernetes (is KUBECONFIG set? `scripts/dev-env up` prints it)",
            )?;
            crate::controller::run(client, config).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn publish(
    domain: &str,
    kind: &str,
    data: &str,
    id: Option<&str>,
    event: bool,
    amqp: &str,
) -> anyhow::Result<ExitCode> {
    use chimera_sdk::broker::{Outgoing, Publisher, connect};
    use chimera_sdk::envelope::{Envelope, TraceParent};

    let data: serde_json::Value = serde_json::from_str(data).context("--data is not JSON")?;
    anyhow::ensure!(data.is_object(), "--data must be a JSON object, got {data}");
    let mut envelope = Envelope::new(kind, data);
    if let Some(id) = id {
        envelope.id = id
            .parse()
            .with_context(|| format!("--id {id:?} is not a UUID"))?;
    }
    let exchange = if event {
        chimera_contract::names::events_exchange(domain)
    } else {
        chimera_contract::names::commands_exchange(domain)
    };
    let mut message = Outgoing::new(exchange.clone(), envelope);
    message.trace = Some(TraceParent::new_root());
    let connection = connect(amqp, "chimera-publish").await?;
    let outcome = async {
        let publisher = Publisher::open(&connection).await?;
        publisher.publish(&message, true).await
    }
    .await;
    let _ = connection.close(200, "published".into()).await;
    outcome?;
    println!(
        "published {kind} (id {}) on {exchange}; confirmed by the broker",
        message.envelope.id
    );
    Ok(ExitCode::SUCCESS)
}

fn exit(success: bool) -> ExitCode {
    if success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Expands directories into the YAML files they hold, sorted for stable output.
pub fn yaml_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut inside: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("reading directory {}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
                .collect();
            inside.sort();
            files.extend(inside);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

/// The plan of the modules in `paths` and the broker to compare it with; None (after printing
/// why) when a manifest is invalid.
fn plan_for_broker(
    paths: &[PathBuf],
    broker: &BrokerArgs,
) -> anyhow::Result<Option<(crate::topology::plan::TopologyPlan, BrokerEndpoint)>> {
    let Some(modules) = read_modules(paths)? else {
        return Ok(None);
    };
    let endpoint = BrokerEndpoint::new(&broker.amqp, broker.management.as_deref())?;
    Ok(Some((crate::topology::plan::plan(&modules), endpoint)))
}

/// Reads every valid ChimeraModule in `paths`. Prints each problem to stderr and returns None
/// when a manifest is invalid: planning half a set of modules would mislead.
fn read_modules(paths: &[PathBuf]) -> anyhow::Result<Option<Vec<ChimeraModule>>> {
    let mut modules = Vec::new();
    let mut problems = 0;
    for file in yaml_files(paths)? {
        let source = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let (found, bad) = modules_from_yaml(&source);
        for problem in &bad {
            eprintln!("{}: {problem}", file.display());
        }
        problems += bad.len();
        modules.extend(found);
    }
    if problems > 0 {
        eprintln!("{problems} problem(s) in the manifests; fix them first (`chimera validate`)");
        return Ok(None);
    }
    if modules.is_empty() {
        eprintln!("no ChimeraModule found in the given paths");
        return Ok(None);
    }
    Ok(Some(modules))
}

fn validate(paths: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let mut problems = 0usize;
    let mut modules = 0usize;
    for file in yaml_files(paths)? {
        let source = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        for report in validate_yaml(&source) {
            modules += usize::from(report.checked);
            problems += report.errors.len();
            print_report(&file, &report);
        }
    }
    if problems > 0 {
        println!("{problems} problem(s) found");
        return Ok(ExitCode::FAILURE);
    }
    if modules == 0 {
        println!("no ChimeraModule found in the given paths");
        return Ok(ExitCode::FAILURE);
    }
    println!("{modules} ChimeraModule(s) valid");
    Ok(ExitCode::SUCCESS)
}

fn print_report(file: &Path, report: &DocumentReport) {
    let what = report
        .object
        .clone()
        .unwrap_or_else(|| format!("document {}", report.index));
    if !report.checked {
        return;
    }
    if report.errors.is_empty() {
        println!("{}: {what}: valid", file.display());
    }
    for error in &report.errors {
        println!("{}: {what}: {error}", file.display());
    }
}

async fn status(state_dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    use crate::local::snapshot::{Snapshot, UpFile};
    let up = UpFile::read(state_dir)?;
    let url = format!("{}/api/status", up.dashboard);
    let snapshot: Snapshot = reqwest::get(&url)
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("chimera up (pid {}) does not answer at {url}", up.pid))?
        .json()
        .await
        .context("reading chimera up's status")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&snapshot)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "chimera up: {} s, broker {}, dashboard {}",
        snapshot.uptime_s.round(),
        snapshot.broker,
        up.dashboard
    );
    for m in &snapshot.modules {
        for h in &m.heads {
            let detail = match (&h.url, &h.queue) {
                (Some(url), _) => {
                    let latency = h
                        .history
                        .last()
                        .and_then(|p| p.latency_ms)
                        .map(|l| {
                            format!(", p50 {:.1} ms p95 {:.1} ms p99 {:.1} ms", l[0], l[1], l[2])
                        })
                        .unwrap_or_default();
                    format!("{url}{latency}")
                }
                (None, Some(queue)) => format!(
                    "{queue}: {} messages",
                    h.queue_depth.map_or("?".to_owned(), |d| format!("{d:.0}"))
                ),
                (None, None) => String::new(),
            };
            let reason = h.current.as_ref().map(|d| d.reason.as_str()).unwrap_or("");
            println!(
                "{:<10} {:<6} {:>2}/{:<2} ready  [{}..{}]  {detail}\n{:>22}{reason}",
                m.domain, h.head, h.ready, h.replicas, h.min, h.max, ""
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `chimera sim`
#[derive(Debug, clap::Args)]
pub struct SimArgs {
    /// The scenario JSON (its trace CSV is read relative to it).
    #[arg(long)]
    scenario: PathBuf,
    /// The policy.
    #[arg(long, value_enum, default_value = "chimera")]
    policy: crate::sim::policy::PolicyName,
    /// The policy's knob: KEDA's messages per replica (default 20), KPA's target
    /// utilisation in percent (default 70). Chimera has none.
    #[arg(long)]
    knob: Option<f64>,
    /// Write `t_s,existing,ready` per second here.
    #[arg(long)]
    timeline: Option<PathBuf>,
    /// Write the load and the head's backlog or latency per second here.
    #[arg(long)]
    signals: Option<PathBuf>,
    /// Print the metrics as JSON.
    #[arg(long)]
    json: bool,
    /// Print every scaling decision with its reason.
    #[arg(long)]
    decisions: bool,
}

fn simulate(args: &SimArgs) -> anyhow::Result<ExitCode> {
    use crate::sim::{policy, run, scenario::Scenario, signals_csv, timeline_csv};
    let scenario = Scenario::load(&args.scenario)?;
    if args.knob.is_some() && args.policy == policy::PolicyName::Chimera {
        anyhow::bail!("the chimera policy has no knob: it runs its one default configuration");
    }
    let knob = args.knob.or(args.policy.default_knob());
    let name = format!("{:?}", args.policy).to_lowercase();
    let result = run(
        &scenario,
        policy::build(args.policy, &scenario, knob),
        &name,
        knob,
    );
    let write = |path: &PathBuf, text: String| {
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
    };
    if let Some(path) = &args.timeline {
        write(path, timeline_csv(&result))?;
    }
    if let Some(path) = &args.signals {
        write(path, signals_csv(&result, scenario.head))?;
    }
    if args.decisions {
        for (t, replicas, reason) in &result.decisions {
            eprintln!("t={t:>5}s -> {replicas:>3}: {reason}");
        }
    }
    let m = &result.metrics;
    if args.json {
        println!("{}", serde_json::to_string_pretty(m)?);
    } else {
        println!(
            "{} / {}{}: {} s over the SLO, {:.0} replica-seconds ({:.2} x the lower bound {:.0}), {} scale actions, peak {} replicas",
            m.scenario,
            m.policy,
            m.knob.map(|k| format!(" ({k})")).unwrap_or_default(),
            m.slo_violation_s,
            m.replica_seconds,
            m.cost_ratio,
            m.lower_bound,
            m.scale_actions,
            m.peak_replicas
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_refs_parse_with_a_default_key() {
        let r = parse_secret_key_ref("mq").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.name.as_str(), r.key.as_str()), ("mq", "url"));
        let r = parse_secret_key_ref("mq/amqp").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.name.as_str(), r.key.as_str()), ("mq", "amqp"));
        assert!(parse_secret_key_ref("/x").is_err());
        assert!(parse_secret_key_ref("x/").is_err());
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
