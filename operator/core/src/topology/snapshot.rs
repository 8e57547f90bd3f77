//! A vhost's state indexed by name, so that each module's drift check reads its own few objects
//! from one shared read of the vhost instead of reading the whole vhost itself (which, with a
//! thousand modules, is a thousand reads of everything). What the operator declares is folded
//! in as it goes, so the snapshot stays what the broker holds between reads.

use std::collections::HashMap;

use super::diff::TopologyDiff;
use super::plan::TopologyPlan;
use super::report::MIGRATING_SUFFIX;
use super::state::{ActualBinding, ActualExchange, ActualQueue, BrokerState};

/// A vhost's exchanges and queues by name, and bindings by destination.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    exchanges: HashMap<String, ActualExchange>,
    queues: HashMap<String, ActualQueue>,
    bindings: HashMap<String, Vec<ActualBinding>>,
}

impl From<BrokerState> for Snapshot {
    fn from(state: BrokerState) -> Self {
        let mut bindings: HashMap<String, Vec<ActualBinding>> = HashMap::new();
        for b in state.bindings {
            bindings.entry(b.destination.clone()).or_default().push(b);
        }
        Self {
            exchanges: state
                .exchanges
                .into_iter()
                .map(|e| (e.name.clone(), e))
                .collect(),
            queues: state
                .queues
                .into_iter()
                .map(|q| (q.name.clone(), q))
                .collect(),
            bindings,
        }
    }
}

impl Snapshot {
    /// What of the vhost the diff against `plan` reads: the planned exchanges and queues (and
    /// their migration twins), and every binding into a planned queue.
    pub fn view(&self, plan: &TopologyPlan) -> BrokerState {
        let mut state = BrokerState::default();
        for e in &plan.exchanges {
            if let Some(actual) = self.exchanges.get(&e.name) {
                state.exchanges.push(actual.clone());
            }
        }
        for q in &plan.queues {
            for name in [q.name.clone(), format!("{}{MIGRATING_SUFFIX}", q.name)] {
                if let Some(actual) = self.queues.get(&name) {
                    state.queues.push(actual.clone());
                }
            }
            if let Some(bindings) = self.bindings.get(&q.name) {
                state.bindings.extend(bindings.iter().cloned());
            }
        }
        state
    }

    /// Folds in what applying `diff` declared and removed (conflicting queues stay as they are:
    /// they were not redeclared).
    pub fn record(&mut self, diff: &TopologyDiff) {
        for e in &diff.missing_exchanges {
            self.exchanges.insert(
                e.name.clone(),
                ActualExchange {
                    name: e.name.clone(),
                    kind: e.kind.as_str().to_owned(),
                },
            );
        }
        for q in &diff.missing_queues {
            self.queues.insert(
                q.name.clone(),
                ActualQueue {
                    name: q.name.clone(),
                    arguments: q
                        .arguments
                        .iter()
                        .map(|(k, v)| (k.clone(), v.to_json()))
                        .collect(),
                    ..ActualQueue::default()
                },
            );
        }
        for b in &diff.missing_bindings {
            self.bindings
                .entry(b.destination.clone())
                .or_default()
                .push(ActualBinding {
                    source: b.source.clone(),
                    destination: b.destination.clone(),
                    destination_type: "queue".to_owned(),
                    routing_key: b.routing_key.clone(),
                });
        }
        for stale in &diff.stale_bindings {
            if let Some(bindings) = self.bindings.get_mut(&stale.destination) {
                bindings.retain(|b| b != stale);
            }
        }
    }

    /// Forgets the bindings into queue `queue` except those from `keep` (what releasing a
    /// retained queue unbinds).
    pub fn unbind_into(&mut self, queue: &str, keep: &[String]) {
        if let Some(bindings) = self.bindings.get_mut(queue) {
            bindings.retain(|b| b.source.is_empty() || keep.contains(&b.source));
        }
    }

    /// Forgets queue `name` (deleted) and the bindings into it.
    pub fn forget_queue(&mut self, name: &str) {
        self.queues.remove(name);
        self.bindings.remove(name);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::topology::diff::diff;
    use crate::topology::plan::tests::marketplace;
    use crate::topology::plan::{module_key, plan};

    fn actual_of(plan: &TopologyPlan) -> BrokerState {
        let mut snapshot = Snapshot::default();
        snapshot.record(&diff(plan, &BrokerState::default()));
        let mut state = snapshot.view(plan);
        // Something of someone else's, which no module's view includes.
        state.queues.push(ActualQueue {
            name: "other.queue".into(),
            ..ActualQueue::default()
        });
        state
    }

    #[test]
    fn a_modules_view_diffs_as_the_whole_vhost_does() {
        let modules = marketplace();
        let whole = plan(&modules);
        let mut broker = actual_of(&whole);
        // Drift: a queue gone, a binding left over, a binding of someone else's.
        broker
            .queues
            .retain(|q| q.name != "chimera.orders.worker.retry.1");
        broker.bindings.push(ActualBinding {
            source: "chimera.gigs.events".into(),
            destination: "chimera.orders.worker".into(),
            destination_type: "queue".into(),
            routing_key: "gig.gone".into(),
        });
        let snapshot = Snapshot::from(broker.clone());
        for m in &modules {
            let owned = whole.for_domain(m.domain(), &module_key(m));
            assert_eq!(
                diff(&owned, &snapshot.view(&owned)),
                diff(&owned, &broker),
                "{}",
                m.domain()
            );
        }
    }

    #[test]
    fn what_was_declared_is_converged_in_the_snapshot() {
        let modules = marketplace();
        let whole = plan(&modules);
        let mut snapshot = Snapshot::default();
        for m in &modules {
            let owned = whole.for_domain(m.domain(), &module_key(m));
            let d = diff(&owned, &snapshot.view(&owned));
            assert!(!d.is_converged());
            snapshot.record(&d);
            assert!(
                diff(&owned, &snapshot.view(&owned)).is_converged(),
                "{}",
                m.domain()
            );
        }
        snapshot.forget_queue("chimera.orders.worker");
        let orders = modules.iter().find(|m| m.domain() == "orders").unwrap();
        let owned = whole.for_domain("orders", &module_key(orders));
        assert_eq!(
            diff(&owned, &snapshot.view(&owned)).missing_queues.len(),
            1,
            "a forgotten queue is missing again"
        );
    }
}
