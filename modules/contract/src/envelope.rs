//! The message envelope of the head contract: one JSON shape for commands and events, the AMQP
//! properties that go with it, and the headers heads read and write.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Header carrying the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// Header counting attempts at handling a message (1 on first delivery).
pub const ATTEMPT: &str = "x-chimera-attempt";
/// Header saying why a message was dead-lettered.
pub const REASON: &str = "x-chimera-reason";
/// Header keeping a dead-lettered message's original routing key.
pub const ORIGINAL_ROUTING_KEY: &str = "x-chimera-original-routing-key";
/// Content type of every envelope.
pub const CONTENT_TYPE: &str = "application/json";

/// A command or an event.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Envelope {
    /// Unique id; also the AMQP `message_id`, and the inbox key that makes handling
    /// effectively-once.
    pub id: Uuid,
    /// The command or event name; also the AMQP `type` and the routing key.
    #[serde(rename = "type")]
    pub kind: String,
    /// When it happened.
    pub occurred_at: jiff::Timestamp,
    /// The payload.
    pub data: serde_json::Value,
}

/// Why bytes are not an envelope.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// Not JSON, or not the envelope's shape.
    #[error(
        "not a Chimera envelope ({0}); expected {{\"id\", \"type\", \"occurred_at\", \"data\"}}"
    )]
    Malformed(String),
    /// The type is empty.
    #[error("envelope has an empty type")]
    EmptyType,
}

impl Envelope {
    /// A new envelope with a fresh id, stamped now.
    pub fn new(kind: impl Into<String>, data: serde_json::Value) -> Self {
        Self {
            id: Uuid::new_v4(),
            kind: kind.into(),
            occurred_at: jiff::Timestamp::now(),
            data,
        }
    }

    /// Decodes a message body.
    pub fn decode(body: &[u8]) -> Result<Self, EnvelopeError> {
        let envelope: Self =
            serde_json::from_slice(body).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        if envelope.kind.trim().is_empty() {
            return Err(EnvelopeError::EmptyType);
        }
        Ok(envelope)
    }

    /// The message body.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing a struct of strings, a timestamp and a JSON value cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A W3C `traceparent`: version 00, trace id, parent span id, flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    /// 16-byte trace id, shared by everything one request causes.
    pub trace_id: u128,
    /// 8-byte id of the span that sent the message.
    pub span_id: u64,
    /// Trace flags (01 = sampled).
    pub flags: u8,
}

impl TraceParent {
    /// A new trace (for a message that starts one).
    pub fn new_root() -> Self {
        let id = Uuid::new_v4().as_u128();
        Self {
            trace_id: id,
            span_id: (id as u64) | 1,
            flags: 1,
        }
    }

    /// The same trace, one hop further (for the events a handler emits).
    pub fn child(&self) -> Self {
        let span = (Uuid::new_v4().as_u128() as u64) | 1;
        Self {
            span_id: span,
            ..*self
        }
    }

    /// Parses the header; None when it is not a valid version-00 traceparent.
    pub fn parse(header: &str) -> Option<Self> {
        let mut parts = header.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some()
            || version != "00"
            || trace.len() != 32
            || span.len() != 16
            || flags.len() != 2
        {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok().filter(|t| *t != 0)?;
        let span_id = u64::from_str_radix(span, 16).ok().filter(|s| *s != 0)?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self {
            trace_id,
            span_id,
            flags,
        })
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn envelopes_round_trip_with_the_contract_field_names() {
        let e = Envelope::new("order.placed", serde_json::json!({"order_id": "o-1"}));
        let json: serde_json::Value = serde_json::from_slice(&e.encode()).unwrap_or_default();
        assert_eq!(json["type"], "order.placed");
        assert!(
            json["occurred_at"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z'))
        );
        assert_eq!(Envelope::decode(&e.encode()).ok(), Some(e));
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        for body in [
            &b"not json"[..],
            b"{}",
            b"{\"id\":\"x\",\"type\":\"a\",\"occurred_at\":\"2026-01-01T00:00:00Z\",\"data\":{}}",
        ] {
            assert!(
                Envelope::decode(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let empty = br#"{"id":"6d6f1f9e-8d0e-4c35-9f55-6c2b8b1c2a11","type":" ","occurred_at":"2026-01-01T00:00:00Z","data":{}}"#;
        assert!(matches!(
            Envelope::decode(empty),
            Err(EnvelopeError::EmptyType)
        ));
    }

    #[test]
    fn traceparent_parses_the_w3c_example() {
        let t = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let t = t.unwrap_or_else(|| panic!("valid header"));
        assert_eq!(
            t.to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let child = t.child();
        assert_eq!(child.trace_id, t.trace_id);
        assert_ne!(child.span_id, t.span_id);
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-0000-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn traceparent_round_trips(trace in 1u128.., span in 1u64.., flags in any::<u8>()) {
            let t = TraceParent { trace_id: trace, span_id: span, flags };
            prop_assert_eq!(TraceParent::parse(&t.to_string()), Some(t));
        }
    }
}
