//! `chimera-bench replay`: one worker scenario replayed against real pods on the dev node, and
//! the simulator's prediction of the same run beside it (docs/autoscaling.md, "Real node").
//!
//! The operator runs as a child process on the host (the same `chimera operator` the chart's
//! image runs), watching a namespace of its own; the users module's worker runs as pods on the
//! node, CPU-limited so that a handful of them carry the load on two cores. Steps:
//! 1. calibrate: one pod (replicas max 1) drains a backlog; its rate is the pods' service rate;
//! 2. replay: a fresh operator (its laws' rates start cold, as the simulator's do) with the
//!    scenario's bounds, while the scenario's arrivals, scaled to that rate, are published;
//!    every second the published and applied counts and the pods are sampled;
//! 3. predict: the simulator runs the arrivals as published, with the pods' measured service
//!    rate and start-up, and both runs are scored alike.

mod compare;
mod load;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use chimera_core::api::ChimeraModule;
use chimera_core::api::ScalingDecision;
use chimera_core::sim::scenario::{Head, Scenario};
use chimera_sdk::db::Database;
use chimera_sdk::sqlx::{self, Row};
use chimera_testenv::{TestDatabase, TestNamespace, TestVhost};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::control_plane::{install_crd, operator::Operator};
use compare::{Measured, Sample};

/// The replay's settings.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The worker scenario to replay; its rates are scaled by the pods' measured rate over
    /// the scenario's `service.per_replica_rate`.
    #[arg(long, default_value = "bench/autoscale/replay/worker-step.json")]
    scenario: PathBuf,
    /// Where the timeline, the predicted scenario and the report go.
    #[arg(long, default_value = "bench/autoscale/replay/results")]
    out: PathBuf,
    /// CPU limit of each worker pod.
    #[arg(long, default_value = "100m")]
    worker_cpu: String,
    /// The operator binary (default: `chimera` beside this one).
    #[arg(long)]
    operator: Option<PathBuf>,
    /// Management API of the broker, as the host reaches it.
    #[arg(long, env = "CHIMERA_RABBITMQ_MANAGEMENT_URL")]
    management_url: String,
}

const MODULE: &str = "users";
const WORKER: &str = "users-worker";
const OPERATOR_PORT: u16 = 19_391;

/// Runs the replay and prints its report (also written to `<out>/report.md`).
pub async fn run(args: Args) -> anyhow::Result<()> {
    let replayed = Scenario::load(&args.scenario)?;
    ensure!(
        replayed.head == Head::Worker,
        "{}: only worker scenarios are replayed",
        args.scenario.display()
    );
    std::fs::create_dir_all(&args.out)?;
    let binary = crate::control_plane::operator_binary(args.operator.as_deref())?;
    chimera_testenv::require_images(&["chimera/users:dev"]);
    let client = chimera_testenv::kube_client().await;
    install_crd(&binary).await?;
    let ns = TestNamespace::on_node(&client, "replay").await;
    let vhost = TestVhost::create("replay");
    let db = TestDatabase::mysql("replay").await;
    secrets(&client, &ns.name, &vhost, &db).await?;
    let node = Node {
        client: client.clone(),
        ns: ns.name.clone(),
        db: Database::connect(&db.url, &[]).await?,
    };
    let publisher = load::Publisher::connect(&vhost.amqp_url).await?;
    // The replay's operator logs every decision (reason and signal), the status only the
    // changes of count.
    let start_operator = async |n: &str, rust_log: &str| {
        Operator::start(
            &binary,
            &node.ns,
            Some(&vhost.amqp_url),
            Some(&args.management_url),
            OPERATOR_PORT,
            &args.out.join(format!("operator-{n}.log")),
            rust_log,
        )
        .await
    };

    // 1. Calibration: one pod, a backlog.
    let operator = start_operator("calibration", "warn").await?;
    node.apply(&module(&args.worker_cpu, replayed.min_replicas.max(1), 1)?)
        .await?;
    node.wait_ready(Duration::from_secs(180)).await?;
    let per_pod_rate = calibrate(&node, &publisher).await?;
    eprintln!("replay: one pod applies {per_pod_rate:.1} commands/s");
    operator.stop().await;

    // 2. Replay, the laws cold.
    node.apply(&module(
        &args.worker_cpu,
        replayed.min_replicas,
        replayed.max_replicas,
    )?)
    .await?;
    let operator = start_operator("replay", "warn,chimera_runtime::scaler=debug").await?;
    node.wait_replicas(replayed.min_replicas.max(1)).await?;
    let rates = compare::planned_rates(&replayed, per_pod_rate);
    let (samples, decisions) = replay(&node, &publisher, &rates).await?;
    let startup_s = node
        .measured_startup()
        .await
        .unwrap_or(f64::from(replayed.startup_s));
    operator.stop().await;
    let lost = node
        .lost(&vhost, samples.last().map_or(0.0, |s| s.published))
        .await?;

    // 3. Predictions and report: the pods as calibrated, and with the contention they showed.
    let rates_by_ready = compare::rate_per_ready_pod(&samples, f64::from(replayed.prefetch));
    let measured = Measured {
        per_pod_rate,
        startup_s,
        contention: compare::contention(&rates_by_ready, per_pod_rate),
    };
    let mut predictions = Vec::new();
    for (label, contended) in [("simulator", false), ("contended", true)] {
        if contended && measured.contention.is_none() {
            continue;
        }
        let scenario = compare::predicted_scenario(&replayed, measured, &samples, contended);
        let (json, csv) = compare::scenario_files(&scenario, &format!("{label}.csv"));
        std::fs::write(args.out.join(format!("{label}.json")), json)?;
        std::fs::write(args.out.join(format!("{label}.csv")), csv)?;
        predictions.push((label, compare::predict(&scenario)));
    }
    let predictions: Vec<(&str, &chimera_core::sim::Run)> =
        predictions.iter().map(|(l, r)| (*l, r)).collect();
    std::fs::write(
        args.out.join("timeline.csv"),
        compare::timeline_csv(&samples, &predictions),
    )?;
    let report = compare::report(
        &compare::Replay {
            replayed: &replayed,
            measured,
            samples: &samples,
            decisions: &decisions,
            lost,
            cpu: &args.worker_cpu,
        },
        &predictions,
    );
    std::fs::write(args.out.join("report.md"), &report)?;
    println!("{report}");
    drop((node, vhost, db, ns));
    Ok(())
}

/// The broker's and the database's Secrets, as the module's pods read them.
async fn secrets(
    client: &Client,
    ns: &str,
    vhost: &TestVhost,
    db: &TestDatabase,
) -> anyhow::Result<()> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let db_url = db
        .cluster_url()
        .context("the replay needs a MariaDB database")?;
    for (name, data) in [
        (
            "chimera-broker",
            json!({"url": vhost.cluster_amqp_url(), "managementUrl": vhost.cluster_management_url()}),
        ),
        ("users-db", json!({"url": db_url})),
    ] {
        let secret: Secret =
            serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data}))?;
        api.create(&PostParams::default(), &secret)
            .await
            .with_context(|| format!("creating Secret {name}"))?;
    }
    Ok(())
}

/// The users module of examples/, its worker head bounded and CPU-limited.
fn module(cpu: &str, min: u32, max: u32) -> anyhow::Result<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/marketplace/users.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut module: Value =
        serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    module["spec"]["query"]["replicas"] = json!({"min": 1, "max": 1});
    module["spec"]["worker"]["replicas"] = json!({"min": min, "max": max});
    module["spec"]["worker"]["resources"] = json!({
        "requests": {"cpu": "50m", "memory": "32Mi"},
        "limits": {"cpu": cpu, "memory": "256Mi"}
    });
    Ok(module)
}

/// The node as the replay reads it.
struct Node {
    client: Client,
    ns: String,
    db: Database,
}

impl Node {
    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn apply(&self, module: &Value) -> anyhow::Result<()> {
        ensure!(
            module.is_object(),
            "examples/marketplace/users.yaml is unreadable"
        );
        self.api::<ChimeraModule>()
            .patch(
                MODULE,
                &PatchParams::apply("chimera-bench").force(),
                &Patch::Apply(module),
            )
            .await
            .context("applying the users module")?;
        Ok(())
    }

    async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let module = self.api::<ChimeraModule>().get_opt(MODULE).await?;
            let ready = module
                .as_ref()
                .and_then(|m| m.status.as_ref())
                .and_then(|s| s.condition("Ready"))
                .is_some_and(|c| c.status == "True");
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the users module is not Ready after {timeout:?}: {:?}",
                    module.and_then(|m| m.status)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the worker Deployment asks for `n` replicas and `n` pods are Ready.
    async fn wait_replicas(&self, n: u32) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(180);
        while Instant::now() < deadline {
            if self.existing().await? == n && self.ready().await? == n {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!("the worker did not settle at {n} Ready pods within 180 s")
    }

    async fn existing(&self) -> anyhow::Result<u32> {
        let deployment = self.api::<Deployment>().get_opt(WORKER).await?;
        let replicas = deployment
            .and_then(|d| d.spec)
            .and_then(|s| s.replicas)
            .unwrap_or(0);
        Ok(u32::try_from(replicas).unwrap_or(0))
    }

    async fn ready(&self) -> anyhow::Result<u32> {
        let selector = format!("chimera.dev/module={MODULE},chimera.dev/head=worker");
        let pods = self
            .api::<Pod>()
            .list(&ListParams::default().labels(&selector))
            .await?;
        let ready = pods
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| chimera_testenv::pod_is_ready(p))
            .count();
        Ok(u32::try_from(ready).unwrap_or(u32::MAX))
    }

    /// Commands with ids starting `prefix` the worker pods applied.
    async fn applied(&self, prefix: &str) -> anyhow::Result<f64> {
        let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM users WHERE user_id LIKE ?")
            .bind(format!("{prefix}%"))
            .fetch_one(self.db.pool())
            .await
            .context("counting applied commands")?
            .try_get("n")?;
        #[allow(clippy::cast_precision_loss)]
        Ok(n as f64)
    }

    /// The worker decision's reason and replicas, as the operator last wrote them.
    async fn decision(&self) -> anyhow::Result<Option<ScalingDecision>> {
        let module = self.api::<ChimeraModule>().get_opt(MODULE).await?;
        Ok(module
            .and_then(|m| m.status)
            .and_then(|s| s.autoscaling)
            .and_then(|a| a.worker))
    }

    /// The start-up the operator measured from the worker's own pods.
    async fn measured_startup(&self) -> Option<f64> {
        let module = self.api::<ChimeraModule>().get_opt(MODULE).await.ok()??;
        let worker = module.status?.autoscaling?.worker?;
        (worker.pod_startup_measured_pods > 0)
            .then_some(worker.pod_startup_seconds)
            .flatten()
    }

    /// Commands published but never applied once the queue drained, plus dead-lettered ones.
    async fn lost(&self, vhost: &TestVhost, published: f64) -> anyhow::Result<f64> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.applied(load::REPLAY).await? < published && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let dlq = vhost.management_get(&format!(
            "/api/queues/{}/chimera.users.worker.dlq",
            vhost.name
        ));
        let dead = dlq["messages"].as_f64().unwrap_or(0.0);
        Ok(published - self.applied(load::REPLAY).await? + dead)
    }
}

/// One pod drains a backlog; the slope of its applied count, once it runs steadily and while
/// more waits than it holds, is the pods' service rate.
async fn calibrate(node: &Node, publisher: &load::Publisher) -> anyhow::Result<f64> {
    let mut batch = 2_000_usize;
    let mut sent = 0_usize;
    for _ in 0..4 {
        publisher
            .publish_batch(load::CALIBRATION, sent, batch)
            .await?;
        sent += batch;
        let mut points = Vec::new();
        let started = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let applied = node.applied(load::CALIBRATION).await?;
            #[allow(clippy::cast_precision_loss)]
            let waiting = sent as f64 - applied;
            // The first seconds are the pod's warm-up (connections, the first prefetch).
            if started.elapsed() > Duration::from_secs(3) && waiting > 200.0 {
                points.push((started.elapsed().as_secs_f64(), applied));
            }
            if waiting <= 200.0 || started.elapsed() > Duration::from_secs(60) {
                break;
            }
        }
        if let (Some(first), Some(last)) = (points.first(), points.last())
            && points.len() >= 10
        {
            let rate = (last.1 - first.1) / (last.0 - first.0);
            // Drained before the replay starts, so that it starts from an empty queue.
            #[allow(clippy::cast_precision_loss)]
            while node.applied(load::CALIBRATION).await? < sent as f64 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            return Ok(rate);
        }
        // Drained too fast to measure: a larger backlog.
        batch *= 4;
    }
    bail!("one worker pod drained every calibration backlog within 13 s: give it less CPU")
}

/// Publishes `rates` (one per second) and samples the node at the end of every second.
async fn replay(
    node: &Node,
    publisher: &load::Publisher,
    rates: &[f64],
) -> anyhow::Result<(Vec<Sample>, Vec<(u32, i32, String)>)> {
    let started = tokio::time::Instant::now();
    let publishing = publisher.pace(rates.to_vec(), started);
    let mut samples = Vec::with_capacity(rates.len());
    // The status is written when a count changes: each new desired count is a decision.
    let mut decisions: Vec<(u32, i32, String)> = Vec::new();
    let mut desired = node.decision().await?.map(|d| d.desired_replicas);
    for t in 0..rates.len() {
        let t = u32::try_from(t)?;
        tokio::time::sleep_until(started + Duration::from_secs(u64::from(t) + 1)).await;
        let sample = Sample {
            published: publishing.published(),
            applied: node.applied(load::REPLAY).await?,
            existing: node.existing().await?,
            ready: node.ready().await?,
        };
        if let Some(d) = node.decision().await?
            && desired != Some(d.desired_replicas)
        {
            desired = Some(d.desired_replicas);
            decisions.push((
                t,
                d.desired_replicas,
                format!("{} ({})", d.reason, d.signal),
            ));
        }
        samples.push(sample);
    }
    publishing.finish().await?;
    Ok((samples, decisions))
}
