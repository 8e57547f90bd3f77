//! The observed state of a ChimeraModule, following the Kubernetes API conventions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What the operator last observed of a module.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ChimeraModuleStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The resolved domain (spec.domain or metadata.name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// `Ready`, `QueryAvailable`, `WorkerAvailable` (and `TopologyReady` once the topology
    /// manager runs), with reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The query head's replicas; absent when the module has no query head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<HeadStatus>,
    /// The worker head's replicas; absent when the module has no worker head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<HeadStatus>,
    /// The autoscaler's last decision per head (written by the autoscaler alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
}

/// The autoscaler's last decisions.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// The query head's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<ScalingDecision>,
    /// The worker head's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<ScalingDecision>,
}

/// One head's scaling decision: what the control law wanted, from what it measured, and why.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScalingDecision {
    /// Replicas the law wants.
    pub desired_replicas: i32,
    /// Replicas the Deployment had when it decided.
    pub current_replicas: i32,
    /// What it measured (queue depth and rates, or the latency percentile).
    pub signal: String,
    /// Why, with the numbers.
    pub reason: String,
    /// When it decided (RFC 3339).
    pub time: String,
    /// Whether the metrics were missing or stale (replicas are then held).
    #[serde(default)]
    pub metrics_stale: bool,
    /// Seconds a new pod takes to become Ready, as the law planned with: measured from the
    /// head's own pods (creation to Ready), or the operator's default until one was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_startup_seconds: Option<f64>,
    /// Pods `podStartupSeconds` was measured from (0: the operator's default).
    #[serde(default)]
    pub pod_startup_measured_pods: i32,
    /// Replicas beyond which the head's measured throughput stops growing (its replicas
    /// share something that saturates, e.g. one database), once the law has measured where;
    /// it orders no more than that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throughput_limit: Option<i32>,
}

/// Replica counts of one head, as its Deployment reports them.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HeadStatus {
    /// Replicas the head should run (the Deployment's spec.replicas).
    pub desired_replicas: i32,
    /// Pods that exist (starting or running).
    pub replicas: i32,
    /// Pods passing their readiness probe.
    pub ready_replicas: i32,
    /// `ready/desired`, for `kubectl get chm`.
    pub summary: String,
}

impl ChimeraModuleStatus {
    /// The condition of the given type, if present.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}
