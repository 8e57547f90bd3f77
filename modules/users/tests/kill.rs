//! The users worker as a real process: SIGKILLed in the middle of 5,000 commands, restarted,
//! it loses none and applies none twice; SIGTERM stops it cleanly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chimera_core::api::validation::modules_from_yaml;
use chimera_core::topology::plan::plan;
use chimera_core::topology::state::BrokerEndpoint;
use chimera_runtime::topology::declare::apply;
use chimera_sdk::broker::{Outgoing, Publisher, connect};
use chimera_sdk::db::Database;
use chimera_sdk::envelope::Envelope;
use chimera_sdk::sqlx::{self, Row};
use chimera_testenv::{TestDatabase, TestVhost, free_port, unique_name};

const USERS: &str = include_str!("../../../examples/marketplace/users.yaml");

fn worker(vhost: &TestVhost, db: &str) -> Child {
    let port = free_port();
    let vars: HashMap<&str, String> = HashMap::from([
        ("CHIMERA_DOMAIN", "users".to_owned()),
        ("CHIMERA_HTTP_ADDR", format!("127.0.0.1:{port}")),
        ("CHIMERA_AMQP_URL", vhost.amqp_url.clone()),
        ("CHIMERA_DATABASE_URL", db.to_owned()),
        ("CHIMERA_WORKER_QUEUE", "chimera.users.worker".to_owned()),
        (
            "CHIMERA_DEAD_LETTER_QUEUE",
            "chimera.users.worker.dlq".to_owned(),
        ),
        ("CHIMERA_RETRY_DELAYS_SECONDS", "1,10,60".to_owned()),
        ("CHIMERA_PREFETCH", "100".to_owned()),
        ("RUST_LOG", "warn".to_owned()),
    ]);
    Command::new(env!("CARGO_BIN_EXE_users"))
        .arg("worker")
        .envs(vars)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the users worker")
}

async fn count(db: &Database, sql: &'static str) -> i64 {
    sqlx::query(sql)
        .fetch_one(db.pool())
        .await
        .and_then(|r| r.try_get::<i64, _>("n"))
        .unwrap_or(0)
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_killed_worker_loses_nothing_and_applies_nothing_twice() {
    let vhost = TestVhost::create("users-kill");
    let endpoint = BrokerEndpoint::new(&vhost.amqp_url, Some(vhost.management_url())).unwrap();
    apply(&endpoint, &plan(&modules_from_yaml(USERS).0))
        .await
        .unwrap();
    // Everything users publishes, to count the events.
    let probe = lapin_probe(&vhost).await;

    let tdb = TestDatabase::sqlite("users-kill");
    let db = Database::connect(&tdb.url, chimera_users::MIGRATIONS)
        .await
        .unwrap();
    let connection = connect(&vhost.amqp_url, &unique_name("load"))
        .await
        .unwrap();
    let publisher = Publisher::open(&connection).await.unwrap();
    let commands: Vec<Outgoing> = (0..5000)
        .map(|i| {
            Outgoing::new(
                "chimera.users.commands",
                Envelope::new("user.register", serde_json::json!({"user_id": format!("u{i:05}"), "name": format!("User {i}"), "email": format!("u{i}@example.com")})),
            )
        })
        .collect();
    for batch in commands.chunks(500) {
        publisher.publish_all(batch, true).await.unwrap();
    }

    let mut first = worker(&vhost, &tdb.url);
    wait_until(
        "some users registered",
        Duration::from_secs(60),
        async || count(&db, "SELECT COUNT(*) AS n FROM users").await >= 1000,
    )
    .await;
    first.kill().unwrap(); // SIGKILL: no chance to finish anything
    first.wait().unwrap();
    let at_kill = count(&db, "SELECT COUNT(*) AS n FROM users").await;
    assert!(at_kill < 5000, "the kill must land mid-way (got {at_kill})");

    let mut second = worker(&vhost, &tdb.url);
    wait_until("all 5000 users", Duration::from_secs(120), async || {
        count(&db, "SELECT COUNT(*) AS n FROM users").await == 5000
    })
    .await;
    wait_until("all events relayed", Duration::from_secs(60), async || {
        count(
            &db,
            "SELECT COUNT(*) AS n FROM chimera_outbox WHERE status = 'sent'",
        )
        .await
            == 5000
    })
    .await;
    assert_eq!(
        count(&db, "SELECT COUNT(*) AS n FROM chimera_inbox").await,
        5000,
        "each command handled once"
    );
    assert_eq!(
        count(&db, "SELECT COUNT(*) AS n FROM chimera_outbox").await,
        5000,
        "one event per user, never two"
    );
    let dlq = vhost.rabbitmqctl(&["list_queues", "-q", "name", "messages"]);
    assert!(
        dlq.lines().any(|l| l == "chimera.users.worker.dlq\t0"),
        "nothing dead-lettered: {dlq}"
    );

    // Every event reached subscribers (the relay may resend after a kill: at-least-once, and
    // subscribers' inboxes drop the copies), so distinct ids are what counts.
    let ids = drain_probe(&probe, 5000).await;
    assert_eq!(ids.len(), 5000);

    // SIGTERM: a clean stop.
    let pid = second.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = wait_exit(&mut second, Duration::from_secs(20));
    assert!(status.success(), "SIGTERM is a clean exit, got {status}");
    connection.close(200, "done".into()).await.ok();
}

async fn lapin_probe(
    vhost: &TestVhost,
) -> (chimera_sdk::lapin::Connection, chimera_sdk::lapin::Channel) {
    use chimera_sdk::lapin;
    let c = lapin::Connection::connect(&vhost.amqp_url, Default::default())
        .await
        .unwrap();
    let ch = c.create_channel().await.unwrap();
    ch.queue_declare(
        "probe".into(),
        lapin::options::QueueDeclareOptions::durable(),
        Default::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "probe".into(),
        "chimera.users.events".into(),
        "#".into(),
        Default::default(),
        Default::default(),
    )
    .await
    .unwrap();
    (c, ch)
}

async fn drain_probe(
    probe: &(chimera_sdk::lapin::Connection, chimera_sdk::lapin::Channel),
    want: usize,
) -> BTreeSet<String> {
    use chimera_sdk::lapin;
    let mut ids = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ids.len() < want && Instant::now() < deadline {
        match probe
            .1
            .basic_get(
                "probe".into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            Some(m) => {
                ids.insert(Envelope::decode(&m.delivery.data).unwrap().id.to_string());
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    ids
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the worker did not stop within {timeout:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
