//! The topology step of a reconcile: plan the module's namespace, declare this module's part on
//! its broker, and say how it went as the `TopologyReady` verdict. On deletion, release the
//! module's queues according to its deletion policy.

use k8s_openapi::api::core::v1::Secret;
use kube::api::ListParams;
use kube::{Api, ResourceExt};

use super::reconcile::Context;
use crate::Error;
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

/// The plan of every live module in the module's namespace, cut to what this module owns.
async fn owned_plan(module: &ChimeraModule, ctx: &Context) -> Result<TopologyPlan, Error> {
    let namespace = module.namespace().ok_or(Error::NotNamespaced)?;
    let modules: Api<ChimeraModule> = Api::namespaced(ctx.client.clone(), &namespace);
    let all = modules
        .list(&ListParams::default())
        .await
        .map_err(|cause| Error::Kube {
            action: "list the namespace's modules".into(),
            cause,
        })?;
    // A module being deleted no longer counts as a publisher for the others.
    let live: Vec<ChimeraModule> = all
        .items
        .into_iter()
        .filter(|m| m.metadata.deletion_timestamp.is_none() || m.uid() == module.uid())
        .collect();
    Ok(plan::plan(&live).for_domain(module.domain(), &module_key(module)))
}

/// Declares the module's topology. Returns the verdict, and the broker error (if any) so the
/// caller retries with backoff after writing the status.
pub async fn declare(
    module: &ChimeraModule,
    ctx: &Context,
) -> Result<(Verdict, Option<Error>), Error> {
    let owned = owned_plan(module, ctx).await?;
    let endpoint = match endpoint_for(module, ctx).await {
        Ok(e) => e,
        Err(verdict) => {
            let retry = Error::Topology(verdict.message.clone());
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
    let owned = owned_plan(module, ctx).await?;
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
        Err(verdict) => return Err(Error::Topology(verdict.message)),
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
            unread @ ReleaseError::Unread(_) => Error::DeletionBlocked(unread.to_string()),
        })
}
