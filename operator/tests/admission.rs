//! Bad ChimeraModule YAML is rejected at admission by the real API server with a message naming
//! the field, and `chimera validate` (offline) rejects the very same inputs.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use chimera_core::api::ChimeraModule;
use chimera_core::api::validation::validate_object;
use common::{Harness, example};
use kube::Api;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams, ValidationDirective};
use serde_json::{Value, json};

/// One bad input: how to break the `orders` example and what both checks must say.
struct Case {
    what: &'static str,
    break_it: fn(&mut Value),
    /// Every fragment must appear (case-insensitively) in the API server's message and in the
    /// offline errors.
    expect: &'static [&'static str],
}

fn spec(m: &mut Value) -> &mut serde_json::Map<String, Value> {
    m["spec"].as_object_mut().unwrap()
}

const CASES: &[Case] = &[
    Case {
        what: "domain not a DNS label",
        break_it: |m| m["spec"]["domain"] = json!("Orders_1"),
        expect: &["spec.domain", "should match"],
    },
    Case {
        what: "empty image",
        break_it: |m| m["spec"]["image"] = json!(""),
        expect: &["spec.image", "at least 1 chars long"],
    },
    Case {
        what: "uppercase command",
        break_it: |m| m["spec"]["commands"] = json!(["Order.Place"]),
        expect: &["spec.commands[0]", "should match"],
    },
    Case {
        what: "wildcard in a command",
        break_it: |m| m["spec"]["commands"] = json!(["order.*"]),
        expect: &["spec.commands[0]", "should match"],
    },
    Case {
        what: "wildcard in a published event",
        break_it: |m| m["spec"]["events"]["publishes"] = json!(["order.#"]),
        expect: &["spec.events.publishes[0]", "should match"],
    },
    Case {
        what: "malformed subscription pattern",
        break_it: |m| m["spec"]["events"]["subscribes"][0]["events"] = json!(["gig.*x"]),
        expect: &["spec.events.subscribes[0].events[0]", "should match"],
    },
    Case {
        what: "subscription from a bad domain",
        break_it: |m| m["spec"]["events"]["subscribes"][0]["from"] = json!("Gigs!"),
        expect: &["spec.events.subscribes[0].from", "should match"],
    },
    Case {
        what: "subscription with no events",
        break_it: |m| m["spec"]["events"]["subscribes"][0]["events"] = json!([]),
        expect: &["spec.events.subscribes[0].events", "at least 1 items"],
    },
    Case {
        what: "duplicate command",
        break_it: |m| m["spec"]["commands"] = json!(["order.place", "order.place"]),
        expect: &["spec.commands", "duplicate", "order.place"],
    },
    Case {
        what: "query min replicas 0",
        break_it: |m| m["spec"]["query"]["replicas"] = json!({"min": 0, "max": 3}),
        expect: &["spec.query.replicas.min", "greater than or equal to 1"],
    },
    Case {
        what: "query min above max",
        break_it: |m| m["spec"]["query"]["replicas"] = json!({"min": 5, "max": 2}),
        expect: &[
            "spec.query.replicas",
            "replicas.min must be less than or equal to replicas.max",
        ],
    },
    Case {
        what: "worker min above max",
        break_it: |m| m["spec"]["worker"]["replicas"] = json!({"min": 4, "max": 3}),
        expect: &[
            "spec.worker.replicas",
            "replicas.min must be less than or equal to replicas.max",
        ],
    },
    Case {
        what: "prefetch 0",
        break_it: |m| m["spec"]["worker"]["prefetch"] = json!(0),
        expect: &["spec.worker.prefetch", "greater than or equal to 1"],
    },
    Case {
        what: "prefetch above 65535",
        break_it: |m| m["spec"]["worker"]["prefetch"] = json!(70000),
        expect: &["spec.worker.prefetch", "less than or equal to 65535"],
    },
    Case {
        what: "unknown queue type",
        break_it: |m| m["spec"]["worker"]["queue"]["type"] = json!("lazy"),
        expect: &["spec.worker.queue.type", "Unsupported value: \"lazy\""],
    },
    Case {
        what: "unknown overflow",
        break_it: |m| m["spec"]["worker"]["queue"]["overflow"] = json!("drop-everything"),
        expect: &["spec.worker.queue.overflow", "Unsupported value"],
    },
    Case {
        what: "queue maxLength 0",
        break_it: |m| m["spec"]["worker"]["queue"]["maxLength"] = json!(0),
        expect: &["spec.worker.queue.maxLength", "greater than or equal to 1"],
    },
    Case {
        what: "retry delay 0",
        break_it: |m| m["spec"]["worker"]["retry"]["delaysSeconds"] = json!([0, 10]),
        expect: &[
            "spec.worker.retry.delaysSeconds[0]",
            "greater than or equal to 1",
        ],
    },
    Case {
        what: "negative grace period",
        break_it: |m| m["spec"]["worker"]["terminationGracePeriodSeconds"] = json!(-1),
        expect: &[
            "spec.worker.terminationGracePeriodSeconds",
            "greater than or equal to 0",
        ],
    },
    Case {
        what: "percentile 100",
        break_it: |m| m["spec"]["query"]["autoscale"]["latency"]["percentile"] = json!(100),
        expect: &[
            "spec.query.autoscale.latency.percentile",
            "less than or equal to 99",
        ],
    },
    Case {
        what: "latency target 0 ms",
        break_it: |m| m["spec"]["query"]["autoscale"]["latency"]["targetMs"] = json!(0),
        expect: &[
            "spec.query.autoscale.latency.targetMs",
            "greater than or equal to 1",
        ],
    },
    Case {
        what: "query port 0",
        break_it: |m| m["spec"]["query"]["port"] = json!(0),
        expect: &["spec.query.port", "greater than or equal to 1"],
    },
    Case {
        what: "unknown deletion policy",
        break_it: |m| m["spec"]["topology"]["deletionPolicy"] = json!("Orphan"),
        expect: &["spec.topology.deletionPolicy", "Unsupported value"],
    },
    Case {
        what: "no head at all",
        break_it: |m| {
            let s = spec(m);
            for k in ["query", "worker", "commands"] {
                s.remove(k);
            }
            s["events"] = json!({"publishes": ["order.placed"]});
        },
        expect: &["a module needs at least one head"],
    },
    Case {
        what: "commands without a worker",
        break_it: |m| {
            let s = spec(m);
            s.remove("worker");
            s["events"] = json!({"publishes": ["order.placed"]});
        },
        expect: &["spec.commands", "consumed by the worker head"],
    },
    Case {
        what: "a schema for a message the module does not have",
        break_it: |m| {
            let s = spec(m);
            s["events"] = json!({"publishes": ["order.placed"]});
            s["schemas"] = json!({"refund.issued": {"type": "object"}});
        },
        expect: &["spec.schemas", "each schema is for a command"],
    },
    Case {
        what: "reserved CHIMERA_ env",
        break_it: |m| m["spec"]["env"] = json!([{"name": "CHIMERA_PREFETCH", "value": "1"}]),
        expect: &["spec.env", "reserved for the head contract"],
    },
    Case {
        what: "name that is not a domain",
        break_it: |m| m["metadata"]["name"] = json!("orders.v2"),
        expect: &["metadata.name is not a valid domain name"],
    },
    Case {
        what: "misspelt field",
        break_it: |m| m["spec"]["worker"]["prefech"] = json!(10),
        expect: &["prefech"],
    },
    Case {
        what: "wrong type",
        break_it: |m| m["spec"]["worker"]["prefetch"] = json!("many"),
        expect: &["spec.worker.prefetch", "got string"],
    },
];

fn dynamic_api(h: &Harness) -> Api<DynamicObject> {
    Api::namespaced_with(
        h.client.clone(),
        &h.ns.name,
        &ApiResource::erase::<ChimeraModule>(&()),
    )
}

/// Server-side apply as `kubectl apply --server-side` does (strict field validation), dry run.
async fn admit(api: &Api<DynamicObject>, object: &Value) -> Result<(), String> {
    let name = object["metadata"]["name"].as_str().unwrap();
    let mut params = PatchParams::apply("kubectl").force();
    params.dry_run = true;
    params.field_validation = Some(ValidationDirective::Strict);
    api.patch(name, &params, &Patch::Apply(object))
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn bad_manifests_are_rejected_by_the_api_server_and_offline_with_the_same_fields() {
    assert!(CASES.len() >= 15);
    let h = Harness::new("admission").await;
    let api = dynamic_api(&h);
    admit(&api, &example("orders"))
        .await
        .expect("the unbroken example is admitted");
    assert!(validate_object(&example("orders")).is_empty());

    let mut failures = Vec::new();
    for case in CASES {
        let mut object = example("orders");
        (case.break_it)(&mut object);
        let offline = validate_object(&object)
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        let offline_lower = offline.to_lowercase();
        match admit(&api, &object).await {
            Ok(()) => failures.push(format!("{}: admitted by the API server", case.what)),
            Err(server) => {
                let server_lower = server.to_lowercase();
                for fragment in case.expect {
                    let fragment_lower = fragment.to_lowercase();
                    if !server_lower.contains(&fragment_lower) {
                        failures.push(format!(
                            "{}: server message lacks {fragment:?}: {server}",
                            case.what
                        ));
                    }
                    if !offline_lower.contains(&fragment_lower) {
                        failures.push(format!(
                            "{}: offline errors lack {fragment:?}: {offline:?}",
                            case.what
                        ));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn every_example_module_is_admitted() {
    let h = Harness::new("admission-examples").await;
    let api = dynamic_api(&h);
    for name in ["users", "gigs", "orders"] {
        admit(&api, &example(name))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[tokio::test]
async fn the_domain_cannot_change() {
    let h = Harness::new("admission-immutable").await;
    let api = dynamic_api(&h);
    let mut params = PatchParams::apply("kubectl").force();
    params.field_validation = Some(ValidationDirective::Strict);
    let module = example("orders");
    api.patch("orders", &params, &Patch::Apply(&module))
        .await
        .expect("create");

    // Setting spec.domain to the name it already defaults to is no change, so it is allowed.
    let mut same = module.clone();
    same["spec"]["domain"] = json!("orders");
    api.patch("orders", &params, &Patch::Apply(&same))
        .await
        .expect("same domain spelled out");

    let mut moved = module.clone();
    moved["spec"]["domain"] = json!("purchases");
    let err = api
        .patch("orders", &params, &Patch::Apply(&moved))
        .await
        .expect_err("domain change refused");
    assert!(
        err.to_string().contains("spec.domain is immutable"),
        "{err}"
    );
}
