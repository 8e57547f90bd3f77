//! The gigs domain: sellers publish gigs; seller names come from the users domain's events.
//!
//! Commands: `gig.publish {gig_id, seller_id, title, price_cents}`, `gig.update {gig_id, title?,
//! price_cents?}`, `gig.pause {gig_id}`. Events: `gig.published`, `gig.updated`, `gig.paused`
//! (each with the gig's full state). Subscribes to `user.registered`/`user.updated` (seller
//! names) and `user.deleted` (pauses that seller's gigs). Reads: `GET /gigs/{id}` (with the
//! seller's name), `GET /gigs?seller_id=`.

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

/// The gigs and sellers tables.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 100,
        description: "gigs",
        sql: "CREATE TABLE gigs (
            gig_id VARCHAR(64) NOT NULL PRIMARY KEY,
            seller_id VARCHAR(64) NOT NULL,
            title VARCHAR(200) NOT NULL,
            price_cents BIGINT NOT NULL,
            status VARCHAR(16) NOT NULL)",
    },
    Migration {
        version: 101,
        description: "sellers",
        sql: "CREATE TABLE sellers (
            user_id VARCHAR(64) NOT NULL PRIMARY KEY,
            name VARCHAR(255) NOT NULL,
            deleted INTEGER NOT NULL)",
    },
    Migration {
        version: 102,
        description: "gigs by seller",
        sql: "CREATE INDEX gigs_seller ON gigs (seller_id)",
    },
];

/// The module, for `chimera_sdk::head::main`.
pub fn module() -> Module {
    Module {
        program: Program {
            name: "gigs",
            version: env!("CARGO_PKG_VERSION"),
            about: "the gigs domain: sellers publish gigs; seller names come from the users domain's events",
        },
        migrations: MIGRATIONS,
        query: routes,
        worker: handlers,
    }
}

/// A gig as events carry it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Gig {
    /// Id chosen by the caller.
    pub gig_id: String,
    /// The seller (a user).
    pub seller_id: String,
    /// Title.
    pub title: String,
    /// Price in cents, > 0.
    pub price_cents: i64,
    /// `active` or `paused`.
    pub status: String,
}

/// Checks a title: 1-200 characters once trimmed.
pub fn valid_title(title: &str) -> Result<(), String> {
    let t = title.trim();
    if t.is_empty() || t.len() > 200 {
        return Err(format!("invalid title {title:?}: 1 to 200 characters"));
    }
    Ok(())
}

/// Checks a price: positive, at most 10 million units.
pub fn valid_price(cents: i64) -> Result<(), String> {
    if cents <= 0 || cents > 1_000_000_000 {
        return Err(format!(
            "invalid price_cents {cents}: must be between 1 and 1000000000"
        ));
    }
    Ok(())
}

fn gig_of(r: &impl Columns) -> Result<Gig, sqlx::Error> {
    Ok(Gig {
        gig_id: r.get("gig_id")?,
        seller_id: r.get("seller_id")?,
        title: r.get("title")?,
        price_cents: r.get("price_cents")?,
        status: r.get("status")?,
    })
}

async fn load(ctx: &mut Context, gig_id: &str) -> Result<Option<Gig>, HandlerError> {
    let row = sqlx::query(
        "SELECT gig_id, seller_id, title, price_cents, status FROM gigs WHERE gig_id = ?",
    )
    .bind(gig_id)
    .fetch_optional(&mut **ctx.tx())
    .await?;
    Ok(row.as_ref().map(gig_of).transpose()?)
}

async fn save(ctx: &mut Context, gig: &Gig, insert: bool) -> Result<(), HandlerError> {
    let sql = if insert {
        "INSERT INTO gigs (seller_id, title, price_cents, status, gig_id) VALUES (?, ?, ?, ?, ?)"
    } else {
        "UPDATE gigs SET seller_id = ?, title = ?, price_cents = ?, status = ? WHERE gig_id = ?"
    };
    sqlx::query(sql)
        .bind(&gig.seller_id)
        .bind(&gig.title)
        .bind(gig.price_cents)
        .bind(&gig.status)
        .bind(&gig.gig_id)
        .execute(&mut **ctx.tx())
        .await?;
    Ok(())
}

fn emit(ctx: &mut Context, kind: &str, gig: &Gig) -> Result<(), HandlerError> {
    ctx.emit(kind, gig)
}

#[derive(Deserialize)]
struct Publish {
    gig_id: String,
    seller_id: String,
    title: String,
    price_cents: i64,
}

async fn publish(ctx: &mut Context) -> Result<(), HandlerError> {
    let cmd: Publish = ctx.data()?;
    valid_id(&cmd.gig_id)
        .and(valid_id(&cmd.seller_id))
        .and(valid_title(&cmd.title))
        .and(valid_price(cmd.price_cents))
        .map_err(HandlerError::reject)?;
    if load(ctx, &cmd.gig_id).await?.is_some() {
        return Err(HandlerError::reject(format!(
            "gig {} already exists",
            cmd.gig_id
        )));
    }
    let seller = sqlx::query("SELECT deleted FROM sellers WHERE user_id = ?")
        .bind(&cmd.seller_id)
        .fetch_optional(&mut **ctx.tx())
        .await?;
    match seller {
        // The user.registered event may not have arrived yet: retry, and give up only when
        // no retry is left.
        None if !ctx.is_last_attempt() => {
            return Err(HandlerError::retry(format!(
                "seller {} not known yet",
                cmd.seller_id
            )));
        }
        None => {
            return Err(HandlerError::reject(format!(
                "unknown seller {}",
                cmd.seller_id
            )));
        }
        Some(r) if r.try_get::<i64, _>("deleted")? != 0 => {
            return Err(HandlerError::reject(format!(
                "seller {} was deleted",
                cmd.seller_id
            )));
        }
        Some(_) => {}
    }
    let gig = Gig {
        gig_id: cmd.gig_id,
        seller_id: cmd.seller_id,
        title: cmd.title.trim().to_owned(),
        price_cents: cmd.price_cents,
        status: "active".into(),
    };
    save(ctx, &gig, true).await?;
    emit(ctx, "gig.published", &gig)
}

#[derive(Deserialize)]
struct Update {
    gig_id: String,
    title: Option<String>,
    price_cents: Option<i64>,
}

async fn update(ctx: &mut Context) -> Result<(), HandlerError> {
    let cmd: Update = ctx.data()?;
    if cmd.title.is_none() && cmd.price_cents.is_none() {
        return Err(HandlerError::reject(
            "gig.update needs a title or a price_cents",
        ));
    }
    if let Some(t) = &cmd.title {
        valid_title(t).map_err(HandlerError::reject)?;
    }
    if let Some(p) = cmd.price_cents {
        valid_price(p).map_err(HandlerError::reject)?;
    }
    let Some(mut gig) = load(ctx, &cmd.gig_id).await? else {
        return Err(HandlerError::reject(format!("no gig {}", cmd.gig_id)));
    };
    if let Some(t) = cmd.title {
        gig.title = t.trim().to_owned();
    }
    if let Some(p) = cmd.price_cents {
        gig.price_cents = p;
    }
    save(ctx, &gig, false).await?;
    emit(ctx, "gig.updated", &gig)
}

#[derive(Deserialize)]
struct Pause {
    gig_id: String,
}

async fn pause(ctx: &mut Context) -> Result<(), HandlerError> {
    let cmd: Pause = ctx.data()?;
    let Some(mut gig) = load(ctx, &cmd.gig_id).await? else {
        return Err(HandlerError::reject(format!("no gig {}", cmd.gig_id)));
    };
    if gig.status == "paused" {
        return Err(HandlerError::reject(format!(
            "gig {} is already paused",
            gig.gig_id
        )));
    }
    gig.status = "paused".into();
    save(ctx, &gig, false).await?;
    emit(ctx, "gig.paused", &gig)
}

#[derive(Deserialize)]
struct UserEvent {
    user_id: String,
    name: Option<String>,
}

async fn user_changed(ctx: &mut Context) -> Result<(), HandlerError> {
    let event: UserEvent = ctx.data()?;
    let name = event.name.unwrap_or_default();
    let updated = sqlx::query("UPDATE sellers SET name = ? WHERE user_id = ?")
        .bind(&name)
        .bind(&event.user_id)
        .execute(&mut **ctx.tx())
        .await?;
    if updated.rows_affected() == 0 {
        sqlx::query("INSERT INTO sellers (user_id, name, deleted) VALUES (?, ?, 0)")
            .bind(&event.user_id)
            .bind(&name)
            .execute(&mut **ctx.tx())
            .await?;
    }
    Ok(())
}

async fn user_deleted(ctx: &mut Context) -> Result<(), HandlerError> {
    let event: UserEvent = ctx.data()?;
    let updated = sqlx::query("UPDATE sellers SET deleted = 1 WHERE user_id = ?")
        .bind(&event.user_id)
        .execute(&mut **ctx.tx())
        .await?;
    if updated.rows_affected() == 0 {
        sqlx::query("INSERT INTO sellers (user_id, name, deleted) VALUES (?, '', 1)")
            .bind(&event.user_id)
            .execute(&mut **ctx.tx())
            .await?;
    }
    let rows = sqlx::query("SELECT gig_id, seller_id, title, price_cents, status FROM gigs WHERE seller_id = ? AND status = 'active' ORDER BY gig_id")
        .bind(&event.user_id)
        .fetch_all(&mut **ctx.tx())
        .await?;
    let gigs = rows.iter().map(gig_of).collect::<Result<Vec<_>, _>>()?;
    for mut gig in gigs {
        gig.status = "paused".into();
        save(ctx, &gig, false).await?;
        emit(ctx, "gig.paused", &gig)?;
    }
    Ok(())
}

/// The worker's handlers.
pub fn handlers(worker: Worker) -> Worker {
    worker
        .on("gig.publish", handler!(publish))
        .on("gig.update", handler!(update))
        .on("gig.pause", handler!(pause))
        .on("user.registered", handler!(user_changed))
        .on("user.updated", handler!(user_changed))
        .on("user.deleted", handler!(user_deleted))
}

/// A gig with its seller's name, as `GET /gigs/{id}` answers.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct GigView {
    /// The gig.
    #[serde(flatten)]
    pub gig: Gig,
    /// The seller's name (empty while the users domain has not told).
    pub seller_name: String,
}

const VIEW: &str = "SELECT g.gig_id, g.seller_id, g.title, g.price_cents, g.status, COALESCE(s.name, '') AS seller_name
    FROM gigs g LEFT JOIN sellers s ON s.user_id = g.seller_id";

fn view_of(r: &impl Columns) -> Result<GigView, sqlx::Error> {
    Ok(GigView {
        gig: gig_of(r)?,
        seller_name: r.get("seller_name")?,
    })
}

async fn get_gig(
    State(db): State<Database>,
    ValidPath(id): ValidPath<String>,
) -> Result<Json<GigView>, ApiError> {
    valid_id(&id).map_err(ApiError::bad_request)?;
    let row = db
        .read_optional(&format!("{VIEW} WHERE g.gig_id = ?"), &[Param::from(&id)])
        .await
        .map_err(ApiError::from)?;
    match row {
        Some(r) => Ok(Json(view_of(&r).map_err(ApiError::from)?)),
        None => Err(ApiError::not_found(format!("no gig {id}"))),
    }
}

#[derive(Deserialize)]
struct BySeller {
    seller_id: Option<String>,
}

async fn list_gigs(
    State(db): State<Database>,
    ValidQuery(q): ValidQuery<BySeller>,
) -> Result<Json<Vec<GigView>>, ApiError> {
    let Some(seller) = q.seller_id else {
        return Err(ApiError::bad_request(
            "the seller_id query parameter is required",
        ));
    };
    valid_id(&seller).map_err(ApiError::bad_request)?;
    let sql = format!("{VIEW} WHERE g.seller_id = ? ORDER BY g.gig_id LIMIT 1000");
    let rows = db
        .read_all(&sql, &[Param::from(&seller)])
        .await
        .map_err(ApiError::from)?;
    Ok(Json(
        rows.iter()
            .map(view_of)
            .collect::<Result<Vec<_>, _>>()
            .map_err(ApiError::from)?,
    ))
}

/// The query head's routes.
pub fn routes(db: Database) -> Router {
    Router::new()
        .route("/gigs/{id}", get(get_gig))
        .route("/gigs", get(list_gigs))
        .with_state(db)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_and_titles() {
        assert!(valid_price(1).is_ok() && valid_price(2500).is_ok());
        assert!(
            valid_price(0).is_err()
                && valid_price(-5).is_err()
                && valid_price(2_000_000_000).is_err()
        );
        assert!(valid_title("Logo design").is_ok());
        assert!(valid_title("  ").is_err() && valid_title(&"t".repeat(201)).is_err());
    }
}
