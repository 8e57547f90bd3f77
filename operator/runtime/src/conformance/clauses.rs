//! The clauses, acted out on the running heads in an order where each leaves the module as the
//! next needs it: start and refusals, endpoints and errors, bad envelopes, a message handled
//! (the probe later clauses reuse), its duplicate, dead letters and ignored events, schemas,
//! the retry ladder under a locked database, metrics, the drain under load, and what the run
//! left on the broker and in the logs.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde_json::{Value, json};
use sqlx::{Connection as _, Row as _};

use super::READY_WITHIN;
use super::harness::{Caught, Harness, tail};
use crate::local::process::terminate;
use crate::topology::management::ManagementClient;
use chimera_contract::envelope::{
    ATTEMPT, CONTENT_TYPE, Envelope, ORIGINAL_ROUTING_KEY, REASON, TRACEPARENT, TraceParent,
};
use chimera_contract::{Head, env as var, names};
use chimera_core::api::schemas::{Role, consumed, role};
use chimera_core::conformance::metrics::problems as metric_problems;
use chimera_core::conformance::samples;
use chimera_core::conformance::{Clause, Report};
use chimera_core::topology::pattern::topic_matches;
use chimera_core::topology::state::BrokerState;
use chimera_core::workloads::{declared_heads, termination_grace_seconds};

const SETTLE_WITHIN: Duration = Duration::from_secs(20);
const SENDER_HEADER: &str = "x-conformance-sender";

/// What each clause found so far: problems, and what was seen when it passed.
#[derive(Default)]
struct Notes {
    problems: BTreeMap<Clause, Vec<String>>,
    seen: BTreeMap<Clause, Vec<String>>,
    not_applicable: BTreeMap<Clause, String>,
}

impl Notes {
    fn problem(&mut self, clause: Clause, what: impl Into<String>) {
        self.problems.entry(clause).or_default().push(what.into());
    }
    fn saw(&mut self, clause: Clause, what: impl Into<String>) {
        self.seen.entry(clause).or_default().push(what.into());
    }
    fn check(&mut self, clause: Clause, ok: bool, problem: impl FnOnce() -> String) {
        if ok {
            self.seen.entry(clause).or_default();
        } else {
            self.problem(clause, problem());
        }
    }
    fn na(&mut self, clause: Clause, why: impl Into<String>) {
        self.not_applicable.insert(clause, why.into());
    }

    fn report(self, module: String) -> Report {
        let mut report = Report {
            module,
            findings: Vec::new(),
        };
        for clause in Clause::ALL {
            if let Some(why) = self.not_applicable.get(&clause)
                && !self.problems.contains_key(&clause)
                && !self.seen.contains_key(&clause)
            {
                report.not_applicable(clause, why.clone());
                continue;
            }
            let problems = self.problems.get(&clause).cloned().unwrap_or_default();
            if let Some(seen) = self.seen.get(&clause) {
                report.record(clause, problems, seen.join("; "));
            } else if !problems.is_empty() {
                report.record(clause, problems, "");
            }
        }
        report
    }
}

/// The message type the worker handles and how to make its payloads.
#[derive(Clone)]
struct Probe {
    kind: String,
    schema: Option<Value>,
}

impl Probe {
    fn envelope(&self, n: u32) -> Envelope {
        let data = self
            .schema
            .as_ref()
            .and_then(|s| samples::valid(s, n))
            .unwrap_or_else(|| json!({}));
        Envelope::new(&self.kind, data)
    }
}

/// Runs every clause.
pub async fn run(
    h: &mut Harness,
    client: &ManagementClient,
    before: BrokerState,
    secret: &str,
) -> Report {
    let mut notes = Notes::default();
    let module_name = h.module.metadata.name.clone().unwrap_or_default();
    let heads: Vec<Head> = declared_heads(&h.module).collect();
    let mut all_up = true;
    for head in &heads {
        match h.start(*head, READY_WITHIN).await {
            Ok(()) => notes.saw(Clause::Environment, format!("{} head ready", head.as_str())),
            Err(e) => {
                notes.problem(Clause::Environment, e);
                all_up = false;
            }
        }
    }
    if !all_up {
        return notes.report(module_name);
    }
    refusals(h, &mut notes).await;
    for head in &heads {
        endpoints(h, *head, &mut notes).await;
    }
    let has_worker = h.module.spec.worker.is_some();
    let mut probe = None;
    if has_worker {
        bad_envelopes(h, &mut notes).await;
        probe = find_probe(h, &mut notes).await;
        if let Some(p) = &probe {
            duplicates(h, p, &mut notes).await;
        }
        dead_letters(h, &mut notes).await;
        schemas(h, &mut notes).await;
        match &probe {
            Some(p) => retry_ladder(h, p, &mut notes).await,
            None => notes.problem(
                Clause::RetryLadder,
                "not checked: no message was handled (see duplicates)",
            ),
        }
    } else {
        for clause in [
            Clause::Envelope,
            Clause::Duplicates,
            Clause::RetryLadder,
            Clause::DeadLetters,
            Clause::Schemas,
        ] {
            notes.na(clause, "the module has no worker head");
        }
    }
    for head in &heads {
        match h.scrape(*head).await {
            Ok(scrape) => {
                let found = metric_problems(&scrape, *head);
                for p in &found {
                    notes.problem(Clause::Metrics, format!("{} head: {p}", head.as_str()));
                }
                if found.is_empty() {
                    notes.saw(
                        Clause::Metrics,
                        format!("{} head's names, types, labels and buckets", head.as_str()),
                    );
                }
            }
            Err(e) => notes.problem(Clause::Metrics, format!("{} head: {e:#}", head.as_str())),
        }
    }
    let _ = h.collect().await;
    published(h, &mut notes);
    drain(h, probe.as_ref(), &mut notes).await;
    no_declaring(h, client, &before, &mut notes).await;
    if h.logs().contains(secret) {
        notes.problem(
            Clause::Environment,
            "a head printed its broker password (from CHIMERA_AMQP_URL) in its output",
        );
    } else {
        notes.saw(Clause::Environment, "no credential in the heads' output");
    }
    notes.report(module_name)
}

/// A head given a malformed or missing variable must refuse to start, naming it.
async fn refusals(h: &mut Harness, notes: &mut Notes) {
    let mut cases: Vec<(Head, &str, Option<&str>)> = Vec::new();
    for head in declared_heads(&h.module).collect::<Vec<_>>() {
        cases.push((head, var::HTTP_ADDR, Some("not-an-address")));
    }
    if h.module.spec.worker.is_some() {
        cases.push((Head::Worker, var::AMQP_URL, None));
        cases.push((Head::Worker, var::PREFETCH, Some("many")));
    }
    for (head, name, value) in cases {
        let port = match super::harness::free_port() {
            Ok(p) => p,
            Err(e) => {
                notes.problem(Clause::Environment, format!("no free port: {e}"));
                return;
            }
        };
        let Ok(mut env) = h.env(head, port) else {
            continue;
        };
        env.retain(|(k, _)| k != name);
        if let Some(v) = value {
            env.push((name.to_owned(), v.to_owned()));
        }
        let what = match value {
            Some(v) => format!("{name}={v}"),
            None => format!("no {name}"),
        };
        let mut replica = match h.spawn(head, env).await {
            Ok(r) => r,
            Err(e) => {
                notes.problem(Clause::Environment, format!("{e:#}"));
                continue;
            }
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(status) = replica.exited() {
                break Some(status);
            }
            if Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // Let the output pumps write the last lines.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let log = std::fs::read_to_string(&replica.spec.log_file).unwrap_or_default();
        match status {
            None => {
                notes.problem(
                    Clause::Environment,
                    format!(
                        "the {} head with {what} still runs after 15 s: it MUST refuse to start",
                        head.as_str()
                    ),
                );
                replica.stop(Duration::from_secs(5)).await;
            }
            Some(s) if s.ends_with(" 0") || s.contains("status: 0") => notes.problem(
                Clause::Environment,
                format!(
                    "the {} head with {what} exited with status 0: a refusal is non-zero",
                    head.as_str()
                ),
            ),
            Some(_) if !log.contains(name) => notes.problem(
                Clause::Environment,
                format!(
                    "the {} head with {what} exited without naming {name}; its output:\n{}",
                    head.as_str(),
                    tail(&replica.spec.log_file)
                ),
            ),
            Some(_) => notes.saw(
                Clause::Environment,
                format!("the {} head refuses {what}, naming it", head.as_str()),
            ),
        }
    }
}

fn json_error(body: &str, code: &str) -> Result<(), String> {
    let value: Value =
        serde_json::from_str(body).map_err(|_| format!("the body is not JSON: {body:.120}"))?;
    match (
        value.get("error").and_then(Value::as_str),
        value.get("message"),
    ) {
        (Some(c), Some(Value::String(_))) if c == code => Ok(()),
        _ => Err(format!(
            "the body is not {{\"error\": \"{code}\", \"message\": \"...\"}}: {body:.160}"
        )),
    }
}

async fn endpoints(h: &Harness, head: Head, notes: &mut Notes) {
    let name = head.as_str();
    for (path, want_text) in [("/healthz", true), ("/readyz", true), ("/metrics", false)] {
        match h.get(head, path).await {
            Ok(a) => {
                notes.check(Clause::Endpoints, a.status == 200, || {
                    format!("{name} head: GET {path} answered {}, not 200", a.status)
                });
                if want_text {
                    notes.check(Clause::Endpoints, !a.body.trim().is_empty(), || {
                        format!("{name} head: GET {path} has an empty body")
                    });
                } else {
                    notes.check(
                        Clause::Endpoints,
                        a.content_type.starts_with("text/plain")
                            || a.content_type.starts_with("application/openmetrics-text"),
                        || format!("{name} head: GET /metrics has Content-Type {:?}, not the Prometheus text format", a.content_type),
                    );
                }
            }
            Err(e) => notes.problem(Clause::Endpoints, format!("{name} head: {e:#}")),
        }
    }
    notes.saw(Clause::Endpoints, format!("{name} head"));
    // Errors are JSON: no route, and a route without the method.
    match h.get(head, "/chimera-conformance/no-such-route").await {
        Ok(a) => {
            let ok = a.status == 404
                && a.content_type.starts_with(CONTENT_TYPE)
                && json_error(&a.body, "not_found").is_ok();
            notes.check(Clause::JsonErrors, ok, || {
                format!(
                    "{name} head: GET of an unknown path answered {} ({}) {}, not a 404 JSON error not_found",
                    a.status,
                    a.content_type,
                    json_error(&a.body, "not_found").err().unwrap_or_default()
                )
            });
        }
        Err(e) => notes.problem(Clause::JsonErrors, format!("{name} head: {e:#}")),
    }
    match h.call(head, reqwest::Method::POST, "/healthz").await {
        Ok(a) => {
            let ok = a.status == 405
                && a.content_type.starts_with(CONTENT_TYPE)
                && a.allow.to_ascii_uppercase().contains("GET")
                && json_error(&a.body, "method_not_allowed").is_ok();
            notes.check(Clause::JsonErrors, ok, || {
                format!(
                    "{name} head: POST /healthz answered {} ({}, Allow {:?}) {}, not a 405 JSON error method_not_allowed with Allow: GET",
                    a.status,
                    a.content_type,
                    a.allow,
                    json_error(&a.body, "method_not_allowed").err().unwrap_or_default()
                )
            });
        }
        Err(e) => notes.problem(Clause::JsonErrors, format!("{name} head: {e:#}")),
    }
    notes.saw(
        Clause::JsonErrors,
        format!("{name} head: 404 and 405 with Allow"),
    );
}

fn raw_properties(case: &str) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("x-conformance-case"),
        AMQPValue::LongString(LongString::from(case)),
    );
    BasicProperties::default()
        .with_message_id(ShortString::from(format!("conformance-{case}")))
        .with_type(ShortString::from("conformance.raw"))
        .with_correlation_id(ShortString::from("conformance-correlation"))
        .with_content_type(ShortString::from(CONTENT_TYPE))
        .with_delivery_mode(2)
        .with_headers(headers)
}

/// Bodies that are not envelopes: each parked in the dlq exactly as it came, with a reason; the
/// worker stays up.
async fn bad_envelopes(h: &mut Harness, notes: &mut Notes) {
    let uuid = Envelope::new("x", Value::Null).id.to_string();
    let now = "2026-01-01T00:00:00Z";
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not-json", b"conformance: this is not JSON".to_vec()),
        ("not-an-object", b"[1, 2, 3]".to_vec()),
        ("no-id", json!({"type": "conformance.case", "occurred_at": now, "data": {}}).to_string().into_bytes()),
        ("id-not-a-uuid", json!({"id": "conformance-1", "type": "conformance.case", "occurred_at": now, "data": {}}).to_string().into_bytes()),
        ("id-a-number", json!({"id": 5, "type": "conformance.case", "occurred_at": now, "data": {}}).to_string().into_bytes()),
        ("empty-type", json!({"id": uuid, "type": "", "occurred_at": now, "data": {}}).to_string().into_bytes()),
    ];
    let dlq = names::dead_letter_queue(&h.domain());
    for (case, body) in &cases {
        if let Err(e) = h.send_raw(body, &raw_properties(case)).await {
            notes.problem(Clause::Envelope, format!("sending {case}: {e:#}"));
        }
    }
    for (case, body) in &cases {
        let found = h
            .wait_failure(SETTLE_WITHIN, |c| {
                c.header("x-conformance-case").as_deref() == Some(case)
            })
            .await
            .ok()
            .flatten();
        match found {
            None => notes.problem(
                Clause::Envelope,
                format!(
                    "a body that is not an envelope ({case}) was not dead-lettered within {} s",
                    SETTLE_WITHIN.as_secs()
                ),
            ),
            Some(c) => {
                notes.check(Clause::Envelope, c.routing_key == dlq, || {
                    format!(
                        "{case}: published with routing key {}, not {dlq}",
                        c.routing_key
                    )
                });
                notes.check(Clause::Envelope, &c.body == body, || {
                    format!("{case}: the dead letter's body is not the bytes that came")
                });
                notes.check(
                    Clause::Envelope,
                    c.properties.message_id().as_ref().map(ToString::to_string)
                        == Some(format!("conformance-{case}")),
                    || format!("{case}: the dead letter lost its message_id property"),
                );
                let kept = |p: &Option<ShortString>, want: &str| {
                    p.as_ref().map(ToString::to_string).as_deref() == Some(want)
                };
                notes.check(
                    Clause::Envelope,
                    kept(c.properties.kind(), "conformance.raw")
                        && kept(c.properties.correlation_id(), "conformance-correlation"),
                    || format!("{case}: the dead letter lost its type or correlation_id property"),
                );
                notes.check(Clause::Envelope, has_reason(&c), || {
                    format!("{case}: the dead letter has no {REASON}")
                });
            }
        }
    }
    let crashed = h
        .heads
        .get_mut(Head::Worker.as_str())
        .and_then(|w| w.replica.exited());
    notes.check(Clause::Envelope, crashed.is_none(), || {
        format!(
            "the worker exited on bad bodies ({})",
            crashed.clone().unwrap_or_default()
        )
    });
    notes.saw(
        Clause::Envelope,
        format!(
            "{} bodies that are not envelopes parked as they came",
            cases.len()
        ),
    );
}

fn has_reason(c: &Caught) -> bool {
    c.header(REASON).is_some_and(|r| !r.trim().is_empty())
}

/// The message types the worker takes, each with its schema if it has one.
fn consumed_types(h: &Harness) -> Vec<(String, Option<Value>)> {
    let spec = &h.module.spec;
    let schema = |k: &str| spec.schemas.get(k).cloned();
    let mut out: Vec<(String, Option<Value>)> = spec
        .commands
        .iter()
        .map(|c| (c.clone(), schema(c)))
        .collect();
    for (kind, s) in consumed(&h.module) {
        if role(&h.module, kind) == Some(Role::Consumes) {
            out.push((kind.to_owned(), Some(s.clone())));
        }
    }
    for s in &spec.events.subscribes {
        for p in &s.events {
            if !p.contains('*') && !p.contains('#') && !out.iter().any(|(k, _)| k == p) {
                out.push((p.clone(), schema(p)));
            }
        }
    }
    out
}

/// Sends each consumed type's sample until one is handled: the probe of the later clauses.
async fn find_probe(h: &mut Harness, notes: &mut Notes) -> Option<Probe> {
    let mut tried = Vec::new();
    for (n, (kind, schema)) in consumed_types(h).into_iter().enumerate() {
        let probe = Probe {
            kind: kind.clone(),
            schema: schema.clone(),
        };
        if schema.is_some()
            && probe
                .schema
                .as_ref()
                .and_then(|s| samples::valid(s, 1))
                .is_none()
        {
            tried.push(format!(
                "{kind}: no valid payload could be made from its schema (give it `examples`)"
            ));
            continue;
        }
        let envelope = probe.envelope(n as u32 + 1);
        let before = outcomes(h, &kind).await;
        if let Err(e) = h.send(&envelope, &[]).await {
            tried.push(format!("{kind}: {e:#}"));
            continue;
        }
        let deadline = Instant::now() + SETTLE_WITHIN;
        let outcome = loop {
            let now = outcomes(h, &kind).await;
            if let Some(o) = ["handled", "dead_lettered", "ignored", "duplicate"]
                .into_iter()
                .find(|o| {
                    now.get(*o).copied().unwrap_or(0.0) > before.get(*o).copied().unwrap_or(0.0)
                })
            {
                break Some(o);
            }
            if Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        match outcome {
            Some("handled") => {
                notes.saw(Clause::Duplicates, format!("{kind} handled"));
                return Some(probe);
            }
            Some(o) => {
                let _ = h.collect().await;
                let why = h
                    .failures
                    .caught
                    .iter()
                    .find(|c| c.envelope_id() == Some(envelope.id.to_string()))
                    .and_then(|c| c.header(REASON))
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default();
                tried.push(format!("{kind}: {o}{why}"));
            }
            None => tried.push(format!(
                "{kind}: not settled within {} s",
                SETTLE_WITHIN.as_secs()
            )),
        }
    }
    notes.problem(
        Clause::Duplicates,
        format!(
            "no message the worker takes was handled, so duplicates, the retry ladder and the drain cannot be checked; tried: {}",
            if tried.is_empty() { "nothing (no commands nor subscriptions)".to_owned() } else { tried.join("; ") }
        ),
    );
    None
}

async fn outcomes(h: &Harness, kind: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    if let Ok(s) = h.scrape(Head::Worker).await {
        for sample in s.named(chimera_contract::metrics::WORKER_MESSAGES) {
            if sample.labels.get("kind").map(String::as_str) == Some(kind)
                && let Some(o) = sample.labels.get("outcome")
            {
                *out.entry(o.clone()).or_insert(0.0) += sample.value;
            }
        }
    }
    out
}

/// The same message twice: handled once, counted a duplicate, and no event published again.
async fn duplicates(h: &mut Harness, probe: &Probe, notes: &mut Notes) {
    let envelope = probe.envelope(100);
    let handled = h.count(&probe.kind, "handled").await;
    let duplicate = h.count(&probe.kind, "duplicate").await;
    if let Err(e) = h.send(&envelope, &[]).await {
        notes.problem(Clause::Duplicates, format!("sending {}: {e:#}", probe.kind));
        return;
    }
    if !h
        .wait_count(&probe.kind, "handled", handled + 1.0, SETTLE_WITHIN)
        .await
    {
        notes.problem(
            Clause::Duplicates,
            format!("a second {} was not handled", probe.kind),
        );
        return;
    }
    // Its events leave through an outbox, after the commit: give them a moment.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _ = h.collect().await;
    let events = h.events.caught.len();
    if let Err(e) = h.send(&envelope, &[]).await {
        notes.problem(Clause::Duplicates, format!("sending it again: {e:#}"));
        return;
    }
    let counted = h
        .wait_count(&probe.kind, "duplicate", duplicate + 1.0, SETTLE_WITHIN)
        .await;
    notes.check(Clause::Duplicates, counted, || {
        format!(
            "the same {} sent again (same id) was not counted as a duplicate",
            probe.kind
        )
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _ = h.collect().await;
    let again = h.count(&probe.kind, "handled").await;
    notes.check(Clause::Duplicates, again <= handled + 1.0, || {
        format!("the same {} sent again was handled again", probe.kind)
    });
    let new_events = h.events.caught.len() - events;
    notes.check(Clause::Duplicates, new_events == 0, || {
        format!("handling the duplicate published {new_events} event(s) again")
    });
    notes.saw(
        Clause::Duplicates,
        "a message sent twice handled once, no event published again",
    );
}

/// A type the worker has no handler for, with a trace and a sender's header: dead-lettered with
/// a reason, both kept; an event matching a wildcard subscription without a handler: ignored.
async fn dead_letters(h: &mut Harness, notes: &mut Notes) {
    let subscribed = |kind: &str| {
        h.module
            .spec
            .events
            .subscribes
            .iter()
            .any(|s| s.events.iter().any(|p| topic_matches(p, kind)))
    };
    let unknown = [
        "conformance.unknown-type",
        "conformance-unknown.type.of.message",
    ]
    .into_iter()
    .find(|k| !subscribed(k));
    match unknown {
        None => notes.saw(
            Clause::DeadLetters,
            "every type is subscribed (a `#` pattern): no unknown type to send",
        ),
        Some(kind) => {
            let envelope = Envelope::new(kind, json!({}));
            let trace = TraceParent::new_root().to_string();
            let sent = h
                .send(&envelope, &[(TRACEPARENT, &trace), (SENDER_HEADER, "kept")])
                .await;
            let key = match sent {
                Ok(k) => k,
                Err(e) => {
                    notes.problem(Clause::DeadLetters, format!("sending {kind}: {e:#}"));
                    return;
                }
            };
            let id = envelope.id.to_string();
            let dlq = names::dead_letter_queue(&h.domain());
            let found = h.caught(SETTLE_WITHIN, &id, Some(&dlq)).await;
            match found {
                None => notes.problem(
                    Clause::DeadLetters,
                    format!("a message of a type without a handler ({kind}) was not dead-lettered"),
                ),
                Some(c) => {
                    notes.check(Clause::DeadLetters, has_reason(&c), || {
                        format!("the dead letter of {kind} has no {REASON}")
                    });
                    let kept_trace = c
                        .header(TRACEPARENT)
                        .and_then(|t| TraceParent::parse(&t))
                        .map(|t| t.trace_id);
                    notes.check(
                        Clause::DeadLetters,
                        kept_trace == TraceParent::parse(&trace).map(|t| t.trace_id),
                        || format!("the dead letter lost the message's trace (traceparent {:?}, sent {trace})", c.header(TRACEPARENT)),
                    );
                    notes.check(
                        Clause::DeadLetters,
                        c.header(SENDER_HEADER).as_deref() == Some("kept"),
                        || format!("the dead letter lost the sender's header {SENDER_HEADER}"),
                    );
                    notes.check(
                        Clause::DeadLetters,
                        c.header(ORIGINAL_ROUTING_KEY).as_deref() == Some(key.as_str()),
                        || format!("{ORIGINAL_ROUTING_KEY} is {:?}, not the routing key it came with ({key})", c.header(ORIGINAL_ROUTING_KEY)),
                    );
                    notes.saw(
                        Clause::DeadLetters,
                        format!(
                            "{kind} dead-lettered: {:?}",
                            c.header(REASON).unwrap_or_default()
                        ),
                    );
                }
            }
        }
    }
    // Ignored: a newer event behind a wildcard subscription.
    let wildcard = h.module.spec.events.subscribes.iter().find_map(|s| {
        s.events
            .iter()
            .find(|p| p.contains('*') || p.contains('#'))
            .map(|p| p.replace(['*', '#'], "conformance-newer"))
    });
    if let Some(kind) = wildcard.filter(|k| !h.module.spec.commands.contains(k)) {
        let before = h.count(&kind, "ignored").await;
        let envelope = Envelope::new(&kind, json!({}));
        if let Err(e) = h.send(&envelope, &[]).await {
            notes.problem(Clause::DeadLetters, format!("sending {kind}: {e:#}"));
            return;
        }
        let ignored = h
            .wait_count(&kind, "ignored", before + 1.0, SETTLE_WITHIN)
            .await;
        let id = envelope.id.to_string();
        let parked = h
            .caught(Duration::from_millis(500), &id, None)
            .await
            .is_some();
        notes.check(Clause::DeadLetters, ignored && !parked, || {
            format!(
                "{kind}, a subscribed event without a handler, was {} instead of acked as ignored",
                if parked {
                    "dead-lettered"
                } else {
                    "not counted"
                }
            )
        });
        notes.saw(Clause::DeadLetters, format!("{kind} ignored"));
    }
}

/// Each consumed type with a schema: a payload it refuses is dead-lettered with a reason. The
/// events the module published so far fit its own schemas of them.
async fn schemas(h: &mut Harness, notes: &mut Notes) {
    let cases: Vec<(String, Value)> = consumed_types(h)
        .into_iter()
        .filter_map(|(k, s)| Some((k, samples::invalid(&s?)?)))
        .collect();
    if cases.is_empty() {
        notes.na(
            Clause::Schemas,
            "the module declares no schema that refuses anything",
        );
        return;
    }
    let mut ids = Vec::new();
    for (kind, data) in &cases {
        let envelope = Envelope::new(kind, data.clone());
        match h.send(&envelope, &[]).await {
            Ok(_) => ids.push((kind.clone(), envelope.id.to_string())),
            Err(e) => notes.problem(Clause::Schemas, format!("sending {kind}: {e:#}")),
        }
    }
    let dlq = names::dead_letter_queue(&h.domain());
    for (kind, id) in ids {
        let found = h.caught(SETTLE_WITHIN, &id, Some(&dlq)).await;
        match found {
            Some(c) if has_reason(&c) => {}
            Some(_) => notes.problem(
                Clause::Schemas,
                format!("{kind}: dead-lettered without a reason"),
            ),
            None => notes.problem(
                Clause::Schemas,
                format!("{kind} with a payload its schema refuses was not dead-lettered"),
            ),
        }
    }
    notes.saw(
        Clause::Schemas,
        format!(
            "{} refused payload(s) dead-lettered with the schema's error",
            cases.len()
        ),
    );
}

/// Events the module published: envelopes with the contract's properties, fitting the module's
/// schemas, never the same id twice.
fn published(h: &Harness, notes: &mut Notes) {
    let spec = &h.module.spec;
    let mut ids = BTreeSet::new();
    for c in &h.events.caught {
        let envelope = match Envelope::decode(&c.body) {
            Ok(e) => e,
            Err(e) => {
                notes.problem(
                    Clause::Envelope,
                    format!("a published event is not an envelope: {e}"),
                );
                continue;
            }
        };
        let id = envelope.id.to_string();
        let kind = envelope.kind.clone();
        let p = &c.properties;
        let checks = [
            (
                spec.events.publishes.contains(&kind),
                format!("published {kind}, which is not in spec.events.publishes"),
            ),
            (
                c.routing_key == kind,
                format!("{kind} published with routing key {}", c.routing_key),
            ),
            (
                p.message_id().as_ref().map(ToString::to_string) == Some(id.clone()),
                format!("{kind}: message_id property is not the envelope's id"),
            ),
            (
                p.kind().as_ref().map(ToString::to_string) == Some(kind.clone()),
                format!("{kind}: type property is not the envelope's type"),
            ),
            (
                p.content_type()
                    .as_ref()
                    .map(ToString::to_string)
                    .as_deref()
                    == Some(CONTENT_TYPE),
                format!("{kind}: content_type is not {CONTENT_TYPE}"),
            ),
            (
                *p.delivery_mode() == Some(2),
                format!("{kind}: not persistent (delivery_mode 2)"),
            ),
        ];
        for (ok, problem) in checks {
            notes.check(Clause::Envelope, ok, || problem);
        }
        if let Some(schema) = spec.schemas.get(&kind) {
            notes.check(
                Clause::Schemas,
                samples::fits(schema, &envelope.data),
                || {
                    format!(
                        "a published {kind} does not fit the module's own schema of it: {}",
                        envelope.data
                    )
                },
            );
        }
        notes.check(Clause::Duplicates, ids.insert(id.clone()), || {
            format!("event {id} ({kind}) was published twice without a fault")
        });
    }
    notes.saw(
        Clause::Envelope,
        format!(
            "{} published event(s) with the envelope and its properties",
            h.events.caught.len()
        ),
    );
}

/// The database locked: the probe is retried through each retry queue, then dead-lettered;
/// another, retried once, is handled when the lock goes.
async fn retry_ladder(h: &mut Harness, probe: &Probe, notes: &mut Notes) {
    let domain = h.domain();
    let url = format!("sqlite://{}", h.db_path.display());
    let mut lock = match sqlx::SqliteConnection::connect(&url).await {
        Ok(c) => c,
        Err(e) => {
            notes.problem(
                Clause::RetryLadder,
                format!("opening the module's database {url}: {e}"),
            );
            return;
        }
    };
    if let Err(e) = sqlx::query("BEGIN EXCLUSIVE").execute(&mut lock).await {
        notes.problem(Clause::RetryLadder, format!("locking the database: {e}"));
        return;
    }
    let max_attempts = h
        .module
        .spec
        .worker
        .as_ref()
        .map_or(1, |w| w.retry.delays_seconds.len() + 1);
    let first = probe.envelope(200);
    let second = probe.envelope(201);
    let key = match h.send(&first, &[(SENDER_HEADER, "kept")]).await {
        Ok(k) => k,
        Err(e) => {
            notes.problem(Clause::RetryLadder, format!("sending: {e:#}"));
            return;
        }
    };
    let id = first.id.to_string();
    // Each attempt waits out the busy timeout (5 s in the Rust SDK) before it fails.
    let within = Duration::from_secs(40);
    for n in 1..max_attempts {
        let queue = names::retry_queue(&domain, n);
        let found = h.caught(within, &id, Some(&queue)).await;
        let Some(c) = found else {
            notes.problem(Clause::RetryLadder, format!("with the database locked, attempt {n} of {} was not retried through {queue} within {} s", probe.kind, within.as_secs()));
            let _ = sqlx::query("ROLLBACK").execute(&mut lock).await;
            return;
        };
        let attempt = (n + 1).to_string();
        notes.check(
            Clause::RetryLadder,
            c.header(ATTEMPT).as_deref() == Some(attempt.as_str()),
            || {
                format!(
                    "the retry through {queue} has {ATTEMPT} {:?}, not {attempt}",
                    c.header(ATTEMPT)
                )
            },
        );
        notes.check(Clause::RetryLadder, has_reason(&c), || {
            format!("the retry through {queue} has no {REASON}")
        });
        notes.check(
            Clause::RetryLadder,
            c.header(ORIGINAL_ROUTING_KEY).as_deref() == Some(key.as_str()),
            || {
                format!(
                    "the retry through {queue} has {ORIGINAL_ROUTING_KEY} {:?}, not {key}",
                    c.header(ORIGINAL_ROUTING_KEY)
                )
            },
        );
        notes.check(
            Clause::RetryLadder,
            c.header(SENDER_HEADER).as_deref() == Some("kept"),
            || format!("the retry through {queue} lost the sender's header"),
        );
    }
    let dlq = names::dead_letter_queue(&domain);
    let parked = h.caught(within, &id, Some(&dlq)).await;
    match parked {
        Some(c) => notes.check(Clause::RetryLadder, has_reason(&c), || {
            "the dead letter after the last attempt has no reason".into()
        }),
        None => notes.problem(
            Clause::RetryLadder,
            format!("after {max_attempts} attempts the message was not dead-lettered"),
        ),
    }
    // A failure that passes: retried once, handled when the lock is gone.
    let second_id = second.id.to_string();
    if let Err(e) = h.send(&second, &[]).await {
        notes.problem(Clause::RetryLadder, format!("sending: {e:#}"));
    }
    let queue = names::retry_queue(&domain, 1);
    let retried = h.caught(within, &second_id, Some(&queue)).await.is_some();
    let _ = sqlx::query("ROLLBACK").execute(&mut lock).await;
    drop(lock);
    notes.check(Clause::RetryLadder, retried, || {
        "a second message was not retried while the database was locked".into()
    });
    let rows = wait_inbox(
        h,
        &domain,
        std::slice::from_ref(&second_id),
        Duration::from_secs(30),
    )
    .await;
    notes.check(Clause::RetryLadder, rows.contains(&second_id), || {
        "a message retried while the database was locked was not handled once the lock went".into()
    });
    match inbox(h, &domain).await {
        Ok(rows) => notes.check(Clause::RetryLadder, !rows.contains(&id), || {
            "the dead-lettered message has an inbox row".into()
        }),
        Err(e) => notes.problem(
            Clause::RetryLadder,
            format!("reading the inbox (chimera_inbox): {e}"),
        ),
    }
    notes.saw(Clause::RetryLadder, format!("{} attempt(s) through the retry queues, then the dlq; a retried message handled when the failure passed", max_attempts));
}

async fn inbox(h: &Harness, domain: &str) -> Result<BTreeSet<String>, sqlx::Error> {
    let url = format!("sqlite://{}?mode=ro", h.db_path.display());
    let mut db = sqlx::SqliteConnection::connect(&url).await?;
    let rows = sqlx::query("SELECT message_id FROM chimera_inbox WHERE consumer = ?")
        .bind(domain)
        .fetch_all(&mut db)
        .await?;
    let _ = db.close().await;
    Ok(rows
        .iter()
        .filter_map(|r| r.try_get::<String, _>(0).ok())
        .map(|s| s.to_lowercase())
        .collect())
}

async fn wait_inbox(
    h: &Harness,
    domain: &str,
    ids: &[String],
    within: Duration,
) -> BTreeSet<String> {
    let deadline = Instant::now() + within;
    loop {
        let rows = inbox(h, domain).await.unwrap_or_default();
        if ids.iter().all(|i| rows.contains(i)) || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// SIGTERM to the worker under load: it says it is stopping, exits in its drain time with
/// status 0, and every message is handled or parked once a new worker took the rest. Then the
/// query head stops in its drain time too.
async fn drain(h: &mut Harness, probe: Option<&Probe>, notes: &mut Notes) {
    let domain = h.domain();
    if let Some(probe) = probe.filter(|_| h.heads.contains_key(Head::Worker.as_str())) {
        let sent: Vec<Envelope> = (0..300).map(|n| probe.envelope(10_000 + n)).collect();
        let handled = h.count(&probe.kind, "handled").await;
        if let Err(e) = h.send_all(&sent).await {
            notes.problem(Clause::Drain, format!("sending the load: {e:#}"));
            return;
        }
        h.wait_count(
            &probe.kind,
            "handled",
            handled + 10.0,
            Duration::from_secs(10),
        )
        .await;
        stop_under_watch(h, Head::Worker, notes).await;
        if let Err(e) = h.start(Head::Worker, READY_WITHIN).await {
            notes.problem(
                Clause::Drain,
                format!("the worker did not start again: {e}"),
            );
            return;
        }
        let ids: Vec<String> = sent.iter().map(|e| e.id.to_string()).collect();
        let deadline = Instant::now() + Duration::from_secs(120);
        let dlq = names::dead_letter_queue(&domain);
        let lost = loop {
            let _ = h.collect().await;
            let rows = match inbox(h, &domain).await {
                Ok(rows) => rows,
                Err(e) => {
                    notes.problem(
                        Clause::Drain,
                        format!("reading the inbox (chimera_inbox): {e}"),
                    );
                    return;
                }
            };
            // Parked: in the dlq (a message still waiting in a retry queue is not settled).
            let parked: BTreeSet<String> = h
                .failures
                .caught
                .iter()
                .filter(|c| c.routing_key == dlq)
                .filter_map(Caught::envelope_id)
                .collect();
            let lost: Vec<&String> = ids
                .iter()
                .filter(|i| !rows.contains(*i) && !parked.contains(*i))
                .collect();
            if lost.is_empty() || Instant::now() > deadline {
                break lost.len();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        notes.check(Clause::Drain, lost == 0, || {
            format!("{lost} of {} messages sent before the SIGTERM were neither handled nor dead-lettered 120 s later", ids.len())
        });
        notes.saw(
            Clause::Drain,
            format!("worker stopped under a load of {}, nothing lost", ids.len()),
        );
    } else if h.heads.contains_key(Head::Worker.as_str()) {
        stop_under_watch(h, Head::Worker, notes).await;
    }
    if h.heads.contains_key(Head::Query.as_str()) {
        stop_under_watch(h, Head::Query, notes).await;
    }
}

/// SIGTERM to `head`, watching `/readyz` until it exits.
async fn stop_under_watch(h: &mut Harness, head: Head, notes: &mut Notes) {
    let Some(mut running) = h.heads.remove(head.as_str()) else {
        return;
    };
    let budget = Duration::from_secs(termination_grace_seconds(&h.module, head).max(1) as u64);
    let name = head.as_str();
    terminate(running.replica.pid);
    let started = Instant::now();
    let mut ready_late = false;
    let mut said_stopping = false;
    let status = loop {
        if let Some(status) = running.replica.exited() {
            break Some(status);
        }
        if started.elapsed() > budget + Duration::from_secs(2) {
            break None;
        }
        if head == Head::Worker
            && let Ok(a) = h
                .http
                .get(format!("http://{}/readyz", running.addr))
                .send()
                .await
        {
            let status = a.status().as_u16();
            let body = a.text().await.unwrap_or_default();
            if status == 200 && started.elapsed() > Duration::from_millis(500) {
                ready_late = true;
            }
            if status == 503 && json_error(&body, "unavailable").is_ok() {
                said_stopping = true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let took = started.elapsed().as_secs_f64();
    match status {
        None => {
            notes.problem(
                Clause::Drain,
                format!(
                    "the {name} head still ran {} s after SIGTERM ({var} = {})",
                    budget.as_secs() + 2,
                    budget.as_secs(),
                    var = var::DRAIN_SECONDS
                ),
            );
            running.replica.stop(Duration::from_secs(1)).await;
        }
        Some(s) => {
            notes.check(Clause::Drain, s.ends_with(": 0"), || {
                format!(
                    "the {name} head exited with {s} after SIGTERM, not 0; its log ends:\n{}",
                    tail(&running.replica.spec.log_file)
                )
            });
            notes.saw(
                Clause::Drain,
                format!("{name} head exited {took:.1} s after SIGTERM"),
            );
        }
    }
    if head == Head::Worker {
        notes.check(Clause::Drain, !ready_late, || {
            "the worker still answered /readyz 200 while it drained".into()
        });
        if said_stopping {
            notes.saw(Clause::Drain, "/readyz 503 while draining");
        }
    }
}

/// The broker as the run found it (the taps aside) and no refusal in the heads' output.
async fn no_declaring(
    h: &Harness,
    client: &ManagementClient,
    before: &BrokerState,
    notes: &mut Notes,
) {
    let ours = |name: &str| name.starts_with("amq.gen-");
    match client.state().await {
        Ok(after) => {
            let names = |s: &BrokerState| -> BTreeSet<String> {
                s.exchanges
                    .iter()
                    .map(|e| format!("exchange {}", e.name))
                    .chain(
                        s.queues
                            .iter()
                            .filter(|q| !ours(&q.name))
                            .map(|q| format!("queue {}", q.name)),
                    )
                    .chain(
                        s.bindings
                            .iter()
                            .filter(|b| !ours(&b.destination))
                            .map(|b| {
                                format!(
                                    "binding {} -> {} ({})",
                                    b.source, b.destination, b.routing_key
                                )
                            }),
                    )
                    .collect()
            };
            let (was, is) = (names(before), names(&after));
            for added in is.difference(&was) {
                notes.problem(
                    Clause::NoDeclaring,
                    format!("the run left a {added} the control plane did not declare"),
                );
            }
            for gone in was.difference(&is) {
                notes.problem(
                    Clause::NoDeclaring,
                    format!("the {gone} the control plane declared is gone"),
                );
            }
        }
        Err(e) => notes.problem(Clause::NoDeclaring, format!("reading the broker: {e}")),
    }
    let logs = h.logs();
    if let Some(line) = logs.lines().find(|l| {
        let l = l.to_ascii_lowercase();
        l.contains("access_refused") || l.contains("access refused")
    }) {
        notes.problem(
            Clause::NoDeclaring,
            format!(
                "the broker refused a head something (it may not configure): {}",
                line.trim()
            ),
        );
    }
    notes.saw(
        Clause::NoDeclaring,
        "the heads ran as a user that may not configure; the topology is as declared",
    );
}
