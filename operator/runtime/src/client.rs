//! The operator's API client: kube's, with a client-side rate limit (a token bucket: a steady
//! rate and a burst) so that a burst of work waits in the operator instead of piling onto the
//! API server, and a count of the requests it starts, by verb and resource, on `/metrics`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use http::Request;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::scaler::metrics::render;

/// How fast the operator may start API requests.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Requests per second, sustained.
    pub qps: f64,
    /// Requests that may start at once after a quiet spell.
    pub burst: u32,
}

impl Default for Limits {
    /// Above what converging a thousand modules asks of a two-core API server (about 200
    /// requests/s, measured by bench/control-plane), low enough that a runaway loop cannot
    /// flood it.
    fn default() -> Self {
        Self {
            qps: 400.0,
            burst: 800,
        }
    }
}

/// A token bucket that lends: each request takes a token, and the wait it returns is how long
/// until the bucket would have held it. Pure, so its arithmetic is tested without a clock.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(limits: Limits, now: Instant) -> Self {
        let burst = f64::from(limits.burst.max(1));
        Self {
            rate: limits.qps.max(0.001),
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes a token at `now`; returns how long the request must wait for it.
    pub fn take(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// A request, as counted.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `GET`, `LIST`, `WATCH`, `CREATE`, `UPDATE`, `PATCH`, `APPLY`, `DELETE`.
    pub verb: String,
    /// Resource, with its subresource (`chimeramodules/status`).
    pub resource: String,
}

/// The client's metrics.
#[derive(Clone)]
pub struct ApiMetrics {
    registry: Arc<Registry>,
    requests: Family<RequestLabels, Counter>,
    throttled: Counter<f64, AtomicU64>,
}

impl ApiMetrics {
    /// Registers them.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("chimera_operator_api");
        let requests = Family::<RequestLabels, Counter>::default();
        let throttled = Counter::<f64, AtomicU64>::default();
        registry.register(
            "requests",
            "API requests the operator started, by verb and resource",
            requests.clone(),
        );
        registry.register(
            "throttled_seconds",
            "Seconds requests waited for the client-side rate limit",
            throttled.clone(),
        );
        Self {
            registry: Arc::new(registry),
            requests,
            throttled,
        }
    }

    /// Prometheus text.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

impl std::fmt::Debug for ApiMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiMetrics")
    }
}

impl Default for ApiMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The verb and resource of an API request, as the API server names them.
pub fn classify(method: &http::Method, path: &str, query: &str, apply: bool) -> RequestLabels {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    // /api/v1/... or /apis/<group>/<version>/...
    let rest: &[&str] = match segments.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => &[],
    };
    let rest = match rest {
        ["namespaces", _ns, more @ ..] if !more.is_empty() => more,
        other => other,
    };
    let (resource, named) = match rest {
        [resource] => ((*resource).to_owned(), false),
        [resource, _name] => ((*resource).to_owned(), true),
        [resource, _name, sub, ..] => (format!("{resource}/{sub}"), true),
        _ => ("other".to_owned(), true),
    };
    let watch = query
        .split('&')
        .any(|p| p == "watch=true" || p == "watch=1");
    let verb = match *method {
        http::Method::GET if watch => "WATCH",
        http::Method::GET if named => "GET",
        http::Method::GET => "LIST",
        http::Method::POST => "CREATE",
        http::Method::PUT => "UPDATE",
        http::Method::PATCH if apply => "APPLY",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        _ => "OTHER",
    };
    RequestLabels {
        verb: verb.to_owned(),
        resource,
    }
}

/// The layer that limits and counts.
#[derive(Clone)]
pub struct LimitLayer {
    limits: Limits,
    metrics: ApiMetrics,
}

impl LimitLayer {
    /// With `limits`, counting into `metrics`.
    pub fn new(limits: Limits, metrics: ApiMetrics) -> Self {
        Self { limits, metrics }
    }
}

impl<S> tower::Layer<S> for LimitLayer {
    type Service = Limited<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Limited {
            inner,
            bucket: TokenBucket::new(self.limits, Instant::now()),
            wait: None,
            permitted: false,
            metrics: self.metrics.clone(),
        }
    }
}

/// A service that starts requests no faster than its bucket allows. kube drives it from one
/// buffer task, so waiting in `poll_ready` queues every request of the process behind it.
pub struct Limited<S> {
    inner: S,
    bucket: TokenBucket,
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
    permitted: bool,
    metrics: ApiMetrics,
}

impl<S, B> tower::Service<Request<B>> for Limited<S>
where
    S: tower::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        loop {
            if let Some(wait) = self.wait.as_mut() {
                ready!(wait.as_mut().poll(cx));
                self.wait = None;
                self.permitted = true;
            }
            if self.permitted {
                return self.inner.poll_ready(cx);
            }
            let wait = self.bucket.take(Instant::now());
            if wait.is_zero() {
                self.permitted = true;
            } else {
                self.metrics.throttled.inc_by(wait.as_secs_f64());
                self.wait = Some(Box::pin(tokio::time::sleep(wait)));
            }
        }
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        self.permitted = false;
        let apply = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/apply-patch"));
        let labels = classify(
            request.method(),
            request.uri().path(),
            request.uri().query().unwrap_or_default(),
            apply,
        );
        self.metrics.requests.get_or_create(&labels).inc();
        self.inner.call(request)
    }
}

/// A client for the current kubeconfig (or in-cluster account), limited and counted.
pub async fn build(limits: Limits, metrics: ApiMetrics) -> Result<kube::Client, kube::Error> {
    let config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&LimitLayer::new(limits, metrics))
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn a_full_bucket_lets_a_burst_through_then_paces_at_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(
            Limits {
                qps: 10.0,
                burst: 3,
            },
            start,
        );
        for _ in 0..3 {
            assert_eq!(bucket.take(start), Duration::ZERO);
        }
        // The fourth waits a tenth of a second, the fifth two tenths: they queue in order.
        assert_eq!(bucket.take(start), Duration::from_millis(100));
        assert_eq!(bucket.take(start), Duration::from_millis(200));
        // A quiet second refills it, up to the burst only.
        let later = start + Duration::from_secs(10);
        for _ in 0..3 {
            assert_eq!(bucket.take(later), Duration::ZERO);
        }
        assert!(bucket.take(later) > Duration::ZERO);
    }

    #[test]
    fn requests_are_named_as_the_api_server_names_them() {
        let c = |m: Method, path: &str, query: &str, apply: bool| {
            let l = classify(&m, path, query, apply);
            (l.verb, l.resource)
        };
        let s = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        assert_eq!(
            c(
                Method::PATCH,
                "/apis/apps/v1/namespaces/shop/deployments/orders-query",
                "fieldManager=x",
                true
            ),
            s("APPLY", "deployments")
        );
        assert_eq!(
            c(
                Method::PATCH,
                "/apis/chimera.dev/v1alpha1/namespaces/shop/chimeramodules/orders/status",
                "",
                true
            ),
            s("APPLY", "chimeramodules/status")
        );
        assert_eq!(
            c(
                Method::PATCH,
                "/apis/chimera.dev/v1alpha1/namespaces/shop/chimeramodules/orders",
                "",
                false
            ),
            s("PATCH", "chimeramodules")
        );
        assert_eq!(
            c(
                Method::GET,
                "/apis/apps/v1/deployments",
                "labelSelector=a&watch=true",
                false
            ),
            s("WATCH", "deployments")
        );
        assert_eq!(
            c(Method::GET, "/api/v1/namespaces/shop/pods", "", false),
            s("LIST", "pods")
        );
        assert_eq!(
            c(Method::GET, "/api/v1/namespaces/shop/secrets/mq", "", false),
            s("GET", "secrets")
        );
        assert_eq!(
            c(Method::GET, "/api/v1/namespaces/shop", "", false),
            s("GET", "namespaces")
        );
        assert_eq!(
            c(
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/shop/events",
                "",
                false
            ),
            s("CREATE", "events")
        );
        assert_eq!(c(Method::GET, "/version", "", false), s("GET", "other"));
    }
}
