//! The autoscaler: a loop with a short tick that reads each head's signals, runs its control
//! law (chimera_core::autoscale) and writes the Deployment's replicas, as the one owner of
//! `spec.replicas` (the field manager the reconciler uses to hold replicas within bounds).
//! Each decision goes to the operator's `/metrics` (with its lag behind its due time and a
//! heartbeat); the module's status (`status.autoscaling`) is written only when a count, the
//! staleness, the measured start-up or the throughput limit changes, and an Event when the
//! replicas change. Missing or stale metrics hold the replicas.

pub mod metrics;
pub mod schedule;
pub mod sources;
pub mod writer;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};

use chimera_contract::names;
use chimera_core::api::{AutoscalingStatus, ChimeraModule, ScalingDecision};
use chimera_core::autoscale::head::{Outcome, QueryAutoscaler, WorkerAutoscaler};
use chimera_core::autoscale::query::QuerySettings;
use chimera_core::autoscale::startup::{Startup, StartupTimes, measurable, startup_seconds};
use chimera_core::autoscale::worker::WorkerSettings;
use chimera_core::autoscale::{Decision, Replicas};
use chimera_core::topology::state::BrokerEndpoint;
use chimera_core::workloads::{HEAD_LABEL, Head, MODULE_LABEL, object_name};
use metrics::{ActionLabels, AutoscalerMetrics, HeadLabels};
use sources::{LatencySource, QueueSource};
use writer::ReplicaWriter;

/// Field manager of `status.autoscaling`.
pub const AUTOSCALER_MANAGER: &str = "chimera-operator/autoscaler";
/// A module's broker endpoint is re-read (it may come from a Secret) this often.
const ENDPOINT_REFRESH: Duration = Duration::from_secs(30);
/// Modules decided at once. (64 was tried at 1,000 modules on a broker, when all were decided
/// at the tick's start: the tick lag stayed at about 1 s and the operator's peak memory rose
/// from 130 to 180 MiB; see bench/README.md.)
const CONCURRENCY: usize = 16;
/// Longest wait for one head's signals.
const SOURCE_TIMEOUT: Duration = Duration::from_secs(3);

/// How the autoscaler runs.
#[derive(Clone, Copy, Debug)]
pub struct ScalerSettings {
    /// The tick.
    pub interval: Duration,
    /// Seconds a new pod takes to serve, which the laws plan around until a head's own pods
    /// were measured.
    pub startup_seconds: f64,
}

impl Default for ScalerSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            startup_seconds: 10.0,
        }
    }
}

/// Each head's autoscaler, by `namespace/module/head`: what its law has learned lives here
/// between ticks.
type Heads<A> = Mutex<HashMap<String, Arc<tokio::sync::Mutex<A>>>>;

#[derive(Default)]
struct ModuleState {
    endpoint: Option<(BrokerEndpoint, Instant)>,
    written: Option<AutoscalingStatus>,
}

/// The autoscaler and what its laws have learned, per head.
pub struct Scaler {
    writer: Arc<dyn ReplicaWriter>,
    queues: Arc<dyn QueueSource>,
    latency: Arc<dyn LatencySource>,
    /// Its metrics.
    pub metrics: AutoscalerMetrics,
    settings: ScalerSettings,
    workers: Heads<WorkerAutoscaler>,
    queries: Heads<QueryAutoscaler>,
    /// Each head's measured pod start-up times, by `namespace/module/head`.
    startups: Mutex<HashMap<String, StartupTimes>>,
    modules: Mutex<HashMap<String, Arc<tokio::sync::Mutex<ModuleState>>>>,
    origin: Instant,
    /// When it started, on the API server's clock: only pods created since are measured.
    started: k8s_openapi::jiff::Timestamp,
    /// Only the leader decides and writes.
    leadership: crate::leader::Leadership,
}

fn key(module: &ChimeraModule) -> String {
    format!(
        "{}/{}",
        module.namespace().unwrap_or_default(),
        module.name_any()
    )
}

impl Scaler {
    /// A scaler with the given sources.
    pub fn new(
        writer: Arc<dyn ReplicaWriter>,
        queues: Arc<dyn QueueSource>,
        latency: Arc<dyn LatencySource>,
        settings: ScalerSettings,
    ) -> Self {
        Self {
            writer,
            queues,
            latency,
            metrics: AutoscalerMetrics::new(),
            settings,
            workers: Mutex::default(),
            queries: Mutex::default(),
            startups: Mutex::default(),
            modules: Mutex::default(),
            origin: Instant::now(),
            started: k8s_openapi::jiff::Timestamp::now(),
            leadership: crate::leader::Leadership::always(),
        }
    }

    /// The scaler of one replica among several: it decides only while `leadership` leads.
    pub fn with_leadership(mut self, leadership: crate::leader::Leadership) -> Self {
        self.leadership = leadership;
        self
    }

    /// Drops what the laws learned: a follower's knowledge would be stale when it leads.
    fn forget_all(&self) {
        self.workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.queries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.metrics.forget_all_heads();
    }

    /// Ticks until the process stops. `pods` holds the heads' pods (for their start-up times).
    ///
    /// The interval is cut into [`schedule::SLOTS`] slots; each module is decided once per
    /// interval, at the slot of its phase, and its lag is measured from that slot's start.
    /// Decisions run [`CONCURRENCY`] at a time across slots: a slow broker makes them late
    /// (which the lag shows), never piles them up.
    pub async fn run(
        self: Arc<Self>,
        modules: Store<ChimeraModule>,
        deployments: Store<Deployment>,
        pods: Store<Pod>,
    ) {
        let slots = schedule::SLOTS;
        let mut tick = tokio::time::interval(schedule::slot_length(self.settings.interval, slots));
        // Late slot ticks still come, at once: every module keeps one decision per interval.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let permits = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
        let mut running = tokio::task::JoinSet::new();
        let mut targets = Arc::new(HashMap::new());
        // The modules of each slot, sorted out once per interval (at slot 0), not per slot.
        let mut by_slot: Vec<Vec<ObjectRef<ChimeraModule>>> = vec![Vec::new(); slots as usize];
        for n in 0u64.. {
            // (the instant the slot was due, however late this loop got to it)
            let due = tick.tick().await;
            while running.try_join_next().is_some() {}
            if !self.leadership.is_leading() {
                self.forget_all();
                continue;
            }
            let slot = schedule::slot_of_tick(n, slots);
            if slot == 0 {
                let live = modules.state();
                self.forget_gone(&live);
                // (anew: a slot not reached last interval, while following, is not carried over)
                by_slot.iter_mut().for_each(Vec::clear);
                for module in &live {
                    let phase = schedule::phase(&key(module), slots) as usize;
                    if let Some(due_then) = by_slot.get_mut(phase) {
                        due_then.push(ObjectRef::from_obj(&**module));
                    }
                }
                let pods = pods.state();
                self.measure_startups(&pods);
                targets = Arc::new(sources::ready_targets(&pods));
            }
            let due_now = by_slot
                .get_mut(slot as usize)
                .map(std::mem::take)
                .unwrap_or_default();
            for reference in due_now {
                // (as it is now: changed or deleted since the interval began)
                let Some(module) = modules.get(&reference) else {
                    continue;
                };
                let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                    return; // (never closed)
                };
                let (this, deployments, targets) =
                    (Arc::clone(&self), deployments.clone(), Arc::clone(&targets));
                running.spawn(async move {
                    this.scale_module(&module, &deployments, &targets, due)
                        .await;
                    drop(permit);
                });
            }
        }
    }

    fn forget_gone(&self, live: &[Arc<ChimeraModule>]) {
        let keys: std::collections::HashSet<String> = live.iter().map(|m| key(m)).collect();
        // A head's key is `namespace/module/head`: live while `namespace/module` is.
        let live = |k: &String| k.rsplit_once('/').is_some_and(|(m, _)| keys.contains(m));
        let mut gone = Vec::new();
        let mut sweep = |k: &String| {
            let keep = live(k);
            if !keep {
                gone.push(k.clone());
            }
            keep
        };
        if let Ok(mut heads) = self.workers.lock() {
            heads.retain(|k, _| sweep(k));
        }
        if let Ok(mut heads) = self.queries.lock() {
            heads.retain(|k, _| sweep(k));
        }
        for labels in gone.iter().filter_map(|k| HeadLabels::from_key(k)) {
            self.metrics.forget_head(&labels);
        }
        if let Ok(mut modules) = self.modules.lock() {
            modules.retain(|k, _| keys.contains(k));
        }
        if let Ok(mut startups) = self.startups.lock() {
            startups.retain(|k, _| live(k));
        }
    }

    /// Takes this moment's pods into each head's start-up times (one pass over all pods).
    pub fn measure_startups(&self, pods: &[Arc<Pod>]) {
        let mut by_head: HashMap<String, Vec<(String, Option<f64>)>> = HashMap::new();
        for pod in pods {
            let labels = pod.labels();
            let (Some(namespace), Some(module), Some(head), Some(uid)) = (
                pod.namespace(),
                labels.get(MODULE_LABEL),
                labels.get(HEAD_LABEL),
                pod.metadata.uid.clone(),
            ) else {
                continue;
            };
            by_head
                .entry(format!("{namespace}/{module}/{head}"))
                .or_default()
                .push((
                    uid,
                    measurable(pod, self.started)
                        .then(|| startup_seconds(pod))
                        .flatten(),
                ));
        }
        let mut startups = match self.startups.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        for (head, pods) in by_head {
            startups.entry(head).or_default().observe(&pods);
        }
    }

    /// The start-up time head `key`'s law plans with: measured from the pods this scaler saw
    /// start, else what the status says an earlier one measured (a restarted or new leader
    /// does not plan with the default until the head next scales out), else the default.
    fn startup(&self, key: &str, earlier: Option<Startup>) -> Startup {
        let startups = match self.startups.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let fallback = earlier.unwrap_or(Startup {
            seconds: self.settings.startup_seconds,
            measured_pods: 0,
        });
        startups
            .get(key)
            .map(|times| times.estimate(fallback.seconds))
            .filter(|s| s.measured_pods > 0)
            .unwrap_or(fallback)
    }

    /// The autoscaler of head `key`, created on first use.
    fn autoscaler<A>(
        heads: &Heads<A>,
        key: &str,
        new: impl FnOnce() -> A,
    ) -> Arc<tokio::sync::Mutex<A>> {
        let mut heads = match heads.lock() {
            Ok(h) => h,
            Err(poisoned) => poisoned.into_inner(),
        };
        Arc::clone(
            heads
                .entry(key.to_owned())
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(new()))),
        )
    }

    fn module_state(&self, module: &ChimeraModule) -> Arc<tokio::sync::Mutex<ModuleState>> {
        let mut modules = match self.modules.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        Arc::clone(modules.entry(key(module)).or_default())
    }

    /// One tick for one module: each head's decision, then the status. `targets` holds the
    /// addresses of the ready pods by head; `tick` is when the decision was due.
    pub async fn scale_module(
        &self,
        module: &ChimeraModule,
        deployments: &Store<Deployment>,
        targets: &HashMap<String, Vec<String>>,
        tick: tokio::time::Instant,
    ) {
        if module.metadata.deletion_timestamp.is_some() {
            return;
        }
        let Some(namespace) = module.namespace() else {
            return;
        };
        let state = self.module_state(module);
        let mut state = state.lock().await;
        let mut status = AutoscalingStatus::default();
        for head in chimera_core::workloads::declared_heads(module) {
            let name = object_name(&module.name_any(), head);
            let Some(deployment) = deployments.get(&ObjectRef::new(&name).within(&namespace))
            else {
                continue; // not created yet: the reconciler will
            };
            let decision = self
                .scale_head(module, head, &deployment, targets, &mut state)
                .await;
            self.metrics.tick_lag.observe(tick.elapsed().as_secs_f64());
            match head {
                Head::Query => status.query = decision,
                Head::Worker => status.worker = decision,
            }
        }
        self.write_status(module, status, &mut state).await;
    }

    async fn scale_head(
        &self,
        module: &ChimeraModule,
        head: Head,
        deployment: &Deployment,
        targets: &HashMap<String, Vec<String>>,
        state: &mut ModuleState,
    ) -> Option<ScalingDecision> {
        let namespace = module.namespace()?;
        let now = self.origin.elapsed().as_secs_f64();
        let current = deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .and_then(|r| u32::try_from(r).ok())
            .unwrap_or(0);
        let ready = deployment
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .and_then(|r| u32::try_from(r).ok())
            .unwrap_or(0);
        let replicas = Replicas {
            existing: current,
            ready,
        };
        let labels = HeadLabels {
            namespace: namespace.clone(),
            module: module.name_any(),
            head: head.as_str().to_owned(),
        };
        let head_key = format!("{}/{}", key(module), head.as_str());
        let measured = self.startup(&head_key, previously_measured(module, head));
        let startup = measured.seconds;
        let Outcome { decision, stale } = match head {
            Head::Worker => {
                let settings = WorkerSettings::for_head(module.spec.worker.as_ref()?, startup);
                let cell = Self::autoscaler(&self.workers, &head_key, || {
                    self.metrics.count_actions_of(&labels);
                    WorkerAutoscaler::new(settings)
                });
                let mut autoscaler = cell.lock().await;
                // A spec change to what the law holds (bounds, targets) starts it afresh.
                autoscaler.reconfigure(settings);
                let sample = match self.endpoint(module, state).await {
                    Ok(endpoint) => {
                        let queue = names::worker_queue(module.domain());
                        tokio::time::timeout(SOURCE_TIMEOUT, self.queues.sample(&endpoint, &queue))
                            .await
                            .unwrap_or(Err(sources::SourceError::Timeout(SOURCE_TIMEOUT)))
                            .map_err(|e| e.to_string())
                    }
                    Err(e) => Err(e),
                };
                if let Ok(s) = &sample {
                    self.metrics
                        .backlog
                        .get_or_create(&labels)
                        .set(s.ready + s.unacked);
                }
                // The outbox of its pods, read only when the head could go to zero.
                let outbox = match &sample {
                    Ok(s) if autoscaler.outbox_matters(s, replicas) => {
                        let pods =
                            pod_targets(targets, &head_key, module.spec.worker.as_ref()?.port);
                        tokio::time::timeout(SOURCE_TIMEOUT, self.latency.outbox_rows(&pods))
                            .await
                            .unwrap_or(Err(sources::SourceError::Timeout(SOURCE_TIMEOUT)))
                            .inspect_err(|error| {
                                tracing::debug!(%error, "could not read the worker pods' outbox");
                            })
                            .ok()
                    }
                    _ => None,
                };
                autoscaler.decide_sample(now, sample.as_ref(), replicas, outbox)
            }
            Head::Query => {
                let settings = QuerySettings::for_head(module.spec.query.as_ref()?, startup);
                let cell = Self::autoscaler(&self.queries, &head_key, || {
                    self.metrics.count_actions_of(&labels);
                    QueryAutoscaler::new(settings)
                });
                let mut autoscaler = cell.lock().await;
                autoscaler.reconfigure(settings);
                let pods = pod_targets(targets, &head_key, module.spec.query.as_ref()?.port);
                let scrapes = if pods.is_empty() {
                    Err(sources::SourceError::NoReadyPods {
                        namespace: namespace.clone(),
                        module: module.name_any(),
                    })
                } else {
                    tokio::time::timeout(SOURCE_TIMEOUT, self.latency.sample(&pods))
                        .await
                        .unwrap_or(Err(sources::SourceError::Timeout(SOURCE_TIMEOUT)))
                };
                let outcome = autoscaler
                    .decide_scrapes(now, scrapes.as_deref(), replicas)
                    .0;
                // Absent while the head serves too little to have a percentile: a stale value
                // would read as the head's latency now.
                match autoscaler.percentile() {
                    Some(seconds) => {
                        self.metrics.latency.get_or_create(&labels).set(seconds);
                    }
                    None => {
                        self.metrics.latency.remove(&labels);
                    }
                }
                outcome
            }
        };
        self.metrics
            .desired
            .get_or_create(&labels)
            .set(i64::from(decision.desired));
        self.metrics
            .current
            .get_or_create(&labels)
            .set(i64::from(current));
        self.metrics
            .ready
            .get_or_create(&labels)
            .set(i64::from(ready));
        self.metrics
            .stale
            .get_or_create(&labels)
            .set(i64::from(stale));
        self.metrics
            .last_decision
            .get_or_create(&labels)
            .set(unix_seconds());
        // Every decision, for "why does it not scale?" (the status holds only count changes).
        tracing::debug!(
            module = %module.name_any(),
            head = head.as_str(),
            current,
            desired = decision.desired,
            signal = %decision.signal,
            reason = %decision.reason,
            "decided"
        );
        if decision.desired != current {
            self.apply(module, head, deployment, current, &decision, &labels)
                .await;
        }
        Some(ScalingDecision {
            desired_replicas: i32::try_from(decision.desired).unwrap_or(i32::MAX),
            current_replicas: i32::try_from(current).unwrap_or(i32::MAX),
            signal: decision.signal,
            reason: decision.reason,
            time: now_rfc3339(),
            metrics_stale: stale,
            pod_startup_seconds: Some((measured.seconds * 10.0).round() / 10.0),
            pod_startup_measured_pods: i32::try_from(measured.measured_pods).unwrap_or(i32::MAX),
            throughput_limit: decision
                .throughput_limit
                .map(|l| i32::try_from(l).unwrap_or(i32::MAX)),
        })
    }

    async fn endpoint(
        &self,
        module: &ChimeraModule,
        state: &mut ModuleState,
    ) -> Result<BrokerEndpoint, String> {
        if let Some((endpoint, at)) = &state.endpoint
            && at.elapsed() < ENDPOINT_REFRESH
        {
            return Ok(endpoint.clone());
        }
        let endpoint = self.writer.endpoint(module).await?;
        state.endpoint = Some((endpoint.clone(), Instant::now()));
        Ok(endpoint)
    }

    async fn apply(
        &self,
        module: &ChimeraModule,
        head: Head,
        deployment: &Deployment,
        current: u32,
        decision: &Decision,
        labels: &HeadLabels,
    ) {
        let Some(namespace) = deployment.namespace() else {
            return;
        };
        // (leadership can end while the signals are read)
        let Some(left) = self.leadership.time_left() else {
            return;
        };
        let name = deployment.name_any();
        // Fenced twice: the write must finish while this replica still leads (a write stuck in
        // a partition is abandoned at the renew deadline), and it applies only to the
        // Deployment as it was read, so one delivered after the partition heals cannot undo
        // what the next leader wrote meanwhile.
        let version = deployment.resource_version();
        let write = self
            .writer
            .scale(&namespace, &name, decision.desired, version.as_deref());
        match tokio::time::timeout(left, write).await {
            Ok(Ok(())) => {}
            Ok(Err(kube::Error::Api(e))) if e.code == 409 => {
                tracing::debug!(deployment = %name, "the Deployment changed since it was read: deciding again");
                return;
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, deployment = %name, "could not scale");
                return;
            }
            Err(_) => {
                tracing::warn!(deployment = %name, "the write did not finish while leading: abandoned");
                return;
            }
        }
        let direction = if decision.desired > current {
            "out"
        } else {
            "in"
        };
        self.metrics
            .actions
            .get_or_create(&ActionLabels {
                namespace: labels.namespace.clone(),
                module: labels.module.clone(),
                head: labels.head.clone(),
                direction: direction.to_owned(),
            })
            .inc();
        tracing::info!(
            module = %module.name_any(),
            head = head.as_str(),
            from = current,
            to = decision.desired,
            reason = %decision.reason,
            "scaled"
        );
        self.writer
            .event(
                module,
                if direction == "out" {
                    "ScaledOut"
                } else {
                    "ScaledIn"
                },
                format!(
                    "{} head {current} -> {}: {} ({})",
                    head.as_str(),
                    decision.desired,
                    decision.reason,
                    decision.signal
                ),
            )
            .await;
    }

    /// Writes both heads' decisions (one apply owns the whole `status.autoscaling`) when a
    /// count, the staleness, the pods the start-up time was measured from or the throughput
    /// limit changed; nothing
    /// otherwise (the heartbeat is the `last_decision_timestamp_seconds` metric). After the
    /// operator restarts, the status it finds counts as written.
    async fn write_status(
        &self,
        module: &ChimeraModule,
        status: AutoscalingStatus,
        state: &mut ModuleState,
    ) {
        let counts = |s: &AutoscalingStatus| {
            [&s.query, &s.worker].map(|d| {
                d.as_ref().map(|d| {
                    (
                        d.desired_replicas,
                        d.current_replicas,
                        d.metrics_stale,
                        d.pod_startup_measured_pods,
                        d.throughput_limit,
                    )
                })
            })
        };
        let written = state
            .written
            .as_ref()
            .or(module.status.as_ref().and_then(|s| s.autoscaling.as_ref()));
        if written.is_some_and(|w| counts(w) == counts(&status)) {
            return;
        }
        // (as a scale write: over by the end of the leadership, or not at all)
        let Some(left) = self.leadership.time_left() else {
            return;
        };
        match tokio::time::timeout(left, self.writer.status(module, &status)).await {
            Ok(Ok(_)) => state.written = Some(status),
            Ok(Err(error)) => tracing::debug!(%error, "could not write the autoscaling status"),
            Err(_) => tracing::debug!("the autoscaling status was not written while leading"),
        }
    }
}

/// `host:port` of the ready pods of `head_key` (`namespace/module/head`).
fn pod_targets(targets: &HashMap<String, Vec<String>>, head_key: &str, port: i32) -> Vec<String> {
    targets
        .get(head_key)
        .into_iter()
        .flatten()
        .map(|host| format!("{host}:{port}"))
        .collect()
}

fn unix_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn now_rfc3339() -> String {
    use k8s_openapi::jiff::Timestamp;
    let now = Timestamp::now();
    Timestamp::from_second(now.as_second())
        .unwrap_or(now)
        .to_string()
}

/// The start-up time the module's status says was measured for `head`, if one was.
fn previously_measured(module: &ChimeraModule, head: Head) -> Option<Startup> {
    let autoscaling = module.status.as_ref()?.autoscaling.as_ref()?;
    let decision = match head {
        Head::Query => autoscaling.query.as_ref(),
        Head::Worker => autoscaling.worker.as_ref(),
    }?;
    let seconds = decision.pod_startup_seconds?;
    let measured_pods = usize::try_from(decision.pod_startup_measured_pods).ok()?;
    (measured_pods > 0 && seconds.is_finite() && seconds >= 0.0).then_some(Startup {
        seconds,
        measured_pods,
    })
}

#[cfg(test)]
mod tests {
    //! The scaling loop with fake sources and a fake writer: what it writes, and when not.
    #![allow(clippy::unwrap_used)]

    use std::sync::Mutex as StdMutex;

    use futures::future::BoxFuture;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};
    use kube::runtime::reflector;
    use kube::runtime::watcher;

    use super::sources::{QueueSample, SourceError};
    use super::*;
    use chimera_core::autoscale::exposition::Scrape;

    const LEDGER: &str = "apiVersion: chimera.dev/v1alpha1\nkind: ChimeraModule\nmetadata: {name: ledger, namespace: shop}\nspec:\n  image: x/y:1\n  commands: [ledger.post]\n  worker: {prefetch: 10, replicas: {min: 1, max: 8}}\n";

    /// A queue that answers what the test says.
    struct Queue(StdMutex<Result<QueueSample, ()>>);

    impl QueueSource for Queue {
        fn sample<'a>(
            &'a self,
            _: &'a BrokerEndpoint,
            _: &'a str,
        ) -> BoxFuture<'a, Result<QueueSample, SourceError>> {
            let answer = *self.0.lock().unwrap();
            Box::pin(
                async move { answer.map_err(|()| SourceError::Timeout(Duration::from_secs(3))) },
            )
        }
    }

    struct NoPods;

    impl LatencySource for NoPods {
        fn sample<'a>(
            &'a self,
            _: &'a [String],
        ) -> BoxFuture<'a, Result<Vec<(String, Scrape)>, SourceError>> {
            Box::pin(async { Err(SourceError::Timeout(Duration::from_secs(3))) })
        }

        fn outbox_rows<'a>(&'a self, _: &'a [String]) -> BoxFuture<'a, Result<f64, SourceError>> {
            Box::pin(async { Err(SourceError::Timeout(Duration::from_secs(3))) })
        }
    }

    /// Records every write.
    #[derive(Default)]
    struct Recorder {
        scaled: StdMutex<Vec<(String, u32)>>,
        /// The resourceVersion each scale write was conditioned on.
        versions: StdMutex<Vec<Option<String>>>,
        /// Scale writes never finish (a request stuck in a partition).
        hang: std::sync::atomic::AtomicBool,
        statuses: StdMutex<Vec<AutoscalingStatus>>,
        events: StdMutex<Vec<&'static str>>,
    }

    impl ReplicaWriter for Recorder {
        fn scale<'a>(
            &'a self,
            _: &'a str,
            name: &'a str,
            replicas: u32,
            version: Option<&'a str>,
        ) -> BoxFuture<'a, Result<(), kube::Error>> {
            self.scaled
                .lock()
                .unwrap()
                .push((name.to_owned(), replicas));
            self.versions
                .lock()
                .unwrap()
                .push(version.map(str::to_owned));
            if self.hang.load(std::sync::atomic::Ordering::SeqCst) {
                return Box::pin(futures::future::pending());
            }
            Box::pin(async { Ok(()) })
        }
        fn status<'a>(
            &'a self,
            _: &'a ChimeraModule,
            status: &'a AutoscalingStatus,
        ) -> BoxFuture<'a, Result<(), kube::Error>> {
            self.statuses.lock().unwrap().push(status.clone());
            Box::pin(async { Ok(()) })
        }
        fn event<'a>(
            &'a self,
            _: &'a ChimeraModule,
            reason: &'static str,
            _: String,
        ) -> BoxFuture<'a, ()> {
            self.events.lock().unwrap().push(reason);
            Box::pin(async {})
        }
        fn endpoint<'a>(
            &'a self,
            _: &'a ChimeraModule,
        ) -> BoxFuture<'a, Result<BrokerEndpoint, String>> {
            Box::pin(async {
                BrokerEndpoint::new("amqp://mq/%2f", None).map_err(|e| e.to_string())
            })
        }
    }

    /// What a scaler test runs against: its writes, its queue, the scaler, the module and the
    /// Deployment store.
    type World = (
        Arc<Recorder>,
        Arc<Queue>,
        Scaler,
        ChimeraModule,
        Store<Deployment>,
    );

    fn world(sample: Result<QueueSample, ()>) -> World {
        world_of(LEDGER, sample, Arc::new(NoPods))
    }

    fn world_of(
        yaml: &str,
        sample: Result<QueueSample, ()>,
        pods: Arc<dyn LatencySource>,
    ) -> World {
        let module = chimera_core::api::validation::modules_from_yaml(yaml)
            .0
            .remove(0);
        let (store, mut writer) = reflector::store::<Deployment>();
        let mut deployment = Deployment {
            spec: Some(DeploymentSpec {
                replicas: Some(1),
                ..DeploymentSpec::default()
            }),
            status: Some(DeploymentStatus {
                ready_replicas: Some(1),
                ..DeploymentStatus::default()
            }),
            ..Deployment::default()
        };
        deployment.metadata.name = Some("ledger-worker".into());
        deployment.metadata.namespace = Some("shop".into());
        deployment.metadata.resource_version = Some("42".into());
        writer.apply_watcher_event(&watcher::Event::Apply(deployment));
        let recorder = Arc::new(Recorder::default());
        let queue = Arc::new(Queue(StdMutex::new(sample)));
        let scaler = Scaler::new(
            recorder.clone(),
            queue.clone(),
            pods,
            ScalerSettings::default(),
        );
        (recorder, queue, scaler, module, store)
    }

    /// Worker pods whose outbox has rows waiting; records the targets read.
    #[derive(Default)]
    struct Outbox(StdMutex<Vec<Vec<String>>>);

    impl LatencySource for Outbox {
        fn sample<'a>(
            &'a self,
            _: &'a [String],
        ) -> BoxFuture<'a, Result<Vec<(String, Scrape)>, SourceError>> {
            Box::pin(async { Err(SourceError::Timeout(Duration::from_secs(3))) })
        }

        fn outbox_rows<'a>(
            &'a self,
            targets: &'a [String],
        ) -> BoxFuture<'a, Result<f64, SourceError>> {
            self.0.lock().unwrap().push(targets.to_vec());
            Box::pin(async { Ok(2.0) })
        }
    }

    #[tokio::test]
    async fn the_outbox_of_a_worker_that_could_go_to_zero_is_read_from_its_ready_pods() {
        let targets = HashMap::from([(
            "shop/ledger/worker".to_owned(),
            vec!["10.244.0.7".to_owned()],
        )]);
        let may_go_to_zero = LEDGER.replace("min: 1", "min: 0");
        for (yaml, sample, read) in [
            (may_go_to_zero.as_str(), backlog(0.0), true),
            (may_go_to_zero.as_str(), backlog(5.0), false), // work waiting: not to zero anyway
            (LEDGER, backlog(0.0), false),                  // min 1: never to zero
        ] {
            let outbox = Arc::new(Outbox::default());
            let (_, _, scaler, module, store) = world_of(yaml, Ok(sample), outbox.clone());
            scaler
                .scale_module(&module, &store, &targets, tokio::time::Instant::now())
                .await;
            let reads = outbox.0.lock().unwrap().clone();
            if read {
                assert_eq!(
                    reads,
                    [["10.244.0.7:8080".to_owned()]],
                    "at the worker's port"
                );
            } else {
                assert!(reads.is_empty(), "{yaml}: {reads:?}");
            }
        }
    }

    /// One decision of the scaler on `module`, now, without pod targets.
    async fn tick(scaler: &Scaler, module: &ChimeraModule, store: &Store<Deployment>) {
        scaler
            .scale_module(module, store, &HashMap::new(), tokio::time::Instant::now())
            .await;
    }

    fn backlog(ready: f64) -> QueueSample {
        QueueSample {
            ready,
            unacked: 0.0,
            acked_total: 0.0,
            consumers: 1,
        }
    }

    #[tokio::test]
    async fn a_backlog_scales_the_worker_out_and_says_so() {
        let (recorder, _, scaler, module, store) = world(Ok(backlog(200.0)));
        tick(&scaler, &module, &store).await;
        let scaled = recorder.scaled.lock().unwrap().clone();
        assert_eq!(scaled.len(), 1, "{scaled:?}");
        assert_eq!(scaled[0].0, "ledger-worker");
        assert!(scaled[0].1 > 1, "{scaled:?}");
        assert_eq!(*recorder.events.lock().unwrap(), ["ScaledOut"]);
        let statuses = recorder.statuses.lock().unwrap();
        let worker = statuses[0].worker.as_ref().unwrap();
        assert!(!worker.metrics_stale);
        assert_eq!(worker.desired_replicas, i32::try_from(scaled[0].1).unwrap());
        assert!(worker.signal.contains("backlog 200"), "{worker:?}");
    }

    #[tokio::test]
    async fn a_scale_write_applies_only_to_the_deployment_it_read() {
        let (recorder, _, scaler, module, store) = world(Ok(backlog(200.0)));
        tick(&scaler, &module, &store).await;
        assert_eq!(*recorder.versions.lock().unwrap(), [Some("42".to_owned())]);
    }

    #[tokio::test]
    async fn a_write_that_outlasts_the_leadership_is_abandoned_and_not_counted() {
        let (recorder, _, scaler, module, store) = world(Ok(backlog(200.0)));
        let leadership = crate::leader::Leadership::elected();
        leadership.lead_until(std::time::Instant::now() + Duration::from_millis(200));
        let scaler = scaler.with_leadership(leadership.clone());
        recorder
            .hang
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // (the writer never answers: the tick returns only if the write is given up)
        tokio::time::timeout(Duration::from_secs(60), tick(&scaler, &module, &store))
            .await
            .expect("the write is given up at the end of the leadership, not awaited forever");
        assert_eq!(
            recorder.scaled.lock().unwrap().len(),
            1,
            "the write was tried"
        );
        assert!(!leadership.is_leading());
        assert!(recorder.events.lock().unwrap().is_empty(), "no ScaledOut");
        let text = scaler.metrics.render();
        assert!(
            text.contains(r#"chimera_autoscaler_scale_actions_total{namespace="shop",module="ledger",head="worker",direction="out"} 0"#),
            "not counted: {text}"
        );
    }

    #[tokio::test]
    async fn an_unreadable_queue_holds_writes_no_replicas_and_an_unchanged_status_once() {
        let (recorder, _, scaler, module, store) = world(Err(()));
        for _ in 0..3 {
            tick(&scaler, &module, &store).await;
        }
        assert!(recorder.scaled.lock().unwrap().is_empty());
        assert!(recorder.events.lock().unwrap().is_empty());
        let statuses = recorder.statuses.lock().unwrap();
        assert_eq!(
            statuses.len(),
            1,
            "nothing changed after the first: {statuses:?}"
        );
        let worker = statuses[0].worker.as_ref().unwrap();
        assert!(worker.metrics_stale);
        assert_eq!(worker.desired_replicas, 1);
    }

    /// A pod of ledger's worker created now and Ready `ready_after` seconds later.
    fn head_pod(uid: &str, ready_after: i64) -> Arc<Pod> {
        use k8s_openapi::jiff::{SignedDuration, Timestamp};
        let created = Timestamp::now();
        let ready = created
            .checked_add(SignedDuration::from_secs(ready_after))
            .unwrap();
        let (created, ready) = (created.to_string(), ready.to_string());
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {
                    "name": uid, "namespace": "shop", "uid": uid, "creationTimestamp": created,
                    "labels": {"chimera.dev/module": "ledger", "chimera.dev/head": "worker"}
                },
                "status": {"conditions": [
                    {"type": "Ready", "status": "True", "lastTransitionTime": ready}
                ]}
            }))
            .unwrap(),
        )
    }

    #[tokio::test]
    async fn the_law_plans_with_the_start_up_time_of_the_heads_own_pods() {
        let (recorder, _, scaler, module, store) = world(Ok(backlog(0.0)));
        tick(&scaler, &module, &store).await;
        scaler.measure_startups(&[head_pod("a", 2), head_pod("b", 3)]);
        tick(&scaler, &module, &store).await;
        let statuses = recorder.statuses.lock().unwrap();
        let before = statuses[0].worker.as_ref().unwrap();
        assert_eq!(before.pod_startup_seconds, Some(10.0), "the default");
        assert_eq!(before.pod_startup_measured_pods, 0);
        assert_eq!(statuses.len(), 2, "a new measure is written: {statuses:?}");
        let after = statuses[1].worker.as_ref().unwrap();
        assert_eq!(after.pod_startup_seconds, Some(3.0));
        assert_eq!(after.pod_startup_measured_pods, 2);
    }

    #[tokio::test]
    async fn a_restarted_scaler_plans_with_the_start_up_its_predecessor_measured() {
        let (recorder, _, scaler, mut module, store) = world(Ok(backlog(0.0)));
        // What an earlier leader wrote: 4 s, measured from 3 pods.
        module.status = Some(chimera_core::api::ChimeraModuleStatus {
            autoscaling: Some(AutoscalingStatus {
                worker: Some(ScalingDecision {
                    desired_replicas: 1,
                    current_replicas: 1,
                    pod_startup_seconds: Some(4.0),
                    pod_startup_measured_pods: 3,
                    ..ScalingDecision::default()
                }),
                query: None,
            }),
            ..Default::default()
        });
        tick(&scaler, &module, &store).await;
        // Its own pods take over once it has seen one start.
        scaler.measure_startups(&[head_pod("a", 2)]);
        tick(&scaler, &module, &store).await;
        let statuses = recorder.statuses.lock().unwrap();
        // The first decision planned with the 4 s of 3 pods, as the status already said, so
        // it wrote nothing (with the default it would have written 10 s from 0 pods).
        assert_eq!(statuses.len(), 1, "{statuses:?}");
        let own = statuses[0].worker.as_ref().unwrap();
        assert_eq!(own.pod_startup_seconds, Some(2.0));
        assert_eq!(own.pod_startup_measured_pods, 1);
    }

    #[tokio::test]
    async fn a_recovered_queue_writes_the_status_again() {
        let (recorder, queue, scaler, module, store) = world(Err(()));
        tick(&scaler, &module, &store).await;
        *queue.0.lock().unwrap() = Ok(backlog(0.0));
        tick(&scaler, &module, &store).await;
        let statuses = recorder.statuses.lock().unwrap();
        assert_eq!(statuses.len(), 2, "staleness changed: {statuses:?}");
        assert!(!statuses[1].worker.as_ref().unwrap().metrics_stale);
    }

    // The loop's cadence, on a paused clock: every module once per interval, at its own slot.

    /// Answers an idle queue and records which queue was read when.
    #[derive(Default)]
    struct Reads(StdMutex<Vec<(String, tokio::time::Instant)>>);

    impl QueueSource for Reads {
        fn sample<'a>(
            &'a self,
            _: &'a BrokerEndpoint,
            queue: &'a str,
        ) -> BoxFuture<'a, Result<QueueSample, SourceError>> {
            self.0
                .lock()
                .unwrap()
                .push((queue.to_owned(), tokio::time::Instant::now()));
            Box::pin(async {
                Ok(QueueSample {
                    ready: 0.0,
                    unacked: 0.0,
                    acked_total: 0.0,
                    consumers: 1,
                })
            })
        }
    }

    impl LatencySource for Reads {
        fn sample<'a>(
            &'a self,
            _: &'a [String],
        ) -> BoxFuture<'a, Result<Vec<(String, Scrape)>, SourceError>> {
            Box::pin(async { Err(SourceError::Timeout(Duration::from_secs(3))) })
        }

        fn outbox_rows<'a>(&'a self, _: &'a [String]) -> BoxFuture<'a, Result<f64, SourceError>> {
            Box::pin(async { Err(SourceError::Timeout(Duration::from_secs(3))) })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn every_module_is_decided_once_per_interval_at_its_own_slot() {
        const MODULES: usize = 60;
        let (modules, mut modules_in) = reflector::store::<ChimeraModule>();
        let (deployments, mut deployments_in) = reflector::store::<Deployment>();
        let (pods, _) = reflector::store::<Pod>();
        for i in 0..MODULES {
            let yaml = format!(
                "apiVersion: chimera.dev/v1alpha1\nkind: ChimeraModule\nmetadata: {{name: m{i}, namespace: shop}}\nspec:\n  image: x/y:1\n  commands: [m{i}.do]\n  worker: {{replicas: {{min: 1, max: 4}}}}\n"
            );
            let module = chimera_core::api::validation::modules_from_yaml(&yaml)
                .0
                .remove(0);
            modules_in.apply_watcher_event(&watcher::Event::Apply(module));
            let mut deployment = Deployment {
                spec: Some(DeploymentSpec {
                    replicas: Some(1),
                    ..DeploymentSpec::default()
                }),
                ..Deployment::default()
            };
            deployment.metadata.name = Some(format!("m{i}-worker"));
            deployment.metadata.namespace = Some("shop".into());
            deployments_in.apply_watcher_event(&watcher::Event::Apply(deployment));
        }
        let reads = Arc::new(Reads::default());
        let scaler = Arc::new(Scaler::new(
            Arc::new(Recorder::default()),
            reads.clone(),
            reads.clone(),
            ScalerSettings::default(),
        ));
        let start = tokio::time::Instant::now();
        let running = tokio::spawn(Arc::clone(&scaler).run(modules, deployments, pods));
        // Two intervals and a little: the slot ticks at 0, 100, ..., 2000 ms.
        tokio::time::sleep(Duration::from_millis(2050)).await;
        running.abort();

        let reads = reads.0.lock().unwrap().clone();
        let mut by_queue: HashMap<String, Vec<Duration>> = HashMap::new();
        for (queue, at) in &reads {
            by_queue.entry(queue.clone()).or_default().push(*at - start);
        }
        assert_eq!(
            by_queue.len(),
            MODULES,
            "every module was read: {by_queue:?}"
        );
        let mut slots = std::collections::BTreeSet::new();
        for (queue, times) in &by_queue {
            // Slots 0..9 come twice in 2 s; slot 0 a third time at 2 s.
            assert!((2..=3).contains(&times.len()), "{queue}: read at {times:?}");
            for pair in times.windows(2) {
                assert_eq!(
                    pair[1] - pair[0],
                    Duration::from_secs(1),
                    "{queue}: {times:?}"
                );
            }
            slots.insert(times[0].as_millis() / 100);
        }
        assert!(
            slots.len() >= 8,
            "the modules' reads are spread over the interval: slots {slots:?}"
        );
        // No decision waited behind another: each came in the slot it was due.
        let text = scaler.metrics.render();
        let value = |series: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(series))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        };
        let decided = value("chimera_autoscaler_tick_lag_seconds_count");
        assert!(decided >= (2 * MODULES) as f64, "{text}");
        assert_eq!(
            value("chimera_autoscaler_tick_lag_seconds_bucket{le=\"0.001\"}"),
            decided,
            "{text}"
        );
    }
}
