//! Reads a head's `/metrics` (Prometheus text): a query head's request-duration histogram summed
//! over its routes, methods and statuses (the contract's own endpoints left out: probes and
//! scrapes are not traffic) and its in-flight gauge; a worker head's outbox gauge.

use std::collections::BTreeMap;

use crate::autoscale::histogram::Histogram;

use chimera_contract::metrics::{
    BUCKETS, ENDPOINTS as CONTRACT_ROUTES, IN_FLIGHT, OUTBOX_PENDING, REQUEST_DURATION as DURATION,
};

/// What one scrape says.
#[derive(Clone, Debug, PartialEq)]
pub struct Scrape {
    /// The duration histogram, summed over series.
    pub latency: Histogram,
    /// Requests in flight.
    pub in_flight: f64,
}

/// Why a scrape could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExpositionError {
    /// The histogram is not there.
    #[error("no {DURATION} histogram in the metrics")]
    NoHistogram,
    /// A line could not be parsed.
    #[error("bad metrics line {0:?}")]
    BadLine(String),
    /// The pod does not know its outbox rows (its relay could not count them).
    #[error("{OUTBOX_PENDING} is negative: the pod does not know its outbox rows")]
    OutboxUnknown,
}

fn labels(text: &str) -> BTreeMap<&str, &str> {
    text.split(',')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((k.trim(), v.trim().trim_matches('"')))
        })
        .collect()
}

/// A sample value (`+Inf` and `-Inf` included).
pub(crate) fn value(text: &str) -> Option<f64> {
    match text {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        t => t.parse().ok(),
    }
}

/// A worker pod's outbox rows not sent yet ([`OUTBOX_PENDING`], summed over its series). A
/// head that does not expose the gauge has no outbox the control plane knows of: 0. A negative
/// value (-1) says the pod does not know them: an error, so the head is not taken to zero.
pub fn outbox_pending(text: &str) -> Result<f64, ExpositionError> {
    let mut rows = 0.0;
    for line in text.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix(OUTBOX_PENDING) else {
            continue;
        };
        // The name must end here (not a longer metric's prefix).
        let rest = match rest.strip_prefix('{') {
            Some(labelled) => labelled
                .split_once('}')
                .map(|(_, v)| v)
                .ok_or_else(|| ExpositionError::BadLine(line.to_owned()))?,
            None if rest.starts_with(' ') => rest,
            None => continue,
        };
        let v = rest
            .split_whitespace()
            .next()
            .and_then(value)
            .filter(|v| v.is_finite())
            .ok_or_else(|| ExpositionError::BadLine(line.to_owned()))?;
        if v < 0.0 {
            return Err(ExpositionError::OutboxUnknown);
        }
        rows += v;
    }
    Ok(rows)
}

/// Parses the exposition.
pub fn parse(text: &str) -> Result<Scrape, ExpositionError> {
    let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new(); // bound bits -> (bound, count)
    let (mut total, mut sum, mut in_flight, mut seen) = (0.0, 0.0, 0.0, false);
    let mut in_flight_seen = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, rest) = match line.find('{') {
            Some(i) => {
                let close = line
                    .rfind('}')
                    .filter(|&c| c > i)
                    .ok_or_else(|| ExpositionError::BadLine(line.to_owned()))?;
                (&line[..i], (Some(&line[i + 1..close]), &line[close + 1..]))
            }
            None => {
                let (name, rest) = line
                    .split_once(' ')
                    .ok_or_else(|| ExpositionError::BadLine(line.to_owned()))?;
                (name, (None, rest))
            }
        };
        let (label_text, rest) = rest;
        let number = rest
            .split_whitespace()
            .next()
            .and_then(value)
            .ok_or_else(|| ExpositionError::BadLine(line.to_owned()))?;
        let labels = label_text.map(labels).unwrap_or_default();
        if series == IN_FLIGHT {
            in_flight += number;
            in_flight_seen = true;
            continue;
        }
        let Some(part) = series.strip_prefix(DURATION) else {
            continue;
        };
        if labels
            .get("route")
            .is_some_and(|r| CONTRACT_ROUTES.contains(r))
        {
            continue;
        }
        seen = true;
        match part {
            "_bucket" => {
                let bound = labels
                    .get("le")
                    .and_then(|v| value(v))
                    .ok_or_else(|| ExpositionError::BadLine(line.to_owned()))?;
                if bound.is_finite() {
                    buckets.entry(bound.to_bits()).or_insert((bound, 0.0)).1 += number;
                }
            }
            "_sum" => sum += number,
            "_count" => total += number,
            _ => {}
        }
    }
    if !seen {
        // A head that has served nothing yet exports the gauge but no histogram series.
        if in_flight_seen {
            return Ok(Scrape {
                latency: Histogram::empty(&BUCKETS),
                in_flight,
            });
        }
        return Err(ExpositionError::NoHistogram);
    }
    let mut bounds: Vec<(f64, f64)> = buckets.into_values().collect();
    bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(Scrape {
        latency: Histogram {
            bounds: bounds.iter().map(|b| b.0).collect(),
            counts: bounds.iter().map(|b| b.1).collect(),
            total,
            sum,
        },
        in_flight,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP chimera_http_request_duration_seconds Request duration.
# TYPE chimera_http_request_duration_seconds histogram
chimera_http_request_duration_seconds_sum{route="/orders/{id}",method="GET",status="200"} 1.5
chimera_http_request_duration_seconds_count{route="/orders/{id}",method="GET",status="200"} 10
chimera_http_request_duration_seconds_bucket{le="0.1",route="/orders/{id}",method="GET",status="200"} 8
chimera_http_request_duration_seconds_bucket{le="0.5",route="/orders/{id}",method="GET",status="200"} 10
chimera_http_request_duration_seconds_bucket{le="+Inf",route="/orders/{id}",method="GET",status="200"} 10
chimera_http_request_duration_seconds_sum{route="/orders",method="GET",status="400"} 0.5
chimera_http_request_duration_seconds_count{route="/orders",method="GET",status="400"} 5
chimera_http_request_duration_seconds_bucket{le="0.1",route="/orders",method="GET",status="400"} 5
chimera_http_request_duration_seconds_bucket{le="0.5",route="/orders",method="GET",status="400"} 5
chimera_http_request_duration_seconds_bucket{le="+Inf",route="/orders",method="GET",status="400"} 5
chimera_http_request_duration_seconds_count{route="/healthz",method="GET",status="200"} 1000
chimera_http_request_duration_seconds_bucket{le="0.1",route="/healthz",method="GET",status="200"} 1000
# TYPE chimera_http_requests_in_flight gauge
chimera_http_requests_in_flight 3
# EOF
"#;

    #[test]
    fn sums_series_and_leaves_out_the_contract_routes() {
        let s = parse(TEXT).unwrap();
        assert_eq!(s.latency.bounds, [0.1, 0.5]);
        assert_eq!(s.latency.counts, [13.0, 15.0]);
        assert_eq!(s.latency.total, 15.0);
        assert_eq!(s.latency.sum, 2.0);
        assert_eq!(s.in_flight, 3.0);
    }

    #[test]
    fn missing_histogram_and_garbage_are_errors() {
        assert_eq!(parse("# nothing\n"), Err(ExpositionError::NoHistogram));
        // An idle head: the gauge, no histogram series yet.
        let idle = parse("chimera_http_requests_in_flight 0\n").unwrap();
        assert_eq!(idle.latency.total, 0.0);
        assert!(matches!(
            parse("chimera_http_request_duration_seconds_count{route=\"/x\"} nope\n"),
            Err(ExpositionError::BadLine(_))
        ));
        // Not metrics at all (an HTML page, JSON): an error, never a panic.
        assert!(parse("}, {\n").is_err());
    }

    #[test]
    fn the_outbox_gauge_is_read_and_absent_reads_as_no_rows() {
        let text = "# HELP chimera_outbox_pending_rows Outbox rows\n# TYPE chimera_outbox_pending_rows gauge\nchimera_outbox_pending_rows 3\nchimera_outbox_pending_rows_other 9\n";
        assert_eq!(outbox_pending(text), Ok(3.0));
        assert_eq!(
            outbox_pending(
                "chimera_outbox_pending_rows{shard=\"a\"} 2\nchimera_outbox_pending_rows{shard=\"b\"} 1\n"
            ),
            Ok(3.0)
        );
        assert_eq!(
            outbox_pending("chimera_http_requests_in_flight 1\n"),
            Ok(0.0)
        );
        assert!(outbox_pending("chimera_outbox_pending_rows lots\n").is_err());
        assert_eq!(
            outbox_pending("chimera_outbox_pending_rows -1\n"),
            Err(ExpositionError::OutboxUnknown)
        );
    }
}
