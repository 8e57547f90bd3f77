//! Whether a live object already holds what the operator would apply: every field the desired
//! object sets has the same value live. Fields the desired object leaves unset (or sets to a
//! zero value the API server does not echo back) are someone else's: defaults, other managers,
//! status. The controller applies only when this finds a difference, and says which.

use serde_json::Value;

/// The first path where `live` does not hold `desired`, or None when it holds all of it.
pub fn first_difference(desired: &Value, live: &Value) -> Option<String> {
    walk(desired, live, &mut String::new())
}

fn walk(desired: &Value, live: &Value, path: &mut String) -> Option<String> {
    match (desired, live) {
        (Value::Object(want), Value::Object(have)) => {
            for (key, value) in want {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                let found = match have.get(key) {
                    Some(live) => walk(value, live, path),
                    None if is_zero(value) => None,
                    None => Some(path.clone()),
                };
                path.truncate(len);
                if found.is_some() {
                    return found;
                }
            }
            None
        }
        (Value::Array(want), Value::Array(have)) => {
            if want.len() != have.len() {
                return Some(format!("{path} (length {} vs {})", want.len(), have.len()));
            }
            for (i, (w, h)) in want.iter().zip(have).enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                let found = walk(w, h, path);
                path.truncate(len);
                if found.is_some() {
                    return found;
                }
            }
            None
        }
        (Value::String(want), Value::String(have)) => {
            (want != have && !same_quantity(path, want, have)).then(|| path.clone())
        }
        (Value::Number(want), Value::Number(have)) => {
            (want.as_f64() != have.as_f64()).then(|| path.clone())
        }
        (want, Value::Null) if is_zero(want) => None,
        (want, have) => (want != have).then(|| path.clone()),
    }
}

/// Values the API server drops when it serializes (Go's `omitempty`): sending them changes
/// nothing, so their absence live is no difference.
fn is_zero(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// Resource quantities come back in canonical form ("0.5" as "500m", "1024Mi" as "1Gi"):
/// under `resources` (and size limits) two spellings of one amount are the same.
fn same_quantity(path: &str, want: &str, have: &str) -> bool {
    let quantity_field = path.contains("resources.") || path.ends_with("sizeLimit");
    quantity_field
        && matches!((quantity(want), quantity(have)), (Some(a), Some(b)) if (a - b).abs() <= a.abs().max(b.abs()) * 1e-9)
}

/// The amount a Kubernetes quantity string stands for.
fn quantity(text: &str) -> Option<f64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exponent => {
            let e: i32 = exponent.strip_prefix(['e', 'E'])?.parse().ok()?;
            10f64.powi(e)
        }
    };
    Some(number * factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_and_other_managers_fields_are_no_difference() {
        let desired = json!({"spec": {"template": {"spec": {"containers": [{"name": "q", "image": "a:1"}]}}}});
        let live = json!({"spec": {"replicas": 3, "strategy": {"type": "RollingUpdate"}, "template": {"spec": {
            "containers": [{"name": "q", "image": "a:1", "imagePullPolicy": "IfNotPresent"}],
            "restartPolicy": "Always"}}}, "status": {"readyReplicas": 3}});
        assert_eq!(first_difference(&desired, &live), None);
    }

    #[test]
    fn a_changed_or_missing_field_is_named() {
        let desired = json!({"spec": {"template": {"spec": {"containers": [{"name": "q", "image": "a:2", "env": [{"name": "X", "value": "1"}]}]}}}});
        let changed = json!({"spec": {"template": {"spec": {"containers": [{"name": "q", "image": "a:1", "env": [{"name": "X", "value": "1"}]}]}}}});
        assert_eq!(
            first_difference(&desired, &changed).as_deref(),
            Some("spec.template.spec.containers[0].image")
        );
        let missing = json!({"spec": {"template": {"spec": {"containers": [{"name": "q", "image": "a:2"}]}}}});
        assert_eq!(
            first_difference(&desired, &missing).as_deref(),
            Some("spec.template.spec.containers[0].env")
        );
        let extra = json!({"spec": {"template": {"spec": {"containers": [{"name": "q", "image": "a:2", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]}]}}}});
        assert!(first_difference(&desired, &extra).is_some_and(|p| {
            p.starts_with("spec.template.spec.containers[0].env (length 1 vs 2)")
        }));
    }

    #[test]
    fn zero_values_the_server_omits_are_no_difference_but_set_ones_count() {
        let desired =
            json!({"spec": {"hostNetwork": false, "minReadySeconds": 0, "env": [], "labels": {}}});
        assert_eq!(first_difference(&desired, &json!({"spec": {}})), None);
        assert_eq!(
            first_difference(&desired, &json!({"spec": {"hostNetwork": true}})).as_deref(),
            Some("spec.hostNetwork")
        );
        assert_eq!(
            first_difference(&json!({"a": true}), &json!({})).as_deref(),
            Some("a")
        );
    }

    #[test]
    fn quantities_compare_by_amount_under_resources_only() {
        let desired = json!({"resources": {"limits": {"cpu": "0.5", "memory": "1024Mi"}, "requests": {"cpu": "1"}}});
        let live = json!({"resources": {"limits": {"cpu": "500m", "memory": "1Gi"}, "requests": {"cpu": "1000m"}}});
        assert_eq!(first_difference(&desired, &live), None);
        let more = json!({"resources": {"limits": {"cpu": "600m", "memory": "1Gi"}, "requests": {"cpu": "1"}}});
        assert_eq!(
            first_difference(&desired, &more).as_deref(),
            Some("resources.limits.cpu")
        );
        // The same spelling rule does not apply to an environment variable.
        assert!(
            first_difference(
                &json!({"env": {"value": "0.5"}}),
                &json!({"env": {"value": "500m"}})
            )
            .is_some()
        );
    }

    #[test]
    fn quantity_spellings_parse() {
        assert_eq!(quantity("250m"), Some(0.25));
        assert_eq!(quantity("2Ki"), Some(2048.0));
        assert_eq!(quantity("1e3"), Some(1000.0));
        assert_eq!(quantity("1.5G"), Some(1.5e9));
        assert_eq!(quantity("x"), None);
        assert_eq!(quantity("1Zi"), None);
    }

    #[test]
    fn numbers_compare_by_value_and_types_must_match() {
        assert_eq!(
            first_difference(&json!({"port": 8080}), &json!({"port": 8080.0})),
            None
        );
        assert!(first_difference(&json!({"port": 8080}), &json!({"port": "8080"})).is_some());
    }
}
