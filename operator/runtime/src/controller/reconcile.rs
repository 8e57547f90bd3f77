//! One reconcile of one module: apply the desired objects, trim what left the spec, hold the
//! replicas within bounds, and write the status when it changed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, GetParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{debug, info, instrument};

use crate::Error;
use crate::caches;
use crate::cluster::{Context, FIELD_MANAGER, STATUS_MANAGER, publish, set_replicas};
use chimera_core::api::ChimeraModule;
use chimera_core::status::{self, ObservedHeads};
use chimera_core::workloads::{self, Head, MODULE_LABEL, drift};

/// How often a module is reconciled when nothing changes (drift repair).
const RESYNC: Duration = Duration::from_secs(300);

/// Makes the object `desired` exist as built, reading what exists from `cache`: writes nothing
/// when the cached object already holds every field desired, applies otherwise. Never adopts or
/// overwrites an object of that name this module does not control. Returns the object as it
/// now is.
async fn ensure<K>(api: &Api<K>, cache: &Store<K>, desired: &K) -> Result<K, Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let name = desired.meta().name.clone().unwrap_or_default();
    let namespace = desired.meta().namespace.clone().unwrap_or_default();
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let existing = match caches::get(cache, &namespace, &name) {
        Some(cached) => Some((*cached).clone()),
        // Not among the objects labelled ours: one of that name may still exist (made by
        // someone else, or unlabelled by hand), and must not be taken over. Read from the API
        // server's watch cache (resourceVersion 0), not etcd: this is each object's first
        // apply, thousands at once when modules arrive together. The cache lags etcd by
        // moments; a read from etcd leaves the same kind of window before the apply anyway.
        None => match api.get_with(&name, &GetParams::any()).await {
            Ok(found) => Some(found),
            Err(kube::Error::Api(e)) if e.code == 404 => None,
            Err(cause) => {
                return Err(Error::Kube {
                    action: format!("read {kind} {name}"),
                    cause,
                });
            }
        },
    };
    if let Some(existing) = existing {
        check_controller(desired, &existing, &kind, &name)?;
        let want = serde_json::to_value(desired).map_err(Error::Serialize)?;
        let have = serde_json::to_value(&existing).map_err(Error::Serialize)?;
        match drift::first_difference(&want, &have) {
            None => return Ok(existing),
            Some(field) => debug!(%kind, %name, %field, "applying: the live object differs"),
        }
    }
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(desired),
    )
    .await
    .map_err(|cause| Error::Apply { kind, name, cause })
}

/// Fails unless `existing` has the controller `desired` names.
pub(crate) fn check_controller<K: Resource>(
    desired: &K,
    existing: &K,
    kind: &str,
    name: &str,
) -> Result<(), Error> {
    let controller = |o: &K| {
        o.meta()
            .owner_references
            .iter()
            .flatten()
            .find(|r| r.controller == Some(true))
            .cloned()
    };
    let (ours, theirs) = (controller(desired), controller(existing));
    if ours.as_ref().map(|o| &o.uid) == theirs.as_ref().map(|o| &o.uid) {
        return Ok(());
    }
    let owner = theirs
        .map(|o| format!("{} {}", o.kind, o.name))
        .unwrap_or_else(|| "nobody".to_owned());
    Err(Error::NameTaken {
        kind: kind.to_owned(),
        name: name.to_owned(),
        owner,
    })
}

/// Deletes the module's cached objects of one kind whose names are not in `keep`.
async fn delete_orphans<K>(
    api: &Api<K>,
    cache: &Store<K>,
    module: &ChimeraModule,
    keep: &BTreeSet<String>,
) -> Result<Vec<String>, Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let (namespace, name) = (module.namespace(), module.name_any());
    let orphans: Vec<String> = cache
        .state()
        .iter()
        .filter(|o| o.meta().namespace == namespace)
        .filter(|o| o.meta().labels.as_ref().and_then(|l| l.get(MODULE_LABEL)) == Some(&name))
        .filter_map(|o| o.meta().name.clone())
        .filter(|n| !keep.contains(n))
        .collect();
    let mut deleted = Vec::new();
    for object in orphans {
        match api.delete(&object, &DeleteParams::background()).await {
            Ok(_) => deleted.push(format!("{kind}/{object}")),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(cause) => {
                return Err(Error::Kube {
                    action: format!("delete {kind} {object}"),
                    cause,
                });
            }
        }
    }
    Ok(deleted)
}

fn names<K: Resource>(objects: &[K]) -> BTreeSet<String> {
    objects
        .iter()
        .filter_map(|o| o.meta().name.clone())
        .collect()
}

/// Holds a head's replicas within its bounds, as the single owner of `spec.replicas`: writes
/// only a count outside them (or none at all). A count within bounds is left to whoever set it
/// (the autoscaler, or the API server's default on creation): re-owning it would be a write per
/// Deployment that changes nothing.
async fn hold_replicas(
    api: &Api<Deployment>,
    deployment: Deployment,
    (min, max): (i32, i32),
) -> Result<Deployment, Error> {
    let current = deployment.spec.as_ref().and_then(|s| s.replicas);
    let wanted = workloads::initial_replicas(current, min, max);
    if current == Some(wanted) {
        return Ok(deployment);
    }
    let name = deployment.name_any();
    set_replicas(api, &name, i64::from(wanted), None)
        .await
        .map_err(|cause| Error::Apply {
            kind: "Deployment".into(),
            name,
            cause,
        })
}

fn now() -> Time {
    // Whole seconds: the API server stores condition times at that precision, so the next
    // reconcile compares equal and writes nothing.
    let now = Timestamp::now();
    Time(Timestamp::from_second(now.as_second()).unwrap_or(now))
}

/// Reconciles one ChimeraModule. With a broker, a finalizer holds a deleted module until its
/// topology is released; the heads always go through owner references.
#[instrument(skip_all, fields(module = %module.name_any(), namespace = module.namespace().unwrap_or_default()))]
pub async fn reconcile(module: Arc<ChimeraModule>, ctx: Arc<Context>) -> Result<Action, Error> {
    // A follower keeps its caches and its neighbour index warm and writes nothing; it
    // reconciles every module when it becomes the leader.
    if !ctx.leadership.is_leading() {
        return Ok(Action::await_change());
    }
    if ctx.broker.is_none() {
        if module.metadata.deletion_timestamp.is_some() {
            ctx.record_success(&module);
            return Ok(Action::await_change());
        }
        return apply_module(module, ctx).await;
    }
    let namespace = module.namespace().ok_or(Error::NotNamespaced)?;
    let modules: Api<ChimeraModule> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(
        &modules,
        super::topology::FINALIZER,
        module,
        |event| async {
            match event {
                FinalizerEvent::Apply(m) => apply_module(m, ctx.clone()).await,
                FinalizerEvent::Cleanup(m) => cleanup_module(m, ctx.clone()).await,
            }
        },
    )
    .await
    .or_else(|e| match e {
        // Gone already: a second cleanup raced the first one's removal (the cache lags a
        // moment behind a deletion). Nothing is left to do.
        kube::runtime::finalizer::Error::RemoveFinalizer(kube::Error::Api(s)) if s.code == 404 => {
            Ok(Action::await_change())
        }
        e => Err(Error::Finalizer(Box::new(e))),
    })
}

/// Releases a deleted module's topology (its heads go with the owner references).
async fn cleanup_module(module: Arc<ChimeraModule>, ctx: Arc<Context>) -> Result<Action, Error> {
    let released = match super::topology::release(&module, &ctx).await {
        // The user goes last: a module whose queues are held keeps its credentials too.
        Ok(report) => crate::access::remove(&module, &ctx).await.map(|()| report),
        Err(error) => Err(error),
    };
    match released {
        Ok(report) => {
            info!(?report, "released the module's topology");
            if let Some(why) = &report.left_in_place {
                let note = format!("queues and bindings left as they are: {why}");
                publish(
                    &ctx.recorder,
                    &module,
                    EventType::Warning,
                    "TopologyLeftInPlace",
                    note,
                )
                .await;
            }
            ctx.record_success(&module);
            Ok(Action::await_change())
        }
        Err(error) => {
            if let Error::DeletionBlocked(reason) = &error {
                let reason = reason.to_string();
                publish(
                    &ctx.recorder,
                    &module,
                    EventType::Warning,
                    "DeletionBlocked",
                    reason,
                )
                .await;
            }
            Err(error)
        }
    }
}

/// Applies a live module: heads, topology, status.
async fn apply_module(module: Arc<ChimeraModule>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = module.namespace().ok_or(Error::NotNamespaced)?;
    let desired = workloads::desired_workloads(&module, &ctx.settings)?;
    // Until every cache holds its first list, a missing object may exist: wait rather than
    // read each one from the API server.
    caches::ready(&ctx.caches).await;

    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), &namespace);
    let policies: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), &namespace);

    // The broker Secret before the heads that read it; a broker failure is reported with the
    // topology, after the heads are applied.
    let access_failure = crate::access::ensure(&module, &ctx).await?;

    let caches = &ctx.caches;
    let mut observed = ObservedHeads::default();
    for deployment in &desired.deployments {
        let current = ensure(&deployments, &caches.deployments, deployment).await?;
        let (head, bounds) = head_bounds(&module, &current)?;
        let held = hold_replicas(&deployments, current, bounds).await?;
        match head {
            Head::Query => observed.query = Some(held),
            Head::Worker => observed.worker = Some(held),
        }
    }
    for service in &desired.services {
        ensure(&services, &caches.services, service).await?;
    }
    for pdb in &desired.pod_disruption_budgets {
        ensure(&pdbs, &caches.pdbs, pdb).await?;
    }
    for policy in &desired.network_policies {
        ensure(&policies, &caches.network_policies, policy).await?;
    }

    let mut removed = delete_orphans(
        &deployments,
        &caches.deployments,
        &module,
        &names(&desired.deployments),
    )
    .await?;
    removed.extend(
        delete_orphans(
            &services,
            &caches.services,
            &module,
            &names(&desired.services),
        )
        .await?,
    );
    removed.extend(
        delete_orphans(
            &pdbs,
            &caches.pdbs,
            &module,
            &names(&desired.pod_disruption_budgets),
        )
        .await?,
    );
    removed.extend(
        delete_orphans(
            &policies,
            &caches.network_policies,
            &module,
            &names(&desired.network_policies),
        )
        .await?,
    );
    for object in &removed {
        info!(%object, "removed an object whose head left the spec");
        publish(
            &ctx.recorder,
            &module,
            EventType::Normal,
            "HeadRemoved",
            format!("deleted {object}: its head is no longer in the spec"),
        )
        .await;
    }

    let (topology, topology_error) = match &ctx.broker {
        Some(_) => {
            let (verdict, error) = super::topology::declare(&module, &ctx).await?;
            match access_failure {
                // The topology's own failure says more; the user is tried again with it.
                Some((access, access_error)) if verdict.status => {
                    (Some(access), Some(access_error))
                }
                _ => (Some(verdict), error),
            }
        }
        None => (None, None),
    };
    let next = status::desired_status(
        &module,
        &observed,
        topology.as_ref(),
        module.status.as_ref(),
        &now(),
    );
    if module.status.as_ref() != Some(&next) {
        write_status(&ctx.client, &module, &next).await?;
        for t in status::transitions(module.status.as_ref(), &next) {
            let kind = if t.is_degradation() {
                EventType::Warning
            } else {
                EventType::Normal
            };
            publish(
                &ctx.recorder,
                &module,
                kind,
                &t.reason,
                format!("{} is {}: {}", t.type_, t.status, t.message),
            )
            .await;
        }
    }
    if let Some(error) = topology_error {
        return Err(error);
    }
    ctx.record_success(&module);
    // With a broker, resync often: drift on the broker (a queue deleted by hand) makes no
    // Kubernetes event. Spread, so that modules created together are not checked together.
    let period = if ctx.broker.is_some() {
        ctx.topology_resync
    } else {
        RESYNC
    };
    Ok(Action::requeue(spread(
        period,
        &module.uid().unwrap_or_default(),
    )))
}

/// `period` scaled by a factor in [0.75, 1.25) that differs per module and per call.
fn spread(period: Duration, seed: &str) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    seed.hash(&mut hasher);
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default()
        .hash(&mut hasher);
    #[allow(clippy::cast_precision_loss)]
    let unit = (hasher.finish() % 1_000_000) as f64 / 1_000_000.0;
    period.mul_f64(0.75 + 0.5 * unit)
}

/// Writes Ready=False (reason ReconcileFailed) on the module; logs, never fails.
pub(super) async fn report_failure(ctx: &Context, module: &ChimeraModule, error: &str) {
    let next = status::failed_status(module, module.status.as_ref(), error, &now());
    if module.status.as_ref() == Some(&next) {
        return;
    }
    if let Err(error) = write_status(&ctx.client, module, &next).await {
        tracing::warn!(%error, "could not report the failure in the module's status");
    }
}

async fn write_status(
    client: &Client,
    module: &ChimeraModule,
    status: &chimera_core::api::ChimeraModuleStatus,
) -> Result<(), Error> {
    let namespace = module.namespace().ok_or(Error::NotNamespaced)?;
    let modules: Api<ChimeraModule> = Api::namespaced(client.clone(), &namespace);
    // status.autoscaling belongs to the autoscaler's field manager: never sent from here, so
    // a status computed from an older read cannot overwrite a newer decision.
    let status = chimera_core::api::ChimeraModuleStatus {
        autoscaling: None,
        ..status.clone()
    };
    let patch = json!({
        "apiVersion": "chimera.dev/v1alpha1",
        "kind": "ChimeraModule",
        "status": status,
    });
    modules
        .patch_status(
            &module.name_any(),
            &PatchParams::apply(STATUS_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map(|_| ())
        .map_err(|cause| Error::Kube {
            action: "write status".into(),
            cause,
        })
}

/// Which head a Deployment runs, and that head's replica bounds.
fn head_bounds(
    module: &ChimeraModule,
    deployment: &Deployment,
) -> Result<(Head, (i32, i32)), Error> {
    let head = deployment
        .labels()
        .get("chimera.dev/head")
        .map(String::as_str);
    match (head, &module.spec.query, &module.spec.worker) {
        (Some("query"), Some(q), _) => Ok((Head::Query, (q.replicas.min, q.replicas.max))),
        (Some("worker"), _, Some(w)) => Ok((Head::Worker, (w.replicas.min, w.replicas.max))),
        _ => Err(Error::UnexpectedObject(deployment.name_any())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resyncs_spread_around_the_period() {
        let period = Duration::from_secs(40);
        let spreads: Vec<Duration> = (0..50)
            .map(|i| spread(period, &format!("uid-{i}")))
            .collect();
        assert!(
            spreads
                .iter()
                .all(|d| *d >= Duration::from_secs(30) && *d < Duration::from_secs(50))
        );
        let distinct: std::collections::BTreeSet<_> = spreads.iter().collect();
        assert!(distinct.len() > 40, "{distinct:?}");
    }
}
