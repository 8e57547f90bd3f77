//! The kube-runtime controller: glue between the ChimeraModule API, the pure builders and the
//! API server. Desired state comes from `chimera_core::{workloads, status}`; this module only
//! does I/O. `crate::operator` starts it beside the autoscaler.

pub mod metrics;
mod neighbours;
mod reconcile;
pub mod topology;

pub(crate) use reconcile::check_controller;
pub use reconcile::reconcile;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::EventType;
use tracing::warn;

use crate::Error;
use crate::caches::{Caches, Watches};
use crate::cluster::{Context, publish};
use chimera_core::api::ChimeraModule;

/// Longest wait between retries of a failing module.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);
/// Modules reconciled at once: a burst of a thousand queues here instead of at the API server.
pub const CONCURRENCY: u16 = 16;
/// Triggers of one module within this long make one reconcile (a new module's Deployments,
/// Service and PDB appearing one by one, their first status updates).
const DEBOUNCE: Duration = Duration::from_millis(500);

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

/// The controller of the cached modules, triggered by their changes, by changes of the
/// objects they own, and by the changes of neighbours that alter their plan.
pub fn new(caches: &Caches, watches: Watches, ctx: &Context) -> Controller<ChimeraModule> {
    let (modules, neighbours) = neighbours::triggers(watches.modules, Arc::clone(&ctx.neighbours));
    // Becoming the leader reconciles every module: as a follower it wrote nothing.
    let elected = futures::stream::unfold(ctx.leadership.subscribe(), |mut changes| async move {
        loop {
            changes.changed().await.ok()?;
            if *changes.borrow_and_update() {
                return Some(((), changes));
            }
        }
    });
    Controller::for_stream(modules, caches.modules.clone())
        .owns_stream(watches.deployments.touched_objects())
        .owns_stream(watches.services.touched_objects())
        .owns_stream(watches.pdbs.touched_objects())
        .owns_stream(watches.network_policies.touched_objects())
        .reconcile_on(neighbours)
        .reconcile_all_on(elected)
        .with_config(
            controller::Config::default()
                .concurrency(CONCURRENCY)
                .debounce(DEBOUNCE),
        )
}

/// One reconcile, counted and timed (a follower's, which writes nothing, is not counted).
async fn timed(module: Arc<ChimeraModule>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !ctx.leadership.is_leading() {
        return reconcile(module, ctx).await;
    }
    let started = std::time::Instant::now();
    let result = reconcile(module, Arc::clone(&ctx)).await;
    ctx.metrics.observe(&result, started.elapsed());
    result
}

/// Drives `controller` until SIGTERM/Ctrl-C.
pub async fn run(controller: Controller<ChimeraModule>, ctx: Arc<Context>) {
    controller
        .shutdown_on_signal()
        .run(timed, error_policy, ctx)
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
