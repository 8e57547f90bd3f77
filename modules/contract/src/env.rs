//! The environment variables a head receives (docs/contract.md, section 1). The operator writes
//! them into each head's pod, `chimera up` into each process, the SDK reads them.

/// `query` or `worker` ([`crate::Head`]).
pub const HEAD: &str = "CHIMERA_HEAD";
/// The domain, e.g. `orders`.
pub const DOMAIN: &str = "CHIMERA_DOMAIN";
/// The ChimeraModule's `metadata.name`.
pub const MODULE: &str = "CHIMERA_MODULE";
/// The pod's namespace (`local` under `chimera up`).
pub const NAMESPACE: &str = "CHIMERA_NAMESPACE";
/// This replica's unique name (the pod's name).
pub const POD_NAME: &str = "CHIMERA_POD_NAME";
/// `HOST:PORT` to serve HTTP on.
pub const HTTP_ADDR: &str = "CHIMERA_HTTP_ADDR";
/// The broker's AMQP URL, with the vhost.
pub const AMQP_URL: &str = "CHIMERA_AMQP_URL";
/// The domain's database URL (`sqlite://...`, `mysql://...`).
pub const DATABASE_URL: &str = "CHIMERA_DATABASE_URL";
/// The exchange the domain publishes its events on.
pub const EVENTS_EXCHANGE: &str = "CHIMERA_EVENTS_EXCHANGE";
/// The domain's commands exchange.
pub const COMMANDS_EXCHANGE: &str = "CHIMERA_COMMANDS_EXCHANGE";
/// Comma-separated event names the domain may publish.
pub const PUBLISHES: &str = "CHIMERA_PUBLISHES";
/// The worker's one queue.
pub const WORKER_QUEUE: &str = "CHIMERA_WORKER_QUEUE";
/// Where messages go after their last attempt.
pub const DEAD_LETTER_QUEUE: &str = "CHIMERA_DEAD_LETTER_QUEUE";
/// Where the worker publishes failed messages (to a retry queue or the dead-letter queue).
pub const FAILURES_EXCHANGE: &str = "CHIMERA_FAILURES_EXCHANGE";
/// Comma-separated retry delays in seconds.
pub const RETRY_DELAYS_SECONDS: &str = "CHIMERA_RETRY_DELAYS_SECONDS";
/// Attempts before dead-lettering.
pub const MAX_ATTEMPTS: &str = "CHIMERA_MAX_ATTEMPTS";
/// AMQP prefetch of the consuming channel.
pub const PREFETCH: &str = "CHIMERA_PREFETCH";
/// Comma-separated command names the worker accepts.
pub const COMMANDS: &str = "CHIMERA_COMMANDS";
/// The events the worker's queue is bound to: comma-separated `<domain>:<pattern>` (the
/// publishing domain, an event name or topic pattern), e.g. `gigs:gig.*,users:user.registered`.
pub const SUBSCRIPTIONS: &str = "CHIMERA_SUBSCRIPTIONS";
/// JSON Schemas of the payloads the worker receives: a JSON object from message type to schema
/// (its commands' and its subscribed events', from `spec.schemas`).
pub const SCHEMAS: &str = "CHIMERA_SCHEMAS";
/// Seconds from the head's SIGTERM until it is killed: what its drain may take.
pub const DRAIN_SECONDS: &str = "CHIMERA_DRAIN_SECONDS";
/// `json` for JSON log lines (set by the user in `spec.env`, not by the control plane).
pub const LOG_FORMAT: &str = "CHIMERA_LOG_FORMAT";

/// A variable of the head contract, as docs and a head's `--help` list it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variable {
    /// The name.
    pub name: &'static str,
    /// Given to the worker head only (otherwise to both).
    pub worker_only: bool,
    /// A head that reads it does not start without it.
    pub required: bool,
    /// What it means, in a line.
    pub meaning: &'static str,
}

const fn var(
    name: &'static str,
    worker_only: bool,
    required: bool,
    meaning: &'static str,
) -> Variable {
    Variable {
        name,
        worker_only,
        required,
        meaning,
    }
}

/// Every variable of the contract. The SDK's tests check the table against what its
/// configuration requires; the operator's, against what it sets.
pub const VARIABLES: &[Variable] = &[
    var(
        HEAD,
        false,
        true,
        "query or worker (or name the head on the command line)",
    ),
    var(DOMAIN, false, true, "the domain, e.g. orders"),
    var(
        MODULE,
        false,
        false,
        "the ChimeraModule's name (default: the domain)",
    ),
    var(
        NAMESPACE,
        false,
        false,
        "the pod's namespace (local under chimera up)",
    ),
    var(
        POD_NAME,
        false,
        false,
        "this replica's unique name (default: HOSTNAME)",
    ),
    var(HTTP_ADDR, false, true, "HOST:PORT to serve HTTP on"),
    var(
        AMQP_URL,
        false,
        true,
        "amqp:// or amqps:// URL of the broker, with vhost",
    ),
    var(
        DATABASE_URL,
        false,
        false,
        "sqlite://... or mysql://... (default: sqlite://<domain>.db)",
    ),
    var(
        EVENTS_EXCHANGE,
        false,
        false,
        "where the domain's events go (default: chimera.<domain>.events)",
    ),
    var(
        COMMANDS_EXCHANGE,
        false,
        false,
        "the domain's commands exchange (default: chimera.<domain>.commands)",
    ),
    var(
        PUBLISHES,
        false,
        false,
        "comma-separated event names the domain may publish",
    ),
    var(
        DRAIN_SECONDS,
        false,
        false,
        "seconds from SIGTERM until the head is killed: finish the drain within them",
    ),
    var(
        LOG_FORMAT,
        false,
        false,
        "json for JSON log lines (default: text); RUST_LOG filters",
    ),
    var(WORKER_QUEUE, true, true, "the one queue to consume"),
    var(
        DEAD_LETTER_QUEUE,
        true,
        true,
        "where messages go after the last attempt",
    ),
    var(
        FAILURES_EXCHANGE,
        true,
        false,
        "direct exchange for failed messages, routed by target queue (default: <queue>.failures)",
    ),
    var(
        RETRY_DELAYS_SECONDS,
        true,
        false,
        "comma-separated retry delays; retry queue n is <queue>.retry.<n>",
    ),
    var(
        MAX_ATTEMPTS,
        true,
        false,
        "attempts before dead-lettering (default: delays + 1)",
    ),
    var(
        PREFETCH,
        true,
        false,
        "AMQP prefetch of the consuming channel (default: 100)",
    ),
    var(
        COMMANDS,
        true,
        false,
        "comma-separated command names the worker accepts",
    ),
    var(
        SUBSCRIPTIONS,
        true,
        false,
        "comma-separated <domain>:<pattern> of the events the worker queue receives",
    ),
    var(
        SCHEMAS,
        true,
        false,
        "JSON object: message type -> JSON Schema of its data; a payload that fails is dead-lettered",
    ),
];

/// The value of [`SUBSCRIPTIONS`] for `(domain, pattern)` pairs.
pub fn subscriptions_value<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    pairs
        .into_iter()
        .map(|(domain, pattern)| format!("{domain}:{pattern}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The `(domain, pattern)` pairs of a [`SUBSCRIPTIONS`] value, or the entry that is not
/// `<domain>:<pattern>`.
pub fn parse_subscriptions(value: &str) -> Result<Vec<(String, String)>, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|entry| match entry.split_once(':') {
            Some((domain, pattern)) if !domain.is_empty() && !pattern.is_empty() => {
                Ok((domain.to_owned(), pattern.to_owned()))
            }
            _ => Err(entry.to_owned()),
        })
        .collect()
}

/// The table's entry for `name`.
pub fn variable(name: &str) -> Option<&'static Variable> {
    VARIABLES.iter().find(|v| v.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_reserved() {
        for (i, v) in VARIABLES.iter().enumerate() {
            assert!(v.name.starts_with("CHIMERA_"), "{}", v.name);
            assert!(
                VARIABLES[..i].iter().all(|w| w.name != v.name),
                "{} twice",
                v.name
            );
            assert_eq!(variable(v.name), Some(v));
        }
        assert_eq!(variable("PATH"), None);
    }

    #[test]
    fn subscriptions_go_through_their_variable_unchanged() {
        let pairs = [
            ("gigs", "gig.*"),
            ("users", "user.registered"),
            ("audit", "#"),
        ];
        let value = subscriptions_value(pairs);
        assert_eq!(value, "gigs:gig.*,users:user.registered,audit:#");
        let back = parse_subscriptions(&value).unwrap_or_default();
        assert_eq!(
            back.iter()
                .map(|(d, p)| (d.as_str(), p.as_str()))
                .collect::<Vec<_>>(),
            pairs
        );
        assert_eq!(parse_subscriptions(" "), Ok(vec![]));
        assert_eq!(
            parse_subscriptions("gigs:gig.*,user.registered"),
            Err("user.registered".to_owned())
        );
        assert_eq!(parse_subscriptions(":x"), Err(":x".to_owned()));
    }
}
