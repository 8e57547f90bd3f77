//! Payload schemas (`spec.schemas`): where they sit in the CRD, what `chimera validate` checks in
//! one module (each schema compiles and names a message the module has), and whether a
//! subscriber's view of an event is still what its publisher guarantees (a breaking change).
//!
//! A schema's guarantee is its `required` fields, recursively through `properties`: a field that
//! is only described may be absent. A subscriber's schema of an event says what it relies on;
//! every field it requires must be required by the publisher's schema of that event, with a type
//! the subscriber accepts.

use std::collections::BTreeMap;

use schemars::{Schema, SchemaGenerator, json_schema};
use serde_json::Value;

use super::ChimeraModule;
use crate::topology::pattern::topic_matches;

/// Most schemas one module may declare (bounds the cost of the CRD's rule over them).
pub const MAX_SCHEMAS: u64 = 100;

/// The CRD's schema of `spec.schemas`: a map from message type to a JSON Schema, kept as written.
pub fn crd_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "maxProperties": MAX_SCHEMAS,
        "additionalProperties": {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true
        }
    })
}

/// What a message type is to a module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A command its worker accepts.
    Command,
    /// An event it publishes: its schema is what it guarantees.
    Publishes,
    /// An event it subscribes to: its schema is what it relies on.
    Consumes,
}

/// What `kind` is to `module`, if anything.
pub fn role(module: &ChimeraModule, kind: &str) -> Option<Role> {
    let spec = &module.spec;
    if spec.commands.iter().any(|c| c == kind) {
        Some(Role::Command)
    } else if spec.events.publishes.iter().any(|e| e == kind) {
        Some(Role::Publishes)
    } else if spec
        .events
        .subscribes
        .iter()
        .any(|s| s.events.iter().any(|p| topic_matches(p, kind)))
    {
        Some(Role::Consumes)
    } else {
        None
    }
}

/// The schemas the worker of `module` validates incoming payloads with: its commands' and its
/// subscribed events'.
pub fn consumed(module: &ChimeraModule) -> BTreeMap<&str, &Value> {
    module
        .spec
        .schemas
        .iter()
        .filter(|(kind, _)| matches!(role(module, kind), Some(Role::Command | Role::Consumes)))
        .map(|(kind, schema)| (kind.as_str(), schema))
        .collect()
}

/// The problems of one module's schemas, as `(field path, message)`: a schema that is not a
/// valid JSON Schema.
pub fn check(module: &ChimeraModule) -> Vec<(String, String)> {
    module
        .spec
        .schemas
        .iter()
        .filter_map(|(kind, schema)| {
            jsonschema::validator_for(schema).err().map(|e| {
                (
                    format!("spec.schemas.{kind}"),
                    format!("not a valid JSON Schema: {e}"),
                )
            })
        })
        .collect()
}

/// Schemas of messages the module does not have (a typo, or a subscription removed and its
/// schema left behind): nothing uses them, which `chimera validate` warns about.
pub fn strays(module: &ChimeraModule) -> Vec<String> {
    module
        .spec
        .schemas
        .keys()
        .filter(|kind| role(module, kind).is_none())
        .map(|kind| {
            format!(
                "spec.schemas.{kind}: {kind} is not a command in spec.commands, an event in spec.events.publishes, or an event spec.events.subscribes matches: nothing uses this schema"
            )
        })
        .collect()
}

/// A subscriber relying on something its publisher does not guarantee.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Incompatibility {
    /// The subscribing module's name.
    pub subscriber: String,
    /// The publishing module's name.
    pub publisher: String,
    /// The event.
    pub event: String,
    /// The field (dotted path in `data`).
    pub field: String,
    /// What the publisher's schema says instead.
    pub why: String,
}

impl std::fmt::Display for Incompatibility {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} relies on field `{}` of {} from {}, but {}",
            self.subscriber, self.field, self.event, self.publisher, self.why
        )
    }
}

/// Every subscriber schema among `modules` that asks for more than the publisher's schema of the
/// same event guarantees. Events whose publisher declares no schema are not judged (nothing is
/// guaranteed, nothing was promised).
pub fn incompatibilities(modules: &[ChimeraModule]) -> Vec<Incompatibility> {
    let name = |m: &ChimeraModule| m.metadata.name.clone().unwrap_or_default();
    let mut out = Vec::new();
    for subscriber in modules {
        for (event, relied) in &subscriber.spec.schemas {
            if role(subscriber, event) != Some(Role::Consumes) {
                continue;
            }
            let publishers = modules.iter().filter(|p| {
                p.spec.events.publishes.iter().any(|e| e == event)
                    && subscriber.spec.events.subscribes.iter().any(|s| {
                        s.from == p.domain() && s.events.iter().any(|pat| topic_matches(pat, event))
                    })
            });
            for publisher in publishes_with_schema(publishers, event) {
                let (publisher_name, guaranteed) = (name(publisher.0), guarantees(publisher.1));
                for (field, wanted) in guarantees(relied) {
                    let why = match guaranteed.get(&field) {
                        None => Some(format!(
                            "{publisher_name} no longer guarantees it (it is not required in its schema)"
                        )),
                        Some(given) if !accepts(&wanted, given) => Some(format!(
                            "the schema of {publisher_name} gives it type {} where {} is expected",
                            if given.is_empty() {
                                "any".to_owned()
                            } else {
                                given.join("|")
                            },
                            wanted.join("|")
                        )),
                        Some(_) => None,
                    };
                    if let Some(why) = why {
                        out.push(Incompatibility {
                            subscriber: name(subscriber),
                            publisher: publisher_name.clone(),
                            event: event.clone(),
                            field,
                            why,
                        });
                    }
                }
            }
        }
    }
    out.sort();
    out
}

fn publishes_with_schema<'a>(
    publishers: impl Iterator<Item = &'a ChimeraModule>,
    event: &str,
) -> Vec<(&'a ChimeraModule, &'a Value)> {
    publishers
        .filter_map(|p| p.spec.schemas.get(event).map(|s| (p, s)))
        .collect()
}

/// The fields a schema guarantees (required, recursively through object properties), with the
/// types it allows (empty: any).
pub fn guarantees(schema: &Value) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    collect(schema, "", &mut out);
    out
}

fn collect(schema: &Value, prefix: &str, out: &mut BTreeMap<String, Vec<String>>) {
    let properties = schema.get("properties").and_then(Value::as_object);
    let Some(required) = schema.get("required").and_then(Value::as_array) else {
        return;
    };
    for field in required.iter().filter_map(Value::as_str) {
        let path = if prefix.is_empty() {
            field.to_owned()
        } else {
            format!("{prefix}.{field}")
        };
        let property = properties.and_then(|p| p.get(field));
        out.insert(path.clone(), property.map(types).unwrap_or_default());
        if let Some(property) = property {
            collect(property, &path, out);
        }
    }
}

/// The JSON types a schema allows: its `type`, or else those of its `const` or `enum` values
/// (empty: unconstrained).
fn types(schema: &Value) -> Vec<String> {
    let of = |v: &Value| {
        match v {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        }
        .to_owned()
    };
    let mut types: Vec<String> = match (schema.get("type"), schema.get("const"), schema.get("enum"))
    {
        (Some(Value::String(t)), _, _) => vec![t.clone()],
        (Some(Value::Array(ts)), _, _) => ts
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        (_, Some(value), _) => vec![of(value)],
        (_, _, Some(Value::Array(values))) => values.iter().map(of).collect(),
        _ => Vec::new(),
    };
    types.sort();
    types.dedup();
    types
}

/// Whether a subscriber expecting `wanted` types accepts a field the publisher gives as `given`
/// (an integer is a number; no types on either side accepts anything).
fn accepts(wanted: &[String], given: &[String]) -> bool {
    if wanted.is_empty() {
        return true;
    }
    !given.is_empty()
        && given
            .iter()
            .all(|g| wanted.contains(g) || (g == "integer" && wanted.iter().any(|w| w == "number")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::validation::modules_from_yaml;
    use serde_json::json;

    const USERS: &str = "apiVersion: chimera.dev/v1alpha1\nkind: ChimeraModule\nmetadata: {name: users}\nspec:\n  image: x\n  commands: [user.register]\n  events: {publishes: [user.registered]}\n  worker: {}\n  schemas:\n    user.register: {type: object, required: [user_id, email], properties: {user_id: {type: string}, email: {type: string, format: email}}}\n    user.registered: {type: object, required: [user_id, email], properties: {user_id: {type: string}, email: {type: string}, address: {type: object, required: [city], properties: {city: {type: string}}}}}\n";
    const ORDERS: &str = "apiVersion: chimera.dev/v1alpha1\nkind: ChimeraModule\nmetadata: {name: orders}\nspec:\n  image: x\n  events: {subscribes: [{from: users, events: [\"user.*\"]}]}\n  worker: {}\n  schemas:\n    user.registered: {type: object, required: [user_id], properties: {user_id: {type: string}}}\n";

    fn modules(yaml: &[&str]) -> Vec<ChimeraModule> {
        let (modules, problems) = modules_from_yaml(&yaml.join("---\n"));
        assert!(problems.is_empty(), "{problems:?}");
        modules
    }

    #[test]
    fn a_schema_names_what_it_is_for() {
        let m = modules(&[USERS, ORDERS]);
        assert_eq!(role(&m[0], "user.register"), Some(Role::Command));
        assert_eq!(role(&m[0], "user.registered"), Some(Role::Publishes));
        assert_eq!(role(&m[1], "user.registered"), Some(Role::Consumes));
        assert_eq!(role(&m[1], "gig.published"), None);
        // The worker validates what it receives, not what it sends.
        assert_eq!(
            consumed(&m[0]).keys().collect::<Vec<_>>(),
            [&"user.register"]
        );
        assert_eq!(
            consumed(&m[1]).keys().collect::<Vec<_>>(),
            [&"user.registered"]
        );
    }

    #[test]
    fn guarantees_are_the_required_fields_with_their_types() {
        let schema = json!({"type": "object", "required": ["a", "b"], "properties": {
            "a": {"type": "integer"},
            "b": {"type": "object", "required": ["c"], "properties": {"c": {"type": ["string", "null"]}, "d": {}}},
            "e": {"type": "string"}
        }});
        let g = guarantees(&schema);
        assert_eq!(
            g.into_iter().collect::<Vec<_>>(),
            [
                ("a".to_owned(), vec!["integer".to_owned()]),
                ("b".to_owned(), vec!["object".to_owned()]),
                (
                    "b.c".to_owned(),
                    vec!["null".to_owned(), "string".to_owned()]
                ),
            ]
        );
        assert!(guarantees(&json!({"type": "object"})).is_empty());
        // A constant or an enumeration says its type too.
        assert_eq!(types(&json!({"const": "paused"})), ["string"]);
        assert_eq!(
            types(&json!({"enum": [1, 2.5, null]})),
            ["integer", "null", "number"]
        );
    }

    #[test]
    fn a_subscriber_within_what_is_guaranteed_is_compatible() {
        assert_eq!(incompatibilities(&modules(&[USERS, ORDERS])), []);
    }

    #[test]
    fn a_field_the_publisher_stops_guaranteeing_breaks_its_subscriber() {
        // users makes `user_id` optional in user.registered; orders relies on it.
        let users = USERS.replace(
            "user.registered: {type: object, required: [user_id, email]",
            "user.registered: {type: object, required: [email]",
        );
        let found = incompatibilities(&modules(&[&users, ORDERS]));
        assert_eq!(found.len(), 1, "{found:?}");
        let text = found[0].to_string();
        for part in [
            "orders",
            "users",
            "user_id",
            "user.registered",
            "no longer guarantees",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        // A changed type breaks it too; integer where a number is expected does not.
        let retyped = USERS.replace(
            "user_id: {type: string}, email: {type: string}, address",
            "user_id: {type: integer}, email: {type: string}, address",
        );
        let found = incompatibilities(&modules(&[&retyped, ORDERS]));
        assert!(
            found
                .iter()
                .any(|f| f.field == "user_id" && f.why.contains("type integer")),
            "{found:?}"
        );
        assert!(accepts(&["number".to_owned()], &["integer".to_owned()]));
        assert!(!accepts(&["integer".to_owned()], &["number".to_owned()]));
        assert!(
            !accepts(&["string".to_owned()], &[]),
            "unconstrained is not a string"
        );
    }

    #[test]
    fn nested_fields_are_judged_by_their_path() {
        let orders = ORDERS.replace(
            "required: [user_id], properties: {user_id: {type: string}}",
            "required: [address], properties: {address: {type: object, required: [city, zip], properties: {city: {type: string}, zip: {type: string}}}}",
        );
        let found = incompatibilities(&modules(&[USERS, &orders]));
        assert_eq!(
            found.iter().map(|f| f.field.as_str()).collect::<Vec<_>>(),
            ["address", "address.city", "address.zip"],
            "users requires no address at all"
        );
    }

    #[test]
    fn a_schema_must_compile_and_name_a_message_of_the_module() {
        let bad = USERS.replace("user.register: {type: object,", "user.register: {type: 12,");
        let (m, problems) = modules_from_yaml(&bad);
        assert!(m.is_empty(), "rejected");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("spec.schemas.user.register")
                    && p.contains("not a valid JSON Schema")),
            "{problems:?}"
        );
        // A schema nothing uses is valid, and warned about.
        let stray = ORDERS.replace("user.registered: {", "gig.published: {");
        let m = modules(&[&stray]);
        let warnings = strays(&m[0]);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("spec.schemas.gig.published"),
            "{warnings:?}"
        );
        assert!(strays(&modules(&[ORDERS])[0]).is_empty());
    }
}
