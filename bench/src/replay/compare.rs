//! What a replay measured on the node, scored as the simulator scores its own runs, and the
//! simulator's prediction of the same arrivals beside it. Pure: the I/O is in `mod.rs`.

use chimera_core::sim::model::WorkerQueue;
use chimera_core::sim::scenario::{Head, Scenario, Second, Service, Slo};
use chimera_core::sim::{self, Run, policy};

/// One second on the node, sampled at its end.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    /// Commands published and confirmed so far.
    pub published: f64,
    /// Commands applied so far (rows written by the worker pods).
    pub applied: f64,
    /// Replicas on the worker Deployment (pods ordered).
    pub existing: u32,
    /// Ready worker pods.
    pub ready: u32,
}

/// A run's score, for the node and for the simulator alike.
#[derive(Clone, Debug, PartialEq)]
pub struct Score {
    /// Seconds whose arrivals waited longer than the SLO (their 99th percentile).
    pub violation_s: u32,
    /// Sum of replicas that existed each second.
    pub replica_seconds: f64,
    /// Seconds in which the replica count changed.
    pub scale_actions: u32,
    /// Most replicas at once.
    pub peak: u32,
    /// The first second the replica count rose above the first second's, if it did.
    pub first_scale_out_s: Option<u32>,
    /// The last second the count changed.
    pub last_change_s: Option<u32>,
    /// The largest backlog (published, not yet applied).
    pub peak_backlog: f64,
}

/// Scores what the node did, the waits computed from the same FIFO model the simulator uses
/// (a command waits until as many commands as had arrived before it were applied).
pub fn score_node(samples: &[Sample], slo_s: f64) -> Score {
    let queue = WorkerQueue {
        backlog: samples.last().map_or(0.0, |s| s.published - s.applied),
        arrived: samples.iter().map(|s| s.published).collect(),
        departed: samples.iter().map(|s| s.applied).collect(),
    };
    let existing: Vec<u32> = samples.iter().map(|s| s.existing).collect();
    let backlog = samples.iter().map(|s| (s.published - s.applied).max(0.0));
    score(&queue, &existing, backlog, slo_s)
}

/// Scores the simulator's run.
pub fn score_sim(run: &Run, slo_s: f64) -> Score {
    let existing: Vec<u32> = run.timeline.iter().map(|t| t.existing).collect();
    let mut score = score(
        &WorkerQueue::default(),
        &existing,
        run.timeline.iter().map(|t| t.signal),
        slo_s,
    );
    score.violation_s = run.metrics.slo_violation_s;
    score
}

fn score(
    queue: &WorkerQueue,
    existing: &[u32],
    backlog: impl Iterator<Item = f64>,
    slo_s: f64,
) -> Score {
    let late = queue
        .waits()
        .into_iter()
        .flatten()
        .filter(|w| *w > slo_s)
        .count();
    let changes: Vec<u32> = existing
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w[0] != w[1])
        .filter_map(|(i, _)| u32::try_from(i + 1).ok())
        .collect();
    let first = existing.first().copied().unwrap_or(0);
    Score {
        violation_s: u32::try_from(late).unwrap_or(u32::MAX),
        replica_seconds: existing.iter().map(|e| f64::from(*e)).sum(),
        scale_actions: u32::try_from(changes.len()).unwrap_or(u32::MAX),
        peak: existing.iter().copied().max().unwrap_or(0),
        first_scale_out_s: existing
            .iter()
            .position(|e| *e > first)
            .and_then(|i| u32::try_from(i).ok()),
        last_change_s: changes.last().copied(),
        peak_backlog: backlog.fold(0.0, f64::max),
    }
}

/// What the node's pods measured: the start-up the law planned with and the service rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measured {
    /// Commands per second one pod applies with work waiting (the calibration).
    pub per_pod_rate: f64,
    /// Seconds from a pod's creation to Ready, as the operator measured it.
    pub startup_s: f64,
    /// The pods' contention (the USL's σ) measured at the most-run ready count above one, if
    /// one ran saturated long enough: what several pods on one node and one database share.
    pub contention: Option<f64>,
}

/// Saturated seconds a ready count needs before its rate says anything about contention.
const CONTENTION_MIN_SECONDS: u32 = 10;

/// σ of `X(n) = n·μ / (1 + σ(n−1))` from the per-pod rate at the most-measured ready count
/// above one (`rates` as [`rate_per_ready_pod`] gives them), `μ` the calibrated rate.
pub fn contention(rates: &[(u32, u32, f64)], per_pod_rate: f64) -> Option<f64> {
    let &(n, _, rate) = rates
        .iter()
        .filter(|(n, seconds, rate)| *n > 1 && *seconds >= CONTENTION_MIN_SECONDS && *rate > 0.0)
        .max_by_key(|(_, seconds, _)| *seconds)?;
    let sigma = (per_pod_rate / rate - 1.0) / f64::from(n - 1);
    Some(sigma.clamp(0.0, 0.95))
}

/// The scenario the simulator predicts with: the replay's bounds and SLO, the node's measured
/// pods, and the arrivals as they were published (not as they were planned).
pub fn predicted_scenario(
    replayed: &Scenario,
    measured: Measured,
    samples: &[Sample],
    with_contention: bool,
) -> Scenario {
    let mut before = 0.0;
    let trace = samples
        .iter()
        .map(|s| {
            let rate = (s.published - before).max(0.0);
            before = s.published;
            Second {
                rate,
                service_scale: 1.0,
            }
        })
        .collect();
    let contention = measured.contention.filter(|_| with_contention);
    Scenario {
        name: format!(
            "{}-predicted{}",
            replayed.name,
            if contention.is_some() {
                "-contended"
            } else {
                ""
            }
        ),
        head: Head::Worker,
        startup_s: rounded_seconds(measured.startup_s),
        min_replicas: replayed.min_replicas,
        max_replicas: replayed.max_replicas,
        service: Service {
            per_replica_rate: Some(measured.per_pod_rate),
            contention,
            ..Service::default()
        },
        slo: Slo {
            queue_wait_p99_s: replayed.slo.queue_wait_p99_s,
            ..Slo::default()
        },
        trace,
        prefetch: replayed.prefetch,
        stats_interval_s: replayed.stats_interval_s,
    }
}

/// Runs the simulator with Chimera's laws on `scenario`.
pub fn predict(scenario: &Scenario) -> Run {
    let law = policy::build(policy::PolicyName::Chimera, scenario, None);
    sim::run(scenario, law, "chimera", None)
}

/// The planned arrivals of `scenario` scaled so that its nominal per-replica rate becomes the
/// pods' measured one: the load keeps its shape relative to what one pod serves.
pub fn planned_rates(scenario: &Scenario, per_pod_rate: f64) -> Vec<f64> {
    let nominal = scenario
        .service
        .per_replica_rate
        .filter(|r| *r > 0.0)
        .unwrap_or(per_pod_rate);
    let scale = per_pod_rate / nominal;
    scenario.trace.iter().map(|s| s.rate * scale).collect()
}

fn rounded_seconds(seconds: f64) -> u32 {
    // Whole seconds (the simulator ticks once a second), at least one.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let whole = seconds.round().clamp(1.0, 3600.0) as u32;
    if seconds.is_finite() { whole } else { 1 }
}

/// Per ready pod, the commands applied per second while a backlog waited, by ready count:
/// (ready pods, seconds measured, commands per pod-second). Shows whether pods share
/// something that saturates (the simulator's pods do not, unless told).
pub fn rate_per_ready_pod(samples: &[Sample], prefetch: f64) -> Vec<(u32, u32, f64)> {
    let mut by_ready: std::collections::BTreeMap<u32, (u32, f64)> = Default::default();
    for w in samples.windows(2) {
        let (a, b) = (w[0], w[1]);
        // Saturated: more waiting than the ready pods hold in flight, the whole second.
        let waiting = |s: Sample| s.published - s.applied;
        let held = f64::from(b.ready) * prefetch;
        if a.ready == b.ready && b.ready > 0 && waiting(a) > held && waiting(b) > held {
            let entry = by_ready.entry(b.ready).or_default();
            entry.0 += 1;
            entry.1 += b.applied - a.applied;
        }
    }
    by_ready
        .into_iter()
        .map(|(ready, (seconds, applied))| {
            (
                ready,
                seconds,
                applied / f64::from(seconds) / f64::from(ready),
            )
        })
        .collect()
}

/// Per second: `t_s,rate,node_existing,node_ready,node_backlog`, then `_existing,_ready,_backlog`
/// of each prediction under its label.
pub fn timeline_csv(samples: &[Sample], predictions: &[(&str, &Run)]) -> String {
    let mut out = String::from("t_s,rate,node_existing,node_ready,node_backlog");
    for (label, _) in predictions {
        out.push_str(&format!(",{label}_existing,{label}_ready,{label}_backlog"));
    }
    out.push('\n');
    let mut before = 0.0;
    for (t, s) in samples.iter().enumerate() {
        out.push_str(&format!(
            "{t},{:.0},{},{},{:.0}",
            s.published - before,
            s.existing,
            s.ready,
            (s.published - s.applied).max(0.0),
        ));
        for (_, run) in predictions {
            let p = run.timeline.get(t);
            out.push_str(&format!(
                ",{},{},{:.0}",
                p.map_or(0, |p| p.existing),
                p.map_or(0, |p| p.ready),
                p.map_or(0.0, |p| p.signal),
            ));
        }
        out.push('\n');
        before = s.published;
    }
    out
}

/// The predicted scenario as the repository's scenario files (JSON and trace CSV), so that
/// `chimera sim --scenario <json>` reproduces the prediction.
pub fn scenario_files(scenario: &Scenario, trace_file: &str) -> (String, String) {
    let json = serde_json::json!({
        "name": scenario.name,
        "head": "worker",
        "tick_s": 1,
        "duration_s": scenario.trace.len(),
        "pod_startup_s": scenario.startup_s,
        "min_replicas": scenario.min_replicas,
        "max_replicas": scenario.max_replicas,
        "service": {
            "per_replica_rate": scenario.service.per_replica_rate,
            "contention": scenario.service.contention,
        },
        "slo": {"queue_wait_p99_s": scenario.slo.queue_wait_p99_s},
        "prefetch": scenario.prefetch,
        "stats_interval_s": scenario.stats_interval_s,
        "trace": trace_file,
    });
    let mut csv = String::from("t_s,rate,service_scale\n");
    for (t, s) in scenario.trace.iter().enumerate() {
        csv.push_str(&format!("{t},{:.3},{:.3}\n", s.rate, s.service_scale));
    }
    (serde_json::to_string_pretty(&json).unwrap_or_default(), csv)
}

/// A row of the report's table: its name and how a score fills its cell.
type Row = (&'static str, fn(&Score) -> String);

fn seconds(s: Option<u32>) -> String {
    s.map_or_else(|| "-".to_owned(), |s| format!("{s} s"))
}

/// What the report is made of.
pub struct Replay<'a> {
    /// The scenario as planned.
    pub replayed: &'a Scenario,
    /// The pods as measured.
    pub measured: Measured,
    /// The node, second by second.
    pub samples: &'a [Sample],
    /// The operator's scale decisions: (second, replicas, reason).
    pub decisions: &'a [(u32, i32, String)],
    /// Commands published but not applied, or dead-lettered.
    pub lost: f64,
    /// The worker pods' CPU limit.
    pub cpu: &'a str,
}

/// The report: the node and each prediction scored alike, the pods' rate by ready count, and
/// each run's scale decisions with their reasons.
pub fn report(replay: &Replay<'_>, predictions: &[(&str, &Run)]) -> String {
    let slo = replay
        .replayed
        .slo
        .queue_wait_p99_s
        .unwrap_or(f64::INFINITY);
    let mut scores = vec![score_node(replay.samples, slo)];
    scores.extend(predictions.iter().map(|(_, run)| score_sim(run, slo)));
    let rows: [Row; 7] = [
        ("seconds over the SLO", |s| s.violation_s.to_string()),
        ("replica-seconds", |s| format!("{:.0}", s.replica_seconds)),
        ("scale actions", |s| s.scale_actions.to_string()),
        ("peak replicas", |s| s.peak.to_string()),
        ("first scale-out", |s| seconds(s.first_scale_out_s)),
        ("last change", |s| seconds(s.last_change_s)),
        ("peak backlog", |s| format!("{:.0}", s.peak_backlog)),
    ];
    let m = replay.measured;
    let mut out = format!(
        "# Replay of {} on the dev node\n\n\
         Worker pods limited to {} CPU; one applies {:.1} commands/s (calibration); the \
         operator measured a pod start-up of {:.1} s; contention measured at the most-run \
         ready count: {}. {} seconds, {:.0} commands published, {:.0} lost or dead-lettered. \
         SLO: p99 queue wait {slo} s.\n\n| | node |",
        replay.replayed.name,
        replay.cpu,
        m.per_pod_rate,
        m.startup_s,
        m.contention.map_or_else(
            || "none (no ready count above one ran saturated)".to_owned(),
            |c| { format!("σ = {c:.3}") }
        ),
        replay.samples.len(),
        replay.samples.last().map_or(0.0, |s| s.published),
        replay.lost,
    );
    for (label, _) in predictions {
        out.push_str(&format!(" {label} |"));
    }
    out.push_str("\n|---|---|");
    out.push_str(&"---|".repeat(predictions.len()));
    out.push('\n');
    for (name, cell) in rows {
        out.push_str(&format!("| {name} |"));
        for score in &scores {
            out.push_str(&format!(" {} |", cell(score)));
        }
        out.push('\n');
    }
    out.push_str(
        "\nCommands per ready pod-second while a backlog waited, by ready pods:\n\n\
         | ready pods | seconds | per pod | of the calibrated rate |\n|---|---|---|---|\n",
    );
    for (ready, secs, rate) in
        rate_per_ready_pod(replay.samples, f64::from(replay.replayed.prefetch))
    {
        out.push_str(&format!(
            "| {ready} | {secs} | {rate:.1} | {:.0} % |\n",
            100.0 * rate / m.per_pod_rate
        ));
    }
    out.push_str(
        "\nScale decisions on the node (second, replicas, reason; every decision is in \
         operator-replay.log):\n\n",
    );
    for (t, n, reason) in replay.decisions {
        out.push_str(&format!("- {t} s -> {n}: {reason}\n"));
    }
    for (label, run) in predictions {
        out.push_str(&format!("\nScale decisions, {label}:\n\n"));
        for (t, n, reason) in &run.decisions {
            out.push_str(&format!("- {t} s -> {n}: {reason}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(published: f64, applied: f64, existing: u32, ready: u32) -> Sample {
        Sample {
            published,
            applied,
            existing,
            ready,
        }
    }

    #[test]
    fn the_node_is_scored_like_the_simulator() {
        // 10 a second for 4 s, served 5 a second by one pod, a second pod from t=2.
        let samples = [
            sample(10.0, 5.0, 1, 1),
            sample(20.0, 10.0, 2, 1),
            sample(30.0, 20.0, 2, 2),
            sample(40.0, 30.0, 2, 2),
            sample(40.0, 40.0, 1, 1),
        ];
        let score = score_node(&samples, 1.0);
        assert_eq!(score.scale_actions, 2);
        assert_eq!(score.replica_seconds, 8.0);
        assert_eq!(score.peak, 2);
        assert_eq!(score.first_scale_out_s, Some(1));
        assert_eq!(score.last_change_s, Some(4));
        assert_eq!(score.peak_backlog, 10.0);
        // The first second's 10 are applied by t=1 (1 s), the second's by t=2 (1 s), the
        // third's by t=3 and the fourth's by t=4: none waits more than 1 s...
        assert_eq!(score.violation_s, 0);
        // ...and all four seconds wait longer than half a second.
        assert_eq!(score_node(&samples, 0.5).violation_s, 4);
    }

    fn replayed() -> Scenario {
        Scenario {
            name: "step".into(),
            head: Head::Worker,
            startup_s: 10,
            min_replicas: 1,
            max_replicas: 6,
            service: Service {
                per_replica_rate: Some(50.0),
                ..Service::default()
            },
            slo: Slo {
                queue_wait_p99_s: Some(30.0),
                ..Slo::default()
            },
            trace: [25.0, 150.0, 25.0]
                .into_iter()
                .map(|rate| Second {
                    rate,
                    service_scale: 1.0,
                })
                .collect(),
            prefetch: 100,
            stats_interval_s: 5,
        }
    }

    #[test]
    fn the_plan_keeps_the_load_relative_to_what_one_pod_serves() {
        assert_eq!(planned_rates(&replayed(), 20.0), vec![10.0, 60.0, 10.0]);
    }

    #[test]
    fn the_prediction_uses_the_arrivals_as_published_and_the_pods_as_measured() {
        let samples = [
            sample(9.0, 9.0, 1, 1),
            sample(70.0, 30.0, 2, 1),
            sample(80.0, 80.0, 2, 2),
        ];
        let measured = Measured {
            per_pod_rate: 21.5,
            startup_s: 4.4,
            contention: Some(0.2),
        };
        let s = predicted_scenario(&replayed(), measured, &samples, false);
        let rates: Vec<f64> = s.trace.iter().map(|s| s.rate).collect();
        assert_eq!(rates, vec![9.0, 61.0, 10.0]);
        assert_eq!(s.startup_s, 4);
        assert_eq!(s.service.per_replica_rate, Some(21.5));
        assert_eq!(s.service.contention, None);
        let contended = predicted_scenario(&replayed(), measured, &samples, true);
        assert_eq!(contended.service.contention, Some(0.2));
        assert_eq!((s.min_replicas, s.max_replicas), (1, 6));
        assert_eq!(s.slo.queue_wait_p99_s, Some(30.0));
        // The simulator runs it, one tick per sample.
        assert_eq!(predict(&s).timeline.len(), 3);
    }

    #[test]
    fn the_rate_per_pod_counts_only_saturated_seconds_at_a_steady_ready_count() {
        let samples = [
            sample(1000.0, 0.0, 1, 1),
            sample(1000.0, 50.0, 1, 1),
            sample(1000.0, 100.0, 2, 1),
            // The ready count changes: not counted.
            sample(1000.0, 180.0, 2, 2),
            sample(1000.0, 260.0, 2, 2),
            // Drained below what two pods hold: not saturated.
            sample(1000.0, 900.0, 2, 2),
        ];
        assert_eq!(
            rate_per_ready_pod(&samples, 100.0),
            vec![(1, 2, 50.0), (2, 1, 40.0)]
        );
    }

    #[test]
    fn contention_comes_from_the_most_measured_count_above_one() {
        // 4 pods at 75 % of one pod's rate: 1 / (1 + 3σ) = 0.75.
        let rates = [(1, 30, 100.0), (2, 5, 95.0), (4, 120, 75.0)];
        let sigma = contention(&rates, 100.0).unwrap();
        assert!((sigma - 1.0 / 9.0).abs() < 1e-9, "{sigma}");
        // Too few saturated seconds above one pod, or pods faster together: no contention.
        assert_eq!(contention(&[(1, 30, 100.0), (3, 9, 50.0)], 100.0), None);
        assert_eq!(contention(&[(2, 30, 120.0)], 100.0), Some(0.0));
    }

    #[test]
    fn the_predicted_scenario_files_load_back_as_the_same_scenario() {
        let dir = std::env::temp_dir().join(chimera_testenv::unique_name("replay-files"));
        std::fs::create_dir_all(&dir).unwrap();
        let s = predicted_scenario(
            &replayed(),
            Measured {
                per_pod_rate: 21.5,
                startup_s: 6.0,
                contention: Some(0.125),
            },
            &[sample(9.0, 9.0, 1, 1), sample(70.0, 30.0, 2, 1)],
            true,
        );
        let (json, csv) = scenario_files(&s, "predicted.csv");
        std::fs::write(dir.join("predicted.json"), json).unwrap();
        std::fs::write(dir.join("predicted.csv"), csv).unwrap();
        let loaded = Scenario::load(&dir.join("predicted.json")).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(loaded, s);
    }
}
