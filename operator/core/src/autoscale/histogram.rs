//! Request-duration histograms as the query heads expose them (Prometheus buckets): merged
//! across pods, differenced over a window, and read as a percentile the way Prometheus'
//! `histogram_quantile` does (linear inside the bucket).

/// A cumulative histogram: `counts[i]` requests took at most `bounds[i]` seconds; `total`
/// includes those above the last bound (the `+Inf` bucket); `sum` is the seconds spent.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    /// Upper bounds of the finite buckets, increasing, in seconds.
    pub bounds: Vec<f64>,
    /// Cumulative counts per finite bucket.
    pub counts: Vec<f64>,
    /// All requests.
    pub total: f64,
    /// Sum of their durations, in seconds.
    pub sum: f64,
}

impl Histogram {
    /// An empty histogram over `bounds`.
    pub fn empty(bounds: &[f64]) -> Self {
        Self {
            bounds: bounds.to_vec(),
            counts: vec![0.0; bounds.len()],
            total: 0.0,
            sum: 0.0,
        }
    }

    /// Adds `other` (another pod's, over the same bounds); false when the bounds differ.
    pub fn add(&mut self, other: &Self) -> bool {
        if self.bounds != other.bounds {
            return false;
        }
        for (c, o) in self.counts.iter_mut().zip(&other.counts) {
            *c += o;
        }
        self.total += other.total;
        self.sum += other.sum;
        true
    }

    /// What happened between `older` and `self` (never negative: a reset counts from zero).
    pub fn since(&self, older: &Self) -> Self {
        if self.bounds != older.bounds || self.total < older.total {
            return self.clone();
        }
        Self {
            bounds: self.bounds.clone(),
            counts: self
                .counts
                .iter()
                .zip(&older.counts)
                .map(|(a, b)| (a - b).max(0.0))
                .collect(),
            total: (self.total - older.total).max(0.0),
            sum: (self.sum - older.sum).max(0.0),
        }
    }

    /// The `q` quantile (0..1) in seconds; None without requests. Beyond the last finite bound
    /// the answer is that bound (as in Prometheus): "at least this slow".
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.total <= 0.0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.total;
        let mut lower_bound = 0.0;
        let mut lower_count = 0.0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            if *count >= rank {
                let in_bucket = count - lower_count;
                if in_bucket <= 0.0 {
                    return Some(*bound);
                }
                return Some(
                    lower_bound + (bound - lower_bound) * (rank - lower_count) / in_bucket,
                );
            }
            lower_bound = *bound;
            lower_count = *count;
        }
        self.bounds.last().copied()
    }

    /// Mean duration in seconds; None without requests.
    pub fn mean(&self) -> Option<f64> {
        (self.total > 0.0).then(|| self.sum / self.total)
    }

    /// Records `n` requests of `seconds` each (tests and the simulator).
    pub fn observe_n(&mut self, seconds: f64, n: f64) {
        for (bound, count) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if seconds <= *bound {
                *count += n;
            }
        }
        self.total += n;
        self.sum += seconds * n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const B: [f64; 4] = [0.01, 0.05, 0.1, 0.5];

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let mut h = Histogram::empty(&B);
        h.observe_n(0.005, 50.0);
        h.observe_n(0.07, 50.0);
        assert_eq!(h.quantile(0.5), Some(0.01));
        let p75 = h.quantile(0.75).unwrap();
        assert!((p75 - 0.075).abs() < 1e-9, "{p75}");
        assert!((h.mean().unwrap() - 0.0375).abs() < 1e-9);
    }

    #[test]
    fn beyond_the_last_bucket_is_the_last_bound() {
        let mut h = Histogram::empty(&B);
        h.observe_n(3.0, 10.0);
        assert_eq!(h.quantile(0.95), Some(0.5));
        assert_eq!(Histogram::empty(&B).quantile(0.5), None);
    }

    #[test]
    fn deltas_and_merges() {
        let mut a = Histogram::empty(&B);
        a.observe_n(0.02, 10.0);
        let before = a.clone();
        a.observe_n(0.2, 5.0);
        let d = a.since(&before);
        assert_eq!(d.total, 5.0);
        assert_eq!(d.quantile(0.5), Some(0.1 + 0.4 * 0.5));
        let mut merged = Histogram::empty(&B);
        assert!(merged.add(&a) && merged.add(&a));
        assert_eq!(merged.total, 30.0);
        assert!(
            !merged.add(&Histogram::empty(&[1.0])),
            "other bounds refused"
        );
        // A reset (a new pod): the newer histogram counts from zero.
        assert_eq!(before.since(&a), before);
    }

    proptest! {
        #[test]
        fn quantiles_are_monotonic_and_bounded(
            obs in proptest::collection::vec((0.0f64..1.0, 1.0f64..100.0), 1..20),
            q1 in 0.0f64..1.0, q2 in 0.0f64..1.0,
        ) {
            let mut h = Histogram::empty(&B);
            for (s, n) in &obs {
                h.observe_n(*s, *n);
            }
            let (lo, hi) = if q1 <= q2 { (q1, q2) } else { (q2, q1) };
            let (a, b) = (h.quantile(lo).unwrap(), h.quantile(hi).unwrap());
            prop_assert!(a <= b + 1e-12);
            prop_assert!((0.0..=0.5).contains(&b));
        }
    }
}
