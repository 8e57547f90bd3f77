//! The worker law: replicas from queue depth, arrival rate and the service rate measured from
//! acks.
//!
//! With λ the arrival rate, μ the rate one replica acks at, B the backlog (ready + unacked) and
//! T the drain target, the head needs `λ/μ` replicas to keep up with arrivals and `B/(μ·T')` to
//! handle what is queued within T' (the queue is FIFO: the newest message waits for exactly
//! that), whichever is more. T' leaves room for the pods' start-up: the backlog keeps growing
//! until new replicas serve, so that growth is counted in B and the start-up subtracted from T.
//! Scale-out is immediate (scale from zero too); scale-in waits until the smaller count has been
//! enough for the hold (start-up plus drain target, longer for loads that come back: see
//! [`super::hysteresis`]) and never drops below what the unacked messages need.

use std::collections::VecDeque;

use super::hysteresis::Hold;
use super::scalability::Scalability;
use super::series::{Counter, Recent};
use super::{Bounds, Decision, Replicas, ceil_replicas};

/// Rates (arrivals) are measured over this many seconds.
const RATE_WINDOW_S: f64 = 5.0;
/// Spare capacity over the arrival rate, for noise.
const HEADROOM: f64 = 0.05;
/// Share of the drain target the law plans to use (the rest is margin).
const DRAIN_MARGIN: f64 = 0.8;
/// Seconds without any work before a head allowed to scale to zero does.
const IDLE_TO_ZERO_S: f64 = 30.0;
/// Weight of a new saturated sample in the service-rate estimate.
const SERVICE_RATE_GAIN: f64 = 0.3;

/// The module's settings for its worker head.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WorkerSettings {
    /// Replica bounds.
    pub bounds: Bounds,
    /// Seconds within which the backlog should be drained (`spec.worker.autoscale.drainSeconds`).
    pub drain_seconds: f64,
    /// Seconds a new replica takes to serve (measured from pods; a default until then).
    pub startup_seconds: f64,
    /// Messages one replica holds unacknowledged (`spec.worker.prefetch`).
    pub prefetch: u32,
}

impl WorkerSettings {
    /// The settings of a module's worker head (`spec.worker`).
    pub fn for_head(spec: &crate::api::WorkerHeadSpec, startup_seconds: f64) -> Self {
        Self {
            bounds: Bounds::from_spec(spec.replicas.min, spec.replicas.max),
            drain_seconds: spec.autoscale.drain_seconds as f64,
            startup_seconds,
            prefetch: u32::try_from(spec.prefetch).unwrap_or(1),
        }
    }
}

/// What the control plane measures about a worker head at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WorkerSignals {
    /// Seconds since an arbitrary origin.
    pub now: f64,
    /// Messages waiting in the worker queue.
    pub ready_messages: f64,
    /// Messages delivered to consumers and not yet acknowledged.
    pub unacked_messages: f64,
    /// Messages acknowledged so far (a counter).
    pub acked_total: f64,
    /// The head's replicas.
    pub replicas: Replicas,
    /// Outbox rows its pods have not sent yet (`chimera_outbox_pending_rows`); `None` when
    /// they could not be read. Read only when the head could go to zero: it never does while
    /// rows wait (the relay runs in its pods) or while they are unknown.
    pub outbox_rows: Option<f64>,
}

/// Since the ack counter last moved.
#[derive(Clone, Copy, Debug)]
struct AckMark {
    /// When it moved, and to what.
    at: f64,
    acked: f64,
    /// Fewest ready replicas and least backlog seen since.
    fewest_ready: u32,
    least_backlog: f64,
    /// Ready replica-seconds since (each tick's ready count over the interval after it: the
    /// acks a counter shows at a tick were done before it).
    ready_seconds: f64,
    /// The last tick, and its ready count.
    last: f64,
    last_ready: u32,
}

impl AckMark {
    fn new(s: &WorkerSignals, acked: f64, backlog: f64) -> Self {
        Self {
            at: s.now,
            acked,
            fewest_ready: s.replicas.ready,
            least_backlog: backlog,
            ready_seconds: 0.0,
            last: s.now,
            last_ready: s.replicas.ready,
        }
    }
}

/// The worker law with what it has learned so far (rates, the service rate, recent advice).
#[derive(Clone, Debug)]
pub struct WorkerLaw {
    settings: WorkerSettings,
    /// Acks so far, monotonic across counter resets (a restarted broker or queue).
    acked: Counter,
    /// (time, backlog, acks so far) of recent measurements, for arrival rates.
    samples: VecDeque<(f64, f64, f64)>,
    /// Since the ack counter last moved.
    /// Broker statistics refresh every few seconds, so rates are measured between changes.
    ack_mark: Option<AckMark>,
    /// Messages per second one replica acks when it has work waiting.
    service_rate: Option<f64>,
    /// Whether that rate was measured with work waiting (otherwise it is a lower bound).
    service_rate_measured: bool,
    recommendations: Recent,
    hold: Hold,
    last_work_at: Option<f64>,
    /// Saturated throughput per replica count: where more replicas stop helping.
    scalability: Scalability,
}

impl WorkerLaw {
    /// A new measure of the pods' start-up time (what was learned is kept).
    pub fn set_startup_seconds(&mut self, seconds: f64) {
        self.settings.startup_seconds = seconds;
        self.hold.set_base(hold_base(&self.settings));
    }

    /// A law that has measured nothing yet.
    pub fn new(settings: WorkerSettings) -> Self {
        let hold = Hold::new(hold_base(&settings));
        Self {
            settings,
            acked: Counter::new(120.0),
            samples: VecDeque::new(),
            ack_mark: None,
            service_rate: None,
            service_rate_measured: false,
            recommendations: Recent::default(),
            hold,
            last_work_at: None,
            scalability: Scalability::default(),
        }
    }

    /// The per-replica service rate measured so far.
    pub fn service_rate(&self) -> Option<f64> {
        self.service_rate
    }

    /// Learns from `s` and decides the replicas.
    pub fn decide(&mut self, s: &WorkerSignals) -> Decision {
        let backlog = (s.ready_messages + s.unacked_messages).max(0.0);
        self.acked.push(s.now, s.acked_total);
        let acked = self.acked.latest().unwrap_or(0.0);
        self.samples.push_back((s.now, backlog, acked));
        while self
            .samples
            .front()
            .is_some_and(|(t, _, _)| s.now - t > 120.0)
        {
            self.samples.pop_front();
        }
        self.learn_service_rate(s, backlog, acked);
        let arrivals = self.arrivals(s.now);
        // Idle time counts from the first measurement, or the last work seen.
        let outbox = s.outbox_rows.unwrap_or(0.0);
        if backlog > 0.0 || arrivals > 0.0 || outbox > 0.0 || self.last_work_at.is_none() {
            self.last_work_at = Some(s.now);
        }
        let current = s.replicas.existing;
        let signal = format!(
            "backlog {backlog:.0} (ready {:.0}, unacked {:.0}), arrivals {arrivals:.1}/s",
            s.ready_messages, s.unacked_messages
        );
        let (need, steady, why) = self.need(s, backlog, arrivals);
        let (need, why) = self.absorb(s, backlog, arrivals, need, why);
        let limit = self.scalability.limit(self.settings.bounds.max);
        // Whether the limit binds: more would be needed than the gain allows.
        let at_limit = limit.is_some_and(|l| need > l);
        let (need, why) = match limit {
            Some(l) if at_limit => (l, self.limited(l, need, why)),
            _ => (need, why),
        };
        // The scale-in hold follows what the arrivals alone need: a queue is drained once, it
        // does not hold replicas afterwards (the current need is a floor of any scale-in).
        self.recommendations
            .push(s.now, steady.min(f64::from(need)), self.hold.horizon());
        let hold = self.hold.seconds();
        let (desired, why) = if need > current {
            self.scale_out(s, need, why)
        } else if need == current {
            (need, why)
        } else {
            // Scale in only to what has been enough for the whole hold, and not below
            // what the messages being handled need.
            let startup = self.settings.startup_seconds;
            let recent = self
                .hold
                .scale_in(&self.recommendations, s.now, current, startup)
                .unwrap_or(current);
            // At a binding throughput limit every replica is full and always will be: its
            // unacked messages go back to the queue when it stops, for the others.
            let holding = if at_limit {
                0
            } else {
                ceil_replicas(s.unacked_messages / f64::from(self.settings.prefetch.max(1)))
            };
            let floor = recent.max(holding).max(need);
            if s.replicas.ready < s.replicas.existing && self.hold.may_be_starting(s.now, startup) {
                (
                    current,
                    format!("{why}; holding {current} while ordered replicas start"),
                )
            } else if floor >= current {
                (
                    current,
                    format!(
                        "{why}; holding {current} until {need} has been enough for {hold:.0} s"
                    ),
                )
            } else {
                (floor, format!("{why}; scaling in"))
            }
        };
        let bounded = self.settings.bounds.clamp(desired);
        let reason = if bounded == desired {
            why
        } else {
            format!("{why}; bounded to {bounded} by replicas.min/max")
        };
        self.hold.changed(s.now, current, bounded);
        Decision {
            desired: bounded,
            reason,
            signal,
            throughput_limit: limit,
        }
    }

    /// Why the need is capped at `limit`: the throughput measured at each replica count stops
    /// growing there (a shared database or lock saturates), so more replicas would add pods
    /// and contention, not messages handled.
    fn limited(&self, limit: u32, need: u32, why: String) -> String {
        let best = self
            .scalability
            .best()
            .map(|(n, x)| format!(", the most measured {x:.0}/s at {n}"))
            .unwrap_or_default();
        format!(
            "{why}; but throughput stops growing beyond {limit} replicas (measured at saturation{best}): {limit}, not {need}"
        )
    }

    /// Keeps the current replicas when they handle what is coming within the drain target:
    /// if arrivals stay at today's rate until a replica ordered now could serve, the newest
    /// message would still wait less than the target behind the replicas there are (ready and
    /// starting). A spike shorter than that is absorbed by the queue, which is what the
    /// target's budget is for, instead of two pods started and stopped; a load that lasts
    /// fills the queue and orders replicas a few seconds later, still in time.
    fn absorb(
        &self,
        s: &WorkerSignals,
        backlog: f64,
        arrivals: f64,
        need: u32,
        why: String,
    ) -> (u32, String) {
        let current = s.replicas.existing;
        let Some(mu) = self.service_rate.filter(|mu| *mu > 0.0) else {
            return (need, why);
        };
        if need <= current || s.replicas.ready == 0 {
            return (need, why);
        }
        let startup = self.settings.startup_seconds.max(0.0);
        let ready = mu * f64::from(s.replicas.ready);
        let coming = mu * f64::from(current);
        let projected = backlog + (arrivals - ready).max(0.0) * startup;
        // FIFO: the newest message waits for what is ahead of it, served at the capacity
        // coming; what arrives after it does not delay it. If arrivals outrun that capacity
        // the queue grows and the next tick's projection orders (within the drain target);
        // ordering at once instead doubled the scale actions on bursty loads for no fewer
        // violations.
        let wait = projected / coming;
        let target = self.settings.drain_seconds * DRAIN_MARGIN;
        if wait <= target {
            (
                current,
                format!(
                    "{why}; but {current} replicas drain {projected:.0} messages within {wait:.0} s (target {target:.0} s): holding"
                ),
            )
        } else {
            (need, why)
        }
    }

    /// A scale-out to `need`, unless replicas ordered earlier are still starting and cover
    /// most of it: each order is a pod started, so while the last order is on its way only a
    /// need well beyond it (a quarter more) orders again. What the starting replicas will serve
    /// is already counted as coming (the growth until they serve is in the need).
    fn scale_out(&self, s: &WorkerSignals, need: u32, why: String) -> (u32, String) {
        let current = s.replicas.existing;
        let starting = s.replicas.starting();
        if s.replicas.waits_for_starting(need)
            && self
                .hold
                .may_be_starting(s.now, self.settings.startup_seconds)
        {
            (
                current,
                format!(
                    "{why}; {starting} replicas still starting, waiting for them before ordering {need}"
                ),
            )
        } else {
            (need, why)
        }
    }

    /// Messages per second that entered the queue over the rate window: what the backlog grew
    /// by plus what was acked (the backlog alone is a gauge, never read as a counter).
    ///
    /// The ready count is current but the unacked count and the ack counter are the broker's
    /// statistics, refreshed every few seconds: between two ticks where the ack counter moved
    /// (a refresh) the three were read at the same moments, while a window ending between
    /// refreshes counts the messages delivered since the last one twice or not at all (on a
    /// real broker, whose refreshes drift against the ticks, that read a steady 400/s as
    /// anything from 0 to 700/s). So the rate is measured between refreshes while the
    /// counter moves, at most one refresh late.
    fn arrivals(&self, now: f64) -> f64 {
        if let Some(rate) = self.arrivals_between_refreshes(now) {
            return rate;
        }
        let Some(&(t1, b1, a1)) = self.samples.back() else {
            return 0.0;
        };
        let start = self
            .samples
            .iter()
            .find(|(t, _, _)| now - t <= RATE_WINDOW_S + 1e-9 && t1 > *t)
            .or_else(|| self.samples.iter().rev().nth(1));
        match start {
            Some(&(t0, b0, a0)) if t1 > t0 => ((b1 - b0) + (a1 - a0)).max(0.0) / (t1 - t0),
            _ => 0.0,
        }
    }

    /// The arrival rate between the latest refresh of the broker's statistics and the newest
    /// one at least a rate window before it; `None` unless the ack counter moved twice that far
    /// apart within the last two windows.
    fn arrivals_between_refreshes(&self, now: f64) -> Option<f64> {
        let refreshes: Vec<(f64, f64, f64)> = self
            .samples
            .iter()
            .zip(self.samples.iter().skip(1))
            .filter(|(before, after)| after.2 > before.2)
            .map(|(_, after)| *after)
            .collect();
        let &(t1, b1, a1) = refreshes.last()?;
        if now - t1 > 2.0 * RATE_WINDOW_S {
            return None;
        }
        let &(t0, b0, a0) = refreshes
            .iter()
            .rev()
            .find(|(t, _, _)| t1 - t >= RATE_WINDOW_S - 1e-9)?;
        Some(((b1 - b0) + (a1 - a0)).max(0.0) / (t1 - t0))
    }

    /// Updates the service rate each time the ack counter moves, over the time since it last
    /// moved (broker statistics refresh every few seconds: a tick-by-tick rate would read a
    /// refresh's worth of acks as one tick's). A sample counts fully only when the replicas
    /// had work waiting the whole time; otherwise it says how fast they were asked to go, a
    /// lower bound.
    fn learn_service_rate(&mut self, s: &WorkerSignals, backlog: f64, acked: f64) {
        let Some(mut mark) = self.ack_mark else {
            self.ack_mark = Some(AckMark::new(s, acked, backlog));
            return;
        };
        mark.fewest_ready = mark.fewest_ready.min(s.replicas.ready);
        mark.least_backlog = mark.least_backlog.min(backlog);
        mark.ready_seconds += f64::from(mark.last_ready) * (s.now - mark.last).max(0.0);
        mark.last = s.now;
        mark.last_ready = s.replicas.ready;
        let done = acked - mark.acked;
        if done <= 0.0 {
            self.ack_mark = Some(mark);
            return;
        }
        self.ack_mark = Some(AckMark::new(s, acked, backlog));
        let dt = s.now - mark.at;
        let (ready, least) = (mark.fewest_ready, mark.least_backlog);
        if dt <= 0.0 || ready == 0 || mark.ready_seconds <= 0.0 {
            return;
        }
        // Per ready replica-second: replicas that came (or went) during the interval served
        // part of it. Dividing by the fewest read a scale-out's acks as a faster replica
        // (broker counters refresh every few seconds, so intervals span scale-outs).
        let per_replica = done / mark.ready_seconds;
        let saturated_now = least >= (2.0 * f64::from(ready)).max(done / dt);
        // Constant only if the ready replica-seconds are the count times the interval (4 -> 6
        // -> 4 within one broker refresh has the fewest equal to the current, and more acks).
        if saturated_now
            && ready == s.replicas.ready
            && (mark.ready_seconds - f64::from(ready) * dt).abs() < 1e-6
        {
            // The same count the whole interval: a point of throughput against replicas.
            self.scalability.observe(s.now, ready, done / dt);
        }
        // Saturated: messages were waiting beyond the ones in service the whole time (at least
        // two per replica, one in service and one waiting) and at least a second's worth. A
        // backlog of one at a trickle is a message in service, not a queue: reading it as
        // saturation made the rate λ/n, and λ/(λ/n) asked for one replica more every time.
        let saturated = saturated_now;
        self.service_rate = match self.service_rate {
            Some(mu) if saturated && self.service_rate_measured => {
                Some(mu + SERVICE_RATE_GAIN * (per_replica - mu))
            }
            _ if saturated => Some(per_replica),
            None => Some(per_replica),
            Some(mu) => Some(mu.max(per_replica)),
        };
        let learned = saturated && !self.service_rate_measured;
        self.service_rate_measured |= learned;
        if learned {
            // Advice given before the rate was known (one replica per prefetch of backlog)
            // must not hold replicas now that the law can size the head.
            self.recommendations = Recent::default();
        }
    }

    /// Replicas needed now, replicas the arrivals alone need (without draining the queue), and
    /// why.
    fn need(&self, s: &WorkerSignals, backlog: f64, arrivals: f64) -> (u32, f64, String) {
        let current = s.replicas.existing;
        let idle_for = self.last_work_at.map_or(f64::INFINITY, |t| s.now - t);
        if backlog <= 0.0 && arrivals <= 0.0 {
            let one = current.min(1);
            return match s.outbox_rows {
                // The relay runs in the worker pods: rows waiting for a retry would stay
                // unsent until a message woke the head again.
                Some(rows) if rows > 0.0 => (
                    1,
                    1.0,
                    format!("{rows:.0} outbox rows not sent yet: keeping a replica for the relay"),
                ),
                None if current > 0
                    && idle_for >= IDLE_TO_ZERO_S
                    && self.settings.bounds.min == 0 =>
                {
                    (
                        one,
                        f64::from(one),
                        format!(
                            "idle for {idle_for:.0} s, but the outbox could not be read: not scaling to zero"
                        ),
                    )
                }
                _ if idle_for >= IDLE_TO_ZERO_S => (0, 0.0, format!("idle for {idle_for:.0} s")),
                _ => (one, f64::from(one), "no work now".to_owned()),
            };
        }
        let Some(mu) = self.service_rate.filter(|mu| *mu > 0.0) else {
            // Nothing measured yet (a cold start): one replica per prefetch-full of what will
            // be waiting when replicas ordered now serve (the backlog and the arrivals until
            // then), so each new consumer has work at once and one order covers the start-up
            // instead of one more order every second while the queue fills.
            let startup = self.settings.startup_seconds.max(0.0);
            let coming = backlog + arrivals * startup;
            let prefetch = f64::from(self.settings.prefetch.max(1));
            let need = current.max(1).max(ceil_replicas(coming / prefetch));
            return (
                need,
                f64::from(need),
                format!(
                    "{coming:.0} messages waiting by the time new replicas serve ({backlog:.0} now, {arrivals:.1}/s for {startup:.0} s), service rate not measured yet: one replica per {} (prefetch)",
                    self.settings.prefetch
                ),
            );
        };
        // A rate never measured with work waiting is what the replicas were asked to do, not
        // what they can: while nothing queues (under two messages per ready replica: one in
        // service, one waiting) they keep up, and more replicas are not needed. Sizing on it
        // took a trickle of 0.6/s at a measured 0.4/s to two replicas.
        // (Fewer may do: the rate is a lower bound, so what it says they need is an upper one.)
        let ready = f64::from(s.replicas.ready);
        if !self.service_rate_measured && s.replicas.ready > 0 && backlog < 2.0 * ready {
            let at_most = arrivals / mu;
            let keep = ceil_replicas(at_most).max(1).min(current.max(1));
            return (
                keep,
                at_most,
                format!(
                    "{backlog:.0} waiting at {arrivals:.1}/s: {keep} replicas keep up (not busy enough to measure their rate)"
                ),
            );
        }
        let startup = self.settings.startup_seconds.max(0.0);
        let target = self.settings.drain_seconds * DRAIN_MARGIN;
        let capacity = mu * f64::from(s.replicas.ready);
        // What piles up until replicas ordered now can serve.
        let growth = (arrivals - capacity).max(0.0) * startup;
        // A second of arrivals in the queue is normal flow, not backlog.
        let excess = (backlog + growth - arrivals).max(0.0);
        let drain_time = (target - startup).max(target * 0.25).max(1.0);
        // A rate seen without work waiting is a lower bound: no headroom on top of it.
        let headroom = if self.service_rate_measured {
            HEADROOM
        } else {
            0.0
        };
        let keep_up = arrivals / mu * (1.0 + headroom);
        // Enough capacity that what is queued now (and what piles up until new replicas
        // serve) is handled within the drain time: FIFO, so the newest message waits for it.
        let drain = excess / (mu * drain_time);
        let need = ceil_replicas(keep_up.max(drain)).max(1);
        let why = if drain > keep_up {
            format!(
                "{drain:.1} replicas at {mu:.1}/s each handle {excess:.0} queued messages within {drain_time:.0} s (arrivals {arrivals:.1}/s)"
            )
        } else {
            format!("{keep_up:.1} replicas keep up with {arrivals:.1}/s at {mu:.1}/s each")
        };
        // The fraction is kept: the scale-in's room is over the measured need.
        (need, keep_up, why)
    }
}

/// The base scale-in hold: re-ordering a replica costs its start-up and the drain target's
/// budget (see [`super::hysteresis`]).
fn hold_base(settings: &WorkerSettings) -> f64 {
    settings.startup_seconds.max(0.0) + settings.drain_seconds.max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(min: u32, max: u32) -> WorkerSettings {
        WorkerSettings {
            bounds: Bounds { min, max },
            drain_seconds: 30.0,
            startup_seconds: 10.0,
            prefetch: 100,
        }
    }

    fn signals(now: f64, ready: f64, unacked: f64, acked: f64, replicas: u32) -> WorkerSignals {
        WorkerSignals {
            now,
            ready_messages: ready,
            unacked_messages: unacked,
            acked_total: acked,
            replicas: Replicas {
                existing: replicas,
                ready: replicas,
            },
            outbox_rows: Some(0.0),
        }
    }

    #[test]
    fn scales_from_zero_at_once() {
        let mut law = WorkerLaw::new(settings(0, 10));
        let d = law.decide(&signals(0.0, 5.0, 0.0, 0.0, 0));
        assert_eq!(d.desired, 1, "{}", d.reason);
        assert!(d.reason.contains("not measured"), "{}", d.reason);
    }

    #[test]
    fn keeps_up_with_arrivals_at_the_measured_rate() {
        let mut law = WorkerLaw::new(settings(1, 40));
        // 2 replicas saturated: 100 acks/s, so 50/s each; 300/s arriving.
        let (mut acked, mut backlog) = (0.0, 500.0);
        let mut d = law.decide(&signals(0.0, backlog - 200.0, 200.0, acked, 2));
        for t in 1..=10 {
            acked += 100.0;
            backlog += 200.0;
            d = law.decide(&signals(f64::from(t), backlog - 200.0, 200.0, acked, 2));
        }
        let mu = law.service_rate().unwrap();
        assert!((mu - 50.0).abs() < 1.0, "{mu}");
        // 6 keep up, the growing backlog needs more.
        assert!(d.desired >= 7, "{} {}", d.desired, d.reason);
        assert!(d.desired <= 40);
    }

    #[test]
    fn waits_before_scaling_in_and_then_does() {
        let mut law = WorkerLaw::new(settings(1, 40));
        let mut acked = 0.0;
        // 10 replicas with work waiting: 50/s each.
        for t in 0..5 {
            acked += 500.0;
            law.decide(&signals(f64::from(t), 1000.0, 1000.0, acked, 10));
        }
        // Then 100/s arriving and acked at once: 3 replicas would do.
        let mut last = None;
        for t in 5..=60 {
            acked += 100.0;
            let d = law.decide(&signals(f64::from(t), 0.0, 20.0, acked, 10));
            if t == 10 {
                assert_eq!(d.desired, 10, "holds at first: {}", d.reason);
            }
            last = Some(d);
        }
        let d = last.unwrap();
        assert!(d.desired <= 4, "scaled in after the window: {}", d.reason);
    }

    #[test]
    fn ordered_replicas_are_not_cancelled_while_they_start() {
        let mut law = WorkerLaw::new(settings(1, 40));
        // A cold start: 2000 waiting, the service rate unknown: one replica per prefetch.
        let out = law.decide(&signals(0.0, 2000.0, 0.0, 0.0, 1));
        let n = out.desired;
        assert!(n > 4, "{}", out.reason);
        // The one ready replica drains it at 150/s while the others start: the need falls
        // well below n, but the ordered pods are held while they may be starting (two
        // start-ups of 10 s); pods not Ready by then are stuck and hold nothing.
        let (mut acked, mut backlog) = (0.0, 2000.0_f64);
        let mut seen = Vec::new();
        for t in 1..=120 {
            acked += 150.0_f64.min(backlog);
            backlog = (backlog - 150.0).max(0.0);
            let d = law.decide(&WorkerSignals {
                replicas: Replicas {
                    existing: n,
                    ready: 1,
                },
                ..signals(f64::from(t), backlog, 0.0, acked, n)
            });
            if t < 20 {
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
    fn arrivals_are_measured_between_refreshes_of_the_broker_statistics() {
        // 100/s arrive and 2 replicas ack them at once; the ack counter moves only every
        // 5 s, at an offset that drifts against the ticks (every 5th, then 6th tick).
        let mut law = WorkerLaw::new(settings(1, 40));
        let (mut acked, mut refreshed_at) = (0.0, 0.0);
        let mut seen = Vec::new();
        for t in 1..=120 {
            let t = f64::from(t);
            let period = if (t as u32 / 11).is_multiple_of(2) {
                5.0
            } else {
                6.0
            };
            if t - refreshed_at >= period {
                acked = 100.0 * t;
                refreshed_at = t;
            }
            law.decide(&signals(t, 0.0, 20.0, acked, 2));
            if t > 20.0 {
                seen.push(law.arrivals(t));
            }
        }
        for rate in &seen {
            assert!((80.0..=120.0).contains(rate), "{seen:?}");
        }
    }

    #[test]
    fn acks_reported_every_few_seconds_give_the_true_rate() {
        // The management API refreshes its counters every 5 s: the acks arrive in lumps.
        let mut law = WorkerLaw::new(settings(1, 40));
        // A steady backlog: 100/s arrive and the 2 replicas handle 100/s.
        let (mut acked, backlog) = (0.0, 5000.0);
        for t in 0..60 {
            if t % 5 == 0 && t > 0 {
                acked += 500.0;
            }
            law.decide(&signals(f64::from(t), backlog - 200.0, 200.0, acked, 2));
        }
        let mu = law.service_rate().unwrap();
        assert!((mu - 50.0).abs() < 5.0, "{mu}");
    }

    #[test]
    fn a_rate_seen_without_backlog_is_only_a_lower_bound() {
        let mut law = WorkerLaw::new(settings(1, 40));
        let mut acked = 0.0;
        for t in 0..=60 {
            acked += 100.0;
            let d = law.decide(&signals(f64::from(t), 0.0, 20.0, acked, 10));
            assert_eq!(d.desired, 10, "t={t}: {}", d.reason);
        }
    }

    #[test]
    fn a_trickle_with_one_message_in_service_keeps_one_replica() {
        // What `chimera up` showed: 0.5 messages/s, the management API refreshing every 5 s,
        // and now and then a sample catching the one message in service. The old saturation
        // test read that message as a queue, took λ/n for the service rate and asked for one
        // replica more every refresh (7 replicas for half a message per second).
        let mut law = WorkerLaw::new(settings(0, 10));
        let (mut acked, mut replicas) = (0.0, 1);
        for t in 0..600 {
            let refresh = t % 5 == 0;
            if refresh && t > 0 {
                acked += 2.5_f64.floor() + f64::from(u8::from(t % 10 == 0));
            }
            let unacked = if (t / 5) % 3 == 0 { 0.0 } else { 1.0 };
            let d = law.decide(&signals(f64::from(t), 0.0, unacked, acked, replicas));
            assert!(d.desired <= 1, "t={t}: {} ({})", d.desired, d.reason);
            replicas = d.desired.max(1);
        }
        assert!(
            !law.service_rate_measured,
            "a message in service is not a queue: {:?} is a lower bound",
            law.service_rate()
        );
    }

    #[test]
    fn a_spike_the_queue_absorbs_orders_nothing() {
        let mut law = WorkerLaw::new(settings(1, 40));
        // 4 replicas at 50/s each with work waiting, 150/s arriving: μ is learned.
        let mut acked = 0.0;
        for t in 0..20 {
            acked += 200.0;
            law.decide(&signals(f64::from(t), 300.0, 400.0, acked, 4));
        }
        // Then a short spike: 300/s for two seconds (what the arrivals alone would need is
        // 6.3 replicas), from the same backlog. 4 replicas drain it within seconds, far under
        // the 24 s the law plans with: no order.
        let mut backlog: f64 = 700.0;
        let mut absorbed = false;
        for t in 20..60 {
            let arrived = if t < 22 { 300.0 } else { 150.0 };
            let served = (backlog + arrived).min(200.0);
            backlog += arrived - served;
            acked += served;
            let (ready, unacked) = ((backlog - 400.0).max(0.0), backlog.min(400.0));
            let d = law.decide(&signals(f64::from(t), ready, unacked, acked, 4));
            assert_eq!(d.desired, 4, "t={t}: {}", d.reason);
            absorbed |= d.reason.contains("holding");
        }
        assert!(
            absorbed,
            "the spike asked for more and the queue absorbed it"
        );
    }

    #[test]
    fn a_cold_start_orders_once_for_what_arrives_during_the_start_up() {
        let mut law = WorkerLaw::new(settings(0, 40));
        let mut orders = Vec::new();
        let mut replicas = Replicas::default();
        for t in 0..8 {
            // 800 messages a second and nothing served until the replicas are ready.
            let backlog = 800.0 * f64::from(t);
            let d = law.decide(&WorkerSignals {
                now: f64::from(t),
                ready_messages: backlog,
                unacked_messages: 0.0,
                acked_total: 0.0,
                replicas,
                outbox_rows: Some(0.0),
            });
            if d.desired != replicas.existing {
                orders.push((t, d.desired));
            }
            replicas.existing = d.desired;
        }
        // 800/s for the 10 s start-up at 100 per replica: 40 (the maximum) in two orders, not
        // one more order every second.
        assert!(orders.len() <= 2, "{orders:?}");
        assert_eq!(replicas.existing, 40, "{orders:?}");
    }

    #[test]
    fn idles_to_zero_only_when_allowed_and_after_a_while() {
        for (min, expect) in [(0, 0), (1, 1)] {
            let mut law = WorkerLaw::new(settings(min, 5));
            let mut d = law.decide(&signals(0.0, 0.0, 0.0, 0.0, 1));
            assert_eq!(d.desired, 1);
            for t in 1..=80 {
                d = law.decide(&signals(f64::from(t), 0.0, 0.0, 0.0, 1));
            }
            assert_eq!(d.desired, expect, "{}", d.reason);
        }
    }

    #[test]
    fn bounds_are_reported() {
        let mut law = WorkerLaw::new(settings(1, 2));
        let mut acked = 0.0;
        let mut d = law.decide(&signals(0.0, 1000.0, 100.0, acked, 2));
        for t in 1..5 {
            acked += 100.0;
            d = law.decide(&signals(
                f64::from(t),
                1000.0 + 500.0 * f64::from(t),
                100.0,
                acked,
                2,
            ));
        }
        assert_eq!(d.desired, 2);
        assert!(d.reason.contains("bounded"), "{}", d.reason);
    }

    /// A law at one idle replica, `secs` seconds after its last message, its outbox as given.
    fn idle_after(secs: u32, outbox_rows: Option<f64>) -> Decision {
        let mut law = WorkerLaw::new(settings(0, 10));
        law.decide(&signals(0.0, 10.0, 0.0, 0.0, 1));
        let mut d = law.decide(&signals(1.0, 0.0, 0.0, 10.0, 1));
        for t in 2..=secs {
            d = law.decide(&WorkerSignals {
                outbox_rows,
                ..signals(f64::from(t), 0.0, 0.0, 10.0, 1)
            });
        }
        d
    }

    #[test]
    fn an_idle_head_goes_to_zero_only_when_its_outbox_is_empty() {
        // Idle 30 s, then the scale-in hold (start-up 10 s + drain 30 s).
        let d = idle_after(120, Some(0.0));
        assert_eq!(d.desired, 0, "empty outbox: to zero: {}", d.reason);
        let d = idle_after(120, Some(3.0));
        assert_eq!(d.desired, 1, "{}", d.reason);
        assert!(d.reason.contains("3 outbox rows"), "{}", d.reason);
        let d = idle_after(120, None);
        assert_eq!(d.desired, 1, "unknown outbox: {}", d.reason);
        assert!(d.reason.contains("could not be read"), "{}", d.reason);
    }

    #[test]
    fn outbox_rows_count_as_work_for_the_idle_timer() {
        // Rows pending for 50 s, then sent: the 30 s idle time counts from then (and the
        // 40 s hold after it).
        let mut law = WorkerLaw::new(settings(0, 10));
        law.decide(&signals(0.0, 10.0, 0.0, 0.0, 1));
        let mut seen = Vec::new();
        for t in 1..=200 {
            let rows = if t <= 50 { 2.0 } else { 0.0 };
            let d = law.decide(&WorkerSignals {
                outbox_rows: Some(rows),
                ..signals(f64::from(t), 0.0, 0.0, 10.0, 1)
            });
            seen.push(d.desired);
        }
        // Had the rows not counted as work, the head would have been idle since t≈5 and gone
        // to zero about 40 s after they were sent (t≈91).
        assert!(seen[..115].iter().all(|n| *n == 1), "{seen:?}");
        assert_eq!(seen[199], 0, "{seen:?}");
    }
}
