//! The reference model of a head under load (docs/autoscaling.md, "Simulator"): a fluid queue
//! for workers, M/M/c (Erlang C) below saturation and a fluid backlog above it for query heads.

use crate::autoscale::histogram::Histogram;

/// Request-duration buckets of the query heads (the SDK's, so the simulated histograms are read
/// exactly as the operator reads real ones).
pub const LATENCY_BUCKETS: &[f64] = &chimera_contract::metrics::BUCKETS;

/// A worker head's queue.
#[derive(Clone, Debug, Default)]
pub struct WorkerQueue {
    /// Messages in the queue (ready + unacked).
    pub backlog: f64,
    /// Cumulative arrivals after each second.
    pub arrived: Vec<f64>,
    /// Cumulative departures (acks) after each second.
    pub departed: Vec<f64>,
}

impl WorkerQueue {
    /// Advances one second: `rate` arrive, `capacity` can be served.
    pub fn step(&mut self, rate: f64, capacity: f64) {
        let served = (self.backlog + rate).min(capacity.max(0.0));
        self.backlog = self.backlog + rate - served;
        let a = self.arrived.last().copied().unwrap_or(0.0) + rate;
        let d = self.departed.last().copied().unwrap_or(0.0) + served;
        self.arrived.push(a);
        self.departed.push(d);
    }

    /// Acks so far.
    pub fn acked(&self) -> f64 {
        self.departed.last().copied().unwrap_or(0.0)
    }

    /// Seconds the 99th percentile of each second's arrivals waited (None: nothing arrived);
    /// what never got served counts until the end.
    pub fn waits(&self) -> Vec<Option<f64>> {
        let n = self.arrived.len();
        (0..n)
            .map(|t| {
                let before = if t == 0 { 0.0 } else { self.arrived[t - 1] };
                let arrived = self.arrived[t] - before;
                if arrived <= 0.0 {
                    return None;
                }
                let level = before + 0.99 * arrived - 1e-9;
                let served_at = t + self.departed[t..].partition_point(|d| *d < level);
                #[allow(clippy::cast_precision_loss)]
                Some((served_at - t) as f64)
            })
            .collect()
    }
}

/// A query head's requests.
#[derive(Clone, Debug)]
pub struct QueryLoad {
    /// Requests waiting beyond the servers (fluid, above saturation).
    pub queued: f64,
    /// Cumulative request-duration histogram of completed requests.
    pub histogram: Histogram,
    /// Requests in the pods now (in service and waiting).
    pub in_flight: f64,
}

impl Default for QueryLoad {
    fn default() -> Self {
        Self {
            queued: 0.0,
            histogram: Histogram::empty(LATENCY_BUCKETS),
            in_flight: 0.0,
        }
    }
}

/// One second of a query head.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuerySecond {
    /// p95 latency of the second, in seconds (infinite with no server).
    pub p95: f64,
}

impl QueryLoad {
    /// Advances one second: `rate` requests/s, `service` seconds each, `servers` in parallel.
    pub fn step(&mut self, rate: f64, service: f64, servers: u32) -> QuerySecond {
        let c = f64::from(servers);
        let capacity = if service > 0.0 { c / service } else { 0.0 };
        if capacity <= 0.0 {
            self.queued += rate;
            self.in_flight = self.queued;
            return QuerySecond { p95: f64::INFINITY };
        }
        let mu = 1.0 / service;
        if self.queued > 0.0 || rate >= capacity {
            let served = (self.queued + rate).min(capacity);
            self.queued = (self.queued + rate - capacity).max(0.0);
            let latency = service + self.queued / capacity;
            self.histogram.observe_n(latency, served);
            self.in_flight = c + self.queued;
            return QuerySecond { p95: latency };
        }
        let offered = rate * service;
        let wait_prob = erlang_c(servers, offered);
        let spare = c * mu - rate;
        let wait95 = if wait_prob <= 0.05 {
            0.0
        } else {
            (wait_prob / 0.05).ln() / spare
        };
        // The second's completions spread over the buckets by the M/M/c waiting-time law:
        // P(latency > s + x) = C · e^(-spare·x).
        let mut below = 0.0;
        let h = &mut self.histogram;
        for (bound, count) in h.bounds.iter().zip(h.counts.iter_mut()) {
            let share = if *bound < service {
                0.0
            } else {
                1.0 - wait_prob * (-spare * (bound - service)).exp()
            };
            below = share.max(below);
            *count += rate * below;
        }
        h.total += rate;
        h.sum += rate * (service + wait_prob / spare);
        self.in_flight = rate * (service + wait_prob / spare);
        QuerySecond {
            p95: service + wait95,
        }
    }
}

/// Erlang C: the probability that a request waits, with `servers` servers and `offered`
/// Erlangs (offered < servers).
pub fn erlang_c(servers: u32, offered: f64) -> f64 {
    if servers == 0 {
        return 1.0;
    }
    let c = f64::from(servers);
    if offered >= c {
        return 1.0;
    }
    // Erlang B by its stable recurrence, then C from B.
    let mut b = 1.0;
    for k in 1..=servers {
        b = offered * b / (f64::from(k) + offered * b);
    }
    let rho = offered / c;
    b / (1.0 - rho * (1.0 - b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erlang_c_known_values() {
        // One server: C = rho.
        assert!((erlang_c(1, 0.5) - 0.5).abs() < 1e-12);
        // Two servers, 1 Erlang: C = 1/3.
        assert!((erlang_c(2, 1.0) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(erlang_c(4, 5.0), 1.0);
        assert!(erlang_c(320, 200.0) < 1e-6);
    }

    #[test]
    fn a_worker_queue_builds_and_drains() {
        let mut q = WorkerQueue::default();
        q.step(100.0, 50.0);
        q.step(0.0, 50.0);
        assert_eq!(q.backlog, 0.0);
        assert_eq!(q.acked(), 100.0);
        let waits = q.waits();
        assert_eq!(
            waits[0],
            Some(1.0),
            "the last of the first second waits one"
        );
        assert_eq!(waits[1], None);
    }

    #[test]
    fn unserved_work_waits_until_the_end() {
        let mut q = WorkerQueue::default();
        for _ in 0..5 {
            q.step(10.0, 0.0);
        }
        assert_eq!(q.waits()[0], Some(5.0));
    }

    #[test]
    fn query_latency_rises_with_load_and_overload_queues() {
        let mut light = QueryLoad::default();
        assert!((light.step(100.0, 0.02, 16).p95 - 0.02).abs() < 1e-9);
        let mut busy = QueryLoad::default();
        let p = busy.step(700.0, 0.02, 16).p95;
        assert!(p > 0.02 && p < 0.2, "{p}");
        let mut over = QueryLoad::default();
        let first = over.step(1200.0, 0.02, 16).p95;
        let second = over.step(1200.0, 0.02, 16).p95;
        assert!(second > first && over.queued > 0.0);
        assert!(
            (over.histogram.total - 1600.0).abs() < 1e-6,
            "only what was served completes"
        );
    }
}
