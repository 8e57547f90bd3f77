//! `chimera-bench control-plane`: N modules created at once in the real API server, the operator
//! (a child process, watching one namespace) converging them, then a window at rest. Baseline in
//! the same run: `kubectl apply --server-side` of the objects the operator makes, the API
//! server's own floor. Pods are kept out by a ResourceQuota: the bench measures the control
//! plane, not the node.

mod fleet;
pub mod operator;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, ResourceQuota};
use kube::api::{DeleteParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use serde_json::json;

use chimera_core::api::ChimeraModule;
use chimera_testenv::apiserver::{self, OPERATOR_RESOURCES, Requests};
use fleet::Shape;
use operator::{Operator, Usage};

/// The bench's settings.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Modules created at once.
    #[arg(long, default_value_t = 1000)]
    modules: usize,
    /// Also run with a broker (CHIMERA_AMQP_URL, in a fresh vhost): topology declared too.
    #[arg(long)]
    broker: bool,
    /// With --broker, skip the run without one.
    #[arg(long, requires = "broker")]
    broker_only: bool,
    /// Quorum worker queues instead of classic ones (with --broker).
    #[arg(long)]
    quorum: bool,
    /// Seconds of the window at rest after convergence.
    #[arg(long, default_value_t = 60)]
    rest_seconds: u64,
    /// Seconds between convergence and the window at rest.
    #[arg(long, default_value_t = 5)]
    settle_seconds: u64,
    /// Longest wait for convergence.
    #[arg(long, default_value_t = 900)]
    timeout_seconds: u64,
    /// The operator binary (default: `chimera` beside this one).
    #[arg(long)]
    operator: Option<PathBuf>,
    /// Where logs and generated manifests go.
    #[arg(long, default_value = "/tmp/chimera-control-plane")]
    out: PathBuf,
    /// AMQP URL of the broker for --broker.
    #[arg(long, env = "CHIMERA_AMQP_URL")]
    amqp_url: Option<String>,
    /// Its management API.
    #[arg(long, env = "CHIMERA_RABBITMQ_MANAGEMENT_URL")]
    management_url: Option<String>,
}

/// What one run measured.
struct Run {
    name: String,
    converge: Result<Duration, String>,
    kubectl: Duration,
    during: Requests,
    at_rest: Requests,
    usage_converged: Usage,
    usage_rest: Usage,
    peak_rss_mib: f64,
    /// Tick lag p99 and decisions, while converging and at rest.
    tick_lag_converging: Option<(f64, f64)>,
    tick_lag_rest: Option<(f64, f64)>,
}

/// Runs the bench and prints its report (also written to `<out>/report.md`).
pub async fn run(args: Args) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to Kubernetes (source the dev environment's env first)")?;
    std::fs::create_dir_all(&args.out)?;
    let binary = operator_binary(args.operator.as_deref())?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let shape = Shape {
        modules: args.modules,
        quorum: args.quorum,
    };
    install_crd(&binary).await?;
    let modules_file = args.out.join("modules.json");
    std::fs::write(&modules_file, fleet::modules(shape).to_string())?;

    let floor = floor(&client, shape, &args.out, stamp).await?;
    eprintln!(
        "floor: kubectl applied {} objects in {:.1}s",
        5 * args.modules,
        floor.0.as_secs_f64()
    );
    let mut runs = Vec::new();
    if !args.broker_only {
        runs.push(
            operator_run(
                &client,
                &args,
                &binary,
                &modules_file,
                None,
                stamp,
                "no broker",
            )
            .await?,
        );
    }
    if args.broker {
        let amqp = args
            .amqp_url
            .as_deref()
            .context("--broker needs CHIMERA_AMQP_URL (source the dev environment's env)")?;
        let vhost = Vhost::create(amqp, args.management_url.as_deref(), stamp).await?;
        let run = operator_run(
            &client,
            &args,
            &binary,
            &modules_file,
            Some(&vhost),
            stamp,
            "broker",
        )
        .await;
        vhost.delete().await;
        runs.push(run?);
    }
    let report = report(&args, floor, &runs);
    std::fs::write(args.out.join("report.md"), &report)?;
    println!("{report}");
    Ok(())
}

/// The operator binary: `given`, or `chimera` beside this one.
pub fn operator_binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let binary = match given {
        Some(b) => b.to_path_buf(),
        None => std::env::current_exe()?
            .parent()
            .context("the bench binary has no folder")?
            .join("chimera"),
    };
    anyhow::ensure!(
        binary.exists(),
        "{} not found: cargo build -p chimera-operator",
        binary.display()
    );
    Ok(binary)
}

/// Installs the ChimeraModule CRD the operator under test prints (`chimera crd`).
pub async fn install_crd(binary: &Path) -> anyhow::Result<()> {
    let crd = tokio::process::Command::new(binary)
        .arg("crd")
        .output()
        .await
        .with_context(|| format!("{} crd", binary.display()))?;
    anyhow::ensure!(crd.status.success(), "{} crd failed", binary.display());
    let file = std::env::temp_dir().join("chimera-bench-crd.yaml");
    std::fs::write(&file, &crd.stdout)?;
    let output = tokio::process::Command::new("kubectl")
        .args(["apply", "--server-side", "--force-conflicts", "-f"])
        .arg(&file)
        .output()
        .await
        .context("running kubectl")?;
    anyhow::ensure!(
        output.status.success(),
        "installing the CRD: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let wait = tokio::process::Command::new("kubectl")
        .args([
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/chimeramodules.chimera.dev",
        ])
        .output()
        .await?;
    anyhow::ensure!(
        wait.status.success(),
        "the CRD was not established: {}",
        String::from_utf8_lossy(&wait.stderr)
    );
    Ok(())
}

/// A namespace the bench owns, where no pod can be created.
async fn namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"chimera.dev/bench": "control-plane"}}
    }))?;
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "no-pods"},
        "spec": {"hard": {"pods": "0"}}
    }))?;
    let quotas = Api::<ResourceQuota>::namespaced(client.clone(), name);
    quotas
        .create(&PostParams::default(), &quota)
        .await
        .context("creating the ResourceQuota that keeps pods out")?;
    // Admission enforces a quota only once its controller has counted the namespace.
    for _ in 0..100 {
        let counted = quotas
            .get("no-pods")
            .await?
            .status
            .and_then(|s| s.hard)
            .is_some_and(|h| h.contains_key("pods"));
        if counted {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "the ResourceQuota in {name} was not counted within 10 s: is kube-controller-manager running its resourcequota controller?"
    )
}

/// Deletes namespace `name` and waits until it is gone (its deletion would load the next run).
async fn delete_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .delete(name, &DeleteParams::background())
        .await
        .with_context(|| format!("deleting namespace {name}"))?;
    for _ in 0..1200 {
        if namespaces.get_opt(name).await?.is_none() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("namespace {name} still exists 10 minutes after its deletion")
}

async fn requests(client: &Client) -> anyhow::Result<Requests> {
    apiserver::read(client, &OPERATOR_RESOURCES)
        .await
        .context("reading the API server's /metrics")
}

/// `kubectl apply --server-side -f file` into `namespace`; how long it took.
async fn kubectl_apply(file: &Path, namespace: &str, manager: &str) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let output = tokio::process::Command::new("kubectl")
        .args([
            "apply",
            "--server-side",
            "--field-manager",
            manager,
            "-n",
            namespace,
            "-f",
        ])
        .arg(file)
        .stdout(std::process::Stdio::null())
        .output()
        .await
        .context("running kubectl")?;
    if !output.status.success() {
        bail!(
            "kubectl apply -f {} failed: {}",
            file.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(start.elapsed())
}

/// The floor: kubectl applies the modules and the objects the operator would make of them,
/// what the API server must store either way; its time and requests.
async fn floor(
    client: &Client,
    shape: Shape,
    out: &Path,
    stamp: u64,
) -> anyhow::Result<(Duration, Requests)> {
    let ns = format!("cp-floor-{stamp}");
    namespace(client, &ns).await?;
    let file = out.join("floor.json");
    std::fs::write(&file, fleet::desired_objects(shape, &ns)?.to_string())?;
    let before = requests(client).await?;
    let took = kubectl_apply(&file, &ns, "chimera-bench-floor").await;
    let after = requests(client).await?;
    delete_namespace(client, &ns).await?;
    Ok((took?, after.since(&before)))
}

/// Watches the namespace's modules; resolves when every one of `n` observes its generation
/// (and, with a broker, reports its topology).
async fn converged(
    client: &Client,
    namespace: &str,
    n: usize,
    broker: bool,
    timeout: Duration,
) -> Result<(), String> {
    let api: Api<ChimeraModule> = Api::namespaced(client.clone(), namespace);
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    let done = |store: &reflector::Store<ChimeraModule>| {
        let state = store.state();
        state.len() == n && state.iter().all(|m| observed(m, broker))
    };
    let wait = async {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            if event.is_ok() && done(&store) {
                return;
            }
        }
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(()) => Ok(()),
        Err(_) => {
            let state = store.state();
            let ok = state.iter().filter(|m| observed(m, broker)).count();
            Err(format!(
                "not converged after {}s: {ok} of {n} modules observed their generation",
                timeout.as_secs()
            ))
        }
    }
}

fn observed(module: &ChimeraModule, broker: bool) -> bool {
    let Some(status) = &module.status else {
        return false;
    };
    status.observed_generation.is_some()
        && status.observed_generation == module.metadata.generation
        && (!broker
            || status.conditions.iter().any(|c| {
                c.type_ == "TopologyReady" && c.observed_generation == module.metadata.generation
            }))
}

async fn operator_run(
    client: &Client,
    args: &Args,
    binary: &Path,
    modules_file: &Path,
    vhost: Option<&Vhost>,
    stamp: u64,
    name: &str,
) -> anyhow::Result<Run> {
    let ns = format!(
        "cp-{}-{stamp}",
        if vhost.is_some() { "broker" } else { "bare" }
    );
    namespace(client, &ns).await?;
    let log = args.out.join(format!("{ns}.operator.log"));
    let started = Operator::start(
        binary,
        &ns,
        vhost.map(|v| v.amqp_url.as_str()),
        vhost.map(|v| v.management_url.as_str()),
        19190,
        &log,
        "warn",
    )
    .await;
    let operator = match started {
        Ok(o) => o,
        Err(e) => {
            delete_namespace(client, &ns).await.ok();
            return Err(e);
        }
    };
    let measured = measure(
        client,
        args,
        &operator,
        modules_file,
        &ns,
        vhost.is_some(),
        name,
    )
    .await;
    // The operator stays up while the namespace goes: with a broker, modules wait on its
    // finalizer.
    let deleted = delete_namespace(client, &ns).await;
    operator.stop().await;
    deleted?;
    measured
}

async fn measure(
    client: &Client,
    args: &Args,
    operator: &Operator,
    modules_file: &Path,
    ns: &str,
    broker: bool,
    name: &str,
) -> anyhow::Result<Run> {
    let timeout = Duration::from_secs(args.timeout_seconds);
    let watch = {
        let client = client.clone();
        let ns = ns.to_owned();
        let n = args.modules;
        tokio::spawn(async move { converged(&client, &ns, n, broker, timeout).await })
    };
    let m0 = requests(client).await?;
    let u0 = operator.usage()?;
    let start = Instant::now();
    let kubectl = kubectl_apply(modules_file, ns, "chimera-bench").await?;
    let converge = watch
        .await
        .map_err(|e| anyhow::anyhow!("the convergence watch failed: {e}"))?
        .map(|()| start.elapsed());
    eprintln!("{name}: {converge:?}");
    let m1 = requests(client).await?;
    let u1 = operator.usage()?;
    let lag = |text: &str| operator::buckets(text, "chimera_autoscaler_tick_lag_seconds");
    let lag1 = lag(&operator.metrics().await.unwrap_or_default());
    tokio::time::sleep(Duration::from_secs(args.settle_seconds)).await;
    let m2 = requests(client).await?;
    let u2 = operator.usage()?;
    let lag2 = lag(&operator.metrics().await.unwrap_or_default());
    tokio::time::sleep(Duration::from_secs(args.rest_seconds)).await;
    let m3 = requests(client).await?;
    let u3 = operator.usage()?;
    let lag3 = lag(&operator.metrics().await.unwrap_or_default());
    Ok(Run {
        name: name.to_owned(),
        converge: converge.map_err(|e| e.to_string()),
        kubectl,
        during: m1.since(&m0),
        at_rest: m3.since(&m2),
        usage_converged: Usage {
            cpu_seconds: u1.cpu_seconds - u0.cpu_seconds,
            peak_rss_mib: u1.peak_rss_mib,
        },
        usage_rest: Usage {
            cpu_seconds: u3.cpu_seconds - u2.cpu_seconds,
            peak_rss_mib: u3.peak_rss_mib,
        },
        peak_rss_mib: u3.peak_rss_mib,
        tick_lag_converging: operator::p99(&lag1),
        tick_lag_rest: operator::p99(&operator::since(&lag3, &lag2)),
    })
}

/// A vhost of its own on the dev environment's broker, deleted at the end.
struct Vhost {
    amqp_url: String,
    management_url: String,
    /// `/api/vhosts/<name>` on the management API, without credentials.
    vhost_url: String,
    user: String,
    password: String,
    http: reqwest::Client,
}

impl Vhost {
    async fn create(amqp: &str, management: Option<&str>, stamp: u64) -> anyhow::Result<Self> {
        let mut amqp_url = url::Url::parse(amqp).context("CHIMERA_AMQP_URL")?;
        let management = management
            .context("--broker needs CHIMERA_RABBITMQ_MANAGEMENT_URL")?
            .trim_end_matches('/')
            .to_owned();
        let base = url::Url::parse(&management).context("CHIMERA_RABBITMQ_MANAGEMENT_URL")?;
        let user = base.username().to_owned();
        let password = base.password().unwrap_or_default().to_owned();
        let mut plain = base.clone();
        let _ = plain.set_username("");
        let _ = plain.set_password(None);
        let root = plain.as_str().trim_end_matches('/').to_owned();
        let name = format!("cp-bench-{stamp}");
        let vhost = Self {
            vhost_url: format!("{root}/api/vhosts/{name}"),
            management_url: management,
            amqp_url: {
                amqp_url.set_path(&format!("/{name}"));
                amqp_url.to_string()
            },
            user,
            password,
            http: reqwest::Client::new(),
        };
        vhost
            .http
            .put(&vhost.vhost_url)
            .basic_auth(&vhost.user, Some(&vhost.password))
            .json(&json!({}))
            .send()
            .await?
            .error_for_status()
            .context("creating the bench's vhost")?;
        vhost
            .http
            .put(format!("{root}/api/permissions/{name}/{}", vhost.user))
            .basic_auth(&vhost.user, Some(&vhost.password))
            .json(&json!({"configure": ".*", "write": ".*", "read": ".*"}))
            .send()
            .await?
            .error_for_status()
            .context("granting the bench's vhost")?;
        Ok(vhost)
    }

    async fn delete(&self) {
        let result = self
            .http
            .delete(&self.vhost_url)
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status);
        if let Err(e) = result {
            eprintln!("could not delete the bench's vhost {}: {e}", self.vhost_url);
        }
    }
}

fn verbs(r: &Requests) -> String {
    let by: BTreeMap<String, f64> = r.by_verb();
    if by.is_empty() {
        return "none".into();
    }
    by.iter()
        .map(|(v, n)| format!("{v} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn lag(p: Option<(f64, f64)>) -> String {
    p.map(|(p, n)| format!("{:.0} ms ({n} decisions)", p * 1000.0))
        .unwrap_or_else(|| "not reported".into())
}

fn report(args: &Args, floor: (Duration, Requests), runs: &[Run]) -> String {
    let floor_s = floor.0.as_secs_f64();
    let mut out = String::new();
    out.push_str(&format!(
        "### control plane, {} modules (query + worker each, subscriptions in a chain), pods kept out by a ResourceQuota\n\n",
        args.modules
    ));
    out.push_str(&format!(
        "| run | converged in | ratio to the floor | kubectl's apply of the modules | operator peak RSS | operator CPU converging | operator writes at rest ({rest} s) | operator CPU at rest | tick lag p99 converging | tick lag p99 at rest |\n|---|---|---|---|---|---|---|---|---|---|\n",
        rest = args.rest_seconds
    ));
    out.push_str(&format!(
        "| floor: kubectl apply --server-side of the {} modules and the {} objects made of them | {floor_s:.1} s | 1.00 | | | | | | | |\n",
        args.modules,
        4 * args.modules
    ));
    for run in runs {
        let (converged, ratio) = match &run.converge {
            Ok(d) => (
                format!("{:.1} s", d.as_secs_f64()),
                format!("{:.2}", d.as_secs_f64() / floor_s),
            ),
            Err(e) => (e.clone(), "-".into()),
        };
        out.push_str(&format!(
            "| operator, {} | {converged} | {ratio} | {:.1} s | {:.0} MiB | {:.1} s | {} | {:.1} s | {} | {} |\n",
            run.name,
            run.kubectl.as_secs_f64(),
            run.peak_rss_mib,
            run.usage_converged.cpu_seconds,
            run.at_rest.operator_writes() + 0.0,
            run.usage_rest.cpu_seconds,
            lag(run.tick_lag_converging),
            lag(run.tick_lag_rest),
        ));
    }
    out.push_str("\nAPI requests on chimeramodules, deployments, services, poddisruptionbudgets, secrets and events.k8s.io events (from the API server's /metrics; the operator writes with APPLY, PATCH, DELETE and POST; PUT .../status is the deployment and disruption controllers'):\n\n");
    out.push_str(&format!("- floor (kubectl): {}\n", verbs(&floor.1)));
    for run in runs {
        out.push_str(&format!(
            "- operator, {}, converging (kubectl's apply of the modules included): {}\n",
            run.name,
            verbs(&run.during)
        ));
        for line in run.during.lines() {
            out.push_str(&format!("  - {line}\n"));
        }
        out.push_str(&format!(
            "- operator, {}, at rest: {}\n",
            run.name,
            verbs(&run.at_rest)
        ));
        for line in run.at_rest.lines() {
            out.push_str(&format!("  - {line}\n"));
        }
    }
    out
}
