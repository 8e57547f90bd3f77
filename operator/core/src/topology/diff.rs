//! What separates a broker from a plan. Pure: the declarer acts on it, `topology diff` prints
//! it, the operator reports it.

use std::collections::BTreeSet;

use serde::Serialize;

use super::plan::{ArgValue, PlannedBinding, PlannedExchange, PlannedQueue, TopologyPlan};
use super::report::MIGRATING_SUFFIX;
use super::state::{ActualBinding, BrokerState};

/// An exchange that exists with another type than planned (types never change in place).
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct ExchangeConflict {
    /// Exchange name.
    pub exchange: String,
    /// Type on the broker.
    pub current: String,
    /// Type in the plan.
    pub wanted: String,
}

/// A queue argument that differs between broker and plan. RabbitMQ refuses to redeclare a queue
/// with other arguments (406 PRECONDITION_FAILED), so the declarer leaves such a queue alone
/// and reports this instead; `chimera topology migrate` moves it.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct ArgumentConflict {
    /// Queue name.
    pub queue: String,
    /// Argument name (`x-queue-type`, ...).
    pub argument: String,
    /// Value on the broker (None: not set).
    pub current: Option<String>,
    /// Value in the plan (None: not set).
    pub wanted: Option<String>,
}

/// The changes that make a broker match a plan, and those it cannot make.
#[derive(Serialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct TopologyDiff {
    /// Exchanges to declare.
    pub missing_exchanges: Vec<PlannedExchange>,
    /// Queues to declare.
    pub missing_queues: Vec<PlannedQueue>,
    /// Bindings to create.
    pub missing_bindings: Vec<PlannedBinding>,
    /// Bindings into planned queues, from `chimera.*` exchanges, that the plan no longer has.
    pub stale_bindings: Vec<ActualBinding>,
    /// Exchanges whose type differs.
    pub exchange_conflicts: Vec<ExchangeConflict>,
    /// Queue arguments that differ.
    pub argument_conflicts: Vec<ArgumentConflict>,
    /// Queues being migrated (a `<name>.migrating` queue exists): left alone until it is done.
    pub migrating: Vec<String>,
}

impl TopologyDiff {
    /// Nothing to create or remove.
    pub fn is_converged(&self) -> bool {
        self.missing_exchanges.is_empty()
            && self.missing_queues.is_empty()
            && self.missing_bindings.is_empty()
            && self.stale_bindings.is_empty()
    }

    /// Something the declarer will not change by itself.
    pub fn has_conflicts(&self) -> bool {
        !self.exchange_conflicts.is_empty() || !self.argument_conflicts.is_empty()
    }

    /// Queues the declarer must not redeclare (their arguments differ).
    pub fn conflicting_queues(&self) -> BTreeSet<&str> {
        self.argument_conflicts
            .iter()
            .map(|c| c.queue.as_str())
            .collect()
    }
}

fn render_planned(v: &ArgValue) -> String {
    match v {
        ArgValue::Str(s) => s.clone(),
        ArgValue::Int(i) => i.to_string(),
    }
}

fn render_actual(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// What must change on the broker for it to hold `plan`.
pub fn diff(plan: &TopologyPlan, actual: &BrokerState) -> TopologyDiff {
    let mut out = TopologyDiff::default();
    let on_broker: BTreeSet<&str> = actual.queues.iter().map(|q| q.name.as_str()).collect();
    let migrating: BTreeSet<&str> = plan
        .queues
        .iter()
        .map(|q| q.name.as_str())
        .filter(|name| on_broker.contains(format!("{name}{MIGRATING_SUFFIX}").as_str()))
        .collect();
    out.migrating = migrating.iter().map(|q| (*q).to_owned()).collect();
    for exchange in &plan.exchanges {
        match actual.exchanges.iter().find(|e| e.name == exchange.name) {
            None => out.missing_exchanges.push(exchange.clone()),
            Some(e) if e.kind != exchange.kind.as_str() => {
                out.exchange_conflicts.push(ExchangeConflict {
                    exchange: exchange.name.clone(),
                    current: e.kind.clone(),
                    wanted: exchange.kind.as_str().to_owned(),
                })
            }
            Some(_) => {}
        }
    }
    for queue in plan
        .queues
        .iter()
        .filter(|q| !migrating.contains(q.name.as_str()))
    {
        let Some(existing) = actual.queues.iter().find(|q| q.name == queue.name) else {
            out.missing_queues.push(queue.clone());
            continue;
        };
        let keys: BTreeSet<&String> = queue
            .arguments
            .keys()
            .chain(existing.arguments.keys())
            .collect();
        for key in keys {
            let wanted = queue.arguments.get(key).map(render_planned);
            let current = existing.arguments.get(key).map(render_actual);
            // A classic queue declared without x-queue-type reports none; that is classic.
            let same = wanted == current
                || (key == "x-queue-type"
                    && current.is_none()
                    && wanted.as_deref() == Some("classic"));
            if !same {
                out.argument_conflicts.push(ArgumentConflict {
                    queue: queue.name.clone(),
                    argument: key.clone(),
                    current,
                    wanted,
                });
            }
        }
    }
    let actual_bindings: BTreeSet<(&str, &str, &str)> = actual
        .bindings
        .iter()
        .filter(|b| b.destination_type == "queue")
        .map(|b| {
            (
                b.source.as_str(),
                b.destination.as_str(),
                b.routing_key.as_str(),
            )
        })
        .collect();
    for binding in plan
        .bindings
        .iter()
        .filter(|b| !migrating.contains(b.destination.as_str()))
    {
        let key = (
            binding.source.as_str(),
            binding.destination.as_str(),
            binding.routing_key.as_str(),
        );
        if !actual_bindings.contains(&key) {
            out.missing_bindings.push(binding.clone());
        }
    }
    let planned_queues: BTreeSet<&str> = plan.queues.iter().map(|q| q.name.as_str()).collect();
    let planned_bindings: BTreeSet<(&str, &str, &str)> = plan
        .bindings
        .iter()
        .map(|b| {
            (
                b.source.as_str(),
                b.destination.as_str(),
                b.routing_key.as_str(),
            )
        })
        .collect();
    for b in &actual.bindings {
        let ours = b.destination_type == "queue"
            && planned_queues.contains(b.destination.as_str())
            && !migrating.contains(b.destination.as_str())
            && b.source.starts_with("chimera.");
        if ours
            && !planned_bindings.contains(&(
                b.source.as_str(),
                b.destination.as_str(),
                b.routing_key.as_str(),
            ))
        {
            out.stale_bindings.push(b.clone());
        }
    }
    out.stale_bindings.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::plan::{plan, tests::module};
    use crate::topology::state::{ActualExchange, ActualQueue};
    use proptest::prelude::*;

    fn sample_plan() -> TopologyPlan {
        plan(&[
            module(
                "users",
                serde_json::json!({"image": "u", "commands": ["user.register"],
                "events": {"publishes": ["user.registered"]}, "worker": {"retry": {"delaysSeconds": [2]}}}),
            ),
            module(
                "gigs",
                serde_json::json!({"image": "g",
                "events": {"subscribes": [{"from": "users", "events": ["user.registered"]}]}, "worker": {"retry": {"delaysSeconds": []}}}),
            ),
        ])
    }

    /// The broker state that `plan` produces when declared exactly.
    fn converged(plan: &TopologyPlan) -> BrokerState {
        let to_json = |v: &ArgValue| match v {
            ArgValue::Str(s) => serde_json::Value::String(s.clone()),
            ArgValue::Int(i) => serde_json::Value::from(*i),
        };
        let mut bindings: Vec<ActualBinding> = plan
            .bindings
            .iter()
            .map(|b| ActualBinding {
                source: b.source.clone(),
                destination: b.destination.clone(),
                destination_type: "queue".into(),
                routing_key: b.routing_key.clone(),
            })
            .collect();
        // The default exchange's implicit binding of every queue.
        bindings.extend(plan.queues.iter().map(|q| ActualBinding {
            source: String::new(),
            destination: q.name.clone(),
            destination_type: "queue".into(),
            routing_key: q.name.clone(),
        }));
        BrokerState {
            exchanges: plan
                .exchanges
                .iter()
                .map(|e| ActualExchange {
                    name: e.name.clone(),
                    kind: e.kind.as_str().into(),
                })
                .collect(),
            queues: plan
                .queues
                .iter()
                .map(|q| ActualQueue {
                    name: q.name.clone(),
                    arguments: q
                        .arguments
                        .iter()
                        .map(|(k, v)| (k.clone(), to_json(v)))
                        .collect(),
                    messages_ready: Some(0),
                    messages_unacknowledged: Some(0),
                    consumers: Some(0),
                    message_stats: None,
                })
                .collect(),
            bindings,
        }
    }

    #[test]
    fn an_empty_broker_misses_everything() {
        let p = sample_plan();
        let d = diff(&p, &BrokerState::default());
        assert_eq!(d.missing_exchanges.len(), p.exchanges.len());
        assert_eq!(d.missing_queues.len(), p.queues.len());
        assert_eq!(d.missing_bindings.len(), p.bindings.len());
        assert!(!d.is_converged() && !d.has_conflicts());
    }

    #[test]
    fn a_converged_broker_needs_nothing() {
        let p = sample_plan();
        let d = diff(&p, &converged(&p));
        assert!(d.is_converged() && !d.has_conflicts(), "{d:?}");
    }

    #[test]
    fn drift_is_found() {
        let p = sample_plan();
        let mut state = converged(&p);
        state
            .queues
            .retain(|q| q.name != "chimera.users.worker.retry.1");
        state.bindings.retain(|b| b.routing_key != "user.register");
        state.bindings.push(ActualBinding {
            source: "chimera.users.events".into(),
            destination: "chimera.gigs.worker".into(),
            destination_type: "queue".into(),
            routing_key: "user.deleted".into(),
        });
        // Someone else's binding into our queue from a non-chimera exchange is left alone.
        state.bindings.push(ActualBinding {
            source: "audit".into(),
            destination: "chimera.gigs.worker".into(),
            destination_type: "queue".into(),
            routing_key: "#".into(),
        });
        let d = diff(&p, &state);
        assert_eq!(
            d.missing_queues
                .iter()
                .map(|q| q.name.as_str())
                .collect::<Vec<_>>(),
            ["chimera.users.worker.retry.1"]
        );
        assert_eq!(
            d.missing_bindings
                .iter()
                .map(|b| b.routing_key.as_str())
                .collect::<Vec<_>>(),
            ["user.register"]
        );
        assert_eq!(
            d.stale_bindings
                .iter()
                .map(|b| b.routing_key.as_str())
                .collect::<Vec<_>>(),
            ["user.deleted"]
        );
    }

    #[test]
    fn changed_queue_type_is_a_conflict_not_a_redeclare() {
        let p = sample_plan();
        let mut state = converged(&p);
        if let Some(q) = state
            .queues
            .iter_mut()
            .find(|q| q.name == "chimera.users.worker")
        {
            q.arguments.insert("x-queue-type".into(), "classic".into());
            q.arguments.remove("x-delivery-limit");
        }
        let d = diff(&p, &state);
        assert!(d.has_conflicts());
        let conflicts: Vec<_> = d
            .argument_conflicts
            .iter()
            .map(|c| {
                (
                    c.argument.as_str(),
                    c.current.as_deref(),
                    c.wanted.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            conflicts,
            [
                ("x-delivery-limit", None, Some("20")),
                ("x-queue-type", Some("classic"), Some("quorum"))
            ]
        );
        assert_eq!(
            d.conflicting_queues().into_iter().collect::<Vec<_>>(),
            ["chimera.users.worker"]
        );
    }

    #[test]
    fn a_queue_under_migration_is_left_alone() {
        let p = sample_plan();
        let mut state = converged(&p);
        // Mid-migration: the old queue is gone and its bindings moved to the temporary queue.
        state.queues.retain(|q| q.name != "chimera.users.worker");
        state
            .bindings
            .retain(|b| b.destination != "chimera.users.worker");
        state.queues.push(ActualQueue {
            name: "chimera.users.worker.migrating".into(),
            arguments: Default::default(),
            messages_ready: Some(3),
            messages_unacknowledged: Some(0),
            consumers: Some(0),
            message_stats: None,
        });
        let d = diff(&p, &state);
        assert_eq!(d.migrating, ["chimera.users.worker"]);
        assert!(
            d.missing_queues.is_empty() && d.missing_bindings.is_empty(),
            "{d:?}"
        );
    }

    #[test]
    fn exchange_type_change_is_a_conflict() {
        let p = sample_plan();
        let mut state = converged(&p);
        if let Some(e) = state
            .exchanges
            .iter_mut()
            .find(|e| e.name == "chimera.users.events")
        {
            e.kind = "fanout".into();
        }
        let d = diff(&p, &state);
        assert_eq!(d.exchange_conflicts.len(), 1);
        assert_eq!(d.exchange_conflicts[0].current, "fanout");
    }

    proptest! {
        #[test]
        fn removing_anything_from_a_converged_broker_is_found(drop_queue in any::<prop::sample::Index>(), drop_binding in any::<prop::sample::Index>()) {
            let p = sample_plan();
            let mut state = converged(&p);
            let q = drop_queue.index(state.queues.len());
            let queue = state.queues.remove(q).name;
            let planned: Vec<usize> = state.bindings.iter().enumerate().filter(|(_, b)| !b.source.is_empty()).map(|(i, _)| i).collect();
            let b = planned[drop_binding.index(planned.len())];
            let binding = state.bindings.remove(b);
            let d = diff(&p, &state);
            prop_assert!(d.missing_queues.iter().any(|m| m.name == queue));
            prop_assert!(d.missing_bindings.iter().any(|m| m.routing_key == binding.routing_key && m.destination == binding.destination));
        }
    }
}
