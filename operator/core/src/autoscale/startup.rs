//! How long a head's new pod takes to serve, measured from its own pods: the time from a pod's
//! creation to its Ready condition. The laws plan around this delay (a pod asked for now helps
//! only that much later); until a head has a measured pod they use the configured default
//! (`--pod-startup-seconds`).
//!
//! The estimate is a high quantile of the recent pods, not their mean: the laws must not count
//! on the lucky starts, and one slow start (a cold image cache, a busy node) should weigh in.

use std::collections::{HashSet, VecDeque};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;

/// Pods remembered per head.
const SAMPLES: usize = 20;
/// The quantile of the recent start-up times the laws plan with.
const QUANTILE: f64 = 0.9;
/// Start-ups longer than this are not start-ups (a pod that was unready for long, or whose
/// readiness flapped, and became Ready again much later).
const LONGEST_SECONDS: f64 = 600.0;

/// Seconds from `pod`'s creation to its becoming Ready, when it is Ready.
pub fn startup_seconds(pod: &Pod) -> Option<f64> {
    let created = pod.metadata.creation_timestamp.as_ref()?.0;
    let ready = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")?
        .last_transition_time
        .as_ref()?
        .0;
    let millis = ready.as_millisecond() - created.as_millisecond();
    // Whole-second timestamps: a pod Ready within its creation second measured 0.
    let seconds = millis as f64 / 1000.0;
    (0.0..=LONGEST_SECONDS)
        .contains(&seconds)
        .then_some(seconds)
}

/// Whether `pod`'s start-up can be measured by a scaler that started at `since`: the pod was
/// created after that (so its Ready transition is its first, not one after a readiness flap the
/// scaler never saw) and none of its containers restarted.
pub fn measurable(pod: &Pod, since: Timestamp) -> bool {
    let created_after = pod
        .metadata
        .creation_timestamp
        .as_ref()
        .is_some_and(|t| t.0 >= since);
    let restarted = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.restart_count > 0));
    created_after && !restarted
}

/// One head's recent start-up times.
#[derive(Clone, Debug, Default)]
pub struct StartupTimes {
    samples: VecDeque<f64>,
    /// Pods (by uid) already counted; only pods that still exist are remembered.
    seen: HashSet<String>,
}

/// What the laws use for a head's start-up time, and where it came from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Startup {
    /// Seconds.
    pub seconds: f64,
    /// Pods it was measured from; 0 when it is the configured default.
    pub measured_pods: usize,
}

impl StartupTimes {
    /// Takes the head's pods of this moment, `(uid, start-up seconds once Ready)`: each pod
    /// counts once, the first time it is seen Ready, however many ticks it is seen after.
    pub fn observe(&mut self, pods: &[(String, Option<f64>)]) {
        for (uid, seconds) in pods {
            let Some(seconds) = seconds else { continue };
            if !seconds.is_finite() || *seconds < 0.0 || !self.seen.insert(uid.clone()) {
                continue;
            }
            if self.samples.len() == SAMPLES {
                self.samples.pop_front();
            }
            self.samples.push_back(*seconds);
        }
        self.seen.retain(|uid| pods.iter().any(|(u, _)| u == uid));
    }

    /// The estimate: the recent pods' high quantile, or `default` when none was measured.
    pub fn estimate(&self, default: f64) -> Startup {
        if self.samples.is_empty() {
            return Startup {
                seconds: default,
                measured_pods: 0,
            };
        }
        let mut sorted: Vec<f64> = self.samples.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        // Nearest rank.
        let rank = ((QUANTILE * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        Startup {
            seconds: sorted[rank - 1],
            measured_pods: sorted.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pod(created: &str, ready: Option<&str>) -> Pod {
        let mut conditions = vec![serde_json::json!({"type": "PodScheduled", "status": "True"})];
        if let Some(at) = ready {
            conditions.push(
                serde_json::json!({"type": "Ready", "status": "True", "lastTransitionTime": at}),
            );
        }
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "uid": "u", "creationTimestamp": created},
            "status": {"conditions": conditions}
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_ready_pod_took_from_creation_to_ready() {
        let p = pod("2026-12-02T10:00:00Z", Some("2026-12-02T10:00:03Z"));
        assert_eq!(startup_seconds(&p), Some(3.0));
    }

    #[test]
    fn a_pod_not_ready_or_ready_implausibly_late_is_no_measure() {
        assert_eq!(startup_seconds(&pod("2026-12-02T10:00:00Z", None)), None);
        let late = pod("2026-12-02T10:00:00Z", Some("2026-12-02T11:00:00Z"));
        assert_eq!(startup_seconds(&late), None);
        let before = pod("2026-12-02T10:00:05Z", Some("2026-12-02T10:00:00Z"));
        assert_eq!(startup_seconds(&before), None);
    }

    #[test]
    fn only_pods_created_since_the_scaler_started_and_never_restarted_are_measured() {
        let since: Timestamp = "2026-12-02T10:00:00Z"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let new = pod("2026-12-02T10:00:01Z", Some("2026-12-02T10:00:03Z"));
        assert!(measurable(&new, since));
        let old = pod("2026-12-02T09:00:00Z", Some("2026-12-02T10:00:03Z"));
        assert!(!measurable(&old, since), "its Ready may follow a flap");
        let mut restarted = new.clone();
        restarted
            .status
            .get_or_insert_with(Default::default)
            .container_statuses = Some(vec![
            serde_json::from_value(serde_json::json!({
                "name": "c", "image": "i", "imageID": "", "ready": true, "restartCount": 1
            }))
            .unwrap_or_else(|e| panic!("{e}")),
        ]);
        assert!(!measurable(&restarted, since));
    }

    #[test]
    fn the_default_holds_until_a_pod_is_measured() {
        let times = StartupTimes::default();
        assert_eq!(
            times.estimate(10.0),
            Startup {
                seconds: 10.0,
                measured_pods: 0
            }
        );
    }

    #[test]
    fn a_pod_counts_once_however_often_it_is_seen() {
        let mut times = StartupTimes::default();
        for _ in 0..5 {
            times.observe(&[("a".into(), Some(2.0)), ("b".into(), Some(4.0))]);
        }
        assert_eq!(times.estimate(10.0).measured_pods, 2);
        assert_eq!(times.estimate(10.0).seconds, 4.0);
    }

    #[test]
    fn a_pod_whose_readiness_flaps_still_counts_once() {
        let mut times = StartupTimes::default();
        times.observe(&[("a".into(), Some(2.0))]);
        // Unready for a while (still there), then Ready again with a later transition time.
        times.observe(&[("a".into(), None)]);
        times.observe(&[("a".into(), Some(40.0))]);
        assert_eq!(times.estimate(10.0).seconds, 2.0);
        assert_eq!(times.estimate(10.0).measured_pods, 1);
    }

    #[test]
    fn the_estimate_is_the_slow_end_of_recent_pods() {
        let mut times = StartupTimes::default();
        let pods: Vec<(String, Option<f64>)> = (0..10)
            .map(|i| (format!("p{i}"), Some(f64::from(i + 1))))
            .collect();
        times.observe(&pods);
        // 90th percentile of 1..=10 by nearest rank.
        assert_eq!(times.estimate(0.0).seconds, 9.0);
    }

    #[test]
    fn old_pods_give_way_to_recent_ones() {
        let mut times = StartupTimes::default();
        let slow: Vec<_> = (0..SAMPLES)
            .map(|i| (format!("old{i}"), Some(30.0)))
            .collect();
        times.observe(&slow);
        let fast: Vec<_> = (0..SAMPLES)
            .map(|i| (format!("new{i}"), Some(2.0)))
            .collect();
        times.observe(&fast);
        assert_eq!(times.estimate(10.0).seconds, 2.0);
    }

    proptest! {
        #[test]
        fn the_estimate_lies_within_what_was_measured(
            seconds in proptest::collection::vec(0.0f64..300.0, 1..50)
        ) {
            let mut times = StartupTimes::default();
            let pods: Vec<(String, Option<f64>)> =
                seconds.iter().enumerate().map(|(i, s)| (i.to_string(), Some(*s))).collect();
            times.observe(&pods);
            let kept = &seconds[seconds.len().saturating_sub(SAMPLES)..];
            let estimate = times.estimate(1e9);
            let (lo, hi) = kept.iter().fold((f64::MAX, f64::MIN), |(l, h), s| (l.min(*s), h.max(*s)));
            prop_assert!(estimate.seconds >= lo && estimate.seconds <= hi);
            prop_assert_eq!(estimate.measured_pods, kept.len());
        }

        #[test]
        fn remembered_pods_are_only_those_that_still_exist(n in 0usize..100) {
            let mut times = StartupTimes::default();
            for i in 0..n {
                times.observe(&[(i.to_string(), Some(1.0))]);
            }
            prop_assert!(times.seen.len() <= 1);
        }
    }
}
