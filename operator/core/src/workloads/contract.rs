//! The head contract's environment (docs/contract.md): what every head of every language
//! can rely on finding at start.

use chimera_contract::env as var;
use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, ObjectFieldSelector, SecretKeySelector};

use super::Head;
use crate::api::{ChimeraModule, SecretKeyRef};
use chimera_contract::names;

/// The contract variables for one head, in a stable order.
#[derive(Clone, Debug, PartialEq)]
pub struct ContractEnv(pub Vec<EnvVar>);

/// Where a contract variable's value comes from, independent of where the head runs: a pod
/// (a Secret reference, a field of the pod) or a local process (`chimera up` resolves them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContractValue {
    /// The value itself.
    Plain(String),
    /// A key of a Secret in the module's namespace.
    Secret(SecretKeyRef),
    /// A field of the pod (`metadata.name`, `metadata.namespace`).
    Field(&'static str),
}

fn plain(name: &str, value: impl Into<String>) -> (String, ContractValue) {
    (name.to_owned(), ContractValue::Plain(value.into()))
}

fn from_secret(name: &str, secret: &SecretKeyRef) -> (String, ContractValue) {
    (name.to_owned(), ContractValue::Secret(secret.clone()))
}

fn from_field(name: &str, path: &'static str) -> (String, ContractValue) {
    (name.to_owned(), ContractValue::Field(path))
}

fn env_var((name, value): (String, ContractValue)) -> EnvVar {
    let from = |source: EnvVarSource| EnvVar {
        name: name.clone(),
        value: None,
        value_from: Some(source),
    };
    match value {
        ContractValue::Plain(v) => EnvVar {
            name: name.clone(),
            value: Some(v),
            value_from: None,
        },
        ContractValue::Secret(secret) => from(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.name,
                key: secret.key,
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ContractValue::Field(path) => from(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// Builds the contract environment of `head` for `module`, as container variables.
///
/// `default_broker` is used when the module names no broker of its own; `port` is the head's
/// HTTP port.
pub fn contract_env(
    module: &ChimeraModule,
    head: Head,
    port: i32,
    default_broker: &SecretKeyRef,
) -> ContractEnv {
    ContractEnv(
        contract_values(module, head, port, default_broker)
            .into_iter()
            .map(env_var)
            .collect(),
    )
}

/// The contract variables of `head` for `module` and where their values come from.
pub fn contract_values(
    module: &ChimeraModule,
    head: Head,
    port: i32,
    default_broker: &SecretKeyRef,
) -> Vec<(String, ContractValue)> {
    let domain = module.domain();
    let spec = &module.spec;
    let mut env = vec![
        plain(
            var::MODULE,
            module.metadata.name.clone().unwrap_or_default(),
        ),
        plain(var::DOMAIN, domain),
        plain(var::HEAD, head.as_str()),
        from_field(var::NAMESPACE, "metadata.namespace"),
        from_field(var::POD_NAME, "metadata.name"),
        plain(var::HTTP_ADDR, format!("0.0.0.0:{port}")),
        from_secret(
            var::AMQP_URL,
            spec.broker
                .as_ref()
                .map(|b| &b.secret_ref)
                .unwrap_or(default_broker),
        ),
    ];
    if let Some(db) = &spec.database {
        env.push(from_secret(var::DATABASE_URL, &db.secret_ref));
    }
    env.push(plain(var::EVENTS_EXCHANGE, names::events_exchange(domain)));
    env.push(plain(
        var::COMMANDS_EXCHANGE,
        names::commands_exchange(domain),
    ));
    env.push(plain(var::PUBLISHES, spec.events.publishes.join(",")));
    env.push(plain(
        var::DRAIN_SECONDS,
        super::drain_seconds(module, head).to_string(),
    ));
    if let (Head::Worker, Some(worker)) = (head, &spec.worker) {
        let delays = &worker.retry.delays_seconds;
        env.extend([
            plain(var::WORKER_QUEUE, names::worker_queue(domain)),
            plain(var::DEAD_LETTER_QUEUE, names::dead_letter_queue(domain)),
            plain(var::FAILURES_EXCHANGE, names::failures_exchange(domain)),
            plain(
                var::RETRY_DELAYS_SECONDS,
                delays
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            plain(var::MAX_ATTEMPTS, (delays.len() + 1).to_string()),
            plain(var::PREFETCH, worker.prefetch.to_string()),
            plain(var::COMMANDS, spec.commands.join(",")),
            plain(
                var::SUBSCRIPTIONS,
                var::subscriptions_value(spec.events.subscribes.iter().flat_map(|s| {
                    s.events
                        .iter()
                        .map(move |pattern| (s.from.as_str(), pattern.as_str()))
                })),
            ),
        ]);
        let schemas = crate::api::schemas::consumed(module);
        if !schemas.is_empty() {
            env.push(plain(
                var::SCHEMAS,
                serde_json::to_string(&schemas).unwrap_or_default(),
            ));
        }
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::fixtures::module;

    fn value<'a>(env: &'a ContractEnv, name: &str) -> Option<&'a str> {
        env.0
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.as_deref())
    }

    fn broker() -> SecretKeyRef {
        SecretKeyRef {
            name: "chimera-broker".into(),
            key: "url".into(),
        }
    }

    #[test]
    fn the_worker_gets_the_schemas_of_what_it_receives() {
        let mut m = module("orders");
        assert_eq!(
            value(
                &contract_env(&m, Head::Worker, 8080, &broker()),
                "CHIMERA_SCHEMAS"
            ),
            None,
            "no schemas, no variable"
        );
        for kind in ["order.place", "order.placed", "user.registered"] {
            m.spec.schemas.insert(
                kind.to_owned(),
                serde_json::json!({"type": "object", "description": kind}),
            );
        }
        let env = contract_env(&m, Head::Worker, 8080, &broker());
        let schemas: serde_json::Value =
            serde_json::from_str(value(&env, "CHIMERA_SCHEMAS").unwrap_or("null"))
                .unwrap_or_default();
        // Its command and the event it subscribes to; not the event it publishes.
        assert_eq!(
            schemas
                .as_object()
                .map(|o| o.keys().cloned().collect::<Vec<_>>()),
            Some(vec!["order.place".to_owned(), "user.registered".to_owned()])
        );
        assert_eq!(schemas["order.place"]["description"], "order.place");
        let query = contract_env(&m, Head::Query, 8080, &broker());
        assert_eq!(value(&query, "CHIMERA_SCHEMAS"), None);
    }

    #[test]
    fn worker_gets_queue_retry_and_prefetch() {
        let env = contract_env(&module("orders"), Head::Worker, 8080, &broker());
        assert_eq!(value(&env, "CHIMERA_HEAD"), Some("worker"));
        assert_eq!(
            value(&env, "CHIMERA_WORKER_QUEUE"),
            Some("chimera.orders.worker")
        );
        assert_eq!(
            value(&env, "CHIMERA_DEAD_LETTER_QUEUE"),
            Some("chimera.orders.worker.dlq")
        );
        assert_eq!(value(&env, "CHIMERA_RETRY_DELAYS_SECONDS"), Some("1,10,60"));
        assert_eq!(value(&env, "CHIMERA_MAX_ATTEMPTS"), Some("4"));
        assert_eq!(value(&env, "CHIMERA_PREFETCH"), Some("100"));
        assert_eq!(value(&env, "CHIMERA_COMMANDS"), Some("order.place"));
        assert_eq!(value(&env, "CHIMERA_SUBSCRIPTIONS"), Some("users:user.*"));
        assert_eq!(value(&env, "CHIMERA_HTTP_ADDR"), Some("0.0.0.0:8080"));
    }

    #[test]
    fn every_variable_set_is_in_the_contract_table_for_its_head() {
        for head in Head::ALL {
            let env = contract_env(&module("orders"), head, 8080, &broker());
            for e in &env.0 {
                let v = chimera_contract::env::variable(&e.name)
                    .unwrap_or_else(|| panic!("{} is not in the contract's table", e.name));
                assert!(
                    !v.worker_only || head == Head::Worker,
                    "{} on {head}",
                    e.name
                );
            }
            // What a head cannot start without is always there.
            for v in chimera_contract::env::VARIABLES {
                if v.required && (!v.worker_only || head == Head::Worker) {
                    assert!(
                        env.0.iter().any(|e| e.name == v.name),
                        "{} missing on {head}",
                        v.name
                    );
                }
            }
        }
    }

    #[test]
    fn query_gets_no_worker_variables() {
        let env = contract_env(&module("orders"), Head::Query, 9000, &broker());
        assert_eq!(value(&env, "CHIMERA_HEAD"), Some("query"));
        assert_eq!(value(&env, "CHIMERA_HTTP_ADDR"), Some("0.0.0.0:9000"));
        assert!(env.0.iter().all(|e| e.name != "CHIMERA_WORKER_QUEUE"));
    }

    #[test]
    fn broker_comes_from_the_module_or_the_default() {
        let secret_of = |env: &ContractEnv| {
            env.0
                .iter()
                .find(|e| e.name == "CHIMERA_AMQP_URL")
                .and_then(|e| e.value_from.clone())
                .and_then(|v| v.secret_key_ref)
                .map(|s| (s.name, s.key))
        };
        let mut m = module("orders");
        let env = contract_env(&m, Head::Query, 8080, &broker());
        assert_eq!(
            secret_of(&env),
            Some(("chimera-broker".into(), "url".into()))
        );
        m.spec.broker = Some(crate::api::BrokerSpec {
            secret_ref: SecretKeyRef {
                name: "own-mq".into(),
                key: "amqp".into(),
            },
        });
        let env = contract_env(&m, Head::Query, 8080, &broker());
        assert_eq!(secret_of(&env), Some(("own-mq".into(), "amqp".into())));
    }

    #[test]
    fn database_url_only_when_the_module_has_a_database() {
        let mut m = module("orders");
        let env = contract_env(&m, Head::Worker, 8080, &broker());
        assert!(env.0.iter().all(|e| e.name != "CHIMERA_DATABASE_URL"));
        m.spec.database = Some(crate::api::DatabaseSpec {
            secret_ref: SecretKeyRef {
                name: "orders-db".into(),
                key: "url".into(),
            },
        });
        let env = contract_env(&m, Head::Worker, 8080, &broker());
        assert!(env.0.iter().any(|e| e.name == "CHIMERA_DATABASE_URL"));
    }
}
