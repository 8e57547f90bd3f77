//! A worker head asked to stop, as `chimera_sdk::head` runs it on the real broker: it says so
//! on `/readyz` while it finishes the message in flight, and that message is handled, not cut.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use chimera_core::api::validation::modules_from_yaml;
use chimera_core::topology::plan::plan;
use chimera_core::topology::state::BrokerEndpoint;
use chimera_runtime::topology::declare::apply;
use chimera_sdk::broker::{Outgoing, Publisher, connect};
use chimera_sdk::db::{Database, Migration};
use chimera_sdk::envelope::Envelope;
use chimera_sdk::head::{Module, run_with};
use chimera_sdk::sqlx::{self, Row};
use chimera_sdk::usage::Program;
use chimera_sdk::worker::{Context, HandlerError, Worker};
use chimera_testenv::{TestDatabase, TestVhost, free_port, unique_name};
use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

const CLOCK: &str = "apiVersion: chimera.dev/v1alpha1\nkind: ChimeraModule\nmetadata: {name: clock}\nspec:\n  image: x\n  commands: [tick.slow]\n  worker: {}\n";

const MIGRATIONS: &[Migration] = &[Migration {
    version: 100,
    description: "ticks",
    sql: "CREATE TABLE ticks (id VARCHAR(64) PRIMARY KEY)",
}];

/// Takes three seconds, then records the tick.
fn slow(ctx: &mut Context) -> BoxFuture<'_, Result<(), HandlerError>> {
    Box::pin(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let id = ctx.envelope().id.to_string();
        sqlx::query("INSERT INTO ticks (id) VALUES (?)")
            .bind(id)
            .execute(&mut **ctx.tx())
            .await?;
        Ok(())
    })
}

fn module() -> Module {
    Module {
        program: Program {
            name: "clock",
            version: "0",
            about: "a slow worker",
        },
        migrations: MIGRATIONS,
        query: |_| chimera_sdk::axum::Router::new(),
        worker: |w: Worker| w.on("tick.slow", slow),
    }
}

/// The status line and body of `GET path`.
async fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut c = tokio::net::TcpStream::connect(addr).await.ok()?;
    c.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: head\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut text = String::new();
    c.read_to_string(&mut text).await.ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    Some((
        status,
        text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned(),
    ))
}

#[tokio::test]
async fn a_stopping_worker_says_so_on_readyz_and_finishes_its_message() {
    let vhost = TestVhost::create("drain");
    let endpoint = BrokerEndpoint::new(&vhost.amqp_url, Some(vhost.management_url())).unwrap();
    apply(&endpoint, &plan(&modules_from_yaml(CLOCK).0))
        .await
        .unwrap();
    let tdb = TestDatabase::sqlite("drain");
    let addr = format!("127.0.0.1:{}", free_port());
    let vars = [
        ("CHIMERA_HEAD", "worker".to_owned()),
        ("CHIMERA_DOMAIN", "clock".to_owned()),
        ("CHIMERA_HTTP_ADDR", addr.clone()),
        ("CHIMERA_AMQP_URL", vhost.amqp_url.clone()),
        ("CHIMERA_DATABASE_URL", tdb.url.clone()),
        ("CHIMERA_WORKER_QUEUE", "chimera.clock.worker".to_owned()),
        (
            "CHIMERA_DEAD_LETTER_QUEUE",
            "chimera.clock.worker.dlq".to_owned(),
        ),
        ("CHIMERA_RETRY_DELAYS_SECONDS", "1".to_owned()),
        ("CHIMERA_COMMANDS", "tick.slow".to_owned()),
        ("CHIMERA_DRAIN_SECONDS", "30".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let stop = Arc::new(Notify::new());
    let head = tokio::spawn(run_with(module(), None, vars, stop.clone()));
    let mut ready = false;
    for _ in 0..200 {
        if get(&addr, "/readyz").await.is_some_and(|(s, _)| s == 200) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "the worker never became ready");

    let connection = connect(&vhost.amqp_url, &unique_name("drain"))
        .await
        .unwrap();
    let publisher = Publisher::open(&connection).await.unwrap();
    let tick = Envelope::new("tick.slow", serde_json::json!({}));
    publisher
        .publish(&Outgoing::new("chimera.clock.commands", tick.clone()), true)
        .await
        .unwrap();
    // In its handler by now; then the stop.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.notify_one();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = get(&addr, "/readyz")
        .await
        .expect("/readyz answers while draining");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("stopping"), "{body}");

    let outcome = tokio::time::timeout(Duration::from_secs(30), head)
        .await
        .expect("the head stops")
        .unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
    let db = Database::connect(&tdb.url, MIGRATIONS).await.unwrap();
    let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM ticks WHERE id = ?")
        .bind(tick.id.to_string())
        .fetch_one(db.pool())
        .await
        .unwrap()
        .try_get("n")
        .unwrap();
    assert_eq!(n, 1, "the message in flight was finished");
    connection.close(200, "done".into()).await.ok();
}
