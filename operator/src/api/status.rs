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
