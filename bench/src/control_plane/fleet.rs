//! The modules the bench creates, and the objects the operator should make of them (the
//! kubectl floor applies those). Pure: the same N gives the same fleet.

use chimera_core::api::ChimeraModule;
use chimera_core::workloads::{WorkloadSettings, desired_workloads};
use serde_json::{Value, json};

/// How the fleet's modules look.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Modules.
    pub modules: usize,
    /// Worker queue type (`classic` or `quorum`): 1,000 quorum queues cost the broker, not the
    /// operator, so the bench defaults to classic.
    pub quorum: bool,
}

/// Name (and domain) of module `i`.
pub fn module_name(i: usize) -> String {
    format!("d{i:04}")
}

/// Module `i`: a query and a worker head; it subscribes to module `i - 1`'s events (a chain, so
/// every module has a neighbour whose change matters to it).
pub fn module(shape: Shape, i: usize) -> Value {
    let name = module_name(i);
    let subscribes = if i == 0 {
        json!([])
    } else {
        json!([{"from": module_name(i - 1), "events": [format!("{}.changed", module_name(i - 1))]}])
    };
    let resources = json!({
        "requests": {"cpu": "10m", "memory": "16Mi"},
        "limits": {"cpu": "500m", "memory": "128Mi"}
    });
    json!({
        "apiVersion": "chimera.dev/v1alpha1",
        "kind": "ChimeraModule",
        "metadata": {"name": name},
        "spec": {
            "image": "chimera/bench:none",
            "database": {"secretRef": {"name": "bench-db", "key": "url"}},
            "commands": [format!("{name}.change")],
            "events": {"publishes": [format!("{name}.changed")], "subscribes": subscribes},
            "query": {"port": 8080, "replicas": {"min": 1, "max": 4}, "resources": resources},
            "worker": {
                "replicas": {"min": 1, "max": 4},
                "resources": resources,
                "retry": {"delaysSeconds": [5]},
                "queue": {"type": if shape.quorum { "quorum" } else { "classic" }}
            }
        }
    })
}

/// Every module, as one `List` kubectl applies.
pub fn modules(shape: Shape) -> Value {
    list((0..shape.modules).map(|i| module(shape, i)).collect())
}

/// The modules and the Deployments, Services and PodDisruptionBudgets the operator makes of
/// them in `namespace`, the latter without owner references (the floor's modules have other
/// uids, and the garbage collector would delete what names an owner that does not exist).
pub fn desired_objects(shape: Shape, namespace: &str) -> anyhow::Result<Value> {
    let settings = WorkloadSettings::default();
    let mut items = Vec::new();
    for i in 0..shape.modules {
        items.push(module(shape, i));
        let mut module: ChimeraModule = serde_json::from_value(module(shape, i))?;
        module.metadata.namespace = Some(namespace.to_owned());
        module.metadata.uid = Some(format!("00000000-0000-0000-0000-{i:012}"));
        let desired = desired_workloads(&module, &settings)?;
        let mut push = |mut v: Value| {
            if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.remove("ownerReferences");
                meta.remove("namespace");
            }
            items.push(v);
        };
        for d in &desired.deployments {
            push(serde_json::to_value(d)?);
        }
        for s in &desired.services {
            push(serde_json::to_value(s)?);
        }
        for p in &desired.pod_disruption_budgets {
            push(serde_json::to_value(p)?);
        }
    }
    Ok(list(items))
}

fn list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_module_is_valid_and_the_chain_is_closed() {
        let shape = Shape {
            modules: 5,
            quorum: false,
        };
        let text = (0..5)
            .map(|i| module(shape, i).to_string())
            .collect::<Vec<_>>()
            .join("\n---\n");
        let (parsed, errors) = chimera_core::api::validation::modules_from_yaml(&text);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(parsed.len(), 5);
        let plan = chimera_core::topology::plan::plan(
            &parsed
                .into_iter()
                .map(|mut m| {
                    m.metadata.namespace = Some("ns".into());
                    m
                })
                .collect::<Vec<_>>(),
        );
        assert!(plan.findings.is_empty(), "{:?}", plan.findings);
    }

    #[test]
    fn the_floor_holds_what_the_operator_makes_of_each_module() {
        let shape = Shape {
            modules: 3,
            quorum: false,
        };
        let objects = desired_objects(shape, "ns").unwrap();
        let items = objects["items"].as_array().unwrap();
        // the module, two Deployments, a Service and a PDB per module
        assert_eq!(items.len(), 15);
        assert!(
            items
                .iter()
                .all(|o| o["metadata"]["ownerReferences"].is_null())
        );
    }
}
