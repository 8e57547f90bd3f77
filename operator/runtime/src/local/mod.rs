//! `chimera up`: the modules of a directory on one machine, from the same YAML the operator
//! takes. The same topology manager declares the broker, each head runs as local processes of
//! the module's program (supervised, logs prefixed and kept under the state directory), a
//! balancer gives each query head one stable port, and the same control laws scale the heads on
//! real signals. `chimera status` reads what it serves on its dashboard port.

pub mod balancer;
pub mod head;
pub mod load;

pub mod process;
pub mod rabbit;
pub mod snapshot;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;

use crate::scaler::sources::{QueueSource, RabbitMq};
use crate::topology::declare;
use chimera_contract::names;
use chimera_core::api::ChimeraModule;
use chimera_core::local::plan::{self, LocalContext, program_name};
use chimera_core::topology::plan as topology_plan;
use chimera_core::topology::state::BrokerEndpoint;
use chimera_core::workloads::Head;
use head::HeadRunner;
use snapshot::{Snapshot, UpFile};

/// `chimera up` options.
#[derive(Clone, Debug, clap::Args)]
pub struct UpArgs {
    /// Directory (or file) of ChimeraModule YAML.
    #[arg(short = 'f', long = "filename", default_value = "examples/marketplace")]
    pub dir: PathBuf,
    /// Where databases, logs and the private broker live.
    #[arg(long, default_value = ".chimera")]
    pub state_dir: PathBuf,
    /// Port of the dashboard and of the API `chimera status` reads.
    #[arg(long, default_value_t = 7070)]
    pub dashboard_port: u16,
    /// The first query head's stable port; the others follow, in domain order.
    #[arg(long, default_value_t = 18080)]
    pub query_base_port: u16,
    /// Where to look for module programs first (then target/release, target/debug, PATH).
    #[arg(long)]
    pub bin_dir: Vec<PathBuf>,
    /// Seconds a new replica takes to serve, which the control laws plan around.
    #[arg(long, default_value_t = 2.0)]
    pub startup_seconds: f64,
    /// AMQP port of the private broker (when CHIMERA_AMQP_URL is not set).
    #[arg(long, default_value_t = 5682)]
    pub amqp_port: u16,
    /// Management port of the private broker.
    #[arg(long, default_value_t = 15682)]
    pub management_port: u16,
    /// Do not echo the heads' output (it is still in the state directory's logs/).
    #[arg(long)]
    pub quiet: bool,
}

/// Finds `program` in the given directories, the workspace's target directories, or PATH.
pub(crate) fn find_program(program: &str, bin_dirs: &[PathBuf]) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = bin_dirs.to_vec();
    if let Ok(target) = std::env::var("CARGO_TARGET_DIR") {
        dirs.push(PathBuf::from(&target).join("release"));
        dirs.push(PathBuf::from(target).join("debug"));
    }
    dirs.push(PathBuf::from("target/release"));
    dirs.push(PathBuf::from("target/debug"));
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter()
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .and_then(|p| p.canonicalize().ok())
}

/// Every module of the directory, or the problems found (and where).
fn load_modules(dir: &Path) -> anyhow::Result<(Vec<ChimeraModule>, BTreeMap<PathBuf, SystemTime>)> {
    let loaded = chimera_core::api::manifests::load(&[dir.to_path_buf()])?;
    if !loaded.problems.is_empty() {
        anyhow::bail!("invalid modules:\n  {}", loaded.problems.join("\n  "));
    }
    anyhow::ensure!(
        !loaded.modules.is_empty(),
        "no ChimeraModule in {}",
        dir.display()
    );
    Ok((loaded.modules, loaded.files.into_iter().collect()))
}

struct Running {
    runners: Vec<HeadRunner>,
    // domain -> (its balancer, where it listens, whom it serves): kept across reloads
    balancers: BTreeMap<String, (tokio::task::JoinHandle<()>, SocketAddr, balancer::Backends)>,
    ports: BTreeMap<String, u16>, // domain -> stable port
    /// Heads of reloaded modules still stopping.
    stopping: Vec<tokio::task::JoinHandle<()>>,
}

/// Runs until Ctrl-C / SIGTERM.
pub async fn up(args: UpArgs) -> anyhow::Result<ExitCode> {
    let origin = Instant::now();
    // Listening before anything starts: a Ctrl-C while the broker or the heads start is kept
    // for the loop (not lost when the process started with SIGINT ignored, nor the default
    // action killing `chimera up` with its heads left running).
    let mut shutdown = Shutdown::listen().context("listening for SIGINT and SIGTERM")?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let state_dir = args.state_dir.canonicalize()?;
    snapshot::recover(&state_dir)?;
    let (modules, mut mtimes) = load_modules(&args.dir)?;

    let mut private = None;
    let endpoint = match std::env::var("CHIMERA_AMQP_URL") {
        Ok(url) if !url.is_empty() => {
            let management = std::env::var("CHIMERA_RABBITMQ_MANAGEMENT_URL").ok();
            println!("chimera up: using the broker at CHIMERA_AMQP_URL");
            BrokerEndpoint::new(&url, management.as_deref())?
        }
        _ => {
            println!(
                "chimera up: starting a private RabbitMQ on 127.0.0.1:{}",
                args.amqp_port
            );
            let broker =
                rabbit::PrivateBroker::start(&state_dir, args.amqp_port, args.management_port)
                    .await
                    .map_err(anyhow::Error::msg)?;
            let endpoint = BrokerEndpoint::new(&broker.amqp_url, Some(&broker.management_url))?;
            private = Some(broker);
            endpoint
        }
    };
    let result = serve(
        &args,
        &state_dir,
        &endpoint,
        modules,
        &mut mtimes,
        origin,
        &mut shutdown,
    )
    .await;
    // The private broker stops whatever happened, so no node is left holding its ports.
    if let Some(broker) = private {
        broker.stop().await;
    }
    snapshot::clear(&state_dir);
    result.map(|()| ExitCode::SUCCESS)
}

/// Everything after the broker: dashboard, heads, the loop, and their clean stop.
async fn serve(
    args: &UpArgs,
    state_dir: &Path,
    endpoint: &BrokerEndpoint,
    modules: Vec<ChimeraModule>,
    mtimes: &mut BTreeMap<PathBuf, SystemTime>,
    origin: Instant,
    shutdown: &mut Shutdown,
) -> anyhow::Result<()> {
    let local = LocalContext {
        amqp_url: endpoint.amqp_url.clone(),
        state_dir: state_dir.display().to_string(),
    };
    let snapshot = Arc::new(RwLock::new(Snapshot::default()));
    let dashboard = snapshot::serve(
        SocketAddr::from(([127, 0, 0, 1], args.dashboard_port)),
        snapshot.clone(),
    )
    .await?;
    let up_file = UpFile {
        pid: std::process::id(),
        dashboard: format!("http://{dashboard}"),
        amqp_url: endpoint.amqp_url.clone(),
        pids: Vec::new(),
    };
    up_file.write(state_dir)?;
    println!("chimera up: dashboard at http://{dashboard}");

    let mut running = Running {
        runners: Vec::new(),
        balancers: BTreeMap::new(),
        ports: BTreeMap::new(),
        stopping: Vec::new(),
    };
    let mut domains: Vec<&str> = modules
        .iter()
        .filter(|m| m.spec.query.is_some())
        .map(ChimeraModule::domain)
        .collect();
    domains.sort_unstable();
    for domain in domains {
        query_port(args, &mut running.ports, domain);
    }
    let result = run(
        args,
        state_dir,
        endpoint,
        &local,
        modules,
        mtimes,
        &mut running,
        &snapshot,
        origin,
        &up_file,
        shutdown,
    )
    .await;
    println!("chimera up: stopping");
    futures::future::join_all(running.runners.iter_mut().map(HeadRunner::stop_all)).await;
    futures::future::join_all(running.stopping.drain(..)).await;
    for (task, _, _) in running.balancers.values() {
        task.abort();
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn run(
    args: &UpArgs,
    state_dir: &Path,
    endpoint: &BrokerEndpoint,
    local: &LocalContext,
    mut modules: Vec<ChimeraModule>,
    mtimes: &mut BTreeMap<PathBuf, SystemTime>,
    running: &mut Running,
    snapshot: &Arc<RwLock<Snapshot>>,
    origin: Instant,
    up_file: &UpFile,
    shutdown: &mut Shutdown,
) -> anyhow::Result<()> {
    declare_topology(endpoint, &modules).await?;
    for module in &modules {
        start_module(args, state_dir, local, module, running).await?;
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(800))
        .build()?;
    let queues = RabbitMq::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_watch = Instant::now();
    let mut written_pids = Vec::new();
    loop {
        tokio::select! {
            () = shutdown.requested() => return Ok(()),
            _ = tick.tick() => {}
        }
        let now = origin.elapsed().as_secs_f64();
        for runner in &mut running.runners {
            runner.supervise(&http).await;
            let decision = match runner.head {
                Head::Worker => {
                    let queue = names::worker_queue(runner.module.domain());
                    let sample = queues
                        .sample(endpoint, &queue)
                        .await
                        .map_err(|e| e.to_string());
                    runner.decide_worker(now, sample, &http).await
                }
                Head::Query => runner.decide_query(now, &http).await,
            };
            let bounded = decision.desired.clamp(
                runner.bounds().min,
                runner.bounds().max.max(runner.bounds().min),
            );
            runner.resize(bounded).await;
        }
        // The state file lists the heads' processes for crash recovery: rewritten when they change.
        let pids: Vec<u32> = running.runners.iter().flat_map(HeadRunner::pids).collect();
        if pids != written_pids {
            UpFile {
                pids: pids.clone(),
                ..up_file.clone()
            }
            .write(state_dir)?;
            written_pids = pids;
        }
        if let Ok(mut s) = snapshot.write() {
            s.update(now, &running.runners, endpoint);
        }
        if last_watch.elapsed() >= Duration::from_secs(2) {
            last_watch = Instant::now();
            if let Err(error) = reload_changed(
                args,
                state_dir,
                endpoint,
                local,
                &mut modules,
                mtimes,
                running,
            )
            .await
            {
                eprintln!("chimera up: {error:#}");
            }
        }
    }
}

async fn declare_topology(
    endpoint: &BrokerEndpoint,
    modules: &[ChimeraModule],
) -> anyhow::Result<()> {
    let plan = topology_plan::plan(modules);
    for finding in &plan.findings {
        eprintln!(
            "chimera up: topology: {}: {}",
            finding.module, finding.message
        );
    }
    let report = declare::apply(endpoint, &plan).await?;
    println!(
        "chimera up: topology declared ({} exchanges, {} queues, {} bindings created, {} removed)",
        report.exchanges_declared,
        report.queues_declared,
        report.bindings_created,
        report.bindings_removed
    );
    Ok(())
}

async fn start_module(
    args: &UpArgs,
    state_dir: &Path,
    local: &LocalContext,
    module: &ChimeraModule,
    running: &mut Running,
) -> anyhow::Result<()> {
    let program_name = program_name(module);
    let program = find_program(&program_name, &args.bin_dir).with_context(|| {
        format!(
            "module {}: no program {program_name:?} (from its image {:?}); build it (`cargo build -p chimera-{program_name}`), pass --bin-dir, or set the annotation {}",
            module.metadata.name.as_deref().unwrap_or_default(),
            module.spec.image,
            plan::LOCAL_BINARY_ANNOTATION
        )
    })?;
    let logs = state_dir.join("logs");
    for head in chimera_core::workloads::declared_heads(module) {
        let Some(mut runner) = HeadRunner::new(
            module.clone(),
            head,
            program.clone(),
            local.clone(),
            logs.clone(),
            !args.quiet,
            args.startup_seconds,
        ) else {
            continue;
        };
        if head == Head::Query {
            let domain = module.domain().to_owned();
            // A reloaded module keeps its balancer (and port); its new replicas join it.
            if let Some((_, addr, backends)) = running.balancers.get(&domain) {
                runner.front = Some(*addr);
                runner.backends = backends.clone();
            } else {
                let port = query_port(args, &mut running.ports, &domain);
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                    .await
                    .with_context(|| format!("the query head of {domain} needs port {port}"))?;
                let addr = listener.local_addr()?;
                runner.front = Some(addr);
                let task = tokio::spawn(balancer::serve(listener, runner.backends.clone()));
                running
                    .balancers
                    .insert(domain.clone(), (task, addr, runner.backends.clone()));
                println!("chimera up: {domain} query head on http://{addr}");
            }
        }
        let bounds = runner.bounds();
        let initial = match head {
            Head::Query => bounds.min.max(1),
            Head::Worker => bounds.min,
        };
        runner.resize(initial).await;
        running.runners.push(runner);
    }
    Ok(())
}

/// A stable port per domain: assigned once (in domain order at start, then in order of
/// appearance), kept across reloads.
fn query_port(args: &UpArgs, ports: &mut BTreeMap<String, u16>, domain: &str) -> u16 {
    if let Some(port) = ports.get(domain) {
        return *port;
    }
    let port = (0u16..)
        .map(|i| args.query_base_port.saturating_add(i))
        .find(|p| !ports.values().any(|q| q == p))
        .unwrap_or(args.query_base_port);
    ports.insert(domain.to_owned(), port);
    port
}

/// Re-applies the modules whose files changed (topology and heads), leaving the others alone.
async fn reload_changed(
    args: &UpArgs,
    state_dir: &Path,
    endpoint: &BrokerEndpoint,
    local: &LocalContext,
    modules: &mut Vec<ChimeraModule>,
    mtimes: &mut BTreeMap<PathBuf, SystemTime>,
    running: &mut Running,
) -> anyhow::Result<()> {
    let current: BTreeMap<PathBuf, SystemTime> =
        chimera_core::api::manifests::yaml_files(std::slice::from_ref(&args.dir))?
            .into_iter()
            .map(|f| {
                let t = std::fs::metadata(&f)
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                (f, t)
            })
            .collect();
    if &current == mtimes {
        return Ok(());
    }
    let (next, next_mtimes) = load_modules(&args.dir)?;
    let changed: Vec<&ChimeraModule> = next
        .iter()
        .filter(|m| {
            !modules.iter().any(|o| {
                o.metadata.name == m.metadata.name
                    && o.spec == m.spec
                    && o.metadata.annotations == m.metadata.annotations
            })
        })
        .collect();
    let removed: Vec<String> = modules
        .iter()
        .filter(|o| !next.iter().any(|m| m.metadata.name == o.metadata.name))
        .filter_map(|o| o.metadata.name.clone())
        .collect();
    if changed.is_empty() && removed.is_empty() {
        *mtimes = next_mtimes;
        return Ok(());
    }
    declare_topology(endpoint, &next).await?;
    let touched: Vec<String> = changed
        .iter()
        .filter_map(|m| m.metadata.name.clone())
        .chain(removed.iter().cloned())
        .collect();
    let mut kept = Vec::new();
    for mut runner in running.runners.drain(..) {
        if touched.contains(&runner.module.metadata.name.clone().unwrap_or_default()) {
            // Stopped in the background: the other heads keep being supervised meanwhile.
            running
                .stopping
                .push(tokio::spawn(async move { runner.stop_all().await }));
        } else {
            kept.push(runner);
        }
    }
    running.runners = kept;
    for name in &touched {
        println!("chimera up: re-applying module {name}");
    }
    for module in changed {
        start_module(args, state_dir, local, module, running).await?;
    }
    // Balancers of query heads that are gone close.
    let serving: Vec<String> = running
        .runners
        .iter()
        .filter(|r| r.head == Head::Query)
        .map(|r| r.module.domain().to_owned())
        .collect();
    running.balancers.retain(|domain, (task, _, _)| {
        let keep = serving.contains(domain);
        if !keep {
            task.abort();
        }
        keep
    });
    // Only now: a reload that failed half-way is tried again at the next poll.
    *modules = next;
    *mtimes = next_mtimes;
    Ok(())
}

/// A stop request: SIGINT (a terminal's Ctrl-C) or SIGTERM. The handlers are installed when it
/// is made, so a signal that arrives before it is awaited is kept, not lost.
struct Shutdown {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Shutdown {
    fn listen() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Completes when a stop was requested (now or since it was made).
    async fn requested(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
