//! Who depends on whom among a namespace's modules, kept as modules change, so that a change
//! requeues only the modules whose plan it can alter, and a module is planned from the few
//! modules its plan reads instead of the whole namespace.
//!
//! A module's part of the plan ([`super::plan::TopologyPlan::for_domain`]) reads: the modules
//! of its own domain (who owns it), the modules of the domains it subscribes to (do they exist,
//! what do they publish), and the modules of every domain on a subscription cycle through its
//! own (cycle findings). [`Neighbours::planning_set`] is exactly those; the property test below
//! checks that planning from it gives what planning the whole namespace gives.

use std::collections::{BTreeSet, HashMap, VecDeque};

use crate::api::ChimeraModule;

/// A module, by namespace and name.
pub type ModuleRef = (String, String);

/// What of a module the plans of others read.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Facts {
    domain: String,
    publishes: Vec<String>,
    subscribes: Vec<(String, Vec<String>)>,
    /// Not being deleted: a module on its way out is no publisher for the others.
    live: bool,
}

impl Facts {
    fn of(module: &ChimeraModule) -> Self {
        Self {
            domain: module.domain().to_owned(),
            publishes: module.spec.events.publishes.clone(),
            subscribes: module
                .spec
                .events
                .subscribes
                .iter()
                .map(|s| (s.from.clone(), s.events.clone()))
                .collect(),
            live: module.metadata.deletion_timestamp.is_none(),
        }
    }

    fn subscribes_to(&self, domain: &str) -> bool {
        self.subscribes.iter().any(|(from, _)| from == domain)
    }
}

/// The namespace's modules' facts, by namespace then name.
#[derive(Debug, Default)]
pub struct Neighbours {
    namespaces: HashMap<String, HashMap<String, Facts>>,
}

impl Neighbours {
    /// Records `module` as it is now; returns the other modules whose plan its change may
    /// alter (none when nothing the others read changed, as on a status write).
    pub fn observe(&mut self, module: &ChimeraModule) -> Vec<ModuleRef> {
        let (Some(namespace), Some(name)) = (&module.metadata.namespace, &module.metadata.name)
        else {
            return Vec::new();
        };
        let facts = Facts::of(module);
        let modules = self.namespaces.entry(namespace.clone()).or_default();
        let old = modules.get(name).cloned();
        if old.as_ref() == Some(&facts) {
            return Vec::new();
        }
        let mut before = affected(modules, name, old.as_ref());
        modules.insert(name.clone(), facts.clone());
        before.extend(affected(modules, name, Some(&facts)));
        collect(namespace, name, before)
    }

    /// Forgets module `namespace/name` (deleted); returns the modules its absence affects.
    pub fn forget(&mut self, namespace: &str, name: &str) -> Vec<ModuleRef> {
        let Some(modules) = self.namespaces.get_mut(namespace) else {
            return Vec::new();
        };
        let old = modules.get(name).cloned();
        let requeue = affected(modules, name, old.as_ref());
        modules.remove(name);
        if modules.is_empty() {
            self.namespaces.remove(namespace);
        }
        collect(namespace, name, requeue)
    }

    /// Every module recorded.
    pub fn known(&self) -> Vec<ModuleRef> {
        self.namespaces
            .iter()
            .flat_map(|(ns, modules)| modules.keys().map(|name| (ns.clone(), name.clone())))
            .collect()
    }

    /// The modules `module`'s part of the plan reads (itself included), as recorded.
    pub fn planning_set(&self, module: &ChimeraModule) -> Vec<ModuleRef> {
        let (Some(namespace), Some(name)) = (&module.metadata.namespace, &module.metadata.name)
        else {
            return Vec::new();
        };
        let Some(modules) = self.namespaces.get(namespace) else {
            return vec![(namespace.clone(), name.clone())];
        };
        let facts = Facts::of(module);
        let mut domains: BTreeSet<&str> = cycle_domains(modules, name, &facts);
        domains.insert(&facts.domain);
        domains.extend(facts.subscribes.iter().map(|(from, _)| from.as_str()));
        let mut set: Vec<ModuleRef> = modules
            .iter()
            .filter(|(other, f)| *other != name && f.live && domains.contains(f.domain.as_str()))
            .map(|(other, _)| (namespace.clone(), other.clone()))
            .collect();
        set.push((namespace.clone(), name.clone()));
        set.sort();
        set
    }
}

fn collect(namespace: &str, name: &str, affected: BTreeSet<String>) -> Vec<ModuleRef> {
    affected
        .into_iter()
        .filter(|other| other != name)
        .map(|other| (namespace.to_owned(), other))
        .collect()
}

/// The modules whose plan reads `facts` of module `name` (as recorded in `modules`).
fn affected(
    modules: &HashMap<String, Facts>,
    name: &str,
    facts: Option<&Facts>,
) -> BTreeSet<String> {
    let Some(facts) = facts else {
        return BTreeSet::new();
    };
    let cycle = cycle_domains(modules, name, facts);
    modules
        .iter()
        .filter(|(_, f)| {
            f.domain == facts.domain
                || f.subscribes_to(&facts.domain)
                || cycle.contains(f.domain.as_str())
        })
        .map(|(other, _)| other.clone())
        .collect()
}

/// Domains on a subscription cycle through `facts.domain`: reachable from it and reaching it,
/// over the live modules with `name` counted as `facts`.
fn cycle_domains<'a>(
    modules: &'a HashMap<String, Facts>,
    name: &str,
    facts: &'a Facts,
) -> BTreeSet<&'a str> {
    // domain -> domains it subscribes to, over the live modules (and this one as it is).
    let mut edges: HashMap<&str, BTreeSet<&str>> = HashMap::new();
    let this = std::iter::once(facts);
    for f in modules
        .iter()
        .filter(|(other, f)| *other != name && f.live)
        .map(|(_, f)| f)
        .chain(this)
    {
        edges
            .entry(f.domain.as_str())
            .or_default()
            .extend(f.subscribes.iter().map(|(from, _)| from.as_str()));
    }
    let mut reverse: HashMap<&str, BTreeSet<&str>> = HashMap::new();
    for (from, tos) in &edges {
        for to in tos {
            reverse.entry(to).or_default().insert(from);
        }
    }
    let forward = reachable(&edges, &facts.domain);
    let backward = reachable(&reverse, &facts.domain);
    forward.intersection(&backward).copied().collect()
}

/// Domains reachable from `start` in one step or more.
fn reachable<'a>(edges: &HashMap<&'a str, BTreeSet<&'a str>>, start: &'a str) -> BTreeSet<&'a str> {
    let mut seen = BTreeSet::new();
    let mut queue = VecDeque::from([start]);
    while let Some(domain) = queue.pop_front() {
        for next in edges.get(domain).into_iter().flatten() {
            if seen.insert(*next) {
                queue.push_back(next);
            }
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::topology::plan::{module_key, plan};
    use proptest::prelude::*;
    use serde_json::json;

    fn module(
        name: &str,
        domain: &str,
        publishes: &[&str],
        subscribes: &[(&str, &str)],
    ) -> ChimeraModule {
        let subscribes: Vec<_> = subscribes
            .iter()
            .map(|(from, event)| json!({"from": from, "events": [event]}))
            .collect();
        let spec = json!({
            "image": "x", "domain": domain, "commands": [format!("{domain}.do")],
            "events": {"publishes": publishes, "subscribes": subscribes},
            "worker": {}
        });
        let mut m = ChimeraModule::new(name, serde_json::from_value(spec).unwrap());
        m.metadata.namespace = Some("shop".into());
        m
    }

    fn names(refs: &[ModuleRef]) -> Vec<&str> {
        refs.iter().map(|(_, n)| n.as_str()).collect()
    }

    #[test]
    fn a_status_change_requeues_nobody_and_a_publish_change_requeues_subscribers() {
        let mut index = Neighbours::default();
        let users = module("users", "users", &["user.registered"], &[]);
        let orders = module("orders", "orders", &[], &[("users", "user.*")]);
        let gigs = module("gigs", "gigs", &[], &[]);
        index.observe(&users);
        assert_eq!(names(&index.observe(&orders)), Vec::<&str>::new());
        index.observe(&gigs);
        assert!(
            index.observe(&users).is_empty(),
            "nothing the others read changed"
        );
        let louder = module("users", "users", &["user.registered", "user.deleted"], &[]);
        assert_eq!(names(&index.observe(&louder)), ["orders"]);
        assert_eq!(names(&index.forget("shop", "users")), ["orders"]);
    }

    #[test]
    fn a_new_owner_of_a_domain_requeues_the_others_of_that_domain() {
        let mut index = Neighbours::default();
        index.observe(&module("a", "pay", &[], &[]));
        assert_eq!(names(&index.observe(&module("b", "pay", &[], &[]))), ["a"]);
    }

    #[test]
    fn closing_a_cycle_requeues_everyone_on_it() {
        let mut index = Neighbours::default();
        index.observe(&module("a", "a", &["a.e"], &[("c", "c.e")]));
        index.observe(&module("b", "b", &["b.e"], &[("a", "a.e")]));
        index.observe(&module("c", "c", &["c.e"], &[]));
        index.observe(&module("x", "x", &[], &[]));
        // c subscribing to b closes a -> c -> b -> a; a is far from c but on the cycle.
        let affected = index.observe(&module("c", "c", &["c.e"], &[("b", "b.e")]));
        assert_eq!(names(&affected), ["a", "b"]);
        let set = index.planning_set(&module("c", "c", &["c.e"], &[("b", "b.e")]));
        assert_eq!(names(&set), ["a", "b", "c"]);
    }

    /// A namespace of up to 8 modules over 4 domains, with random publishes, subscriptions
    /// and deletions.
    fn namespace() -> impl Strategy<Value = Vec<ChimeraModule>> {
        let domains = ["a", "b", "c", "d"];
        let one = (
            0..4usize,
            proptest::collection::vec(0..3usize, 0..3),
            proptest::collection::vec((0..4usize, 0..4usize), 0..3),
            any::<bool>(),
        );
        proptest::collection::vec(one, 1..8).prop_map(move |specs| {
            specs
                .into_iter()
                .enumerate()
                .map(|(i, (d, publishes, subscribes, deleting))| {
                    let domain = domains[d];
                    let publishes: Vec<String> =
                        publishes.iter().map(|e| format!("{domain}.e{e}")).collect();
                    let publishes: Vec<&str> = publishes.iter().map(String::as_str).collect();
                    let events: Vec<(String, String)> = subscribes
                        .iter()
                        .map(|(f, e)| (domains[*f].to_owned(), format!("{}.e{e}", domains[*f])))
                        .collect();
                    let subscribes: Vec<(&str, &str)> = events
                        .iter()
                        .map(|(f, e)| (f.as_str(), e.as_str()))
                        .collect();
                    let mut m = module(&format!("m{i}"), domain, &publishes, &subscribes);
                    if deleting && i % 3 == 0 {
                        m.metadata.deletion_timestamp =
                            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                            ));
                    }
                    m
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn planning_from_the_set_is_planning_the_namespace(modules in namespace()) {
            let mut index = Neighbours::default();
            for m in &modules {
                index.observe(m);
            }
            for m in &modules {
                // As the controller plans: the live modules, and this one even if deleting.
                let everyone: Vec<ChimeraModule> = modules
                    .iter()
                    .filter(|o| o.metadata.deletion_timestamp.is_none() || o.metadata.name == m.metadata.name)
                    .cloned()
                    .collect();
                let set = index.planning_set(m);
                let few: Vec<ChimeraModule> = modules
                    .iter()
                    .filter(|o| set.iter().any(|(_, n)| Some(n) == o.metadata.name.as_ref()))
                    .cloned()
                    .collect();
                let key = module_key(m);
                prop_assert_eq!(
                    plan(&few).for_domain(m.domain(), &key),
                    plan(&everyone).for_domain(m.domain(), &key)
                );
            }
        }

        #[test]
        fn whoever_a_change_alters_is_requeued(
            modules in namespace(),
            changed in 0..8usize,
            publishes in proptest::collection::vec(0..3usize, 0..3),
            subscribes in proptest::option::of(proptest::collection::vec((0..4usize, 0..3usize), 0..3)),
            domain in proptest::option::of(0..4usize),
            deleting in any::<bool>(),
        ) {
            let mut index = Neighbours::default();
            for m in &modules {
                index.observe(m);
            }
            let live = |ms: &[ChimeraModule], of: &ChimeraModule| -> Vec<ChimeraModule> {
                ms.iter()
                    .filter(|o| o.metadata.deletion_timestamp.is_none() || o.metadata.name == of.metadata.name)
                    .cloned()
                    .collect()
            };
            let i = changed % modules.len();
            let mut after = modules.clone();
            let domains = ["a", "b", "c", "d"];
            if let Some(d) = domain {
                after[i].spec.domain = Some(domains[d].to_owned());
            }
            let own = after[i].domain().to_owned();
            after[i].spec.events.publishes = publishes.iter().map(|e| format!("{own}.e{e}")).collect();
            if let Some(subscribes) = subscribes {
                let yaml: Vec<_> = subscribes
                    .iter()
                    .map(|(f, e)| json!({"from": domains[*f], "events": [format!("{}.e{e}", domains[*f])]}))
                    .collect();
                after[i].spec.events.subscribes = serde_json::from_value(json!(yaml)).unwrap();
            }
            if deleting {
                after[i].metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
            }
            let requeued = index.observe(&after[i]);
            for (j, m) in modules.iter().enumerate() {
                if j == i {
                    continue;
                }
                let key = module_key(m);
                let mut before = plan(&live(&modules, m)).for_domain(m.domain(), &key);
                let mut now = plan(&live(&after, m)).for_domain(m.domain(), &key);
                // A module being deleted is planned only to release what it owns: its
                // findings are shown to nobody, and no other module's change reaches them.
                if m.metadata.deletion_timestamp.is_some() {
                    before.findings.clear();
                    now.findings.clear();
                }
                if before != now {
                    prop_assert!(
                        requeued.iter().any(|(_, n)| Some(n) == m.metadata.name.as_ref()),
                        "{} changed but was not requeued", key
                    );
                }
            }
        }
    }
}
