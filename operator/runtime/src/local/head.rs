//! One head of one module under `chimera up`: its replicas as supervised processes (restarted
//! with backoff when they die), their readiness, the control law deciding how many there are,
//! and, for a query head, the balancer in front of them.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::balancer::Backends;
use super::process::{Replica, ReplicaSpec};
use chimera_core::api::ChimeraModule;
use chimera_core::autoscale::head::{QueryAutoscaler, WorkerAutoscaler};
use chimera_core::autoscale::histogram::Histogram;
use chimera_core::autoscale::query::QuerySettings;
use chimera_core::autoscale::signals::QueueSample;
use chimera_core::autoscale::worker::WorkerSettings;
use chimera_core::autoscale::{Bounds, Decision, Replicas};
use chimera_core::local::plan::{LocalContext, head_args, replica_env};
use chimera_core::workloads::{Head, termination_grace_seconds};

/// Longest wait before restarting a replica that keeps dying.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Decisions kept for the dashboard.
const DECISIONS_KEPT: usize = 50;

enum Slot {
    Running {
        replica: Box<Replica>,
        since: Instant,
        ready: bool,
        /// Restarts in a row before this run (reset once a run lasts MAX_BACKOFF).
        restarts: u32,
    },
    Waiting {
        until: Instant,
        restarts: u32,
    },
}

/// A decision as the dashboard and `chimera status` show it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DecisionRecord {
    /// Seconds since `chimera up` started.
    pub at: f64,
    /// Replicas decided.
    pub desired: u32,
    /// Why.
    pub reason: String,
    /// What was measured.
    pub signal: String,
    /// Replicas beyond which the head's measured throughput stops growing, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throughput_limit: Option<u32>,
}

/// One head's runner.
pub struct HeadRunner {
    /// The module.
    pub module: ChimeraModule,
    /// Which head.
    pub head: Head,
    bounds: Bounds,
    program: PathBuf,
    local: LocalContext,
    logs: PathBuf,
    echo: bool,
    slots: Vec<(u32, u16, Slot)>, // (replica number, port, state)
    autoscaler: Autoscaler,
    /// The balancer's backends (query heads).
    pub backends: Backends,
    /// The balancer's address (query heads).
    pub front: Option<SocketAddr>,
    /// Recent changes of the replica count, newest last.
    pub decisions: VecDeque<DecisionRecord>,
    /// The latest decision (every tick).
    pub current: Option<DecisionRecord>,
    /// The latest signal values for the dashboard.
    pub last_queue: Option<QueueSample>,
    /// The latest percentiles (p50, p95, p99) in seconds.
    pub last_latency: Option<[f64; 3]>,
    /// The latest request rate.
    pub last_rate: Option<f64>,
    /// Restarts so far.
    pub restarts: u32,
    grace: Duration,
    /// Recent merged histograms, for the dashboard's percentiles.
    history: VecDeque<(f64, Histogram)>,
    /// Replicas scaled in and still finishing their work: (pid, the task stopping it).
    draining: Vec<(u32, tokio::task::JoinHandle<()>)>,
}

/// The runner's autoscaler: the head's own type, the one the operator and the simulator run.
enum Autoscaler {
    Worker(WorkerAutoscaler),
    Query(QueryAutoscaler),
}

impl HeadRunner {
    /// A runner with no replica yet; None when the module does not declare `head`.
    pub fn new(
        module: ChimeraModule,
        head: Head,
        program: PathBuf,
        local: LocalContext,
        logs: PathBuf,
        echo: bool,
        startup_seconds: f64,
    ) -> Option<Self> {
        let (law, bounds) = match head {
            Head::Worker => {
                let settings =
                    WorkerSettings::for_head(module.spec.worker.as_ref()?, startup_seconds);
                (
                    Autoscaler::Worker(WorkerAutoscaler::new(settings)),
                    settings.bounds,
                )
            }
            Head::Query => {
                let settings =
                    QuerySettings::for_head(module.spec.query.as_ref()?, startup_seconds);
                (
                    Autoscaler::Query(QueryAutoscaler::new(settings)),
                    settings.bounds,
                )
            }
        };
        let grace = termination_grace_seconds(&module, head);
        Some(Self {
            module,
            head,
            bounds,
            program,
            local,
            logs,
            echo,
            slots: Vec::new(),
            autoscaler: law,
            backends: Backends::default(),
            front: None,
            decisions: VecDeque::new(),
            current: None,
            last_queue: None,
            last_latency: None,
            last_rate: None,
            restarts: 0,
            grace: Duration::from_secs(u64::try_from(grace).unwrap_or(30)),
            history: VecDeque::new(),
            draining: Vec::new(),
        })
    }

    /// The replica count bounds.
    pub fn bounds(&self) -> Bounds {
        self.bounds
    }

    /// Replicas that exist (running or waiting to restart) and those ready.
    pub fn replicas(&self) -> Replicas {
        Replicas {
            existing: u32::try_from(self.slots.len()).unwrap_or(u32::MAX),
            ready: u32::try_from(
                self.slots
                    .iter()
                    .filter(|(_, _, s)| matches!(s, Slot::Running { ready: true, .. }))
                    .count(),
            )
            .unwrap_or(0),
        }
    }

    /// HTTP addresses of the ready replicas.
    pub fn ready_addrs(&self) -> Vec<SocketAddr> {
        self.slots
            .iter()
            .filter(|(_, _, s)| matches!(s, Slot::Running { ready: true, .. }))
            .map(|(_, port, _)| SocketAddr::from(([127, 0, 0, 1], *port)))
            .collect()
    }

    /// Process ids of the running replicas and of those still draining (for crash recovery).
    pub fn pids(&self) -> Vec<u32> {
        self.slots
            .iter()
            .filter_map(|(_, _, s)| match s {
                Slot::Running { replica, .. } => Some(replica.pid),
                Slot::Waiting { .. } => None,
            })
            .chain(self.draining.iter().map(|(pid, _)| *pid))
            .collect()
    }

    fn label(&self, n: u32) -> String {
        format!("{}/{}/{n}", self.module.domain(), self.head.as_str())
    }

    async fn start(&self, n: u32, port: u16) -> Result<Replica, String> {
        let env = replica_env(&self.module, self.head, n, port, &self.local, &|k| {
            std::env::var(k).ok()
        })
        .map_err(|e| e.to_string())?;
        let spec = ReplicaSpec {
            label: self.label(n),
            program: self.program.clone(),
            args: head_args(&self.module, self.head),
            env,
            log_file: self.logs.join(format!(
                "{}-{}-{n}.log",
                self.module.domain(),
                self.head.as_str()
            )),
            echo: self.echo,
        };
        Replica::start(spec)
            .await
            .map_err(|e| format!("cannot start {}: {e}", self.program.display()))
    }

    /// Starts replica `n`; one that cannot start waits for a retry (after `restarts` failures).
    async fn launch(&self, n: u32, port: u16, restarts: u32) -> Slot {
        match self.start(n, port).await {
            Ok(replica) => Slot::Running {
                replica: Box::new(replica),
                since: Instant::now(),
                ready: false,
                restarts,
            },
            Err(error) => {
                eprintln!("{:>18} | {error}", self.label(n));
                Slot::Waiting {
                    until: Instant::now() + backoff(restarts + 1),
                    restarts: restarts + 1,
                }
            }
        }
    }

    /// Grows or shrinks to `desired` replicas: new ones start, the highest-numbered stop
    /// gracefully (SIGTERM; a worker finishes its messages in flight).
    pub async fn resize(&mut self, desired: u32) {
        while self.slots.len() > desired as usize {
            if let Some((_, _, slot)) = self.slots.pop()
                && let Slot::Running { replica, .. } = slot
            {
                // It finishes its work in the background (the loop goes on), and stays
                // listed until it is gone.
                let (grace, pid) = (self.grace, replica.pid);
                self.draining.push((pid, tokio::spawn(replica.stop(grace))));
            }
        }
        while self.slots.len() < desired as usize {
            let n = (1..)
                .find(|n| self.slots.iter().all(|(m, _, _)| m != n))
                .unwrap_or(1);
            let port = free_port();
            let slot = self.launch(n, port, 0).await;
            self.slots.push((n, port, slot));
        }
        self.backends.set(self.ready_addrs());
    }

    /// Restarts replicas that died (with backoff) and probes readiness.
    pub async fn supervise(&mut self, http: &reqwest::Client) {
        self.draining.retain(|(_, task)| !task.is_finished());
        for i in 0..self.slots.len() {
            let (n, port) = (self.slots[i].0, self.slots[i].1);
            let next = match &mut self.slots[i].2 {
                Slot::Running {
                    replica,
                    since,
                    ready,
                    restarts,
                } => match replica.exited() {
                    Some(status) => {
                        // A run that lasted resets the backoff; crashes in a row double it.
                        let restarts = if since.elapsed() > MAX_BACKOFF {
                            1
                        } else {
                            *restarts + 1
                        };
                        let wait = backoff(restarts);
                        eprintln!(
                            "{:>18} | exited ({status}); restarting in {}s",
                            self.label(n),
                            wait.as_secs()
                        );
                        self.restarts += 1;
                        Some(Slot::Waiting {
                            until: Instant::now() + wait,
                            restarts,
                        })
                    }
                    None => {
                        *ready = http
                            .get(format!("http://127.0.0.1:{port}/readyz"))
                            .send()
                            .await
                            .is_ok_and(|r| r.status().is_success());
                        None
                    }
                },
                Slot::Waiting { until, restarts } if Instant::now() >= *until => {
                    let restarts = *restarts;
                    Some(self.launch(n, port, restarts).await)
                }
                Slot::Waiting { .. } => None,
            };
            if let Some(next) = next {
                self.slots[i].2 = next;
            }
        }
        self.backends.set(self.ready_addrs());
    }

    /// Runs the law on a worker queue sample (None: unavailable) and, when the head could go
    /// to zero, the outbox rows of its ready replicas; returns its decision.
    pub async fn decide_worker(
        &mut self,
        now: f64,
        sample: Result<QueueSample, String>,
        http: &reqwest::Client,
    ) -> Decision {
        let replicas = self.replicas();
        let addrs = self.ready_addrs();
        let decision = match &mut self.autoscaler {
            Autoscaler::Worker(autoscaler) => {
                if let Ok(s) = &sample {
                    self.last_queue = Some(*s);
                }
                let outbox = match &sample {
                    Ok(s) if autoscaler.outbox_matters(s, replicas) => {
                        outbox_of(http, &addrs).await
                    }
                    _ => None,
                };
                autoscaler
                    .decide_sample(now, sample.as_ref(), replicas, outbox)
                    .decision
            }
            // A runner is built for one head: `chimera up` asks each runner for its own kind.
            Autoscaler::Query(_) => Decision::hold(replicas.existing, "not a worker head"),
        };
        self.record(now, &decision);
        decision
    }

    /// Scrapes the ready replicas and runs the query law.
    pub async fn decide_query(&mut self, now: f64, http: &reqwest::Client) -> Decision {
        let replicas = self.replicas();
        let mut scrapes = Vec::new();
        for addr in self.ready_addrs() {
            let target = addr.to_string();
            if let Ok(s) = crate::scaler::sources::scrape(http, &target).await {
                scrapes.push((target, s));
            }
        }
        let decision = match &mut self.autoscaler {
            Autoscaler::Query(autoscaler) => {
                let (outcome, latency) =
                    autoscaler.decide_scrapes(now, Ok::<_, &str>(&scrapes), replicas);
                if let Some(latency) = latency {
                    self.track_latency(now, latency);
                }
                outcome.decision
            }
            Autoscaler::Worker(_) => Decision::hold(replicas.existing, "not a query head"),
        };
        self.record(now, &decision);
        decision
    }

    fn track_latency(&mut self, now: f64, latency: Histogram) {
        self.history.push_back((now, latency));
        while self.history.len() > 4 {
            self.history.pop_front();
        }
        if let (Some((t0, old)), Some((t1, new))) = (self.history.front(), self.history.back())
            && t1 > t0
        {
            let window = new.since(old);
            self.last_rate = Some(window.total / (t1 - t0));
            self.last_latency = match (
                window.quantile(0.5),
                window.quantile(0.95),
                window.quantile(0.99),
            ) {
                (Some(a), Some(b), Some(c)) => Some([a, b, c]),
                _ => None,
            };
        }
    }

    fn record(&mut self, now: f64, decision: &Decision) {
        let record = DecisionRecord {
            at: now,
            desired: decision.desired,
            reason: decision.reason.clone(),
            signal: decision.signal.clone(),
            throughput_limit: decision.throughput_limit,
        };
        let changed = self
            .decisions
            .back()
            .is_none_or(|d| d.desired != decision.desired);
        self.current = Some(record.clone());
        if changed {
            self.decisions.push_back(record);
            while self.decisions.len() > DECISIONS_KEPT {
                self.decisions.pop_front();
            }
        }
    }

    /// Stops every replica gracefully.
    pub async fn stop_all(&mut self) {
        let grace = self.grace;
        let stops: Vec<_> = self
            .slots
            .drain(..)
            .filter_map(|(_, _, s)| match s {
                Slot::Running { replica, .. } => Some(replica.stop(grace)),
                Slot::Waiting { .. } => None,
            })
            .collect();
        futures::future::join_all(stops).await;
        for (_, task) in self.draining.drain(..) {
            let _ = task.await;
        }
        self.backends.set(Vec::new());
    }
}

fn backoff(restarts: u32) -> Duration {
    Duration::from_secs(1u64 << restarts.min(5)).min(MAX_BACKOFF)
}

/// The outbox rows not sent yet over `addrs`; `None` when there are none to read or any
/// could not be read.
async fn outbox_of(http: &reqwest::Client, addrs: &[SocketAddr]) -> Option<f64> {
    if addrs.is_empty() {
        return None;
    }
    let targets: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    let reads = futures::future::join_all(
        targets
            .iter()
            .map(|target| crate::scaler::sources::outbox_rows(http, target)),
    )
    .await;
    let mut rows = 0.0;
    for (addr, read) in addrs.iter().zip(reads) {
        match read {
            Ok(n) => rows += n,
            Err(error) => {
                tracing::debug!(%error, %addr, "could not read a worker replica's outbox");
                return None;
            }
        }
    }
    Some(rows)
}

/// A port the kernel has just handed out (released at once for the replica to bind).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}
