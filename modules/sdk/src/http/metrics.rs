//! The head's Prometheus metrics. Query heads expose the request-duration histogram the
//! autoscaler reads: its name and labels are part of the head contract.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub use chimera_contract::metrics::{BUCKETS, IN_FLIGHT, OUTBOX_PENDING};

/// Name of the request-duration histogram without the `_seconds` unit suffix the encoder
/// appends: the contract's `chimera_http_request_duration_seconds`.
pub const REQUEST_DURATION: &str = "chimera_http_request_duration";

/// Labels of one request series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route template (`/orders/{id}`), or `unmatched`.
    pub route: String,
    /// HTTP method.
    pub method: String,
    /// Status code.
    pub status: u16,
}

/// Labels of the worker's message counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageLabels {
    /// Message type (`unknown` when it could not be decoded).
    pub kind: String,
    /// `handled`, `duplicate`, `retried`, `dead_lettered` or `requeued`.
    pub outcome: String,
}

/// The head's metrics: the HTTP server's, and the worker's (zero on a query head).
#[derive(Clone)]
pub struct HttpMetrics {
    /// Request duration per route, method and status.
    pub duration: Family<RequestLabels, Histogram>,
    /// Requests being served right now.
    pub in_flight: Gauge,
    /// Messages settled by the worker, per type and outcome (`chimera_worker_messages_total`).
    pub worker_messages: Family<MessageLabels, Counter>,
    /// Time to handle and settle one batch of deliveries (`chimera_worker_batch_duration_seconds`).
    pub worker_batch: Histogram,
    /// Outbox rows not sent yet ([`OUTBOX_PENDING`]; the worker's relay sets it, 0 elsewhere).
    pub outbox_pending: Gauge,
    registry: Arc<Registry>,
}

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

impl HttpMetrics {
    /// A registry with the HTTP metrics in it.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let duration = Family::<RequestLabels, Histogram>::new_with_constructor(
            histogram as fn() -> Histogram,
        );
        let in_flight = Gauge::default();
        registry.register_with_unit(
            REQUEST_DURATION,
            "Time to answer an HTTP request",
            prometheus_client::registry::Unit::Seconds,
            duration.clone(),
        );
        registry.register(IN_FLIGHT, "HTTP requests being served", in_flight.clone());
        let worker_messages = Family::<MessageLabels, Counter>::default();
        registry.register(
            "chimera_worker_messages",
            "Messages settled by the worker",
            worker_messages.clone(),
        );
        let worker_batch = Histogram::new(BUCKETS);
        registry.register_with_unit(
            "chimera_worker_batch_duration",
            "Time to handle and settle one batch of deliveries",
            prometheus_client::registry::Unit::Seconds,
            worker_batch.clone(),
        );
        let outbox_pending = Gauge::default();
        registry.register(
            OUTBOX_PENDING,
            "Outbox rows not sent yet (due now or waiting for a retry)",
            outbox_pending.clone(),
        );
        Self {
            duration,
            in_flight,
            worker_messages,
            worker_batch,
            outbox_pending,
            registry: Arc::new(registry),
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for HttpMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_uses_the_contract_names_and_buckets() {
        let metrics = HttpMetrics::new();
        metrics
            .duration
            .get_or_create(&RequestLabels {
                route: "/orders/{id}".into(),
                method: "GET".into(),
                status: 200,
            })
            .observe(0.02);
        let text = metrics.render();
        let duration = chimera_contract::metrics::REQUEST_DURATION;
        assert!(
            text.contains(&format!("# TYPE {duration} histogram")),
            "{text}"
        );
        assert!(text.contains(&format!("{IN_FLIGHT} 0")), "{text}");
        for bound in BUCKETS {
            assert!(
                text.contains(&format!("le=\"{bound:?}\"")),
                "{bound} in {text}"
            );
        }
    }

    #[test]
    fn what_the_sdk_exposes_the_autoscaler_reads() {
        use chimera_core::autoscale::exposition::parse;
        let metrics = HttpMetrics::new();
        let labels = |route: &str| RequestLabels {
            route: route.to_owned(),
            method: "GET".to_owned(),
            status: 200,
        };
        for seconds in [0.004, 0.004, 0.3] {
            metrics
                .duration
                .get_or_create(&labels("/orders/{id}"))
                .observe(seconds);
        }
        metrics
            .duration
            .get_or_create(&labels("/healthz"))
            .observe(0.001);
        metrics.in_flight.set(2);
        let s = parse(&metrics.render()).unwrap();
        assert_eq!(s.latency.total, 3.0, "the probe is not counted");
        assert_eq!(s.in_flight, 2.0);
        assert_eq!(s.latency.bounds, BUCKETS);
        assert!(s.latency.quantile(0.5).unwrap() <= 0.005);
        assert!(s.latency.quantile(0.99).unwrap() > 0.25);
    }
}
