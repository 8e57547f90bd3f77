//! What a head says about itself: log lines on stderr (text, or JSON with
//! `CHIMERA_LOG_FORMAT=json`, filtered by `RUST_LOG`) and, when an OTLP endpoint is configured,
//! traces exported over OTLP/HTTP (protobuf) with the standard `OTEL_*` variables.
//!
//! A message's handling is a span of the trace its `traceparent` header names, and what the
//! handling sends carries that span as its parent: a command's trace reaches every subscriber's
//! handling of the events it caused, one trace across domains.

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::envelope::TraceParent;

/// Who the spans are from: the OTel resource of this head.
#[derive(Clone, Debug)]
pub struct Service {
    /// `service.name`: `OTEL_SERVICE_NAME`, else `<domain>-<head>` (as the head's Deployment).
    pub name: String,
    /// `service.version`: the program's version.
    pub version: String,
    /// `chimera.domain` and `chimera.head`.
    pub domain: String,
    pub head: String,
}

/// Whether traces are to be exported, from the standard variables: an OTLP endpoint (all
/// signals or traces only) and no `OTEL_TRACES_EXPORTER=none`. `Err` names a setting this
/// exporter cannot honour.
pub fn export_requested(var: impl Fn(&str) -> Option<String>) -> Result<bool, String> {
    let set = |name: &str| var(name).is_some_and(|v| !v.trim().is_empty());
    if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return Ok(false);
    }
    match var("OTEL_TRACES_EXPORTER").as_deref().map(str::trim) {
        Some("none") => return Ok(false),
        None | Some("" | "otlp") => {}
        Some(other) => {
            return Err(format!(
                "OTEL_TRACES_EXPORTER={other} is not supported (only otlp or none)"
            ));
        }
    }
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        match var(name).as_deref().map(str::trim) {
            None | Some("" | "http/protobuf") => {}
            Some(other) => {
                return Err(format!(
                    "{name}={other} is not supported: the SDK exports OTLP over HTTP \
                     (http/protobuf, the collector's port 4318)"
                ));
            }
        }
    }
    Ok(true)
}

/// The installed subscriber's exporter, flushed by [`Telemetry::shutdown`].
#[must_use = "shut it down before the process exits, or the last spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Installs the process's subscriber: logs always, spans to OTLP when asked for. An
    /// exporter that cannot be built is logged and left out: tracing never stops a head.
    pub fn init(service: &Service) -> Self {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        let logs = if std::env::var("CHIMERA_LOG_FORMAT").as_deref() == Ok("json") {
            logs.json().with_filter(filter).boxed()
        } else {
            logs.with_filter(filter).boxed()
        };
        let (provider, problem) = match export_requested(|k| std::env::var(k).ok()) {
            Ok(true) => match tracer_provider(service) {
                Ok(p) => (Some(p), None),
                Err(e) => (None, Some(e)),
            },
            Ok(false) => (None, None),
            Err(e) => (None, Some(e)),
        };
        let spans = provider.as_ref().map(|p| {
            tracing_opentelemetry::layer()
                .with_tracer(p.tracer("chimera-sdk"))
                .with_filter(span_filter())
        });
        Registry::default().with(logs).with(spans).init();
        if let Some(problem) = problem {
            tracing::warn!(%problem, "traces are not exported");
        } else if provider.is_some() {
            tracing::info!(service = %service.name, "exporting traces over OTLP");
        }
        Self { provider }
    }

    /// Sends the spans still buffered (a head calls it after draining, before it exits).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            eprintln!("traces: the last spans could not be sent: {error}");
        }
    }
}

fn tracer_provider(service: &Service) -> Result<SdkTracerProvider, String> {
    // (reqwest's client needs a rustls provider even for http://; an already installed one
    // is kept)
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Reads OTEL_EXPORTER_OTLP_{TRACES_,}{ENDPOINT,HEADERS,TIMEOUT} itself.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| format!("the OTLP exporter: {e}"))?;
    let resource = Resource::builder()
        .with_service_name(service.name.clone())
        .with_attributes([
            KeyValue::new("service.version", service.version.clone()),
            KeyValue::new("chimera.domain", service.domain.clone()),
            KeyValue::new("chimera.head", service.head.clone()),
        ])
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// The spans worth exporting: the SDK's and the module's at info, none of the clients' (the
/// exporter's own HTTP calls must not make spans of their own).
fn span_filter() -> Targets {
    Targets::new()
        .with_default(LevelFilter::INFO)
        .with_targets([
            ("lapin", LevelFilter::OFF),
            ("amq_protocol", LevelFilter::OFF),
            ("sqlx", LevelFilter::WARN),
            ("hyper", LevelFilter::OFF),
            ("hyper_util", LevelFilter::OFF),
            ("h2", LevelFilter::OFF),
            ("reqwest", LevelFilter::OFF),
            ("opentelemetry", LevelFilter::OFF),
            ("opentelemetry_sdk", LevelFilter::OFF),
            ("opentelemetry_otlp", LevelFilter::OFF),
        ])
}

/// Makes `span` (not yet entered) the handling of a message sent from `parent`, and returns
/// the trace context for what the handling sends: the handling span itself when spans are
/// exported; otherwise the same trace, one hop further (the logs still correlate by trace id).
pub fn continue_trace(span: &tracing::Span, parent: TraceParent) -> TraceParent {
    let remote = SpanContext::new(
        TraceId::from_bytes(parent.trace_id.to_be_bytes()),
        SpanId::from_bytes(parent.span_id.to_be_bytes()),
        TraceFlags::new(parent.flags),
        true,
        TraceState::default(),
    );
    if span
        .set_parent(Context::new().with_remote_span_context(remote))
        .is_ok()
    {
        let context = span.context();
        let own = context.span().span_context().clone();
        if own.is_valid() && own.trace_id() == TraceId::from_bytes(parent.trace_id.to_be_bytes()) {
            return TraceParent {
                trace_id: u128::from_be_bytes(own.trace_id().to_bytes()),
                span_id: u64::from_be_bytes(own.span_id().to_bytes()),
                flags: own.trace_flags().to_u8(),
            };
        }
    }
    parent.child()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn export_is_off_unless_an_endpoint_is_set() {
        assert_eq!(export_requested(vars(&[])), Ok(false));
        assert_eq!(
            export_requested(vars(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])),
            Ok(false)
        );
        let on = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")];
        assert_eq!(export_requested(vars(&on)), Ok(true));
        let traces = [(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://c:4318/v1/traces",
        )];
        assert_eq!(export_requested(vars(&traces)), Ok(true));
        let none = [on[0], ("OTEL_TRACES_EXPORTER", "none")];
        assert_eq!(export_requested(vars(&none)), Ok(false));
    }

    #[test]
    fn settings_it_cannot_honour_are_named() {
        let on = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317");
        let grpc = export_requested(vars(&[on, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]));
        assert!(
            grpc.as_ref()
                .is_err_and(|e| e.contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc")),
            "{grpc:?}"
        );
        let zipkin = export_requested(vars(&[on, ("OTEL_TRACES_EXPORTER", "zipkin")]));
        assert!(zipkin.is_err_and(|e| e.contains("zipkin")));
        let http = export_requested(vars(&[
            on,
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
        ]));
        assert_eq!(http, Ok(true));
    }

    #[test]
    fn without_an_exporter_the_handling_is_the_next_hop_of_the_same_trace() {
        let parent = TraceParent::new_root();
        let span = tracing::info_span!("handle");
        let next = continue_trace(&span, parent);
        assert_eq!(next.trace_id, parent.trace_id);
        assert_ne!(next.span_id, parent.span_id);
    }

    #[test]
    fn with_spans_recorded_the_handling_span_is_the_parent_of_what_it_sends() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = Registry::default()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let parent = TraceParent::new_root();
            let span = tracing::info_span!("handle");
            let next = continue_trace(&span, parent);
            assert_eq!(next.trace_id, parent.trace_id, "the same trace");
            let own = span.context().span().span_context().clone();
            assert_eq!(
                next.span_id,
                u64::from_be_bytes(own.span_id().to_bytes()),
                "the handling span"
            );
            assert_ne!(next.span_id, parent.span_id);
        });
    }
}
