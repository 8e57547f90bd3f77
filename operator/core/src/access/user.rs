//! Who a module's own broker user is: its name on the broker, the URL its heads connect with,
//! and the Secret that carries that URL into the module's namespace.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;

use crate::api::ChimeraModule;
use crate::topology::state::{BadUrl, percent_encode, redact};
use crate::workloads::{BuildError, MANAGED_BY, MODULE_LABEL, Owner};

/// The tag the operator puts on the users it makes. It deletes a user only when the user
/// carries it: a user of the same name made by someone else is never taken over or removed.
pub const USER_TAG: &str = "chimera-module";

/// Key of the module Secret holding the AMQP URL (what the heads get as `CHIMERA_AMQP_URL`).
pub const URL_KEY: &str = "url";
/// Key of the module Secret holding the user name.
pub const USERNAME_KEY: &str = "username";
/// Key of the module Secret holding the password.
pub const PASSWORD_KEY: &str = "password";

/// Characters of a generated password: URL-safe, so the URL needs no escaping of them.
const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
/// Length of a generated password: 32 characters of 62 is over 190 bits.
pub const PASSWORD_LEN: usize = 32;

/// Name of the Secret holding a module's broker URL: `<module>-broker`.
pub fn secret_name(module: &str) -> String {
    format!("{module}-broker")
}

/// The broker user of module `name` in `namespace`, on `vhost`:
/// `chimera:<namespace>:<module>@<vhost>`. The vhost is part of the name because a user is
/// broker-wide while its permissions are per vhost: two clusters sharing a broker on different
/// vhosts must not share (and reset each other's) users.
pub fn user_name(namespace: &str, name: &str, vhost: &str) -> String {
    format!("chimera:{namespace}:{name}@{vhost}")
}

/// The broker user of `module` on `vhost`.
pub fn module_user(module: &ChimeraModule, vhost: &str) -> String {
    user_name(
        &module.namespace().unwrap_or_default(),
        &module.name_any(),
        vhost,
    )
}

/// A password from random bytes (one character per byte; the modulo bias of 256 over 62 is
/// a fraction of a bit per character, which 32 characters leave far above any attack).
pub fn password_from(random: &[u8; PASSWORD_LEN]) -> String {
    random
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect()
}

/// `base` (the operator's AMQP URL: scheme, host, port, vhost, query) with the user and
/// password replaced.
pub fn with_credentials(base: &str, user: &str, password: &str) -> Result<String, BadUrl> {
    let (scheme, rest) = base.split_once("://").ok_or_else(|| BadUrl {
        what: "AMQP",
        url: redact(base),
        reason: "expected amqp://... or amqps://...".into(),
    })?;
    // The authority ends at the first '/' after the last '@' (a password may hold '/').
    let after_creds = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    Ok(format!(
        "{scheme}://{}:{}@{after_creds}",
        percent_encode(user),
        percent_encode(password)
    ))
}

/// The Secret `<module>-broker` with the module's URL, user and password, owned by the module
/// (deleted with it by the garbage collector).
pub fn broker_secret(
    module: &ChimeraModule,
    user: &str,
    password: &str,
    url: &str,
) -> Result<Secret, BuildError> {
    let Owner {
        name,
        namespace,
        reference: owner,
        ..
    } = Owner::of(module)?;
    let data = [
        (URL_KEY, url),
        (USERNAME_KEY, user),
        (PASSWORD_KEY, password),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
    .collect();
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(name)),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (MODULE_LABEL.to_owned(), name.to_owned()),
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    MANAGED_BY.to_owned(),
                ),
                ("app.kubernetes.io/part-of".to_owned(), "chimera".to_owned()),
            ])),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        data: Some(data),
        type_: Some("Opaque".to_owned()),
        ..Secret::default()
    })
}

/// A key of a Secret as text, when present.
pub fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::state::percent_decode;
    use crate::workloads::fixtures::module;
    use proptest::prelude::*;

    #[test]
    fn users_are_named_by_namespace_module_and_vhost() {
        let m = module("orders");
        assert_eq!(module_user(&m, "/"), "chimera:shop:orders@/");
        assert_ne!(user_name("a", "b", "v1"), user_name("a", "b", "v2"));
        assert_eq!(secret_name("orders"), "orders-broker");
    }

    #[test]
    fn the_url_keeps_the_server_and_vhost_and_swaps_the_credentials() {
        let url = with_credentials(
            "amqps://admin:s3cr/t@mq.shop.svc:5671/prod%2Fa?heartbeat=10",
            "chimera:shop:orders@prod/a",
            "pw",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            url,
            "amqps://chimera%3Ashop%3Aorders%40prod%2Fa:pw@mq.shop.svc:5671/prod%2Fa?heartbeat=10"
        );
        let bare =
            with_credentials("amqp://mq:5672/%2f", "u", "p").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(bare, "amqp://u:p@mq:5672/%2f");
        assert!(with_credentials("mq:5672", "u", "p").is_err());
    }

    #[test]
    fn the_secret_is_owned_by_the_module_and_holds_the_url() {
        let m = module("orders");
        let s = broker_secret(&m, "u", "p", "amqp://u:p@mq/%2f").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.metadata.name.as_deref(), Some("orders-broker"));
        assert_eq!(s.metadata.namespace.as_deref(), Some("shop"));
        let owner = &s
            .metadata
            .owner_references
            .as_ref()
            .unwrap_or_else(|| panic!("owner"))[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("ChimeraModule", Some(true))
        );
        assert_eq!(
            secret_value(&s, URL_KEY).as_deref(),
            Some("amqp://u:p@mq/%2f")
        );
        assert_eq!(secret_value(&s, PASSWORD_KEY).as_deref(), Some("p"));
        let mut unsaved = module("orders");
        unsaved.metadata.uid = None;
        assert!(broker_secret(&unsaved, "u", "p", "x").is_err());
    }

    proptest! {
        #[test]
        fn passwords_are_long_and_url_safe(random in proptest::array::uniform32(any::<u8>())) {
            let p = password_from(&random);
            prop_assert_eq!(p.len(), PASSWORD_LEN);
            prop_assert!(p.bytes().all(|b| b.is_ascii_alphanumeric()));
            prop_assert_eq!(percent_encode(&p), p);
        }

        /// Whatever the user and password, the URL decodes back to them.
        #[test]
        fn credentials_survive_the_url(user in "\\PC{1,20}", password in "\\PC{1,20}") {
            let url = with_credentials("amqp://x:y@mq:5672/v", &user, &password)
                .unwrap_or_else(|e| panic!("{e}"));
            let creds = url
                .trim_start_matches("amqp://")
                .rsplit_once('@')
                .map(|(c, _)| c)
                .unwrap_or_default();
            let (u, p) = creds.split_once(':').unwrap_or_default();
            prop_assert_eq!(percent_decode(u), user);
            prop_assert_eq!(percent_decode(p), password);
            prop_assert!(url.ends_with("@mq:5672/v"));
        }
    }
}
