//! The kube-runtime controller: glue between the ChimeraModule API, the pure builders and the
//! API server. Desired state comes from `workloads` and `status`; this module only does I/O.

mod reconcile;
pub mod topology;

pub(crate) use reconcile::publish;
pub use reconcile::{Context, FIELD_MANAGER, REPLICAS_MANAGER, STATUS_MANAGER, reconcile};

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::ListParams;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client};
use tracing::{info, warn};

use crate::Error;
use chimera_core::api::ChimeraModule;
use chimera_core::topology::state::BrokerEndpoint;
use chimera_core::workloads::WorkloadSettings;

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
    fn api<K>(&self, client: Client) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match self {
            Scope::Cluster => Api::all(client),
            Scope::Namespace(ns) => Api::namespaced(client, ns),
        }
    }
}

/// Operator settings from the command line.
#[derive(Clone, Debug, Default)]
pub struct OperatorConfig {
    /// Namespaces to watch.
    pub scope: Scope,
    /// Settings for the workload builders.
    pub workloads: WorkloadSettings,
    /// The broker modules declare their topology on (unless they name their own); None
    /// disables topology management.
    pub broker: Option<BrokerEndpoint>,
    /// Drift check period of the topology (default 30 s).
    pub topology_resync: Option<Duration>,
    /// The autoscaler's settings; None runs no autoscaler (replicas then stay where the
    /// reconciler holds them, within bounds).
    pub autoscale: Option<crate::scaler::ScalerSettings>,
    /// Where to serve `/metrics` and `/healthz`; None serves nothing.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

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
        reconcile::publish(
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

/// Starts the autoscaler next to the controller, on the controller's module store and a
/// reflector of the Deployments the operator owns; returns its metrics.
fn start_autoscaler(
    ctx: &Arc<Context>,
    scope: &Scope,
    modules: kube::runtime::reflector::Store<ChimeraModule>,
    owned: watcher::Config,
    settings: crate::scaler::ScalerSettings,
) -> Result<crate::scaler::metrics::AutoscalerMetrics, Error> {
    use kube::runtime::WatchStreamExt;
    use kube::runtime::reflector;
    let (deployments, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(scope.api::<Deployment>(ctx.client.clone()), owned),
    )
    .default_backoff();
    tokio::spawn(stream.for_each(|_| futures::future::ready(())));
    let pods = crate::scaler::sources::PodMetrics::new(ctx.client.clone())
        .map_err(|e| Error::Autoscaler(e.to_string()))?;
    let scaler = Arc::new(crate::scaler::Scaler::new(
        Arc::clone(ctx),
        Arc::new(crate::scaler::sources::RabbitMq::default()),
        Arc::new(pods),
        settings,
    ));
    let metrics = scaler.metrics.clone();
    tokio::spawn(scaler.run(modules, deployments));
    info!(
        interval_ms = settings.interval.as_millis(),
        "autoscaler started"
    );
    Ok(metrics)
}

/// Serves `/metrics` (the autoscaler's) and `/healthz` in the background.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    metrics: Option<crate::scaler::metrics::AutoscalerMetrics>,
) -> Result<(), Error> {
    use axum::{Router, routing::get};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Autoscaler(format!("cannot listen on {addr}: {e}")))?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(move || {
                let text = metrics.as_ref().map(|m| m.render()).unwrap_or_default();
                async move { text }
            }),
        );
    info!(%addr, "serving /metrics and /healthz");
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            warn!(%error, "the metrics server stopped");
        }
    });
    Ok(())
}

/// Fails with instructions when the ChimeraModule CRD is not installed.
async fn check_crd_installed(api: &Api<ChimeraModule>) -> Result<(), Error> {
    api.list(&ListParams::default().limit(1))
        .await
        .map(|_| ())
        .map_err(|cause| Error::CrdNotInstalled { cause })
}

/// Runs the controller until SIGTERM/Ctrl-C.
pub async fn run(client: Client, config: OperatorConfig) -> Result<(), Error> {
    let modules: Api<ChimeraModule> = config.scope.api(client.clone());
    check_crd_installed(&modules).await?;
    let reporter = Reporter {
        controller: "chimera-operator".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        settings: config.workloads.clone(),
        failures: Default::default(),
        broker: config.broker.clone(),
        topology_resync: config.topology_resync.unwrap_or(Duration::from_secs(30)),
    });
    if config.broker.is_none() {
        warn!("no broker configured (--amqp-url): RabbitMQ topology is not managed");
    }
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=chimera-operator");
    info!(scope = ?config.scope, "chimera operator started");
    let controller = Controller::new(modules.clone(), watcher::Config::default());
    let metrics = match config.autoscale {
        Some(settings) => Some(start_autoscaler(
            &ctx,
            &config.scope,
            controller.store(),
            owned.clone(),
            settings,
        )?),
        None => None,
    };
    if let Some(addr) = config.metrics_addr {
        serve_metrics(addr, metrics).await?;
    }
    // A module's findings depend on the other modules of its namespace (who publishes what):
    // any module change re-plans its neighbours.
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
        .owns(
            config.scope.api::<Deployment>(client.clone()),
            owned.clone(),
        )
        .owns(config.scope.api::<Service>(client.clone()), owned.clone())
        .owns(
            config.scope.api::<PodDisruptionBudget>(client.clone()),
            owned,
        )
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
    info!("chimera operator stopped");
    Ok(())
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
