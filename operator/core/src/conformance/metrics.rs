//! Whether a head's `/metrics` says what docs/contract.md (section 5) fixes: the names, their
//! types, their labels, the outcomes, and the histograms' bucket bounds, which the autoscaler
//! merges across pods and which a head cannot choose.

use std::collections::BTreeMap;

use chimera_contract::head::Head;
use chimera_contract::metrics::{
    BUCKETS, IN_FLIGHT, OUTBOX_PENDING, OUTCOMES, REQUEST_DURATION, WORKER_BATCH_DURATION,
    WORKER_MESSAGES,
};

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Its name (`x_bucket`, `x_sum`, ... for a histogram's lines).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// A scrape: the declared types and the samples.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Exposition {
    /// `# TYPE` lines: family -> type.
    pub types: BTreeMap<String, String>,
    /// Every sample, in order.
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// Parses the Prometheus text format (and the OpenMetrics text the Rust client writes).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut out = Self::default();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut words = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (words.next(), words.next()) {
                    out.types.insert(name.to_owned(), kind.to_owned());
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            out.samples
                .push(sample(line).ok_or_else(|| format!("bad metrics line {line:?}"))?);
        }
        Ok(out)
    }

    /// The declared type of `family` (OpenMetrics declares counters without `_total`).
    pub fn kind(&self, family: &str) -> Option<&str> {
        self.types
            .get(family)
            .or_else(|| {
                family
                    .strip_suffix("_total")
                    .and_then(|f| self.types.get(f))
            })
            .map(String::as_str)
    }

    /// Samples named exactly `name`.
    pub fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The sum of `name`'s samples whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.named(name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }
}

fn sample(line: &str) -> Option<Sample> {
    // An OpenMetrics exemplar (`... # {trace_id="..."} 1.0`) is not part of the sample.
    let line = line.split_once(" # ").map_or(line, |(sample, _)| sample);
    let (head, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            let labels = parse_labels(&line[open + 1..close])?;
            ((line[..open].to_owned(), labels), &line[close + 1..])
        }
        None => {
            let (name, rest) = line.split_once(char::is_whitespace)?;
            ((name.to_owned(), BTreeMap::new()), rest)
        }
    };
    let value = crate::autoscale::exposition::value(rest.split_whitespace().next()?)?;
    Some(Sample {
        name: head.0,
        labels: head.1,
        value,
    })
}

fn parse_labels(text: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let after = after.trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim().to_owned(), value);
        rest = after[end + 1..].trim_start().trim_start_matches(',').trim();
    }
    Some(labels)
}

/// What in `scrape` breaks the contract for `head`; empty when nothing does. A histogram is
/// judged on its series (a query head's request histogram has one once it answered a request).
pub fn problems(scrape: &Exposition, head: Head) -> Vec<String> {
    let mut found = Vec::new();
    match head {
        Head::Query => {
            histogram(
                scrape,
                REQUEST_DURATION,
                &["route", "method", "status"],
                &mut found,
            );
            gauge(scrape, IN_FLIGHT, true, &mut found);
            for s in scrape.named(&format!("{REQUEST_DURATION}_count")) {
                let status = s.labels.get("status").map(String::as_str).unwrap_or("");
                if !(status.len() == 3 && status.bytes().all(|b| b.is_ascii_digit())) {
                    found.push(format!(
                        "{REQUEST_DURATION}: status {status:?} is not a numeric HTTP status"
                    ));
                }
            }
        }
        Head::Worker => {
            match scrape.kind(WORKER_MESSAGES) {
                Some("counter") => {}
                Some(other) => found.push(format!("{WORKER_MESSAGES} is a {other}, not a counter")),
                None => found.push(format!("no {WORKER_MESSAGES} counter")),
            }
            for s in scrape.named(WORKER_MESSAGES) {
                match (s.labels.get("kind"), s.labels.get("outcome")) {
                    (Some(kind), Some(outcome)) => {
                        if kind.is_empty() {
                            found.push(format!("{WORKER_MESSAGES}: an empty kind"));
                        }
                        if !OUTCOMES.contains(&outcome.as_str()) {
                            found.push(format!(
                                "{WORKER_MESSAGES}: outcome {outcome:?} is not one of {}",
                                OUTCOMES.join(", ")
                            ));
                        }
                    }
                    _ => found.push(format!(
                        "{WORKER_MESSAGES}: a series without the labels kind and outcome: {:?}",
                        s.labels
                    )),
                }
            }
            histogram(scrape, WORKER_BATCH_DURATION, &[], &mut found);
            gauge(scrape, OUTBOX_PENDING, false, &mut found);
        }
    }
    found.dedup();
    found
}

fn gauge(scrape: &Exposition, name: &str, required: bool, found: &mut Vec<String>) {
    match scrape.kind(name) {
        Some("gauge") => {}
        Some(other) => found.push(format!("{name} is a {other}, not a gauge")),
        None if required => found.push(format!("no {name} gauge")),
        None => {}
    }
}

fn histogram(scrape: &Exposition, name: &str, labels: &[&str], found: &mut Vec<String>) {
    match scrape.kind(name) {
        Some("histogram") => {}
        Some(other) => {
            found.push(format!("{name} is a {other}, not a histogram"));
            return;
        }
        None => {
            found.push(format!("no {name} histogram"));
            return;
        }
    }
    // Series: the labels of a bucket line without `le`.
    let mut series: BTreeMap<Vec<(String, String)>, Vec<f64>> = BTreeMap::new();
    for s in scrape.named(&format!("{name}_bucket")) {
        let mut key: Vec<(String, String)> = s.labels.clone().into_iter().collect();
        key.retain(|(k, _)| k != "le");
        let le = s.labels.get("le").map(String::as_str).unwrap_or("");
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::NAN)
        };
        series.entry(key).or_default().push(bound);
    }
    if series.is_empty() {
        found.push(format!("{name} has no series"));
    }
    let mut want: Vec<f64> = BUCKETS.to_vec();
    want.push(f64::INFINITY);
    for (key, mut bounds) in series {
        bounds.sort_by(f64::total_cmp);
        let same = bounds.len() == want.len()
            && bounds
                .iter()
                .zip(&want)
                .all(|(a, b)| a == b || (a - b).abs() < 1e-9);
        if !same {
            found.push(format!(
                "{name}: buckets {bounds:?} are not the contract's {want:?}"
            ));
        }
        for label in labels {
            if !key.iter().any(|(k, _)| k == label) {
                found.push(format!("{name}: a series without the label {label}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets(name: &str, labels: &str, bounds: &[f64]) -> String {
        let mut out = String::new();
        for b in bounds {
            out.push_str(&format!("{name}_bucket{{{labels}le=\"{b}\"}} 1\n"));
        }
        out.push_str(&format!("{name}_bucket{{{labels}le=\"+Inf\"}} 1\n"));
        out
    }

    fn query(bounds: &[f64], status: &str) -> String {
        format!(
            "# TYPE {REQUEST_DURATION} histogram\n{}{REQUEST_DURATION}_count{{route=\"/x\",method=\"GET\",status=\"{status}\"}} 1\n# TYPE {IN_FLIGHT} gauge\n{IN_FLIGHT} 0\n",
            buckets(
                REQUEST_DURATION,
                &format!("route=\"/x\",method=\"GET\",status=\"{status}\","),
                bounds
            )
        )
    }

    #[test]
    fn the_contracts_query_metrics_pass() {
        let scrape = Exposition::parse(&query(&BUCKETS, "200")).unwrap();
        assert_eq!(problems(&scrape, Head::Query), Vec::<String>::new());
    }

    #[test]
    fn other_buckets_a_missing_gauge_or_a_word_status_fail() {
        let scrape = Exposition::parse(&query(&[0.1, 1.0], "200")).unwrap();
        assert!(problems(&scrape, Head::Query)[0].contains("are not the contract's"));
        let text = query(&BUCKETS, "ok").replace(&format!("# TYPE {IN_FLIGHT} gauge\n"), "");
        let found = problems(&Exposition::parse(&text).unwrap(), Head::Query);
        assert!(
            found
                .iter()
                .any(|p| p.contains("no chimera_http_requests_in_flight"))
        );
        assert!(
            found
                .iter()
                .any(|p| p.contains("not a numeric HTTP status"))
        );
    }

    #[test]
    fn worker_metrics_need_the_counter_its_labels_and_known_outcomes() {
        let batch = format!(
            "# TYPE {WORKER_BATCH_DURATION} histogram\n{}",
            buckets(WORKER_BATCH_DURATION, "", &BUCKETS)
        );
        let good = format!(
            "# TYPE chimera_worker_messages counter\n{WORKER_MESSAGES}{{kind=\"a.b\",outcome=\"handled\"}} 3\n{batch}"
        );
        let scrape = Exposition::parse(&good).unwrap();
        assert_eq!(problems(&scrape, Head::Worker), Vec::<String>::new());
        assert_eq!(scrape.sum(WORKER_MESSAGES, &[("outcome", "handled")]), 3.0);
        let bad = good.replace("handled", "done");
        assert!(problems(&Exposition::parse(&bad).unwrap(), Head::Worker)[0].contains("\"done\""));
        assert!(
            problems(&Exposition::parse(&batch).unwrap(), Head::Worker)[0]
                .contains("no chimera_worker_messages_total")
        );
    }

    #[test]
    fn labels_with_escapes_and_commas_parse() {
        let s = sample(r#"m{a="x,\"y\"",b="z"} 2.5"#).unwrap();
        assert_eq!(s.labels["a"], "x,\"y\"");
        assert_eq!(s.labels["b"], "z");
        assert_eq!(s.value, 2.5);
        assert!(Exposition::parse("m{a=x} 1").is_err());
        let s = sample(r#"m_bucket{le="0.1"} 3 # {trace_id="abc"} 0.05"#).unwrap();
        assert_eq!((s.labels["le"].as_str(), s.value), ("0.1", 3.0));
    }
}
