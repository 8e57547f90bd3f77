//! Pure builders of the Kubernetes objects that run a module's heads.
//!
//! `desired_workloads` turns a ChimeraModule into the Deployments, Service and
//! PodDisruptionBudget it should own. No I/O here: the controller applies what this returns.

mod contract;
mod deployment;
pub mod drift;
mod labels;
mod network_policy;
mod pdb;
mod service;

pub use contract::{ContractEnv, ContractValue, contract_env, contract_values};
pub use deployment::{
    HTTP_PORT_NAME, deployment, drain_seconds, initial_replicas, termination_grace_seconds,
};
pub use labels::{
    HEAD_LABEL, Head, MANAGED_BY, MODULE_LABEL, declared_heads, head_labels, module_selector,
    selector_labels,
};
pub use network_policy::NetworkPolicySettings;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;

use crate::api::{ChimeraModule, SecretKeyRef};

/// Operator-wide settings the builders need.
#[derive(Clone, Debug)]
pub struct WorkloadSettings {
    /// Secret key (in the module's namespace) with the AMQP URL, for modules without
    /// `spec.broker`.
    pub default_broker: SecretKeyRef,
    /// Whether each module without `spec.broker` gets a broker user of its own (its heads then
    /// read the URL from Secret `<module>-broker`, which the operator makes).
    pub module_broker_users: bool,
    /// A NetworkPolicy per head, admitting these peers; None makes none.
    pub network_policies: Option<NetworkPolicySettings>,
}

impl WorkloadSettings {
    /// Where `module`'s heads read `CHIMERA_AMQP_URL` unless `spec.broker` names a Secret: the
    /// module's own user's Secret, or the shared one.
    pub fn broker_secret(&self, module: &ChimeraModule) -> SecretKeyRef {
        if self.module_broker_users {
            SecretKeyRef {
                name: crate::access::user::secret_name(
                    &module.metadata.name.clone().unwrap_or_default(),
                ),
                key: crate::access::user::URL_KEY.to_owned(),
            }
        } else {
            self.default_broker.clone()
        }
    }
}

impl Default for WorkloadSettings {
    fn default() -> Self {
        Self {
            default_broker: SecretKeyRef {
                name: "chimera-broker".into(),
                key: "url".into(),
            },
            module_broker_users: false,
            network_policies: None,
        }
    }
}

/// Why desired objects cannot be built (the module lacks server-assigned metadata).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    /// The module has no name, namespace or uid yet (it was not read from the API server).
    #[error(
        "ChimeraModule is missing metadata.{0}; builders need an object read from the API server"
    )]
    MissingMetadata(&'static str),
}

/// Everything a module should own, per head.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DesiredWorkloads {
    /// One Deployment per head present in the spec.
    pub deployments: Vec<Deployment>,
    /// The query head's Service (absent without a query head).
    pub services: Vec<Service>,
    /// The query head's PodDisruptionBudget (absent without a query head).
    pub pod_disruption_budgets: Vec<PodDisruptionBudget>,
    /// One NetworkPolicy per head, when the operator makes them.
    pub network_policies: Vec<NetworkPolicy>,
}

/// Identity of the module the objects are built for.
pub(crate) struct Owner<'a> {
    pub module: &'a ChimeraModule,
    pub name: &'a str,
    pub namespace: &'a str,
    pub reference: OwnerReference,
}

impl<'a> Owner<'a> {
    /// The module's identity, or which server-assigned field it lacks.
    pub(crate) fn of(module: &'a ChimeraModule) -> Result<Self, BuildError> {
        let name = module
            .metadata
            .name
            .as_deref()
            .ok_or(BuildError::MissingMetadata("name"))?;
        let namespace = module
            .metadata
            .namespace
            .as_deref()
            .ok_or(BuildError::MissingMetadata("namespace"))?;
        let reference = module
            .controller_owner_ref(&())
            .ok_or(BuildError::MissingMetadata("uid"))?;
        Ok(Self {
            module,
            name,
            namespace,
            reference,
        })
    }

    /// Name of an object owned for a head: `<module>-<head>`.
    pub fn object_name(&self, head: Head) -> String {
        object_name(self.name, head)
    }

    /// Metadata of an object owned for a head: its name, namespace, labels and owner.
    pub fn object_meta(&self, head: Head) -> ObjectMeta {
        ObjectMeta {
            name: Some(self.object_name(head)),
            namespace: Some(self.namespace.to_owned()),
            labels: Some(head_labels(self.name, self.module.domain(), head)),
            owner_references: Some(vec![self.reference.clone()]),
            ..ObjectMeta::default()
        }
    }
}

/// Name of the objects a module owns for a head: `<module>-<head>`.
pub fn object_name(module: &str, head: Head) -> String {
    format!("{module}-{}", head.as_str())
}

/// Builds every object the module should own, given the operator's settings.
pub fn desired_workloads(
    module: &ChimeraModule,
    settings: &WorkloadSettings,
) -> Result<DesiredWorkloads, BuildError> {
    let owner = Owner::of(module)?;
    let mut desired = DesiredWorkloads::default();
    if let Some(query) = &module.spec.query {
        desired
            .deployments
            .push(deployment::query_deployment(&owner, query, settings));
        desired.services.push(service::service(&owner, query));
        desired
            .pod_disruption_budgets
            .push(pdb::pod_disruption_budget(&owner, Head::Query));
    }
    if let Some(worker) = &module.spec.worker {
        desired
            .deployments
            .push(deployment::worker_deployment(&owner, worker, settings));
    }
    if let Some(policies) = &settings.network_policies {
        for head in declared_heads(module) {
            desired
                .network_policies
                .push(network_policy::network_policy(&owner, head, policies));
        }
    }
    Ok(desired)
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Test fixtures: modules as they come back from the API server.

    use crate::api::{ChimeraModule, ChimeraModuleSpec, QueryHeadSpec, WorkerHeadSpec};

    /// A module with both heads and server-assigned metadata, from YAML defaults.
    pub fn module(name: &str) -> ChimeraModule {
        let spec: ChimeraModuleSpec = serde_json::from_value(serde_json::json!({
            "image": "registry.local/chimera/orders:1.0",
            "commands": ["order.place"],
            "events": {"publishes": ["order.placed"],
                       "subscribes": [{"from": "users", "events": ["user.*"]}]},
            "query": {},
            "worker": {}
        }))
        .unwrap_or_else(|e| panic!("fixture spec: {e}"));
        let mut m = ChimeraModule::new(name, spec);
        m.metadata.namespace = Some("shop".into());
        m.metadata.uid = Some("0b6f-uid".into());
        m.metadata.generation = Some(1);
        m
    }

    /// The same module without a query head.
    pub fn worker_only(name: &str) -> ChimeraModule {
        let mut m = module(name);
        m.spec.query = None;
        m
    }

    pub fn query(m: &ChimeraModule) -> &QueryHeadSpec {
        m.spec
            .query
            .as_ref()
            .unwrap_or_else(|| panic!("fixture has a query head"))
    }

    pub fn worker(m: &ChimeraModule) -> &WorkerHeadSpec {
        m.spec
            .worker
            .as_ref()
            .unwrap_or_else(|| panic!("fixture has a worker head"))
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    #[test]
    fn both_heads_give_two_deployments_a_service_and_a_pdb() {
        let d = desired_workloads(&module("orders"), &WorkloadSettings::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<_> = d
            .deployments
            .iter()
            .filter_map(|d| d.metadata.name.clone())
            .collect();
        assert_eq!(names, ["orders-query", "orders-worker"]);
        assert_eq!(d.services.len(), 1);
        assert_eq!(d.services[0].metadata.name.as_deref(), Some("orders-query"));
        assert_eq!(d.pod_disruption_budgets.len(), 1);
    }

    #[test]
    fn a_worker_only_module_has_no_service_or_pdb() {
        let d = desired_workloads(&worker_only("orders"), &WorkloadSettings::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.deployments.len(), 1);
        assert!(d.services.is_empty());
        assert!(d.pod_disruption_budgets.is_empty());
    }

    #[test]
    fn every_object_is_controlled_by_the_module() {
        let d = desired_workloads(&module("orders"), &WorkloadSettings::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let metas = d
            .deployments
            .iter()
            .map(|o| &o.metadata)
            .chain(d.services.iter().map(|o| &o.metadata))
            .chain(d.pod_disruption_budgets.iter().map(|o| &o.metadata));
        for meta in metas {
            let owners = meta.owner_references.as_deref().unwrap_or_default();
            assert_eq!(owners.len(), 1);
            assert_eq!(owners[0].uid, "0b6f-uid");
            assert_eq!(owners[0].controller, Some(true));
            assert_eq!(meta.namespace.as_deref(), Some("shop"));
        }
    }

    #[test]
    fn a_module_not_from_the_api_server_is_refused() {
        let mut m = module("orders");
        m.metadata.uid = None;
        assert_eq!(
            desired_workloads(&m, &WorkloadSettings::default()),
            Err(BuildError::MissingMetadata("uid"))
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn every_pod_template_is_selected_by_its_deployment(
                port in 1i32..65_535, with_query in any::<bool>(), args in proptest::collection::vec("[a-z-]{1,8}", 0..3)
            ) {
                let mut m = module("orders");
                if let Some(w) = m.spec.worker.as_mut() { w.port = port; w.args = args.clone(); }
                if !with_query { m.spec.query = None; }
                let d = desired_workloads(&m, &WorkloadSettings::default()).unwrap_or_else(|e| panic!("{e}"));
                prop_assert_eq!(d.deployments.len(), if with_query { 2 } else { 1 });
                for dep in &d.deployments {
                    let spec = dep.spec.clone().unwrap_or_default();
                    let selector = spec.selector.match_labels.unwrap_or_default();
                    let pod_labels = spec.template.metadata.and_then(|m| m.labels).unwrap_or_default();
                    prop_assert!(!selector.is_empty());
                    for (k, v) in &selector {
                        prop_assert_eq!(pod_labels.get(k), Some(v));
                    }
                    prop_assert_eq!(dep.metadata.owner_references.as_ref().map(Vec::len), Some(1));
                }
            }
        }
    }
}
