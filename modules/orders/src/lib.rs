//! The orders domain: places and tracks orders; follows gigs and users to reject what it must.
//!
//! Commands: `order.place {order_id, gig_id, buyer_id}`, `order.deliver {order_id}`,
//! `order.complete {order_id}`, `order.cancel {order_id}`. Events: `order.placed`,
//! `order.rejected` (unknown or paused gig, unknown buyer), `order.delivered`,
//! `order.completed`, `order.cancelled`. Subscribes to `gig.*` (price, title, status) and
//! `user.registered` / `user.deleted` (cancels the buyer's open orders). Reads:
//! `GET /orders/{id}`, `GET /orders?buyer_id=`.
//!
//! An order for a gig or buyer not seen yet is retried (the event may still be on its way) and
//! rejected only when no retry is left. An illegal state change (delivering a cancelled order)
//! is rejected: dead-lettered with the reason.

use chimera_sdk::axum::extract::State;
use chimera_sdk::axum::routing::get;
use chimera_sdk::axum::{Json, Router};
use chimera_sdk::db::{Columns, Database, Migration, Param};
use chimera_sdk::handler;
use chimera_sdk::head::Module;
use chimera_sdk::http::{ApiError, ValidPath, ValidQuery};
use chimera_sdk::sqlx::{self, Row};
use chimera_sdk::usage::Program;
use chimera_sdk::validate::valid_id;
use chimera_sdk::worker::{Context, HandlerError, Worker};
use serde::{Deserialize, Serialize};

/// The orders table and the views of gigs and buyers.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 100,
        description: "orders",
        sql: "CREATE TABLE orders (
            order_id VARCHAR(64) NOT NULL PRIMARY KEY,
            gig_id VARCHAR(64) NOT NULL,
            buyer_id VARCHAR(64) NOT NULL,
            price_cents BIGINT NOT NULL,
            status VARCHAR(16) NOT NULL,
            reason VARCHAR(255))",
    },
    Migration {
        version: 101,
        description: "gigs view",
        sql: "CREATE TABLE gigs_view (
            gig_id VARCHAR(64) NOT NULL PRIMARY KEY,
            title VARCHAR(200) NOT NULL,
            price_cents BIGINT NOT NULL,
            status VARCHAR(16) NOT NULL)",
    },
    Migration {
        version: 102,
        description: "buyers",
        sql: "CREATE TABLE buyers (user_id VARCHAR(64) NOT NULL PRIMARY KEY, deleted BIGINT NOT NULL)",
    },
    Migration {
        version: 103,
        description: "orders by buyer",
        sql: "CREATE INDEX orders_buyer ON orders (buyer_id)",
    },
];

/// The module, for `chimera_sdk::head::main`.
pub fn module() -> Module {
    Module {
        program: Program {
            name: "orders",
            version: env!("CARGO_PKG_VERSION"),
            about: "the orders domain: places and tracks orders; follows gigs and users to reject what it must",
        },
        migrations: MIGRATIONS,
        query: routes,
        worker: handlers,
    }
}

/// An order.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Order {
    /// Id chosen by the caller.
    pub order_id: String,
    /// The gig bought.
    pub gig_id: String,
    /// The buyer (a user).
    pub buyer_id: String,
    /// Price at placing time.
    pub price_cents: i64,
    /// Where the order is in its lifecycle.
    pub status: OrderStatus,
    /// Why it was rejected or cancelled.
    pub reason: Option<String>,
}

/// Where an order is: `placed`, then `delivered`, then `completed`; `rejected` at placing, or
/// `cancelled` from placed or delivered. Stored and sent as the lowercase word.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    /// Accepted, not delivered yet.
    Placed,
    /// Refused at placing (unknown or paused gig, unknown buyer).
    Rejected,
    /// The seller delivered.
    Delivered,
    /// The buyer accepted the delivery.
    Completed,
    /// Cancelled before completion.
    Cancelled,
}

impl OrderStatus {
    const ALL: [OrderStatus; 5] = [
        Self::Placed,
        Self::Rejected,
        Self::Delivered,
        Self::Completed,
        Self::Cancelled,
    ];

    /// The word stored in the `status` column and sent in events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Placed => "placed",
            Self::Rejected => "rejected",
            Self::Delivered => "delivered",
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
        }
    }

    /// The status stored as `word`.
    pub fn parse(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == word)
    }
}

/// What a command asks of an existing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `order.deliver`
    Deliver,
    /// `order.complete`
    Complete,
    /// `order.cancel`
    Cancel,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Self::Deliver => "deliver",
            Self::Complete => "complete",
            Self::Cancel => "cancel",
        }
    }
}

/// The status an action moves an order to, if it may: placed -> delivered -> completed, and
/// cancel from placed or delivered. Pure, so the rules are tested on their own.
pub fn transition(from: OrderStatus, action: Action) -> Result<OrderStatus, String> {
    use OrderStatus::{Cancelled, Completed, Delivered, Placed};
    match (from, action) {
        (Placed, Action::Deliver) => Ok(Delivered),
        (Delivered, Action::Complete) => Ok(Completed),
        (Placed | Delivered, Action::Cancel) => Ok(Cancelled),
        _ => Err(format!(
            "illegal state change: cannot {} an order that is {}",
            action.verb(),
            from.as_str()
        )),
    }
}

fn order_of(r: &impl Columns) -> Result<Order, sqlx::Error> {
    Ok(Order {
        order_id: r.get("order_id")?,
        gig_id: r.get("gig_id")?,
        buyer_id: r.get("buyer_id")?,
        price_cents: r.get("price_cents")?,
        status: {
            let word: String = r.get("status")?;
            OrderStatus::parse(&word).ok_or_else(|| {
                sqlx::Error::Decode(format!("unknown order status {word:?}").into())
            })?
        },
        reason: r.get("reason")?,
    })
}

const COLUMNS: &str = "SELECT order_id, gig_id, buyer_id, price_cents, status, reason FROM orders";
const BY_ID: &str =
    "SELECT order_id, gig_id, buyer_id, price_cents, status, reason FROM orders WHERE order_id = ?";

async fn load(ctx: &mut Context, order_id: &str) -> Result<Option<Order>, HandlerError> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!("{COLUMNS} WHERE order_id = ?")))
        .bind(order_id)
        .fetch_optional(&mut **ctx.tx())
        .await?;
    Ok(row.as_ref().map(order_of).transpose()?)
}

async fn insert(ctx: &mut Context, o: &Order) -> Result<(), HandlerError> {
    sqlx::query("INSERT INTO orders (order_id, gig_id, buyer_id, price_cents, status, reason) VALUES (?, ?, ?, ?, ?, ?)")
        .bind(&o.order_id)
        .bind(&o.gig_id)
        .bind(&o.buyer_id)
        .bind(o.price_cents)
        .bind(o.status.as_str())
        .bind(&o.reason)
        .execute(&mut **ctx.tx())
        .await?;
    Ok(())
}

async fn set_status(ctx: &mut Context, o: &Order) -> Result<(), HandlerError> {
    sqlx::query("UPDATE orders SET status = ?, reason = ? WHERE order_id = ?")
        .bind(o.status.as_str())
        .bind(&o.reason)
        .bind(&o.order_id)
        .execute(&mut **ctx.tx())
        .await?;
    Ok(())
}

fn emit(ctx: &mut Context, kind: &str, o: &Order) -> Result<(), HandlerError> {
    ctx.emit(kind, o)
}

#[derive(Deserialize)]
struct Place {
    order_id: String,
    gig_id: String,
    buyer_id: String,
}

async fn place(ctx: &mut Context) -> Result<(), HandlerError> {
    let cmd: Place = ctx.data()?;
    valid_id(&cmd.order_id)
        .and(valid_id(&cmd.gig_id))
        .and(valid_id(&cmd.buyer_id))
        .map_err(HandlerError::reject)?;
    if load(ctx, &cmd.order_id).await?.is_some() {
        return Err(HandlerError::reject(format!(
            "order {} already exists",
            cmd.order_id
        )));
    }
    let gig = sqlx::query("SELECT price_cents, status FROM gigs_view WHERE gig_id = ?")
        .bind(&cmd.gig_id)
        .fetch_optional(&mut **ctx.tx())
        .await?;
    let buyer = sqlx::query("SELECT deleted FROM buyers WHERE user_id = ?")
        .bind(&cmd.buyer_id)
        .fetch_optional(&mut **ctx.tx())
        .await?;
    let unseen = match (&gig, &buyer) {
        (None, _) => Some(format!("unknown gig {}", cmd.gig_id)),
        (_, None) => Some(format!("unknown buyer {}", cmd.buyer_id)),
        _ => None,
    };
    if let Some(why) = &unseen
        && !ctx.is_last_attempt()
    {
        return Err(HandlerError::retry(format!("{why} (not seen yet)")));
    }
    let price = match &gig {
        Some(g) => g.try_get::<i64, _>("price_cents")?,
        None => 0,
    };
    let refusal = match (unseen, &gig, &buyer) {
        (Some(why), _, _) => Some(why),
        (None, Some(g), _) if g.try_get::<String, _>("status")? != "active" => {
            Some(format!("gig {} is paused", cmd.gig_id))
        }
        (None, _, Some(b)) if b.try_get::<i64, _>("deleted")? != 0 => {
            Some(format!("buyer {} was deleted", cmd.buyer_id))
        }
        _ => None,
    };
    let mut order = Order {
        order_id: cmd.order_id,
        gig_id: cmd.gig_id,
        buyer_id: cmd.buyer_id,
        price_cents: price,
        status: OrderStatus::Placed,
        reason: None,
    };
    if let Some(reason) = refusal {
        order.status = OrderStatus::Rejected;
        order.reason = Some(reason);
        insert(ctx, &order).await?;
        return emit(ctx, "order.rejected", &order);
    }
    insert(ctx, &order).await?;
    emit(ctx, "order.placed", &order)
}

#[derive(Deserialize)]
struct OrderRef {
    order_id: String,
}

async fn change(ctx: &mut Context, action: Action, event: &str) -> Result<(), HandlerError> {
    let cmd: OrderRef = ctx.data()?;
    let Some(mut order) = load(ctx, &cmd.order_id).await? else {
        return Err(HandlerError::reject(format!("no order {}", cmd.order_id)));
    };
    order.status = transition(order.status, action).map_err(HandlerError::reject)?;
    set_status(ctx, &order).await?;
    emit(ctx, event, &order)
}

async fn deliver(ctx: &mut Context) -> Result<(), HandlerError> {
    change(ctx, Action::Deliver, "order.delivered").await
}

async fn complete(ctx: &mut Context) -> Result<(), HandlerError> {
    change(ctx, Action::Complete, "order.completed").await
}

async fn cancel(ctx: &mut Context) -> Result<(), HandlerError> {
    change(ctx, Action::Cancel, "order.cancelled").await
}

#[derive(Deserialize)]
struct GigEvent {
    gig_id: String,
    title: String,
    price_cents: i64,
    status: String,
}

async fn gig_changed(ctx: &mut Context) -> Result<(), HandlerError> {
    let g: GigEvent = ctx.data()?;
    let updated =
        sqlx::query("UPDATE gigs_view SET title = ?, price_cents = ?, status = ? WHERE gig_id = ?")
            .bind(&g.title)
            .bind(g.price_cents)
            .bind(&g.status)
            .bind(&g.gig_id)
            .execute(&mut **ctx.tx())
            .await?;
    if updated.rows_affected() == 0 {
        sqlx::query(
            "INSERT INTO gigs_view (title, price_cents, status, gig_id) VALUES (?, ?, ?, ?)",
        )
        .bind(&g.title)
        .bind(g.price_cents)
        .bind(&g.status)
        .bind(&g.gig_id)
        .execute(&mut **ctx.tx())
        .await?;
    }
    Ok(())
}

#[derive(Deserialize)]
struct UserEvent {
    user_id: String,
}

async fn user_registered(ctx: &mut Context) -> Result<(), HandlerError> {
    let u: UserEvent = ctx.data()?;
    let exists = sqlx::query("SELECT 1 FROM buyers WHERE user_id = ?")
        .bind(&u.user_id)
        .fetch_optional(&mut **ctx.tx())
        .await?;
    if exists.is_none() {
        sqlx::query("INSERT INTO buyers (user_id, deleted) VALUES (?, 0)")
            .bind(&u.user_id)
            .execute(&mut **ctx.tx())
            .await?;
    }
    Ok(())
}

async fn user_deleted(ctx: &mut Context) -> Result<(), HandlerError> {
    let u: UserEvent = ctx.data()?;
    let updated = sqlx::query("UPDATE buyers SET deleted = 1 WHERE user_id = ?")
        .bind(&u.user_id)
        .execute(&mut **ctx.tx())
        .await?;
    if updated.rows_affected() == 0 {
        sqlx::query("INSERT INTO buyers (user_id, deleted) VALUES (?, 1)")
            .bind(&u.user_id)
            .execute(&mut **ctx.tx())
            .await?;
    }
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{COLUMNS} WHERE buyer_id = ? AND status IN ('placed', 'delivered') ORDER BY order_id"
    )))
    .bind(&u.user_id)
    .fetch_all(&mut **ctx.tx())
    .await?;
    let open = rows.iter().map(order_of).collect::<Result<Vec<_>, _>>()?;
    for mut order in open {
        order.status = OrderStatus::Cancelled;
        order.reason = Some(format!("buyer {} was deleted", u.user_id));
        set_status(ctx, &order).await?;
        emit(ctx, "order.cancelled", &order)?;
    }
    Ok(())
}

/// The worker's handlers.
pub fn handlers(worker: Worker) -> Worker {
    worker
        .on("order.place", handler!(place))
        .on("order.deliver", handler!(deliver))
        .on("order.complete", handler!(complete))
        .on("order.cancel", handler!(cancel))
        .on("gig.published", handler!(gig_changed))
        .on("gig.updated", handler!(gig_changed))
        .on("gig.paused", handler!(gig_changed))
        .on("user.registered", handler!(user_registered))
        .on("user.deleted", handler!(user_deleted))
}

async fn get_order(
    State(db): State<Database>,
    ValidPath(id): ValidPath<String>,
) -> Result<Json<Order>, ApiError> {
    valid_id(&id).map_err(ApiError::bad_request)?;
    let row = db
        .read_optional(BY_ID, &[Param::from(&id)])
        .await
        .map_err(ApiError::from)?;
    match row {
        Some(r) => Ok(Json(order_of(&r).map_err(ApiError::from)?)),
        None => Err(ApiError::not_found(format!("no order {id}"))),
    }
}

#[derive(Deserialize)]
struct ByBuyer {
    buyer_id: Option<String>,
}

async fn list_orders(
    State(db): State<Database>,
    ValidQuery(q): ValidQuery<ByBuyer>,
) -> Result<Json<Vec<Order>>, ApiError> {
    let Some(buyer) = q.buyer_id else {
        return Err(ApiError::bad_request(
            "the buyer_id query parameter is required",
        ));
    };
    valid_id(&buyer).map_err(ApiError::bad_request)?;
    let sql = format!("{COLUMNS} WHERE buyer_id = ? ORDER BY order_id LIMIT 1000");
    let rows = db
        .read_all(&sql, &[Param::from(&buyer)])
        .await
        .map_err(ApiError::from)?;
    Ok(Json(
        rows.iter()
            .map(order_of)
            .collect::<Result<Vec<_>, _>>()
            .map_err(ApiError::from)?,
    ))
}

/// The query head's routes.
pub fn routes(db: Database) -> Router {
    Router::new()
        .route("/orders/{id}", get(get_order))
        .route("/orders", get(list_orders))
        .with_state(db)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_order_lifecycle() {
        use OrderStatus::*;
        assert_eq!(transition(Placed, Action::Deliver), Ok(Delivered));
        assert_eq!(transition(Delivered, Action::Complete), Ok(Completed));
        assert_eq!(transition(Placed, Action::Cancel), Ok(Cancelled));
        assert_eq!(transition(Delivered, Action::Cancel), Ok(Cancelled));
        for (from, action) in [
            (Cancelled, Action::Deliver),
            (Completed, Action::Cancel),
            (Placed, Action::Complete),
            (Rejected, Action::Deliver),
            (Completed, Action::Complete),
        ] {
            let err = transition(from, action).err().unwrap_or_default();
            assert!(
                err.contains("illegal state change"),
                "{from:?} {action:?}: {err}"
            );
        }
    }

    #[test]
    fn statuses_are_stored_and_sent_as_their_words() {
        for status in OrderStatus::ALL {
            assert_eq!(OrderStatus::parse(status.as_str()), Some(status));
            let json = serde_json::to_string(&status).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", status.as_str()));
        }
        assert_eq!(OrderStatus::parse("lost"), None);
    }
}
