//! Ways to show a plan: text for people, JSON for tools, Mermaid and DOT for pictures of who
//! talks to whom (domains as nodes, subscribed events on the edges).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::diff::TopologyDiff;
use super::plan::{ArgValue, TopologyPlan};
use crate::api::ChimeraModule;

/// Output formats of `chimera topology plan`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Human-readable lists.
    Text,
    /// The plan as JSON (exchanges, queues with arguments, bindings, findings).
    Json,
    /// A Mermaid flowchart of domains and the events between them.
    Mermaid,
    /// A Graphviz DOT graph of the same.
    Dot,
    /// An AsyncAPI 3.0 document (YAML) of the channels, operations and messages.
    AsyncApi,
}

impl Format {
    /// Every format, in the order the CLI lists them.
    pub const ALL: [Format; 5] = [
        Format::Text,
        Format::Json,
        Format::Mermaid,
        Format::Dot,
        Format::AsyncApi,
    ];

    /// `text`, `json`, `mermaid`, `dot` or `asyncapi`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Json => "json",
            Format::Mermaid => "mermaid",
            Format::Dot => "dot",
            Format::AsyncApi => "asyncapi",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|f| f.as_str() == text)
            .ok_or_else(|| {
                format!("unknown format {text:?}: expected text, json, mermaid, dot or asyncapi")
            })
    }
}

/// Renders `plan`, the topology of `modules`, in `format`.
pub fn render(modules: &[ChimeraModule], plan: &TopologyPlan, format: Format) -> String {
    match format {
        Format::AsyncApi => serde_yaml::to_string(&super::asyncapi::asyncapi(modules))
            .unwrap_or_else(|e| format!("error: {e}\n")),
        Format::Text => text(plan),
        Format::Json => {
            serde_json::to_string_pretty(plan).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
        }
        Format::Mermaid => mermaid(plan),
        Format::Dot => dot(plan),
    }
}

fn arg(v: &ArgValue) -> String {
    match v {
        ArgValue::Str(s) => format!("{s:?}"),
        ArgValue::Int(i) => i.to_string(),
    }
}

fn text(plan: &TopologyPlan) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "exchanges ({}):", plan.exchanges.len());
    for e in &plan.exchanges {
        let _ = writeln!(out, "  {} ({})", e.name, e.kind.as_str());
    }
    let _ = writeln!(out, "queues ({}):", plan.queues.len());
    for q in &plan.queues {
        let args: Vec<String> = q
            .arguments
            .iter()
            .map(|(k, v)| format!("{k}={}", arg(v)))
            .collect();
        let _ = writeln!(out, "  {} [{}]", q.name, args.join(" "));
    }
    let _ = writeln!(out, "bindings ({}):", plan.bindings.len());
    for b in &plan.bindings {
        let _ = writeln!(
            out,
            "  {} -> {} ({})",
            b.source, b.destination, b.routing_key
        );
    }
    let _ = writeln!(out, "findings ({}):", plan.findings.len());
    for f in &plan.findings {
        let _ = writeln!(
            out,
            "  {}: {}: {}: {}",
            f.severity.as_str(),
            f.module,
            f.code.reason(),
            f.message
        );
    }
    out
}

/// Edges publisher -> subscriber with the patterns subscribed, from the event bindings.
fn event_edges(plan: &TopologyPlan) -> BTreeMap<(String, String), Vec<String>> {
    let mut edges: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for b in &plan.bindings {
        let Some(publisher) = b
            .source
            .strip_prefix("chimera.")
            .and_then(|s| s.strip_suffix(".events"))
        else {
            continue; // command bindings are not edges between domains
        };
        edges
            .entry((publisher.to_owned(), b.domain.clone()))
            .or_default()
            .push(b.routing_key.clone());
    }
    edges
}

/// Node id safe for Mermaid and DOT (domains are DNS labels; `-` is not an identifier char).
fn node_id(domain: &str) -> String {
    format!("d_{}", domain.replace('-', "_"))
}

fn mermaid(plan: &TopologyPlan) -> String {
    let mut out = String::from("flowchart LR\n");
    let domains: std::collections::BTreeSet<&str> =
        plan.exchanges.iter().map(|e| e.domain.as_str()).collect();
    for d in &domains {
        let commands: Vec<&str> = plan
            .bindings
            .iter()
            .filter(|b| b.domain == *d && b.source.ends_with(".commands"))
            .map(|b| b.routing_key.as_str())
            .collect();
        let _ = if commands.is_empty() {
            writeln!(out, "  {}([{d}])", node_id(d))
        } else {
            writeln!(
                out,
                "  {}([\"{d}<br/><small>{}</small>\"])",
                node_id(d),
                commands.join(", ")
            )
        };
    }
    for ((from, to), events) in event_edges(plan) {
        let _ = writeln!(
            out,
            "  {} -- \"{}\" --> {}",
            node_id(&from),
            events.join(", "),
            node_id(&to)
        );
    }
    out
}

fn dot(plan: &TopologyPlan) -> String {
    let mut out =
        String::from("digraph chimera {\n  rankdir=LR;\n  node [shape=box, style=rounded];\n");
    let domains: std::collections::BTreeSet<&str> =
        plan.exchanges.iter().map(|e| e.domain.as_str()).collect();
    for d in &domains {
        let _ = writeln!(out, "  {} [label=\"{d}\"];", node_id(d));
    }
    for ((from, to), events) in event_edges(plan) {
        let _ = writeln!(
            out,
            "  {} -> {} [label=\"{}\"];",
            node_id(&from),
            node_id(&to),
            events.join("\\n")
        );
    }
    out.push_str("}\n");
    out
}

/// What `topology diff` prints: one line per change, then the conflicts.
pub fn render_diff(diff: &TopologyDiff) -> String {
    let mut out = String::new();
    for e in &diff.missing_exchanges {
        let _ = writeln!(out, "+ exchange {} ({})", e.name, e.kind.as_str());
    }
    for q in &diff.missing_queues {
        let _ = writeln!(out, "+ queue {}", q.name);
    }
    for b in &diff.missing_bindings {
        let _ = writeln!(
            out,
            "+ binding {} -> {} ({})",
            b.source, b.destination, b.routing_key
        );
    }
    for b in &diff.stale_bindings {
        let _ = writeln!(
            out,
            "- binding {} -> {} ({})",
            b.source, b.destination, b.routing_key
        );
    }
    out.push_str(&render_conflicts(diff));
    if diff.is_converged() && !diff.has_conflicts() {
        out.push_str("broker matches the plan\n");
    }
    out
}

/// The differences the declarer leaves alone, with what to do about them.
pub fn render_conflicts(diff: &TopologyDiff) -> String {
    let mut out = String::new();
    for c in &diff.exchange_conflicts {
        let _ = writeln!(
            out,
            "! exchange {} is {} on the broker, the plan wants {}: exchange types never change in place",
            c.exchange, c.current, c.wanted
        );
    }
    for c in &diff.argument_conflicts {
        let _ = writeln!(
            out,
            "! queue {} argument {}: broker has {}, plan wants {}: left as is (RabbitMQ cannot change it in place); move it with `chimera topology migrate`",
            c.queue,
            c.argument,
            c.current.as_deref().unwrap_or("<unset>"),
            c.wanted.as_deref().unwrap_or("<unset>")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::plan::{plan, tests::module};

    fn sample() -> TopologyPlan {
        plan(&[
            module(
                "users",
                serde_json::json!({"image": "u", "commands": ["user.register"],
                "events": {"publishes": ["user.registered"]}, "worker": {}}),
            ),
            module(
                "gig-store",
                serde_json::json!({"image": "g",
                "events": {"subscribes": [{"from": "users", "events": ["user.registered", "user.*"]}]}, "worker": {}}),
            ),
        ])
    }

    #[test]
    fn mermaid_draws_domains_and_event_edges() {
        let m = render(&[], &sample(), Format::Mermaid);
        assert!(m.starts_with("flowchart LR\n"));
        assert!(
            m.contains("d_users([\"users<br/><small>user.register</small>\"])"),
            "{m}"
        );
        assert!(m.contains("d_gig_store([gig-store])"), "{m}");
        assert!(
            m.contains("d_users -- \"user.*, user.registered\" --> d_gig_store"),
            "{m}"
        );
    }

    #[test]
    fn dot_is_a_digraph_with_labelled_edges() {
        let d = render(&[], &sample(), Format::Dot);
        assert!(d.starts_with("digraph chimera {"));
        assert!(
            d.contains("d_users -> d_gig_store [label=\"user.*\\nuser.registered\"];"),
            "{d}"
        );
        assert!(d.trim_end().ends_with('}'));
    }

    #[test]
    fn json_lists_queues_with_arguments_and_bindings() {
        let j: serde_json::Value =
            serde_json::from_str(&render(&[], &sample(), Format::Json)).unwrap_or_default();
        let queue = j["queues"]
            .as_array()
            .and_then(|q| q.iter().find(|q| q["name"] == "chimera.users.worker"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(queue["arguments"]["x-queue-type"], "quorum");
        assert_eq!(queue["arguments"]["x-delivery-limit"], 20);
        let b = &j["bindings"][0];
        assert!(
            b["source"].is_string() && b["destination"].is_string() && b["routing_key"].is_string(),
            "{b}"
        );
    }

    #[test]
    fn text_has_every_section() {
        let t = render(&[], &sample(), Format::Text);
        for section in [
            "exchanges (6):",
            "queues (10):",
            "bindings (11):",
            "findings (0):",
        ] {
            assert!(t.contains(section), "{section} in {t}");
        }
    }
}
