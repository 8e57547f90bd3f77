//! Worker pipeline throughput against raw consume+ack.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chimera_core::api::validation::modules_from_yaml;
use chimera_core::topology::plan::plan;
use chimera_core::topology::state::BrokerEndpoint;
use chimera_runtime::topology::declare::apply;
use chimera_sdk::broker::{Outgoing, Publisher, connect};
use chimera_sdk::config::WorkerConfig;
use chimera_sdk::db::Database;
use chimera_sdk::envelope::Envelope;
use chimera_sdk::futures::StreamExt;
use chimera_sdk::http::{HttpMetrics, MessageLabels};
use chimera_sdk::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
};
use chimera_sdk::lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use chimera_sdk::outbox::{RelaySettings, run_relay};
use chimera_sdk::sqlx::{self, Row};
use chimera_sdk::worker::Worker;
use tokio::sync::Notify;

const USERS: &str = include_str!("../../examples/marketplace/users.yaml");
const PREFETCH: u16 = 100;

fn commands(n: usize, exchange: &str, kind: &str) -> Vec<Outgoing> {
    (0..n)
        .map(|i| {
            let data = serde_json::json!({"user_id": format!("u{i}"), "name": format!("User {i}"), "email": format!("u{i}@example.com")});
            Outgoing::new(exchange, Envelope::new(kind, data))
        })
        .collect()
}

async fn publish(publisher: &Publisher, messages: &[Outgoing]) -> anyhow::Result<()> {
    for batch in messages.chunks(1000) {
        publisher.publish_all(batch, true).await?;
    }
    Ok(())
}

/// A fresh vhost for the run, through the management API.
async fn vhost(amqp: &str, management: Option<&str>) -> anyhow::Result<(String, BrokerEndpoint)> {
    let base = BrokerEndpoint::new(amqp, management)?;
    let name = format!("chimera-bench-{}", std::process::id());
    let (scheme, rest) = base
        .management_url
        .split_once("://")
        .context("management URL")?;
    let (creds, host) = rest.rsplit_once('@').unwrap_or(("guest:guest", rest));
    let (user, pass) = creds.split_once(':').unwrap_or((creds, ""));
    let http = reqwest::Client::new();
    http.put(format!("{scheme}://{host}/api/vhosts/{name}"))
        .basic_auth(user, Some(pass))
        .send()
        .await?
        .error_for_status()?;
    http.put(format!("{scheme}://{host}/api/permissions/{name}/{user}"))
        .basic_auth(user, Some(pass))
        .json(&serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}))
        .send()
        .await?
        .error_for_status()?;
    let server = amqp.rsplit_once('/').map(|(s, _)| s).unwrap_or(amqp);
    let url = format!("{server}/{name}");
    let endpoint = BrokerEndpoint::new(&url, Some(&base.management_url))?;
    Ok((url, endpoint))
}

/// Baseline: a quorum queue like the worker's, consumed with the same prefetch, acked one by one.
async fn raw(url: &str, n: usize) -> anyhow::Result<f64> {
    let connection = connect(url, "bench-raw").await?;
    let channel = connection.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    channel
        .queue_declare("bench.raw".into(), QueueDeclareOptions::durable(), args)
        .await?;
    let publisher = Publisher::open(&connection).await?;
    let mut messages = commands(n, "", "user.register");
    for m in &mut messages {
        m.routing_key = "bench.raw".into();
    }
    publish(&publisher, &messages).await?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            "bench.raw".into(),
            "raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let started = Instant::now();
    let mut seen = 0;
    while seen < n {
        let delivery = consumer.next().await.context("consumer ended")??;
        delivery.ack(BasicAckOptions::default()).await?;
        seen += 1;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    connection.close(200, "done".into()).await.ok();
    Ok(rate)
}

async fn count(db: &Database, sql: &'static str) -> i64 {
    sqlx::query(sql)
        .fetch_one(db.pool())
        .await
        .and_then(|r| r.try_get::<i64, _>("n"))
        .unwrap_or(0)
}

/// The SDK worker with the users module's handlers on SQLite, until every command is handled
/// and every event relayed.
async fn pipeline(
    url: &str,
    endpoint: &BrokerEndpoint,
    n: usize,
    round: usize,
) -> anyhow::Result<f64> {
    apply(endpoint, &plan(&modules_from_yaml(USERS).0)).await?;
    let dir = std::env::temp_dir().join(format!("chimera-bench-{}-{round}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let db = Database::connect(
        &format!("sqlite://{}", dir.join("users.db").display()),
        chimera_users::MIGRATIONS,
    )
    .await?;
    let connection = connect(url, "bench-worker").await?;
    let publisher = Publisher::open(&connection).await?;
    publish(
        &publisher,
        &commands(n, "chimera.users.commands", "user.register"),
    )
    .await?;

    let config = WorkerConfig {
        queue: "chimera.users.worker".into(),
        dead_letter_queue: "chimera.users.worker.dlq".into(),
        failures_exchange: "chimera.users.worker.failures".into(),
        retry_delays_seconds: vec![1, 10, 60],
        max_attempts: 4,
        prefetch: PREFETCH,
        commands: vec!["user.register".into()],
        subscriptions: Some(vec![]),
        schemas: Default::default(),
    };
    // Progress is read from the worker's own counters and the (small) set of pending outbox
    // rows: counting whole tables while the pipeline runs would slow it down.
    let metrics = HttpMetrics::new();
    let handled = metrics.worker_messages.get_or_create(&MessageLabels {
        kind: "user.register".into(),
        outcome: "handled".into(),
    });
    let worker = Arc::new(
        chimera_users::handlers(Worker::new(config, "users", "chimera.users.events"))
            .with_metrics(metrics.clone()),
    );
    let (wake, stop_relay, stop_worker) = (
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
        Arc::new(Notify::new()),
    );
    let started = Instant::now();
    let relay = tokio::spawn(run_relay(
        db.clone(),
        publisher.clone(),
        RelaySettings::default(),
        wake.clone(),
        stop_relay.clone(),
        Duration::from_millis(100),
        HttpMetrics::new().outbox_pending,
    ));
    let running = {
        let (worker, db, publisher, wake, stop) = (
            worker.clone(),
            db.clone(),
            publisher.clone(),
            wake.clone(),
            stop_worker.clone(),
        );
        let url = url.to_owned();
        tokio::spawn(async move {
            let connection = connect(&url, "bench-consumer").await?;
            worker
                .run(db, &connection, publisher, wake, stop, "bench")
                .await?;
            anyhow::Ok(())
        })
    };
    let n = i64::try_from(n)?;
    let handled_all = || i64::try_from(handled.get()).unwrap_or(i64::MAX) >= n;
    while !handled_all()
        || count(
            &db,
            "SELECT COUNT(*) AS n FROM chimera_outbox WHERE status = 'pending'",
        )
        .await
            > 0
    {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the pipeline did not finish in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    anyhow::ensure!(
        count(&db, "SELECT COUNT(*) AS n FROM users").await == n,
        "every command applied once"
    );
    anyhow::ensure!(
        count(
            &db,
            "SELECT COUNT(*) AS n FROM chimera_outbox WHERE status = 'sent'"
        )
        .await
            == n,
        "every event relayed"
    );
    stop_worker.notify_one();
    running.await??;
    stop_relay.notify_one();
    relay.await?;
    connection.close(200, "done".into()).await.ok();
    std::fs::remove_dir_all(&dir).ok();
    Ok(rate)
}

/// Runs both and prints the ratio.
/// Runs both `rounds` times, alternating, and prints each round and the median ratio (the
/// machine is shared with the broker, so single runs vary by several percent).
pub async fn run(
    n: usize,
    rounds: usize,
    amqp: &str,
    management: Option<&str>,
) -> anyhow::Result<()> {
    let (url, endpoint) = vhost(amqp, management).await?;
    println!(
        "| round ({n} messages, prefetch {PREFETCH}, quorum queue) | raw lapin consume + ack, msg/s | SDK worker pipeline, msg/s | ratio |"
    );
    println!("|---|---|---|---|");
    let mut ratios = Vec::with_capacity(rounds);
    for round in 1..=rounds.max(1) {
        let raw_rate = raw(&url, n).await?;
        let pipeline_rate = pipeline(&url, &endpoint, n, round).await?;
        let ratio = pipeline_rate / raw_rate;
        println!(
            "| {round} | {raw_rate:.0} | {pipeline_rate:.0} | {:.0} % |",
            ratio * 100.0
        );
        ratios.push(ratio);
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    println!(
        "| median ratio | | | **{:.0} %** (target >= 50 %) |",
        median * 100.0
    );
    Ok(())
}
