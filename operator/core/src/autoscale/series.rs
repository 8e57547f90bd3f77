//! Trailing windows over cumulative counters: rates from what a control plane can read
//! (message and request totals), robust to counter resets (a restarted pod starts from zero).

use std::collections::VecDeque;

/// Samples `(time in seconds, cumulative value)` of one counter, kept for `horizon` seconds.
#[derive(Clone, Debug)]
pub struct Counter {
    samples: VecDeque<(f64, f64)>,
    horizon: f64,
    /// Added to raw values after a reset, so the series stays monotonic.
    offset: f64,
    last_raw: Option<f64>,
}

impl Counter {
    /// A counter keeping `horizon` seconds of samples.
    pub fn new(horizon: f64) -> Self {
        Self {
            samples: VecDeque::new(),
            horizon,
            offset: 0.0,
            last_raw: None,
        }
    }

    /// Records the counter's raw value at `t`. A value below the previous one is a reset: the
    /// series continues from where it was.
    pub fn push(&mut self, t: f64, raw: f64) {
        if let Some(last) = self.last_raw
            && raw < last
        {
            self.offset += last;
        }
        self.last_raw = Some(raw);
        self.samples.push_back((t, raw + self.offset));
        while self
            .samples
            .front()
            .is_some_and(|(t0, _)| t - t0 > self.horizon)
            && self.samples.len() > 2
        {
            self.samples.pop_front();
        }
    }

    /// Increase per second over (about) the last `window` seconds: from the newest sample back
    /// to the oldest one no older than `window`. None with fewer than two samples.
    pub fn rate(&self, window: f64) -> Option<f64> {
        let &(t1, v1) = self.samples.back()?;
        let &(t0, v0) = self
            .samples
            .iter()
            .find(|(t, _)| t1 - t <= window + 1e-9)
            .filter(|(t, _)| t1 - t > 1e-9)
            .or_else(|| self.samples.iter().rev().nth(1))?;
        (t1 > t0).then(|| (v1 - v0) / (t1 - t0))
    }

    /// The newest (monotonic) value.
    pub fn latest(&self) -> Option<f64> {
        self.samples.back().map(|(_, v)| *v)
    }
}

/// Recent values of a gauge with their times (recommendations, for stabilization windows).
#[derive(Clone, Debug, Default)]
pub struct Recent {
    samples: VecDeque<(f64, f64)>,
}

impl Recent {
    /// Records `value` at `t` and forgets what is older than `horizon`.
    pub fn push(&mut self, t: f64, value: f64, horizon: f64) {
        self.samples.push_back((t, value));
        while self.samples.front().is_some_and(|(t0, _)| t - t0 > horizon) {
            self.samples.pop_front();
        }
    }

    /// The largest value no older than `window` seconds before `now`.
    pub fn max_since(&self, now: f64, window: f64) -> Option<f64> {
        self.samples
            .iter()
            .filter(|(t, _)| now - t <= window + 1e-9)
            .map(|(_, v)| *v)
            .reduce(f64::max)
    }

    /// Seconds from the oldest value kept to `now` (0 with none).
    pub fn span(&self, now: f64) -> f64 {
        self.samples.front().map_or(0.0, |(t, _)| now - t)
    }

    /// The smallest value no older than `window` seconds before `now`.
    pub fn min_since(&self, now: f64, window: f64) -> Option<f64> {
        self.samples
            .iter()
            .filter(|(t, _)| now - t <= window + 1e-9)
            .map(|(_, v)| *v)
            .reduce(f64::min)
    }
}

/// Least-squares slope and mean of `(x, y)` points; `None` without two distinct x.
pub fn fit(points: impl Iterator<Item = (f64, f64)> + Clone) -> Option<(f64, f64)> {
    let n = points.clone().count();
    if n < 2 {
        return None;
    }
    #[allow(clippy::cast_precision_loss)]
    let count = n as f64;
    let (mx, my) = points
        .clone()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x / count, b + y / count));
    let (cov, var) = points.fold((0.0, 0.0), |(c, v), (x, y)| {
        (c + (x - mx) * (y - my), v + (x - mx) * (x - mx))
    });
    (var > 0.0).then(|| (cov / var, my))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_least_squares_fit_finds_a_line() {
        let points = (0..5).map(|x| (f64::from(x), 3.0 + 0.5 * f64::from(x)));
        let (slope, mean) = fit(points).unwrap();
        assert!((slope - 0.5).abs() < 1e-12 && (mean - 4.0).abs() < 1e-12);
        assert_eq!(fit([(1.0, 2.0), (1.0, 3.0)].into_iter()), None);
    }

    #[test]
    fn rates_over_windows() {
        let mut c = Counter::new(60.0);
        for t in 0..=10 {
            c.push(f64::from(t), f64::from(t * 10));
        }
        assert_eq!(c.rate(5.0), Some(10.0));
        assert_eq!(c.rate(100.0), Some(10.0));
        assert_eq!(c.rate(0.5), Some(10.0), "at least the last interval");
    }

    #[test]
    fn a_reset_continues_the_series() {
        let mut c = Counter::new(60.0);
        c.push(0.0, 100.0);
        c.push(1.0, 110.0);
        c.push(2.0, 5.0); // the pod restarted
        c.push(3.0, 15.0);
        assert_eq!(c.latest(), Some(125.0));
        assert_eq!(c.rate(1.0), Some(10.0));
        assert!(c.rate(10.0).is_some_and(|r| r > 0.0));
    }

    #[test]
    fn one_sample_has_no_rate() {
        let mut c = Counter::new(60.0);
        assert_eq!(c.rate(5.0), None);
        c.push(0.0, 3.0);
        assert_eq!(c.rate(5.0), None);
    }

    #[test]
    fn recent_extremes_respect_the_window() {
        let mut r = Recent::default();
        for (t, v) in [(0.0, 5.0), (10.0, 3.0), (20.0, 4.0)] {
            r.push(t, v, 100.0);
        }
        assert_eq!(r.max_since(20.0, 15.0), Some(4.0));
        assert_eq!(r.max_since(20.0, 25.0), Some(5.0));
        assert_eq!(r.min_since(20.0, 25.0), Some(3.0));
    }
}
