//! Payloads made from a message's JSON Schema, for `chimera conformance`: a valid one (to see a
//! message handled) and an invalid one (to see it dead-lettered with the schema's error).
//!
//! A schema's own `examples` (or `default`, `const`, `enum`) are used first: a module whose
//! payloads a generator cannot guess (a pattern, a cross-field rule) says what a valid one is.
//! Otherwise a payload is built from `type`, `properties`, `required`, `format`, lengths and
//! bounds, taking the first branch of `anyOf`/`oneOf` and every `allOf`. Whatever is made is
//! validated against the whole schema before it is used: a guess that does not fit is `None`.

use serde_json::{Map, Value, json};

/// A payload valid against `schema`, distinct for each `n` where the schema leaves strings free
/// (ids, names, emails get `n` in them), or `None` when none could be made.
pub fn valid(schema: &Value, n: u32) -> Option<Value> {
    if let Some(example) = example(schema) {
        // The example made distinct per message where the schema allows it (a module may
        // refuse a second user with the same id or email), else as it is.
        let varied = vary(&example, n);
        if fits(schema, &varied) {
            return Some(varied);
        }
        return fits(schema, &example).then_some(example);
    }
    let candidate = build(schema, n, 0)?;
    fits(schema, &candidate).then_some(candidate)
}

/// `value` with `-n` in each string (before the `@` of an email address).
fn vary(value: &Value, n: u32) -> Value {
    match value {
        Value::String(s) => Value::String(match s.split_once('@') {
            Some((local, domain)) => format!("{local}-{n}@{domain}"),
            None => format!("{s}-{n}"),
        }),
        Value::Array(items) => Value::Array(items.iter().map(|v| vary(v, n)).collect()),
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), vary(v, n)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// A payload `schema` refuses, or `None` when it accepts everything.
pub fn invalid(schema: &Value) -> Option<Value> {
    let candidates = [
        json!({}),
        json!("conformance: not the payload's type"),
        json!(42),
        Value::Null,
        json!([]),
    ];
    candidates.into_iter().find(|c| !fits(schema, c))
}

/// Whether `value` validates against `schema` (a schema that does not compile fits nothing).
pub fn fits(schema: &Value, value: &Value) -> bool {
    jsonschema::validator_for(schema).is_ok_and(|v| v.is_valid(value))
}

fn example(schema: &Value) -> Option<Value> {
    let object = schema.as_object()?;
    object
        .get("examples")
        .and_then(|e| e.as_array())
        .and_then(|e| e.first())
        .or_else(|| object.get("default"))
        .or_else(|| object.get("const"))
        .or_else(|| object.get("enum").and_then(|e| e.as_array()?.first()))
        .cloned()
}

/// A schema with its `allOf` and first `anyOf`/`oneOf` branch folded into it (required lists
/// and properties merged), so that the builder sees one object shape.
fn folded(schema: &Map<String, Value>) -> Map<String, Value> {
    let mut out = schema.clone();
    let mut branches: Vec<Value> = Vec::new();
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        branches.extend(all.iter().cloned());
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(first) = schema
            .get(key)
            .and_then(Value::as_array)
            .and_then(|a| a.first())
        {
            branches.push(first.clone());
        }
    }
    for branch in branches {
        let Some(branch) = branch.as_object() else {
            continue;
        };
        let branch = folded(branch);
        for (key, value) in branch {
            match (key.as_str(), out.get_mut(&key), value) {
                ("required", Some(Value::Array(mine)), Value::Array(theirs)) => {
                    for r in theirs {
                        if !mine.contains(&r) {
                            mine.push(r);
                        }
                    }
                }
                ("properties", Some(Value::Object(mine)), Value::Object(theirs)) => {
                    for (name, sub) in theirs {
                        mine.entry(name).or_insert(sub);
                    }
                }
                (_, None, value) => {
                    out.insert(key, value);
                }
                _ => {}
            }
        }
    }
    out
}

fn first_type(schema: &Map<String, Value>) -> Option<&str> {
    match schema.get("type") {
        Some(Value::String(t)) => Some(t),
        // A nullable field (`[string, "null"]`): the non-null type says more.
        Some(Value::Array(types)) => types
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .or(Some("null")),
        _ if schema.contains_key("properties") || schema.contains_key("required") => Some("object"),
        _ => None,
    }
}

fn build(schema: &Value, n: u32, depth: usize) -> Option<Value> {
    if depth > 8 {
        return None;
    }
    if let Some(e) = example(schema) {
        return Some(e);
    }
    let schema = folded(schema.as_object()?);
    let number = |key: &str| schema.get(key).and_then(Value::as_f64);
    match first_type(&schema)? {
        "object" => {
            let mut out = Map::new();
            let properties = schema.get("properties").and_then(Value::as_object);
            let required = schema.get("required").and_then(Value::as_array);
            for name in required.into_iter().flatten().filter_map(Value::as_str) {
                let sub = properties
                    .and_then(|p| p.get(name))
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "string"}));
                out.insert(name.to_owned(), build(&sub, n, depth + 1)?);
            }
            Some(Value::Object(out))
        }
        "array" => {
            let items = schema.get("items").cloned().unwrap_or(json!({}));
            let count = number("minItems").unwrap_or(0.0).max(0.0) as usize;
            (0..count)
                .map(|i| build(&items, n.wrapping_add(i as u32), depth + 1))
                .collect::<Option<Vec<_>>>()
                .map(Value::Array)
        }
        "string" => Some(Value::String(string(&schema, n))),
        "integer" => {
            let low = number("minimum")
                .or_else(|| number("exclusiveMinimum").map(|m| m.floor() + 1.0))
                .unwrap_or(1.0)
                .ceil();
            Some(json!(low as i64))
        }
        "number" => {
            let low = number("minimum")
                .or_else(|| number("exclusiveMinimum").map(|m| m + 0.5))
                .unwrap_or(1.0);
            Some(json!(low))
        }
        "boolean" => Some(Value::Bool(true)),
        "null" => Some(Value::Null),
        _ => None,
    }
}

fn string(schema: &Map<String, Value>, n: u32) -> String {
    let base = match schema.get("format").and_then(Value::as_str) {
        Some("email" | "idn-email") => format!("conformance-{n}@example.com"),
        Some("uuid") => format!("00000000-0000-4000-8000-{n:012x}"),
        Some("date-time") => "2026-01-01T00:00:00Z".to_owned(),
        Some("date") => "2026-01-01".to_owned(),
        Some("uri" | "iri") => format!("https://example.com/conformance/{n}"),
        _ => format!("conformance-{n}"),
    };
    let min = schema.get("minLength").and_then(Value::as_u64).unwrap_or(0) as usize;
    let max = schema
        .get("maxLength")
        .and_then(Value::as_u64)
        .map_or(usize::MAX, |m| m as usize);
    let mut s = base;
    while s.chars().count() < min {
        s.push('x');
    }
    if s.chars().count() > max {
        // Keep the end, where `n` is: short fields still differ per message.
        let skip = s.chars().count() - max;
        s = s.chars().skip(skip).collect();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users_register() -> Value {
        json!({
            "type": "object",
            "required": ["user_id", "name", "email"],
            "properties": {
                "user_id": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^\\S+$"},
                "name": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "\\S"},
                "email": {"type": "string", "format": "email", "maxLength": 320}
            }
        })
    }

    #[test]
    fn a_valid_payload_fills_the_required_fields_and_differs_per_message() {
        let schema = users_register();
        let one = valid(&schema, 1).unwrap();
        let two = valid(&schema, 2).unwrap();
        assert!(fits(&schema, &one) && fits(&schema, &two));
        assert_ne!(one["user_id"], two["user_id"]);
        assert_ne!(one["email"], two["email"]);
    }

    #[test]
    fn examples_win_and_are_checked() {
        let mut schema = users_register();
        schema["examples"] = json!([{"user_id": "u1", "name": "Ada", "email": "ada@example.com"}]);
        let seven = valid(&schema, 7).unwrap();
        assert_eq!(seven["name"], "Ada-7");
        assert_eq!(seven["email"], "ada-7@example.com");
        assert_ne!(valid(&schema, 8).unwrap()["user_id"], seven["user_id"]);
        // Where a varied example does not fit (an enum), the example itself is used.
        let state = json!({"type": "string", "enum": ["open", "closed"], "examples": ["open"]});
        assert_eq!(valid(&state, 3), Some(json!("open")));
        schema["examples"] = json!([{"user_id": "u1"}]);
        assert_eq!(
            valid(&schema, 7),
            None,
            "an example the schema refuses is not used"
        );
    }

    #[test]
    fn branches_nullable_types_numbers_and_arrays_are_built() {
        let schema = json!({
            "type": "object",
            "required": ["user_id"],
            "anyOf": [{"required": ["name"], "properties": {"name": {"type": "string"}}}],
            "properties": {
                "user_id": {"type": "string"},
                "name": {"type": ["string", "null"], "minLength": 3},
                "price": {"type": "integer", "minimum": 5}
            }
        });
        let v = valid(&schema, 3).unwrap();
        assert!(v["name"].is_string() && v.get("price").is_none());
        let schema = json!({"type": "object", "required": ["price", "tags", "state"],
            "properties": {"price": {"type": "number", "exclusiveMinimum": 0},
            "tags": {"type": "array", "minItems": 2, "items": {"type": "string", "maxLength": 4}},
            "state": {"enum": ["open", "closed"]}}});
        let v = valid(&schema, 12345).unwrap();
        assert_eq!(v["tags"].as_array().unwrap().len(), 2);
        assert_eq!(v["state"], "open");
    }

    #[test]
    fn a_pattern_the_guess_misses_gives_none_not_a_wrong_payload() {
        let schema = json!({"type": "object", "required": ["sku"],
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}}});
        assert_eq!(valid(&schema, 1), None);
    }

    #[test]
    fn an_invalid_payload_is_refused_by_the_schema() {
        let schema = users_register();
        let bad = invalid(&schema).unwrap();
        assert!(!fits(&schema, &bad));
        assert_eq!(
            invalid(&json!({"type": "object"})),
            Some(json!("conformance: not the payload's type"))
        );
        assert_eq!(
            invalid(&json!({})),
            None,
            "the empty schema accepts everything"
        );
    }
}
