//! The replay's load: `user.register` commands published with confirms, as a backlog or paced
//! second by second.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use chimera_sdk::broker::{self, Outgoing};
use chimera_sdk::envelope::Envelope;
use chimera_sdk::lapin;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Ids of the calibration's commands start with this.
pub const CALIBRATION: &str = "calibration-";
/// Ids of the replay's commands start with this.
pub const REPLAY: &str = "replay-";

/// Slices of a second the paced load is published in (smooth arrivals, few round trips).
const SLICES: u32 = 10;

/// A confirming publisher on its own connection.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<broker::Publisher>,
    // Kept open as long as its channel publishes.
    _connection: Arc<lapin::Connection>,
}

impl Publisher {
    pub async fn connect(amqp_url: &str) -> anyhow::Result<Self> {
        let connection = broker::connect(amqp_url, "chimera-bench-replay")
            .await
            .context("connecting to the broker")?;
        let publisher = broker::Publisher::open(&connection)
            .await
            .context("opening a confirming channel")?;
        Ok(Self {
            inner: Arc::new(publisher),
            _connection: Arc::new(connection),
        })
    }

    /// Publishes commands `prefix{from}` .. `prefix{from + n - 1}`, confirmed.
    pub async fn publish_batch(&self, prefix: &str, from: usize, n: usize) -> anyhow::Result<()> {
        for chunk_start in (from..from + n).step_by(500) {
            let chunk: Vec<Outgoing> = (chunk_start..(chunk_start + 500).min(from + n))
                .map(|i| command(&format!("{prefix}{i}")))
                .collect();
            self.inner
                .publish_all(&chunk, true)
                .await
                .context("publishing commands")?;
        }
        Ok(())
    }

    /// Publishes `rates[t]` commands in second `t` after `started`, spread over the second; a
    /// slice that falls behind is caught up in the next.
    pub fn pace(&self, rates: Vec<f64>, started: Instant) -> Pacing {
        let published = Arc::new(AtomicU64::new(0));
        let counter = published.clone();
        let publisher = self.clone();
        let task = tokio::spawn(async move {
            let mut planned = 0.0;
            let mut sent = 0_usize;
            for (t, rate) in rates.iter().enumerate() {
                for slice in 0..SLICES {
                    planned += rate / f64::from(SLICES);
                    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                    let due = planned.floor() as usize;
                    if due > sent {
                        publisher.publish_batch(REPLAY, sent, due - sent).await?;
                        sent = due;
                        counter.store(sent as u64, Ordering::Relaxed);
                    }
                    let next = Duration::from_secs(t as u64)
                        + Duration::from_secs(1) * (slice + 1) / SLICES;
                    tokio::time::sleep_until(started + next).await;
                }
            }
            Ok(())
        });
        Pacing { published, task }
    }
}

/// A paced load in progress.
pub struct Pacing {
    published: Arc<AtomicU64>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Pacing {
    /// Commands published and confirmed so far.
    pub fn published(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let n = self.published.load(Ordering::Relaxed) as f64;
        n
    }

    /// Waits for the load to end; its error, if publishing failed.
    pub async fn finish(self) -> anyhow::Result<()> {
        self.task.await.context("the publishing task panicked")?
    }
}

/// The users module's `user.register` for user `id`.
fn command(id: &str) -> Outgoing {
    Outgoing::new(
        "chimera.users.commands",
        Envelope::new(
            "user.register",
            json!({"user_id": id, "name": id, "email": format!("{id}@example.com")}),
        ),
    )
}
