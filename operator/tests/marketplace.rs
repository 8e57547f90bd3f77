//! The whole marketplace flow across the three modules, each as its two heads (in-process, the
//! same `run_with` the binaries use), on the topology the control plane declares from
//! examples/marketplace, with a real RabbitMQ and a database per domain (SQLite files, then
//! MariaDB databases). Everything is
//! observed through the query heads, as a client would.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chimera_core::api::validation::modules_from_yaml;
use chimera_core::topology::plan::plan;
use chimera_core::topology::state::BrokerEndpoint;
use chimera_runtime::topology::declare::apply;
use chimera_sdk::broker::{Publisher, connect};
use chimera_sdk::head::{Module, run_with};
use chimera_testenv::{TestDatabase, TestVhost, free_port, unique_name};
use common::{flow, repo_root};
use tokio::sync::Notify;

/// Builds a module (its `module()` function).
type ModuleFactory = fn() -> Module;

struct Heads {
    stops: Vec<Arc<Notify>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    query_urls: HashMap<&'static str, String>,
    _dbs: Vec<TestDatabase>,
}

fn contract(domain: &str, head: &str, port: u16, amqp: &str, db: &str) -> HashMap<String, String> {
    [
        ("CHIMERA_HEAD", head.to_owned()),
        ("CHIMERA_DOMAIN", domain.to_owned()),
        ("CHIMERA_HTTP_ADDR", format!("127.0.0.1:{port}")),
        ("CHIMERA_AMQP_URL", amqp.to_owned()),
        ("CHIMERA_DATABASE_URL", db.to_owned()),
        ("CHIMERA_WORKER_QUEUE", format!("chimera.{domain}.worker")),
        (
            "CHIMERA_DEAD_LETTER_QUEUE",
            format!("chimera.{domain}.worker.dlq"),
        ),
        ("CHIMERA_RETRY_DELAYS_SECONDS", "1,10,60".to_owned()),
        ("CHIMERA_PREFETCH", "50".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

async fn start(amqp: &str, mariadb: bool) -> Heads {
    let mut heads = Heads {
        stops: vec![],
        tasks: vec![],
        query_urls: HashMap::new(),
        _dbs: vec![],
    };
    let modules: [(&'static str, ModuleFactory); 3] = [
        ("users", chimera_users::module),
        ("gigs", chimera_gigs::module),
        ("orders", chimera_orders::module),
    ];
    for (domain, module) in modules {
        let db = if mariadb {
            TestDatabase::mysql(domain).await
        } else {
            TestDatabase::sqlite(domain)
        };
        for head in ["query", "worker"] {
            let port = free_port();
            if head == "query" {
                heads
                    .query_urls
                    .insert(domain, format!("http://127.0.0.1:{port}"));
            }
            let stop = Arc::new(Notify::new());
            let vars = contract(domain, head, port, amqp, &db.url);
            let task_stop = stop.clone();
            heads.tasks.push(tokio::spawn(async move {
                run_with(module(), Some(head.to_owned()), vars, task_stop)
                    .await
                    .unwrap_or_else(|e| panic!("{domain} {head}: {e}"));
            }));
            heads.stops.push(stop);
        }
        heads._dbs.push(db);
    }
    heads
}

#[tokio::test]
async fn the_marketplace_flow_on_sqlite() {
    marketplace_flow(false).await;
}

#[tokio::test]
async fn the_marketplace_flow_on_mariadb() {
    marketplace_flow(true).await;
}

/// The flow (common/flow.rs) on heads run in this process.
async fn marketplace_flow(mariadb: bool) {
    let vhost = TestVhost::create("marketplace");
    let endpoint = BrokerEndpoint::new(&vhost.amqp_url, Some(vhost.management_url())).unwrap();
    let mut all = Vec::new();
    for name in ["users", "gigs", "orders"] {
        all.extend(
            modules_from_yaml(
                &std::fs::read_to_string(
                    repo_root().join(format!("examples/marketplace/{name}.yaml")),
                )
                .unwrap(),
            )
            .0,
        );
    }
    apply(&endpoint, &plan(&all)).await.unwrap();
    let heads = start(&vhost.amqp_url, mariadb).await;
    let connection = connect(&vhost.amqp_url, &unique_name("client"))
        .await
        .unwrap();
    let publisher = Publisher::open(&connection).await.unwrap();
    let urls = flow::QueryUrls {
        users: heads.query_urls["users"].clone(),
        gigs: heads.query_urls["gigs"].clone(),
        orders: heads.query_urls["orders"].clone(),
    };
    flow::marketplace_flow(&publisher, &urls, &heads._dbs[1].url).await;

    for stop in &heads.stops {
        stop.notify_one();
    }
    for task in heads.tasks {
        tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("every head stops on request")
            .unwrap();
    }
    connection.close(200, "done".into()).await.ok();
}
