//! `chimera operator`: the operator against the cluster of the current kubeconfig.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use chimera_core::api::SecretKeyRef;
use chimera_core::leader::Timing;
use chimera_core::topology::state::BrokerEndpoint;
use chimera_core::workloads::{NetworkPolicySettings, WorkloadSettings};
use chimera_runtime::client::{ApiMetrics, Limits};
use chimera_runtime::cluster::Scope;
use chimera_runtime::leader::LeaderSettings;
use chimera_runtime::operator::OperatorConfig;
use chimera_runtime::scaler::ScalerSettings;

/// `chimera operator`
#[derive(Debug, clap::Args)]
pub struct OperatorArgs {
    /// Watch one namespace only (default: all namespaces).
    #[arg(long, env = "CHIMERA_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// The broker the operator declares topology on (modules may name their own in
    /// spec.broker). Without it, RabbitMQ topology is not managed.
    #[arg(long, env = "CHIMERA_AMQP_URL")]
    amqp_url: Option<String>,
    /// Management API of that broker (default: its host, port 15672, same credentials).
    #[arg(long, env = "CHIMERA_RABBITMQ_MANAGEMENT_URL")]
    management_url: Option<String>,
    /// Seconds between drift checks of each module's topology.
    #[arg(long, default_value_t = 30)]
    topology_resync_seconds: u64,
    /// Secret (`name` or `name/key`, key defaults to `url`) in each module's namespace that
    /// holds the AMQP URL of modules without spec.broker.
    #[arg(
        long,
        default_value = "chimera-broker/url",
        env = "CHIMERA_DEFAULT_BROKER_SECRET"
    )]
    default_broker_secret: String,
    /// Give each module without spec.broker a RabbitMQ user of its own, made through the
    /// management API (the operator's user needs the `administrator` tag), with a Secret
    /// `<module>-broker` its heads read; the user may touch only the module's own queues and
    /// exchanges, and is deleted with the module. Needs --amqp-url.
    #[arg(long, env = "CHIMERA_MODULE_BROKER_USERS")]
    module_broker_users: bool,
    /// The autoscaler's tick in milliseconds; 0 turns the autoscaler off (replicas then
    /// stay within spec bounds where they are).
    #[arg(long, default_value_t = 1000, env = "CHIMERA_AUTOSCALE_INTERVAL_MS")]
    autoscale_interval_ms: u64,
    /// Seconds a new pod takes to serve, which the control laws plan around.
    #[arg(long, default_value_t = 10.0)]
    pod_startup_seconds: f64,
    /// Where to serve /metrics and /healthz (empty: nowhere).
    #[arg(long, default_value = "0.0.0.0:9090", env = "CHIMERA_METRICS_ADDR")]
    metrics_addr: String,
    /// API requests per second the operator may start, sustained (client-side limit).
    #[arg(long, default_value_t = Limits::default().qps)]
    kube_api_qps: f64,
    /// API requests that may start at once after a quiet spell.
    #[arg(long, default_value_t = Limits::default().burst)]
    kube_api_burst: u32,
    /// Run for leader on a Lease, so that several replicas can run: only the leader writes
    /// and scales, the others keep their caches warm (the chart turns it on).
    #[arg(long)]
    leader_elect: bool,
    /// Namespace of the Lease (default: the operator pod's, from POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    leader_elect_namespace: String,
    /// Name of the Lease.
    #[arg(long, default_value = "chimera-operator")]
    leader_elect_lease: String,
    /// Seconds the Lease holds without renewal; the leader stops writing after two thirds of
    /// it without a renewal.
    #[arg(long, default_value_t = 15.0)]
    leader_elect_lease_seconds: f64,
    /// Give every head a NetworkPolicy: a query head admits its own namespace and the peer
    /// namespaces, a worker only the peers. The operator's own namespace (POD_NAMESPACE) is
    /// always a peer: its autoscaler scrapes the heads.
    #[arg(long)]
    network_policies: bool,
    /// A namespace whose pods may reach every head's HTTP port (an ingress controller's,
    /// Prometheus's); repeat for more.
    #[arg(long = "network-policy-peer-namespace", value_name = "NAMESPACE")]
    network_policy_peers: Vec<String>,
}

/// The Lease settings of `--leader-elect`. This replica is its pod (POD_NAME; the host outside
/// a cluster) and this very process: a container restarted after a crash is a new candidate
/// that waits for the Lease to expire, like any other, rather than resuming as the holder.
fn leader(args: &OperatorArgs) -> Option<LeaderSettings> {
    if !args.leader_elect {
        return None;
    }
    let replica = std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "host".to_owned())
        });
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let identity = format!("{replica}_{:x}", started ^ u128::from(std::process::id()));
    let lease = args.leader_elect_lease_seconds;
    Some(LeaderSettings {
        namespace: args.leader_elect_namespace.clone(),
        lease: args.leader_elect_lease.clone(),
        identity,
        // client-go's proportions (15 s, 10 s, 2 s) for any lease duration.
        timing: Timing {
            lease_duration: lease,
            renew_deadline: lease * 2.0 / 3.0,
            retry_period: lease * 2.0 / 15.0,
        },
    })
}

/// The operator's configuration from its arguments.
fn config(args: OperatorArgs) -> anyhow::Result<OperatorConfig> {
    let leader = leader(&args);
    let broker = args
        .amqp_url
        .map(|url| BrokerEndpoint::new(&url, args.management_url.as_deref()))
        .transpose()
        .context("--amqp-url")?;
    anyhow::ensure!(
        broker.is_some() || !args.module_broker_users,
        "--module-broker-users needs --amqp-url: the users are made on the operator's broker"
    );
    if let Some(l) = &leader {
        l.timing
            .validate()
            .context("--leader-elect-lease-seconds")?;
    }
    Ok(OperatorConfig {
        leader,
        scope: args.namespace.map(Scope::Namespace).unwrap_or_default(),
        workloads: WorkloadSettings {
            default_broker: parse_secret_key_ref(&args.default_broker_secret)
                .context("--default-broker-secret")?,
            module_broker_users: args.module_broker_users,
            network_policies: args.network_policies.then(|| NetworkPolicySettings {
                peer_namespaces: std::env::var("POD_NAMESPACE")
                    .ok()
                    .into_iter()
                    .chain(args.network_policy_peers.iter().cloned())
                    .filter(|ns| !ns.is_empty())
                    .collect(),
            }),
        },
        broker,
        topology_resync: Some(Duration::from_secs(args.topology_resync_seconds.max(1))),
        autoscale: (args.autoscale_interval_ms > 0).then(|| ScalerSettings {
            interval: Duration::from_millis(args.autoscale_interval_ms),
            startup_seconds: args.pod_startup_seconds.max(0.0),
        }),
        api_metrics: None,
        metrics_addr: if args.metrics_addr.is_empty() {
            None
        } else {
            Some(args.metrics_addr.parse().with_context(|| {
                format!("--metrics-addr {:?} is not HOST:PORT", args.metrics_addr)
            })?)
        },
    })
}

/// Runs the operator until it is stopped.
pub async fn run(args: OperatorArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.kube_api_qps > 0.0 && args.kube_api_burst > 0,
        "--kube-api-qps and --kube-api-burst must be positive"
    );
    let limits = Limits {
        qps: args.kube_api_qps,
        burst: args.kube_api_burst,
    };
    let mut config = config(args)?;
    let metrics = ApiMetrics::new();
    let client = chimera_runtime::client::build(limits, metrics.clone())
        .await
        .context("connecting to Kubernetes (is KUBECONFIG set? `scripts/dev-env up` prints it)")?;
    config.api_metrics = Some(metrics);
    chimera_runtime::operator::run(client, config).await?;
    Ok(ExitCode::SUCCESS)
}

/// Parses `name` or `name/key`.
fn parse_secret_key_ref(s: &str) -> anyhow::Result<SecretKeyRef> {
    let (name, key) = s.split_once('/').unwrap_or((s, "url"));
    anyhow::ensure!(
        !name.is_empty() && !key.is_empty(),
        "expected NAME or NAME/KEY, got {s:?}"
    );
    Ok(SecretKeyRef {
        name: name.to_owned(),
        key: key.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_refs_parse_with_a_default_key() {
        let r = parse_secret_key_ref("mq").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.name.as_str(), r.key.as_str()), ("mq", "url"));
        let r = parse_secret_key_ref("mq/amqp").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.name.as_str(), r.key.as_str()), ("mq", "amqp"));
        assert!(parse_secret_key_ref("/x").is_err());
        assert!(parse_secret_key_ref("x/").is_err());
    }
}
