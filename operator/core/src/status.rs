//! Status of a module computed from what the API server reports of its Deployments.
//!
//! Pure: the same inputs give the same status, and a condition's lastTransitionTime only moves
//! when its status flips, so an unchanged world produces an identical status and no write.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::api::{ChimeraModule, ChimeraModuleStatus, HeadStatus};
use crate::workloads::Head;

/// Condition types the operator maintains.
pub mod condition {
    /// Every head the module declares is available.
    pub const READY: &str = "Ready";
    /// The query head serves with at least one ready replica.
    pub const QUERY_AVAILABLE: &str = "QueryAvailable";
    /// The worker head runs (or is deliberately scaled to zero).
    pub const WORKER_AVAILABLE: &str = "WorkerAvailable";
    /// The module's RabbitMQ topology is declared and its graph has no errors.
    pub const TOPOLOGY_READY: &str = "TopologyReady";
}

/// The module's Deployments as last read from the API server.
#[derive(Clone, Debug, Default)]
pub struct ObservedHeads {
    /// The query head's Deployment, if it exists.
    pub query: Option<Deployment>,
    /// The worker head's Deployment, if it exists.
    pub worker: Option<Deployment>,
}

/// A condition's verdict before timestamps are attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// `True` or `False`.
    pub status: bool,
    /// CamelCase reason.
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
}

impl Verdict {
    /// A verdict.
    pub fn new(status: bool, reason: &str, message: String) -> Self {
        Self {
            status,
            reason: reason.to_owned(),
            message,
        }
    }
}

fn condition_type(head: Head) -> &'static str {
    match head {
        Head::Query => condition::QUERY_AVAILABLE,
        Head::Worker => condition::WORKER_AVAILABLE,
    }
}

/// Replica counts of a head's Deployment.
pub fn head_status(deployment: &Deployment) -> HeadStatus {
    let desired = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let status = deployment.status.clone().unwrap_or_default();
    let ready = status.ready_replicas.unwrap_or(0);
    HeadStatus {
        desired_replicas: desired,
        replicas: status.replicas.unwrap_or(0),
        ready_replicas: ready,
        summary: format!("{ready}/{desired}"),
    }
}

/// Whether a head is available, judged from its Deployment.
pub fn head_verdict(head: Head, deployment: Option<&Deployment>) -> Verdict {
    let Some(deployment) = deployment else {
        return Verdict::new(
            false,
            "DeploymentMissing",
            format!("the {} Deployment does not exist yet", head.as_str()),
        );
    };
    let counts = head_status(deployment);
    let status = deployment.status.clone().unwrap_or_default();
    let available = status.available_replicas.unwrap_or(0);
    let stuck = status.conditions.unwrap_or_default().into_iter().find(|c| {
        c.type_ == "Progressing"
            && c.status == "False"
            && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    });
    if let Some(stuck) = stuck {
        return Verdict::new(
            false,
            "ProgressDeadlineExceeded",
            stuck
                .message
                .unwrap_or_else(|| "the rollout stopped making progress".to_owned()),
        );
    }
    if counts.desired_replicas == 0 {
        return Verdict::new(
            true,
            "ScaledToZero",
            "no replicas: scaled to zero while idle".to_owned(),
        );
    }
    let message = format!("{available}/{} replicas available", counts.desired_replicas);
    if available > 0 {
        Verdict::new(true, "ReplicasAvailable", message)
    } else {
        Verdict::new(false, "NoReplicasAvailable", message)
    }
}

/// Sets `verdict` as condition `type_`, keeping the transition time when the status is unchanged.
fn upsert(
    conditions: &mut Vec<Condition>,
    previous: &[Condition],
    type_: &str,
    verdict: &Verdict,
    generation: Option<i64>,
    now: &Time,
) {
    let status = if verdict.status { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    conditions.push(Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: verdict.reason.clone(),
        message: verdict.message.clone(),
        observed_generation: generation,
        last_transition_time,
    });
}

/// The status the module should have, given its Deployments and its previous status.
///
/// `topology` is the `TopologyReady` verdict when the operator manages topology (None leaves an
/// existing condition as it is and out of `Ready`).
pub fn desired_status(
    module: &ChimeraModule,
    observed: &ObservedHeads,
    topology: Option<&Verdict>,
    previous: Option<&ChimeraModuleStatus>,
    now: &Time,
) -> ChimeraModuleStatus {
    let generation = module.metadata.generation;
    let previous_conditions = previous
        .map(|p| p.conditions.as_slice())
        .unwrap_or_default();
    let mut conditions = Vec::new();
    let mut unavailable = Vec::new();
    let mut status = ChimeraModuleStatus {
        observed_generation: generation,
        domain: Some(module.domain().to_owned()),
        // The autoscaler's own part, carried so that comparing shows no change (it is never
        // written from here: see reconcile::write_status).
        autoscaling: previous.and_then(|p| p.autoscaling.clone()),
        ..ChimeraModuleStatus::default()
    };
    for head in Head::ALL {
        let (declared, deployment) = match head {
            Head::Query => (module.spec.query.is_some(), observed.query.as_ref()),
            Head::Worker => (module.spec.worker.is_some(), observed.worker.as_ref()),
        };
        if !declared {
            continue; // an absent head has no condition and no counts
        }
        let verdict = head_verdict(head, deployment);
        if !verdict.status {
            unavailable.push(format!("{} head: {}", head.as_str(), verdict.message));
        }
        upsert(
            &mut conditions,
            previous_conditions,
            condition_type(head),
            &verdict,
            generation,
            now,
        );
        let counts = deployment.map(head_status);
        match head {
            Head::Query => status.query = counts,
            Head::Worker => status.worker = counts,
        }
    }
    if let Some(verdict) = topology {
        if !verdict.status {
            unavailable.push(format!("topology: {}", verdict.message));
        }
        upsert(
            &mut conditions,
            previous_conditions,
            condition::TOPOLOGY_READY,
            verdict,
            generation,
            now,
        );
    }
    let ready = if unavailable.is_empty() {
        Verdict::new(
            true,
            "AllHeadsAvailable",
            "every head of the module is available".to_owned(),
        )
    } else {
        Verdict::new(false, "HeadsUnavailable", unavailable.join("; "))
    };
    upsert(
        &mut conditions,
        previous_conditions,
        condition::READY,
        &ready,
        generation,
        now,
    );
    // Conditions owned by other parts of the operator (TopologyReady, ...) are kept as they are.
    let ours: Vec<&str> = conditions.iter().map(|c| c.type_.as_str()).collect();
    let kept: Vec<Condition> = previous_conditions
        .iter()
        .filter(|c| {
            !ours.contains(&c.type_.as_str()) && !head_condition_of_absent_head(module, &c.type_)
        })
        .cloned()
        .collect();
    conditions.extend(kept);
    conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    status.conditions = conditions;
    status
}

/// The status after a failed reconcile: everything as before, but `Ready` is False with the
/// error, so `kubectl get chm` and `describe` show why the module is stuck.
pub fn failed_status(
    module: &ChimeraModule,
    previous: Option<&ChimeraModuleStatus>,
    error: &str,
    now: &Time,
) -> ChimeraModuleStatus {
    let mut status = previous.cloned().unwrap_or_default();
    status.domain = Some(module.domain().to_owned());
    let previous_conditions = status.conditions.clone();
    status.conditions.retain(|c| c.type_ != condition::READY);
    let verdict = Verdict::new(false, "ReconcileFailed", error.to_owned());
    upsert(
        &mut status.conditions,
        &previous_conditions,
        condition::READY,
        &verdict,
        module.metadata.generation,
        now,
    );
    status.conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    status
}

/// A head condition whose head left the spec: dropped, not kept.
fn head_condition_of_absent_head(module: &ChimeraModule, type_: &str) -> bool {
    (type_ == condition::QUERY_AVAILABLE && module.spec.query.is_none())
        || (type_ == condition::WORKER_AVAILABLE && module.spec.worker.is_none())
}

/// A condition that changed status between two statuses, for a Kubernetes Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// Condition type.
    pub type_: String,
    /// New status.
    pub status: bool,
    /// New reason.
    pub reason: String,
    /// New message.
    pub message: String,
    /// Whether the condition was True before (None when it is new).
    pub was: Option<bool>,
}

impl Transition {
    /// Worth a Warning: something that worked stopped working. A head that is not available
    /// yet right after creation is normal.
    pub fn is_degradation(&self) -> bool {
        !self.status && self.was == Some(true)
    }
}

/// Conditions whose status differs from the previous status, and new conditions that start
/// True. A new condition that starts False is a module's initial state (its heads are still
/// coming, say), which the status itself tells: an Event for each would be three writes per new
/// module and no news.
pub fn transitions(
    previous: Option<&ChimeraModuleStatus>,
    next: &ChimeraModuleStatus,
) -> Vec<Transition> {
    next.conditions
        .iter()
        .filter_map(|c| {
            let was = previous
                .and_then(|p| p.condition(&c.type_))
                .map(|p| p.status == "True");
            let is = c.status == "True";
            (was.is_some_and(|w| w != is) || (was.is_none() && is)).then_some((c, was))
        })
        .map(|(c, was)| Transition {
            was,
            type_: c.type_.clone(),
            status: c.status == "True",
            reason: c.reason.clone(),
            message: c.message.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::fixtures::{module, worker_only};
    use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentSpec, DeploymentStatus};
    use k8s_openapi::jiff::Timestamp;

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(second).unwrap_or_else(|e| panic!("{e}")))
    }

    fn dep(desired: i32, ready: i32) -> Deployment {
        Deployment {
            spec: Some(DeploymentSpec {
                replicas: Some(desired),
                ..DeploymentSpec::default()
            }),
            status: Some(DeploymentStatus {
                replicas: Some(desired),
                ready_replicas: Some(ready),
                available_replicas: Some(ready),
                ..DeploymentStatus::default()
            }),
            ..Deployment::default()
        }
    }

    fn cond<'a>(s: &'a ChimeraModuleStatus, t: &str) -> &'a Condition {
        s.condition(t)
            .unwrap_or_else(|| panic!("condition {t} in {s:?}"))
    }

    #[test]
    fn all_heads_available_makes_the_module_ready() {
        let obs = ObservedHeads {
            query: Some(dep(2, 2)),
            worker: Some(dep(1, 1)),
        };
        let s = desired_status(&module("orders"), &obs, None, None, &at(100));
        assert_eq!(cond(&s, "Ready").status, "True");
        assert_eq!(cond(&s, "QueryAvailable").reason, "ReplicasAvailable");
        assert_eq!(s.query.as_ref().map(|q| q.summary.as_str()), Some("2/2"));
        assert_eq!(s.observed_generation, Some(1));
        assert_eq!(s.domain.as_deref(), Some("orders"));
    }

    #[test]
    fn a_head_without_ready_replicas_makes_the_module_not_ready() {
        let obs = ObservedHeads {
            query: Some(dep(2, 0)),
            worker: Some(dep(1, 1)),
        };
        let s = desired_status(&module("orders"), &obs, None, None, &at(100));
        assert_eq!(cond(&s, "Ready").status, "False");
        assert_eq!(cond(&s, "Ready").reason, "HeadsUnavailable");
        assert!(
            cond(&s, "Ready").message.contains("query head: 0/2"),
            "{s:?}"
        );
        assert_eq!(cond(&s, "QueryAvailable").reason, "NoReplicasAvailable");
    }

    #[test]
    fn missing_deployment_is_reported() {
        let s = desired_status(
            &module("orders"),
            &ObservedHeads::default(),
            None,
            None,
            &at(1),
        );
        assert_eq!(cond(&s, "WorkerAvailable").reason, "DeploymentMissing");
    }

    #[test]
    fn worker_scaled_to_zero_is_available() {
        let obs = ObservedHeads {
            query: None,
            worker: Some(dep(0, 0)),
        };
        let s = desired_status(&worker_only("orders"), &obs, None, None, &at(1));
        assert_eq!(cond(&s, "WorkerAvailable").reason, "ScaledToZero");
        assert_eq!(cond(&s, "Ready").status, "True");
        assert!(s.condition("QueryAvailable").is_none());
        assert!(s.query.is_none());
    }

    #[test]
    fn stuck_rollout_is_reported() {
        let mut d = dep(1, 1);
        if let Some(st) = d.status.as_mut() {
            st.conditions = Some(vec![DeploymentCondition {
                type_: "Progressing".into(),
                status: "False".into(),
                reason: Some("ProgressDeadlineExceeded".into()),
                message: Some("ReplicaSet \"x\" has timed out progressing.".into()),
                ..DeploymentCondition::default()
            }]);
        }
        let obs = ObservedHeads {
            query: Some(d),
            worker: Some(dep(1, 1)),
        };
        let s = desired_status(&module("orders"), &obs, None, None, &at(1));
        assert_eq!(
            cond(&s, "QueryAvailable").reason,
            "ProgressDeadlineExceeded"
        );
        assert!(cond(&s, "QueryAvailable").message.contains("timed out"));
    }

    #[test]
    fn unchanged_world_gives_an_identical_status() {
        let obs = ObservedHeads {
            query: Some(dep(2, 2)),
            worker: Some(dep(1, 1)),
        };
        let m = module("orders");
        let first = desired_status(&m, &obs, None, None, &at(100));
        let second = desired_status(&m, &obs, None, Some(&first), &at(500));
        assert_eq!(
            first, second,
            "a later reconcile of the same world must not change status"
        );
        assert!(transitions(Some(&first), &second).is_empty());
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let m = module("orders");
        let up = ObservedHeads {
            query: Some(dep(2, 2)),
            worker: Some(dep(1, 1)),
        };
        let first = desired_status(&m, &up, None, None, &at(100));
        // Counts change but the head stays available: same transition time, new message.
        let fewer = ObservedHeads {
            query: Some(dep(2, 1)),
            worker: Some(dep(1, 1)),
        };
        let second = desired_status(&m, &fewer, None, Some(&first), &at(200));
        assert_eq!(
            cond(&second, "QueryAvailable").last_transition_time,
            at(100)
        );
        assert_eq!(
            cond(&second, "QueryAvailable").message,
            "1/2 replicas available"
        );
        // The head goes down: the time moves and a transition is reported.
        let down = ObservedHeads {
            query: Some(dep(2, 0)),
            worker: Some(dep(1, 1)),
        };
        let third = desired_status(&m, &down, None, Some(&second), &at(300));
        assert_eq!(cond(&third, "QueryAvailable").last_transition_time, at(300));
        let t = transitions(Some(&second), &third);
        let types: Vec<_> = t.iter().map(|t| t.type_.as_str()).collect();
        assert_eq!(types, ["QueryAvailable", "Ready"]);
        assert!(t.iter().all(|t| !t.status && t.is_degradation()));
        // A new module's first verdicts: only what starts True is news, and no degradation.
        let fresh = transitions(None, &third);
        let starting_true = third
            .conditions
            .iter()
            .filter(|c| c.status == "True")
            .count();
        assert_eq!(fresh.len(), starting_true);
        assert!(fresh.iter().all(|t| t.status && !t.is_degradation()));
        let first = transitions(None, &second);
        assert_eq!(
            first.len(),
            second
                .conditions
                .iter()
                .filter(|c| c.status == "True")
                .count()
        );
    }

    #[test]
    fn a_failed_reconcile_marks_only_ready() {
        let m = module("orders");
        let obs = ObservedHeads {
            query: Some(dep(1, 1)),
            worker: Some(dep(1, 1)),
        };
        let good = desired_status(&m, &obs, None, None, &at(1));
        let failed = failed_status(
            &m,
            Some(&good),
            "Service orders-query belongs to someone else",
            &at(9),
        );
        assert_eq!(cond(&failed, "Ready").status, "False");
        assert_eq!(cond(&failed, "Ready").reason, "ReconcileFailed");
        assert!(cond(&failed, "Ready").message.contains("someone else"));
        assert_eq!(cond(&failed, "Ready").last_transition_time, at(9));
        assert_eq!(
            cond(&failed, "QueryAvailable"),
            cond(&good, "QueryAvailable")
        );
        assert_eq!(failed.query, good.query);
        // The same failure again changes nothing (no write storm while it persists).
        let again = failed_status(
            &m,
            Some(&failed),
            "Service orders-query belongs to someone else",
            &at(20),
        );
        assert_eq!(again, failed);
        // The next good reconcile clears it.
        let healed = desired_status(&m, &obs, None, Some(&failed), &at(30));
        assert_eq!(cond(&healed, "Ready").reason, "AllHeadsAvailable");
    }

    #[test]
    fn removed_head_loses_its_condition_and_foreign_conditions_stay() {
        let m = module("orders");
        let obs = ObservedHeads {
            query: Some(dep(1, 1)),
            worker: Some(dep(1, 1)),
        };
        let mut first = desired_status(&m, &obs, None, None, &at(1));
        first.conditions.push(Condition {
            type_: "TopologyReady".into(),
            status: "True".into(),
            reason: "Declared".into(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: at(1),
        });
        let next = desired_status(&worker_only("orders"), &obs, None, Some(&first), &at(2));
        assert!(next.condition("QueryAvailable").is_none());
        assert!(next.query.is_none());
        assert!(next.condition("TopologyReady").is_some());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn a_status_is_a_fixed_point_of_the_same_world(
                qd in 0i32..5, qr in 0i32..5, wd in 0i32..5, wr in 0i32..5,
                t1 in 0i64..1_000_000, dt in 0i64..1_000_000
            ) {
                let m = module("orders");
                let obs = ObservedHeads { query: Some(dep(qd, qr.min(qd))), worker: Some(dep(wd, wr.min(wd))) };
                let first = desired_status(&m, &obs, None, None, &at(t1));
                let second = desired_status(&m, &obs, None, Some(&first), &at(t1 + dt));
                prop_assert_eq!(&first, &second);
                prop_assert!(transitions(Some(&first), &second).is_empty());
            }

            #[test]
            fn ready_exactly_when_every_head_is_available(qd in 1i32..5, qr in 0i32..5, wd in 0i32..5, wr in 0i32..5) {
                let m = module("orders");
                let (qr, wr) = (qr.min(qd), wr.min(wd));
                let obs = ObservedHeads { query: Some(dep(qd, qr)), worker: Some(dep(wd, wr)) };
                let s = desired_status(&m, &obs, None, None, &at(1));
                let expected = qr > 0 && (wd == 0 || wr > 0);
                prop_assert_eq!(cond(&s, "Ready").status == "True", expected);
            }
        }
    }
}
