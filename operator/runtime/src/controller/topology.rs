//! The topology step of a reconcile: plan the module's namespace, declare this module's part on
//! its broker, and say how it went as the `TopologyReady` verdict. On deletion, release the
//! module's queues according to its deletion policy.

use std::hash::{Hash, Hasher};
use std::time::Instant;

use kube::ResourceExt;

use crate::Error;
use crate::caches;
use crate::cluster::{Context, endpoint_for};
use crate::topology::declare::{self, ReleaseError};
use chimera_core::api::{ChimeraModule, DeletionPolicy};
use chimera_core::status::Verdict;
use chimera_core::topology::plan::{self, TopologyPlan, module_key};
use chimera_core::topology::report::ReleaseReport;
use chimera_core::topology::state::BrokerEndpoint;
use chimera_core::topology::verdict::topology_verdict;

/// Finalizer that holds a module until its topology is released.
pub const FINALIZER: &str = "chimera.dev/topology";
/// Annotation (`"true"`) that lets `deletionPolicy: Delete` remove queues that still hold
/// messages.
pub const FORCE_DELETE_ANNOTATION: &str = "chimera.dev/force-delete";

/// The module's part of the plan, from the cached modules its plan reads (its neighbours):
/// neither a LIST nor the whole namespace per reconcile.
fn owned_plan(module: &ChimeraModule, ctx: &Context) -> Result<TopologyPlan, Error> {
    let namespace = module.namespace().ok_or(Error::NotNamespaced)?;
    let set = ctx
        .neighbours
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .planning_set(module);
    // A module being deleted no longer counts as a publisher for the others; this one is
    // planned as it is now.
    let mut modules: Vec<ChimeraModule> = set
        .iter()
        .filter(|(_, name)| Some(name) != module.metadata.name.as_ref())
        .filter_map(|(ns, name)| caches::get(&ctx.caches.modules, ns, name))
        .filter(|m| {
            m.metadata.deletion_timestamp.is_none()
                && m.namespace().as_deref() == Some(namespace.as_str())
        })
        .map(|m| (*m).clone())
        .collect();
    modules.push(module.clone());
    Ok(plan::plan(&modules).for_domain(module.domain(), &module_key(module)))
}

/// What a module's topology was last declared from, and how that went.
pub struct Declared {
    /// Hash of the owned plan and the endpoint it went to.
    fingerprint: u64,
    /// When the broker was last compared with it.
    checked: Instant,
    /// The verdict then.
    verdict: Verdict,
}

fn fingerprint(plan: &TopologyPlan, endpoint: &BrokerEndpoint) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(plan)
        .unwrap_or_default()
        .hash(&mut hasher);
    endpoint.amqp_url.hash(&mut hasher);
    endpoint.management_url.hash(&mut hasher);
    hasher.finish()
}

/// Declares the module's topology. Returns the verdict, and the broker error (if any) so the
/// caller retries with backoff after writing the status.
///
/// Incremental: a module whose part of the plan (and broker) is what it was last declared
/// from, and whose broker was compared with it less than most of a resync period ago, costs
/// the broker nothing. Otherwise its part is compared with the vhost's shared snapshot (one
/// read per vhost and half period), and only what differs is declared.
pub async fn declare(
    module: &ChimeraModule,
    ctx: &Context,
) -> Result<(Verdict, Option<Error>), Error> {
    let owned = owned_plan(module, ctx)?;
    let endpoint = match endpoint_for(module, ctx).await {
        Ok(e) => e,
        Err(verdict) => {
            let retry = Error::Topology(Box::new(verdict.clone()));
            return Ok((verdict, Some(retry)));
        }
    };
    let key = module_key(module);
    let print = fingerprint(&owned, &endpoint);
    let fresh = ctx.topology_resync.mul_f64(0.7);
    // (declared before from this very plan: whatever must be made again had drifted)
    let same_plan = {
        let declared = ctx.declared.lock().unwrap_or_else(|p| p.into_inner());
        match declared.get(&key) {
            Some(d) if d.fingerprint == print && d.checked.elapsed() < fresh => {
                return Ok((d.verdict.clone(), None));
            }
            Some(d) => d.fingerprint == print,
            None => false,
        }
    };
    let max_age = ctx.topology_resync / 2;
    let applied =
        declare::apply_cached(&endpoint, &owned, &ctx.snapshots, &ctx.connections, max_age).await;
    if let Ok(report) = &applied {
        let remade = report.exchanges_declared + report.queues_declared + report.bindings_created;
        // Counted and logged, not an Event: a repair of the broker costs the API server
        // nothing (operator/tests/at_rest.rs holds it to that).
        if same_plan && remade > 0 {
            ctx.metrics.drift_repairs.inc();
            tracing::info!(module = %key, ?report, "repaired drifted topology");
        }
    }
    let mut declared = ctx.declared.lock().unwrap_or_else(|p| p.into_inner());
    match applied {
        Ok(report) => {
            let verdict = topology_verdict(&owned.findings, Ok(&report));
            declared.insert(
                key,
                Declared {
                    fingerprint: print,
                    checked: Instant::now(),
                    verdict: verdict.clone(),
                },
            );
            Ok((verdict, None))
        }
        Err(error) => {
            declared.remove(&key);
            let verdict = topology_verdict(&owned.findings, Err(&error.failure()));
            Ok((verdict, Some(Error::Broker(error))))
        }
    }
}

/// Releases a deleted module's topology per its deletion policy.
pub async fn release(module: &ChimeraModule, ctx: &Context) -> Result<ReleaseReport, Error> {
    let owned = owned_plan(module, ctx)?;
    let delete = module.spec.topology.deletion_policy == DeletionPolicy::Delete;
    let endpoint = match endpoint_for(module, ctx).await {
        Ok(e) => e,
        // Retain keeps everything anyway: a broker Secret already gone (a namespace being
        // deleted removes it alongside) must not hold the module, and its namespace, forever.
        Err(verdict) if !delete => {
            return Ok(ReleaseReport {
                left_in_place: Some(verdict.message),
                ..ReleaseReport::default()
            });
        }
        Err(verdict) => return Err(Error::Topology(Box::new(verdict))),
    };
    let force = module
        .annotations()
        .get(FORCE_DELETE_ANNOTATION)
        .map(String::as_str)
        == Some("true");
    ctx.declared
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&module_key(module));
    let state = ctx
        .snapshots
        .view(&endpoint, &owned, ctx.topology_resync / 2)
        .await
        .map_err(Error::Broker)?;
    let released =
        declare::release(&endpoint, &state, &owned, module.domain(), delete, force).await;
    if let Ok(report) = &released {
        let queues: Vec<String> = owned.queues.iter().map(|q| q.name.clone()).collect();
        let own = chimera_contract::names::own_exchanges(module.domain());
        ctx.snapshots
            .released(&endpoint, &queues, &report.queues_deleted, &own)
            .await;
    }
    released.map_err(|e| match e {
        ReleaseError::Broker(b) => Error::Broker(b),
        unread @ ReleaseError::Unread(_) => Error::DeletionBlocked(unread),
    })
}
