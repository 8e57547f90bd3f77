//! The topology step of a reconcile: plan the module's namespace, declare this module's part on
//! its broker, and say how it went as the `TopologyReady` verdict. On deletion, release the
//! module's queues according to its deletion policy.

use kube::ResourceExt;

use crate::Error;
use crate::caches;
use crate::cluster::{Context, endpoint_for};
use crate::topology::declare::{self, ReleaseError};
use chimera_core::api::{ChimeraModule, DeletionPolicy};
use chimera_core::status::Verdict;
use chimera_core::topology::plan::{self, TopologyPlan, module_key};
use chimera_core::topology::report::ReleaseReport;
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

/// Declares the module's topology. Returns the verdict, and the broker error (if any) so the
/// caller retries with backoff after writing the status.
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
    match declare::apply(&endpoint, &owned).await {
        Ok(report) => Ok((topology_verdict(&owned.findings, Ok(&report)), None)),
        Err(error) => {
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
    declare::release(&endpoint, &owned, module.domain(), delete, force)
        .await
        .map_err(|e| match e {
            ReleaseError::Broker(b) => Error::Broker(b),
            unread @ ReleaseError::Unread(_) => Error::DeletionBlocked(unread),
        })
}
