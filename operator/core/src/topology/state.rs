//! What a RabbitMQ vhost holds (as the management API reports it) and where the broker is:
//! plain data the diff compares with the plan.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A broker URL that cannot be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} URL {url:?}: {reason}")]
pub struct BadUrl {
    /// Which URL.
    pub what: &'static str,
    /// The URL, without credentials.
    pub url: String,
    /// Why.
    pub reason: String,
}

/// An exchange as the broker has it.
#[derive(Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ActualExchange {
    /// Name (`""` is the default exchange).
    pub name: String,
    /// Type (`topic`, `direct`, ...).
    #[serde(rename = "type")]
    pub kind: String,
}

/// A queue as the broker has it.
#[derive(Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ActualQueue {
    /// Name.
    pub name: String,
    /// Declaration arguments.
    #[serde(default)]
    pub arguments: BTreeMap<String, serde_json::Value>,
    /// Messages ready for delivery. None until the broker has reported statistics for the
    /// queue (they lag by seconds): unknown, never zero.
    #[serde(default)]
    pub messages_ready: Option<u64>,
    /// Messages delivered and not yet settled (None: not reported yet).
    #[serde(default)]
    pub messages_unacknowledged: Option<u64>,
    /// Consumers attached (None: not reported yet).
    #[serde(default)]
    pub consumers: Option<u64>,
    /// Message counters since the queue was declared (None: not reported yet).
    #[serde(default)]
    pub message_stats: Option<MessageStats>,
}

/// Cumulative message counters of a queue.
#[derive(Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct MessageStats {
    /// Messages acknowledged by consumers.
    #[serde(default)]
    pub ack: Option<u64>,
    /// Messages published into the queue.
    #[serde(default)]
    pub publish: Option<u64>,
}

impl ActualQueue {
    /// Whether it is a quorum queue (they refuse `queue.delete` with if-empty).
    pub fn is_quorum(&self) -> bool {
        self.arguments.get("x-queue-type").and_then(|v| v.as_str()) == Some("quorum")
    }
}

/// A binding as the broker has it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ActualBinding {
    /// Source exchange (`""` for the default exchange's implicit bindings).
    pub source: String,
    /// Destination queue or exchange.
    pub destination: String,
    /// `queue` or `exchange`.
    pub destination_type: String,
    /// Routing key.
    pub routing_key: String,
}

/// Everything in one vhost the topology manager cares about.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BrokerState {
    /// Exchanges.
    pub exchanges: Vec<ActualExchange>,
    /// Queues.
    pub queues: Vec<ActualQueue>,
    /// Bindings.
    pub bindings: Vec<ActualBinding>,
}

/// Where the broker is: AMQP URL (with vhost) and management API base URL.
#[derive(Clone, Debug)]
pub struct BrokerEndpoint {
    /// AMQP URL, e.g. `amqp://user:pass@host:5672/%2f`.
    pub amqp_url: String,
    /// Management base URL, e.g. `http://user:pass@host:15672`.
    pub management_url: String,
    /// The vhost, decoded from the AMQP URL.
    pub vhost: String,
}

/// Decodes `%XX` escapes (a vhost in an AMQP URL).
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encodes a path segment (a vhost in a management API path).
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// A URL with its password replaced, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            let user = creds.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl BrokerEndpoint {
    /// Builds the endpoint from an AMQP URL and, optionally, a management URL. Without one, the
    /// management API is assumed on the AMQP host, port 15672 (15671 for amqps), same user.
    pub fn new(amqp_url: &str, management_url: Option<&str>) -> Result<Self, BadUrl> {
        let bad = |reason: &str| BadUrl {
            what: "AMQP",
            url: redact(amqp_url),
            reason: reason.to_owned(),
        };
        let (scheme, rest) = amqp_url
            .split_once("://")
            .ok_or_else(|| bad("expected amqp://... or amqps://..."))?;
        if scheme != "amqp" && scheme != "amqps" {
            return Err(bad("the scheme must be amqp or amqps"));
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let vhost = match path.split('?').next().unwrap_or_default() {
            "" => "/".to_owned(),
            p => percent_decode(p),
        };
        let management_url = match management_url {
            Some(m) => m.trim_end_matches('/').to_owned(),
            None => {
                let (creds, hostport) = authority
                    .rsplit_once('@')
                    .map(|(c, h)| (Some(c), h))
                    .unwrap_or((None, authority));
                let host = hostport
                    .rsplit_once(':')
                    .map(|(h, _)| h)
                    .unwrap_or(hostport);
                let (mscheme, port) = if scheme == "amqps" {
                    ("https", 15671)
                } else {
                    ("http", 15672)
                };
                match creds {
                    Some(c) => format!("{mscheme}://{c}@{host}:{port}"),
                    None => format!("{mscheme}://guest:guest@{host}:{port}"),
                }
            }
        };
        Ok(Self {
            amqp_url: amqp_url.to_owned(),
            management_url,
            vhost,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_from_amqp_url() {
        let e = BrokerEndpoint::new("amqp://u:p@mq.local:5673/%2f", None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e.vhost, "/");
        assert_eq!(e.management_url, "http://u:p@mq.local:15672");
        let e = BrokerEndpoint::new("amqps://mq.local/shop", Some("https://admin:x@mgmt:443/"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e.vhost, "shop");
        assert_eq!(e.management_url, "https://admin:x@mgmt:443");
        let e = BrokerEndpoint::new("amqp://h", None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e.vhost, "/");
        assert!(BrokerEndpoint::new("http://h/", None).is_err());
        assert!(BrokerEndpoint::new("mq.local:5672", None).is_err());
    }

    #[test]
    fn urls_are_redacted_in_messages() {
        assert_eq!(
            redact("amqp://user:secret@h:5672/v"),
            "amqp://user:***@h:5672/v"
        );
        assert_eq!(redact("amqp://h:5672/v"), "amqp://h:5672/v");
        let e = BrokerEndpoint::new("ftp://user:secret@h", None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn vhost_names_round_trip_through_percent_encoding() {
        for v in ["/", "shop", "a b", "x/y"] {
            assert_eq!(percent_decode(&percent_encode(v)), v);
        }
        assert_eq!(percent_encode("/"), "%2F");
    }
}
