//! What `chimera up` runs for a module, computed without I/O: the program a module's image maps
//! to, and each replica's environment (the head contract, resolved for a local process).
//!
//! - Program: the annotation `chimera.dev/local-binary` if set, otherwise the last path segment
//!   of `spec.image` without its tag (`registry.example/shop/users:1.4` runs `users`), found in
//!   `--bin-dir`, then the workspace's `target/release` and `target/debug`, then `PATH`.
//! - Secrets: a reference to key K of Secret S resolves to the environment variable
//!   `CHIMERA_SECRET_<S>_<K>` (upper case, `-` and `.` as `_`) of `chimera up`. Otherwise the
//!   broker URL is `chimera up`'s broker and the database is SQLite under the state directory.
//! - Pod fields: the pod name is `<module>-<head>-<n>`, the namespace `local`.

use chimera_contract::env as var;
use std::path::Path;

use crate::api::{ChimeraModule, SecretKeyRef};
use crate::workloads::{ContractValue, Head, contract_values, termination_grace_seconds};

/// Annotation naming the local program of a module (overrides the image's name).
pub const LOCAL_BINARY_ANNOTATION: &str = "chimera.dev/local-binary";
/// The namespace local heads see.
pub const LOCAL_NAMESPACE: &str = "local";

/// Why a replica cannot be planned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// A variable refers to a Secret nothing resolves locally.
    #[error(
        "module {module}: {variable} comes from Secret {secret} key {key}; set {env} for `chimera up`"
    )]
    UnresolvedSecret {
        /// Module name.
        module: String,
        /// The variable.
        variable: String,
        /// Secret name.
        secret: String,
        /// Key.
        key: String,
        /// The variable that would resolve it.
        env: String,
    },
}

/// The program a module runs locally.
pub fn program_name(module: &ChimeraModule) -> String {
    if let Some(name) = module
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LOCAL_BINARY_ANNOTATION))
    {
        return name.clone();
    }
    let image = module.spec.image.as_str();
    let last = image.rsplit('/').next().unwrap_or(image);
    let without_digest = last.split('@').next().unwrap_or(last);
    without_digest
        .split(':')
        .next()
        .unwrap_or(without_digest)
        .to_owned()
}

/// The variable that resolves `secret` locally.
pub fn secret_env_name(secret: &SecretKeyRef) -> String {
    let clean = |s: &str| {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect::<String>()
    };
    format!(
        "CHIMERA_SECRET_{}_{}",
        clean(&secret.name),
        clean(&secret.key)
    )
}

/// What the local runtime provides to every replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalContext {
    /// The broker's AMQP URL (with vhost).
    pub amqp_url: String,
    /// Where SQLite databases go.
    pub state_dir: String,
}

/// The environment of replica `n` of `head`, serving HTTP on `port`. `lookup` reads
/// `chimera up`'s own environment (for `CHIMERA_SECRET_...`).
pub fn replica_env(
    module: &ChimeraModule,
    head: Head,
    n: u32,
    port: u16,
    local: &LocalContext,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<(String, String)>, PlanError> {
    let name = module.metadata.name.clone().unwrap_or_default();
    let default_broker = SecretKeyRef {
        name: "chimera-broker".into(),
        key: "url".into(),
    };
    let mut env: Vec<(String, String)> = module
        .spec
        .env
        .iter()
        .filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v)))
        .collect();
    let mut has_database = false;
    for (variable, value) in contract_values(module, head, i32::from(port), &default_broker) {
        let value = match (variable.as_str(), value) {
            (var::HTTP_ADDR, _) => format!("127.0.0.1:{port}"),
            // No preStop sleep here: the head is stopped at once, and killed after its grace.
            (var::DRAIN_SECONDS, _) => termination_grace_seconds(module, head).to_string(),
            (_, ContractValue::Plain(v)) => v,
            (_, ContractValue::Field("metadata.namespace")) => LOCAL_NAMESPACE.to_owned(),
            (_, ContractValue::Field(_)) => format!("{name}-{}-{n}", head.as_str()),
            (var, ContractValue::Secret(secret)) => {
                let env_name = secret_env_name(&secret);
                match (lookup(&env_name), var) {
                    (Some(v), _) => v,
                    (None, var::AMQP_URL) => local.amqp_url.clone(),
                    (None, var::DATABASE_URL) => sqlite_url(local, module),
                    (None, _) => {
                        return Err(PlanError::UnresolvedSecret {
                            module: name,
                            variable: var.to_owned(),
                            secret: secret.name,
                            key: secret.key,
                            env: env_name,
                        });
                    }
                }
            }
        };
        has_database |= variable == var::DATABASE_URL;
        env.push((variable, value));
    }
    if !has_database {
        env.push((var::DATABASE_URL.into(), sqlite_url(local, module)));
    }
    Ok(env)
}

fn sqlite_url(local: &LocalContext, module: &ChimeraModule) -> String {
    let path = Path::new(&local.state_dir).join(format!("{}.db", module.domain()));
    format!("sqlite://{}", path.display())
}

/// The head's arguments: its spec's, or the contract's default (`query` / `worker`).
pub fn head_args(module: &ChimeraModule, head: Head) -> Vec<String> {
    let args = match head {
        Head::Query => module.spec.query.as_ref().map(|q| q.args.clone()),
        Head::Worker => module.spec.worker.as_ref().map(|w| w.args.clone()),
    }
    .unwrap_or_default();
    if args.is_empty() {
        vec![head.as_str().to_owned()]
    } else {
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::validation::modules_from_yaml;

    fn module(extra: &str) -> ChimeraModule {
        let yaml = format!(
            "apiVersion: chimera.dev/v1alpha1\nkind: ChimeraModule\nmetadata: {{name: users{extra}}}\nspec:\n  image: registry.example/shop/users:1.4\n  commands: [user.register]\n  query: {{}}\n  worker: {{prefetch: 7}}\n"
        );
        modules_from_yaml(&yaml).0.remove(0)
    }

    fn local() -> LocalContext {
        LocalContext {
            amqp_url: "amqp://guest:guest@127.0.0.1:5673/%2f".into(),
            state_dir: "/tmp/state".into(),
        }
    }

    fn get<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
        env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn programs_come_from_the_image_or_the_annotation() {
        assert_eq!(program_name(&module("")), "users");
        let mut m = module("");
        m.spec.image = "users@sha256:abc".into();
        assert_eq!(program_name(&m), "users");
        m.metadata.annotations =
            Some([(LOCAL_BINARY_ANNOTATION.to_owned(), "my-users".to_owned())].into());
        assert_eq!(program_name(&m), "my-users");
    }

    #[test]
    fn replicas_get_the_contract_resolved_locally() {
        let env = replica_env(&module(""), Head::Worker, 2, 40123, &local(), &|_| None).unwrap();
        assert_eq!(get(&env, "CHIMERA_HTTP_ADDR"), Some("127.0.0.1:40123"));
        assert_eq!(get(&env, "CHIMERA_POD_NAME"), Some("users-worker-2"));
        assert_eq!(get(&env, "CHIMERA_NAMESPACE"), Some("local"));
        assert_eq!(
            get(&env, "CHIMERA_AMQP_URL"),
            Some(local().amqp_url.as_str())
        );
        assert_eq!(
            get(&env, "CHIMERA_DATABASE_URL"),
            Some("sqlite:///tmp/state/users.db")
        );
        assert_eq!(get(&env, "CHIMERA_PREFETCH"), Some("7"));
        assert_eq!(
            get(&env, "CHIMERA_WORKER_QUEUE"),
            Some("chimera.users.worker")
        );
        let query = replica_env(&module(""), Head::Query, 1, 1, &local(), &|_| None).unwrap();
        assert_eq!(get(&query, "CHIMERA_WORKER_QUEUE"), None);
        // Stopped at once (no preStop sleep), killed after the whole grace period.
        assert_eq!(get(&query, "CHIMERA_DRAIN_SECONDS"), Some("30"));
        assert_eq!(get(&env, "CHIMERA_DRAIN_SECONDS"), Some("60"));
    }

    #[test]
    fn secrets_resolve_from_the_environment_or_fail_clearly() {
        let mut m = module("");
        m.spec.database = Some(crate::api::DatabaseSpec {
            secret_ref: SecretKeyRef {
                name: "users-db".into(),
                key: "url".into(),
            },
        });
        let lookup = |name: &str| {
            (name == "CHIMERA_SECRET_USERS_DB_URL").then(|| "mysql://u:p@db/users".to_owned())
        };
        let env = replica_env(&m, Head::Query, 1, 1, &local(), &lookup).unwrap();
        assert_eq!(
            get(&env, "CHIMERA_DATABASE_URL"),
            Some("mysql://u:p@db/users")
        );
        // Without it, the database falls back to local SQLite.
        let env = replica_env(&m, Head::Query, 1, 1, &local(), &|_| None).unwrap();
        assert_eq!(
            get(&env, "CHIMERA_DATABASE_URL"),
            Some("sqlite:///tmp/state/users.db")
        );
        assert_eq!(
            secret_env_name(&SecretKeyRef {
                name: "a-b.c".into(),
                key: "k".into()
            }),
            "CHIMERA_SECRET_A_B_C_K"
        );
    }

    #[test]
    fn head_args_default_to_the_head_name() {
        assert_eq!(head_args(&module(""), Head::Query), ["query"]);
        let mut m = module("");
        if let Some(w) = m.spec.worker.as_mut() {
            w.args = vec!["work".into(), "--fast".into()];
        }
        assert_eq!(head_args(&m, Head::Worker), ["work", "--fast"]);
    }
}
