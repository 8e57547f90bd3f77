//! The `ChimeraModule` custom resource: one business domain, one body, two heads.
//!
//! Every constraint the API server enforces lives here, as schema attributes or CEL rules, so
//! the generated CRD is the single source of truth; `chimera validate` checks YAML offline
//! against that same CRD (see `api::validation`).

use k8s_openapi::api::core::v1::{EnvFromSource, EnvVar, Probe, ResourceRequirements};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::names::{DNS_LABEL_PATTERN, EVENT_NAME_PATTERN, EVENT_PATTERN_PATTERN};
use super::status::ChimeraModuleStatus;

/// A business domain run as a Chimera module: a query head serving REST reads and a worker head
/// consuming commands and events from RabbitMQ, both from the same image.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "chimera.dev",
    version = "v1alpha1",
    kind = "ChimeraModule",
    plural = "chimeramodules",
    singular = "chimeramodule",
    shortname = "chm",
    category = "chimera",
    namespaced,
    status = "ChimeraModuleStatus",
    derive = "PartialEq",
    doc = "A Chimera module: one business domain with a query head and a worker head.",
    printcolumn(name = "Domain", type_ = "string", json_path = ".status.domain"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Query",
        type_ = "string",
        description = "ready/desired query replicas",
        json_path = ".status.query.summary"
    ),
    printcolumn(
        name = "Worker",
        type_ = "string",
        description = "ready/desired worker replicas",
        json_path = ".status.worker.summary"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new(
        "(has(self.spec.domain) ? self.spec.domain : self.metadata.name) == (has(oldSelf.spec.domain) ? oldSelf.spec.domain : oldSelf.metadata.name)"
    ).message("spec.domain is immutable (it defaults to metadata.name): create a new module to move a domain").field_path(".spec.domain"),
    validation = Rule::new(
        "has(self.spec.domain) || (size(self.metadata.name) <= 63 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$'))"
    ).message("metadata.name is not a valid domain name (a DNS label starting with a letter): set spec.domain"),
    validation = Rule::new("size(self.metadata.name) <= 63")
        .message("metadata.name must be at most 63 characters: it is a label value on every object the module owns"),
    validation = Rule::new(
        "!has(self.spec.query) || (size(self.metadata.name) <= 57 && self.metadata.name.matches('^[a-z]'))"
    ).message("metadata.name must start with a letter and be at most 57 characters so that the query head's Service '<name>-query' is a valid DNS label")
)]
#[x_kube(
    validation = Rule::new("has(self.query) || has(self.worker)")
        .message("a module needs at least one head: set spec.query, spec.worker, or both"),
    validation = Rule::new("has(self.worker) || !has(self.commands) || size(self.commands) == 0")
        .message("spec.commands are consumed by the worker head: set spec.worker")
        .field_path(".commands"),
    validation = Rule::new(
        "has(self.worker) || !has(self.events) || !has(self.events.subscribes) || size(self.events.subscribes) == 0"
    )
        .message("spec.events.subscribes are consumed by the worker head: set spec.worker")
        .field_path(".events.subscribes"),
    validation = Rule::new(
        "!has(self.schemas) || self.schemas.all(t, (has(self.commands) && t in self.commands) || (has(self.events) && ((has(self.events.publishes) && t in self.events.publishes) || (has(self.events.subscribes) && size(self.events.subscribes) > 0))))"
    )
        .message("spec.schemas: each schema is for a command in spec.commands, an event in spec.events.publishes, or an event of spec.events.subscribes")
        .field_path(".schemas")
)]
#[serde(rename_all = "camelCase")]
pub struct ChimeraModuleSpec {
    /// The business domain this module owns (`users`, `orders`, ...). A DNS label; defaults to
    /// metadata.name. It names the module's RabbitMQ exchanges and queues, so it is immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DNS_LABEL_PATTERN), length(max = 63))]
    pub domain: Option<String>,

    /// Container image of the module's body, shared by both heads.
    #[schemars(length(min = 1))]
    pub image: String,

    /// Image pull policy for both heads (Kubernetes default when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,

    /// Environment shared by both heads. Names starting with `CHIMERA_` are reserved for the
    /// head contract (docs/contract.md) and rejected here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = Rule::new("self.all(e, !e.name.startsWith('CHIMERA_'))")
        .message("environment variables starting with CHIMERA_ are reserved for the head contract"))]
    pub env: Vec<EnvVar>,

    /// Sources of environment variables (ConfigMaps, Secrets) shared by both heads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<EnvFromSource>,

    /// Service account both heads run as (the namespace's default when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub service_account_name: Option<String>,

    /// The domain's own database. Each domain owns its database; no other module reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseSpec>,

    /// The RabbitMQ broker to use instead of the operator's default broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<BrokerSpec>,

    /// Command names the worker head accepts (lowercase dotted, e.g. `order.place`); each is a
    /// routing key on `chimera.<domain>.commands`.
    #[serde(default)]
    #[schemars(length(max = 100), inner(regex(pattern = EVENT_NAME_PATTERN), length(max = 255)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub commands: Vec<String>,

    /// Other domains whose commands this module's heads send (on `chimera.<domain>.commands`).
    /// With per-module broker users, these are the only commands exchanges its user may write.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = DNS_LABEL_PATTERN), length(max = 63)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub sends_commands_to: Vec<String>,

    /// Events this domain publishes and the events of other domains it subscribes to.
    #[serde(default)]
    pub events: EventsSpec,

    /// JSON Schemas (draft 2020-12) of message payloads, the envelope's `data`, by message
    /// type: of each command the worker accepts and each event the module publishes (what it
    /// guarantees), and of events it subscribes to (what it relies on in them). Workers
    /// dead-letter a payload that does not match; `chimera validate` reports a subscriber
    /// relying on a field its publisher no longer guarantees.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[schemars(schema_with = "super::schemas::crd_schema")]
    pub schemas: std::collections::BTreeMap<String, serde_json::Value>,

    /// The query head: REST reads over the domain's read model. Omit for a worker-only module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<QueryHeadSpec>,

    /// The worker head: consumes commands and subscribed events. Omit for a query-only module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<WorkerHeadSpec>,

    /// What happens to the module's RabbitMQ topology.
    #[serde(default)]
    pub topology: TopologySpec,
}

/// When the kubelet pulls the image.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImagePullPolicy {
    /// Pull on every start.
    Always,
    /// Pull only when the image is not on the node.
    IfNotPresent,
    /// Never pull.
    Never,
}

impl ImagePullPolicy {
    /// The value Kubernetes expects in `imagePullPolicy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// A key of a Secret in the module's namespace.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret (default `url`).
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_secret_key() -> String {
    "url".to_owned()
}

/// Where the domain's database URL comes from.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    /// Secret key holding the database URL (`sqlite://...`, `mysql://...`), injected into both
    /// heads as `CHIMERA_DATABASE_URL`.
    pub secret_ref: SecretKeyRef,
}

/// Where the module's broker URL comes from.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BrokerSpec {
    /// Secret key holding the AMQP URL (with vhost), injected as `CHIMERA_AMQP_URL`.
    pub secret_ref: SecretKeyRef,
}

/// The events a domain emits and consumes.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EventsSpec {
    /// Event names this domain publishes on `chimera.<domain>.events` (lowercase dotted, e.g.
    /// `order.placed`; no wildcards).
    #[serde(default)]
    #[schemars(length(max = 100), inner(regex(pattern = EVENT_NAME_PATTERN), length(max = 255)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub publishes: Vec<String>,

    /// Other domains' events the worker head consumes.
    #[serde(default)]
    pub subscribes: Vec<Subscription>,
}

/// A subscription to events of another domain.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Subscription {
    /// The publishing domain.
    #[schemars(regex(pattern = DNS_LABEL_PATTERN), length(max = 63))]
    pub from: String,
    /// Event names or AMQP topic patterns (`*` matches one segment, `#` zero or more), e.g.
    /// `user.registered`, `user.*`, `#`.
    #[schemars(length(min = 1), inner(regex(pattern = EVENT_PATTERN_PATTERN), length(max = 255)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub events: Vec<String>,
}

/// Replica bounds of the query head (it always serves, so at least one replica).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("self.min <= self.max").message("replicas.min must be less than or equal to replicas.max"))]
pub struct QueryReplicas {
    /// Fewest replicas (at least 1).
    #[schemars(range(min = 1, max = 1000))]
    pub min: i32,
    /// Most replicas.
    #[schemars(range(min = 1, max = 1000))]
    pub max: i32,
}

impl Default for QueryReplicas {
    fn default() -> Self {
        Self { min: 1, max: 10 }
    }
}

/// Replica bounds of the worker head (0 lets it scale to zero when idle).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("self.min <= self.max").message("replicas.min must be less than or equal to replicas.max"))]
pub struct WorkerReplicas {
    /// Fewest replicas (0 allows scale to zero).
    #[schemars(range(min = 0, max = 1000))]
    pub min: i32,
    /// Most replicas (at least 1).
    #[schemars(range(min = 1, max = 1000))]
    pub max: i32,
}

impl Default for WorkerReplicas {
    fn default() -> Self {
        Self { min: 1, max: 10 }
    }
}

/// Probe overrides for a head; unset probes use the head contract's `/healthz` and `/readyz`.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HeadProbes {
    /// Liveness probe (default: HTTP GET /healthz on the head's port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<Probe>,
    /// Readiness probe (default: HTTP GET /readyz on the head's port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<Probe>,
    /// Startup probe (none by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup: Option<Probe>,
}

/// The query head.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct QueryHeadSpec {
    /// Arguments to the image's entrypoint (default `["query"]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Port the head serves HTTP on (REST, /healthz, /readyz, /metrics).
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Replica bounds for the autoscaler.
    #[serde(default)]
    pub replicas: QueryReplicas,
    /// Latency target the autoscaler holds.
    #[serde(default)]
    pub autoscale: QueryAutoscale,
    /// Compute resources of the head's container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Probe overrides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<HeadProbes>,
    /// Seconds a stopping pod gets to finish in-flight requests (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub termination_grace_period_seconds: Option<i64>,
}

fn default_port() -> i32 {
    8080
}

/// How the query head is autoscaled.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct QueryAutoscale {
    /// The request-latency percentile to hold under a target.
    #[serde(default)]
    pub latency: LatencyTarget,
}

/// A latency percentile target, e.g. p95 <= 150 ms.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LatencyTarget {
    /// Percentile of request duration (50 to 99.9).
    #[serde(default = "default_percentile")]
    #[schemars(range(min = 50.0, max = 99.9))]
    pub percentile: f64,
    /// Target for that percentile, in milliseconds.
    #[serde(default = "default_target_ms")]
    #[schemars(range(min = 1, max = 600000))]
    pub target_ms: i64,
}

impl Default for LatencyTarget {
    fn default() -> Self {
        Self {
            percentile: default_percentile(),
            target_ms: default_target_ms(),
        }
    }
}

fn default_percentile() -> f64 {
    95.0
}

fn default_target_ms() -> i64 {
    150
}

/// The worker head.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerHeadSpec {
    /// Arguments to the image's entrypoint (default `["worker"]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Port the worker serves /healthz, /readyz and /metrics on.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Unacknowledged messages a worker replica holds at once (AMQP prefetch).
    #[serde(default = "default_prefetch")]
    #[schemars(range(min = 1, max = 65535))]
    pub prefetch: i32,
    /// Replica bounds for the autoscaler.
    #[serde(default)]
    pub replicas: WorkerReplicas,
    /// Queue-depth target the autoscaler holds.
    #[serde(default)]
    pub autoscale: WorkerAutoscale,
    /// Retries of a failed message before it is parked in the dead-letter queue.
    #[serde(default)]
    pub retry: RetrySpec,
    /// The worker queue.
    #[serde(default)]
    pub queue: QueueSpec,
    /// Seconds a stopping worker gets to finish in-flight messages; cover the slowest handler.
    #[serde(default = "default_worker_grace")]
    #[schemars(range(min = 0, max = 3600))]
    pub termination_grace_period_seconds: i64,
    /// Compute resources of the head's container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Probe overrides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<HeadProbes>,
}

fn default_prefetch() -> i32 {
    100
}

fn default_worker_grace() -> i64 {
    60
}

/// How the worker head is autoscaled.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerAutoscale {
    /// Seconds within which the backlog should be drained while keeping up with arrivals.
    #[serde(default = "default_drain_seconds")]
    #[schemars(range(min = 1, max = 86400))]
    pub drain_seconds: i64,
}

impl Default for WorkerAutoscale {
    fn default() -> Self {
        Self {
            drain_seconds: default_drain_seconds(),
        }
    }
}

fn default_drain_seconds() -> i64 {
    30
}

/// Retry schedule of the worker head.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    /// Delay before each retry, in seconds; one retry queue per entry. A message is attempted
    /// `len + 1` times, then parked in `chimera.<domain>.worker.dlq`. Empty: no retries.
    #[serde(default = "default_retry_delays")]
    #[schemars(length(max = 20), inner(range(min = 1, max = 86400)))]
    pub delays_seconds: Vec<i64>,
}

impl Default for RetrySpec {
    fn default() -> Self {
        Self {
            delays_seconds: default_retry_delays(),
        }
    }
}

fn default_retry_delays() -> Vec<i64> {
    vec![1, 10, 60]
}

/// The worker queue's type and limits.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct QueueSpec {
    /// Queue type. Quorum queues are replicated and durable; the type of an existing queue can
    /// never change in place (see `chimera topology migrate`).
    #[serde(default, rename = "type")]
    pub queue_type: QueueType,
    /// Most messages the queue holds (unbounded when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_length: Option<i64>,
    /// What happens to a publish when the queue is full.
    #[serde(default)]
    pub overflow: QueueOverflow,
}

/// RabbitMQ queue type.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated Raft queue (default).
    #[default]
    Quorum,
    /// Classic queue.
    Classic,
}

/// Overflow behaviour of a bounded queue.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QueueOverflow {
    /// Refuse new messages (publishers get a nack): nothing is lost silently.
    #[default]
    #[serde(rename = "reject-publish")]
    RejectPublish,
    /// Drop the oldest message.
    #[serde(rename = "drop-head")]
    DropHead,
}

/// The module's RabbitMQ topology.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TopologySpec {
    /// What happens to the module's queues when the module is deleted.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// Fate of a deleted module's queues.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeletionPolicy {
    /// Keep the queues and their messages (default).
    #[default]
    Retain,
    /// Delete the queues once nothing is left unread.
    Delete,
}

impl ChimeraModule {
    /// The module's domain: `spec.domain`, or metadata.name when unset.
    pub fn domain(&self) -> &str {
        match &self.spec.domain {
            Some(domain) => domain,
            None => self.metadata.name.as_deref().unwrap_or_default(),
        }
    }
}
