//! The head's configuration, read from the head contract's environment (docs/contract.md) and
//! checked at start: a missing or malformed variable is an error that names it.

use std::collections::HashMap;
use std::net::SocketAddr;

pub use chimera_contract::Head;
use chimera_contract::env::{self as var, Variable};
use chimera_contract::names;

/// Every variable a head reads (the contract's table; `--help` lists it). A test checks the
/// table against what `HeadConfig::from_vars` requires.
pub const VARIABLES: &[Variable] = chimera_contract::env::VARIABLES;

/// A variable of the contract is missing or malformed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A required variable is not set (or empty).
    #[error("{0} is not set (the operator or `chimera up` sets it; see docs/contract.md)")]
    Missing(&'static str),
    /// A variable is set to something unusable.
    #[error("{name}={value:?} is invalid: {reason}")]
    Invalid {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: String,
    },
}

/// Everything a head learns from its environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadConfig {
    /// `CHIMERA_MODULE`.
    pub module: String,
    /// `CHIMERA_DOMAIN`.
    pub domain: String,
    /// `CHIMERA_HEAD`.
    pub head: Head,
    /// `CHIMERA_POD_NAME` (or the host name): unique per replica.
    pub instance: String,
    /// `CHIMERA_HTTP_ADDR`.
    pub http_addr: SocketAddr,
    /// `CHIMERA_AMQP_URL`.
    pub amqp_url: String,
    /// `CHIMERA_DATABASE_URL`, when the module has a database.
    pub database_url: Option<String>,
    /// `CHIMERA_EVENTS_EXCHANGE`.
    pub events_exchange: String,
    /// `CHIMERA_COMMANDS_EXCHANGE`.
    pub commands_exchange: String,
    /// `CHIMERA_PUBLISHES`: the event names this domain may publish.
    pub publishes: Vec<String>,
    /// `CHIMERA_DRAIN_SECONDS`: how long the head has from SIGTERM until it is killed (none:
    /// unbounded, the caller's kill bounds it).
    pub drain: Option<std::time::Duration>,
    /// Worker settings (only for the worker head).
    pub worker: Option<WorkerConfig>,
}

/// What only the worker head needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerConfig {
    /// `CHIMERA_WORKER_QUEUE`.
    pub queue: String,
    /// `CHIMERA_DEAD_LETTER_QUEUE`.
    pub dead_letter_queue: String,
    /// `CHIMERA_FAILURES_EXCHANGE`: where retries and dead letters are published, routed by
    /// the name of the queue they go to.
    pub failures_exchange: String,
    /// `CHIMERA_RETRY_DELAYS_SECONDS`: retry queue n (from 1) waits `retry_delays[n-1]` s.
    pub retry_delays_seconds: Vec<u64>,
    /// `CHIMERA_MAX_ATTEMPTS`.
    pub max_attempts: u32,
    /// `CHIMERA_PREFETCH`.
    pub prefetch: u16,
    /// `CHIMERA_COMMANDS`.
    pub commands: Vec<String>,
    /// `CHIMERA_SUBSCRIPTIONS`: `(domain, pattern)` of the events its queue is bound to; `None`
    /// when the control plane did not say (an older one).
    pub subscriptions: Option<Vec<(String, String)>>,
    /// `CHIMERA_SCHEMAS`: the JSON Schema of the payload of each message type it receives that
    /// has one (each compiles: checked when read).
    pub schemas: std::collections::BTreeMap<String, serde_json::Value>,
}

impl WorkerConfig {
    /// Whether `kind` is an event the worker's queue is bound to, not one of its commands: a
    /// message it may get without a handler for it (a wildcard subscription brings the
    /// publisher's newer events too), which it acknowledges instead of dead-lettering.
    pub fn subscribed_event(&self, kind: &str) -> bool {
        !self.commands.iter().any(|c| c == kind)
            && self.subscriptions.as_ref().is_some_and(|subscriptions| {
                subscriptions
                    .iter()
                    .any(|(_, pattern)| chimera_contract::pattern::topic_matches(pattern, kind))
            })
    }

    /// The retry rule: after a failed attempt number `attempt` (from 1), the retry it goes to
    /// (`Some(n)`: retry queue n, delay `retry_delays_seconds[n-1]`), or `None` when that was
    /// the last attempt and the message is dead-lettered.
    pub fn retry_after(&self, attempt: i64) -> Option<usize> {
        let n = usize::try_from(attempt).ok()?;
        (attempt < i64::from(self.max_attempts)
            && (1..=self.retry_delays_seconds.len()).contains(&n))
        .then_some(n)
    }

    /// The retry queue for retry number `n` (from 1): the contract's retry rule.
    pub fn retry_queue(&self, n: usize) -> String {
        names::retry_queue_of(&self.queue, n)
    }
}

fn list(value: Option<&String>) -> Vec<String> {
    value
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

impl HeadConfig {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(&std::env::vars().collect())
    }

    /// Reads the configuration from `vars` (what `from_env` does, testable).
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let get = |name: &'static str| vars.get(name).filter(|v| !v.trim().is_empty());
        let required = |name: &'static str| get(name).cloned().ok_or(ConfigError::Missing(name));
        let invalid = |name: &'static str, value: &str, reason: &str| ConfigError::Invalid {
            name,
            value: value.to_owned(),
            reason: reason.to_owned(),
        };

        let head_raw = required(var::HEAD)?;
        let head: Head = head_raw
            .parse()
            .map_err(|_| invalid(var::HEAD, &head_raw, "expected query or worker"))?;
        let addr = required(var::HTTP_ADDR)?;
        let http_addr = addr.parse().map_err(|_| {
            invalid(
                var::HTTP_ADDR,
                &addr,
                "expected HOST:PORT, e.g. 0.0.0.0:8080",
            )
        })?;
        let amqp_url = required(var::AMQP_URL)?;
        if !(amqp_url.starts_with("amqp://") || amqp_url.starts_with("amqps://")) {
            return Err(invalid(
                var::AMQP_URL,
                "<redacted>",
                "expected amqp://... or amqps://...",
            ));
        }
        let domain = required(var::DOMAIN)?;
        let drain = get(var::DRAIN_SECONDS)
            .map(|raw| {
                raw.trim()
                    .parse::<u64>()
                    .map(std::time::Duration::from_secs)
                    .map_err(|_| invalid(var::DRAIN_SECONDS, raw, "expected whole seconds"))
            })
            .transpose()?;
        let worker = match head {
            Head::Query => None,
            Head::Worker => {
                let delays_raw = get(var::RETRY_DELAYS_SECONDS).cloned().unwrap_or_default();
                let retry_delays_seconds = list(Some(&delays_raw))
                    .iter()
                    .map(|d| d.parse::<u64>().ok().filter(|d| *d > 0))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        invalid(
                            var::RETRY_DELAYS_SECONDS,
                            &delays_raw,
                            "expected positive whole seconds, comma-separated",
                        )
                    })?;
                let attempts_raw = get(var::MAX_ATTEMPTS).cloned();
                let max_attempts = match &attempts_raw {
                    None => retry_delays_seconds.len() as u32 + 1,
                    Some(raw) => raw.parse::<u32>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                        invalid(var::MAX_ATTEMPTS, raw, "expected a whole number >= 1")
                    })?,
                };
                let prefetch_raw = get(var::PREFETCH)
                    .cloned()
                    .unwrap_or_else(|| "100".to_owned());
                let prefetch = prefetch_raw
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p >= 1)
                    .ok_or_else(|| invalid(var::PREFETCH, &prefetch_raw, "expected 1-65535"))?;
                let subscriptions = get(var::SUBSCRIPTIONS)
                    .or_else(|| vars.get(var::SUBSCRIPTIONS))
                    .map(|raw| {
                        var::parse_subscriptions(raw).map_err(|entry| {
                            invalid(
                                var::SUBSCRIPTIONS,
                                raw,
                                &format!("{entry:?} is not <domain>:<pattern>"),
                            )
                        })
                    })
                    .transpose()?;
                let schemas = match get(var::SCHEMAS) {
                    None => std::collections::BTreeMap::new(),
                    Some(raw) => {
                        let schemas: std::collections::BTreeMap<String, serde_json::Value> =
                            serde_json::from_str(raw).map_err(|e| {
                                invalid(
                                    var::SCHEMAS,
                                    "<schemas>",
                                    &format!(
                                        "expected a JSON object of message type to schema: {e}"
                                    ),
                                )
                            })?;
                        for (kind, schema) in &schemas {
                            jsonschema::validator_for(schema).map_err(|e| {
                                invalid(
                                    var::SCHEMAS,
                                    "<schemas>",
                                    &format!(
                                        "the schema of {kind} is not a valid JSON Schema: {e}"
                                    ),
                                )
                            })?;
                        }
                        schemas
                    }
                };
                let queue = required(var::WORKER_QUEUE)?;
                Some(WorkerConfig {
                    failures_exchange: get(var::FAILURES_EXCHANGE)
                        .cloned()
                        .unwrap_or_else(|| names::failures_exchange_of(&queue)),
                    queue,
                    dead_letter_queue: required(var::DEAD_LETTER_QUEUE)?,
                    retry_delays_seconds,
                    max_attempts,
                    prefetch,
                    commands: list(get(var::COMMANDS)),
                    subscriptions,
                    schemas,
                })
            }
        };
        Ok(Self {
            module: get(var::MODULE).cloned().unwrap_or_else(|| domain.clone()),
            instance: get(var::POD_NAME)
                .or_else(|| get("HOSTNAME"))
                .cloned()
                .unwrap_or_else(|| format!("{domain}-{}", std::process::id())),
            events_exchange: get(var::EVENTS_EXCHANGE)
                .cloned()
                .unwrap_or_else(|| names::events_exchange(&domain)),
            commands_exchange: get(var::COMMANDS_EXCHANGE)
                .cloned()
                .unwrap_or_else(|| names::commands_exchange(&domain)),
            publishes: list(get(var::PUBLISHES)),
            database_url: get(var::DATABASE_URL).cloned(),
            domain,
            head,
            http_addr,
            amqp_url,
            drain,
            worker,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn worker_env() -> HashMap<String, String> {
        vars(&[
            ("CHIMERA_HEAD", "worker"),
            ("CHIMERA_DOMAIN", "orders"),
            ("CHIMERA_HTTP_ADDR", "0.0.0.0:8080"),
            ("CHIMERA_AMQP_URL", "amqp://u:p@mq:5672/%2f"),
            ("CHIMERA_WORKER_QUEUE", "chimera.orders.worker"),
            ("CHIMERA_DEAD_LETTER_QUEUE", "chimera.orders.worker.dlq"),
            ("CHIMERA_FAILURES_EXCHANGE", "orders.failed"),
            ("CHIMERA_RETRY_DELAYS_SECONDS", "1,10,60"),
            ("CHIMERA_PREFETCH", "200"),
            ("CHIMERA_COMMANDS", "order.place, order.cancel"),
            ("CHIMERA_PUBLISHES", "order.placed"),
            ("CHIMERA_DRAIN_SECONDS", "60"),
            ("CHIMERA_SUBSCRIPTIONS", "gigs:gig.*,users:user.registered"),
            (
                "CHIMERA_SCHEMAS",
                r#"{"order.place": {"type": "object", "required": ["gig_id"]}}"#,
            ),
        ])
    }

    #[test]
    fn the_variable_table_says_what_from_vars_requires() {
        let full = worker_env();
        for v in VARIABLES {
            let mut without = full.clone();
            without.remove(v.name);
            let outcome = HeadConfig::from_vars(&without);
            if v.required {
                assert_eq!(outcome, Err(ConfigError::Missing(v.name)), "{}", v.name);
            } else {
                assert!(outcome.is_ok(), "{} is optional: {outcome:?}", v.name);
            }
        }
        // The query head needs none of the worker's variables.
        let mut query = full.clone();
        query.insert("CHIMERA_HEAD".into(), "query".into());
        for v in VARIABLES.iter().filter(|v| v.worker_only) {
            query.remove(v.name);
        }
        assert!(HeadConfig::from_vars(&query).is_ok());
        // And every variable the worker test environment sets is in the table.
        for name in full.keys() {
            assert!(
                VARIABLES.iter().any(|v| v.name == name),
                "{name} not in VARIABLES"
            );
        }
    }

    #[test]
    fn the_retry_rule_gives_each_attempt_its_queue_then_the_dead_letter_queue() {
        let mut w = HeadConfig::from_vars(&worker_env())
            .unwrap_or_else(|e| panic!("{e}"))
            .worker
            .unwrap_or_else(|| panic!("worker config"));
        // delays 1,10,60 and max attempts 4: attempts 1-3 retry through queues 1-3.
        assert_eq!(
            (0..=5).map(|a| w.retry_after(a)).collect::<Vec<_>>(),
            [None, Some(1), Some(2), Some(3), None, None]
        );
        // Fewer attempts than delays: the attempts end it.
        w.max_attempts = 2;
        assert_eq!(w.retry_after(1), Some(1));
        assert_eq!(w.retry_after(2), None);
        // No delays: the first failure is the last.
        w.retry_delays_seconds.clear();
        w.max_attempts = 5;
        assert_eq!(w.retry_after(1), None);
        assert_eq!(w.retry_after(-1), None);
    }

    #[test]
    fn a_worker_reads_the_contract() {
        let c = HeadConfig::from_vars(&worker_env()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.head, Head::Worker);
        assert_eq!(c.events_exchange, "chimera.orders.events");
        assert_eq!(c.drain, Some(std::time::Duration::from_secs(60)));
        let w = c.worker.unwrap_or_else(|| panic!("worker config"));
        assert_eq!(w.retry_delays_seconds, [1, 10, 60]);
        assert_eq!(w.max_attempts, 4);
        assert_eq!(w.prefetch, 200);
        assert_eq!(w.commands, ["order.place", "order.cancel"]);
        // Events its queue is bound to may come without a handler; commands and anything
        // else may not.
        assert!(w.subscribed_event("gig.published") && w.subscribed_event("gig.archived"));
        assert!(w.subscribed_event("user.registered"));
        assert!(!w.subscribed_event("user.deleted") && !w.subscribed_event("order.place"));
        assert_eq!(
            w.schemas.keys().collect::<Vec<_>>(),
            [&"order.place".to_owned()]
        );
        let mut older = w.clone();
        older.subscriptions = None;
        assert!(
            !older.subscribed_event("gig.published"),
            "unknown: not assumed"
        );
        assert_eq!(w.retry_queue(2), "chimera.orders.worker.retry.2");
        assert_eq!(w.failures_exchange, "orders.failed");
        // Unset, the failures exchange follows from the queue (the contract's naming rule).
        let mut env = worker_env();
        env.remove("CHIMERA_FAILURES_EXCHANGE");
        let w = HeadConfig::from_vars(&env)
            .ok()
            .and_then(|c| c.worker)
            .unwrap_or_else(|| panic!("worker config"));
        assert_eq!(w.failures_exchange, "chimera.orders.worker.failures");
    }

    #[test]
    fn every_missing_or_bad_variable_is_named() {
        for name in [
            "CHIMERA_HEAD",
            "CHIMERA_DOMAIN",
            "CHIMERA_HTTP_ADDR",
            "CHIMERA_AMQP_URL",
            "CHIMERA_WORKER_QUEUE",
            "CHIMERA_DEAD_LETTER_QUEUE",
        ] {
            let mut env = worker_env();
            env.remove(name);
            let err = HeadConfig::from_vars(&env)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.starts_with(name), "{name}: {err}");
        }
        for (name, bad) in [
            ("CHIMERA_HEAD", "both"),
            ("CHIMERA_HTTP_ADDR", "8080"),
            ("CHIMERA_AMQP_URL", "http://mq"),
            ("CHIMERA_PREFETCH", "0"),
            ("CHIMERA_PREFETCH", "70000"),
            ("CHIMERA_RETRY_DELAYS_SECONDS", "1,x"),
            ("CHIMERA_MAX_ATTEMPTS", "0"),
            ("CHIMERA_DRAIN_SECONDS", "-1"),
            ("CHIMERA_DRAIN_SECONDS", "soon"),
            ("CHIMERA_SUBSCRIPTIONS", "gigs:gig.*,user.registered"),
            ("CHIMERA_SCHEMAS", "[1, 2]"),
            ("CHIMERA_SCHEMAS", r#"{"order.place": {"type": 7}}"#),
        ] {
            let mut env = worker_env();
            env.insert(name.to_owned(), bad.to_owned());
            let err = HeadConfig::from_vars(&env)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                err.starts_with(name) && err.contains("invalid"),
                "{name}={bad}: {err}"
            );
        }
    }

    #[test]
    fn credentials_never_appear_in_errors() {
        let mut env = worker_env();
        env.insert("CHIMERA_AMQP_URL".into(), "ftp://user:secret@mq".into());
        let err = HeadConfig::from_vars(&env)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn a_query_head_needs_no_worker_variables() {
        let env = vars(&[
            ("CHIMERA_HEAD", "query"),
            ("CHIMERA_DOMAIN", "orders"),
            ("CHIMERA_HTTP_ADDR", "127.0.0.1:0"),
            ("CHIMERA_AMQP_URL", "amqp://mq"),
        ]);
        let c = HeadConfig::from_vars(&env).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.head, Head::Query);
        assert!(c.worker.is_none());
        assert_eq!(c.module, "orders");
    }
}
