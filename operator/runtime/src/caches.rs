//! The operator's caches: one watch per kind, read by the controller and the autoscaler alike,
//! so a reconcile reads what exists from memory instead of asking the API server. Stored
//! objects are slimmed: managed fields keep only who manages (the replicas owner check needs
//! that), not the field sets, which are most of an object's size.

use std::fmt::Debug;
use std::hash::Hash;

use futures::{Stream, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use crate::cluster::Scope;
use chimera_core::api::ChimeraModule;
use chimera_core::workloads::MANAGED_BY;

/// What the operator keeps in memory.
#[derive(Clone)]
pub struct Caches {
    /// Every ChimeraModule in scope.
    pub modules: Store<ChimeraModule>,
    /// The Deployments the operator manages.
    pub deployments: Store<Deployment>,
    /// The Services it manages.
    pub services: Store<Service>,
    /// The PodDisruptionBudgets it manages.
    pub pdbs: Store<PodDisruptionBudget>,
    /// The NetworkPolicies it manages.
    pub network_policies: Store<NetworkPolicy>,
}

/// A watch's events, as the reflector passes them on after updating its store.
pub type Events<K> =
    std::pin::Pin<Box<dyn Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send>>;

/// The streams that fill [`Caches`]; whoever drives them (the controller) keeps them current.
pub struct Watches {
    /// ChimeraModule events.
    pub modules: Events<ChimeraModule>,
    /// Deployment events.
    pub deployments: Events<Deployment>,
    /// Service events.
    pub services: Events<Service>,
    /// PodDisruptionBudget events.
    pub pdbs: Events<PodDisruptionBudget>,
    /// NetworkPolicy events.
    pub network_policies: Events<NetworkPolicy>,
}

/// Drops the field sets of managed fields, keeping the managers (and everything else).
fn slim<K: Resource>(object: &mut K) {
    if let Some(fields) = object.meta_mut().managed_fields.as_mut() {
        for entry in fields {
            entry.fields_v1 = None;
        }
    }
}

fn cached<K>(api: Api<K>, config: watcher::Config) -> (Store<K>, Events<K>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(api, config)
            .default_backoff()
            .map_ok(|event| event.modify(slim)),
    );
    (store, Box::pin(stream))
}

/// The caches of `scope` and the watches that fill them. Only objects labelled as ours are
/// watched: a cluster's other Deployments are none of the operator's business (and memory).
pub fn watch(client: &Client, scope: &Scope) -> (Caches, Watches) {
    let owned =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    let (modules, module_events) = cached(scope.api(client.clone()), watcher::Config::default());
    let (deployments, deployment_events) = cached(scope.api(client.clone()), owned.clone());
    let (services, service_events) = cached(scope.api(client.clone()), owned.clone());
    let (pdbs, pdb_events) = cached(scope.api(client.clone()), owned.clone());
    let (network_policies, network_policy_events) = cached(scope.api(client.clone()), owned);
    (
        Caches {
            modules,
            deployments,
            services,
            pdbs,
            network_policies,
        },
        Watches {
            modules: module_events,
            deployments: deployment_events,
            services: service_events,
            pdbs: pdb_events,
            network_policies: network_policy_events,
        },
    )
}

/// The cached object of kind `K` named `name` in `namespace`.
pub fn get<K>(store: &Store<K>, namespace: &str, name: &str) -> Option<std::sync::Arc<K>>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    store.get(&ObjectRef::new(name).within(namespace))
}

/// Whether every store has its first full list (before that, a missing object may exist).
pub async fn ready(caches: &Caches) -> bool {
    caches.modules.wait_until_ready().await.is_ok()
        && caches.deployments.wait_until_ready().await.is_ok()
        && caches.services.wait_until_ready().await.is_ok()
        && caches.pdbs.wait_until_ready().await.is_ok()
        && caches.network_policies.wait_until_ready().await.is_ok()
}
