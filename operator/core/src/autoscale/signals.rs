//! Signals of a head as the laws read them: a worker queue at one moment, and a query head's
//! latency histogram merged over pods that come, go and restart.

use std::collections::HashMap;

use super::exposition::Scrape;
use super::histogram::Histogram;

/// A worker queue at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QueueSample {
    /// Messages waiting.
    pub ready: f64,
    /// Messages delivered, not yet acknowledged.
    pub unacked: f64,
    /// Acknowledgements so far (a counter).
    pub acked_total: f64,
    /// Consumers.
    pub consumers: u64,
}

/// Rounds a pod may be missing (a slow scrape, a readiness flap) before its counts are
/// retired; a pod that comes back within them continues where it was.
const ABSENT_ROUNDS: u32 = 30;

/// The head's histogram as one monotonic series, from pods that come and go and restart: each
/// pod's counts continue across its resets, and a pod that is gone keeps what it counted.
#[derive(Clone, Debug, Default)]
pub struct MergedLatency {
    pods: HashMap<String, Pod>,
    retired: Option<Histogram>,
}

#[derive(Clone, Debug)]
struct Pod {
    last: Histogram,
    offset: Histogram,
    absent: u32,
}

impl MergedLatency {
    /// Folds one round of scrapes in and returns the head's cumulative histogram and in-flight.
    pub fn update(&mut self, scrapes: &[(String, Scrape)]) -> Option<(Histogram, f64)> {
        let bounds = scrapes.first()?.1.latency.bounds.clone();
        let empty = Histogram::empty(&bounds);
        for (key, pod) in &mut self.pods {
            if !scrapes.iter().any(|(k, _)| k == key) {
                pod.absent += 1;
            }
        }
        let gone: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, p)| p.absent > ABSENT_ROUNDS)
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            if let Some(pod) = self.pods.remove(&key) {
                let retired = self.retired.get_or_insert_with(|| empty.clone());
                retired.add(&pod.last);
                retired.add(&pod.offset);
            }
        }
        let mut in_flight = 0.0;
        for (key, scrape) in scrapes {
            if scrape.latency.bounds != bounds {
                continue; // another build with other buckets: cannot be merged
            }
            in_flight += scrape.in_flight;
            let pod = self.pods.entry(key.clone()).or_insert_with(|| Pod {
                last: empty.clone(),
                offset: empty.clone(),
                absent: 0,
            });
            pod.absent = 0;
            if scrape.latency.total < pod.last.total {
                let last = pod.last.clone();
                pod.offset.add(&last); // the pod restarted: keep what it had counted
            }
            pod.last = scrape.latency.clone();
        }
        let mut merged = self
            .retired
            .clone()
            .filter(|r| r.bounds == bounds)
            .unwrap_or_else(|| empty.clone());
        for pod in self.pods.values() {
            merged.add(&pod.last);
            merged.add(&pod.offset);
        }
        Some((merged, in_flight))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(counts: f64, in_flight: f64) -> Scrape {
        let mut latency = Histogram::empty(&[0.1, 1.0]);
        latency.observe_n(0.05, counts);
        Scrape { latency, in_flight }
    }

    #[test]
    fn merged_latency_is_monotonic_across_restarts_and_departures() {
        let mut m = MergedLatency::default();
        let (h, f) = m
            .update(&[
                ("a".into(), scrape(10.0, 1.0)),
                ("b".into(), scrape(5.0, 2.0)),
            ])
            .unwrap();
        assert_eq!((h.total, f), (15.0, 3.0));
        // b restarts (counts from 0), a goes on.
        let (h, _) = m
            .update(&[
                ("a".into(), scrape(12.0, 0.0)),
                ("b".into(), scrape(1.0, 0.0)),
            ])
            .unwrap();
        assert_eq!(h.total, 18.0);
        // a misses a scrape (what it counted stays), then comes back: counted once.
        let (h, _) = m.update(&[("b".into(), scrape(4.0, 0.0))]).unwrap();
        assert_eq!(h.total, 21.0);
        let (h, _) = m
            .update(&[
                ("a".into(), scrape(13.0, 0.0)),
                ("b".into(), scrape(4.0, 0.0)),
            ])
            .unwrap();
        assert_eq!(h.total, 22.0, "not counted twice");
        // a leaves for good; what it counted stays.
        let mut h = None;
        for _ in 0..=ABSENT_ROUNDS {
            h = m.update(&[("b".into(), scrape(5.0, 0.0))]);
        }
        assert_eq!(h.unwrap().0.total, 23.0);
        assert!(m.update(&[]).is_none());
    }
}
