//! The controller's metrics, served by the operator on `/metrics`: how reconciles go (by the
//! error's stable label), how long they take, and how often the broker's topology had drifted
//! and was repaired.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::Error;

/// How a reconcile ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: String,
    /// The error's label (`Error::metric_label`); empty when it went well.
    pub error: String,
}

/// Counters and the duration histogram of the reconciles.
#[derive(Clone)]
pub struct ControllerMetrics {
    registry: Arc<Registry>,
    /// Reconciles by result.
    pub reconciles: Family<ResultLabels, Counter>,
    /// Seconds per reconcile.
    pub duration: Histogram,
    /// Topology declares that found a module's broker objects missing or changed although
    /// its plan had not changed since the last declare (a queue deleted by hand, a broker
    /// reset).
    pub drift_repairs: Counter,
}

impl ControllerMetrics {
    /// Registers everything.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("chimera_operator");
        let reconciles = Family::<ResultLabels, Counter>::default();
        let duration = Histogram::new([
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let drift_repairs = Counter::default();
        registry.register(
            "reconciles",
            "Reconciles of ChimeraModules, by result and error label",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Seconds per reconcile",
            duration.clone(),
        );
        registry.register(
            "topology_drift_repairs",
            "Declares that repaired a module's topology on the broker without a change of its plan",
            drift_repairs.clone(),
        );
        Self {
            registry: Arc::new(registry),
            reconciles,
            duration,
            drift_repairs,
        }
    }

    /// Counts one reconcile that took `took` and ended in `result`.
    pub fn observe<T>(&self, result: &Result<T, Error>, took: Duration) {
        let labels = match result {
            Ok(_) => ResultLabels {
                result: "ok".into(),
                error: String::new(),
            },
            Err(e) => ResultLabels {
                result: "error".into(),
                error: e.metric_label().into(),
            },
        };
        self.reconciles.get_or_create(&labels).inc();
        self.duration.observe(took.as_secs_f64());
    }

    /// Prometheus text.
    pub fn render(&self) -> String {
        crate::scaler::metrics::render(&self.registry)
    }
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_are_counted_by_result_and_error_label() {
        let metrics = ControllerMetrics::new();
        metrics.observe(&Ok::<(), Error>(()), Duration::from_millis(3));
        metrics.observe(&Ok::<(), Error>(()), Duration::from_millis(4));
        metrics.observe(
            &Err::<(), Error>(Error::NotNamespaced),
            Duration::from_secs(2),
        );
        metrics.drift_repairs.inc();
        let text = metrics.render();
        assert!(
            text.contains(r#"chimera_operator_reconciles_total{result="ok",error=""} 2"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"chimera_operator_reconciles_total{result="error",error="not_namespaced"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains("chimera_operator_reconcile_duration_seconds_count 3"),
            "{text}"
        );
        assert!(
            text.contains(r#"chimera_operator_reconcile_duration_seconds_bucket{le="0.005"} 2"#),
            "{text}"
        );
        assert!(
            text.contains("chimera_operator_topology_drift_repairs_total 1"),
            "{text}"
        );
    }
}
