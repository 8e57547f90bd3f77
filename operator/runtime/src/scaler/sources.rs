//! Where the autoscaler's signals come from, behind traits so the loop does not care: RabbitMQ
//! for worker queues (AMQP passive declare for the ready count and consumers, which is current;
//! the management API for unacked messages and the ack counter), and the query pods' `/metrics`
//! found through the Service's EndpointSlices.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::{Api, Client};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use crate::topology::management::{BrokerError, ManagementClient};
use chimera_core::autoscale::exposition::{self, Scrape};
pub use chimera_core::autoscale::signals::QueueSample;
use chimera_core::topology::state::BrokerEndpoint;

/// Why a signal could not be read (the autoscaler then holds the replicas and says why).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The AMQP connection or channel failed.
    #[error("broker: {action}: {source}")]
    Amqp {
        /// What was being done.
        action: String,
        /// What lapin said.
        source: lapin::Error,
    },
    /// The management API failed.
    #[error("broker: {0}")]
    Management(#[from] BrokerError),
    /// The API server did not answer.
    #[error("listing the query head's endpoints: {0}")]
    Endpoints(#[source] kube::Error),
    /// The head's Service has no ready endpoint.
    #[error("no pod metrics: Service {namespace}/{service} has no ready endpoints")]
    NoEndpoints {
        /// The namespace.
        namespace: String,
        /// The Service.
        service: String,
    },
    /// No pod of the head could be scraped.
    #[error("no pod metrics: {}", .0.iter().map(|(t, e)| format!("{t}: {e}")).collect::<Vec<_>>().join("; "))]
    Scrapes(Vec<(String, ScrapeError)>),
    /// The scrape did not answer in time.
    #[error("no pod metrics: no answer within {0:?}")]
    Timeout(Duration),
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// Why one pod's `/metrics` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// The request failed or answered an error status.
    #[error(transparent)]
    Http(#[from] reqwest::Error),
    /// The body is not the head contract's metrics.
    #[error(transparent)]
    Exposition(#[from] chimera_core::autoscale::exposition::ExpositionError),
}

/// Reads a worker queue.
pub trait QueueSource: Send + Sync {
    /// The queue `queue` on `endpoint`'s vhost.
    fn sample<'a>(
        &'a self,
        endpoint: &'a BrokerEndpoint,
        queue: &'a str,
    ) -> BoxFuture<'a, Result<QueueSample, SourceError>>;
}

/// Reads a query head's pods.
pub trait LatencySource: Send + Sync {
    /// Each ready pod's scrape of the head behind Service `service`, keyed by endpoint.
    fn sample<'a>(
        &'a self,
        namespace: &'a str,
        service: &'a str,
    ) -> BoxFuture<'a, Result<Vec<(String, Scrape)>, SourceError>>;
}

/// RabbitMQ: one AMQP channel and one management client per broker, kept between ticks.
#[derive(Default)]
pub struct RabbitMq {
    channels: Mutex<HashMap<String, lapin::Channel>>,
    management: Mutex<HashMap<String, std::sync::Arc<ManagementClient>>>,
}

impl RabbitMq {
    async fn channel(&self, url: &str) -> Result<lapin::Channel, SourceError> {
        let cached = self
            .channels
            .lock()
            .ok()
            .and_then(|c| c.get(url).cloned())
            .filter(|c| c.status().connected());
        if let Some(channel) = cached {
            return Ok(channel);
        }
        let connection = lapin::Connection::connect(
            url,
            lapin::ConnectionProperties::default()
                .with_connection_name("chimera-autoscaler".into()),
        )
        .await
        .map_err(|source| SourceError::Amqp {
            action: "connecting".into(),
            source,
        })?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|source| SourceError::Amqp {
                action: "opening a channel".into(),
                source,
            })?;
        if let Ok(mut c) = self.channels.lock() {
            c.insert(url.to_owned(), channel.clone());
        }
        Ok(channel)
    }

    fn management_client(
        &self,
        endpoint: &BrokerEndpoint,
    ) -> Result<std::sync::Arc<ManagementClient>, SourceError> {
        let key = format!("{}|{}", endpoint.management_url, endpoint.vhost);
        if let Some(client) = self
            .management
            .lock()
            .ok()
            .and_then(|m| m.get(&key).cloned())
        {
            return Ok(client);
        }
        let client = std::sync::Arc::new(ManagementClient::new(endpoint)?);
        if let Ok(mut m) = self.management.lock() {
            m.insert(key, client.clone());
        }
        Ok(client)
    }

    fn forget(&self, url: &str) {
        if let Ok(mut c) = self.channels.lock() {
            c.remove(url);
        }
    }
}

impl QueueSource for RabbitMq {
    fn sample<'a>(
        &'a self,
        endpoint: &'a BrokerEndpoint,
        queue: &'a str,
    ) -> BoxFuture<'a, Result<QueueSample, SourceError>> {
        Box::pin(async move {
            let channel = self.channel(&endpoint.amqp_url).await?;
            let declared = channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            let declared = match declared {
                Ok(q) => q,
                Err(e) => {
                    // A failed passive declare closes the channel.
                    self.forget(&endpoint.amqp_url);
                    return Err(SourceError::Amqp {
                        action: format!("reading queue {queue}"),
                        source: e,
                    });
                }
            };
            let management = self.management_client(endpoint)?;
            let stats = management.queue(queue).await?;
            #[allow(clippy::cast_precision_loss)]
            Ok(QueueSample {
                ready: f64::from(declared.message_count()),
                unacked: stats.messages_unacknowledged.unwrap_or(0) as f64,
                acked_total: stats.message_stats.and_then(|m| m.ack).unwrap_or(0) as f64,
                consumers: u64::from(declared.consumer_count()),
            })
        })
    }
}

/// Query pods through the EndpointSlices of their Service.
pub struct PodMetrics {
    client: Client,
    http: reqwest::Client,
}

impl PodMetrics {
    /// Scrapes with a short timeout: a slow pod must not stall the loop.
    pub fn new(client: Client) -> Result<Self, SourceError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(800))
            .build()
            .map_err(SourceError::Client)?;
        Ok(Self { client, http })
    }
}

impl LatencySource for PodMetrics {
    fn sample<'a>(
        &'a self,
        namespace: &'a str,
        service: &'a str,
    ) -> BoxFuture<'a, Result<Vec<(String, Scrape)>, SourceError>> {
        Box::pin(async move {
            let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), namespace);
            let list = slices
                .list(
                    &ListParams::default().labels(&format!("kubernetes.io/service-name={service}")),
                )
                .await
                .map_err(SourceError::Endpoints)?;
            let mut targets = Vec::new();
            for slice in &list.items {
                let port = slice
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some(chimera_contract::metrics::HTTP_PORT_NAME))
                    .or_else(|| slice.ports.iter().flatten().next())
                    .and_then(|p| p.port);
                let Some(port) = port else { continue };
                for endpoint in &slice.endpoints {
                    let ready = endpoint
                        .conditions
                        .as_ref()
                        .and_then(|c| c.ready)
                        .unwrap_or(true);
                    if let (true, Some(address)) = (ready, endpoint.addresses.first()) {
                        let host = if address.contains(':') {
                            format!("[{address}]")
                        } else {
                            address.clone()
                        };
                        targets.push(format!("{host}:{port}"));
                    }
                }
            }
            if targets.is_empty() {
                return Err(SourceError::NoEndpoints {
                    namespace: namespace.to_owned(),
                    service: service.to_owned(),
                });
            }
            let scrapes = futures::future::join_all(
                targets
                    .iter()
                    .map(|t| async move { scrape(&self.http, t).await.map(|s| (t.clone(), s)) }),
            )
            .await;
            let mut ok = Vec::new();
            let mut errors = Vec::new();
            for (target, result) in targets.iter().zip(scrapes) {
                match result {
                    Ok(s) => ok.push(s),
                    Err(e) => errors.push((target.clone(), e)),
                }
            }
            if ok.is_empty() {
                return Err(SourceError::Scrapes(errors));
            }
            if !errors.is_empty() {
                tracing::debug!(service, errors = %SourceError::Scrapes(errors), "some query pods could not be scraped");
            }
            Ok(ok)
        })
    }
}

/// Reads the `/metrics` of one head replica at `target` (`host:port`).
pub async fn scrape(http: &reqwest::Client, target: &str) -> Result<Scrape, ScrapeError> {
    let text = http
        .get(format!("http://{target}/metrics"))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)?
        .text()
        .await?;
    Ok(exposition::parse(&text)?)
}
