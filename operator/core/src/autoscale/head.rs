//! One autoscaler per head: its law, what the law has learned, and the one way a head holds
//! its replicas when a signal is missing. The operator, `chimera up` and the simulator drive
//! these same types; only where the signals come from differs.

use std::fmt::Display;

use super::exposition::Scrape;
use super::histogram::Histogram;
use super::query::{QueryLaw, QuerySettings, QuerySignals};
use super::signals::{MergedLatency, QueueSample};
use super::worker::{WorkerLaw, WorkerSettings, WorkerSignals};
use super::{Bounds, Decision, Replicas};

/// A decision, and whether it was made without fresh signals (a hold).
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The decision.
    pub decision: Decision,
    /// True when the signals were missing and the replicas are held.
    pub stale: bool,
}

/// No signal: keep the replicas that exist (never scale on no data), but not below the floor,
/// so a head that has none yet gets its first.
fn hold(replicas: Replicas, bounds: Bounds, why: &dyn Display) -> Outcome {
    Outcome {
        decision: Decision::hold(replicas.existing.max(bounds.min), &why.to_string()),
        stale: true,
    }
}

/// The autoscaler of a worker head.
#[derive(Clone, Debug)]
pub struct WorkerAutoscaler {
    settings: WorkerSettings,
    law: WorkerLaw,
}

impl WorkerAutoscaler {
    /// Whether the head could go to zero now, so the outbox rows of its pods matter: it may
    /// (`replicas.min` 0), it has replicas, and its queue is empty.
    pub fn outbox_matters(&self, sample: &QueueSample, replicas: Replicas) -> bool {
        self.settings.bounds.min == 0
            && replicas.existing > 0
            && sample.ready + sample.unacked <= 0.0
    }

    /// An autoscaler that has measured nothing yet.
    pub fn new(settings: WorkerSettings) -> Self {
        Self {
            settings,
            law: WorkerLaw::new(settings),
        }
    }

    /// The settings it runs with.
    pub fn settings(&self) -> WorkerSettings {
        self.settings
    }

    /// Takes `settings` from an edited spec: what the law learned is kept when they are the
    /// same, and dropped when they changed (bounds, targets). A new measure of the pods'
    /// start-up time is taken as it comes, without forgetting. True when it started afresh.
    pub fn reconfigure(&mut self, settings: WorkerSettings) -> bool {
        let startup = settings.startup_seconds;
        let same_spec = WorkerSettings {
            startup_seconds: self.settings.startup_seconds,
            ..settings
        } == self.settings;
        if same_spec {
            self.settings.startup_seconds = startup;
            self.law.set_startup_seconds(startup);
            return false;
        }
        *self = Self::new(settings);
        true
    }

    /// Decides on the signals of this moment.
    pub fn decide(&mut self, signals: &WorkerSignals) -> Decision {
        self.law.decide(signals)
    }

    /// Decides on a queue sample (and the outbox rows of the head's pods, when read), or holds
    /// when the queue could not be read.
    pub fn decide_sample<E: Display>(
        &mut self,
        now: f64,
        sample: Result<&QueueSample, E>,
        replicas: Replicas,
        outbox_rows: Option<f64>,
    ) -> Outcome {
        match sample {
            Ok(s) => Outcome {
                decision: self.law.decide(&WorkerSignals {
                    now,
                    ready_messages: s.ready,
                    unacked_messages: s.unacked,
                    acked_total: s.acked_total,
                    replicas,
                    outbox_rows,
                }),
                stale: false,
            },
            Err(why) => hold(replicas, self.settings.bounds, &why),
        }
    }
}

/// The autoscaler of a query head, with the head's latency merged over its pods.
#[derive(Clone, Debug)]
pub struct QueryAutoscaler {
    settings: QuerySettings,
    law: QueryLaw,
    merged: MergedLatency,
}

impl QueryAutoscaler {
    /// An autoscaler that has measured nothing yet.
    pub fn new(settings: QuerySettings) -> Self {
        Self {
            settings,
            law: QueryLaw::new(settings),
            merged: MergedLatency::default(),
        }
    }

    /// The settings it runs with.
    pub fn settings(&self) -> QuerySettings {
        self.settings
    }

    /// As [`WorkerAutoscaler::reconfigure`].
    pub fn reconfigure(&mut self, settings: QuerySettings) -> bool {
        let startup = settings.startup_seconds;
        let same_spec = QuerySettings {
            startup_seconds: self.settings.startup_seconds,
            ..settings
        } == self.settings;
        if same_spec {
            self.settings.startup_seconds = startup;
            self.law.set_startup_seconds(startup);
            return false;
        }
        *self = Self::new(settings);
        true
    }

    /// Decides on the signals of this moment (the head's cumulative histogram already merged).
    pub fn decide(&mut self, signals: &QuerySignals) -> Decision {
        self.law.decide(signals)
    }

    /// The held percentile the last decision measured, in seconds (see [`QueryLaw::percentile`]).
    pub fn percentile(&self) -> Option<f64> {
        self.law.percentile()
    }

    /// Decides on one round of the pods' scrapes (keyed by pod), or holds when none could be
    /// read. Also returns the merged histogram it decided on, for whoever shows percentiles.
    pub fn decide_scrapes<E: Display>(
        &mut self,
        now: f64,
        scrapes: Result<&[(String, Scrape)], E>,
        replicas: Replicas,
    ) -> (Outcome, Option<Histogram>) {
        let bounds = self.settings.bounds;
        let scrapes = match scrapes {
            Ok(s) => s,
            Err(why) => return (hold(replicas, bounds, &why), None),
        };
        let Some((latency, in_flight)) = self.merged.update(scrapes) else {
            return (hold(replicas, bounds, &"no pod answered"), None);
        };
        let decision = self.law.decide(&QuerySignals {
            now,
            latency: latency.clone(),
            in_flight,
            replicas,
        });
        (
            Outcome {
                decision,
                stale: false,
            },
            Some(latency),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker_settings(min: u32) -> WorkerSettings {
        WorkerSettings {
            bounds: Bounds { min, max: 8 },
            drain_seconds: 30.0,
            startup_seconds: 5.0,
            prefetch: 10,
        }
    }

    fn query_settings() -> QuerySettings {
        QuerySettings {
            bounds: Bounds { min: 1, max: 8 },
            quantile: 0.95,
            target_seconds: 0.15,
            startup_seconds: 5.0,
        }
    }

    #[test]
    fn a_missing_signal_holds_the_replicas_but_not_below_the_floor() {
        let mut worker = WorkerAutoscaler::new(worker_settings(0));
        let replicas = Replicas {
            existing: 3,
            ready: 3,
        };
        let out = worker.decide_sample(1.0, Err::<&QueueSample, _>("broker down"), replicas, None);
        assert!(out.stale);
        assert_eq!(out.decision.desired, 3);
        assert!(
            out.decision.reason.contains("broker down"),
            "{:?}",
            out.decision
        );
        let mut query = QueryAutoscaler::new(query_settings());
        let none = Replicas::default();
        let (out, latency) = query.decide_scrapes(1.0, Ok::<_, &str>(&[]), none);
        assert!(out.stale && latency.is_none());
        assert_eq!(
            out.decision.desired, 1,
            "a query head with none gets its first"
        );
    }

    #[test]
    fn a_backlog_is_decided_on_not_held() {
        let mut worker = WorkerAutoscaler::new(worker_settings(0));
        let sample = QueueSample {
            ready: 200.0,
            unacked: 0.0,
            acked_total: 0.0,
            consumers: 0,
        };
        let out = worker.decide_sample(1.0, Ok::<_, &str>(&sample), Replicas::default(), None);
        assert!(!out.stale);
        assert!(out.decision.desired >= 1, "{:?}", out.decision);
    }

    #[test]
    fn reconfiguring_keeps_what_was_learned_unless_the_settings_changed() {
        let mut worker = WorkerAutoscaler::new(worker_settings(0));
        assert!(!worker.reconfigure(worker_settings(0)));
        assert!(worker.reconfigure(worker_settings(1)));
        assert_eq!(worker.settings().bounds.min, 1);
        let mut query = QueryAutoscaler::new(query_settings());
        assert!(!query.reconfigure(query_settings()));
        let mut tighter = query_settings();
        tighter.target_seconds = 0.1;
        assert!(query.reconfigure(tighter));
    }

    #[test]
    fn a_new_start_up_measure_is_taken_without_forgetting() {
        let mut worker = WorkerAutoscaler::new(worker_settings(0));
        let mut measured = worker_settings(0);
        measured.startup_seconds = 1.5;
        assert!(!worker.reconfigure(measured), "kept what it learned");
        assert_eq!(worker.settings().startup_seconds, 1.5);
        let mut query = QueryAutoscaler::new(query_settings());
        let mut measured = query_settings();
        measured.startup_seconds = 2.5;
        assert!(!query.reconfigure(measured));
        assert_eq!(query.settings().startup_seconds, 2.5);
    }

    #[test]
    fn scrapes_are_merged_into_one_decision() {
        let mut query = QueryAutoscaler::new(query_settings());
        let scrape = |n: f64| {
            let mut latency = Histogram::empty(&[0.1, 1.0]);
            latency.observe_n(0.05, n);
            Scrape {
                latency,
                in_flight: 1.0,
            }
        };
        let replicas = Replicas {
            existing: 2,
            ready: 2,
        };
        let (out, latency) = query.decide_scrapes(
            1.0,
            Ok::<_, &str>(&[
                ("a".to_owned(), scrape(10.0)),
                ("b".to_owned(), scrape(5.0)),
            ]),
            replicas,
        );
        assert!(!out.stale);
        assert_eq!(latency.map(|h| h.total), Some(15.0));
    }
}
