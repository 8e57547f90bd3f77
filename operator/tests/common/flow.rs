//! The marketplace's business flow, as a client sees it: commands over AMQP, answers from the
//! query heads. The same flow runs on heads in this process (marketplace.rs) and on pods behind
//! Services on the dev node (node.rs).
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use chimera_sdk::broker::{Outgoing, Publisher};
use chimera_sdk::db::Database;
use chimera_sdk::envelope::{Envelope, TraceParent};
use chimera_sdk::sqlx::{self, Row};
use serde_json::{Value, json};

/// Where each domain's query head answers.
pub struct QueryUrls {
    pub users: String,
    pub gigs: String,
    pub orders: String,
}

pub async fn get(url: &str) -> (u16, Value) {
    match reqwest::get(url).await {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.json().await.unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    }
}

/// Polls a query head until `check` accepts the answer.
pub async fn until(what: &str, url: &str, check: impl Fn(u16, &Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let (status, body) = get(url).await;
        if check(status, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: last answer {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Register, publish, place, deliver, complete; a paused gig is refused; deleting users pauses
/// their gigs and cancels their open orders; one trace runs through the events a command causes
/// (read from the gigs domain's outbox at `gigs_database_url`); bad HTTP input is a JSON 4xx.
pub async fn marketplace_flow(publisher: &Publisher, urls: &QueryUrls, gigs_database_url: &str) {
    let (users, gigs, orders) = (&urls.users, &urls.gigs, &urls.orders);
    let send = |domain: &str, kind: &str, data: Value| {
        let m = Outgoing::new(
            format!("chimera.{domain}.commands"),
            Envelope::new(kind, data),
        );
        let p = publisher.clone();
        async move { p.publish(&m, true).await.unwrap() }
    };

    send(
        "users",
        "user.register",
        json!({"user_id": "ada", "name": "Ada", "email": "ada@example.com"}),
    )
    .await;
    send(
        "users",
        "user.register",
        json!({"user_id": "bob", "name": "Bob", "email": "bob@example.com"}),
    )
    .await;
    until("ada registered", &format!("{users}/users/ada"), |s, b| {
        s == 200 && b["name"] == "Ada"
    })
    .await;

    send(
        "gigs",
        "gig.publish",
        json!({"gig_id": "logo", "seller_id": "ada", "title": "Logo design", "price_cents": 5000}),
    )
    .await;
    until(
        "gig with its seller's name",
        &format!("{gigs}/gigs/logo"),
        |s, b| s == 200 && b["seller_name"] == "Ada" && b["status"] == "active",
    )
    .await;

    send(
        "orders",
        "order.place",
        json!({"order_id": "o1", "gig_id": "logo", "buyer_id": "bob"}),
    )
    .await;
    let o1 = until("o1 placed", &format!("{orders}/orders/o1"), |s, b| {
        s == 200 && b["status"] == "placed"
    })
    .await;
    assert_eq!(o1["price_cents"], 5000);
    send("orders", "order.deliver", json!({"order_id": "o1"})).await;
    until("o1 delivered", &format!("{orders}/orders/o1"), |_, b| {
        b["status"] == "delivered"
    })
    .await;
    send("orders", "order.complete", json!({"order_id": "o1"})).await;
    until("o1 completed", &format!("{orders}/orders/o1"), |_, b| {
        b["status"] == "completed"
    })
    .await;

    // A paused gig cannot be ordered.
    send("gigs", "gig.pause", json!({"gig_id": "logo"})).await;
    until("logo paused", &format!("{gigs}/gigs/logo"), |_, b| {
        b["status"] == "paused"
    })
    .await;
    // Give the orders domain the gig.paused event before ordering (it follows gigs by events,
    // through gigs' outbox relay and the broker: well under this on a loaded machine).
    tokio::time::sleep(Duration::from_secs(2)).await;
    send(
        "orders",
        "order.place",
        json!({"order_id": "o2", "gig_id": "logo", "buyer_id": "bob"}),
    )
    .await;
    let o2 = until("o2 rejected", &format!("{orders}/orders/o2"), |s, b| {
        s == 200 && b["status"] != "placed"
    })
    .await;
    assert_eq!(o2["status"], "rejected");
    assert!(
        o2["reason"].as_str().unwrap_or_default().contains("paused"),
        "{o2}"
    );

    // Deleting a buyer cancels their open orders; deleting a seller pauses their gigs.
    send(
        "gigs",
        "gig.publish",
        json!({"gig_id": "site", "seller_id": "ada", "title": "Web site", "price_cents": 90000}),
    )
    .await;
    until("site active", &format!("{gigs}/gigs/site"), |s, b| {
        s == 200 && b["status"] == "active"
    })
    .await;
    send(
        "orders",
        "order.place",
        json!({"order_id": "o3", "gig_id": "site", "buyer_id": "bob"}),
    )
    .await;
    until("o3 placed", &format!("{orders}/orders/o3"), |s, b| {
        s == 200 && b["status"] == "placed"
    })
    .await;
    send("users", "user.delete", json!({"user_id": "bob"})).await;
    let o3 = until("o3 cancelled", &format!("{orders}/orders/o3"), |_, b| {
        b["status"] == "cancelled"
    })
    .await;
    assert!(
        o3["reason"].as_str().unwrap_or_default().contains("bob"),
        "{o3}"
    );
    until("bob gone", &format!("{users}/users/bob"), |s, _| s == 404).await;
    // This command starts a trace; the events it causes, and the events the subscribers emit
    // in turn, carry the same trace id.
    let trace = TraceParent::new_root();
    let mut delete_ada = Outgoing::new(
        "chimera.users.commands",
        Envelope::new("user.delete", json!({"user_id": "ada"})),
    );
    delete_ada.trace = Some(trace);
    publisher.publish(&delete_ada, true).await.unwrap();
    until("site paused", &format!("{gigs}/gigs/site"), |_, b| {
        b["status"] == "paused"
    })
    .await;
    // users emitted user.deleted, gigs handled it and emitted gig.paused: same trace.
    let gigs_db = Database::connect(gigs_database_url, &[]).await.unwrap();
    let traces: Vec<String> = sqlx::query("SELECT traceparent FROM chimera_outbox WHERE routing_key = 'gig.paused' AND body LIKE '%site%'")
        .fetch_all(gigs_db.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get::<String, _>("traceparent").unwrap())
        .collect();
    assert_eq!(traces.len(), 1, "{traces:?}");
    let hop = TraceParent::parse(&traces[0]).unwrap();
    assert_eq!(
        hop.trace_id, trace.trace_id,
        "the trace goes command -> user.deleted -> gigs' handler -> gig.paused"
    );
    assert_ne!(hop.span_id, trace.span_id);
    let bob_orders = until(
        "bob's orders",
        &format!("{orders}/orders?buyer_id=bob"),
        |s, _| s == 200,
    )
    .await;
    let statuses: Vec<&str> = bob_orders
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["completed", "rejected", "cancelled"],
        "a completed order is not cancelled"
    );

    // Bad HTTP input is a JSON 4xx.
    let (status, body) = get(&format!("{orders}/orders?buyer_id=")).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));
    let (status, _) = get(&format!("{users}/users?limit=9999")).await;
    assert_eq!(status, 400);
}
