//! Scaling policies the simulator compares: ours (the control laws the operator runs) and the
//! anchors with their documented defaults (brief section 6 in docs/autoscaling.md).

use std::collections::VecDeque;

use crate::autoscale::head::{QueryAutoscaler, WorkerAutoscaler};
use crate::autoscale::histogram::Histogram;
use crate::autoscale::query::{QuerySettings, QuerySignals};
use crate::autoscale::worker::{WorkerSettings, WorkerSignals};
use crate::autoscale::{Bounds, Decision, Replicas};

use super::scenario::{Head, Scenario};

/// What a live control plane could measure at one second.
#[derive(Clone, Debug)]
pub enum Observation {
    /// A worker head.
    Worker(WorkerSignals),
    /// A query head.
    Query(QuerySignals),
}

impl Observation {
    fn replicas(&self) -> Replicas {
        match self {
            Self::Worker(s) => s.replicas,
            Self::Query(s) => s.replicas,
        }
    }

    fn now(&self) -> f64 {
        match self {
            Self::Worker(s) => s.now,
            Self::Query(s) => s.now,
        }
    }
}

/// A scaling policy, called once per simulated second.
pub trait Policy {
    /// Replicas wanted now, and why.
    fn decide(&mut self, observation: &Observation) -> Decision;
}

/// Which policy to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyName {
    /// Chimera's control laws, default configuration.
    Chimera,
    /// KEDA's RabbitMQ scaler (QueueLength over AMQP) feeding the HPA.
    Keda,
    /// Knative's KPA (concurrency).
    Kpa,
}

impl std::str::FromStr for PolicyName {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == text)
            .ok_or_else(|| format!("unknown policy {text:?}: expected chimera, keda or kpa"))
    }
}

impl PolicyName {
    /// Every policy.
    pub const ALL: [PolicyName; 3] = [PolicyName::Chimera, PolicyName::Keda, PolicyName::Kpa];

    /// `chimera`, `keda` or `kpa`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chimera => "chimera",
            Self::Keda => "keda",
            Self::Kpa => "kpa",
        }
    }

    /// The knob's default (KEDA: messages per replica; KPA: target utilisation %).
    pub fn default_knob(self) -> Option<f64> {
        match self {
            Self::Chimera => None,
            Self::Keda => Some(20.0),
            Self::Kpa => Some(70.0),
        }
    }
}

/// Builds the policy for `scenario`.
pub fn build(name: PolicyName, scenario: &Scenario, knob: Option<f64>) -> Box<dyn Policy> {
    let bounds = Bounds {
        min: scenario.min_replicas,
        max: scenario.max_replicas,
    };
    let knob = knob.or(name.default_knob()).unwrap_or(0.0);
    match (name, scenario.head) {
        (PolicyName::Chimera, Head::Worker) => {
            Box::new(ChimeraWorker(WorkerAutoscaler::new(WorkerSettings {
                bounds,
                drain_seconds: scenario.slo.queue_wait_p99_s.unwrap_or(30.0),
                startup_seconds: f64::from(scenario.startup_s),
                prefetch: scenario.prefetch,
            })))
        }
        (PolicyName::Chimera, Head::Query) => {
            Box::new(ChimeraQuery(QueryAutoscaler::new(QuerySettings {
                bounds,
                quantile: 0.95,
                target_seconds: scenario.slo.latency_p95_ms.unwrap_or(150.0) / 1000.0,
                startup_seconds: f64::from(scenario.startup_s),
            })))
        }
        (PolicyName::Keda, _) => Box::new(Keda::new(bounds, knob)),
        (PolicyName::Kpa, head) => {
            let per_pod = match head {
                Head::Query => f64::from(scenario.service.concurrency.unwrap_or(1)),
                // A worker replica's concurrency is the messages it holds (its prefetch).
                Head::Worker => f64::from(scenario.prefetch),
            };
            Box::new(Kpa::new(bounds, per_pod * knob / 100.0))
        }
    }
}

/// Chimera's worker autoscaler, the operator's own type, on the model's signals.
struct ChimeraWorker(WorkerAutoscaler);

impl Policy for ChimeraWorker {
    fn decide(&mut self, o: &Observation) -> Decision {
        match o {
            Observation::Worker(s) => self.0.decide(s),
            Observation::Query(_) => hold(o, "chimera worker law given a query head"),
        }
    }
}

/// Chimera's query autoscaler, the operator's own type, on the model's merged histogram.
struct ChimeraQuery(QueryAutoscaler);

impl Policy for ChimeraQuery {
    fn decide(&mut self, o: &Observation) -> Decision {
        match o {
            Observation::Query(s) => self.0.decide(s),
            Observation::Worker(_) => hold(o, "chimera query law given a worker head"),
        }
    }
}

fn hold(o: &Observation, why: &str) -> Decision {
    Decision {
        desired: o.replicas().existing,
        reason: why.to_owned(),
        signal: String::new(),
        throughput_limit: None,
    }
}

/// KEDA's RabbitMQ scaler in QueueLength mode over AMQP (ready messages only) feeding the HPA:
/// KEDA polls every 30 s (activation from zero, deactivation after a 300 s cooldown); the HPA
/// syncs every 15 s, wants `ceil(metric / value)`, ignores a change within 10 %, scales up by
/// at most max(100 %, 4 pods) per sync, and down to the highest recommendation of 300 s.
/// On query heads (no queue) it sees the in-flight requests as its metric.
struct Keda {
    bounds: Bounds,
    value: f64,
    recommendations: VecDeque<(f64, u32)>,
    last_active: f64,
    desired: Option<u32>,
}

const KEDA_POLL_S: f64 = 30.0;
const KEDA_COOLDOWN_S: f64 = 300.0;
const HPA_SYNC_S: f64 = 15.0;
const HPA_TOLERANCE: f64 = 0.1;
const HPA_DOWN_WINDOW_S: f64 = 300.0;

impl Keda {
    fn new(bounds: Bounds, value: f64) -> Self {
        Self {
            bounds,
            value: value.max(1e-9),
            recommendations: VecDeque::new(),
            last_active: 0.0,
            desired: None,
        }
    }
}

fn every(now: f64, period: f64) -> bool {
    (now / period - (now / period).round()).abs() < 1e-9
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn ceil_u32(x: f64) -> u32 {
    if x <= 0.0 {
        0
    } else {
        x.ceil().min(f64::from(u32::MAX)) as u32
    }
}

impl Policy for Keda {
    fn decide(&mut self, o: &Observation) -> Decision {
        let now = o.now();
        let metric = match o {
            Observation::Worker(s) => s.ready_messages,
            Observation::Query(s) => s.in_flight,
        };
        let current = self.desired.unwrap_or(o.replicas().existing);
        let mut desired = current;
        if every(now, KEDA_POLL_S) {
            if metric > 0.0 {
                self.last_active = now;
                if current == 0 {
                    desired = 1;
                }
            } else if current > 0
                && self.bounds.min == 0
                && now - self.last_active >= KEDA_COOLDOWN_S
            {
                desired = 0;
            }
        }
        if current > 0 && desired > 0 && every(now, HPA_SYNC_S) {
            let hpa_min = self.bounds.min.max(1);
            let usage = metric / f64::from(current) / self.value;
            let raw = if (usage - 1.0).abs() <= HPA_TOLERANCE {
                current
            } else {
                ceil_u32(metric / self.value)
            }
            .clamp(hpa_min, self.bounds.max);
            self.recommendations.push_back((now, raw));
            while self
                .recommendations
                .front()
                .is_some_and(|(t, _)| now - t > HPA_DOWN_WINDOW_S)
            {
                self.recommendations.pop_front();
            }
            desired = if raw > current {
                raw.min((current * 2).max(current + 4))
            } else {
                let highest = self
                    .recommendations
                    .iter()
                    .map(|(_, r)| *r)
                    .max()
                    .unwrap_or(raw);
                highest.min(current)
            };
        }
        let desired = desired.min(self.bounds.max);
        self.desired = Some(desired);
        Decision {
            desired,
            reason: format!("keda value {}", self.value),
            signal: format!("metric {metric:.0}"),
            throughput_limit: None,
        }
    }
}

/// Knative's KPA: every 2 s, replicas = observed concurrency / target per pod, averaged over a
/// 60 s stable window, or over a 6 s panic window while that asks for at least twice the ready
/// pods (panic holds its highest count until 60 s pass without the condition); scale-down at
/// most halves per tick.
struct Kpa {
    bounds: Bounds,
    target_per_pod: f64,
    samples: VecDeque<(f64, f64)>,
    panic_since: Option<f64>,
    panic_high: u32,
    desired: Option<u32>,
}

const KPA_TICK_S: f64 = 2.0;
const KPA_STABLE_S: f64 = 60.0;
const KPA_PANIC_S: f64 = 6.0;
const KPA_PANIC_THRESHOLD: f64 = 2.0;
const KPA_MAX_DOWN: f64 = 2.0;

impl Kpa {
    fn new(bounds: Bounds, target_per_pod: f64) -> Self {
        Self {
            bounds,
            target_per_pod: target_per_pod.max(1e-9),
            samples: VecDeque::new(),
            panic_since: None,
            panic_high: 0,
            desired: None,
        }
    }

    fn average(&self, now: f64, window: f64) -> f64 {
        let (sum, n) = self
            .samples
            .iter()
            .filter(|(t, _)| now - t < window)
            .fold((0.0, 0.0), |(s, n), (_, v)| (s + v, n + 1.0));
        if n > 0.0 { sum / n } else { 0.0 }
    }
}

impl Policy for Kpa {
    fn decide(&mut self, o: &Observation) -> Decision {
        let now = o.now();
        let concurrency = match o {
            Observation::Query(s) => s.in_flight,
            Observation::Worker(s) => s.unacked_messages + s.ready_messages,
        };
        self.samples.push_back((now, concurrency));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now - t >= KPA_STABLE_S)
        {
            self.samples.pop_front();
        }
        let current = self.desired.unwrap_or(o.replicas().existing);
        if !every(now, KPA_TICK_S) {
            return Decision {
                desired: current,
                reason: "between KPA ticks".into(),
                signal: String::new(),
                throughput_limit: None,
            };
        }
        let ready = f64::from(o.replicas().ready.max(1));
        let limit = |n: u32| n.max(ceil_u32(ready / KPA_MAX_DOWN));
        let stable = limit(ceil_u32(
            self.average(now, KPA_STABLE_S) / self.target_per_pod,
        ));
        let panic = limit(ceil_u32(
            self.average(now, KPA_PANIC_S) / self.target_per_pod,
        ));
        if f64::from(panic) / ready >= KPA_PANIC_THRESHOLD {
            self.panic_since = Some(now);
        } else if self.panic_since.is_some_and(|t| now - t >= KPA_STABLE_S) {
            self.panic_since = None;
            self.panic_high = 0;
        }
        let desired = if self.panic_since.is_some() {
            self.panic_high = self.panic_high.max(panic).max(current);
            self.panic_high
        } else {
            stable
        };
        let desired = desired.clamp(self.bounds.min.max(1), self.bounds.max);
        self.desired = Some(desired);
        Decision {
            desired,
            reason: format!(
                "kpa target {:.1} per pod{}",
                self.target_per_pod,
                if self.panic_since.is_some() {
                    ", panic"
                } else {
                    ""
                }
            ),
            signal: format!("concurrency {concurrency:.1}"),
            throughput_limit: None,
        }
    }
}

/// An empty histogram over the simulator's buckets (for observations before any request).
pub fn empty_latency() -> Histogram {
    Histogram::empty(super::model::LATENCY_BUCKETS)
}
