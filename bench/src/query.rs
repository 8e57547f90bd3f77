//! Query head latency and throughput against a bare axum handler, same load generator.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chimera_sdk::axum::routing::get;
use chimera_sdk::axum::{Json, Router};
use chimera_sdk::db::Database;
use chimera_sdk::http::{ServerOptions, router};
use chimera_sdk::sqlx;
use hdrhistogram::Histogram;
use tokio::sync::Notify;

struct Measured {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

async fn serve(app: Router) -> anyhow::Result<(SocketAddr, Arc<Notify>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = Arc::new(Notify::new());
    let s = stop.clone();
    tokio::spawn(async move {
        chimera_sdk::axum::serve(listener, app)
            .with_graceful_shutdown(async move { s.notified().await })
            .await
    });
    Ok((addr, stop))
}

/// Closed loop: `concurrency` clients, each sending the next request when the last answered.
/// With `rate`, an open loop instead: requests start on a fixed schedule (no coordinated
/// omission), spread over the clients.
async fn load(
    url: String,
    seconds: u64,
    concurrency: usize,
    rate: Option<f64>,
) -> anyhow::Result<Measured> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let done = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let (client, url, done) = (client.clone(), url.clone(), done.clone());
        let interval = rate.map(|r| Duration::from_secs_f64(concurrency as f64 / r));
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut next = Instant::now()
                + interval
                    .map(|d| d.mul_f64(i as f64 / concurrency as f64))
                    .unwrap_or_default();
            while !done.load(Ordering::Relaxed) {
                if interval.is_some() {
                    tokio::time::sleep_until(next.into()).await;
                }
                let sent = match interval {
                    Some(_) => next,
                    None => Instant::now(),
                };
                let response = client.get(&url).send().await?;
                anyhow::ensure!(
                    response.status().is_success(),
                    "{url}: {}",
                    response.status()
                );
                response.bytes().await?;
                h.record(
                    u64::try_from(sent.elapsed().as_micros())
                        .unwrap_or(u64::MAX)
                        .max(1),
                )?;
                if let Some(d) = interval {
                    next += d;
                }
            }
            anyhow::Ok(h)
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    done.store(true, Ordering::Relaxed);
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in tasks {
        total.add(t.await??)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(Measured {
        rps: total.len() as f64 / elapsed,
        p50_ms: total.value_at_quantile(0.50) as f64 / 1000.0,
        p99_ms: total.value_at_quantile(0.99) as f64 / 1000.0,
    })
}

/// Runs both and prints the ratio and the p99 at half of peak.
pub async fn run(seconds: u64, concurrency: usize) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("chimera-bench-query-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let db = Database::connect(
        &format!("sqlite://{}", dir.join("orders.db").display()),
        chimera_orders::MIGRATIONS,
    )
    .await?;
    for i in 0..1000 {
        sqlx::query("INSERT INTO orders (order_id, gig_id, buyer_id, price_cents, status, reason) VALUES (?, 'g1', 'b1', 5000, 'placed', NULL)")
            .bind(format!("o{i}"))
            .execute(db.pool())
            .await?;
    }
    let (orders_addr, stop_orders) = serve(router(
        chimera_orders::routes(db.clone()),
        ServerOptions::new(),
    ))
    .await?;
    let bare = Router::new().route(
        "/orders/{id}",
        get(|| async { Json(serde_json::json!({"order_id": "o1", "status": "placed"})) }),
    );
    let (bare_addr, stop_bare) = serve(bare).await?;

    let bare_peak = load(
        format!("http://{bare_addr}/orders/o1"),
        seconds,
        concurrency,
        None,
    )
    .await?;
    let head_peak = load(
        format!("http://{orders_addr}/orders/o500"),
        seconds,
        concurrency,
        None,
    )
    .await?;
    let half = load(
        format!("http://{orders_addr}/orders/o500"),
        seconds,
        concurrency,
        Some(head_peak.rps / 2.0),
    )
    .await?;
    stop_orders.notify_one();
    stop_bare.notify_one();
    std::fs::remove_dir_all(&dir).ok();

    println!(
        "| measurement ({seconds} s each, {concurrency} connections) | req/s | p50 ms | p99 ms |"
    );
    println!("|---|---|---|---|");
    println!(
        "| bare axum handler, constant (baseline) | {:.0} | {:.2} | {:.2} |",
        bare_peak.rps, bare_peak.p50_ms, bare_peak.p99_ms
    );
    println!(
        "| orders query head GET /orders/{{id}} (SQLite), peak | {:.0} | {:.2} | {:.2} |",
        head_peak.rps, head_peak.p50_ms, head_peak.p99_ms
    );
    println!(
        "| orders query head at half of its peak ({:.0} req/s offered) | {:.0} | {:.2} | {:.2} |",
        head_peak.rps / 2.0,
        half.rps,
        half.p50_ms,
        half.p99_ms
    );
    println!(
        "| ratio of peaks | {:.0} % (target >= 50 %) |",
        head_peak.rps / bare_peak.rps * 100.0
    );
    println!(
        "| p99 at half of peak | {:.2} ms (target < 10 ms) |",
        half.p99_ms
    );
    Ok(())
}
