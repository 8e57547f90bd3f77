//! Autoscaling control laws, pure: measured signals in, a replica count and its reason out.
//! The operator, `chimera up` and the simulator (`chimera sim`) drive this very code; see
//! docs/autoscaling.md for the reasoning.
//!
//! - [`worker::WorkerLaw`]: replicas that keep up with arrivals and drain the backlog within the
//!   module's `drainSeconds`, from queue depth and the service rate measured from acks.
//! - [`query::QueryLaw`]: replicas that hold the latency percentile target, from the pods'
//!   request-duration histograms, the in-flight count and the request rate (Little's law).
//! - [`exposition`] reads a pod's `/metrics`; [`signals`] holds a queue sample and the latency
//!   histogram merged over a head's pods.

pub mod exposition;
pub mod head;
pub mod histogram;
pub mod hysteresis;
pub mod query;
pub mod scalability;
pub mod series;
pub mod signals;
pub mod startup;
pub mod worker;

/// A head's replicas as the control plane sees them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Replicas {
    /// Replicas that exist (starting or ready).
    pub existing: u32,
    /// Replicas ready to serve.
    pub ready: u32,
}

impl Replicas {
    /// Replicas ordered and not ready yet.
    pub fn starting(&self) -> u32 {
        self.existing.saturating_sub(self.ready)
    }

    /// Whether a scale-out to `need` waits for the replicas still starting: each order is a
    /// pod started, so while the last one is on its way only a need well beyond it (a
    /// quarter more, at least one) orders again.
    pub fn waits_for_starting(&self, need: u32) -> bool {
        let band = self.existing + (self.existing / 4).max(1);
        self.starting() > 0 && need < band
    }
}

/// Replica bounds from the module's spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Fewest replicas.
    pub min: u32,
    /// Most replicas.
    pub max: u32,
}

impl Bounds {
    /// Bounds from a spec's `replicas {min, max}` (negative values read as 0).
    pub fn from_spec(min: i32, max: i32) -> Self {
        Self {
            min: u32::try_from(min).unwrap_or(0),
            max: u32::try_from(max).unwrap_or(0),
        }
    }

    fn clamp(self, n: u32) -> u32 {
        n.clamp(self.min, self.max.max(self.min))
    }
}

/// What a law decided, and why.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    /// Replicas wanted.
    pub desired: u32,
    /// Human-readable reason with the numbers behind it.
    pub reason: String,
    /// The measured signal the decision rests on (queue depth or latency), for status.
    pub signal: String,
    /// Replicas beyond which the head's measured throughput stops growing, once the law has
    /// seen where (see [`scalability`]); the law orders no more than that.
    pub throughput_limit: Option<u32>,
}

impl Decision {
    /// Keeps `current` replicas because the signals are missing: never scale on no data.
    pub fn hold(current: u32, why: &str) -> Self {
        Self {
            desired: current,
            reason: format!("metrics unavailable, holding {current}: {why}"),
            signal: "none".to_owned(),
            throughput_limit: None,
        }
    }
}

/// Replicas for a fractional need, never negative, saturating.
fn ceil_replicas(x: f64) -> u32 {
    if x.is_nan() || x <= 0.0 {
        0
    } else if x >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        // Float noise must not add a replica: 3.0000000001 is 3.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let n = (x - 1e-6).ceil() as u32;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scale_out_waits_for_starting_replicas_unless_it_needs_a_quarter_more() {
        let r = Replicas {
            existing: 8,
            ready: 5,
        };
        assert_eq!(r.starting(), 3);
        assert!(r.waits_for_starting(9));
        assert!(!r.waits_for_starting(10));
        let one = Replicas {
            existing: 1,
            ready: 0,
        };
        assert!(!one.waits_for_starting(2), "at least one more orders");
        let ready = Replicas {
            existing: 8,
            ready: 8,
        };
        assert!(
            !ready.waits_for_starting(9),
            "nothing starting: order at once"
        );
    }

    #[test]
    fn ceil_replicas_is_safe() {
        assert_eq!(ceil_replicas(-1.0), 0);
        assert_eq!(ceil_replicas(f64::NAN), 0);
        assert_eq!(ceil_replicas(0.2), 1);
        assert_eq!(ceil_replicas(3.0000000001), 3);
        assert_eq!(ceil_replicas(3.01), 4);
        assert_eq!(ceil_replicas(1e20), u32::MAX);
    }

    #[test]
    fn bounds_clamp() {
        let b = Bounds { min: 1, max: 5 };
        assert_eq!(b.clamp(0), 1);
        assert_eq!(b.clamp(9), 5);
        assert_eq!(Bounds { min: 3, max: 2 }.clamp(0), 3);
    }
}
