//! What every head serves over HTTP, and the metrics the autoscaler reads from query heads.

/// Liveness: 200 while the process runs.
pub const HEALTHZ: &str = "/healthz";
/// Readiness: 200 when the head can do its work; 503 when it cannot (a worker also while it
/// drains). Before it listens (migrations), connections are refused.
pub const READYZ: &str = "/readyz";
/// Prometheus text format.
pub const METRICS: &str = "/metrics";
/// The endpoints every head serves, besides its own routes.
pub const ENDPOINTS: [&str; 3] = [HEALTHZ, READYZ, METRICS];

/// The name of the container port the head serves HTTP on.
pub const HTTP_PORT_NAME: &str = "http";

/// The request-duration histogram of a query head, in seconds, labelled `route`, `method`,
/// `status`: the signal the query autoscaler holds its latency target with.
pub const REQUEST_DURATION: &str = "chimera_http_request_duration_seconds";
/// The gauge of requests in flight.
pub const IN_FLIGHT: &str = "chimera_http_requests_in_flight";

/// The gauge of a worker head's outbox rows not sent yet (pending: due now or waiting for a
/// retry; rows set dead are not counted). The autoscaler does not scale a worker head to zero
/// while any of its pods reports more than 0: the relay runs in the worker pods, and rows left
/// behind would stay unsent until a message woke the head again.
pub const OUTBOX_PENDING: &str = "chimera_outbox_pending_rows";

/// The counter of messages a worker settled, labelled `kind` (the message type) and `outcome`
/// (one of [`OUTCOMES`]).
pub const WORKER_MESSAGES: &str = "chimera_worker_messages_total";
/// The histogram of the time a worker takes to settle one batch of deliveries, in seconds.
pub const WORKER_BATCH_DURATION: &str = "chimera_worker_batch_duration_seconds";
/// The outcomes of [`WORKER_MESSAGES`] (docs/contract.md, section 8).
pub const OUTCOMES: [&str; 6] = [
    "handled",
    "duplicate",
    "retried",
    "dead_lettered",
    "requeued",
    "ignored",
];

/// The bucket bounds of [`REQUEST_DURATION`], in seconds: fine around the latencies a query
/// head is held to (tens to hundreds of milliseconds) so that percentiles interpolate well.
/// Every head uses these bounds, so the autoscaler can merge the histograms of all pods.
pub const BUCKETS: [f64; 20] = [
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3,
    0.4, 0.5, 1.0, 2.5, 5.0,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_rise_strictly() {
        assert!(BUCKETS.windows(2).all(|w| w[0] < w[1]));
        assert!(REQUEST_DURATION.ends_with("_seconds"));
    }
}
