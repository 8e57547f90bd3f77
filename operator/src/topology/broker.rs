//! What a RabbitMQ vhost holds, read through the management HTTP API (AMQP cannot list
//! bindings or return a queue's arguments).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Errors talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A URL could not be understood.
    #[error("invalid {what} URL {url:?}: {reason}")]
    BadUrl {
        /// Which URL.
        what: &'static str,
        /// The URL, without credentials.
        url: String,
        /// Why.
        reason: String,
    },
    /// The management API did not answer.
    #[error("RabbitMQ management API at {url} is unreachable: {cause}")]
    ManagementUnreachable {
        /// Base URL, without credentials.
        url: String,
        /// What failed.
        cause: reqwest::Error,
    },
    /// The vhost named in the AMQP URL does not exist.
    #[error("vhost {vhost:?} does not exist on the broker (create it, or fix the AMQP URL's path)")]
    VhostNotFound {
        /// The vhost.
        vhost: String,
    },
    /// The management API refused the credentials.
    #[error("RabbitMQ management API refused the credentials of user {user:?} (401)")]
    ManagementUnauthorized {
        /// The user.
        user: String,
    },
    /// The management API answered with an error status.
    #[error("RabbitMQ management API {path} answered {status}: {body}")]
    ManagementStatus {
        /// Request path.
        path: String,
        /// HTTP status.
        status: u16,
        /// Response body (trimmed).
        body: String,
    },
    /// AMQP connection or channel error.
    #[error("AMQP {action} failed: {cause}")]
    Amqp {
        /// What the declarer was doing.
        action: String,
        /// What lapin said.
        cause: lapin::Error,
    },
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
#[derive(Deserialize, Clone, Debug, PartialEq)]
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

fn percent_decode(s: &str) -> String {
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

fn percent_encode(s: &str) -> String {
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
    pub fn new(amqp_url: &str, management_url: Option<&str>) -> Result<Self, BrokerError> {
        let bad = |reason: &str| BrokerError::BadUrl {
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

/// Reads a vhost's state through the management API.
pub struct ManagementClient {
    http: reqwest::Client,
    base: String,
    user: String,
    password: String,
    vhost: String,
}

impl ManagementClient {
    /// A client for `endpoint`'s vhost.
    pub fn new(endpoint: &BrokerEndpoint) -> Result<Self, BrokerError> {
        let url = &endpoint.management_url;
        let (scheme, rest) = url.split_once("://").ok_or_else(|| BrokerError::BadUrl {
            what: "management",
            url: redact(url),
            reason: "expected http://... or https://...".into(),
        })?;
        let (creds, host) = rest
            .rsplit_once('@')
            .map(|(c, h)| (Some(c), h))
            .unwrap_or((None, rest));
        let (user, password) = creds
            .map(|c| c.split_once(':').unwrap_or((c, "")))
            .map(|(u, p)| (percent_decode(u), percent_decode(p)))
            .unwrap_or_else(|| ("guest".into(), "guest".into()));
        // reqwest is built without a crypto provider of its own: use ring, like kube and lapin
        // (installing is a no-op when a provider is already installed).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|cause| BrokerError::ManagementUnreachable {
                url: redact(url),
                cause,
            })?;
        Ok(Self {
            http,
            base: format!("{scheme}://{host}"),
            user,
            password,
            vhost: endpoint.vhost.clone(),
        })
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        kind: &str,
        full_path: bool,
    ) -> Result<T, BrokerError> {
        let path = if full_path {
            format!("/api/{kind}")
        } else {
            format!("/api/{kind}/{}", percent_encode(&self.vhost))
        };
        // The management API answers 5xx for a moment after a vhost is created or while a node
        // is busy: a few quick retries, then the error.
        let mut attempt = 0u64;
        let response = loop {
            let response = self
                .http
                .get(format!("{}{path}", self.base))
                .basic_auth(&self.user, Some(&self.password))
                .send()
                .await
                .map_err(|cause| BrokerError::ManagementUnreachable {
                    url: self.base.clone(),
                    cause,
                })?;
            if !response.status().is_server_error() || attempt >= 4 {
                break response;
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
        };
        let status = response.status();
        if status.as_u16() == 404 {
            return Err(BrokerError::VhostNotFound {
                vhost: self.vhost.clone(),
            });
        }
        if status.as_u16() == 401 {
            return Err(BrokerError::ManagementUnauthorized {
                user: self.user.clone(),
            });
        }
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(BrokerError::ManagementStatus {
                path,
                status: status.as_u16(),
                body: body.chars().take(300).collect(),
            });
        }
        response
            .json()
            .await
            .map_err(|cause| BrokerError::ManagementUnreachable {
                url: self.base.clone(),
                cause,
            })
    }

    /// One queue of the vhost.
    pub async fn queue(&self, name: &str) -> Result<ActualQueue, BrokerError> {
        self.get(
            &format!(
                "queues/{}/{}",
                percent_encode(&self.vhost),
                percent_encode(name)
            ),
            true,
        )
        .await
    }

    /// Exchanges, queues and bindings of the vhost.
    pub async fn state(&self) -> Result<BrokerState, BrokerError> {
        Ok(BrokerState {
            exchanges: self.get("exchanges", false).await?,
            queues: self.get("queues", false).await?,
            bindings: self.get("bindings", false).await?,
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
