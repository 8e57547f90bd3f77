//! The autoscaler's own metrics, served by the operator on `/metrics`.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
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
    /// Seconds from the start of the slot a head was due in to its decision: how late
    /// decisions are.
    pub tick_lag: Histogram,
    /// Unix time of the head's last decision: the heartbeat (status changes only on change).
    pub last_decision: Family<HeadLabels, Gauge>,
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
        let tick_lag = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
        ]);
        let last_decision = Family::<HeadLabels, Gauge>::default();
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
        registry.register(
            "tick_lag_seconds",
            "Seconds from the start of the slot a head was due in to its decision",
            tick_lag.clone(),
        );
        registry.register(
            "last_decision_timestamp_seconds",
            "Unix time of the head's last decision",
            last_decision.clone(),
        );
        Self {
            registry: Arc::new(registry),
            desired,
            current,
            ready,
            backlog,
            latency,
            stale,
            actions,
            tick_lag,
            last_decision,
        }
    }

    /// Makes a head's action counters, at zero: before its first action, a rate over them is
    /// 0 rather than absent (dashboards and alerts see the head).
    pub fn count_actions_of(&self, head: &HeadLabels) {
        for direction in ["out", "in"] {
            let _ = self.actions.get_or_create(&ActionLabels {
                namespace: head.namespace.clone(),
                module: head.module.clone(),
                head: head.head.clone(),
                direction: direction.to_owned(),
            });
        }
    }

    /// Drops every head's gauges: a replica that stops leading shows no frozen values (the
    /// leader's are the only ones, so dashboards need not know who leads). The counters stay:
    /// they count what this process did.
    pub fn forget_all_heads(&self) {
        for family in [&self.desired, &self.current, &self.ready, &self.stale] {
            family.clear();
        }
        for family in [&self.backlog, &self.latency] {
            family.clear();
        }
        self.last_decision.clear();
    }

    /// Drops one head's gauges (its module is gone).
    pub fn forget_head(&self, labels: &HeadLabels) {
        for family in [&self.desired, &self.current, &self.ready, &self.stale] {
            family.remove(labels);
        }
        for family in [&self.backlog, &self.latency] {
            family.remove(labels);
        }
        self.last_decision.remove(labels);
    }

    /// Prometheus text.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

impl HeadLabels {
    /// The labels of the head keyed `namespace/module/head` (the autoscaler's key).
    pub fn from_key(key: &str) -> Option<Self> {
        let mut parts = key.splitn(3, '/');
        Some(Self {
            namespace: parts.next()?.to_owned(),
            module: parts.next()?.to_owned(),
            head: parts.next()?.to_owned(),
        })
    }
}

impl Default for AutoscalerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A registry's Prometheus text (empty if it cannot be encoded).
pub(crate) fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(module: &str) -> HeadLabels {
        HeadLabels::from_key(&format!("shop/{module}/worker")).unwrap()
    }

    #[test]
    fn a_key_names_namespace_module_and_head() {
        let labels = head("orders");
        assert_eq!(
            (
                labels.namespace.as_str(),
                labels.module.as_str(),
                labels.head.as_str()
            ),
            ("shop", "orders", "worker")
        );
        assert!(HeadLabels::from_key("shop/orders").is_none());
    }

    #[test]
    fn forgetting_drops_gauges_and_keeps_counters() {
        let metrics = AutoscalerMetrics::new();
        for module in ["orders", "users"] {
            metrics.desired.get_or_create(&head(module)).set(3);
            metrics.backlog.get_or_create(&head(module)).set(12.0);
            metrics.last_decision.get_or_create(&head(module)).set(1);
        }
        let action = ActionLabels {
            namespace: "shop".into(),
            module: "orders".into(),
            head: "worker".into(),
            direction: "out".into(),
        };
        metrics.count_actions_of(&head("orders"));
        assert!(
            metrics.render().contains(r#"chimera_autoscaler_scale_actions_total{namespace="shop",module="orders",head="worker",direction="in"} 0"#)
        );
        metrics.actions.get_or_create(&action).inc();

        metrics.forget_head(&head("orders"));
        let text = metrics.render();
        assert!(
            !text.contains(r#"desired_replicas{namespace="shop",module="orders""#),
            "{text}"
        );
        assert!(
            text.contains(r#"desired_replicas{namespace="shop",module="users""#),
            "{text}"
        );

        metrics.forget_all_heads();
        let text = metrics.render();
        assert!(!text.contains(r#"module="users""#), "{text}");
        assert!(
            text.contains(r#"chimera_autoscaler_scale_actions_total{namespace="shop",module="orders",head="worker",direction="out"} 1"#),
            "{text}"
        );
    }
}
