//! How long a law keeps replicas it no longer needs: the scale-in hold, shared by both laws.
//!
//! Removing a replica and ordering it again costs a pod start-up (billed while it starts) and
//! the SLO budget spent while the head waits for it; keeping it costs its replica-seconds. Like
//! ski rental, the law keeps an unneeded replica about as long as re-ordering it would cost:
//! the base hold is the measured start-up plus the head's own budget (the drain target of a
//! worker, a stable half minute of a query head), never a per-scenario number.
//!
//! Loads that come back (bursts, spikes, a sawtooth) make a fixed hold either too short (a
//! scale-in then a scale-out per burst) or too long everywhere. So the hold learns from regret:
//! a scale-out within the hold's horizon after a scale-in means the load came back after that
//! gap, and the hold grows to cover it; a scale-in that nothing followed shrinks it back toward
//! the base. It stays within [base, `MAX_FACTOR` × base].

/// The hold never exceeds this many base holds: bridging a longer gap keeps more replica-seconds
/// idle than the re-order it saves (ski rental; measured on spiky loads, ADR 0021).
const MAX_FACTOR: f64 = 5.0;
/// A learned hold covers the gap it regretted with this margin.
const GAP_MARGIN: f64 = 1.5;
/// A scale-in nothing followed shrinks the hold by this factor.
const RELAX: f64 = 0.75;
/// A scale-in leaves this share of room over a measured (fractional) recommendation (the
/// Kubernetes HPA's default tolerance, here on scale-in only; 5 % churned more on bursty and
/// sawtooth loads, 20 % cost more for no fewer violations): a head
/// measured at n+1 replicas that needs 5.9 and is taken to 6 needs 6.1 there (its latency and
/// service rate move with its utilisation), and comes back to n+1 at once, an action each way.
const TOLERANCE: f64 = 0.1;
/// Start-ups after a scale-out during which its pods not yet Ready count as starting.
const STARTING_PATIENCE: f64 = 2.0;

use super::ceil_replicas;
use super::series::Recent;

/// The scale-in hold of one head.
#[derive(Clone, Debug, PartialEq)]
pub struct Hold {
    base: f64,
    hold: f64,
    /// The last scale-in: when, and whether a scale-out followed within the horizon.
    last_in: Option<(f64, bool)>,
    /// When the last scale-out was decided.
    last_out: Option<f64>,
}

impl Hold {
    /// A hold of `base` seconds (start-up plus the head's budget), learning from there.
    pub fn new(base: f64) -> Self {
        let base = base.max(1.0);
        Self {
            base,
            hold: base,
            last_in: None,
            last_out: None,
        }
    }

    /// A new base (a new measure of the start-up time); what was learned is kept in proportion.
    pub fn set_base(&mut self, base: f64) {
        let base = base.max(1.0);
        self.hold = (self.hold / self.base * base).clamp(base, base * MAX_FACTOR);
        self.base = base;
    }

    /// Whether replicas not Ready yet may still be starting: the last scale-out was less
    /// than [`STARTING_PATIENCE`] start-ups of `startup` seconds ago. Pods not Ready by then
    /// are stuck (unschedulable, failing their probe), not starting: they must not hold a
    /// scale-in, nor a scale-out, forever.
    pub fn may_be_starting(&self, now: f64, startup: f64) -> bool {
        self.last_out
            .is_some_and(|at| now - at < STARTING_PATIENCE * startup.max(1.0))
    }

    /// Seconds the smaller count must have been enough for before a scale-in.
    pub fn seconds(&self) -> f64 {
        self.hold
    }

    /// The longest hold it can learn: how far back recommendations must be kept.
    pub fn horizon(&self) -> f64 {
        self.base * MAX_FACTOR
    }

    /// What a head with `current` replicas scales in to, given its recommendations: nothing
    /// until every recommendation of the hold was below `current`, then in one step to the
    /// most of the last `settle` seconds (the time a replica takes to come back). Following
    /// the hold window's maximum down instead would remove replicas one second after another
    /// as old advice ages out: an action each.
    pub fn scale_in(
        &self,
        recommendations: &Recent,
        now: f64,
        current: u32,
        settle: f64,
    ) -> Option<u32> {
        // Advice of less than a start-up (a law that just started, or whose advice was reset
        // when it first measured its service rate) is too little to remove replicas on: a
        // rate still converging went 40 -> 29 -> 19 -> 10 in four actions, before the ordered
        // pods were even ready.
        if recommendations.span(now) + 1e-9 < settle.min(self.hold) {
            return None;
        }
        // Room over a measured (fractional) need; a count (a floor, a cold start's advice)
        // has nothing to add room to: 1 stays 1.
        let room = |r: f64| {
            if r.fract() == 0.0 {
                ceil_replicas(r)
            } else {
                ceil_replicas(r * (1.0 + TOLERANCE))
            }
        };
        let held = recommendations
            .max_since(now, self.hold)
            .map_or(current, room);
        if held >= current {
            return None;
        }
        let settled = recommendations
            .max_since(now, settle.clamp(1.0, self.hold))
            .map_or(current, room);
        Some(settled.min(current))
    }

    /// Records a change of the desired replicas at `now`.
    pub fn changed(&mut self, now: f64, from: u32, to: u32) {
        if to > from {
            self.last_out = Some(now);
            let horizon = self.horizon();
            if let Some((at, regretted)) = self.last_in.as_mut() {
                let gap = now - *at;
                if !*regretted && gap <= horizon {
                    *regretted = true;
                    self.hold = (gap * GAP_MARGIN).clamp(self.hold, horizon);
                }
            }
        } else if to < from {
            if let Some((at, false)) = self.last_in
                && now - at > self.hold
            {
                self.hold = (self.hold * RELAX).max(self.base);
            }
            self.last_in = Some((now, false));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_the_base() {
        let h = Hold::new(40.0);
        assert_eq!(h.seconds(), 40.0);
        assert_eq!(h.horizon(), 200.0);
        assert_eq!(Hold::new(0.0).seconds(), 1.0, "never zero");
    }

    #[test]
    fn a_load_that_comes_back_lengthens_the_hold() {
        let mut h = Hold::new(40.0);
        h.changed(100.0, 10, 2);
        h.changed(190.0, 2, 10);
        assert_eq!(h.seconds(), 135.0, "covers the 90 s gap with margin");
        // One regret per scale-in: a second scale-out does not count again.
        h.changed(200.0, 10, 12);
        assert_eq!(h.seconds(), 135.0);
    }

    #[test]
    fn a_shorter_gap_never_shortens_it_and_the_horizon_caps_it() {
        let mut h = Hold::new(40.0);
        h.changed(0.0, 10, 2);
        h.changed(100.0, 2, 10);
        assert_eq!(h.seconds(), 150.0);
        h.changed(300.0, 10, 2);
        h.changed(310.0, 2, 10);
        assert_eq!(h.seconds(), 150.0);
        h.changed(400.0, 10, 2);
        h.changed(590.0, 2, 10);
        assert_eq!(h.seconds(), 200.0, "capped at the horizon");
    }

    #[test]
    fn a_scale_in_nothing_followed_relaxes_it() {
        let mut h = Hold::new(40.0);
        h.changed(0.0, 10, 2);
        h.changed(100.0, 2, 10);
        assert_eq!(h.seconds(), 150.0);
        h.changed(300.0, 10, 2);
        // Nothing for longer than the hold, then another scale-in.
        h.changed(600.0, 2, 1);
        assert_eq!(h.seconds(), 112.5);
        let mut relaxed = h.seconds();
        for i in 0..20 {
            h.changed(1000.0 + 1000.0 * f64::from(i), 2, 1);
            relaxed = h.seconds();
        }
        assert_eq!(relaxed, 40.0, "back to the base, not below");
    }

    #[test]
    fn a_new_start_up_time_scales_what_was_learned() {
        let mut h = Hold::new(40.0);
        h.changed(0.0, 10, 2);
        h.changed(100.0, 2, 10);
        h.set_base(20.0);
        assert_eq!(h.seconds(), 75.0);
        assert_eq!(h.horizon(), 100.0);
    }

    #[test]
    fn no_scale_in_on_less_than_a_start_up_of_advice() {
        let h = Hold::new(40.0);
        let mut recs = Recent::default();
        recs.push(100.0, 3.0, 400.0);
        recs.push(104.0, 3.0, 400.0);
        assert_eq!(h.scale_in(&recs, 105.0, 40, 15.0), None, "5 s of advice");
        for t in 105..=140 {
            recs.push(f64::from(t), 3.0, 400.0);
        }
        assert_eq!(
            h.scale_in(&recs, 140.0, 40, 15.0),
            Some(3),
            "a count gets no room"
        );
        for (need, after) in [(2.5, 3), (2.95, 4)] {
            let mut recs = Recent::default();
            for t in 100..=140 {
                recs.push(f64::from(t), need, 400.0);
            }
            assert_eq!(
                h.scale_in(&recs, 140.0, 40, 15.0),
                Some(after),
                "{need} + 10 %"
            );
        }
    }
}
