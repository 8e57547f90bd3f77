//! Where the autoscaler's signals come from, behind traits so the loop does not care: RabbitMQ
//! for worker queues (AMQP passive declare for the ready count and consumers, which is current;
//! the management API for unacked messages and the ack counter), and the pods' `/metrics` at the
//! addresses of the head's ready pods (from the operator's pod cache: no API request): a query
//! head's latency every tick, a worker head's outbox rows when it could go to zero.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use crate::topology::management::{BrokerError, ManagementClient};
use chimera_core::autoscale::exposition::{self, Scrape};
pub use chimera_core::autoscale::signals::QueueSample;
use chimera_core::topology::state::{ActualQueue, BrokerEndpoint};

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
    /// The worker queue does not exist (yet).
    #[error("broker: no queue {queue} in vhost {vhost} (its topology is not declared yet?)")]
    QueueMissing {
        /// The queue.
        queue: String,
        /// The vhost.
        vhost: String,
    },
    /// The head has no ready pod to scrape.
    #[error("no pod metrics: the query head of {namespace}/{module} has no ready pod")]
    NoReadyPods {
        /// The namespace.
        namespace: String,
        /// The module.
        module: String,
    },
    /// There is no ready pod to read.
    #[error("no pod metrics: no ready pod to read")]
    NoTargets,
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

/// Reads a head's pods: a query head's latency, a worker head's outbox.
pub trait LatencySource: Send + Sync {
    /// The scrape of each of `targets` (`host:port` of the head's ready pods) that answered.
    fn sample<'a>(
        &'a self,
        targets: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<(String, Scrape)>, SourceError>>;

    /// The outbox rows not sent yet, summed over `targets` (a worker head's ready pods); an
    /// error when any of them could not be read (a row there would be unknown).
    fn outbox_rows<'a>(&'a self, targets: &'a [String]) -> BoxFuture<'a, Result<f64, SourceError>>;
}

/// How old a vhost's counters may be before a sample starts reading them again. RabbitMQ itself
/// refreshes them every `collect_statistics_interval` (5 s by default): reading a thousand
/// queues' counters every tick would mostly read the same numbers again. The ready count, which
/// must be current, comes from a passive declare each tick.
const COUNTERS_MAX_AGE: Duration = Duration::from_millis(1900);

/// Channels per broker for the autoscaler's passive declares.
const CHANNELS: usize = 8;

fn slot_of(queue: &str) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    queue.hash(&mut hasher);
    usize::try_from(hasher.finish() % CHANNELS as u64).unwrap_or(0)
}

/// A vhost's queue counters as last read, by queue name.
type Counters = std::sync::Arc<HashMap<String, ActualQueue>>;

/// A vhost's last read of its counters, and whether a new one is under way.
#[derive(Default)]
struct CountersState {
    read: Option<(Instant, Counters)>,
    refreshing: bool,
}
type CountersCell = std::sync::Arc<tokio::sync::Mutex<CountersState>>;

fn index(queues: Vec<ActualQueue>) -> Counters {
    std::sync::Arc::new(queues.into_iter().map(|q| (q.name.clone(), q)).collect())
}

/// RabbitMQ: one AMQP connection (with a few channels) and one management client per broker,
/// kept between ticks, and each vhost's worker-queue counters read at once for all its queues,
/// at most every [`COUNTERS_MAX_AGE`].
#[derive(Default)]
pub struct RabbitMq {
    connections: Mutex<HashMap<String, std::sync::Arc<lapin::Connection>>>,
    /// Channels by (AMQP URL, slot): a queue's passive declare goes to the slot of its name,
    /// so a thousand queues' reads per tick run [`CHANNELS`] at a time, not one by one.
    channels: Mutex<HashMap<(String, usize), lapin::Channel>>,
    management: Mutex<HashMap<String, std::sync::Arc<ManagementClient>>>,
    counters: Mutex<HashMap<String, CountersCell>>,
}

impl RabbitMq {
    async fn channel(&self, url: &str, slot: usize) -> Result<lapin::Channel, SourceError> {
        let key = (url.to_owned(), slot);
        let cached = self
            .channels
            .lock()
            .ok()
            .and_then(|c| c.get(&key).cloned())
            .filter(|c| c.status().connected());
        if let Some(channel) = cached {
            return Ok(channel);
        }
        // A closed channel (a passive declare of a missing queue closes it) is replaced on the
        // same connection; a new connection only when that one is gone.
        let connection = self
            .connections
            .lock()
            .ok()
            .and_then(|c| c.get(url).cloned())
            .filter(|c| c.status().connected());
        let connection = match connection {
            Some(c) => c,
            None => {
                let c = std::sync::Arc::new(
                    lapin::Connection::connect(
                        url,
                        lapin::ConnectionProperties::default()
                            .with_connection_name("chimera-autoscaler".into()),
                    )
                    .await
                    .map_err(|source| SourceError::Amqp {
                        action: "connecting".into(),
                        source,
                    })?,
                );
                if let Ok(mut cs) = self.connections.lock() {
                    cs.insert(url.to_owned(), std::sync::Arc::clone(&c));
                }
                c
            }
        };
        let channel = connection
            .create_channel()
            .await
            .map_err(|source| SourceError::Amqp {
                action: "opening a channel".into(),
                source,
            })?;
        if let Ok(mut c) = self.channels.lock() {
            c.insert(key, channel.clone());
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

    /// The vhost's counters. The first read is waited for; after that, a read older than
    /// [`COUNTERS_MAX_AGE`] is answered as it is while a new one runs in the background, so
    /// no decision waits for the listing of a thousand queues (the counters are RabbitMQ's
    /// 5 s statistics anyway; the ready count comes from the passive declare).
    async fn counters(&self, endpoint: &BrokerEndpoint) -> Result<Counters, SourceError> {
        let key = format!("{}|{}", endpoint.management_url, endpoint.vhost);
        let cell = {
            let mut cells = self.counters.lock().unwrap_or_else(|p| p.into_inner());
            std::sync::Arc::clone(cells.entry(key).or_default())
        };
        let client = self.management_client(endpoint)?;
        let mut state = cell.lock().await;
        if let Some((at, counters)) = state.read.as_ref() {
            let counters = std::sync::Arc::clone(counters);
            if at.elapsed() >= COUNTERS_MAX_AGE && !state.refreshing {
                state.refreshing = true;
                let cell = std::sync::Arc::clone(&cell);
                tokio::spawn(async move {
                    let read = client.worker_queue_counters().await;
                    let mut state = cell.lock().await;
                    state.refreshing = false;
                    match read {
                        Ok(queues) => state.read = Some((Instant::now(), index(queues))),
                        // The last read stays; the next sample starts another.
                        Err(error) => tracing::debug!(%error, "could not read the queue counters"),
                    }
                });
            }
            return Ok(counters);
        }
        // (the lock is held while reading: concurrent first samples wait for this one)
        let counters = index(client.worker_queue_counters().await?);
        state.read = Some((Instant::now(), std::sync::Arc::clone(&counters)));
        Ok(counters)
    }

    fn forget(&self, url: &str, slot: usize) {
        if let Ok(mut c) = self.channels.lock() {
            c.remove(&(url.to_owned(), slot));
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
            // Not in the vhost's counters (read within the last half tick): not declared yet,
            // or deleted; a passive declare would only fail and close the channel.
            let counters = self.counters(endpoint).await?;
            let Some(stats) = counters.get(queue).cloned() else {
                return Err(SourceError::QueueMissing {
                    queue: queue.to_owned(),
                    vhost: endpoint.vhost.clone(),
                });
            };
            let slot = slot_of(queue);
            let channel = self.channel(&endpoint.amqp_url, slot).await?;
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
                    self.forget(&endpoint.amqp_url, slot);
                    return Err(SourceError::Amqp {
                        action: format!("reading queue {queue}"),
                        source: e,
                    });
                }
            };

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

/// Query pods over HTTP.
pub struct PodMetrics {
    http: reqwest::Client,
}

impl PodMetrics {
    /// Scrapes with a short timeout: a slow pod must not stall the loop.
    pub fn new() -> Result<Self, SourceError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(800))
            .build()
            .map_err(SourceError::Client)?;
        Ok(Self { http })
    }
}

impl LatencySource for PodMetrics {
    fn sample<'a>(
        &'a self,
        targets: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<(String, Scrape)>, SourceError>> {
        Box::pin(async move {
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
                tracing::debug!(errors = %SourceError::Scrapes(errors), "some query pods could not be scraped");
            }
            Ok(ok)
        })
    }

    fn outbox_rows<'a>(&'a self, targets: &'a [String]) -> BoxFuture<'a, Result<f64, SourceError>> {
        Box::pin(async move {
            if targets.is_empty() {
                return Err(SourceError::NoTargets);
            }
            let reads = futures::future::join_all(targets.iter().map(|t| self.outbox_of(t))).await;
            let mut rows = 0.0;
            let mut errors = Vec::new();
            for (target, read) in targets.iter().zip(reads) {
                match read {
                    Ok(n) => rows += n,
                    Err(e) => errors.push((target.clone(), e)),
                }
            }
            if errors.is_empty() {
                Ok(rows)
            } else {
                Err(SourceError::Scrapes(errors))
            }
        })
    }
}

impl PodMetrics {
    async fn outbox_of(&self, target: &str) -> Result<f64, ScrapeError> {
        outbox_rows(&self.http, target).await
    }
}

/// The address of every ready, not terminating pod in `pods`, by `namespace/module/head`.
pub fn ready_targets(
    pods: &[std::sync::Arc<k8s_openapi::api::core::v1::Pod>],
) -> HashMap<String, Vec<String>> {
    use chimera_core::workloads::{HEAD_LABEL, MODULE_LABEL};
    use kube::ResourceExt;
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for pod in pods {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let labels = pod.labels();
        let (Some(namespace), Some(module), Some(head)) = (
            pod.namespace(),
            labels.get(MODULE_LABEL),
            labels.get(HEAD_LABEL),
        ) else {
            continue;
        };
        let status = pod.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let Some(ip) = status.and_then(|s| s.pod_ip.clone()) else {
            continue;
        };
        if ready {
            let host = if ip.contains(':') {
                format!("[{ip}]")
            } else {
                ip
            };
            out.entry(format!("{namespace}/{module}/{head}"))
                .or_default()
                .push(host);
        }
    }
    for hosts in out.values_mut() {
        hosts.sort();
    }
    out
}

/// The `/metrics` text of one head replica at `target` (`host:port`).
async fn metrics_text(http: &reqwest::Client, target: &str) -> Result<String, reqwest::Error> {
    http.get(format!("http://{target}/metrics"))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)?
        .text()
        .await
}

/// The outbox rows not sent yet of one worker replica at `target` (`host:port`).
pub async fn outbox_rows(http: &reqwest::Client, target: &str) -> Result<f64, ScrapeError> {
    Ok(exposition::outbox_pending(
        &metrics_text(http, target).await?,
    )?)
}

/// Reads the `/metrics` of one head replica at `target` (`host:port`).
pub async fn scrape(http: &reqwest::Client, target: &str) -> Result<Scrape, ScrapeError> {
    Ok(exposition::parse(&metrics_text(http, target).await?)?)
}
