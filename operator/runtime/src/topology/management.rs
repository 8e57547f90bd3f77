//! What a RabbitMQ vhost holds, read through the management HTTP API (AMQP cannot list
//! bindings or return a queue's arguments).

use std::time::Duration;

use chimera_core::topology::state::{
    ActualQueue, BadUrl, BrokerEndpoint, BrokerState, percent_decode, percent_encode, redact,
};
use chimera_core::topology::verdict::{BrokerFailure, BrokerFailureKind};

/// Errors talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A URL could not be understood.
    #[error(transparent)]
    BadUrl(#[from] BadUrl),
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
    /// The management API refused an operation to the operator's user (403).
    #[error(
        "RabbitMQ management API refused {path} to user {user:?} (403): managing module users needs the administrator tag"
    )]
    ManagementForbidden {
        /// The operator's user.
        user: String,
        /// Request path.
        path: String,
    },
    /// A broker user of the name a module's user would have exists and is not the operator's.
    #[error(
        "broker user {user:?} exists and was not made by the operator (no {tag:?} tag): remove it, or set spec.broker"
    )]
    UserTaken {
        /// The user.
        user: String,
        /// The tag the operator's users carry.
        tag: &'static str,
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

impl BrokerError {
    /// What the status says of this error: its kind (one condition reason each) and message.
    pub fn failure(&self) -> BrokerFailure {
        let kind = match self {
            BrokerError::VhostNotFound { .. } => BrokerFailureKind::VhostNotFound,
            BrokerError::ManagementUnauthorized { .. }
            | BrokerError::ManagementForbidden { .. } => BrokerFailureKind::AccessRefused,
            BrokerError::Amqp { cause, .. } if access_refused(cause) => {
                BrokerFailureKind::AccessRefused
            }
            BrokerError::ManagementUnreachable { .. } | BrokerError::Amqp { .. } => {
                BrokerFailureKind::Unreachable
            }
            BrokerError::BadUrl(_) => BrokerFailureKind::UrlInvalid,
            BrokerError::ManagementStatus { .. } | BrokerError::UserTaken { .. } => {
                BrokerFailureKind::Other
            }
        };
        BrokerFailure {
            kind,
            message: self.to_string(),
        }
    }
}

/// AMQP 403 ACCESS_REFUSED (bad credentials at connection, or no permission on the vhost).
fn access_refused(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 403)
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
        let (scheme, rest) = url.split_once("://").ok_or_else(|| BadUrl {
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

    /// Sends one request to `path` (from `/api/...`), retrying a few times on 5xx (the
    /// management API answers 5xx for a moment after a vhost is created or while a node is
    /// busy); the status is the caller's to read.
    pub(crate) async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<reqwest::Response, BrokerError> {
        let mut attempt = 0u64;
        loop {
            let mut request = self
                .http
                .request(method.clone(), format!("{}{path}", self.base))
                .basic_auth(&self.user, Some(&self.password));
            if let Some(body) = body {
                request = request.json(body);
            }
            let response =
                request
                    .send()
                    .await
                    .map_err(|cause| BrokerError::ManagementUnreachable {
                        url: self.base.clone(),
                        cause,
                    })?;
            if !response.status().is_server_error() || attempt >= 4 {
                return Ok(response);
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
        }
    }

    /// The management user's name (for messages).
    pub(crate) fn user(&self) -> &str {
        &self.user
    }

    /// The vhost this client reads.
    pub(crate) fn vhost(&self) -> &str {
        &self.vhost
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
        let response = self.request(reqwest::Method::GET, &path, None).await?;
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

    /// The vhost's worker queues with their counters only (the autoscaler reads them all at
    /// once instead of one request per queue; retry and dead-letter queues are left out), page
    /// by page (the management API serves at most 500 a page).
    pub async fn worker_queue_counters(&self) -> Result<Vec<ActualQueue>, BrokerError> {
        #[derive(serde::Deserialize)]
        struct Page {
            items: Vec<ActualQueue>,
            page_count: u64,
        }
        let mut queues = Vec::new();
        let mut page = 1;
        loop {
            let batch: Page = self
                .get(
                    &format!(
                        "queues/{}?page={page}&page_size=500&use_regex=true&name={}&columns=name,messages_ready,messages_unacknowledged,consumers,message_stats",
                        percent_encode(&self.vhost),
                        percent_encode(r"^chimera\..+\.worker$"),
                    ),
                    true,
                )
                .await?;
            queues.extend(batch.items);
            if page >= batch.page_count {
                return Ok(queues);
            }
            page += 1;
        }
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
