//! The operator, assembled: the controller and the autoscaler on one module cache, the
//! Event recorder and the metrics endpoint. The one place that knows both loops.

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client};
use tracing::{info, warn};

use crate::Error;
use crate::caches::Caches;
use crate::cluster::{Context, Scope};
use crate::controller;
use crate::scaler::metrics::AutoscalerMetrics;
use crate::scaler::{Scaler, ScalerSettings};
use chimera_core::api::ChimeraModule;
use chimera_core::topology::state::BrokerEndpoint;
use chimera_core::workloads::WorkloadSettings;

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
    pub autoscale: Option<ScalerSettings>,
    /// Where to serve `/metrics` and `/healthz`; None serves nothing.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The API client's request counts, served on `/metrics` too (when the client was built
    /// by [`crate::client::build`]).
    pub api_metrics: Option<crate::client::ApiMetrics>,
    /// Leader election among replicas; None: this replica runs alone and always leads.
    pub leader: Option<crate::leader::LeaderSettings>,
}

/// Starts the autoscaler next to the controller, on the controller's caches and a reflector of
/// the heads' pods; returns its metrics.
fn start_autoscaler(
    ctx: &Arc<Context>,
    scope: &Scope,
    caches: &Caches,
    settings: ScalerSettings,
) -> Result<AutoscalerMetrics, Error> {
    use kube::runtime::WatchStreamExt;
    use kube::runtime::reflector;
    // The heads' pods, for their start-up times (created -> Ready) and their addresses. Only
    // the fields the scaler reads are kept: a cluster's pods are many.
    let (heads_pods, pods_writer) = reflector::store();
    let pods_stream = reflector::reflector(
        pods_writer,
        watcher(
            scope.api::<Pod>(ctx.client.clone()),
            watcher::Config::default().labels(&format!(
                "{}={}",
                "app.kubernetes.io/managed-by",
                chimera_core::workloads::MANAGED_BY
            )),
        )
        .default_backoff()
        .map_ok(|event| {
            event.modify(|pod| {
                pod.metadata.managed_fields = None;
                pod.spec = None;
            })
        }),
    );
    tokio::spawn(pods_stream.for_each(|_| futures::future::ready(())));
    let pods = crate::scaler::sources::PodMetrics::new()?;
    let scaler = Arc::new(
        Scaler::new(
            Arc::new(crate::scaler::writer::KubeWriter::new(Arc::clone(ctx))),
            Arc::new(crate::scaler::sources::RabbitMq::default()),
            Arc::new(pods),
            settings,
        )
        .with_leadership(ctx.leadership.clone()),
    );
    let metrics = scaler.metrics.clone();
    tokio::spawn(scaler.run(
        caches.modules.clone(),
        caches.deployments.clone(),
        heads_pods,
    ));
    info!(
        interval_ms = settings.interval.as_millis(),
        "autoscaler started"
    );
    Ok(metrics)
}

/// Serves `/metrics` (the autoscaler's) and `/healthz` in the background.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    metrics: Option<AutoscalerMetrics>,
    api: Option<crate::client::ApiMetrics>,
    leadership: crate::leader::Leadership,
    controller: crate::controller::metrics::ControllerMetrics,
) -> Result<(), Error> {
    use axum::{Router, routing::get};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::MetricsListen { addr, source })?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(move || {
                let mut text = metrics.as_ref().map(|m| m.render()).unwrap_or_default();
                if let Some(api) = &api {
                    text.push_str(&api.render());
                }
                text.push_str(&leadership.render());
                text.push_str(&controller.render());
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

/// Runs the operator until SIGTERM/Ctrl-C.
pub async fn run(client: Client, config: OperatorConfig) -> Result<(), Error> {
    let modules: Api<ChimeraModule> = config.scope.api(client.clone());
    check_crd_installed(&modules).await?;
    let reporter = Reporter {
        controller: "chimera-operator".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let (caches, watches) = crate::caches::watch(&client, &config.scope);
    let (leadership, elector) = match &config.leader {
        None => (crate::leader::Leadership::always(), None),
        Some(settings) => {
            let leadership = crate::leader::Leadership::elected();
            let elector = Arc::new(crate::leader::Elector::new(
                client.clone(),
                settings.clone(),
                leadership.clone(),
            )?);
            info!(lease = %settings.lease, namespace = %settings.namespace, identity = %settings.identity, "running for leader");
            (leadership, Some(elector))
        }
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        settings: config.workloads.clone(),
        failures: Default::default(),
        broker: config.broker.clone(),
        topology_resync: config.topology_resync.unwrap_or(Duration::from_secs(30)),
        caches: caches.clone(),
        neighbours: Default::default(),
        declared: Default::default(),
        snapshots: Default::default(),
        connections: Default::default(),
        access: Default::default(),
        leadership: leadership.clone(),
        metrics: Default::default(),
    });
    if config.broker.is_none() {
        warn!("no broker configured (--amqp-url): RabbitMQ topology is not managed");
    }
    info!(scope = ?config.scope, "chimera operator started");
    let controller = controller::new(&caches, watches, &ctx);
    let metrics = match config.autoscale {
        Some(settings) => Some(start_autoscaler(&ctx, &config.scope, &caches, settings)?),
        None => None,
    };
    if let Some(addr) = config.metrics_addr {
        serve_metrics(
            addr,
            metrics,
            config.api_metrics.clone(),
            leadership,
            ctx.metrics.clone(),
        )
        .await?;
    }
    let election = elector.as_ref().map(|e| tokio::spawn(Arc::clone(e).run()));
    controller::run(controller, ctx).await;
    // Stopping: write no more, and hand the Lease over rather than let it expire.
    if let (Some(elector), Some(election)) = (elector, election) {
        election.abort();
        elector.release().await;
    }
    info!("chimera operator stopped");
    Ok(())
}
