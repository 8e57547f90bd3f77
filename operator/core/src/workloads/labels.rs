//! Labels on every object a module owns, and the selectors that find them again.

use std::collections::BTreeMap;

pub use chimera_contract::Head;

/// The heads `module` declares, in the stable order.
pub fn declared_heads(module: &crate::api::ChimeraModule) -> impl Iterator<Item = Head> + '_ {
    Head::ALL.into_iter().filter(|head| match head {
        Head::Query => module.spec.query.is_some(),
        Head::Worker => module.spec.worker.is_some(),
    })
}

/// Value of `app.kubernetes.io/managed-by` on everything the operator creates.
pub const MANAGED_BY: &str = "chimera-operator";
/// Label naming the module (metadata.name) an object belongs to.
pub const MODULE_LABEL: &str = "chimera.dev/module";
/// Label naming the module's domain.
pub const DOMAIN_LABEL: &str = "chimera.dev/domain";
/// Label naming the head.
pub const HEAD_LABEL: &str = "chimera.dev/head";

/// Labels that select one head's pods. They never change for the life of the module: a
/// Deployment's selector is immutable.
pub fn selector_labels(module: &str, head: Head) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MODULE_LABEL.to_owned(), module.to_owned()),
        (HEAD_LABEL.to_owned(), head.as_str().to_owned()),
    ])
}

/// Full label set of a head's objects and pods.
pub fn head_labels(module: &str, domain: &str, head: Head) -> BTreeMap<String, String> {
    let mut labels = selector_labels(module, head);
    labels.extend([
        (DOMAIN_LABEL.to_owned(), domain.to_owned()),
        ("app.kubernetes.io/name".to_owned(), domain.to_owned()),
        ("app.kubernetes.io/instance".to_owned(), module.to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            head.as_str().to_owned(),
        ),
        ("app.kubernetes.io/part-of".to_owned(), "chimera".to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGED_BY.to_owned(),
        ),
    ]);
    labels
}

/// Label selector (query syntax) matching every object the operator made for a module.
pub fn module_selector(module: &str) -> String {
    format!("{MODULE_LABEL}={module},app.kubernetes.io/managed-by={MANAGED_BY}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_is_a_subset_of_the_labels() {
        let labels = head_labels("orders", "orders", Head::Worker);
        for (k, v) in selector_labels("orders", Head::Worker) {
            assert_eq!(labels.get(&k), Some(&v));
        }
        assert_eq!(labels.get(HEAD_LABEL).map(String::as_str), Some("worker"));
        assert_eq!(labels.get(DOMAIN_LABEL).map(String::as_str), Some("orders"));
    }

    #[test]
    fn module_selector_names_module_and_manager() {
        assert_eq!(
            module_selector("orders"),
            "chimera.dev/module=orders,app.kubernetes.io/managed-by=chimera-operator"
        );
    }
}
