//! A real OpenTelemetry Collector (`scripts/tools/otelcol`, built by `scripts/install-tools`,
//! found through `CHIMERA_OTELCOL`): an OTLP/HTTP receiver on a loopback port of its own and
//! the debug exporter, whose log the test reads the spans back from.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running collector; stopped when dropped.
pub struct Collector {
    child: Child,
    dir: PathBuf,
    /// Where OTLP/HTTP goes: the value for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: String,
}

/// One span as the collector received it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReceivedSpan {
    /// The resource's `service.name`.
    pub service: String,
    /// 32 hex digits.
    pub trace_id: String,
    /// 16 hex digits; empty for a root span.
    pub parent_id: String,
    pub span_id: String,
    pub name: String,
    /// `Consumer`, `Internal`, ...
    pub kind: String,
    /// `Unset`, `Ok` or `Error`.
    pub status: String,
    /// The span's attributes, as the debug exporter prints them (`Str(v)` becomes `v`).
    pub attributes: Vec<(String, String)>,
}

impl ReceivedSpan {
    /// The value of one attribute.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl Collector {
    /// Starts a collector and waits until it receives; panics with its log when it cannot.
    pub fn start() -> Self {
        let binary = crate::required_env("CHIMERA_OTELCOL");
        let dir = std::env::temp_dir().join(crate::unique_name("otelcol"));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let port = crate::free_port();
        let config = dir.join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "receivers:\n  otlp:\n    protocols:\n      http:\n        endpoint: 127.0.0.1:{port}\n\
                 exporters:\n  debug:\n    verbosity: detailed\n\
                 service:\n  telemetry:\n    metrics:\n      level: none\n\
                 \x20 pipelines:\n    traces:\n      receivers: [otlp]\n      exporters: [debug]\n"
            ),
        )
        .unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
        let log = std::fs::File::create(dir.join("log"))
            .unwrap_or_else(|e| panic!("create the log in {}: {e}", dir.display()));
        let child = Command::new(&binary)
            .arg(format!("--config={}", config.display()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run the collector {binary}: {e}; build it with `scripts/install-tools`"
                )
            });
        let mut collector = Self {
            child,
            dir,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !collector.log().contains("Everything is ready") {
            if let Ok(Some(status)) = collector.child.try_wait() {
                panic!("the collector exited ({status}): {}", collector.log());
            }
            assert!(
                Instant::now() < deadline,
                "the collector is not ready after 30 s: {}",
                collector.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        collector
    }

    /// What the collector logged (the debug exporter's spans among it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        parse_debug_log(&self.log())
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `Str(v)` → `v` (and other typed values as printed).
fn value(printed: &str) -> String {
    let printed = printed.trim();
    printed
        .split_once('(')
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .unwrap_or(printed)
        .to_owned()
}

/// The spans in the debug exporter's `detailed` output.
pub fn parse_debug_log(log: &str) -> Vec<ReceivedSpan> {
    let mut spans = Vec::new();
    let mut service = String::new();
    let mut current: Option<ReceivedSpan> = None;
    let mut in_resource = false;
    for line in log.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("ResourceSpans #") {
            spans.extend(current.take());
            service.clear();
            in_resource = false;
        } else if trimmed == "Resource attributes:" {
            in_resource = true;
        } else if trimmed.starts_with("ScopeSpans #") {
            in_resource = false;
        } else if trimmed.starts_with("Span #") {
            spans.extend(current.take());
            current = Some(ReceivedSpan {
                service: service.clone(),
                ..ReceivedSpan::default()
            });
        } else if let Some(attribute) = trimmed.strip_prefix("-> ") {
            let Some((key, printed)) = attribute.split_once(": ") else {
                continue;
            };
            if in_resource {
                if key == "service.name" {
                    service = value(printed);
                }
            } else if let Some(span) = current.as_mut() {
                span.attributes.push((key.to_owned(), value(printed)));
            }
        } else if let (Some(span), Some((field, v))) = (current.as_mut(), trimmed.split_once(':')) {
            let v = v.trim().to_owned();
            match field.trim() {
                "Trace ID" => span.trace_id = v,
                "Parent ID" => span.parent_id = v,
                "ID" => span.span_id = v,
                "Name" => span.name = v,
                "Kind" => span.kind = v,
                "Status code" => span.status = v,
                _ => {}
            }
        } else if !line.starts_with(char::is_whitespace) && !trimmed.is_empty() {
            // A new log record: whatever span was open is complete.
            spans.extend(current.take());
        }
    }
    spans.extend(current);
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
2026-12-03T10:34:57.770Z\tinfo\tTraces\t{\"resource spans\": 1, \"spans\": 2}
2026-12-03T10:34:57.770Z\tinfo\tResourceSpans #0
Resource SchemaURL: 
Resource attributes:
     -> service.name: Str(users-worker)
     -> chimera.head: Str(worker)
ScopeSpans #0
InstrumentationScope chimera-sdk 
Span #0
    Trace ID       : 5b8aa5a2d2c872e8321cf37308d69df2
    Parent ID      : 0102030405060708
    ID             : 051581bf3cb55c13
    Name           : handle user.register
    Kind           : Consumer
    Start time     : 1970-01-01 00:00:00.000000001 +0000 UTC
    Status code    : Unset
    Status message : 
Attributes:
     -> messaging.system: Str(rabbitmq)
     -> attempt: Int(1)
Span #1
    Trace ID       : 5b8aa5a2d2c872e8321cf37308d69df2
    Parent ID      : 
    ID             : 1111111111111111
    Name           : other
    Kind           : Internal
    Status code    : Error
\t{\"otelcol.component.id\": \"debug\"}
2026-12-03T10:34:58.000Z\tinfo\tsomething else: with a colon
";

    #[test]
    fn spans_are_read_with_their_service_ids_and_attributes() {
        let spans = parse_debug_log(LOG);
        assert_eq!(spans.len(), 2, "{spans:#?}");
        let first = &spans[0];
        assert_eq!(first.service, "users-worker");
        assert_eq!(first.trace_id, "5b8aa5a2d2c872e8321cf37308d69df2");
        assert_eq!(first.parent_id, "0102030405060708");
        assert_eq!(first.span_id, "051581bf3cb55c13");
        assert_eq!(first.name, "handle user.register");
        assert_eq!(first.kind, "Consumer");
        assert_eq!(first.attribute("messaging.system"), Some("rabbitmq"));
        assert_eq!(first.attribute("attempt"), Some("1"));
        assert_eq!(spans[1].parent_id, "", "a root span");
        assert_eq!(spans[1].status, "Error");
        assert_eq!(spans[1].service, "users-worker");
    }
}
