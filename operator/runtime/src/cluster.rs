//! What the controller and the autoscaler share, so that neither imports the other: the
//! operator's context (client, Event recorder, settings, broker), the field managers, the
//! Event helper, and the broker a module declares on. `crate::operator` wires them together.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};

use chimera_core::api::ChimeraModule;
use chimera_core::status::Verdict;
use chimera_core::topology::state::BrokerEndpoint;
use chimera_core::workloads::WorkloadSettings;

/// Sets a Deployment's `spec.replicas` as [`REPLICAS_MANAGER`], the one owner of that field
/// (the reconciler holding bounds and the autoscaler share it, so they never fight). With
/// `resource_version`, only if the Deployment is still that version (409 Conflict otherwise):
/// a write decided on what was read then, delivered late, cannot undo a newer one.
pub async fn set_replicas(
    api: &Api<k8s_openapi::api::apps::v1::Deployment>,
    name: &str,
    replicas: i64,
    resource_version: Option<&str>,
) -> Result<k8s_openapi::api::apps::v1::Deployment, kube::Error> {
    let mut patch = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": replicas}
    });
    if let Some(version) = resource_version {
        patch["metadata"]["resourceVersion"] = version.into();
    }
    api.patch(
        name,
        &kube::api::PatchParams::apply(REPLICAS_MANAGER).force(),
        &kube::api::Patch::Apply(&patch),
    )
    .await
}

/// Where the operator looks for modules.
#[derive(Clone, Debug, Default)]
pub enum Scope {
    /// Every namespace (the default; needs cluster-wide RBAC).
    #[default]
    Cluster,
    /// One namespace only.
    Namespace(String),
}

impl Scope {
    /// An API of kind `K` in this scope.
    pub fn api<K>(&self, client: Client) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match self {
            Scope::Cluster => Api::all(client),
            Scope::Namespace(ns) => Api::namespaced(client, ns),
        }
    }
}

/// Field manager of the objects' templates (everything but `spec.replicas`).
pub const FIELD_MANAGER: &str = "chimera-operator";
/// Field manager of each Deployment's `spec.replicas`: the one owner the autoscaler shares.
pub const REPLICAS_MANAGER: &str = "chimera-operator/replicas";
/// Field manager of the ChimeraModule status.
pub const STATUS_MANAGER: &str = "chimera-operator/status";

/// What every reconcile needs.
pub struct Context {
    /// API server client.
    pub client: Client,
    /// Publishes Kubernetes Events on modules.
    pub recorder: Recorder,
    /// Builder settings.
    pub settings: WorkloadSettings,
    /// Consecutive failed reconciles per module (namespace/name), for retry backoff.
    pub failures: Mutex<HashMap<String, u32>>,
    /// The operator's broker; None disables topology management.
    pub broker: Option<BrokerEndpoint>,
    /// How often a module's topology is re-checked for drift when nothing else happens.
    pub topology_resync: Duration,
    /// What exists, as watched.
    pub caches: crate::caches::Caches,
    /// Who depends on whom among the modules, for requeues and for planning.
    pub neighbours: std::sync::Arc<Mutex<chimera_core::topology::neighbours::Neighbours>>,
    /// Each module's last declared topology, by `namespace/name`.
    pub declared: Mutex<HashMap<String, crate::controller::topology::Declared>>,
    /// Each vhost's shared snapshot.
    pub snapshots: crate::topology::snapshots::Snapshots,
    /// A kept AMQP connection per broker, for declares.
    pub connections: crate::topology::amqp::Connections,
    /// Each module's own broker user, as last made.
    pub access: crate::access::Access,
    /// Whether this replica may write (leader election; always, without one).
    pub leadership: crate::leader::Leadership,
    /// The controller's metrics.
    pub metrics: crate::controller::metrics::ControllerMetrics,
}

impl Context {
    fn key(module: &ChimeraModule) -> String {
        format!(
            "{}/{}",
            module.namespace().unwrap_or_default(),
            module.name_any()
        )
    }

    /// Counts a failed reconcile of `module`; returns how many failed in a row.
    pub fn record_failure(&self, module: &ChimeraModule) -> u32 {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(Self::key(module)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    /// Forgets the failures of `module` after a reconcile that worked.
    pub fn record_success(&self, module: &ChimeraModule) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&Self::key(module));
    }
}

/// The API server refuses Event notes over 1 kB; keep the start, which says what happened.
fn truncate_note(mut note: String) -> String {
    const MAX: usize = 1024;
    if note.len() > MAX {
        let mut cut = MAX - 3;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push_str("...");
    }
    note
}

/// Publishes an Event on the module; a failure to publish is logged, never fatal.
pub(crate) async fn publish(
    recorder: &Recorder,
    module: &ChimeraModule,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        note: Some(truncate_note(note)),
        type_,
        reason: reason.to_owned(),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, &module.object_ref(&())).await {
        tracing::warn!(%error, reason, "could not publish an Event");
    }
}

/// The broker a module declares on: its own (`spec.broker.secretRef`, with an optional
/// `managementUrl` key in the same Secret) or the operator's.
pub(crate) async fn endpoint_for(
    module: &ChimeraModule,
    ctx: &Context,
) -> Result<BrokerEndpoint, Verdict> {
    let Some(broker) = &module.spec.broker else {
        return ctx.broker.clone().ok_or_else(|| {
            Verdict::new(
                false,
                "NoBroker",
                "the operator runs without a broker".to_owned(),
            )
        });
    };
    let namespace = module.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let unreadable = |why: String| {
        Verdict::new(
            false,
            "BrokerSecretUnreadable",
            format!(
                "Secret {}/{}: {why}",
                broker.secret_ref.name, broker.secret_ref.key
            ),
        )
    };
    let secret = secrets
        .get(&broker.secret_ref.name)
        .await
        .map_err(|e| unreadable(e.to_string()))?;
    let value = |key: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|v| String::from_utf8_lossy(&v.0).trim().to_owned())
    };
    let url = value(&broker.secret_ref.key).ok_or_else(|| unreadable("no such key".to_owned()))?;
    BrokerEndpoint::new(&url, value("managementUrl").as_deref())
        .map_err(|e| unreadable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::truncate_note;

    #[test]
    fn notes_fit_the_api_servers_limit() {
        assert_eq!(truncate_note("short".into()), "short");
        let long = "é".repeat(800);
        let cut = truncate_note(long);
        assert!(cut.len() <= 1024 && cut.ends_with("..."));
    }
}
