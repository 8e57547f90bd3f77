//! Leader election on a Lease, the decisions only (the runtime reads and writes the Lease).
//!
//! The rules are client-go's: a replica never compares the Lease's `renewTime` with its own
//! clock (clocks of two nodes differ); it notes, on its own monotonic clock, when it last saw
//! the Lease's record change, and takes the Lease only when the record has not changed for a
//! whole lease duration. The leader renews every retry period and stops leading when no renewal
//! has succeeded for the renew deadline, which is shorter than the lease duration: it has
//! stopped writing before any other replica can believe the Lease expired. Every write of the
//! Lease carries the resourceVersion it was decided on, so two replicas that decide to take it
//! at once cannot both succeed.

/// Timing of the election, in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    /// How long the Lease holds without renewal, as written in `leaseDurationSeconds`.
    pub lease_duration: f64,
    /// How long a leader keeps leading without a successful renewal.
    pub renew_deadline: f64,
    /// How often every replica reads (and the leader renews) the Lease.
    pub retry_period: f64,
}

impl Default for Timing {
    /// client-go's defaults: 15 s, 10 s, 2 s.
    fn default() -> Self {
        Self {
            lease_duration: 15.0,
            renew_deadline: 10.0,
            retry_period: 2.0,
        }
    }
}

/// Why a timing cannot fence a leader.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TimingError {
    /// A leader would still lead after another replica took the Lease.
    #[error(
        "the renew deadline ({renew_deadline} s) must be shorter than the lease duration ({lease_duration} s)"
    )]
    DeadlineNotShorter {
        /// The renew deadline.
        renew_deadline: f64,
        /// The lease duration.
        lease_duration: f64,
    },
    /// A leader would not try to renew before its deadline.
    #[error(
        "the retry period ({retry_period} s) must be positive and shorter than the renew deadline ({renew_deadline} s)"
    )]
    RetryNotShorter {
        /// The retry period.
        retry_period: f64,
        /// The renew deadline.
        renew_deadline: f64,
    },
}

impl Timing {
    /// Checks the ordering retry period < renew deadline < lease duration.
    pub fn validate(&self) -> Result<(), TimingError> {
        if self.renew_deadline >= self.lease_duration {
            return Err(TimingError::DeadlineNotShorter {
                renew_deadline: self.renew_deadline,
                lease_duration: self.lease_duration,
            });
        }
        if self.retry_period <= 0.0 || self.retry_period >= self.renew_deadline {
            return Err(TimingError::RetryNotShorter {
                retry_period: self.retry_period,
                renew_deadline: self.renew_deadline,
            });
        }
        Ok(())
    }
}

/// What a replica read of the Lease: who holds it and the fields whose change shows the holder
/// is alive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// `holderIdentity` (None or empty: released).
    pub holder: Option<String>,
    /// `renewTime`, as the API server returned it.
    pub renew_time: Option<String>,
    /// `leaseTransitions`.
    pub transitions: i32,
}

impl Record {
    fn holder(&self) -> Option<&str> {
        self.holder.as_deref().filter(|h| !h.is_empty())
    }
}

/// What a replica remembers between reads: the last record and when (on its own clock) it
/// last changed.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    /// The record.
    pub record: Record,
    /// Seconds on the replica's monotonic clock when the record was first seen as it is.
    pub since: f64,
}

/// Folds a new read into what was observed: the time moves only when the record changed.
pub fn observe(previous: Option<&Observed>, record: Record, now: f64) -> Observed {
    match previous {
        Some(p) if p.record == record => p.clone(),
        _ => Observed { record, since: now },
    }
}

/// What to do with the Lease after a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// There is no Lease: create it, held by this replica.
    Create,
    /// This replica holds it: renew it.
    Renew,
    /// Released, or expired: take it.
    Acquire,
    /// Another replica holds it: follow.
    Follow,
}

/// The step for replica `me`, given the Lease as observed (None: no Lease) at `now`.
pub fn step(observed: Option<&Observed>, me: &str, now: f64, timing: &Timing) -> Step {
    let Some(observed) = observed else {
        return Step::Create;
    };
    match observed.record.holder() {
        Some(holder) if holder == me => Step::Renew,
        None => Step::Acquire,
        Some(_) if now - observed.since > timing.lease_duration => Step::Acquire,
        Some(_) => Step::Follow,
    }
}

/// Until when (on the replica's clock) a leader whose last successful write of the Lease was
/// sent at `sent` may lead.
pub fn leads_until(sent: f64, timing: &Timing) -> f64 {
    sent + timing.renew_deadline
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn held_by(holder: &str, renew: &str) -> Record {
        Record {
            holder: Some(holder.to_owned()),
            renew_time: Some(renew.to_owned()),
            transitions: 0,
        }
    }

    #[test]
    fn no_lease_is_created_a_released_one_taken_and_ones_own_renewed() {
        let t = Timing::default();
        assert_eq!(step(None, "a", 0.0, &t), Step::Create);
        let released = observe(
            None,
            Record {
                holder: Some(String::new()),
                renew_time: None,
                transitions: 3,
            },
            0.0,
        );
        assert_eq!(step(Some(&released), "a", 0.0, &t), Step::Acquire);
        let mine = observe(None, held_by("a", "t1"), 0.0);
        assert_eq!(step(Some(&mine), "a", 100.0, &t), Step::Renew);
    }

    #[test]
    fn another_holder_is_followed_until_its_record_stands_still_for_a_lease_duration() {
        let t = Timing::default();
        let seen = observe(None, held_by("b", "t1"), 10.0);
        assert_eq!(step(Some(&seen), "a", 24.0, &t), Step::Follow);
        // b renewed at 20: its record changed, so the clock starts again.
        let renewed = observe(Some(&seen), held_by("b", "t2"), 20.0);
        assert_eq!(renewed.since, 20.0);
        assert_eq!(step(Some(&renewed), "a", 34.0, &t), Step::Follow);
        // Read again unchanged: the time it was first seen stays.
        let again = observe(Some(&renewed), held_by("b", "t2"), 30.0);
        assert_eq!(again.since, 20.0);
        assert_eq!(step(Some(&again), "a", 35.5, &t), Step::Acquire);
    }

    #[test]
    fn timings_that_cannot_fence_a_leader_are_refused() {
        assert_eq!(Timing::default().validate(), Ok(()));
        let long_deadline = Timing {
            renew_deadline: 15.0,
            ..Timing::default()
        };
        assert!(matches!(
            long_deadline.validate(),
            Err(TimingError::DeadlineNotShorter { .. })
        ));
        let slow_retry = Timing {
            retry_period: 10.0,
            ..Timing::default()
        };
        assert!(matches!(
            slow_retry.validate(),
            Err(TimingError::RetryNotShorter { .. })
        ));
    }

    proptest! {
        /// Fencing: with a valid timing, whenever a follower may take the Lease, the old
        /// leader, whose last successful renewal was sent no later than the follower saw it,
        /// has stopped leading.
        #[test]
        fn a_follower_takes_over_only_after_the_leader_stopped(
            duration in 2.0f64..120.0,
            deadline_share in 0.1f64..0.99,
            retry_share in 0.05f64..0.95,
            sent in 0.0f64..1000.0,
            seen_after in 0.0f64..5.0,
            later in 0.0f64..500.0,
        ) {
            let renew_deadline = duration * deadline_share;
            let timing = Timing {
                lease_duration: duration,
                renew_deadline,
                retry_period: renew_deadline * retry_share,
            };
            prop_assume!(timing.validate().is_ok());
            // The leader's renewal, sent at `sent`, is seen by the follower at or after it.
            let seen = observe(None, held_by("leader", "t"), sent + seen_after);
            let now = sent + seen_after + later;
            if step(Some(&seen), "follower", now, &timing) == Step::Acquire {
                prop_assert!(now > leads_until(sent, &timing));
            }
        }
    }
}
