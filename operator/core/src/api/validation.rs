//! Offline validation of ChimeraModule manifests with the rules the API server applies.
//!
//! Nothing here restates a rule: the structural checks walk the generated CRD's
//! openAPIV3Schema (types, required fields, unknown fields, enums, patterns, ranges, lengths,
//! set-lists) and the CEL rules (`x-kubernetes-validations`) are evaluated by `kube-cel`. So
//! `chimera validate` and admission cannot drift apart; a test feeds the same bad inputs to both.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::LazyLock;

use regex::Regex;
use serde_json::{Map, Value};

use super::crd::chimera_module_schema;

/// The apiVersion a ChimeraModule must carry.
pub const API_VERSION: &str = "chimera.dev/v1alpha1";
/// The kind of a ChimeraModule.
pub const KIND: &str = "ChimeraModule";

/// One problem in a manifest, at a field path such as `spec.worker.prefetch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the offending field (`spec.commands[1]`); empty for the whole object.
    pub path: String,
    /// What is wrong, in the API server's words where it has some.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// The verdict on one YAML document of a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocumentReport {
    /// Position of the document in its file, from 1.
    pub index: usize,
    /// `kind/name` when the document says so.
    pub object: Option<String>,
    /// Whether the document is a ChimeraModule (other kinds are not checked).
    pub checked: bool,
    /// Every problem found; empty when the document is valid.
    pub errors: Vec<FieldError>,
}

/// Validates every document of a (multi-document) YAML source.
pub fn validate_yaml(source: &str) -> Vec<DocumentReport> {
    let mut reports = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(source).enumerate() {
        let index = i + 1;
        let unreadable = |message: String| DocumentReport {
            index,
            object: None,
            checked: true,
            errors: vec![field_error("", message)],
        };
        let value: serde_yaml::Value = match serde::Deserialize::deserialize(document) {
            Ok(v) => v,
            Err(e) => {
                reports.push(unreadable(format!("not valid YAML: {e}")));
                // The YAML stream cannot be resumed after a syntax error.
                break;
            }
        };
        if value.is_null() {
            continue; // an empty document between `---` separators
        }
        let json = match serde_json::to_value(&value) {
            Ok(j) => j,
            Err(e) => {
                reports.push(unreadable(format!("not representable as JSON: {e}")));
                continue;
            }
        };
        let kind = json.get("kind").and_then(Value::as_str);
        let name = json.pointer("/metadata/name").and_then(Value::as_str);
        let object = kind.map(|k| format!("{k}/{}", name.unwrap_or("<unnamed>")));
        let checked = kind == Some(KIND);
        let errors = if checked {
            validate_object(&json)
        } else {
            Vec::new()
        };
        reports.push(DocumentReport {
            index,
            object,
            checked,
            errors,
        });
    }
    reports
}

/// The CRD's schema, generated once per process.
static SCHEMA: LazyLock<Value> = LazyLock::new(chimera_module_schema);

thread_local! {
    /// The schema's CEL rules, compiled once per thread (compiled programs are not shareable
    /// across threads).
    static COMPILED_RULES: kube_cel::CompiledSchema = kube_cel::compile_schema(&SCHEMA);
}

/// The valid ChimeraModules of a YAML source, and a line per problem (`kind/name: path:
/// message`) for those that are not. Other kinds are skipped.
pub fn modules_from_yaml(source: &str) -> (Vec<super::ChimeraModule>, Vec<String>) {
    let mut modules = Vec::new();
    let mut problems = Vec::new();
    // Up to the first document that does not parse: the stream cannot be resumed after a
    // syntax error (its iterator yields the same error forever), and validate_yaml has
    // reported it.
    let mut documents: Vec<serde_yaml::Value> = Vec::new();
    for document in serde_yaml::Deserializer::from_str(source) {
        match serde::Deserialize::deserialize(document) {
            Ok(value) => documents.push(value),
            Err(_) => break,
        }
    }
    for report in validate_yaml(source) {
        let what = report
            .object
            .clone()
            .unwrap_or_else(|| format!("document {}", report.index));
        if !report.errors.is_empty() {
            problems.extend(report.errors.iter().map(|e| format!("{what}: {e}")));
            continue;
        }
        if !report.checked {
            continue;
        }
        let parsed = documents
            .get(report.index - 1)
            .cloned()
            .map(serde_yaml::from_value::<super::ChimeraModule>);
        match parsed {
            Some(Ok(module)) => modules.push(module),
            Some(Err(e)) => problems.push(format!("{what}: {e}")),
            None => problems.push(format!("{what}: document could not be read again")),
        }
    }
    (modules, problems)
}

/// Validates one ChimeraModule object (as JSON) against the CRD: structure first, then CEL.
pub fn validate_object(object: &Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    match object.get("apiVersion").and_then(Value::as_str) {
        Some(API_VERSION) => {}
        other => errors.push(field_error(
            "apiVersion",
            format!(
                "Unsupported value: {}: supported values: \"{API_VERSION}\"",
                quoted(other)
            ),
        )),
    }
    check_metadata(object.get("metadata"), &mut errors);

    let schema = &*SCHEMA;
    let mut structural = Vec::new();
    let spec_schema = schema.pointer("/properties/spec").unwrap_or(&Value::Null);
    match object.get("spec") {
        Some(spec) => check(spec_schema, spec, "spec", &mut structural),
        None => structural.push(field_error("spec", "Required value")),
    }
    if let Some(extra) = object.as_object() {
        for key in extra.keys() {
            if !["apiVersion", "kind", "metadata", "spec", "status"].contains(&key.as_str()) {
                structural.push(field_error("", format!("unknown field \"{key}\"")));
            }
        }
    }
    let structurally_sound = structural.is_empty() && errors.is_empty();
    errors.extend(structural);

    // CEL rules assume the types above hold; evaluating them on a malformed object only adds
    // noise (the API server stops at schema errors too).
    if structurally_sound {
        let mut cel_object = object.clone();
        if let Some(map) = cel_object.as_object_mut() {
            map.remove("status");
        }
        let outcome = COMPILED_RULES
            .with(|rules| kube_cel::Validator::new().validate_compiled(rules, &cel_object, None));
        if let Err(failures) = outcome {
            for failure in failures.iter() {
                errors.push(field_error(
                    failure.field_path.trim_start_matches('.'),
                    failure.message.clone(),
                ));
            }
        }
        // Beyond what the API server can check: the payload schemas are JSON Schemas, each
        // for a message of the module (see `api::schemas`).
        if errors.is_empty()
            && let Ok(module) = serde_json::from_value::<super::ChimeraModule>(object.clone())
        {
            for (path, message) in super::schemas::check(&module) {
                errors.push(field_error(&path, message));
            }
        }
    }
    errors
}

fn check_metadata(metadata: Option<&Value>, errors: &mut Vec<FieldError>) {
    let Some(metadata) = metadata.and_then(Value::as_object) else {
        errors.push(field_error("metadata", "Required value"));
        return;
    };
    match metadata.get("name").and_then(Value::as_str) {
        None => errors.push(field_error("metadata.name", "Required value: name is required")),
        Some(name) if !is_dns_subdomain(name) => errors.push(field_error(
            "metadata.name",
            format!(
                "Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
            ),
        )),
        Some(_) => {}
    }
}

fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn field_error(path: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        path: path.into(),
        message: message.into(),
    }
}

fn quoted(v: Option<&str>) -> String {
    v.map(|s| format!("\"{s}\""))
        .unwrap_or_else(|| "null".to_owned())
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn display(value: &Value) -> String {
    match value {
        Value::String(s) => format!("\"{s}\""),
        other => other.to_string(),
    }
}

/// Checks `value` against the structural schema node `schema`, appending what is wrong.
fn check(schema: &Value, value: &Value, path: &str, out: &mut Vec<FieldError>) {
    let Some(node) = schema.as_object() else {
        return;
    };
    if value.is_null() {
        if !flag(node, "nullable") {
            out.push(field_error(path, "Invalid value: null: must not be null"));
        }
        return;
    }
    if flag(node, "x-kubernetes-int-or-string") {
        if !(value.is_i64() || value.is_u64() || value.is_string()) {
            out.push(field_error(
                path,
                format!(
                    "Invalid value: {}: must be an integer or a string",
                    display(value)
                ),
            ));
        }
        return;
    }
    let Some(ty) = node.get("type").and_then(Value::as_str) else {
        return;
    };
    match ty {
        "object" => check_object(node, value, path, out),
        "array" => check_array(node, value, path, out),
        "string" => check_string(node, value, path, out),
        "integer" | "number" => check_number(node, value, ty, path, out),
        "boolean" if !value.is_boolean() => out.push(type_error(path, value, "boolean")),
        _ => {}
    }
}

fn flag(node: &Map<String, Value>, key: &str) -> bool {
    node.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn type_error(path: &str, value: &Value, expected: &str) -> FieldError {
    let got = match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    field_error(
        path,
        format!(
            "Invalid value: {}: {path} in body must be of type {expected}, got {got}",
            display(value)
        ),
    )
}

fn check_object(node: &Map<String, Value>, value: &Value, path: &str, out: &mut Vec<FieldError>) {
    let Some(fields) = value.as_object() else {
        out.push(type_error(path, value, "object"));
        return;
    };
    if let Some(required) = node.get("required").and_then(Value::as_array) {
        for key in required.iter().filter_map(Value::as_str) {
            if !fields.contains_key(key) {
                out.push(field_error(join(path, key), "Required value"));
            }
        }
    }
    let properties = node.get("properties").and_then(Value::as_object);
    let additional = node.get("additionalProperties");
    for (key, field) in fields {
        let field_path = join(path, key);
        if let Some(sub) = properties.and_then(|p| p.get(key)) {
            check(sub, field, &field_path, out);
        } else if let Some(sub) = additional.filter(|a| a.is_object()) {
            check(sub, field, &field_path, out);
        } else if !flag(node, "x-kubernetes-preserve-unknown-fields") {
            out.push(field_error("", format!("unknown field \"{field_path}\"")));
        }
    }
}

fn check_array(node: &Map<String, Value>, value: &Value, path: &str, out: &mut Vec<FieldError>) {
    let Some(items) = value.as_array() else {
        out.push(type_error(path, value, "array"));
        return;
    };
    if let Some(min) = node.get("minItems").and_then(Value::as_u64)
        && (items.len() as u64) < min
    {
        out.push(field_error(
            path,
            format!(
                "Invalid value: {}: {path} in body should have at least {min} items",
                items.len()
            ),
        ));
    }
    if let Some(max) = node.get("maxItems").and_then(Value::as_u64)
        && (items.len() as u64) > max
    {
        out.push(field_error(
            path,
            format!("Too many: {}: must have at most {max} items", items.len()),
        ));
    }
    if let Some(item_schema) = node.get("items") {
        for (i, item) in items.iter().enumerate() {
            check(item_schema, item, &format!("{path}[{i}]"), out);
        }
    }
    if node.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("set") {
        let mut seen = BTreeSet::new();
        for (i, item) in items.iter().enumerate() {
            if !seen.insert(item.to_string()) {
                out.push(field_error(
                    format!("{path}[{i}]"),
                    format!("Duplicate value: {}", display(item)),
                ));
            }
        }
    }
}

fn check_string(node: &Map<String, Value>, value: &Value, path: &str, out: &mut Vec<FieldError>) {
    let Some(s) = value.as_str() else {
        out.push(type_error(path, value, "string"));
        return;
    };
    let len = s.chars().count() as u64;
    if let Some(min) = node.get("minLength").and_then(Value::as_u64)
        && len < min
    {
        out.push(field_error(
            path,
            format!("Invalid value: \"{s}\": {path} in body should be at least {min} chars long"),
        ));
    }
    if let Some(max) = node.get("maxLength").and_then(Value::as_u64)
        && len > max
    {
        out.push(field_error(
            path,
            format!("Too long: may not be more than {max} bytes"),
        ));
    }
    if let Some(pattern) = node.get("pattern").and_then(Value::as_str) {
        match Regex::new(pattern) {
            Ok(re) if !re.is_match(s) => out.push(field_error(
                path,
                format!("Invalid value: \"{s}\": {path} in body should match '{pattern}'"),
            )),
            Ok(_) => {}
            Err(e) => out.push(field_error(
                path,
                format!("schema pattern does not compile: {e}"),
            )),
        }
    }
    if let Some(allowed) = node.get("enum").and_then(Value::as_array)
        && !allowed.iter().any(|a| a == value)
    {
        let list: Vec<String> = allowed.iter().map(display).collect();
        out.push(field_error(
            path,
            format!(
                "Unsupported value: \"{s}\": supported values: {}",
                list.join(", ")
            ),
        ));
    }
}

fn check_number(
    node: &Map<String, Value>,
    value: &Value,
    ty: &str,
    path: &str,
    out: &mut Vec<FieldError>,
) {
    let is_type = if ty == "integer" {
        value.is_i64() || value.is_u64()
    } else {
        value.is_number()
    };
    let Some(n) = value.as_f64().filter(|_| is_type) else {
        out.push(type_error(path, value, ty));
        return;
    };
    if let Some(min) = node.get("minimum").and_then(Value::as_f64)
        && n < min
    {
        out.push(field_error(
            path,
            format!(
                "Invalid value: {value}: {path} in body should be greater than or equal to {min}"
            ),
        ));
    }
    if let Some(max) = node.get("maximum").and_then(Value::as_f64)
        && n > max
    {
        out.push(field_error(
            path,
            format!("Invalid value: {value}: {path} in body should be less than or equal to {max}"),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn valid_module() -> Value {
        json!({
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": "orders"},
            "spec": {
                "image": "chimera/orders:dev",
                "commands": ["order.place"],
                "events": {
                    "publishes": ["order.placed"],
                    "subscribes": [{"from": "users", "events": ["user.*"]}]
                },
                "query": {"replicas": {"min": 1, "max": 5}},
                "worker": {"prefetch": 50, "replicas": {"min": 0, "max": 8}}
            }
        })
    }

    fn errors_with(patch: impl FnOnce(&mut Value)) -> Vec<FieldError> {
        let mut module = valid_module();
        patch(&mut module);
        validate_object(&module)
    }

    fn assert_rejected(errors: &[FieldError], path: &str, fragment: &str) {
        assert!(
            errors
                .iter()
                .any(|e| e.path == path && e.message.contains(fragment)),
            "expected an error at {path} containing {fragment:?}, got {errors:?}"
        );
    }

    #[test]
    fn a_valid_module_has_no_errors() {
        assert_eq!(validate_object(&valid_module()), vec![]);
    }

    #[test]
    fn structural_rules_come_from_the_schema() {
        let e = errors_with(|m| m["spec"]["worker"]["prefetch"] = json!(0));
        assert_rejected(&e, "spec.worker.prefetch", "greater than or equal to 1");
        let e = errors_with(|m| m["spec"]["worker"]["queue"] = json!({"type": "lazy"}));
        assert_rejected(&e, "spec.worker.queue.type", "Unsupported value");
        let e = errors_with(|m| m["spec"]["commands"] = json!(["Order.Place"]));
        assert_rejected(&e, "spec.commands[0]", "should match");
        let e = errors_with(|m| m["spec"]["commands"] = json!(["a.b", "a.b"]));
        assert_rejected(&e, "spec.commands[1]", "Duplicate value");
        let e = errors_with(|m| m["spec"]["worker"]["prefech"] = json!(3));
        assert_rejected(&e, "", "unknown field \"spec.worker.prefech\"");
        let e = errors_with(|m| m["spec"]["image"] = json!(7));
        assert_rejected(&e, "spec.image", "must be of type string");
        let e = errors_with(|m| {
            m["spec"].as_object_mut().map(|s| s.remove("image"));
        });
        assert_rejected(&e, "spec.image", "Required value");
    }

    #[test]
    fn cel_rules_are_evaluated() {
        let e = errors_with(|m| m["spec"]["worker"]["replicas"] = json!({"min": 9, "max": 2}));
        assert!(
            e.iter()
                .any(|e| e.message.contains("replicas.min must be less")),
            "{e:?}"
        );
        let e = errors_with(|m| {
            let spec = m["spec"].as_object_mut().expect("spec");
            spec.remove("query");
            spec.remove("worker");
        });
        assert!(
            e.iter().any(|e| e.message.contains("at least one head")),
            "{e:?}"
        );
        let e =
            errors_with(|m| m["spec"]["env"] = json!([{"name": "CHIMERA_DOMAIN", "value": "x"}]));
        assert!(
            e.iter()
                .any(|e| e.message.contains("reserved for the head contract")),
            "{e:?}"
        );
    }

    #[test]
    fn metadata_and_kind_are_checked() {
        let e = errors_with(|m| m["apiVersion"] = json!("chimera.dev/v1"));
        assert_rejected(&e, "apiVersion", "Unsupported value");
        let e = errors_with(|m| m["metadata"] = json!({}));
        assert_rejected(&e, "metadata.name", "Required value");
    }

    #[test]
    fn yaml_reports_each_document() {
        let source = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n---\n---\napiVersion: chimera.dev/v1alpha1\nkind: ChimeraModule\nmetadata: {name: users}\nspec: {image: x, worker: {prefetch: 0}}\n";
        let reports = validate_yaml(source);
        assert_eq!(reports.len(), 2, "{reports:?}");
        assert!(!reports[0].checked);
        assert_eq!(reports[1].object.as_deref(), Some("ChimeraModule/users"));
        assert_rejected(
            &reports[1].errors,
            "spec.worker.prefetch",
            "greater than or equal",
        );
    }

    #[test]
    fn modules_are_read_only_when_valid() {
        let source = "apiVersion: chimera.dev/v1alpha1\nkind: ChimeraModule\nmetadata: {name: users}\nspec: {image: x, worker: {}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: s}\n---\napiVersion: chimera.dev/v1alpha1\nkind: ChimeraModule\nmetadata: {name: bad}\nspec: {image: x, worker: {prefetch: 0}}\n";
        let (modules, problems) = modules_from_yaml(source);
        assert_eq!(modules.len(), 1);
        assert_eq!(modules[0].domain(), "users");
        assert_eq!(
            modules[0].spec.worker.as_ref().map(|w| w.prefetch),
            Some(100),
            "defaults applied"
        );
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].starts_with("ChimeraModule/bad: spec.worker.prefetch:"),
            "{problems:?}"
        );
    }

    #[test]
    fn broken_yaml_is_one_clear_error() {
        let reports = validate_yaml("kind: ChimeraModule\nspec: [unclosed\n");
        assert_eq!(reports.len(), 1);
        assert!(
            reports[0].errors[0].message.starts_with("not valid YAML"),
            "{reports:?}"
        );
    }

    #[test]
    fn a_syntax_error_after_a_valid_module_is_reported_and_ends_the_read() {
        // A plain scalar with ": " inside; the reader used to spin on the repeated error.
        let source = format!(
            "{}---\nkind: ChimeraModule\nspec:\n  description: a buyer gone: gone\n",
            serde_yaml::to_string(&valid_module()).unwrap()
        );
        let (modules, problems) = modules_from_yaml(&source);
        assert_eq!(modules.len(), 1);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("not valid YAML"), "{problems:?}");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn prefetch_is_accepted_exactly_in_its_range(p in -5i64..70_000) {
                let errors = errors_with(|m| m["spec"]["worker"]["prefetch"] = json!(p));
                prop_assert_eq!(errors.is_empty(), (1..=65_535).contains(&p), "{:?}", errors);
            }

            #[test]
            fn worker_bounds_are_accepted_exactly_when_consistent(min in -2i64..15, max in -2i64..15) {
                let errors = errors_with(|m| m["spec"]["worker"]["replicas"] = json!({"min": min, "max": max}));
                let valid = min >= 0 && max >= 1 && min <= max;
                prop_assert_eq!(errors.is_empty(), valid, "min {} max {}: {:?}", min, max, errors);
            }

            #[test]
            fn names_from_the_grammar_are_accepted(segments in proptest::collection::vec("[a-z0-9][a-z0-9_-]{0,6}", 1..4)) {
                let name = segments.join(".");
                let errors = errors_with(|m| m["spec"]["commands"] = json!([name]));
                prop_assert!(errors.is_empty(), "{:?}", errors);
            }

            #[test]
            fn a_name_with_an_uppercase_letter_or_space_is_rejected(
                prefix in "[a-z]{1,5}", bad in "[A-Z ]", suffix in "[a-z]{0,5}"
            ) {
                let name = format!("{prefix}{bad}{suffix}");
                let errors = errors_with(|m| m["spec"]["events"]["publishes"] = json!([name]));
                prop_assert!(errors.iter().any(|e| e.path == "spec.events.publishes[0]"), "{:?}", errors);
            }
        }
    }
}
