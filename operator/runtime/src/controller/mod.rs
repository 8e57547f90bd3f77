//! The kube-runtime controller: glue between the ChimeraModule API, the pure builders and the
//! API server. Desired state comes from `chimera_core::{workloads, status}`; this module only
//! does I/O. `crate::operator` starts it beside the autoscaler.

mod reconcile;
pub mod topology;

pub use reconcile::reconcile;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use tracing::warn;

use crate::Error;
use crate::cluster::{Context, Scope, publish};
use chimera_core::api::ChimeraModule;

/// Longest wait between retries of a failing module.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// Delay before retry number `attempt` (from 1): the error's base delay doubled per
/// consecutive failure, capped, so a broken module does not hammer the API server.
pub fn retry_delay(base_seconds: u64, attempt: u32) -> Duration {
    let factor = 2u64.saturating_pow(attempt.saturating_sub(1).min(16));
    Duration::from_secs(base_seconds.saturating_mul(factor)).min(MAX_RETRY_DELAY)
}

fn error_policy(module: Arc<ChimeraModule>, error: &Error, ctx: Arc<Context>) -> Action {
    let attempt = ctx.record_failure(&module);
    let delay = retry_delay(error.retry_after_seconds(), attempt);
    warn!(
        module = module.metadata.name.as_deref().unwrap_or_default(),
        namespace = module.metadata.namespace.as_deref().unwrap_or_default(),
        category = error.metric_label(),
        %error,
        attempt,
        retry_in_s = delay.as_secs(),
        "reconcile failed; retrying"
    );
    // Make the failure visible on the module (`kubectl describe chm`), not only in our logs.
    // The recorder folds repeats of the same event into one series.
    let note = format!(
        "{error} (attempt {attempt}, retrying in {}s)",
        delay.as_secs()
    );
    let message = error.to_string();
    tokio::spawn(async move {
        publish(
            &ctx.recorder,
            &module,
            EventType::Warning,
            "ReconcileFailed",
            note,
        )
        .await;
        reconcile::report_failure(&ctx, &module, &message).await;
    });
    Action::requeue(delay)
}

/// The controller of `modules`, owning the Deployments, Services and PDBs that carry `owned`'s
/// labels. Its store is the module cache the autoscaler reads too.
pub fn new(
    modules: Api<ChimeraModule>,
    scope: &Scope,
    ctx: &Context,
    owned: watcher::Config,
) -> Controller<ChimeraModule> {
    // A module's findings depend on the other modules of its namespace (who publishes what):
    // any module change re-plans its neighbours.
    let controller = Controller::new(modules.clone(), watcher::Config::default());
    let store = controller.store();
    controller
        .watches(
            modules,
            watcher::Config::default(),
            move |changed: ChimeraModule| {
                let namespace = changed.metadata.namespace.clone();
                store
                    .state()
                    .into_iter()
                    .filter(|m| {
                        m.metadata.namespace == namespace
                            && m.metadata.name != changed.metadata.name
                    })
                    .map(|m| ObjectRef::from_obj(&*m))
                    .collect::<Vec<_>>()
            },
        )
        .owns(scope.api::<Deployment>(ctx.client.clone()), owned.clone())
        .owns(scope.api::<Service>(ctx.client.clone()), owned.clone())
        .owns(scope.api::<PodDisruptionBudget>(ctx.client.clone()), owned)
}

/// Drives `controller` until SIGTERM/Ctrl-C.
pub async fn run(controller: Controller<ChimeraModule>, ctx: Arc<Context>) {
    controller
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => {
                    tracing::debug!(module = %obj.name, namespace = ?obj.namespace, "reconciled")
                }
                Err(e) => tracing::debug!(error = %e, "reconcile loop error"),
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_up_to_a_cap() {
        assert_eq!(retry_delay(5, 1), Duration::from_secs(5));
        assert_eq!(retry_delay(5, 2), Duration::from_secs(10));
        assert_eq!(retry_delay(5, 4), Duration::from_secs(40));
        assert_eq!(retry_delay(5, 30), MAX_RETRY_DELAY);
        assert_eq!(retry_delay(60, u32::MAX), MAX_RETRY_DELAY);
    }
}
