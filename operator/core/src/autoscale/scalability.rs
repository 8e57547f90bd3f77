//! Where more replicas stop helping: a head's throughput against its replica count.
//!
//! Replicas that share something (one SQLite file, a table's lock, a rate-limited dependency)
//! do not add throughput forever: past a point each one adds less, and past another the total
//! falls (they queue on the shared part and spend time keeping each other consistent). The
//! Universal Scalability Law describes both with two numbers:
//!
//! ```text
//! X(n) = n·X1 / (1 + σ·(n−1) + κ·n·(n−1))      σ contention, κ coherency
//! ```
//!
//! It is linear in its parameters once turned over: `n / X(n) = a + b·n + c·n²` with
//! `a = (1−σ)/X1`, `b = (σ−κ)/X1`, `c = κ/X1`, so a least-squares fit on the saturated
//! throughputs measured at four or more replica counts gives the curve. The law then stops
//! where the gain ends: where one more replica would add less than a twentieth of what the
//! first one serves. Up to there a replica still adds messages a busy head may need (the
//! law sizes with the rate measured at the count it has); beyond it a replica costs a pod and
//! adds contention, not messages.
//!
//! Only saturated measurements count (the replicas had work waiting: what they served is what
//! they can serve). A head held at its limit measures only that count, so a curve is kept as
//! long as what is measured agrees with it; a measurement it does not explain (a dependency
//! became slower, which moves the whole curve) drops the other points. Without a curve,
//! points older than [`MAX_AGE_S`] are dropped.

use std::collections::BTreeMap;

/// Without a curve, points older than this are dropped: a curve is built from points of one
/// regime (a cold start's burst and a slow dependency five minutes later are two).
pub const MAX_AGE_S: f64 = 300.0;
/// Weight of a new measurement at a count already measured.
const GAIN: f64 = 0.5;
/// Replica counts measured before the curve is trusted: one more than its parameters, or any
/// three points fit exactly and the fit's error says nothing.
const MIN_COUNTS: usize = 4;
/// The smallest count must be this far below the largest for a fit to say anything about the
/// curve's shape (three neighbouring counts are noise).
const MIN_SPAN: f64 = 2.0;
/// One more replica is worth it while it adds at least this share of a first replica's
/// throughput (a quarter stopped a head short of what its load needed when the curve still
/// rose: the queue grew for minutes where more replicas would have served it).
const MARGINAL: f64 = 0.05;
/// A fitted curve must explain the points within this relative error to be used.
const MAX_FIT_ERROR: f64 = 0.15;

/// The fitted curve.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Curve {
    a: f64,
    b: f64,
    c: f64,
}

impl Curve {
    /// Whether it is a scalability curve at all: a positive throughput alone, contention in
    /// [0, 1) and coherency not negative (with room for noise). Points of two regimes (a fast
    /// and a slow dependency) can fit a quadratic that is none of these.
    fn plausible(&self) -> bool {
        let x1 = self.throughput(1.0);
        if !x1.is_finite() || x1 <= 0.0 {
            return false;
        }
        let (sigma, kappa) = (1.0 - self.a * x1, self.c * x1);
        (-0.05..1.0).contains(&sigma) && kappa >= -1e-3
    }

    /// Throughput at `n` replicas.
    pub fn throughput(&self, n: f64) -> f64 {
        let d = self.a + self.b * n + self.c * n * n;
        if d > 0.0 { n / d } else { f64::INFINITY }
    }

    /// The fewest replicas beyond which one more adds less than [`MARGINAL`] of a first
    /// replica's throughput; `None` when every replica up to `max` is worth it.
    pub fn limit(&self, max: u32) -> Option<u32> {
        let first = self.throughput(1.0);
        if !first.is_finite() || first <= 0.0 {
            return None;
        }
        (1..max).find(|&n| {
            let gain = self.throughput(f64::from(n + 1)) - self.throughput(f64::from(n));
            gain < MARGINAL * first
        })
    }
}

/// Saturated throughput measured per replica count.
#[derive(Clone, Debug, Default)]
pub struct Scalability {
    /// Replica count → (messages per second at saturation, when last measured).
    points: BTreeMap<u32, (f64, f64)>,
}

impl Scalability {
    /// Records that `replicas` replicas, saturated, served `throughput` per second at `now`.
    pub fn observe(&mut self, now: f64, replicas: u32, throughput: f64) {
        if replicas == 0 || !throughput.is_finite() || throughput <= 0.0 {
            return;
        }
        match self.curve() {
            Some(curve) => {
                let predicted = curve.throughput(f64::from(replicas));
                if ((throughput - predicted) / predicted).abs() > MAX_FIT_ERROR {
                    self.points.clear(); // another curve now: start again from this point
                }
            }
            None => self.points.retain(|_, (_, at)| now - *at <= MAX_AGE_S),
        }
        self.points
            .entry(replicas)
            .and_modify(|(x, at)| {
                *x += GAIN * (throughput - *x);
                *at = now;
            })
            .or_insert((throughput, now));
    }

    /// The curve through the recent points, if there are enough of them, far enough apart, and
    /// it explains them.
    pub fn curve(&self) -> Option<Curve> {
        if self.points.len() < MIN_COUNTS {
            return None;
        }
        let (lo, hi) = (
            *self.points.keys().next()?,
            *self.points.keys().next_back()?,
        );
        if f64::from(hi) < MIN_SPAN * f64::from(lo) {
            return None;
        }
        let pts: Vec<(f64, f64)> = self
            .points
            .iter()
            .map(|(n, (x, _))| (f64::from(*n), f64::from(*n) / x))
            .collect();
        let curve = fit(&pts)?;
        let fits = self.points.iter().all(|(n, (x, _))| {
            let predicted = curve.throughput(f64::from(*n));
            predicted.is_finite() && ((predicted - x) / x).abs() <= MAX_FIT_ERROR
        });
        (fits && curve.plausible()).then_some(curve)
    }

    /// The replica count where the gain ends, if the measured curve shows one below `max`;
    /// never below the count that served the most (what was measured outranks the curve).
    pub fn limit(&self, max: u32) -> Option<u32> {
        let limit = self.curve()?.limit(max)?;
        let best = self.best().map_or(0, |(n, _)| n);
        (limit.max(best) < max).then_some(limit.max(best))
    }

    /// The best throughput measured, and at how many replicas.
    pub fn best(&self) -> Option<(u32, f64)> {
        self.points
            .iter()
            .map(|(n, (x, _))| (*n, *x))
            .max_by(|l, r| l.1.total_cmp(&r.1))
    }
}

/// Least squares of `y = a + b·n + c·n²` (the normal equations, 3×3, by Cramer's rule).
fn fit(pts: &[(f64, f64)]) -> Option<Curve> {
    let mut s = [0.0f64; 5]; // Σ n^0..n^4
    let mut t = [0.0f64; 3]; // Σ y·n^0..n^2
    for &(n, y) in pts {
        let mut p = 1.0;
        for (k, sk) in s.iter_mut().enumerate() {
            *sk += p;
            if k < 3 {
                t[k] += y * p;
            }
            p *= n;
        }
    }
    let m = [[s[0], s[1], s[2]], [s[1], s[2], s[3]], [s[2], s[3], s[4]]];
    let det = det3(&m);
    if det.abs() < 1e-12 * s[4].max(1.0) {
        return None;
    }
    let solve = |col: usize| {
        let mut r = m;
        for (row, v) in r.iter_mut().zip(t) {
            row[col] = v;
        }
        det3(&r) / det
    };
    let curve = Curve {
        a: solve(0),
        b: solve(1),
        c: solve(2),
    };
    (curve.a.is_finite() && curve.b.is_finite() && curve.c.is_finite()).then_some(curve)
}

fn det3(m: &[[f64; 3]; 3]) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn usl(x1: f64, sigma: f64, kappa: f64, n: f64) -> f64 {
        n * x1 / (1.0 + sigma * (n - 1.0) + kappa * n * (n - 1.0))
    }

    fn measured(x1: f64, sigma: f64, kappa: f64, counts: &[u32]) -> Scalability {
        let mut s = Scalability::default();
        for (i, n) in counts.iter().enumerate() {
            s.observe(i as f64, *n, usl(x1, sigma, kappa, f64::from(*n)));
        }
        s
    }

    #[test]
    fn linear_scaling_has_no_limit() {
        let s = measured(50.0, 0.0, 0.0, &[1, 2, 4, 8, 16]);
        assert_eq!(s.limit(40), None);
    }

    #[test]
    fn a_shared_database_shows_where_the_gain_ends() {
        // 66 msg/s alone, contention 0.1, coherency 0.01: the peak is near n = 9.5.
        let s = measured(66.0, 0.1, 0.01, &[1, 3, 6, 10]);
        let curve = s.curve().unwrap();
        let limit = curve.limit(40).expect("a limit");
        let one_more = curve.throughput(f64::from(limit + 1)) - curve.throughput(f64::from(limit));
        assert!(one_more < MARGINAL * 66.0, "{limit}: {one_more}");
        let before = curve.throughput(f64::from(limit)) - curve.throughput(f64::from(limit - 1));
        assert!(before >= MARGINAL * 66.0, "{limit}: {before}");
        assert!((7..=10).contains(&limit), "at the peak: {limit}");
        // The head stops there, or at the count that served the most if that is more.
        assert_eq!(s.limit(40), Some(limit.max(10)));
    }

    #[test]
    fn too_few_or_too_close_counts_say_nothing() {
        assert!(measured(66.0, 0.1, 0.01, &[2, 8]).curve().is_none());
        assert!(
            measured(66.0, 0.1, 0.01, &[1, 3, 6]).curve().is_none(),
            "3 fit exactly"
        );
        assert!(measured(66.0, 0.1, 0.01, &[4, 5, 6, 7]).curve().is_none());
        assert!(Scalability::default().best().is_none());
    }

    #[test]
    fn a_curve_is_kept_while_measurements_agree_and_dropped_when_one_does_not() {
        let mut s = measured(66.0, 0.1, 0.01, &[1, 3, 6, 10]);
        let limit = s.limit(40);
        assert!(limit.is_some());
        // Held at the limit for an hour, measuring what the curve says.
        for i in 0..60 {
            let n = limit.unwrap();
            s.observe(60.0 * f64::from(i), n, usl(66.0, 0.1, 0.01, f64::from(n)));
        }
        assert_eq!(s.limit(40), limit, "still known");
        // A slower dependency: half the throughput at the same count.
        let n = limit.unwrap();
        s.observe(4000.0, n, usl(66.0, 0.1, 0.01, f64::from(n)) / 2.0);
        assert_eq!(s.points.len(), 1, "only the new point is left");
        assert!(s.curve().is_none());
    }

    #[test]
    fn without_a_curve_old_points_age_out() {
        let mut s = Scalability::default();
        s.observe(0.0, 2, 100.0);
        s.observe(1.0, 4, 180.0);
        s.observe(2.0, 6, 240.0);
        s.observe(MAX_AGE_S + 10.0, 8, 300.0);
        assert_eq!(s.points.len(), 1);
    }

    #[test]
    fn two_regimes_are_not_a_curve_and_never_cap_below_the_best_measured() {
        // A cold start at 13 replicas, 50/s each (650/s); minutes later a dependency 3x
        // slower: 15/s each at 4 and 8 and 6 replicas. No contention anywhere.
        let mut s = Scalability::default();
        s.observe(5.0, 13, 650.0);
        for (t, n) in [(200.0, 4), (230.0, 6), (260.0, 8)] {
            s.observe(t, n, 15.0 * f64::from(n));
        }
        let limit = s.limit(40);
        assert!(limit.is_none_or(|l| l >= 13), "{limit:?}");
    }

    #[test]
    fn noise_that_no_curve_explains_is_not_used() {
        let mut s = Scalability::default();
        for (n, x) in [(1, 50.0), (2, 400.0), (4, 60.0), (8, 500.0), (16, 70.0)] {
            s.observe(0.0, n, x);
        }
        assert!(s.curve().is_none());
    }

    proptest! {
        #[test]
        fn the_fit_recovers_the_curve(
            x1 in 5.0f64..500.0,
            sigma in 0.0f64..0.5,
            kappa in 0.0f64..0.05,
        ) {
            let s = measured(x1, sigma, kappa, &[1, 2, 4, 7, 12]);
            let curve = s.curve().expect("exact points fit");
            for n in [1.0, 3.0, 5.0, 10.0] {
                let want = usl(x1, sigma, kappa, n);
                prop_assert!((curve.throughput(n) - want).abs() <= 1e-6 * want.max(1.0));
            }
            // The limit, when there is one, is where the marginal gain falls below MARGINAL.
            if let Some(l) = curve.limit(40) {
                let gain = usl(x1, sigma, kappa, f64::from(l + 1)) - usl(x1, sigma, kappa, f64::from(l));
                prop_assert!(gain < MARGINAL * x1 + 1e-6);
            }
        }
    }
}
