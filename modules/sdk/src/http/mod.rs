//! The HTTP server every head runs: `/healthz`, `/readyz`, `/metrics`, JSON errors for bad
//! input and unknown routes, a request timeout, and per-route latency metrics. A query head adds
//! its REST routes; a worker head serves only these.

mod error;
mod metrics;

pub use error::{ApiError, ValidPath, ValidQuery};
pub use metrics::{
    BUCKETS, HttpMetrics, IN_FLIGHT, MessageLabels, REQUEST_DURATION, RequestLabels,
};

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// A readiness check: Ok when the head can do its work (its database answers, its consumer
/// runs), Err with why not.
pub type ReadinessCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// How the server behaves.
#[derive(Clone)]
pub struct ServerOptions {
    /// Longest time a request may take before a 503.
    pub request_timeout: Duration,
    /// Decides `/readyz`.
    pub readiness: ReadinessCheck,
    /// Where the metrics go (shared with the rest of the head).
    pub metrics: HttpMetrics,
}

impl ServerOptions {
    /// Defaults: 10 s timeout, always ready, fresh metrics.
    pub fn new() -> Self {
        Self {
            request_timeout: Duration::from_secs(10),
            readiness: Arc::new(|| Box::pin(async { Ok(()) })),
            metrics: HttpMetrics::new(),
        }
    }

    /// With this readiness check.
    pub fn readiness<F, Fut>(mut self, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.readiness = Arc::new(move || Box::pin(check()));
        self
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self::new()
    }
}

async fn record(State(metrics): State<HttpMetrics>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().to_string();
    metrics.in_flight.inc();
    let started = Instant::now();
    let response = next.run(request).await;
    metrics.in_flight.dec();
    let labels = RequestLabels {
        route,
        method,
        status: response.status().as_u16(),
    };
    metrics
        .duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn timeout_guard(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            ApiError::unavailable(format!("request took longer than {limit:?}")).into_response()
        }
    }
}

/// Wraps a head's routes with the contract's endpoints, JSON errors, timeout and metrics.
pub fn router(routes: Router, options: ServerOptions) -> Router {
    let readiness = options.readiness.clone();
    let metrics = options.metrics.clone();
    let contract = Router::new()
        .route("/healthz", get(|| async { (StatusCode::OK, "ok") }))
        .route(
            "/readyz",
            get(move || {
                let check = readiness.clone();
                async move {
                    match check().await {
                        Ok(()) => (StatusCode::OK, "ready").into_response(),
                        Err(why) => ApiError::unavailable(why).into_response(),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        metrics.render(),
                    )
                }
            }),
        );
    routes
        .merge(contract)
        .fallback(|uri: axum::http::Uri| async move {
            ApiError::not_found(format!("no route for {}", uri.path()))
        })
        // (After the merge: it applies to the method routers registered so far.)
        .method_not_allowed_fallback(
            |method: axum::http::Method, uri: axum::http::Uri| async move {
                ApiError::method_not_allowed(format!("{method} is not allowed on {}", uri.path()))
            },
        )
        .layer(middleware::from_fn_with_state(
            options.request_timeout,
            timeout_guard,
        ))
        .layer(middleware::from_fn_with_state(
            options.metrics.clone(),
            record,
        ))
}

/// Serves `app` on `addr` until `shutdown` completes, then finishes the requests in flight.
pub async fn serve(
    addr: SocketAddr,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving HTTP");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request as HttpRequest;
    use serde::Deserialize;
    use tower::ServiceExt;

    #[derive(Deserialize)]
    struct Page {
        limit: Option<u32>,
    }

    fn app(options: ServerOptions) -> Router {
        let routes = Router::new()
            .route(
                "/orders/{id}",
                get(|ValidPath(id): ValidPath<uuid::Uuid>| async move { format!("order {id}") }),
            )
            .route(
                "/orders",
                get(
                    |ValidQuery(p): ValidQuery<Page>| async move { format!("limit {:?}", p.limit) },
                ),
            )
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    "late"
                }),
            );
        router(routes, options)
    }

    async fn call(app: &Router, uri: &str) -> (StatusCode, String) {
        let (status, _, body) = send(app, "GET", uri).await;
        (status, body)
    }

    async fn send(
        app: &Router,
        method: &str,
        uri: &str,
    ) -> (StatusCode, axum::http::HeaderMap, String) {
        let response = app
            .clone()
            .oneshot(
                HttpRequest::builder()
                    .method(method)
                    .uri(uri)
                    .body(Body::empty())
                    .unwrap_or_default(),
            )
            .await
            .unwrap_or_else(|e| match e {});
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap_or_default();
        (
            status,
            headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    #[tokio::test]
    async fn health_and_readiness() {
        let ready = app(ServerOptions::new());
        assert_eq!(call(&ready, "/healthz").await.0, StatusCode::OK);
        assert_eq!(call(&ready, "/readyz").await.0, StatusCode::OK);
        let down =
            app(ServerOptions::new()
                .readiness(|| async { Err("database does not answer".to_owned()) }));
        let (status, body) = call(&down, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("database does not answer"), "{body}");
        assert_eq!(
            call(&down, "/healthz").await.0,
            StatusCode::OK,
            "alive even when not ready"
        );
    }

    #[tokio::test]
    async fn bad_input_and_unknown_routes_are_json_4xx() {
        let a = app(ServerOptions::new());
        let (status, body) = call(&a, "/orders/not-a-uuid").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        assert_eq!(json["error"], "bad_request");
        assert!(
            json["message"]
                .as_str()
                .is_some_and(|m| m.contains("bad path parameter")),
            "{body}"
        );
        let (status, body) = call(&a, "/orders?limit=lots").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("bad query parameter"), "{body}");
        let (status, body) = call(&a, "/nowhere").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(
            body.contains("\"error\":\"not_found\"") && body.contains("/nowhere"),
            "{body}"
        );
        assert_eq!(
            call(&a, "/orders?limit=5").await,
            (StatusCode::OK, "limit Some(5)".to_owned())
        );
    }

    #[tokio::test]
    async fn a_wrong_method_is_a_json_405_that_says_what_is_allowed() {
        let a = app(ServerOptions::new());
        for (method, path) in [
            ("POST", "/orders"),
            ("DELETE", "/healthz"),
            ("PUT", "/metrics"),
        ] {
            let (status, headers, body) = send(&a, method, path).await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            assert_eq!(
                json["error"], "method_not_allowed",
                "{method} {path}: {body}"
            );
            assert!(
                json["message"].as_str().is_some_and(|m| m.contains(method)),
                "{body}"
            );
            let allow = headers
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            assert!(allow.contains("GET"), "{method} {path}: Allow {allow:?}");
        }
    }

    #[tokio::test]
    async fn slow_requests_time_out_with_a_json_503() {
        let options = ServerOptions {
            request_timeout: Duration::from_millis(100),
            ..ServerOptions::new()
        };
        let (status, body) = call(&app(options), "/slow").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("longer than"), "{body}");
    }

    #[tokio::test]
    async fn metrics_carry_the_contract_histogram_by_route_template() {
        let options = ServerOptions::new();
        let a = app(options.clone());
        let id = uuid::Uuid::new_v4();
        call(&a, &format!("/orders/{id}")).await;
        call(&a, "/nowhere").await;
        let (status, text) = call(&a, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            text.contains("# TYPE chimera_http_request_duration_seconds histogram"),
            "{text}"
        );
        assert!(text.contains(r#"chimera_http_request_duration_seconds_count{route="/orders/{id}",method="GET",status="200"} 1"#), "{text}");
        assert!(text.contains(r#"route="unmatched""#), "{text}");
        assert!(text.contains("chimera_http_requests_in_flight"), "{text}");
        assert!(
            !text.contains(&id.to_string()),
            "raw paths must not become labels"
        );
    }
}
