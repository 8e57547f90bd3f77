#!/usr/bin/env python3
"""Writes seeded scenario families in the simulator's format (JSON + per-second CSV trace).

usage: generate.py --seed N --out DIR [--per-family K]

Each family draws its parameters (load, service time, pod start-up, SLO) from the seed, so the
laws are judged on shapes, not on one tuned instance. Families: slow dependency (service time
steps and ramps at a constant rate, query and worker), sawtooth, spiky and bursty arrivals, two
bursts, gradual slowdown, trickle, idle then burst, and workers sharing one database (the
Universal Scalability Law's contention and coherency: past a count, more replicas serve less).
Standard library only.
"""
import argparse
import json
import math
import os
import random

DURATION_S = 1800


def worker_head(rng, min_replicas=1):
    mu = rng.choice([20.0, 50.0, 100.0])
    return {
        "head": "worker",
        "tick_s": 1,
        "pod_startup_s": rng.choice([5, 10, 15, 20]),
        "min_replicas": min_replicas,
        "max_replicas": 40,
        "service": {"per_replica_rate": mu},
        "slo": {"queue_wait_p99_s": rng.choice([15, 30, 60])},
    }, mu


def query_head(rng):
    service_ms = rng.choice([10.0, 20.0, 40.0])
    concurrency = rng.choice([4, 8, 16])
    return {
        "head": "query",
        "tick_s": 1,
        "pod_startup_s": rng.choice([5, 8, 15]),
        "min_replicas": 1,
        "max_replicas": 40,
        "service": {"service_ms": service_ms, "concurrency": concurrency},
        "slo": {"latency_p95_ms": round(service_ms * rng.choice([3, 5, 8]))},
    }, concurrency / (service_ms / 1000.0)


def poisson(rng, mean):
    """A Poisson count (Knuth for small means, normal beyond)."""
    if mean <= 0:
        return 0
    if mean > 50:
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def constant_rate(capacity, rng, replicas=(3, 8)):
    """A rate that keeps `replicas` busy at about 70 %."""
    return capacity * rng.uniform(*replicas) * 0.7


def slow_dependency_step(rng, head, capacity):
    rate = constant_rate(capacity, rng)
    start, length, factor = rng.randint(300, 700), rng.randint(120, 600), rng.uniform(2.0, 4.0)
    scale = [factor if start <= t < start + length else 1.0 for t in range(DURATION_S)]
    return [rate] * DURATION_S, scale


def slow_dependency_ramp(rng, head, capacity):
    rate = constant_rate(capacity, rng)
    start, ramp, hold, factor = rng.randint(200, 500), rng.randint(60, 300), rng.randint(120, 400), rng.uniform(2.0, 4.0)
    scale = []
    for t in range(DURATION_S):
        if t < start:
            s = 1.0
        elif t < start + ramp:
            s = 1.0 + (factor - 1.0) * (t - start) / ramp
        elif t < start + ramp + hold:
            s = factor
        elif t < start + 2 * ramp + hold:
            s = factor - (factor - 1.0) * (t - start - ramp - hold) / ramp
        else:
            s = 1.0
        scale.append(s)
    return [rate] * DURATION_S, scale


def sawtooth(rng, head, capacity):
    low, high = constant_rate(capacity, rng, (0.5, 2)), constant_rate(capacity, rng, (6, 14))
    period = rng.randint(120, 400)
    return [low + (high - low) * (t % period) / period for t in range(DURATION_S)], None


def spiky(rng, head, capacity):
    base = constant_rate(capacity, rng, (1, 4))
    rates = [base] * DURATION_S
    t = rng.randint(30, 120)
    while t < DURATION_S:
        width, height = rng.randint(2, 10), rng.uniform(4.0, 10.0)
        for u in range(t, min(DURATION_S, t + width)):
            rates[u] = base * height
        t += width + int(rng.expovariate(1 / 150)) + 20
    return rates, None


def bursty(rng, head, capacity):
    low, high = constant_rate(capacity, rng, (0.3, 1.5)), constant_rate(capacity, rng, (5, 15))
    rates, on, t = [], False, 0
    while t < DURATION_S:
        length = max(3, int(rng.expovariate(1 / (30 if on else 90))))
        rates.extend([high if on else low] * length)
        on, t = not on, t + length
    return rates[:DURATION_S], None


def two_bursts(rng, head, capacity):
    base = constant_rate(capacity, rng, (0.2, 1))
    rates = [base] * DURATION_S
    first = rng.randint(200, 500)
    gap = rng.randint(60, 600)
    for start in (first, first + gap):
        width, height = rng.randint(10, 60), constant_rate(capacity, rng, (8, 20))
        for t in range(start, min(DURATION_S, start + width)):
            rates[t] = height
    return rates, None


def gradual_slowdown(rng, head, capacity):
    rate = constant_rate(capacity, rng)
    start, length, factor = rng.randint(100, 400), rng.randint(900, 1300), rng.uniform(2.0, 2.5)
    scale = [1.0 + (factor - 1.0) * min(1.0, max(0.0, (t - start) / length)) for t in range(DURATION_S)]
    return [rate] * DURATION_S, scale


def trickle(rng, head, capacity):
    mean = rng.uniform(0.2, 1.0)
    return [poisson(rng, mean) for _ in range(DURATION_S)], None


def idle_then_burst(rng, head, capacity):
    rates = [0.0] * DURATION_S
    start, width = rng.randint(400, 900), rng.randint(5, 30)
    height = constant_rate(capacity, rng, (10, 25))
    for t in range(start, start + width):
        rates[t] = height
    return rates, None


def shared_database(rng, head, peak):
    """Replicas that share one database (see `contended`): a quiet base, then a long phase at
    70-95 % of the most any replica count serves, then quiet again."""
    base = peak * rng.uniform(0.1, 0.3)
    start, length = rng.randint(200, 500), rng.randint(300, 900)
    high = peak * rng.uniform(0.7, 0.95)
    return [high if start <= t < start + length else base for t in range(DURATION_S)], None


def contended(rng, head, mu):
    """Gives the head Universal-Scalability-Law contention and coherency; returns the most
    messages per second any replica count serves (the load is drawn against that)."""
    sigma, kappa = rng.uniform(0.03, 0.15), rng.uniform(0.001, 0.02)
    head["service"] = dict(head["service"], contention=round(sigma, 4), coherency=round(kappa, 4))
    best = max(n * mu / (1 + sigma * (n - 1) + kappa * n * (n - 1)) for n in range(1, head["max_replicas"] + 1))
    return best


# family: (shape, heads it applies to, worker min replicas)
FAMILIES = {
    "slow-dependency-step": (slow_dependency_step, ("query", "worker"), 1),
    "slow-dependency-ramp": (slow_dependency_ramp, ("query", "worker"), 1),
    "sawtooth": (sawtooth, ("query", "worker"), 1),
    "spiky": (spiky, ("query", "worker"), 1),
    "bursty": (bursty, ("query", "worker"), 1),
    "two-bursts": (two_bursts, ("worker",), 1),
    "gradual-slowdown": (gradual_slowdown, ("query", "worker"), 1),
    "trickle": (trickle, ("worker",), 0),
    "idle-then-burst": (idle_then_burst, ("worker",), 0),
    # Last, so that adding it left the other families of a seed as they were.
    "shared-database": (shared_database, ("worker",), 1),
}


def write(out, name, head, rates, scale):
    head = dict(head, name=name, duration_s=DURATION_S, trace=f"{name}.csv")
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(head, f, indent=2)
        f.write("\n")
    with open(os.path.join(out, f"{name}.csv"), "w") as f:
        f.write("t_s,rate,service_scale\n")
        for t, rate in enumerate(rates):
            s = scale[t] if scale else 1.0
            f.write(f"{t},{rate:.3f},{s:.3f}\n")


def main():
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--seed", type=int, required=True)
    args.add_argument("--out", required=True)
    args.add_argument("--per-family", type=int, default=1, help="instances of each family and head")
    a = args.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rng = random.Random(a.seed)
    written = 0
    for family, (shape, heads, worker_min) in FAMILIES.items():
        for head_kind in heads:
            for i in range(a.per_family):
                head, capacity = worker_head(rng, worker_min) if head_kind == "worker" else query_head(rng)
                if shape is shared_database:
                    capacity = contended(rng, head, capacity)
                rates, scale = shape(rng, head_kind, capacity)
                suffix = f"-{i + 1}" if a.per_family > 1 else ""
                write(a.out, f"{head_kind}-{family}{suffix}", head, rates, scale)
                written += 1
    print(f"wrote {written} scenarios (seed {a.seed}) to {a.out}")


if __name__ == "__main__":
    main()
