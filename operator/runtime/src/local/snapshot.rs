//! What `chimera up` shows: a snapshot of every head (replicas, queue, latency, decisions, and
//! a few minutes of history for the charts), served as JSON on `/api/status` next to the
//! dashboard, and the state file that lets `chimera status` find it and a later `chimera up`
//! clean up after a crash.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use super::head::{DecisionRecord, HeadRunner};
use super::process::{alive, terminate};
use chimera_core::topology::state::{BrokerEndpoint, redact};
use chimera_core::workloads::Head;

/// Seconds of history kept for the charts.
const HISTORY_S: usize = 600;

/// One second of one head, for the charts.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Point {
    /// Seconds since `chimera up` started.
    pub t: f64,
    /// Replicas (running or restarting).
    pub replicas: u32,
    /// Ready replicas.
    pub ready: u32,
    /// Worker: messages in the queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog: Option<f64>,
    /// Worker: acks per second; query: requests per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Worker: arrivals per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arrivals: Option<f64>,
    /// Query: p50, p95, p99 in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<[f64; 3]>,
}

/// One head.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HeadView {
    /// `query` or `worker`.
    pub head: String,
    /// Replicas now.
    pub replicas: u32,
    /// Ready now.
    pub ready: u32,
    /// Bounds.
    pub min: u32,
    /// Bounds.
    pub max: u32,
    /// Query head: the stable base URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Worker: the queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Worker: messages in the queue now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<f64>,
    /// Query: the latency target, in ms, and its percentile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_target: Option<(f64, f64)>,
    /// Restarts of crashed replicas.
    pub restarts: u32,
    /// Process ids of the running replicas.
    #[serde(default)]
    pub pids: Vec<u32>,
    /// The latest decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<DecisionRecord>,
    /// Recent changes of the replica count, newest last.
    pub decisions: Vec<DecisionRecord>,
    /// History, oldest first.
    pub history: Vec<Point>,
}

/// One module.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ModuleView {
    /// Name.
    pub name: String,
    /// Domain.
    pub domain: String,
    /// Commands it takes.
    pub commands: Vec<String>,
    /// Events it publishes.
    pub publishes: Vec<String>,
    /// Domains (and event patterns) it subscribes to.
    pub subscribes: Vec<(String, Vec<String>)>,
    /// Its heads.
    pub heads: Vec<HeadView>,
}

/// Everything.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    /// Seconds since start.
    pub uptime_s: f64,
    /// The broker (credentials removed).
    pub broker: String,
    /// Modules by name.
    pub modules: Vec<ModuleView>,
    #[serde(skip)]
    history: BTreeMap<String, VecDeque<Point>>,
    #[serde(skip)]
    acked: BTreeMap<String, (f64, f64, f64)>, // key -> (t, acked_total, arrived_total)
}

impl Snapshot {
    /// Refreshes from the runners.
    pub fn update(&mut self, now: f64, runners: &[HeadRunner], broker: &BrokerEndpoint) {
        self.uptime_s = now;
        self.broker = redact(&broker.amqp_url);
        let mut modules: BTreeMap<String, ModuleView> = BTreeMap::new();
        for runner in runners {
            let m = &runner.module;
            let name = m.metadata.name.clone().unwrap_or_default();
            let view = modules.entry(name.clone()).or_insert_with(|| ModuleView {
                name: name.clone(),
                domain: m.domain().to_owned(),
                commands: m.spec.commands.clone(),
                publishes: m.spec.events.publishes.clone(),
                subscribes: m
                    .spec
                    .events
                    .subscribes
                    .iter()
                    .map(|s| (s.from.clone(), s.events.clone()))
                    .collect(),
                heads: Vec::new(),
            });
            let key = format!("{name}/{}", runner.head.as_str());
            let r = runner.replicas();
            let mut point = Point {
                t: now,
                replicas: r.existing,
                ready: r.ready,
                ..Point::default()
            };
            if let Some(q) = runner.last_queue {
                let backlog = q.ready + q.unacked;
                point.backlog = Some(backlog);
                let arrived = backlog + q.acked_total;
                if let Some((t0, a0, r0)) = self.acked.get(&key).copied()
                    && now > t0
                {
                    point.rate = Some(((q.acked_total - a0) / (now - t0)).max(0.0));
                    point.arrivals = Some(((arrived - r0) / (now - t0)).max(0.0));
                }
                self.acked
                    .insert(key.clone(), (now, q.acked_total, arrived));
            }
            if runner.head == Head::Query {
                point.rate = runner.last_rate;
                point.latency_ms = runner.last_latency.map(|l| l.map(|s| s * 1000.0));
            }
            let history = self.history.entry(key).or_default();
            history.push_back(point.clone());
            while history.len() > HISTORY_S {
                history.pop_front();
            }
            let bounds = runner.bounds();
            view.heads.push(HeadView {
                head: runner.head.as_str().to_owned(),
                replicas: r.existing,
                ready: r.ready,
                min: bounds.min,
                max: bounds.max,
                url: runner.front.map(|a| format!("http://{a}")),
                queue: (runner.head == Head::Worker)
                    .then(|| chimera_contract::names::worker_queue(m.domain())),
                queue_depth: point.backlog,
                latency_target: (runner.head == Head::Query).then(|| {
                    let l = m
                        .spec
                        .query
                        .as_ref()
                        .map(|q| q.autoscale.latency.clone())
                        .unwrap_or_default();
                    (l.target_ms as f64, l.percentile)
                }),
                restarts: runner.restarts,
                pids: runner.pids(),
                current: runner.current.clone(),
                decisions: runner.decisions.iter().cloned().collect(),
                history: history.iter().cloned().collect(),
            });
        }
        self.modules = modules.into_values().collect();
    }
}

/// `<state>/up.json`: who runs, where its dashboard is, which processes are its.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct UpFile {
    /// `chimera up`'s process.
    pub pid: u32,
    /// The dashboard (and API) base URL.
    pub dashboard: String,
    /// The broker's AMQP URL (for `chimera load`; the file stays on this machine).
    #[serde(default)]
    pub amqp_url: String,
    /// Its heads' processes.
    pub pids: Vec<u32>,
}

fn up_path(state: &Path) -> PathBuf {
    state.join("up.json")
}

impl UpFile {
    /// Writes it (atomically).
    pub fn write(&self, state: &Path) -> anyhow::Result<()> {
        let tmp = state.join("up.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        // It holds the broker URL with its password: readable by this user only.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        }
        std::fs::rename(&tmp, up_path(state))?;
        Ok(())
    }

    /// Reads it.
    pub fn read(state: &Path) -> anyhow::Result<Self> {
        let path = up_path(state);
        let text = std::fs::read_to_string(&path).map_err(|_| {
            anyhow::anyhow!(
                "no chimera up is running here ({} not found; start one with `chimera up`)",
                path.display()
            )
        })?;
        Ok(serde_json::from_str(&text)?)
    }
}

/// After a crash: fails if another `chimera up` is alive here, otherwise stops the processes a
/// dead one left behind.
pub fn recover(state: &Path) -> anyhow::Result<()> {
    let Ok(previous) = UpFile::read(state) else {
        return Ok(());
    };
    if previous.pid != std::process::id() && alive(previous.pid) && is_chimera(previous.pid) {
        anyhow::bail!(
            "another chimera up (pid {}) runs with state directory {}; stop it first",
            previous.pid,
            state.display()
        );
    }
    // Only heads of a local run: a recycled pid now belongs to someone else.
    let left: Vec<u32> = previous
        .pids
        .into_iter()
        .filter(|p| alive(*p) && is_local_head(*p))
        .collect();
    for pid in &left {
        terminate(*pid);
    }
    // They shut down gracefully (a worker finishes its messages); then whatever remains is
    // killed, so no port or database lock stays taken.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while left.iter().any(|p| alive(*p)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    for pid in left.iter().filter(|p| alive(**p)) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    if !left.is_empty() {
        println!(
            "chimera up: stopped {} process(es) a previous run left behind",
            left.len()
        );
    }
    clear(state);
    Ok(())
}

/// Whether `pid` runs with the environment `chimera up` gives its heads.
fn is_local_head(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
        env.split(|b| *b == 0).any(|v| {
            v == format!(
                "CHIMERA_NAMESPACE={}",
                chimera_core::local::plan::LOCAL_NAMESPACE
            )
            .as_bytes()
        })
    })
}

fn is_chimera(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("chimera"))
        .unwrap_or(false)
}

/// Removes the state file.
pub fn clear(state: &Path) {
    let _ = std::fs::remove_file(up_path(state));
}

const DASHBOARD: &str = include_str!("dashboard.html");

/// Serves the dashboard and `/api/status` in the background; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    snapshot: Arc<RwLock<Snapshot>>,
) -> anyhow::Result<SocketAddr> {
    use axum::response::Html;
    use axum::routing::get;
    use axum::{Json, Router};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("the dashboard needs {addr}: {e} (use --dashboard-port)"))?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/", get(|| async { Html(DASHBOARD) }))
        .route(
            "/api/status",
            get(move || {
                let s = snapshot.read().map(|s| s.clone()).unwrap_or_default();
                async move { Json(s) }
            }),
        );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_up_file_round_trips_and_recovery_clears_it() {
        let dir = std::env::temp_dir().join(format!("chimera-up-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(
            UpFile::read(&dir)
                .unwrap_err()
                .to_string()
                .contains("no chimera up")
        );
        // A dead run (pid 0 is never a process) with a dead child.
        let file = UpFile {
            pid: 0,
            dashboard: "http://127.0.0.1:1".into(),
            amqp_url: String::new(),
            pids: vec![0],
        };
        file.write(&dir).unwrap();
        assert_eq!(UpFile::read(&dir).unwrap(), file);
        recover(&dir).unwrap();
        assert!(UpFile::read(&dir).is_err(), "cleared");
        std::fs::remove_dir_all(&dir).ok();
    }
}
