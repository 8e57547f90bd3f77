//! Where the scaling loop's decisions go, behind a trait like its sources, so the loop has unit
//! tests with fakes: a Deployment's `spec.replicas`, the module's `status.autoscaling`, Events,
//! and the broker a module's worker queue lives on.

use std::sync::Arc;

use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::AUTOSCALER_MANAGER;
use crate::cluster::{Context, endpoint_for, publish, set_replicas};
use chimera_core::api::{AutoscalingStatus, ChimeraModule};
use chimera_core::topology::state::BrokerEndpoint;

/// Writes what the autoscaler decided.
pub trait ReplicaWriter: Send + Sync {
    /// Sets `spec.replicas` of Deployment `name` in `namespace`, as the field's one owner,
    /// if it is still at `resource_version` (the version the decision read).
    fn scale<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        replicas: u32,
        resource_version: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), kube::Error>>;

    /// Writes the module's `status.autoscaling`.
    fn status<'a>(
        &'a self,
        module: &'a ChimeraModule,
        status: &'a AutoscalingStatus,
    ) -> BoxFuture<'a, Result<(), kube::Error>>;

    /// Publishes a Normal Event on the module (a failure is logged, never fatal).
    fn event<'a>(
        &'a self,
        module: &'a ChimeraModule,
        reason: &'static str,
        note: String,
    ) -> BoxFuture<'a, ()>;

    /// The broker the module's worker queue is on (its own, or the operator's).
    fn endpoint<'a>(
        &'a self,
        module: &'a ChimeraModule,
    ) -> BoxFuture<'a, Result<BrokerEndpoint, String>>;
}

/// The API server, through the operator's context.
pub struct KubeWriter {
    ctx: Arc<Context>,
}

impl KubeWriter {
    /// A writer with the operator's client and Event recorder.
    pub fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }
}

impl ReplicaWriter for KubeWriter {
    fn scale<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        replicas: u32,
        resource_version: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), kube::Error>> {
        Box::pin(async move {
            let api: Api<Deployment> = Api::namespaced(self.ctx.client.clone(), namespace);
            set_replicas(&api, name, i64::from(replicas), resource_version)
                .await
                .map(|_| ())
        })
    }

    fn status<'a>(
        &'a self,
        module: &'a ChimeraModule,
        status: &'a AutoscalingStatus,
    ) -> BoxFuture<'a, Result<(), kube::Error>> {
        Box::pin(async move {
            let namespace = module.namespace().unwrap_or_default();
            let api: Api<ChimeraModule> = Api::namespaced(self.ctx.client.clone(), &namespace);
            let patch = json!({
                "apiVersion": "chimera.dev/v1alpha1",
                "kind": "ChimeraModule",
                "status": {"autoscaling": status},
            });
            api.patch_status(
                &module.name_any(),
                &PatchParams::apply(AUTOSCALER_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map(|_| ())
        })
    }

    fn event<'a>(
        &'a self,
        module: &'a ChimeraModule,
        reason: &'static str,
        note: String,
    ) -> BoxFuture<'a, ()> {
        Box::pin(publish(
            &self.ctx.recorder,
            module,
            EventType::Normal,
            reason,
            note,
        ))
    }

    fn endpoint<'a>(
        &'a self,
        module: &'a ChimeraModule,
    ) -> BoxFuture<'a, Result<BrokerEndpoint, String>> {
        Box::pin(async move { endpoint_for(module, &self.ctx).await.map_err(|v| v.message) })
    }
}
