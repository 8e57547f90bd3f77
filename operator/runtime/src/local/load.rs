//! `chimera load`: marketplace traffic at a rate that follows a profile. Commands (register
//! users, publish gigs, place, deliver and complete orders) go to the broker with confirms;
//! reads go to the query heads' stable URLs. A line per second shows progress; a summary ends.
//!
//! The load is open-loop: what the profile asks for is owed from the clock, not from the ticks
//! that ran, so a slow publish is caught up on the next tick. When the broker or the machine
//! cannot keep up, the lines and the summary say so, with the achieved rate beside the asked
//! one, rather than quietly sending less.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::json;

use super::snapshot::{Snapshot, UpFile};
use chimera_broker::{Outgoing, Publisher, connect};
use chimera_contract::envelope::Envelope;

/// `chimera load` options.
#[derive(Clone, Debug, clap::Args)]
pub struct LoadArgs {
    /// `step`, `ramp`, `burst`, or a CSV file `t_s,rate` (rate in commands per second).
    #[arg(long, default_value = "step")]
    pub profile: String,
    /// How long, e.g. `60s`, `2m`.
    #[arg(long, default_value = "60s")]
    pub duration: String,
    /// Peak commands per second (reads follow at the same rate). The default is enough to
    /// make the marketplace's workers scale out on a small machine.
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// The state directory of the `chimera up` to drive.
    #[arg(long, default_value = ".chimera")]
    pub state_dir: PathBuf,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A rate profile: commands per second at second t of d.
#[derive(Clone, Debug, PartialEq)]
pub enum Profile {
    /// A fifth of the rate, then the rate for the middle third, then a fifth again.
    Step,
    /// From zero to the rate.
    Ramp,
    /// A tenth of the rate, with the full rate between 20 % and 40 % of the run.
    Burst,
    /// Per-second rates from a file (the last one holds).
    File(Vec<f64>),
}

impl Profile {
    /// Parses `step`, `ramp`, `burst` or a CSV path.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        Ok(match text {
            "step" => Self::Step,
            "ramp" => Self::Ramp,
            "burst" => Self::Burst,
            path => {
                let csv = std::fs::read_to_string(path).with_context(|| {
                    format!("--profile {path:?}: not step, ramp, burst or a readable CSV file")
                })?;
                let trace = chimera_core::sim::scenario::parse_trace(&csv, 86_400)
                    .map_err(|e| anyhow::anyhow!("--profile {path}: {e}"))?;
                let last = trace
                    .iter()
                    .rposition(|s| s.rate > 0.0)
                    .map_or(0, |i| i + 1);
                Self::File(trace[..last].iter().map(|s| s.rate).collect())
            }
        })
    }

    /// Commands per second at `t` of `duration` seconds, for a peak of `peak`.
    pub fn rate(&self, t: f64, duration: f64, peak: f64) -> f64 {
        let x = if duration > 0.0 { t / duration } else { 0.0 };
        match self {
            Self::Step if (1.0 / 3.0..2.0 / 3.0).contains(&x) => peak,
            Self::Step => peak / 5.0,
            Self::Ramp => peak * x.clamp(0.0, 1.0),
            Self::Burst if (0.2..0.4).contains(&x) => peak,
            Self::Burst => peak / 10.0,
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Self::File(rates) => rates
                .get(t.max(0.0) as usize)
                .or(rates.last())
                .copied()
                .unwrap_or(0.0),
        }
    }
}

/// Parses `90`, `90s`, `2m`, `1h`.
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((text, "s"), |i| text.split_at(i));
    let n: f64 = number
        .parse()
        .with_context(|| format!("--duration {text:?}: expected e.g. 60s, 2m"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => anyhow::bail!("--duration {text:?}: unknown unit {other:?} (s, m, h)"),
    };
    Duration::try_from_secs_f64(seconds.max(0.0))
        .map_err(|_| anyhow::anyhow!("--duration {text:?} is too long"))
}

/// The next command of the marketplace flow: a mix of registrations, gigs and orders that only
/// refers to what earlier commands created (so the commands are valid).
#[derive(Debug, Default)]
pub struct Flow {
    run: String,
    step: u64,
    users: u64,
    gigs: u64,
    orders: u64,
    delivered: u64,
    completed: u64,
}

impl Flow {
    /// A flow whose ids carry `run`.
    pub fn new(run: &str) -> Self {
        Self {
            run: run.to_owned(),
            ..Self::default()
        }
    }

    /// The next command: (domain, type, data).
    pub fn next_command(&mut self) -> (&'static str, &'static str, serde_json::Value) {
        let run = &self.run;
        self.step += 1;
        let choice = self.step % 10;
        if self.users < 2 || choice < 3 {
            self.users += 1;
            let n = self.users;
            return (
                "users",
                "user.register",
                json!({"user_id": format!("u-{run}-{n}"), "name": format!("User {n}"), "email": format!("u{n}@load.example")}),
            );
        }
        if self.gigs < 1 || choice < 5 {
            self.gigs += 1;
            let (n, seller) = (self.gigs, 1 + self.gigs % self.users);
            return (
                "gigs",
                "gig.publish",
                json!({"gig_id": format!("g-{run}-{n}"), "seller_id": format!("u-{run}-{seller}"), "title": format!("Gig {n}"), "price_cents": 1000 + n}),
            );
        }
        if choice < 8 || self.orders <= self.delivered {
            self.orders += 1;
            let (n, gig, buyer) = (
                self.orders,
                1 + self.orders % self.gigs,
                1 + (self.orders * 7) % self.users,
            );
            return (
                "orders",
                "order.place",
                json!({"order_id": format!("o-{run}-{n}"), "gig_id": format!("g-{run}-{gig}"), "buyer_id": format!("u-{run}-{buyer}")}),
            );
        }
        if self.delivered <= self.completed || choice < 9 {
            self.delivered += 1;
            return (
                "orders",
                "order.deliver",
                json!({"order_id": format!("o-{run}-{}", self.delivered)}),
            );
        }
        self.completed += 1;
        (
            "orders",
            "order.complete",
            json!({"order_id": format!("o-{run}-{}", self.completed)}),
        )
    }

    /// A read of something created: (domain, path).
    pub fn read(&self) -> (&'static str, String) {
        let run = &self.run;
        match self.step % 3 {
            0 if self.orders > 0 => (
                "orders",
                format!("/orders/o-{run}-{}", 1 + self.step % self.orders),
            ),
            1 if self.gigs > 0 => (
                "gigs",
                format!("/gigs/g-{run}-{}", 1 + self.step % self.gigs),
            ),
            _ => (
                "users",
                format!("/users/u-{run}-{}", 1 + self.step % self.users.max(1)),
            ),
        }
    }
}

/// The end of a run.
#[derive(Debug, Default, Serialize, serde::Deserialize)]
pub struct Summary {
    /// The run's id, in every id it created (`u-<run>-<n>`, `g-...`, `o-...`).
    pub run: String,
    /// Commands confirmed, by type.
    pub commands: std::collections::BTreeMap<String, u64>,
    /// Seconds the run took.
    pub elapsed_s: f64,
    /// Commands the profile asked for over the run.
    pub asked: u64,
    /// Mean rate the profile asked for, commands per second.
    pub asked_rate: f64,
    /// Mean rate achieved (sent over elapsed), commands per second.
    pub achieved_rate: f64,
    /// True when fewer commands were sent than asked for (beyond one tick's rounding): the
    /// broker or this machine could not take the rate.
    pub fell_behind: bool,
    /// Commands sent.
    pub sent: u64,
    /// Commands the broker confirmed.
    pub confirmed: u64,
    /// Commands not confirmed, and failed reads.
    pub errors: u64,
    /// Reads done.
    pub reads: u64,
    /// Reads that were not 2xx/404.
    pub read_errors: u64,
    /// Reads not sent because too many were in flight already (the query heads were slower
    /// than the rate): the generator sheds them rather than slowing its commands.
    pub reads_shed: u64,
    /// Read latency p50, ms.
    pub read_p50_ms: f64,
    /// Read latency p99, ms.
    pub read_p99_ms: f64,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs the load against the `chimera up` of `state_dir`.
pub async fn load(args: &LoadArgs) -> anyhow::Result<Summary> {
    let profile = Profile::parse(&args.profile)?;
    let duration = parse_duration(&args.duration)?.as_secs_f64();
    let up = UpFile::read(&args.state_dir)?;
    let snapshot: Snapshot = reqwest::get(format!("{}/api/status", up.dashboard))
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("chimera up does not answer at {}", up.dashboard))?
        .json()
        .await?;
    let urls: std::collections::BTreeMap<String, String> = snapshot
        .modules
        .iter()
        .flat_map(|m| {
            m.heads
                .iter()
                .filter_map(|h| h.url.clone().map(|u| (m.domain.clone(), u)))
        })
        .collect();
    let amqp = up.amqp_url.clone();
    let connection = connect(&amqp, "chimera-load")
        .await
        .with_context(|| "connecting to chimera up's broker")?;
    let publisher = Publisher::open(&connection).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let run = format!(
        "{:x}",
        std::process::id() ^ u32::try_from(jiff_now_ms() % 1_000_000).unwrap_or(0)
    );
    let mut flow = Flow::new(&run);
    let mut summary = Summary {
        run,
        ..Summary::default()
    };
    let mut latencies = Vec::new();
    let started = Instant::now();
    let tick = Duration::from_millis(100);
    let mut ticks = tokio::time::interval(tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // At most one second of the peak rate per tick: after a stall, the generator catches up
    // over several ticks, and what it cannot catch up shows as behind.
    let mut pace = Pace::with_max_batch(args.rate);
    let mut last_line = Line::default();
    let reads = std::sync::Arc::new(tokio::sync::Mutex::new(Vec::<Result<f64, ()>>::new()));
    // Reads in flight at once; beyond it reads are shed (and counted), commands go on.
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
    loop {
        ticks.tick().await;
        let t = started.elapsed().as_secs_f64().min(duration);
        let n = pace.owed(t, |at| profile.rate(at, duration, args.rate));
        let mut batch = Vec::with_capacity(n);
        let mut kinds = Vec::with_capacity(n);
        for _ in 0..n {
            let (domain, kind, data) = flow.next_command();
            kinds.push(kind);
            batch.push(Outgoing::new(
                format!("chimera.{domain}.commands"),
                Envelope::new(kind, data),
            ));
            let (domain, path) = flow.read();
            if let Some(base) = urls.get(domain) {
                let (http, url, reads) = (http.clone(), format!("{base}{path}"), reads.clone());
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    summary.reads_shed += 1;
                    continue;
                };
                tokio::spawn(async move {
                    let _permit = permit;
                    let sent = Instant::now();
                    let ok = http
                        .get(&url)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success() || r.status() == 404);
                    let ms = sent.elapsed().as_secs_f64() * 1000.0;
                    reads.lock().await.push(if ok { Ok(ms) } else { Err(()) });
                });
            }
        }
        summary.sent += batch.len() as u64;
        pace.sent(batch.len());
        match publisher.publish_all(&batch, false).await {
            Ok(()) => {
                summary.confirmed += batch.len() as u64;
                for kind in kinds {
                    *summary.commands.entry(kind.to_owned()).or_default() += 1;
                }
            }
            Err(error) => {
                summary.errors += batch.len() as u64;
                eprintln!("chimera load: {error}");
            }
        }
        if t - last_line.t >= 1.0 || t >= duration {
            let line = Line {
                t,
                asked: pace.asked,
                sent: summary.sent,
            };
            eprintln!(
                "{}  confirmed {:>7}  errors {}",
                line.describe(&last_line, profile.rate(t, duration, args.rate)),
                summary.confirmed,
                summary.errors
            );
            last_line = line;
        }
        if t >= duration {
            break;
        }
    }
    summary.elapsed_s = started.elapsed().as_secs_f64();
    summary.asked = pace.asked_whole();
    summary.asked_rate = rate(summary.asked, duration);
    summary.achieved_rate = rate(summary.sent, summary.elapsed_s);
    summary.fell_behind = pace.behind();
    // Every read finishes (or times out) before the summary.
    let _ = in_flight.acquire_many(256).await;
    for r in reads.lock().await.drain(..) {
        summary.reads += 1;
        match r {
            Ok(ms) => latencies.push(ms),
            Err(()) => summary.read_errors += 1,
        }
    }
    latencies.sort_by(f64::total_cmp);
    summary.read_p50_ms = percentile(&latencies, 0.5);
    summary.read_p99_ms = percentile(&latencies, 0.99);
    connection.close(200, "done".into()).await.ok();
    Ok(summary)
}

/// Commands asked for against commands sent: the open-loop accounting of a run.
#[derive(Debug)]
struct Pace {
    /// Commands the profile asked for up to the last `owed` call (fractional).
    asked: f64,
    /// Seconds into the run of the last `owed` call.
    t: f64,
    /// Commands sent so far.
    sent: u64,
    /// The most commands one call owes.
    max_batch: u64,
}

impl Pace {
    /// A pace that owes at most `per_call` commands (at least 1) at once.
    fn with_max_batch(per_call: f64) -> Self {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let max_batch = per_call.ceil().max(1.0) as u64;
        Self {
            asked: 0.0,
            t: 0.0,
            sent: 0,
            max_batch,
        }
    }

    /// Commands to send now: what was asked for up to `t` and not yet sent, at most the
    /// maximum batch. The profile is integrated over the real time since the last call (a slow
    /// tick owes more), at the rate of the interval's midpoint.
    fn owed(&mut self, t: f64, rate: impl Fn(f64) -> f64) -> usize {
        let dt = (t - self.t).max(0.0);
        self.asked += rate(self.t + dt / 2.0).max(0.0) * dt;
        self.t = t;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let due = (self.asked.floor() as u64)
            .saturating_sub(self.sent)
            .min(self.max_batch);
        usize::try_from(due).unwrap_or(usize::MAX)
    }

    fn sent(&mut self, n: usize) {
        self.sent += n as u64;
    }

    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    fn asked_whole(&self) -> u64 {
        self.asked.floor() as u64
    }

    /// More than rounding short of what was asked.
    fn behind(&self) -> bool {
        self.asked_whole() > self.sent + 1
    }
}

/// What a per-second progress line reports.
#[derive(Debug, Default, Clone, Copy)]
struct Line {
    t: f64,
    asked: f64,
    sent: u64,
}

impl Line {
    /// `t=  12s  asked 1000.0/s  achieved  812.3/s  sent ...`, and how far behind, since `last`.
    fn describe(&self, last: &Self, asked_now: f64) -> String {
        let dt = (self.t - last.t).max(1e-9);
        #[allow(clippy::cast_precision_loss)]
        let achieved = (self.sent - last.sent) as f64 / dt;
        #[allow(clippy::cast_precision_loss)]
        let behind = self.asked.floor() - self.sent as f64;
        let mut text = format!(
            "t={:>4.0}s  asked {asked_now:>7.1}/s  achieved {achieved:>7.1}/s  sent {:>7}",
            self.t, self.sent
        );
        if behind > 1.0 {
            text.push_str(&format!("  BEHIND by {behind:.0} commands"));
        }
        text
    }
}

#[allow(clippy::cast_precision_loss)]
fn rate(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        count as f64 / seconds
    } else {
        0.0
    }
}

fn jiff_now_ms() -> u64 {
    u64::try_from(k8s_openapi::jiff::Timestamp::now().as_millisecond()).unwrap_or(0)
}

/// Prints a summary.
pub fn print(summary: &Summary, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(summary)?);
    } else {
        println!(
            "sent {} of {} asked in {:.1} s: achieved {:.1}/s of {:.1}/s asked; confirmed {}, errors {}; reads {} ({} failed, {} shed), p50 {:.1} ms, p99 {:.1} ms",
            summary.sent,
            summary.asked,
            summary.elapsed_s,
            summary.achieved_rate,
            summary.asked_rate,
            summary.confirmed,
            summary.errors,
            summary.reads,
            summary.read_errors,
            summary.reads_shed,
            summary.read_p50_ms,
            summary.read_p99_ms
        );
        if summary.fell_behind {
            println!(
                "fell behind: {} commands asked for were not sent; the broker or this machine could not take the rate (try a lower --rate)",
                summary.asked.saturating_sub(summary.sent)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_follow_their_shape() {
        assert_eq!(Profile::Step.rate(0.0, 90.0, 100.0), 20.0);
        assert_eq!(Profile::Step.rate(45.0, 90.0, 100.0), 100.0);
        assert_eq!(Profile::Ramp.rate(45.0, 90.0, 100.0), 50.0);
        assert_eq!(Profile::Burst.rate(27.0, 90.0, 100.0), 100.0);
        assert_eq!(Profile::Burst.rate(60.0, 90.0, 100.0), 10.0);
        assert_eq!(Profile::File(vec![1.0, 5.0]).rate(7.0, 90.0, 100.0), 5.0);
        assert!(Profile::parse("nope.csv").is_err());
    }

    #[test]
    fn pace_owes_what_the_clock_asked_for() {
        let mut pace = Pace::with_max_batch(1000.0);
        // 100/s: 10 due after 0.1 s.
        assert_eq!(pace.owed(0.1, |_| 100.0), 10);
        pace.sent(10);
        // A slow tick (0.5 s later) owes the whole half second, not one tick's worth.
        assert_eq!(pace.owed(0.6, |_| 100.0), 50);
        // Only 20 of them went out: the rest stays owed, and the pace says it is behind.
        pace.sent(20);
        assert!(pace.behind());
        assert_eq!(pace.owed(0.6, |_| 100.0), 30);
        pace.sent(30);
        assert!(!pace.behind());
        assert_eq!(pace.asked_whole(), 60);
        // The rate of each interval's midpoint: a step from 0 to 100/s at t = 1.
        let mut step = Pace::with_max_batch(1000.0);
        let profile = |t: f64| if t < 1.0 { 0.0 } else { 100.0 };
        assert_eq!(step.owed(1.0, profile), 0);
        assert_eq!(step.owed(2.0, profile), 100);
    }

    #[test]
    fn a_stall_is_caught_up_a_batch_at_a_time_and_what_is_not_shows_as_behind() {
        // 100/s with batches of at most 100: a 3 s stall owes 300, paid over three calls.
        let mut pace = Pace::with_max_batch(100.0);
        let n = pace.owed(3.0, |_| 100.0);
        assert_eq!(n, 100);
        pace.sent(n);
        assert!(pace.behind(), "200 still owed");
        // Each half second asks 50 more and pays at most 100: the debt shrinks by 50 a call.
        for (t, owed) in [(3.5, 100), (4.0, 100), (4.5, 100), (5.0, 100), (5.5, 50)] {
            let n = pace.owed(t, |_| 100.0);
            assert_eq!(n, owed, "at {t}");
            pace.sent(n);
        }
        assert!(!pace.behind());
        // A run that ends right after a stall ends behind: what it owed is not sent at once.
        let mut late = Pace::with_max_batch(100.0);
        let n = late.owed(10.0, |_| 100.0);
        late.sent(n);
        assert!(late.behind());
        assert_eq!(late.asked_whole() - late.sent, 900);
    }

    #[test]
    fn progress_lines_say_the_achieved_rate_and_when_behind() {
        let last = Line {
            t: 1.0,
            asked: 1000.0,
            sent: 1000,
        };
        let on_pace = Line {
            t: 2.0,
            asked: 2000.0,
            sent: 2000,
        };
        let text = on_pace.describe(&last, 1000.0);
        assert!(
            text.contains("asked  1000.0/s") && text.contains("achieved  1000.0/s"),
            "{text}"
        );
        assert!(!text.contains("BEHIND"), "{text}");
        let slow = Line {
            t: 2.0,
            asked: 2000.0,
            sent: 1400,
        };
        let text = slow.describe(&last, 1000.0);
        assert!(text.contains("achieved   400.0/s"), "{text}");
        assert!(text.contains("BEHIND by 600 commands"), "{text}");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("2 weeks").is_err());
    }

    #[test]
    fn the_flow_only_refers_to_what_exists() {
        let mut f = Flow::new("t");
        let mut users = std::collections::BTreeSet::new();
        let mut gigs = std::collections::BTreeSet::new();
        let mut placed = std::collections::BTreeSet::new();
        let mut delivered = std::collections::BTreeSet::new();
        for _ in 0..500 {
            let (_, kind, d) = f.next_command();
            let s = |k: &str| d[k].as_str().unwrap().to_owned();
            match kind {
                "user.register" => assert!(users.insert(s("user_id"))),
                "gig.publish" => {
                    assert!(users.contains(&s("seller_id")));
                    gigs.insert(s("gig_id"));
                }
                "order.place" => {
                    assert!(gigs.contains(&s("gig_id")) && users.contains(&s("buyer_id")));
                    placed.insert(s("order_id"));
                }
                "order.deliver" => {
                    assert!(placed.contains(&s("order_id")));
                    delivered.insert(s("order_id"));
                }
                "order.complete" => assert!(delivered.contains(&s("order_id")), "{d}"),
                other => panic!("{other}"),
            }
        }
        assert!(gigs.len() > 50 && placed.len() > 50 && !delivered.is_empty());
    }
}
