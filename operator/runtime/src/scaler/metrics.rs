//! The autoscaler's own metrics, served by the operator on `/metrics`.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Which head.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HeadLabels {
    /// Namespace of the module.
    pub namespace: String,
    /// Module name.
    pub module: String,
    /// `query` or `worker`.
    pub head: String,
}

/// A scaling action.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    /// Namespace of the module.
    pub namespace: String,
    /// Module name.
    pub module: String,
    /// `query` or `worker`.
    pub head: String,
    /// `out` or `in`.
    pub direction: String,
}

/// Gauges and counters of every head the autoscaler runs.
#[derive(Clone)]
pub struct AutoscalerMetrics {
    registry: Arc<Registry>,
    /// Replicas the law wants.
    pub desired: Family<HeadLabels, Gauge>,
    /// Replicas the Deployment has.
    pub current: Family<HeadLabels, Gauge>,
    /// Ready replicas.
    pub ready: Family<HeadLabels, Gauge>,
    /// Worker: messages in the queue (ready + unacked).
    pub backlog: Family<HeadLabels, Gauge<f64, AtomicU64>>,
    /// Query: the held latency percentile, in seconds.
    pub latency: Family<HeadLabels, Gauge<f64, AtomicU64>>,
    /// 1 while the head's metrics are missing or stale (replicas held).
    pub stale: Family<HeadLabels, Gauge>,
    /// Replica changes made.
    pub actions: Family<ActionLabels, Counter>,
}

impl AutoscalerMetrics {
    /// Registers everything.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("chimera_autoscaler");
        let desired = Family::<HeadLabels, Gauge>::default();
        let current = Family::<HeadLabels, Gauge>::default();
        let ready = Family::<HeadLabels, Gauge>::default();
        let backlog = Family::<HeadLabels, Gauge<f64, AtomicU64>>::default();
        let latency = Family::<HeadLabels, Gauge<f64, AtomicU64>>::default();
        let stale = Family::<HeadLabels, Gauge>::default();
        let actions = Family::<ActionLabels, Counter>::default();
        registry.register(
            "desired_replicas",
            "Replicas the control law wants",
            desired.clone(),
        );
        registry.register(
            "current_replicas",
            "Replicas of the head's Deployment",
            current.clone(),
        );
        registry.register(
            "ready_replicas",
            "Ready replicas of the head",
            ready.clone(),
        );
        registry.register(
            "queue_backlog_messages",
            "Worker queue: ready + unacked messages",
            backlog.clone(),
        );
        registry.register(
            "latency_percentile_seconds",
            "Query head: the held latency percentile",
            latency.clone(),
        );
        registry.register(
            "metrics_stale",
            "1 while the head's metrics are missing or stale",
            stale.clone(),
        );
        registry.register("scale_actions", "Replica changes made", actions.clone());
        Self {
            registry: Arc::new(registry),
            desired,
            current,
            ready,
            backlog,
            latency,
            stale,
            actions,
        }
    }

    /// Prometheus text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for AutoscalerMetrics {
    fn default() -> Self {
        Self::new()
    }
}
