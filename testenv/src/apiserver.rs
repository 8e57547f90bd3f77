//! The API server's own count of the requests it served (`apiserver_request_total` on its
//! `/metrics`), by verb and resource, and the difference between two reads: how the at-rest
//! test and `bench/control-plane` see what the operator asked of the API server.

use std::collections::BTreeMap;

/// Requests served, by (verb, resource with its subresource).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Requests(pub BTreeMap<(String, String), f64>);

/// The resources the operator reads and writes; everything else on the server (the node's
/// kubelet, the controllers) is left out of the counts. Events count only in the group the
/// operator writes them in (`events.k8s.io`; the controllers write core ones).
pub const OPERATOR_RESOURCES: [&str; 6] = [
    "chimeramodules",
    "deployments",
    "services",
    "poddisruptionbudgets",
    "secrets",
    "events.k8s.io/events",
];

/// Verbs by which the operator writes: server-side apply, patches (finalizers, Event series),
/// deletions of objects a head left behind, and Event creation (`POST`). The deployment controller's status updates
/// (`PUT deployments/status`) are not the operator's.
const OPERATOR_WRITES: [&str; 5] = ["APPLY", "PATCH", "DELETE", "CREATE", "POST"];

/// Parses the exposition text: the `apiserver_request_total` samples on `resources`.
pub fn parse(text: &str, resources: &[&str]) -> Requests {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let label = |name: &str| {
            labels.split(',').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                (k == name).then(|| v.trim_matches('"').to_owned())
            })
        };
        let (Some(verb), Some(resource)) = (label("verb"), label("resource")) else {
            continue;
        };
        let resource = match label("group").filter(|g| !g.is_empty() && resource == "events") {
            Some(group) => format!("{group}/{resource}"),
            None => resource,
        };
        if !resources.contains(&resource.as_str()) {
            continue;
        }
        let resource = match label("subresource").filter(|s| !s.is_empty()) {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource,
        };
        *out.entry((verb, resource)).or_insert(0.0) += value;
    }
    Requests(out)
}

impl Requests {
    /// What was served between `earlier` and `self`.
    pub fn since(&self, earlier: &Requests) -> Requests {
        let mut out = BTreeMap::new();
        for (key, value) in &self.0 {
            let delta = value - earlier.0.get(key).copied().unwrap_or(0.0);
            if delta > 0.0 {
                out.insert(key.clone(), delta);
            }
        }
        Requests(out)
    }

    /// Totals by verb.
    pub fn by_verb(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for ((verb, _), value) in &self.0 {
            *out.entry(verb.clone()).or_insert(0.0) += value;
        }
        out
    }

    /// Writes by the verbs the operator writes with (server-side apply is `APPLY`).
    pub fn operator_writes(&self) -> f64 {
        self.0
            .iter()
            .filter(|((verb, _), _)| OPERATOR_WRITES.contains(&verb.as_str()))
            .map(|(_, v)| v)
            .sum()
    }

    /// `VERB resource: n` lines, for the report.
    pub fn lines(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|((verb, resource), n)| format!("{verb} {resource}: {n}"))
            .collect()
    }
}

/// Reads the API server's counters of `resources` now.
pub async fn read(client: &kube::Client, resources: &[&str]) -> Result<Requests, kube::Error> {
    let request = http::Request::get("/metrics")
        .body(Vec::new())
        .map_err(kube::Error::HttpError)?;
    let text = client.request_text(request).await?;
    Ok(parse(&text, resources))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP apiserver_request_total x
apiserver_request_total{code="200",component="apiserver",dry_run="",group="apps",resource="deployments",scope="resource",subresource="",verb="APPLY",version="v1"} 7
apiserver_request_total{code="201",component="apiserver",dry_run="",group="apps",resource="deployments",scope="resource",subresource="",verb="APPLY",version="v1"} 3
apiserver_request_total{code="200",component="apiserver",dry_run="",group="apps",resource="deployments",scope="resource",subresource="status",verb="PUT",version="v1"} 4
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="nodes",scope="resource",subresource="status",verb="PATCH",version="v1"} 9
apiserver_request_total{code="201",component="apiserver",dry_run="",group="",resource="events",scope="resource",subresource="",verb="CREATE",version="v1"} 5
apiserver_request_duration_seconds_bucket{verb="APPLY",le="1"} 5
"#;

    #[test]
    fn counts_the_operators_resources_by_verb_and_subresource() {
        let r = parse(TEXT, &OPERATOR_RESOURCES);
        assert_eq!(r.0[&("APPLY".into(), "deployments".into())], 10.0);
        assert_eq!(r.0[&("PUT".into(), "deployments/status".into())], 4.0);
        assert_eq!(r.0.len(), 2, "nodes and core events are not ours: {r:?}");
        assert_eq!(
            r.operator_writes(),
            10.0,
            "PUT status is the deployment controller's"
        );
    }

    #[test]
    fn a_difference_keeps_only_what_grew() {
        let before = parse(TEXT, &OPERATOR_RESOURCES);
        let after = parse(&TEXT.replace("} 7", "} 9"), &OPERATOR_RESOURCES);
        let d = after.since(&before);
        assert_eq!(d.0.len(), 1);
        assert_eq!(d.by_verb()["APPLY"], 2.0);
    }
}
