//! What a module's own broker user may do, as RabbitMQ permissions: regular expressions on
//! resource names (configure, write, read) plus topic permissions on routing keys.
//!
//! The rules (docs/operator.md, "Broker users"):
//! - configure nothing: the control plane declares every exchange, queue and binding;
//! - read only its worker queue (consuming is a read of the queue);
//! - write its events exchange (and, by topic permission, only the event names it declares),
//!   its failures exchange (retries and dead letters), and the commands exchanges of the
//!   domains in `spec.sendsCommandsTo`. Never the default exchange: a grant there reaches
//!   every queue of the vhost.

use serde::Serialize;

use crate::api::ChimeraModule;
use chimera_contract::names;

/// The regular expression RabbitMQ reads as "no resource at all".
pub const NOTHING: &str = "^$";

/// A user's permissions on one vhost.
#[derive(Serialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Grants {
    /// Resources the user may declare or delete.
    pub configure: String,
    /// Exchanges the user may publish to (and queues it may bind, which it cannot declare).
    pub write: String,
    /// Queues the user may consume (and exchanges it may bind from).
    pub read: String,
    /// Routing keys per topic exchange, sorted by exchange.
    pub topics: Vec<TopicGrant>,
}

/// Routing keys a user may publish with (write) and bind with (read) on one topic exchange.
#[derive(Serialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicGrant {
    /// The topic exchange.
    pub exchange: String,
    /// Routing keys it may publish with.
    pub write: String,
    /// Routing keys it may bind with.
    pub read: String,
}

/// A pattern matching exactly the given names (and nothing when there are none). Names are
/// escaped: a `.` in `chimera.orders.events` is a dot, not "any character".
pub fn exactly<S: AsRef<str>>(names: &[S]) -> String {
    let mut escaped: Vec<String> = names.iter().map(|n| regex::escape(n.as_ref())).collect();
    escaped.sort();
    escaped.dedup();
    match escaped.as_slice() {
        [] => NOTHING.to_owned(),
        [one] => format!("^{one}$"),
        many => format!("^({})$", many.join("|")),
    }
}

/// The grants of `module`'s own user.
pub fn grants(module: &ChimeraModule) -> Grants {
    let domain = module.domain();
    let spec = &module.spec;
    let events = names::events_exchange(domain);

    let mut write = Vec::new();
    if !spec.events.publishes.is_empty() {
        write.push(events.clone());
    }
    let mut read = Vec::new();
    if spec.worker.is_some() {
        write.push(names::failures_exchange(domain));
        read.push(names::worker_queue(domain));
    }
    write.extend(
        spec.sends_commands_to
            .iter()
            .map(|to| names::commands_exchange(to)),
    );
    let topics = if spec.events.publishes.is_empty() {
        Vec::new()
    } else {
        vec![TopicGrant {
            exchange: events,
            write: exactly(&spec.events.publishes),
            read: NOTHING.to_owned(),
        }]
    };
    Grants {
        configure: NOTHING.to_owned(),
        write: exactly(&write),
        read: exactly(&read),
        topics,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::fixtures::module;
    use proptest::prelude::*;
    use regex::Regex;

    fn allows(pattern: &str, name: &str) -> bool {
        Regex::new(pattern)
            .unwrap_or_else(|e| panic!("{pattern}: {e}"))
            .is_match(name)
    }

    #[test]
    fn an_orders_user_reaches_its_own_resources_only() {
        let mut orders = module("orders");
        orders.spec.sends_commands_to = vec!["gigs".into()];
        let g = grants(&orders);
        assert_eq!(g.configure, "^$");
        // ("" never reaches a check: the default exchange is checked as `amq.default`.)
        for name in ["chimera.orders.worker", "amq.default", "anything"] {
            assert!(!allows(&g.configure, name), "configure {name:?}");
        }
        for ok in [
            "chimera.orders.events",
            "chimera.orders.worker.failures",
            "chimera.gigs.commands",
        ] {
            assert!(allows(&g.write, ok), "write {ok}");
        }
        for refused in [
            "chimera.users.events",
            "chimera.orders.commands",
            "chimera.users.commands",
            "chimera.users.worker.failures",
            "amq.default",
            "chimeraXordersXevents",
            "chimera.orders.events.x",
        ] {
            assert!(!allows(&g.write, refused), "write {refused:?}");
        }
        assert!(allows(&g.read, "chimera.orders.worker"));
        for refused in [
            "chimera.users.worker",
            "chimera.orders.worker.dlq",
            "chimera.orders.worker.retry.1",
            "chimera.orders.events",
        ] {
            assert!(!allows(&g.read, refused), "read {refused}");
        }
        assert_eq!(g.topics.len(), 1);
        let topic = &g.topics[0];
        assert_eq!(topic.exchange, "chimera.orders.events");
        assert!(allows(&topic.write, "order.placed"));
        assert!(!allows(&topic.write, "user.registered"));
        assert!(!allows(&topic.write, "order.placed.x"));
        assert_eq!(topic.read, "^$");
    }

    #[test]
    fn a_module_without_a_worker_reads_nothing() {
        let mut m = module("catalog");
        m.spec.worker = None;
        m.spec.events.publishes.clear();
        let g = grants(&m);
        assert_eq!((g.write.as_str(), g.read.as_str()), ("^$", "^$"));
        assert!(g.topics.is_empty());
    }

    #[test]
    fn patterns_are_sorted_and_deduplicated() {
        assert_eq!(exactly::<&str>(&[]), "^$");
        assert_eq!(exactly(&["b.c", "a", "b.c"]), r"^(a|b\.c)$");
    }

    proptest! {
        /// The pattern matches each given name and nothing that differs from all of them.
        #[test]
        fn exactly_matches_the_names_and_nothing_else(
            names in proptest::collection::vec("[a-z.()|*+?^$\\\\]{1,8}", 0..5),
            other in "[a-z.()|*+?^$\\\\]{1,9}",
        ) {
            let pattern = exactly(&names);
            for name in &names {
                prop_assert!(allows(&pattern, name), "{pattern} refuses {name}");
            }
            prop_assert_eq!(allows(&pattern, &other), names.contains(&other));
        }
    }
}
