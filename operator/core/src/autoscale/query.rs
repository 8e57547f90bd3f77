//! The query law: replicas that hold a latency percentile under its target.
//!
//! Latency alone cannot size a head (it is flat until the replicas saturate, then explodes), so
//! the law learns what one replica can serve: the request rate per replica measured while the
//! latency was near or over the target (the replicas were saturated) is its capacity κ. The
//! demand λ is the completion rate plus the growth of the in-flight count (requests piling up
//! are demand not yet served: Little's law, in-flight = rate × latency). Then the head needs
//! `λ / (κ·u)` replicas, u a utilisation that keeps the percentile below the target; while the
//! percentile is over the target, at least `ready × percentile/target` (capped at 2×). Scale-out
//! is immediate; scale-in is slow and bounded: only after the smaller count has been enough for
//! a whole window, at most half at a time, and not within a cooldown of the last change.

use std::collections::VecDeque;

use super::histogram::Histogram;
use super::hysteresis::Hold;
use super::series::{Recent, fit};
use super::{Bounds, Decision, Replicas, ceil_replicas};

/// Percentiles and rates are measured over this many seconds.
const WINDOW_S: f64 = 3.0;
/// Utilisation of the measured capacity the law plans for.
const UTILISATION: f64 = 0.9;
/// A percentile above this share of the target means the replicas are saturated.
const HOT: f64 = 0.8;
/// A percentile above this share of the target means the replicas are close to saturation:
/// the first such measurement gives a capacity (a lower bound, planned at 100 %).
const WARM: f64 = 0.5;
/// Weight of a new saturated sample in the capacity estimate.
const CAPACITY_GAIN: f64 = 0.5;
/// The query head's own part of the scale-in hold, on top of the start-up: a query head has
/// no queue to absorb a return of the load, so it keeps a replica a stable half minute.
const HOLD_BUDGET_S: f64 = 30.0;
/// Fewest requests in a window for its percentile to count.
const MIN_REQUESTS: f64 = 20.0;
/// Spare servers over the busy ones, in units of their square root (square-root staffing:
/// a few replicas need proportionally more room than many).
const SPARE: f64 = 0.75;
/// The service time is the lowest mean latency of calm windows over this many seconds.
const SERVICE_TIME_WINDOW_S: f64 = 300.0;
/// Servers per replica are learned from a saturated window and the calm service time of at
/// most this many seconds before it.
const SERVERS_CALM_S: f64 = 15.0;
/// Seconds within which requests piled up beyond the target should be served.
const QUEUE_DRAIN_S: f64 = 1.0;
/// Seconds of current service times a rise is fitted over.
const TREND_S: f64 = 10.0;
/// A fitted rise counts when it adds at least this share over the trend window.
const TREND_MIN_RISE: f64 = 0.05;

/// The module's settings for its query head.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuerySettings {
    /// Replica bounds.
    pub bounds: Bounds,
    /// The percentile held, 0..1 (`spec.query.autoscale.latency.percentile` / 100).
    pub quantile: f64,
    /// Its target, in seconds.
    pub target_seconds: f64,
    /// Seconds a new replica takes to serve (measured from pods; a default until then).
    pub startup_seconds: f64,
}

impl QuerySettings {
    /// The settings of a module's query head (`spec.query`).
    pub fn for_head(spec: &crate::api::QueryHeadSpec, startup_seconds: f64) -> Self {
        Self {
            bounds: Bounds::from_spec(spec.replicas.min, spec.replicas.max),
            quantile: spec.autoscale.latency.percentile / 100.0,
            target_seconds: spec.autoscale.latency.target_ms as f64 / 1000.0,
            startup_seconds,
        }
    }
}

/// What the control plane measures about a query head at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct QuerySignals {
    /// Seconds since an arbitrary origin.
    pub now: f64,
    /// The request-duration histogram summed over the head's pods (cumulative).
    pub latency: Histogram,
    /// Requests being served now, summed over the pods.
    pub in_flight: f64,
    /// The head's replicas.
    pub replicas: Replicas,
}

/// The query law with what it has learned.
#[derive(Clone, Debug)]
pub struct QueryLaw {
    settings: QuerySettings,
    history: VecDeque<QuerySignals>,
    /// Requests per second one replica serves when saturated, and whether it was measured at
    /// saturation (or is a lower bound from near it).
    capacity: Option<f64>,
    saturated: bool,
    /// Requests one replica serves at once (capacity × service time, a pod property: its
    /// pool or its cores), once both were measured. With it the law reads the current
    /// service time and the replicas' utilisation, so a slower dependency is seen as such.
    servers: Option<f64>,
    /// Mean latency of calm windows (no queueing): the service time.
    calm_latency: Recent,
    /// Requests per second per replica of those calm windows.
    calm_rate: Recent,
    /// Requests per second per replica of recent saturated windows.
    saturated_rate: Recent,
    recommendations: Recent,
    hold: Hold,
    /// The held percentile of the last window, when it had enough requests to have one.
    percentile: Option<f64>,
    /// (time, current service time, demand) of the last [`TREND_S`], for a rising
    /// dependency.
    service_times: VecDeque<(f64, f64, f64)>,
}

impl QueryLaw {
    /// A new measure of the pods' start-up time (what was learned is kept).
    pub fn set_startup_seconds(&mut self, seconds: f64) {
        self.settings.startup_seconds = seconds;
        self.hold.set_base(seconds.max(0.0) + HOLD_BUDGET_S);
    }

    /// A law that has measured nothing yet.
    pub fn new(settings: QuerySettings) -> Self {
        let hold = Hold::new(settings.startup_seconds.max(0.0) + HOLD_BUDGET_S);
        Self {
            settings,
            history: VecDeque::new(),
            capacity: None,
            saturated: false,
            servers: None,
            calm_latency: Recent::default(),
            calm_rate: Recent::default(),
            saturated_rate: Recent::default(),
            recommendations: Recent::default(),
            hold,
            percentile: None,
            service_times: VecDeque::new(),
        }
    }

    /// Requests per second per replica measured at saturation, so far.
    pub fn capacity(&self) -> Option<f64> {
        self.capacity
    }

    /// The held percentile (e.g. p95), in seconds, of the window the last decision measured;
    /// `None` while too few requests came to have one.
    pub fn percentile(&self) -> Option<f64> {
        self.percentile
    }

    /// Learns from `s` and decides the replicas.
    pub fn decide(&mut self, s: &QuerySignals) -> Decision {
        self.percentile = None;
        self.history.push_back(s.clone());
        while self
            .history
            .front()
            .is_some_and(|h| s.now - h.now > WINDOW_S + 1e-9)
            && self.history.len() > 2
        {
            self.history.pop_front();
        }
        let current = s.replicas.existing;
        let Some(oldest) = self.history.front().filter(|h| s.now > h.now) else {
            return self.hold(s, "first measurement".to_owned(), "no data yet".to_owned());
        };
        let dt = s.now - oldest.now;
        let window = s.latency.since(&oldest.latency);
        let completions = window.total / dt;
        // Demand: completions plus the growth of the in-flight count, over the window and over
        // the last interval alone (a surge shows there first).
        let mut demand = completions + ((s.in_flight - oldest.in_flight) / dt).max(0.0);
        // The percentile of the last interval alone, as a share of the target.
        let mut last_level = None;
        if let Some(last) = self.history.iter().rev().nth(1).filter(|h| s.now > h.now) {
            let dt = s.now - last.now;
            let interval = s.latency.since(&last.latency);
            let recent = interval.total / dt + ((s.in_flight - last.in_flight) / dt).max(0.0);
            demand = demand.max(recent);
            last_level = (interval.total >= MIN_REQUESTS)
                .then(|| interval.quantile(self.settings.quantile))
                .flatten()
                .map(|p| p / self.settings.target_seconds);
        }
        let percentile = (window.total >= MIN_REQUESTS)
            .then(|| window.quantile(self.settings.quantile))
            .flatten();
        self.percentile = percentile;
        let target = self.settings.target_seconds;
        let label = format!("p{}", self.settings.quantile * 100.0);
        let signal = match percentile {
            Some(p) => format!(
                "{label} {:.0} ms (target {:.0} ms), {completions:.1} req/s, {:.1} in flight",
                p * 1000.0,
                target * 1000.0,
                s.in_flight
            ),
            None => format!("{completions:.1} req/s, too few requests for a {label}"),
        };
        // Capacity per replica.
        let ready = s.replicas.ready;
        let readies = self.history.iter().map(|h| h.replicas.ready);
        let (fewest_ready, most_ready) = (
            readies.clone().min().unwrap_or(ready),
            readies.max().unwrap_or(ready),
        );
        let level = percentile.map_or(0.0, |p| p / target);
        let mean = window.mean();
        // With the servers per replica known, the current service time: the mean latency
        // when nothing waits, the servers over the completions when everything is busy (the
        // smaller of the two is right in both regimes), and the utilisation it gives.
        let service_now = self.servers.and_then(|c| {
            let by_throughput =
                (completions > 0.0 && ready > 0).then(|| c * f64::from(ready) / completions);
            match (mean, by_throughput) {
                (Some(m), Some(t)) => Some(m.min(t)),
                (m, t) => m.or(t),
            }
        });
        let utilisation = match (self.servers, service_now) {
            (Some(c), Some(sn)) if ready > 0 => Some(demand * sn / (c * f64::from(ready))),
            _ => None,
        };
        // Saturated: the servers are busy (when their number is known), else the percentile
        // near the target. Without the first a slower dependency (latency up, load flat)
        // read as saturation and its load as capacity: one replica more at every tick.
        // A window whose last interval is calm again is the tail of a drained queue, not
        // saturation: its completions are the demand, and read as capacity they taught the
        // law that every replica was full (a head stuck at its maximum).
        let draining = last_level.is_some_and(|l| l <= WARM);
        let hot = !draining && utilisation.map_or(level > HOT, |u| u > HOT && level > WARM);
        let stable = ready > 0 && fewest_ready == most_ready && window.total >= MIN_REQUESTS;
        if most_ready > 0 && fewest_ready != most_ready && hot {
            // Saturated while replicas came or went: spread over the most replicas of the
            // window, the completions are a lower bound of what one serves. Without it a head
            // that scaled out fast, before any stable saturated window, could never scale in.
            // (A ready count that lags the pods can make it an overestimate: the next stable
            // saturated window corrects it.)
            let floor = completions / f64::from(most_ready);
            if self.capacity.is_none_or(|k| floor > k) {
                self.capacity = Some(floor);
            }
        }
        // Measured (not just bounded) only where the replicas did not change.
        if stable {
            let per_replica = completions / f64::from(ready);
            self.capacity = match self.capacity {
                None if hot => Some(per_replica),
                Some(k) if hot => Some(k + CAPACITY_GAIN * (per_replica - k)),
                None if level > WARM => Some(per_replica),
                Some(k) if level <= WARM && per_replica > k => Some(per_replica),
                other => other,
            };
            self.saturated |= hot;
            if hot {
                self.saturated_rate.push(s.now, per_replica, SERVERS_CALM_S);
            }
            if level <= WARM
                && let Some(mean) = mean
            {
                self.calm_latency.push(s.now, mean, SERVICE_TIME_WINDOW_S);
                self.calm_rate.push(s.now, per_replica, SERVERS_CALM_S);
                // Little's law: a calm replica holds per_replica × mean requests, all in
                // service; it has at least that many servers.
                self.servers = self.servers.map(|c| c.max(per_replica * mean));
            }
        }
        let service_time = self.calm_latency.min_since(s.now, SERVICE_TIME_WINDOW_S);
        // The servers: what one replica served saturated (a stable count) times the service
        // time of calm windows close to it (before or after), if the service time was that
        // one. A replica saturated by more demand serves more than it does calm (c/S beats
        // any calm rate); one saturated by a slower dependency serves as much or less, and c
        // learned from it would be c·S/S' (a dependency 3x slower reads as a third of the
        // servers: every replica then looks full and the head never scales in again).
        let window_of = |r: &Recent| r.max_since(s.now, SERVERS_CALM_S);
        if stable
            && let (Some(saturated), Some(calm_rate)) =
                (window_of(&self.saturated_rate), window_of(&self.calm_rate))
            && saturated > calm_rate
            && let Some(calm) = self.calm_latency.min_since(s.now, SERVERS_CALM_S)
        {
            let c = saturated * calm;
            self.servers = Some(
                self.servers
                    .map_or(c, |old| old + CAPACITY_GAIN * (c - old)),
            );
        }
        // A service time rising at constant demand (a dependency slowing down) keeps rising
        // while ordered pods start: plan with where it will be when they serve (at most
        // twice today's), not where it was (each step came a start-up late, over the SLO).
        let service_ahead = service_now.map(|sn| {
            self.note_service_time(s.now, sn, demand);
            let rise = self.service_rise().unwrap_or(0.0);
            sn + (rise * self.settings.startup_seconds.max(0.0)).min(sn)
        });
        // Capacity per replica: the servers over the service time planned with, once known.
        let capacity = match (self.servers, service_ahead) {
            (Some(c), Some(sn)) if sn > 0.0 => Some(c / sn),
            _ => self.capacity,
        };
        let service_time = service_ahead.or(service_time);
        let over = percentile.map_or(1.0, |p| p / target);
        // What the demand alone needs (without draining queues), for the scale-in hold: a
        // queue is drained once, it does not hold replicas afterwards.
        let mut steady = None;
        let (need, why) = match capacity {
            Some(k) if k > 0.0 => {
                // Requests beyond what the target latency holds (Little's law: a head at the
                // target holds demand × target in flight) wait in queues; more pile up until
                // replicas ordered now serve. Both must be served within QUEUE_DRAIN_S.
                let queued = (s.in_flight - demand * target).max(0.0);
                let growth = (demand - k * f64::from(ready)).max(0.0)
                    * self.settings.startup_seconds.max(0.0);
                let backlog = if queued > 0.0 || growth > 0.0 {
                    queued + growth
                } else {
                    0.0
                };
                // A capacity measured below saturation is a lower bound: planned at 100 %.
                let base = self.steady(demand, k, service_time);
                let sized = base + backlog / QUEUE_DRAIN_S / k;
                // The fraction is kept: the scale-in's room is over the measured need.
                steady = Some(base);
                let mut need = ceil_replicas(sized).max(1);
                let mut why = format!(
                    "{sized:.1} replicas serve {demand:.1} req/s and {backlog:.0} queued at {k:.1} req/s each"
                );
                if let Some(sn) = service_now {
                    why = format!("{why} (service time {:.0} ms)", sn * 1000.0);
                }
                match utilisation {
                    // Latency over the target with idle servers is the service time itself
                    // (a slow dependency): more replicas would not bring it down.
                    Some(u) if over > 1.0 && u <= HOT => {
                        why = format!(
                            "{why}; {label} over target at {:.0} % utilisation: the service time, not the replicas",
                            u * 100.0
                        );
                    }
                    _ if over > 1.0 => {
                        let pushed = ceil_replicas(f64::from(ready.max(1)) * over.min(2.0));
                        if pushed > need {
                            need = pushed;
                            why = format!("{why}; {label} over target: {need}");
                        }
                    }
                    _ => {}
                }
                (need, why)
            }
            _ if over > 1.0 => (
                ceil_replicas(f64::from(current.max(1)) * over.min(2.0)),
                format!("{label} over target before any capacity was measured"),
            ),
            _ => (
                current.max(1),
                "capacity not measured yet (latency under target)".to_owned(),
            ),
        };
        self.recommendations.push(
            s.now,
            steady.unwrap_or(f64::from(need)),
            self.hold.horizon(),
        );
        let hold = self.hold.seconds();
        let starting = s.replicas.ready < s.replicas.existing
            && self
                .hold
                .may_be_starting(s.now, self.settings.startup_seconds);
        let waits = starting && need > current && s.replicas.waits_for_starting(need);
        let desired = if waits {
            // Each order is a pod started: while the last is on its way, only a need well
            // beyond it orders again (a cold start ordered 11, 12, 14, 15, 16, 22 on six
            // consecutive ticks).
            current
        } else if need >= current {
            need
        } else if starting {
            // Ordered pods are still starting: cancelling them now wastes the start-up when
            // the need returns (a latency spike ordered 20, the next tick's 12 removed 8
            // starting pods, and they were ordered again 45 s later).
            current
        } else {
            // Scale in, in one step, to what has been enough for the whole hold.
            self.hold
                .scale_in(
                    &self.recommendations,
                    s.now,
                    current,
                    self.settings.startup_seconds,
                )
                .unwrap_or(current)
                .max(need)
                .min(current)
        };
        let bounded = self.settings.bounds.clamp(desired);
        let reason = match (bounded == desired, desired.cmp(&need)) {
            (false, _) => format!("{why}; bounded to {bounded} by replicas.min/max"),
            (true, std::cmp::Ordering::Less) => format!(
                "{why}; {} replicas still starting, waiting for them before ordering {need}",
                s.replicas.starting()
            ),
            (true, std::cmp::Ordering::Greater) => {
                format!("{why}; holding {desired} until {need} has been enough for {hold:.0} s")
            }
            _ => why,
        };
        self.hold.changed(s.now, current, bounded);
        Decision {
            desired: bounded,
            reason,
            signal,
            throughput_limit: None,
        }
    }

    /// Replicas for `demand` at `capacity` per replica: with the service time known, busy
    /// servers (Little's law: demand × service time) plus SPARE × their square root, spread over
    /// the servers a replica has (capacity × service time); otherwise a fixed utilisation (100 %
    /// of a capacity measured below saturation, which is a lower bound).
    fn note_service_time(&mut self, now: f64, service: f64, demand: f64) {
        self.service_times.push_back((now, service, demand));
        while self
            .service_times
            .front()
            .is_some_and(|(t, _, _)| now - t > TREND_S)
        {
            self.service_times.pop_front();
        }
    }

    /// Seconds of service time gained per second over the trend window while the demand
    /// stayed flat; `None` unless it rose by a clear share. (Under rising demand the mean
    /// latency rises with queueing alone: that is the demand's to size, not a dependency's.)
    fn service_rise(&self) -> Option<f64> {
        if self.service_times.len() < 5 {
            return None;
        }
        let (demand_slope, demand) = fit(self.service_times.iter().map(|(t, _, d)| (*t, *d)))?;
        if demand_slope.abs() * TREND_S > TREND_MIN_RISE * demand {
            return None;
        }
        let (slope, service) = fit(self.service_times.iter().map(|(t, s, _)| (*t, *s)))?;
        (slope * TREND_S > TREND_MIN_RISE * service).then_some(slope)
    }

    fn steady(&self, demand: f64, capacity: f64, service_time: Option<f64>) -> f64 {
        match service_time.filter(|s| *s > 0.0) {
            Some(s) => {
                let busy = demand * s;
                (busy + SPARE * busy.sqrt()) / (capacity * s)
            }
            None if self.saturated => demand / (capacity * UTILISATION),
            None => demand / capacity,
        }
    }

    fn hold(&self, s: &QuerySignals, reason: String, signal: String) -> Decision {
        let desired = self.settings.bounds.clamp(s.replicas.existing);
        Decision {
            desired,
            reason,
            signal,
            throughput_limit: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: [f64; 8] = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0];

    fn settings() -> QuerySettings {
        QuerySettings {
            bounds: Bounds { min: 1, max: 40 },
            quantile: 0.95,
            target_seconds: 0.1,
            startup_seconds: 8.0,
        }
    }

    struct Feed {
        law: QueryLaw,
        hist: Histogram,
        t: f64,
    }

    impl Feed {
        fn new() -> Self {
            Self {
                law: QueryLaw::new(settings()),
                hist: Histogram::empty(&B),
                t: 0.0,
            }
        }

        /// 4 replicas that learned 2 servers each (100 req/s at 20 ms): calm, saturated,
        /// calm again.
        fn with_two_servers_per_replica() -> Self {
            let mut f = Self::new();
            for (seconds, rate, latency, in_flight) in [
                (10, 200.0, 0.02, 4.0),
                (5, 400.0, 0.09, 36.0),
                (10, 200.0, 0.02, 4.0),
            ] {
                for _ in 0..seconds {
                    f.second(rate, latency, in_flight, 4);
                }
            }
            f
        }

        /// One second of `rate` requests at `latency` seconds, with `replicas`.
        fn second(&mut self, rate: f64, latency: f64, in_flight: f64, replicas: u32) -> Decision {
            let replicas = Replicas {
                existing: replicas,
                ready: replicas,
            };
            self.second_of(rate, latency, in_flight, replicas)
        }

        /// One second with some of the replicas still starting.
        fn second_of(
            &mut self,
            rate: f64,
            latency: f64,
            in_flight: f64,
            replicas: Replicas,
        ) -> Decision {
            self.t += 1.0;
            self.hist.observe_n(latency, rate);
            self.law.decide(&QuerySignals {
                now: self.t,
                latency: self.hist.clone(),
                in_flight,
                replicas,
            })
        }
    }

    /// The law has learned about 2 servers per replica.
    fn assert_two_servers(f: &Feed, why: &str) {
        assert!(
            f.law.servers.is_some_and(|c| (c - 2.0).abs() < 0.5),
            "{why}: {:?}",
            f.law.servers
        );
    }

    #[test]
    fn holds_while_healthy_and_nothing_is_known() {
        let mut f = Feed::new();
        for _ in 0..10 {
            let d = f.second(100.0, 0.02, 2.0, 2);
            assert_eq!(d.desired, 2, "{}", d.reason);
        }
        assert!(
            f.law.capacity().is_none(),
            "no capacity is learned far from saturation"
        );
    }

    #[test]
    fn the_held_percentile_is_the_last_windows_and_absent_at_a_trickle() {
        let mut f = Feed::new();
        f.second(100.0, 0.02, 2.0, 2);
        assert_eq!(f.law.percentile(), None, "one measurement has no window");
        f.second(100.0, 0.02, 2.0, 2);
        let p = f.law.percentile().unwrap();
        assert!(p > 0.01 && p <= 0.02, "{p}");
        for _ in 0..4 {
            f.second(100.0, 0.4, 2.0, 2);
        }
        let p = f.law.percentile().unwrap();
        assert!(p > 0.2 && p <= 0.5, "slow requests move it: {p}");
        for _ in 0..4 {
            f.second(1.0, 0.4, 0.0, 2);
        }
        assert_eq!(f.law.percentile(), None, "too few requests for a p95");
    }

    #[test]
    fn saturation_teaches_capacity_and_scales_out() {
        let mut f = Feed::new();
        let mut d = f.second(400.0, 0.3, 120.0, 2);
        for _ in 0..4 {
            d = f.second(400.0, 0.3, 120.0, 2);
        }
        // 200 req/s per replica at saturation; 400 req/s need 400/(200·0.9) -> 3, and the
        // percentile at 3× the target pushes to 2× the ready replicas.
        assert!(d.desired >= 4, "{} {}", d.desired, d.reason);
        let k = f.law.capacity().unwrap();
        assert!((k - 200.0).abs() < 1.0, "{k}");
    }

    #[test]
    fn a_dependency_slowing_down_is_planned_a_start_up_ahead() {
        // Flat demand, the service time rising 20 -> 40 ms over 10 s, against a head that
        // was at 40 ms all along: the rising one plans for where it will be.
        let mut rising = Feed::with_two_servers_per_replica();
        let mut flat = Feed::with_two_servers_per_replica();
        let (mut r, mut f) = (None, None);
        for i in 1..=10 {
            let latency = 0.02 + 0.002 * f64::from(i);
            r = Some(rising.second(200.0, latency, 200.0 * latency, 4));
        }
        // (long enough at 40 ms that its step up has left the trend window)
        for _ in 0..20 {
            f = Some(flat.second(200.0, 0.04, 8.0, 4));
        }
        assert!(rising.law.service_rise().is_some_and(|x| x > 0.001));
        assert_eq!(flat.law.service_rise(), None);
        let (r, f) = (r.unwrap(), f.unwrap());
        assert!(r.desired > f.desired, "{} vs {}", r.reason, f.reason);
    }

    #[test]
    fn latency_rising_with_the_demand_is_not_a_slower_dependency() {
        let mut f = Feed::with_two_servers_per_replica();
        for i in 1..=10 {
            // Queueing: the latency grows with the load.
            let rate = 200.0 + 20.0 * f64::from(i);
            let latency = 0.02 + 0.002 * f64::from(i);
            f.second(rate, latency, rate * latency, 4);
        }
        assert_eq!(f.law.service_rise(), None);
    }

    #[test]
    fn ordered_replicas_are_not_cancelled_while_they_start() {
        let mut f = Feed::with_two_servers_per_replica();
        // Saturated: the percentile over target pushes beyond what the demand needs; calm
        // again the next seconds, while the ordered pods start: held while they may be
        // starting (two start-ups of 8 s; here the hold alone would too), and pods not Ready
        // after that are stuck, not starting: they do not hold the head up.
        let mut out = f.second(400.0, 0.09, 36.0, 4);
        for _ in 0..3 {
            out = f.second(400.0, 0.3, 120.0, 4);
        }
        let n = out.desired;
        assert!(n > 4, "{}", out.reason);
        let starting = Replicas {
            existing: n,
            ready: 4,
        };
        let mut seen = Vec::new();
        for t in 1..=120 {
            let d = f.second_of(200.0, 0.02, 4.0, starting);
            if t < 16 {
                assert_eq!(d.desired, n, "t={t}: {}", d.reason);
            }
            seen.push(d.desired);
        }
        assert!(
            seen.iter().any(|d| *d < n),
            "stuck pods hold forever: {seen:?}"
        );
    }

    #[test]
    fn scale_in_waits_for_the_hold_then_takes_one_step() {
        let mut f = Feed::new();
        // Learn a capacity of 100 req/s per replica at saturation.
        for _ in 0..5 {
            f.second(1000.0, 0.15, 20.0, 10);
        }
        // The load drops.
        for _ in 0..5 {
            f.second(100.0, 0.02, 2.0, 10);
        }
        let mut seen = Vec::new();
        for _ in 0..120 {
            let d = f.second(100.0, 0.02, 2.0, *seen.last().unwrap_or(&10));
            seen.push(d.desired);
        }
        // The hold is the start-up (8 s) and the query head's 30 s.
        assert!(seen[..25].iter().all(|n| *n == 10), "holds first: {seen:?}");
        assert!(*seen.last().unwrap() <= 3, "{seen:?}");
        let changes = seen.windows(2).filter(|w| w[1] != w[0]).count();
        assert_eq!(changes, 1, "one scale-in, not a staircase: {seen:?}");
        for w in seen.windows(2) {
            assert!(w[1] <= w[0], "never up while the load is flat: {seen:?}");
        }
    }

    #[test]
    fn a_slower_dependency_at_the_same_load_is_seen_within_seconds() {
        // 4 replicas of 2 servers each (100 req/s each at 20 ms), learned at saturation.
        let mut f = Feed::with_two_servers_per_replica();
        assert_two_servers(&f, "learned");
        // The same 200 req/s, now 60 ms each (a slow dependency): 12 busy servers of 8.
        let mut first_out = None;
        let mut d = None;
        for i in 0..5 {
            let now = f.second(200.0, 0.06, 12.0, 4);
            if now.desired > 4 && first_out.is_none() {
                first_out = Some(i);
            }
            d = Some(now);
        }
        let i = first_out.expect("scales out on the service time");
        let d = d.unwrap();
        assert!(i <= 2, "within seconds: tick {i}: {}", d.reason);
        // Once the window holds only slow requests.
        assert!(
            d.desired >= 6,
            "12 busy servers at 2 each: {} ({})",
            d.desired,
            d.reason
        );
        assert!(d.reason.contains("service time"), "{}", d.reason);
    }

    #[test]
    fn latency_from_the_service_time_alone_does_not_push_replicas() {
        // Learned as above, then every request takes 150 ms (over the 100 ms target) but only
        // a few come: the servers are idle, more replicas would not help.
        let mut f = Feed::with_two_servers_per_replica();
        let mut d = f.second(20.0, 0.15, 3.0, 4);
        for _ in 0..5 {
            d = f.second(20.0, 0.15, 3.0, 4);
        }
        assert!(d.desired <= 4, "{} ({})", d.desired, d.reason);
        assert!(d.reason.contains("not the replicas"), "{}", d.reason);
    }

    #[test]
    fn a_fast_scale_out_still_learns_enough_to_scale_in() {
        // Pods serve 100 req/s each, 250 req/s are offered, and every second brings new ready
        // replicas (which serve a second later): no window sees a stable saturated count.
        let mut f = Feed::new();
        // The first ready count lags the pods (the Deployment's status is written later).
        for (ready, serving) in [(0, 1), (1, 1), (2, 1), (4, 2), (6, 4), (6, 6)] {
            let served = (100.0 * f64::from(serving)).min(250.0);
            let latency = if served < 250.0 { 0.3 } else { 0.01 };
            f.second(served, latency, 250.0 * latency, ready);
        }
        let k = f
            .law
            .capacity()
            .expect("a lower bound from the saturated windows");
        assert!(k > 0.0 && k <= 100.0, "a lower bound: {k}");
        // The load falls to what one pod serves: the head scales in.
        let mut replicas = 6;
        for _ in 0..90 {
            replicas = f.second(50.0, 0.01, 0.5, replicas).desired;
        }
        assert!(replicas < 6, "{replicas}");
    }

    #[test]
    fn servers_are_learned_from_a_calm_window_after_the_first_saturation() {
        // A cold start: saturated before anything calm was seen (100 req/s per replica),
        // then calm at 20 ms: 2 servers per replica.
        let mut f = Feed::new();
        for _ in 0..5 {
            f.second(400.0, 0.09, 36.0, 4);
        }
        assert!(f.law.servers.is_none(), "no calm service time yet");
        for _ in 0..5 {
            f.second(200.0, 0.02, 4.0, 4);
        }
        assert_two_servers(&f, "learned");
    }

    #[test]
    fn a_slower_dependency_teaches_no_fewer_servers_and_the_head_scales_in_after_it() {
        let mut f = Feed::with_two_servers_per_replica();
        // 60 ms per request at the same 200 req/s: 4 replicas of 2 servers serve 133 req/s
        // and requests pile up. Per replica they serve less than they did calm: the servers
        // were not fewer, the dependency is slower.
        for _ in 0..5 {
            f.second(133.0, 0.4, 60.0, 4);
        }
        assert_two_servers(&f, "not learned from a slow dependency");
        // Scaled out to 12, the queue gone, still 60 ms: 12 busy servers need 6 replicas
        // (with room), not 12 (which is what reading the throughput as capacity would hold).
        let mut replicas = 12;
        for _ in 0..120 {
            replicas = f.second(200.0, 0.06, 12.0, replicas).desired;
        }
        assert!((6..=10).contains(&replicas), "{replicas}");
    }
}
