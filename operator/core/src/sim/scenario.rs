//! Scenario files: a JSON description and a per-second trace CSV (`t_s,rate,service_scale`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why a scenario could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// A file could not be read.
    #[error("cannot read {path}: {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the system said.
        cause: std::io::Error,
    },
    /// The JSON is not a scenario.
    #[error("{path} is not a scenario: {cause}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        cause: serde_json::Error,
    },
    /// The scenario is inconsistent or its trace malformed.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Which head a scenario loads (`"head": "worker"` or `"query"`).
pub use chimera_contract::Head;

/// Service characteristics.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
pub struct Service {
    /// Worker: messages per second one replica handles at service_scale 1.
    pub per_replica_rate: Option<f64>,
    /// Query: mean service time at service_scale 1, in ms.
    pub service_ms: Option<f64>,
    /// Query: requests one replica serves at once.
    pub concurrency: Option<u32>,
    /// Worker: contention σ of the Universal Scalability Law (replicas queueing on a shared
    /// database or lock); 0 or absent: none.
    #[serde(default)]
    pub contention: Option<f64>,
    /// Worker: coherency κ of the Universal Scalability Law (replicas keeping each other
    /// consistent: past its peak, more replicas serve less); 0 or absent: none.
    #[serde(default)]
    pub coherency: Option<f64>,
}

impl Service {
    /// Messages per second `n` worker replicas serve together, each serving `mu` alone:
    /// `n·mu / (1 + σ(n−1) + κ·n(n−1))`.
    pub fn throughput(&self, n: f64, mu: f64) -> f64 {
        let (sigma, kappa) = (
            self.contention.unwrap_or(0.0),
            self.coherency.unwrap_or(0.0),
        );
        if n <= 0.0 {
            return 0.0;
        }
        n * mu / (1.0 + sigma * (n - 1.0).max(0.0) + kappa * n * (n - 1.0).max(0.0))
    }

    /// The fewest (fractional) replicas that serve `rate`, each serving `mu` alone, at most
    /// `max`; where no count serves it, the count that serves the most (the fluid bound).
    pub fn replicas_for(&self, rate: f64, mu: f64, max: f64) -> f64 {
        if rate <= 0.0 || mu <= 0.0 {
            return 0.0;
        }
        if self.contention.unwrap_or(0.0) <= 0.0 && self.coherency.unwrap_or(0.0) <= 0.0 {
            return rate / mu;
        }
        // Throughput rises up to its peak, then falls: search the rising part.
        let kappa = self.coherency.unwrap_or(0.0);
        let sigma = self.contention.unwrap_or(0.0);
        let peak = if kappa > 0.0 {
            ((1.0 - sigma) / kappa).max(1.0).sqrt().min(max.max(1.0))
        } else {
            max.max(1.0)
        };
        if self.throughput(peak, mu) <= rate {
            return peak;
        }
        let (mut lo, mut hi) = (0.0, peak);
        for _ in 0..60 {
            let mid = (lo + hi) / 2.0;
            if self.throughput(mid, mu) >= rate {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        hi
    }
}

/// The objective.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
pub struct Slo {
    /// Worker: p99 queue wait, in seconds.
    pub queue_wait_p99_s: Option<f64>,
    /// Query: p95 latency, in ms.
    pub latency_p95_ms: Option<f64>,
}

#[derive(Deserialize)]
struct File {
    name: String,
    head: Head,
    #[serde(default = "one")]
    tick_s: f64,
    pod_startup_s: u32,
    min_replicas: u32,
    max_replicas: u32,
    service: Service,
    slo: Slo,
    duration_s: u32,
    trace: PathBuf,
    /// Worker: messages a replica holds unacknowledged (default: the CRD's default prefetch).
    #[serde(default)]
    prefetch: Option<u32>,
    /// Worker: seconds between refreshes of the broker's queue statistics (unacked messages,
    /// the ack counter); default RabbitMQ's `collect_statistics_interval`, 5 s.
    #[serde(default)]
    stats_interval_s: Option<u32>,
}

fn one() -> f64 {
    1.0
}

/// One second of load.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Second {
    /// Arrivals (messages or requests) in this second.
    pub rate: f64,
    /// Service time multiplier (2 = twice as slow).
    pub service_scale: f64,
}

/// A loaded scenario.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    /// Name.
    pub name: String,
    /// Head kind.
    pub head: Head,
    /// Seconds from ordering a replica to its serving.
    pub startup_s: u32,
    /// Fewest replicas.
    pub min_replicas: u32,
    /// Most replicas.
    pub max_replicas: u32,
    /// Service.
    pub service: Service,
    /// Objective.
    pub slo: Slo,
    /// The load, one entry per second.
    pub trace: Vec<Second>,
    /// Worker prefetch.
    pub prefetch: u32,
    /// Worker: seconds between refreshes of the broker's unacked count and ack counter (the
    /// ready count is read current, by passive declare).
    pub stats_interval_s: u32,
}

/// RabbitMQ's default `collect_statistics_interval`, in seconds.
pub const DEFAULT_STATS_INTERVAL_S: u32 = 5;

/// The CRD's default worker prefetch, used when a scenario does not say.
pub const DEFAULT_PREFETCH: u32 = 100;

impl Scenario {
    /// Reads `path` and the trace it names (relative to it).
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|cause| ScenarioError::Read {
                path: p.to_path_buf(),
                cause,
            })
        };
        let invalid = |message: String| ScenarioError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let file: File =
            serde_json::from_str(&read(path)?).map_err(|cause| ScenarioError::Json {
                path: path.to_path_buf(),
                cause,
            })?;
        if (file.tick_s - 1.0).abs() > f64::EPSILON {
            return Err(invalid(format!("tick_s must be 1, got {}", file.tick_s)));
        }
        if file.min_replicas > file.max_replicas || file.max_replicas == 0 {
            return Err(invalid(format!(
                "replica bounds {}..{} are empty",
                file.min_replicas, file.max_replicas
            )));
        }
        for (name, v) in [
            ("service.contention", file.service.contention),
            ("service.coherency", file.service.coherency),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && (0.0..1.0).contains(&v))
            {
                return Err(invalid(format!("{name} must be in [0, 1), got {v}")));
            }
        }
        match file.head {
            Head::Worker if file.service.per_replica_rate.is_none_or(|r| r <= 0.0) => {
                return Err(invalid(
                    "a worker scenario needs service.per_replica_rate > 0".into(),
                ));
            }
            Head::Worker if file.slo.queue_wait_p99_s.is_none() => {
                return Err(invalid(
                    "a worker scenario needs slo.queue_wait_p99_s".into(),
                ));
            }
            Head::Query
                if file.service.service_ms.is_none_or(|s| s <= 0.0)
                    || file.service.concurrency.is_none_or(|c| c == 0) =>
            {
                return Err(invalid(
                    "a query scenario needs service.service_ms > 0 and service.concurrency > 0"
                        .into(),
                ));
            }
            Head::Query if file.slo.latency_p95_ms.is_none() => {
                return Err(invalid("a query scenario needs slo.latency_p95_ms".into()));
            }
            _ => {}
        }
        let trace_path = path
            .parent()
            .map_or_else(|| file.trace.clone(), |dir| dir.join(&file.trace));
        let trace = parse_trace(&read(&trace_path)?, file.duration_s).map_err(|message| {
            ScenarioError::Invalid {
                path: trace_path.clone(),
                message,
            }
        })?;
        Ok(Self {
            name: file.name,
            head: file.head,
            startup_s: file.pod_startup_s,
            min_replicas: file.min_replicas,
            max_replicas: file.max_replicas,
            service: file.service,
            slo: file.slo,
            trace,
            prefetch: file.prefetch.unwrap_or(DEFAULT_PREFETCH).max(1),
            stats_interval_s: file
                .stats_interval_s
                .unwrap_or(DEFAULT_STATS_INTERVAL_S)
                .max(1),
        })
    }
}

/// Parses `t_s,rate,service_scale` rows into `duration` seconds (a missing second has no load
/// and the scale of the one before).
pub fn parse_trace(text: &str, duration: u32) -> Result<Vec<Second>, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = lines.next().ok_or("empty trace")?;
    let columns: Vec<&str> = header.split(',').map(str::trim).collect();
    let col = |name: &str| {
        columns
            .iter()
            .position(|c| *c == name)
            .ok_or(format!("the trace header has no {name} column: {header:?}"))
    };
    let (ct, cr, cs) = (col("t_s")?, col("rate")?, col("service_scale").ok());
    let mut seconds = vec![
        Second {
            rate: 0.0,
            service_scale: f64::NAN,
        };
        duration as usize
    ];
    for (i, line) in lines.enumerate() {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let field = |c: usize| -> Result<f64, String> {
            fields
                .get(c)
                .and_then(|f| f.parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or(format!("line {}: bad value in {line:?}", i + 2))
        };
        let t = field(ct)?;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let t = t as usize;
        if let Some(s) = seconds.get_mut(t) {
            s.rate = field(cr)?;
            s.service_scale = match cs {
                Some(c) => field(c)?.max(1e-6),
                None => 1.0,
            };
        }
    }
    let mut scale = 1.0;
    for s in &mut seconds {
        if s.service_scale.is_nan() {
            s.service_scale = scale;
        }
        scale = s.service_scale;
    }
    Ok(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_parse_and_fill_gaps() {
        let t = parse_trace("t_s,rate,service_scale\n0,10,1.0\n2,30,2.0\n", 4).unwrap();
        assert_eq!(t.len(), 4);
        assert_eq!(t[0].rate, 10.0);
        assert_eq!(
            t[1],
            Second {
                rate: 0.0,
                service_scale: 1.0
            }
        );
        assert_eq!(t[2].service_scale, 2.0);
        assert_eq!(t[3].service_scale, 2.0);
    }

    #[test]
    fn bad_traces_say_where() {
        let e = parse_trace("t_s,rate\n0,ten\n", 2).unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        let e = parse_trace("time,rate\n", 2).unwrap_err();
        assert!(e.contains("t_s"), "{e}");
        assert!(parse_trace("t_s,rate\n0,-1\n", 2).is_err());
    }

    #[test]
    fn the_benchmark_scenarios_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/autoscale/scenarios");
        let mut loaded = 0;
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "json") {
                let s = Scenario::load(&p).unwrap_or_else(|e| panic!("{e}"));
                assert!(!s.trace.is_empty());
                loaded += 1;
            }
        }
        assert!(loaded >= 8, "{loaded} scenarios in {}", dir.display());
    }
}
