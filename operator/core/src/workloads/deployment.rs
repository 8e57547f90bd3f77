//! The Deployment of one head.
//!
//! `spec.replicas` is deliberately left out: a separate field manager owns it (see
//! `REPLICAS_MANAGER` in `chimera_runtime::cluster` and docs/adr/0003-replicas-ownership.md),
//! so the autoscaler and this template never fight over it.

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, HTTPGetAction, Lifecycle, LifecycleHandler, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecurityContext, SleepAction,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Head, Owner, WorkloadSettings, contract_env, head_labels, selector_labels};
use crate::api::{HeadProbes, QueryHeadSpec, WorkerHeadSpec};

/// Name of the container port every head serves HTTP on.
pub use chimera_contract::metrics::HTTP_PORT_NAME;

/// What differs between the two heads' Deployments.
struct HeadTemplate<'a> {
    head: Head,
    args: &'a [String],
    port: i32,
    resources: Option<&'a ResourceRequirements>,
    probes: Option<&'a HeadProbes>,
    termination_grace_period_seconds: i64,
    /// Seconds a stopping pod keeps serving before its SIGTERM (see [`query_pre_stop_sleep`]).
    pre_stop_sleep_seconds: Option<i64>,
}

/// Longest wait, after a query pod is marked for deletion, before its process gets SIGTERM.
const QUERY_PRE_STOP_SLEEP_SECONDS: i64 = 5;

/// A terminating pod leaves its Service's endpoints at the same moment the kubelet stops it, but
/// kube-proxy (and every other node's) rules catch up a moment later: a head that stopped
/// accepting at once would refuse the connections still routed to it. So the query head keeps
/// serving for a few seconds first (a native `sleep` preStop: the images have no shell), within
/// half of its grace period so the drain that follows keeps the other half. The worker needs no
/// such wait: no Service routes to it, it stops consuming on SIGTERM.
fn query_pre_stop_sleep(grace_seconds: i64) -> Option<i64> {
    let seconds = QUERY_PRE_STOP_SLEEP_SECONDS.min(grace_seconds / 2);
    (seconds > 0).then_some(seconds)
}

/// Seconds a stopping pod of `head` gets before SIGKILL (its `terminationGracePeriodSeconds`).
pub fn termination_grace_seconds(module: &crate::api::ChimeraModule, head: Head) -> i64 {
    match head {
        Head::Query => module
            .spec
            .query
            .as_ref()
            .and_then(|q| q.termination_grace_period_seconds)
            .unwrap_or(30),
        Head::Worker => module
            .spec
            .worker
            .as_ref()
            .map_or(60, |w| w.termination_grace_period_seconds),
    }
}

/// Seconds from a head's SIGTERM until its pod is killed: the grace period less the query
/// head's preStop sleep, which runs first (the contract's `CHIMERA_DRAIN_SECONDS`).
pub fn drain_seconds(module: &crate::api::ChimeraModule, head: Head) -> i64 {
    let grace = termination_grace_seconds(module, head);
    match head {
        Head::Query => grace - query_pre_stop_sleep(grace).unwrap_or(0),
        Head::Worker => grace,
    }
}

pub(crate) fn query_deployment(
    owner: &Owner<'_>,
    query: &QueryHeadSpec,
    settings: &WorkloadSettings,
) -> Deployment {
    head_deployment(
        owner,
        settings,
        HeadTemplate {
            head: Head::Query,
            args: &query.args,
            port: query.port,
            resources: query.resources.as_ref(),
            probes: query.probes.as_ref(),
            termination_grace_period_seconds: query.termination_grace_period_seconds.unwrap_or(30),
            pre_stop_sleep_seconds: query_pre_stop_sleep(
                query.termination_grace_period_seconds.unwrap_or(30),
            ),
        },
    )
}

pub(crate) fn worker_deployment(
    owner: &Owner<'_>,
    worker: &WorkerHeadSpec,
    settings: &WorkloadSettings,
) -> Deployment {
    head_deployment(
        owner,
        settings,
        HeadTemplate {
            head: Head::Worker,
            args: &worker.args,
            port: worker.port,
            resources: worker.resources.as_ref(),
            probes: worker.probes.as_ref(),
            termination_grace_period_seconds: worker.termination_grace_period_seconds,
            pre_stop_sleep_seconds: None,
        },
    )
}

/// Public entry for one head's Deployment (used by tests and the local runtime).
pub fn deployment(
    module: &crate::api::ChimeraModule,
    head: Head,
    settings: &WorkloadSettings,
) -> Result<Option<Deployment>, super::BuildError> {
    let owner = Owner::of(module)?;
    Ok(match head {
        Head::Query => module
            .spec
            .query
            .as_ref()
            .map(|q| query_deployment(&owner, q, settings)),
        Head::Worker => module
            .spec
            .worker
            .as_ref()
            .map(|w| worker_deployment(&owner, w, settings)),
    })
}

/// Replicas a head should run when nothing better is known: the current count (the
/// Deployment's, or Kubernetes' default of 1 for a new one) kept within the spec's bounds.
pub fn initial_replicas(current: Option<i32>, min: i32, max: i32) -> i32 {
    current.unwrap_or(1).clamp(min, max.max(min))
}

fn http_get(path: &str) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String(HTTP_PORT_NAME.to_owned()),
            ..HTTPGetAction::default()
        }),
        ..Probe::default()
    }
}

fn default_liveness() -> Probe {
    Probe {
        period_seconds: Some(10),
        failure_threshold: Some(3),
        ..http_get(chimera_contract::metrics::HEALTHZ)
    }
}

fn default_readiness() -> Probe {
    Probe {
        period_seconds: Some(5),
        failure_threshold: Some(2),
        ..http_get(chimera_contract::metrics::READYZ)
    }
}

fn restricted_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..SecurityContext::default()
    }
}

fn head_deployment(
    owner: &Owner<'_>,
    settings: &WorkloadSettings,
    t: HeadTemplate<'_>,
) -> Deployment {
    let module = owner.module;
    let spec = &module.spec;
    let labels = head_labels(owner.name, module.domain(), t.head);
    let args = if t.args.is_empty() {
        vec![t.head.as_str().to_owned()]
    } else {
        t.args.to_vec()
    };
    // User env first, then the contract: the CRD forbids CHIMERA_* names in spec.env, so the two
    // never collide.
    let mut env = spec.env.clone();
    env.extend(contract_env(module, t.head, t.port, &settings.broker_secret(module)).0);
    let probes = t.probes.cloned().unwrap_or_default();

    let container = Container {
        name: t.head.as_str().to_owned(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_owned()),
        args: Some(args),
        env: Some(env),
        env_from: (!spec.env_from.is_empty()).then(|| spec.env_from.clone()),
        ports: Some(vec![ContainerPort {
            name: Some(HTTP_PORT_NAME.to_owned()),
            container_port: t.port,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        liveness_probe: Some(probes.liveness.unwrap_or_else(default_liveness)),
        readiness_probe: Some(probes.readiness.unwrap_or_else(default_readiness)),
        startup_probe: probes.startup,
        resources: t.resources.cloned(),
        security_context: Some(restricted_security_context()),
        lifecycle: t.pre_stop_sleep_seconds.map(|seconds| Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction { seconds }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        ..Container::default()
    };

    Deployment {
        metadata: ObjectMeta {
            name: Some(owner.object_name(t.head)),
            namespace: Some(owner.namespace.to_owned()),
            labels: Some(labels.clone()),
            owner_references: Some(vec![owner.reference.clone()]),
            ..ObjectMeta::default()
        },
        spec: Some(DeploymentSpec {
            replicas: None,
            selector: LabelSelector {
                match_labels: Some(selector_labels(owner.name, t.head)),
                match_expressions: None,
            },
            revision_history_limit: Some(5),
            // Never drop below the current capacity during a rollout: a new pod must be ready
            // before an old one goes.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::String("25%".to_owned())),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    service_account_name: spec.service_account_name.clone(),
                    // The heads never call the API server: no token unless the module names
                    // an account of its own (for its own reasons).
                    automount_service_account_token: Some(spec.service_account_name.is_some()),
                    termination_grace_period_seconds: Some(t.termination_grace_period_seconds),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::fixtures::{module, worker};
    use crate::workloads::{WorkloadSettings, desired_workloads};

    fn built(m: &crate::api::ChimeraModule, head: Head) -> Deployment {
        deployment(m, head, &WorkloadSettings::default())
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("head {head:?} present"))
    }

    fn container(d: &Deployment) -> &Container {
        &d.spec
            .as_ref()
            .unwrap_or_else(|| panic!("spec"))
            .template
            .spec
            .as_ref()
            .unwrap_or_else(|| panic!("pod spec"))
            .containers[0]
    }

    #[test]
    fn replicas_are_never_in_the_template() {
        let d = desired_workloads(&module("orders"), &WorkloadSettings::default())
            .unwrap_or_else(|e| panic!("{e}"));
        for dep in d.deployments {
            assert_eq!(dep.spec.and_then(|s| s.replicas), None);
        }
    }

    fn pre_stop_sleep(d: &Deployment) -> Option<i64> {
        container(d)
            .lifecycle
            .as_ref()
            .and_then(|l| l.pre_stop.as_ref())
            .and_then(|p| p.sleep.as_ref())
            .map(|s| s.seconds)
    }

    #[test]
    fn only_the_query_head_keeps_serving_a_moment_before_its_sigterm() {
        let m = module("orders");
        assert_eq!(pre_stop_sleep(&built(&m, Head::Query)), Some(5));
        assert_eq!(pre_stop_sleep(&built(&m, Head::Worker)), None);
    }

    #[test]
    fn the_pre_stop_sleep_keeps_half_of_the_grace_period_for_the_drain() {
        assert_eq!(query_pre_stop_sleep(30), Some(5));
        assert_eq!(query_pre_stop_sleep(6), Some(3));
        assert_eq!(query_pre_stop_sleep(1), None);
        assert_eq!(query_pre_stop_sleep(0), None);
    }

    #[test]
    fn a_head_is_told_the_seconds_it_has_between_its_sigterm_and_its_kill() {
        let mut m = module("orders");
        let drain = |m: &crate::api::ChimeraModule, head| {
            built(m, head)
                .spec
                .and_then(|s| s.template.spec)
                .and_then(|p| p.containers.into_iter().next())
                .and_then(|c| c.env)
                .and_then(|env| env.into_iter().find(|e| e.name == "CHIMERA_DRAIN_SECONDS"))
                .and_then(|e| e.value)
        };
        // The query head's preStop sleep comes out of its grace period.
        assert_eq!(drain(&m, Head::Query).as_deref(), Some("25"));
        assert_eq!(drain(&m, Head::Worker).as_deref(), Some("60"));
        if let Some(q) = m.spec.query.as_mut() {
            q.termination_grace_period_seconds = Some(4);
        }
        if let Some(w) = m.spec.worker.as_mut() {
            w.termination_grace_period_seconds = 90;
        }
        assert_eq!(drain(&m, Head::Query).as_deref(), Some("2"));
        assert_eq!(drain(&m, Head::Worker).as_deref(), Some("90"));
    }

    #[test]
    fn heads_get_no_api_token_unless_the_module_names_an_account() {
        let automount = |m: &crate::api::ChimeraModule| {
            built(m, Head::Query)
                .spec
                .and_then(|s| s.template.spec)
                .and_then(|p| p.automount_service_account_token)
        };
        let mut m = module("orders");
        assert_eq!(automount(&m), Some(false));
        m.spec.service_account_name = Some("orders-reader".into());
        assert_eq!(automount(&m), Some(true));
    }

    #[test]
    fn default_args_name_the_head() {
        let m = module("orders");
        assert_eq!(
            container(&built(&m, Head::Query)).args,
            Some(vec!["query".to_owned()])
        );
        assert_eq!(
            container(&built(&m, Head::Worker)).args,
            Some(vec!["worker".to_owned()])
        );
    }

    #[test]
    fn explicit_args_win() {
        let mut m = module("orders");
        if let Some(w) = m.spec.worker.as_mut() {
            w.args = vec!["run".into(), "--worker".into()];
        }
        assert_eq!(
            container(&built(&m, Head::Worker)).args,
            Some(vec!["run".to_owned(), "--worker".to_owned()])
        );
    }

    #[test]
    fn shared_env_comes_before_the_contract() {
        let mut m = module("orders");
        m.spec.env = vec![k8s_openapi::api::core::v1::EnvVar {
            name: "RUST_LOG".into(),
            value: Some("debug".into()),
            value_from: None,
        }];
        let env = container(&built(&m, Head::Query))
            .env
            .clone()
            .unwrap_or_default();
        assert_eq!(env[0].name, "RUST_LOG");
        assert!(env.iter().any(|e| e.name == "CHIMERA_DOMAIN"));
    }

    #[test]
    fn probes_default_to_the_contract_endpoints_and_can_be_overridden() {
        let mut m = module("orders");
        let c = container(&built(&m, Head::Worker)).clone();
        let path = |p: Option<Probe>| p.and_then(|p| p.http_get).and_then(|h| h.path);
        assert_eq!(path(c.liveness_probe), Some("/healthz".to_owned()));
        assert_eq!(path(c.readiness_probe), Some("/readyz".to_owned()));
        if let Some(w) = m.spec.worker.as_mut() {
            w.probes = Some(HeadProbes {
                readiness: Some(http_get("/ready")),
                ..Default::default()
            });
        }
        let c = container(&built(&m, Head::Worker)).clone();
        assert_eq!(path(c.readiness_probe), Some("/ready".to_owned()));
        assert_eq!(path(c.liveness_probe), Some("/healthz".to_owned()));
    }

    #[test]
    fn worker_grace_period_comes_from_the_spec() {
        let m = module("orders");
        let d = built(&m, Head::Worker);
        let grace = d
            .spec
            .and_then(|s| s.template.spec)
            .and_then(|p| p.termination_grace_period_seconds);
        assert_eq!(grace, Some(worker(&m).termination_grace_period_seconds));
    }

    #[test]
    fn port_is_named_http() {
        let m = module("orders");
        let ports = container(&built(&m, Head::Query))
            .ports
            .clone()
            .unwrap_or_default();
        assert_eq!(ports[0].name.as_deref(), Some(HTTP_PORT_NAME));
        assert_eq!(ports[0].container_port, 8080);
    }

    #[test]
    fn initial_replicas_stay_in_bounds() {
        assert_eq!(initial_replicas(None, 0, 10), 1);
        assert_eq!(initial_replicas(None, 3, 10), 3);
        assert_eq!(initial_replicas(Some(0), 0, 10), 0);
        assert_eq!(initial_replicas(Some(50), 1, 10), 10);
        assert_eq!(initial_replicas(Some(5), 1, 10), 5);
    }

    #[test]
    fn initial_replicas_is_within_bounds_for_any_input() {
        for current in [None, Some(-3), Some(0), Some(1), Some(7), Some(10_000)] {
            for min in 0..4 {
                for max in min.max(1)..6 {
                    let r = initial_replicas(current, min, max);
                    assert!((min..=max).contains(&r), "{current:?} {min} {max} -> {r}");
                }
            }
        }
    }
}
