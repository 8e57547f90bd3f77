//! The topology planner: from a set of ChimeraModules, the RabbitMQ objects that must exist and
//! what is wrong with the graph. Pure and deterministic: the same modules, in any order, give the
//! same plan.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::pattern::topic_matches;
use crate::api::{ChimeraModule, QueueOverflow, QueueType};
use chimera_contract::names;

/// How many times a quorum worker queue redelivers a message whose consumer died before it
/// settled (a handler that crashes the process) before dead-lettering it to the dlq. The worker
/// runtime settles every message it can decode itself; this is the net under a crash loop.
pub const POISON_DELIVERY_LIMIT: i64 = 20;

/// Exchange type.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    /// Routes by AMQP topic pattern (events).
    Topic,
    /// Routes by exact routing key (commands).
    Direct,
}

impl ExchangeKind {
    /// The name RabbitMQ uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Topic => "topic",
            Self::Direct => "direct",
        }
    }
}

/// A durable exchange the plan declares.
#[derive(Serialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PlannedExchange {
    /// Exchange name.
    pub name: String,
    /// Exchange type.
    #[serde(rename = "type")]
    pub kind: ExchangeKind,
    /// The domain that owns it.
    pub domain: String,
}

/// A queue argument value (`x-...`).
#[derive(Serialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(untagged)]
pub enum ArgValue {
    /// A string argument.
    Str(String),
    /// An integer argument.
    Int(i64),
}

impl ArgValue {
    /// As the management API reports it.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            ArgValue::Str(s) => serde_json::Value::String(s.clone()),
            ArgValue::Int(i) => serde_json::Value::from(*i),
        }
    }
}

/// What a queue is for.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum QueueRole {
    /// The worker head's queue.
    Worker,
    /// A retry delay queue.
    Retry,
    /// The parking queue of messages that exhausted their attempts.
    DeadLetter,
}

/// A durable queue the plan declares.
#[derive(Serialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PlannedQueue {
    /// Queue name.
    pub name: String,
    /// The domain that owns it.
    pub domain: String,
    /// What it is for.
    pub role: QueueRole,
    /// Declaration arguments (`x-queue-type`, `x-message-ttl`, ...).
    pub arguments: BTreeMap<String, ArgValue>,
}

impl PlannedQueue {
    /// Whether the plan makes it a quorum queue.
    pub fn is_quorum(&self) -> bool {
        self.arguments.get("x-queue-type") == Some(&ArgValue::Str("quorum".to_owned()))
    }
}

/// A binding from an exchange to a queue.
#[derive(Serialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PlannedBinding {
    /// Source exchange.
    pub source: String,
    /// Destination queue.
    pub destination: String,
    /// Routing key (a command name or an event pattern).
    pub routing_key: String,
    /// The domain whose queue it feeds.
    pub domain: String,
}

/// How bad a finding is.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The topology does not do what the modules say: `TopologyReady=False`, CLI exits non-zero.
    Error,
    /// Works, but worth a look.
    Warning,
}

impl Severity {
    /// `error` or `warning`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

/// What kind of problem a finding is (its `reason` in conditions and Events).
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FindingCode {
    /// A subscription names a domain no module owns.
    UnknownDomain,
    /// A subscription pattern matches none of the publishing domain's events.
    UnpublishedEvent,
    /// Two modules claim the same domain.
    DomainClash,
    /// Domains subscribe to each other in a cycle.
    SubscriptionCycle,
}

impl FindingCode {
    /// The condition reason (`TopologyReady`) of a module with this finding.
    pub fn reason(self) -> &'static str {
        match self {
            Self::UnknownDomain => "UnknownDomain",
            Self::UnpublishedEvent => "UnpublishedEvent",
            Self::DomainClash => "DomainClash",
            Self::SubscriptionCycle => "SubscriptionCycle",
        }
    }
}

/// One problem with the graph, attached to the module that has it.
#[derive(Serialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finding {
    /// The module (`namespace/name`, or `name` outside a cluster).
    pub module: String,
    /// Error or warning.
    pub severity: Severity,
    /// Kind of problem.
    pub code: FindingCode,
    /// What is wrong and what to do, in words.
    pub message: String,
}

/// The whole desired topology and its findings.
#[derive(Serialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct TopologyPlan {
    /// Exchanges, by name.
    pub exchanges: Vec<PlannedExchange>,
    /// Queues, by name.
    pub queues: Vec<PlannedQueue>,
    /// Bindings, by source, destination and routing key.
    pub bindings: Vec<PlannedBinding>,
    /// Findings, by module, severity and code.
    pub findings: Vec<Finding>,
}

impl TopologyPlan {
    /// Whether any finding is an error.
    pub fn has_errors(&self) -> bool {
        self.findings.iter().any(|f| f.severity == Severity::Error)
    }

    /// The part of the plan one domain needs: its exchanges and queues, the bindings into its
    /// queues and the exchanges they come from (declaring an exchange is idempotent), plus the
    /// findings of the module `module`.
    pub fn for_domain(&self, domain: &str, module: &str) -> TopologyPlan {
        let bindings: Vec<PlannedBinding> = self
            .bindings
            .iter()
            .filter(|b| b.domain == domain)
            .cloned()
            .collect();
        TopologyPlan {
            exchanges: self
                .exchanges
                .iter()
                .filter(|e| e.domain == domain || bindings.iter().any(|b| b.source == e.name))
                .cloned()
                .collect(),
            queues: self
                .queues
                .iter()
                .filter(|q| q.domain == domain)
                .cloned()
                .collect(),
            bindings,
            findings: self
                .findings
                .iter()
                .filter(|f| f.module == module)
                .cloned()
                .collect(),
        }
    }
}

/// A module's identity in findings: `namespace/name`, or `name` when it has no namespace.
pub fn module_key(module: &ChimeraModule) -> String {
    let name = module.metadata.name.as_deref().unwrap_or("<unnamed>");
    match &module.metadata.namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

fn text(s: &str) -> ArgValue {
    ArgValue::Str(s.to_owned())
}

fn queue_type(t: QueueType) -> ArgValue {
    text(match t {
        QueueType::Quorum => "quorum",
        QueueType::Classic => "classic",
    })
}

/// Plans the whole topology of `modules` (one namespace, or the files given to the CLI).
pub fn plan(modules: &[ChimeraModule]) -> TopologyPlan {
    let mut sorted: Vec<&ChimeraModule> = modules.iter().collect();
    sorted.sort_by_key(|m| module_key(m));

    let mut out = TopologyPlan::default();
    // domain -> the module that owns it (the first by namespace/name wins a clash).
    let mut owners: BTreeMap<&str, &ChimeraModule> = BTreeMap::new();
    for module in &sorted {
        let domain = module.domain();
        if let Some(first) = owners.get(domain) {
            out.findings.push(Finding {
                module: module_key(module),
                severity: Severity::Error,
                code: FindingCode::DomainClash,
                message: format!(
                    "domain \"{domain}\" is already owned by {}; this module's topology is not declared",
                    module_key(first)
                ),
            });
            continue;
        }
        owners.insert(domain, module);
    }

    let mut bindings = BTreeSet::new();
    for (domain, module) in &owners {
        plan_module(domain, module, &owners, &mut out, &mut bindings);
    }
    out.bindings = bindings.into_iter().collect();
    out.findings.extend(cycles(&owners));
    out.exchanges.sort();
    out.queues.sort();
    out.findings.sort();
    out
}

fn plan_module(
    domain: &str,
    module: &ChimeraModule,
    owners: &BTreeMap<&str, &ChimeraModule>,
    out: &mut TopologyPlan,
    bindings: &mut BTreeSet<PlannedBinding>,
) {
    let spec = &module.spec;
    for (name, kind) in [
        (names::events_exchange(domain), ExchangeKind::Topic),
        (names::commands_exchange(domain), ExchangeKind::Direct),
    ] {
        out.exchanges.push(PlannedExchange {
            name,
            kind,
            domain: domain.to_owned(),
        });
    }
    let Some(worker) = &spec.worker else { return };

    let worker_queue = names::worker_queue(domain);
    let dlq = names::dead_letter_queue(domain);
    // Failed messages go to their retry queue or the dlq through the worker's own exchange,
    // routed by queue name (the contract's failures exchange).
    let failures = names::failures_exchange(domain);
    out.exchanges.push(PlannedExchange {
        name: failures.clone(),
        kind: ExchangeKind::Direct,
        domain: domain.to_owned(),
    });
    let mut failure_route = |queue: &str| {
        bindings.insert(PlannedBinding {
            source: failures.clone(),
            destination: queue.to_owned(),
            routing_key: queue.to_owned(),
            domain: domain.to_owned(),
        });
    };
    failure_route(&dlq);
    for n in 1..=worker.retry.delays_seconds.len() {
        failure_route(&names::retry_queue(domain, n));
    }
    let ty = queue_type(worker.queue.queue_type);
    let reject_publish = worker.queue.overflow == QueueOverflow::RejectPublish;
    let quorum = worker.queue.queue_type == QueueType::Quorum;

    let mut args = BTreeMap::from([
        ("x-queue-type".to_owned(), ty.clone()),
        ("x-dead-letter-exchange".to_owned(), text("")),
        ("x-dead-letter-routing-key".to_owned(), text(&dlq)),
        (
            "x-overflow".to_owned(),
            text(if reject_publish {
                "reject-publish"
            } else {
                "drop-head"
            }),
        ),
    ]);
    if let Some(max) = worker.queue.max_length {
        args.insert("x-max-length".to_owned(), ArgValue::Int(max));
    }
    if quorum {
        args.insert(
            "x-delivery-limit".to_owned(),
            ArgValue::Int(POISON_DELIVERY_LIMIT),
        );
        if reject_publish {
            // Dead-lettering without loss needs both (RabbitMQ's rule for quorum queues).
            args.insert("x-dead-letter-strategy".to_owned(), text("at-least-once"));
        }
    }
    out.queues.push(PlannedQueue {
        name: worker_queue.clone(),
        domain: domain.to_owned(),
        role: QueueRole::Worker,
        arguments: args,
    });

    for (i, delay) in worker.retry.delays_seconds.iter().enumerate() {
        let mut args = BTreeMap::from([
            ("x-queue-type".to_owned(), ty.clone()),
            (
                "x-message-ttl".to_owned(),
                ArgValue::Int(delay.saturating_mul(1000)),
            ),
            ("x-dead-letter-exchange".to_owned(), text("")),
            ("x-dead-letter-routing-key".to_owned(), text(&worker_queue)),
        ]);
        if quorum {
            args.insert("x-overflow".to_owned(), text("reject-publish"));
            args.insert("x-dead-letter-strategy".to_owned(), text("at-least-once"));
        }
        out.queues.push(PlannedQueue {
            name: names::retry_queue(domain, i + 1),
            domain: domain.to_owned(),
            role: QueueRole::Retry,
            arguments: args,
        });
    }
    out.queues.push(PlannedQueue {
        name: dlq,
        domain: domain.to_owned(),
        role: QueueRole::DeadLetter,
        arguments: BTreeMap::from([("x-queue-type".to_owned(), ty)]),
    });

    let commands = names::commands_exchange(domain);
    for command in &spec.commands {
        bindings.insert(PlannedBinding {
            source: commands.clone(),
            destination: worker_queue.clone(),
            routing_key: command.clone(),
            domain: domain.to_owned(),
        });
    }
    for (i, subscription) in spec.events.subscribes.iter().enumerate() {
        let from = subscription.from.as_str();
        let publisher = owners.get(from);
        if publisher.is_none() {
            out.findings.push(Finding {
                module: module_key(module),
                severity: Severity::Error,
                code: FindingCode::UnknownDomain,
                message: format!(
                    "spec.events.subscribes[{i}]: no module owns domain \"{from}\"; nothing will be delivered until one does"
                ),
            });
        }
        for pattern in &subscription.events {
            if let Some(publisher) = publisher {
                let published = &publisher.spec.events.publishes;
                if !published.iter().any(|event| topic_matches(pattern, event)) {
                    out.findings.push(Finding {
                        module: module_key(module),
                        severity: Severity::Error,
                        code: FindingCode::UnpublishedEvent,
                        message: format!(
                            "spec.events.subscribes[{i}]: \"{pattern}\" matches no event domain \"{from}\" publishes ({})",
                            if published.is_empty() { "none".to_owned() } else { published.join(", ") }
                        ),
                    });
                }
            }
            // Bound even when the publisher is missing or silent: the binding costs nothing
            // and delivery starts the moment the publisher exists or adds the event.
            bindings.insert(PlannedBinding {
                source: names::events_exchange(from),
                destination: worker_queue.clone(),
                routing_key: pattern.clone(),
                domain: domain.to_owned(),
            });
        }
    }
    // An unknown publisher's events exchange is declared so the bindings above can exist.
    for s in spec
        .events
        .subscribes
        .iter()
        .filter(|s| !owners.contains_key(s.from.as_str()))
    {
        let exchange = PlannedExchange {
            name: names::events_exchange(&s.from),
            kind: ExchangeKind::Topic,
            domain: s.from.clone(),
        };
        if !out.exchanges.contains(&exchange) {
            out.exchanges.push(exchange);
        }
    }
}

/// Cycles in "subscribes to" between domains, each reported once, on every module in it.
fn cycles(owners: &BTreeMap<&str, &ChimeraModule>) -> Vec<Finding> {
    let edges: BTreeMap<&str, BTreeSet<&str>> = owners
        .iter()
        .map(|(domain, m)| {
            let targets = m
                .spec
                .events
                .subscribes
                .iter()
                .map(|s| s.from.as_str())
                .filter(|from| owners.contains_key(from))
                .collect();
            (*domain, targets)
        })
        .collect();
    let mut found: BTreeSet<Vec<&str>> = BTreeSet::new();
    for start in edges.keys() {
        let mut path = vec![*start];
        walk(start, &edges, &mut path, &mut found);
    }
    let mut findings = Vec::new();
    for cycle in found {
        let mut shown: Vec<&str> = cycle.clone();
        shown.push(cycle[0]);
        let message = format!(
            "domains subscribe to each other in a cycle ({}): an event can cause events that come back; make sure the loop ends",
            shown.join(" <- ")
        );
        for domain in &cycle {
            if let Some(m) = owners.get(domain) {
                findings.push(Finding {
                    module: module_key(m),
                    severity: Severity::Warning,
                    code: FindingCode::SubscriptionCycle,
                    message: message.clone(),
                });
            }
        }
    }
    findings
}

/// Depth-first search for simple cycles back to `path[0]`, stored in canonical rotation (the
/// smallest domain first) so each cycle is found once.
fn walk<'a>(
    at: &'a str,
    edges: &BTreeMap<&'a str, BTreeSet<&'a str>>,
    path: &mut Vec<&'a str>,
    found: &mut BTreeSet<Vec<&'a str>>,
) {
    for next in edges.get(at).into_iter().flatten() {
        if *next == path[0] {
            let min = path
                .iter()
                .enumerate()
                .min_by_key(|(_, d)| **d)
                .map(|(i, _)| i)
                .unwrap_or(0);
            let mut cycle = path[min..].to_vec();
            cycle.extend_from_slice(&path[..min]);
            found.insert(cycle);
        } else if !path.contains(next) && *next > path[0] {
            // Only extend through domains greater than the start: every cycle is then walked
            // from its smallest domain, which bounds the search.
            path.push(next);
            walk(next, edges, path, found);
            path.pop();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::api::ChimeraModuleSpec;
    use proptest::prelude::*;

    pub(crate) fn module(name: &str, spec: serde_json::Value) -> ChimeraModule {
        let spec: ChimeraModuleSpec =
            serde_json::from_value(spec).unwrap_or_else(|e| panic!("{e}"));
        let mut m = ChimeraModule::new(name, spec);
        m.metadata.namespace = Some("shop".into());
        m
    }

    pub(crate) fn marketplace() -> Vec<ChimeraModule> {
        vec![
            module(
                "users",
                serde_json::json!({
                "image": "u", "commands": ["user.register"],
                "events": {"publishes": ["user.registered", "user.deleted"]},
                "worker": {}}),
            ),
            module(
                "gigs",
                serde_json::json!({
                "image": "g", "commands": ["gig.publish"],
                "events": {"publishes": ["gig.published", "gig.paused"],
                           "subscribes": [{"from": "users", "events": ["user.registered", "user.deleted"]}]},
                "worker": {"queue": {"type": "classic"}, "retry": {"delaysSeconds": [5]}}}),
            ),
            module(
                "orders",
                serde_json::json!({
                "image": "o", "commands": ["order.place"],
                "events": {"publishes": ["order.placed"],
                           "subscribes": [{"from": "gigs", "events": ["gig.*"]}, {"from": "users", "events": ["user.deleted"]}]},
                "worker": {"queue": {"maxLength": 1000}}}),
            ),
        ]
    }

    fn binding<'a>(p: &'a TopologyPlan, source: &str, key: &str) -> Option<&'a PlannedBinding> {
        p.bindings
            .iter()
            .find(|b| b.source == source && b.routing_key == key)
    }

    #[test]
    fn the_marketplace_plan() {
        let p = plan(&marketplace());
        assert!(p.findings.is_empty(), "{:?}", p.findings);
        let exchanges: Vec<_> = p
            .exchanges
            .iter()
            .map(|e| (e.name.as_str(), e.kind))
            .collect();
        assert!(exchanges.contains(&("chimera.users.events", ExchangeKind::Topic)));
        assert!(exchanges.contains(&("chimera.orders.commands", ExchangeKind::Direct)));
        assert!(exchanges.contains(&("chimera.gigs.worker.failures", ExchangeKind::Direct)));
        // events, commands and failures of each domain
        assert_eq!(p.exchanges.len(), 9);
        // worker + 3 default retries + dlq for users and orders; worker + 1 retry + dlq for gigs
        assert_eq!(p.queues.len(), 5 + 5 + 3);
        let b = binding(&p, "chimera.gigs.events", "gig.*").expect("orders bound to gigs");
        assert_eq!(b.destination, "chimera.orders.worker");
        let b = binding(&p, "chimera.users.commands", "user.register").expect("command binding");
        assert_eq!(b.destination, "chimera.users.worker");
        let b = binding(
            &p,
            "chimera.users.worker.failures",
            "chimera.users.worker.retry.2",
        )
        .expect("failures route to a retry queue");
        assert_eq!(b.destination, "chimera.users.worker.retry.2");
        let b = binding(
            &p,
            "chimera.gigs.worker.failures",
            "chimera.gigs.worker.dlq",
        )
        .expect("failures route to the dlq");
        assert_eq!(b.destination, "chimera.gigs.worker.dlq");
        // commands and events, then the failures routes (one per retry queue and dlq)
        assert_eq!(p.bindings.len(), 1 + 3 + 3 + 4 + 4 + 2);
    }

    #[test]
    fn queue_arguments_follow_the_spec() {
        let p = plan(&marketplace());
        let q = |name: &str| {
            p.queues
                .iter()
                .find(|q| q.name == name)
                .unwrap_or_else(|| panic!("{name}"))
        };
        let orders = q("chimera.orders.worker");
        assert_eq!(
            orders.arguments["x-queue-type"],
            ArgValue::Str("quorum".into())
        );
        assert_eq!(orders.arguments["x-max-length"], ArgValue::Int(1000));
        assert_eq!(
            orders.arguments["x-dead-letter-routing-key"],
            ArgValue::Str("chimera.orders.worker.dlq".into())
        );
        assert_eq!(
            orders.arguments["x-delivery-limit"],
            ArgValue::Int(POISON_DELIVERY_LIMIT)
        );
        assert_eq!(
            orders.arguments["x-dead-letter-strategy"],
            ArgValue::Str("at-least-once".into())
        );
        let retry = q("chimera.gigs.worker.retry.1");
        assert_eq!(retry.arguments["x-message-ttl"], ArgValue::Int(5000));
        assert_eq!(
            retry.arguments["x-dead-letter-routing-key"],
            ArgValue::Str("chimera.gigs.worker".into())
        );
        assert_eq!(
            retry.arguments["x-queue-type"],
            ArgValue::Str("classic".into())
        );
        assert!(
            !q("chimera.gigs.worker")
                .arguments
                .contains_key("x-delivery-limit")
        );
        assert_eq!(
            q("chimera.users.worker.retry.3").arguments["x-message-ttl"],
            ArgValue::Int(60_000)
        );
        assert_eq!(q("chimera.users.worker.dlq").role, QueueRole::DeadLetter);
    }

    #[test]
    fn a_module_without_worker_has_exchanges_only() {
        let p = plan(&[module(
            "catalog",
            serde_json::json!({"image": "c", "query": {}, "events": {"publishes": ["item.added"]}}),
        )]);
        assert_eq!(p.exchanges.len(), 2);
        assert!(p.queues.is_empty() && p.bindings.is_empty());
    }

    #[test]
    fn unknown_domain_and_unpublished_event_are_errors() {
        let mut modules = marketplace();
        modules.push(module("reviews", serde_json::json!({
            "image": "r",
            "events": {"subscribes": [{"from": "payments", "events": ["payment.done"]},
                                      {"from": "orders", "events": ["order.completed", "order.*"]}]},
            "worker": {}})));
        let p = plan(&modules);
        assert!(p.has_errors());
        let codes: Vec<_> = p
            .findings
            .iter()
            .map(|f| (f.module.as_str(), f.code))
            .collect();
        assert_eq!(
            codes,
            [
                ("shop/reviews", FindingCode::UnknownDomain),
                ("shop/reviews", FindingCode::UnpublishedEvent)
            ]
        );
        assert!(p.findings[0].message.contains("\"payments\""));
        assert!(p.findings[1].message.contains(
            "\"order.completed\" matches no event domain \"orders\" publishes (order.placed)"
        ));
        // Still bound, and the unknown publisher's exchange exists so the binding can.
        assert!(binding(&p, "chimera.payments.events", "payment.done").is_some());
        assert!(
            p.exchanges
                .iter()
                .any(|e| e.name == "chimera.payments.events")
        );
    }

    #[test]
    fn a_domain_claimed_twice_is_an_error_and_the_first_wins() {
        let mut modules = marketplace();
        let mut copy = module(
            "users-v2",
            serde_json::json!({"image": "u2", "domain": "users", "worker": {}}),
        );
        copy.spec.domain = Some("users".into());
        modules.push(copy);
        let p = plan(&modules);
        let clash = p
            .findings
            .iter()
            .find(|f| f.code == FindingCode::DomainClash)
            .expect("clash");
        assert_eq!(clash.module, "shop/users-v2");
        assert!(clash.message.contains("shop/users"));
        assert_eq!(
            p.queues
                .iter()
                .filter(|q| q.name == "chimera.users.worker")
                .count(),
            1
        );
    }

    #[test]
    fn cycles_are_warnings_on_every_module_in_them() {
        let modules = vec![
            module(
                "a",
                serde_json::json!({"image": "x", "events": {"publishes": ["a.x"], "subscribes": [{"from": "b", "events": ["#"]}]}, "worker": {}}),
            ),
            module(
                "b",
                serde_json::json!({"image": "x", "events": {"publishes": ["b.x"], "subscribes": [{"from": "c", "events": ["#"]}]}, "worker": {}}),
            ),
            module(
                "c",
                serde_json::json!({"image": "x", "events": {"publishes": ["c.x"], "subscribes": [{"from": "a", "events": ["#"]}]}, "worker": {}}),
            ),
        ];
        let p = plan(&modules);
        assert!(!p.has_errors());
        let cycle: Vec<_> = p
            .findings
            .iter()
            .filter(|f| f.code == FindingCode::SubscriptionCycle)
            .collect();
        assert_eq!(cycle.len(), 3, "{cycle:?}");
        assert!(
            cycle
                .iter()
                .all(|f| f.severity == Severity::Warning && f.message.contains("a <- b <- c <- a"))
        );
    }

    #[test]
    fn for_domain_keeps_what_the_domain_owns() {
        let p = plan(&marketplace());
        let orders = p.for_domain("orders", "shop/orders");
        assert!(orders.queues.iter().all(|q| q.domain == "orders"));
        // Two subscriptions and a command, then its failures routes (3 retries and the dlq).
        assert_eq!(orders.bindings.len(), 2 + 1 + 4);
        // Its own three, plus the events exchanges of gigs and users it is bound to.
        assert_eq!(orders.exchanges.len(), 5);
    }

    fn arbitrary_modules() -> impl Strategy<Value = Vec<ChimeraModule>> {
        let domain = prop::sample::select(vec!["a", "b", "c", "d"]);
        let one = (
            domain.clone(),
            prop::collection::vec(
                (domain, prop::sample::select(vec!["x.y", "*.y", "#", "x.*"])),
                0..3,
            ),
            any::<bool>(),
        )
            .prop_map(|(d, subs, worker)| {
                let subscribes: Vec<_> = subs
                    .iter()
                    .map(|(from, p)| serde_json::json!({"from": from, "events": [p]}))
                    .collect();
                let mut spec = serde_json::json!({"image": "i", "domain": d, "commands": ["c.run"],
                    "events": {"publishes": ["x.y"], "subscribes": subscribes}, "query": {}});
                if worker || !subs.is_empty() {
                    spec["worker"] = serde_json::json!({});
                }
                spec
            });
        prop::collection::vec(one, 0..6).prop_map(|specs| {
            specs
                .into_iter()
                .enumerate()
                .map(|(i, s)| module(&format!("m{i}"), s))
                .collect()
        })
    }

    proptest! {
        #[test]
        fn names_are_unique_and_order_does_not_matter(modules in arbitrary_modules(), seed in any::<u64>()) {
            let p = plan(&modules);
            let exchanges: BTreeSet<_> = p.exchanges.iter().map(|e| &e.name).collect();
            prop_assert_eq!(exchanges.len(), p.exchanges.len());
            let queues: BTreeSet<_> = p.queues.iter().map(|q| &q.name).collect();
            prop_assert_eq!(queues.len(), p.queues.len());
            let bindings: BTreeSet<_> = p.bindings.iter().map(|b| (&b.source, &b.destination, &b.routing_key)).collect();
            prop_assert_eq!(bindings.len(), p.bindings.len());
            // Every binding joins a planned exchange to a planned queue.
            for b in &p.bindings {
                prop_assert!(exchanges.contains(&b.source), "{:?}", b);
                prop_assert!(queues.contains(&b.destination), "{:?}", b);
            }
            let mut shuffled = modules.clone();
            let n = shuffled.len().max(1);
            shuffled.rotate_left((seed as usize) % n);
            shuffled.reverse();
            prop_assert_eq!(plan(&shuffled), p);
        }
    }
}
