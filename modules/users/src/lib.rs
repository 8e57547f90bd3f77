//! The users domain: registers marketplace users and tells the other domains about them.
//!
//! Commands: `user.register {user_id, name, email}`, `user.update {user_id, name?, email?}`,
//! `user.delete {user_id}`. Events: `user.registered`, `user.updated`, `user.deleted` (each
//! with the user's full state). Reads: `GET /users/{id}`, `GET /users?limit=&after=`.
//! Invalid commands are rejected (dead-lettered with the reason), never retried.

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

/// The users table.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 100,
    description: "users",
    sql: "CREATE TABLE users (
        user_id VARCHAR(64) NOT NULL PRIMARY KEY,
        name VARCHAR(255) NOT NULL,
        email VARCHAR(320) NOT NULL,
        deleted INTEGER NOT NULL)",
}];

/// The module, for `chimera_sdk::head::main`.
pub fn module() -> Module {
    Module {
        program: Program {
            name: "users",
            version: env!("CARGO_PKG_VERSION"),
            about: "the users domain: registers marketplace users and tells the other domains about them",
        },
        migrations: MIGRATIONS,
        query: routes,
        worker: handlers,
    }
}

/// A user as the read model and the events show it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// Id chosen by the caller.
    pub user_id: String,
    /// Display name.
    pub name: String,
    /// E-mail address.
    pub email: String,
}

#[derive(Deserialize)]
struct Register {
    user_id: String,
    name: String,
    email: String,
}

#[derive(Deserialize)]
struct Update {
    user_id: String,
    name: Option<String>,
    email: Option<String>,
}

#[derive(Deserialize)]
struct Delete {
    user_id: String,
}

/// Checks a name: 1-255 characters once trimmed.
pub fn valid_name(name: &str) -> Result<(), String> {
    let trimmed = name.trim();
    if trimmed.is_empty() || trimmed.len() > 255 {
        return Err(format!("invalid name {name:?}: 1 to 255 characters"));
    }
    Ok(())
}

/// Checks an e-mail address: one `@`, something before it, a dotted domain after it.
pub fn valid_email(email: &str) -> Result<(), String> {
    let ok = match email.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.contains('@')
                && domain.split('.').count() >= 2
                && domain.split('.').all(|part| !part.is_empty())
                && !email.chars().any(char::is_whitespace)
                && email.len() <= 320
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("invalid email {email:?}"))
    }
}

async fn current(ctx: &mut Context, user_id: &str) -> Result<Option<User>, HandlerError> {
    let row =
        sqlx::query("SELECT user_id, name, email FROM users WHERE user_id = ? AND deleted = 0")
            .bind(user_id)
            .fetch_optional(&mut **ctx.tx())
            .await?;
    Ok(match row {
        Some(r) => Some(User {
            user_id: r.try_get("user_id")?,
            name: r.try_get("name")?,
            email: r.try_get("email")?,
        }),
        None => None,
    })
}

async fn register(ctx: &mut Context) -> Result<(), HandlerError> {
    let cmd: Register = ctx.data()?;
    valid_id(&cmd.user_id)
        .and(valid_name(&cmd.name))
        .and(valid_email(&cmd.email))
        .map_err(HandlerError::reject)?;
    let user = User {
        user_id: cmd.user_id,
        name: cmd.name.trim().to_owned(),
        email: cmd.email,
    };
    // The primary key says whether the id is taken: one statement instead of a read and a
    // write.
    let inserted =
        sqlx::query("INSERT INTO users (user_id, name, email, deleted) VALUES (?, ?, ?, 0)")
            .bind(&user.user_id)
            .bind(&user.name)
            .bind(&user.email)
            .execute(&mut **ctx.tx())
            .await;
    match inserted {
        Ok(_) => {}
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            return Err(HandlerError::reject(format!(
                "user {} is already registered",
                user.user_id
            )));
        }
        Err(e) => return Err(e.into()),
    }
    ctx.emit("user.registered", &user)
}

async fn update(ctx: &mut Context) -> Result<(), HandlerError> {
    let cmd: Update = ctx.data()?;
    valid_id(&cmd.user_id).map_err(HandlerError::reject)?;
    if cmd.name.is_none() && cmd.email.is_none() {
        return Err(HandlerError::reject("user.update needs a name or an email"));
    }
    if let Some(name) = &cmd.name {
        valid_name(name).map_err(HandlerError::reject)?;
    }
    if let Some(email) = &cmd.email {
        valid_email(email).map_err(HandlerError::reject)?;
    }
    let Some(mut user) = current(ctx, &cmd.user_id).await? else {
        return Err(HandlerError::reject(format!("no user {}", cmd.user_id)));
    };
    if let Some(name) = cmd.name {
        user.name = name.trim().to_owned();
    }
    if let Some(email) = cmd.email {
        user.email = email;
    }
    sqlx::query("UPDATE users SET name = ?, email = ? WHERE user_id = ?")
        .bind(&user.name)
        .bind(&user.email)
        .bind(&user.user_id)
        .execute(&mut **ctx.tx())
        .await?;
    ctx.emit("user.updated", &user)
}

async fn delete(ctx: &mut Context) -> Result<(), HandlerError> {
    let cmd: Delete = ctx.data()?;
    let Some(user) = current(ctx, &cmd.user_id).await? else {
        return Err(HandlerError::reject(format!("no user {}", cmd.user_id)));
    };
    sqlx::query("UPDATE users SET deleted = 1 WHERE user_id = ?")
        .bind(&user.user_id)
        .execute(&mut **ctx.tx())
        .await?;
    ctx.emit(
        "user.deleted",
        &serde_json::json!({"user_id": user.user_id}),
    )
}

/// The worker's handlers.
pub fn handlers(worker: Worker) -> Worker {
    worker
        .on("user.register", handler!(register))
        .on("user.update", handler!(update))
        .on("user.delete", handler!(delete))
}

#[derive(Deserialize)]
struct Page {
    limit: Option<u32>,
    after: Option<String>,
}

/// A page of users, ordered by id.
#[derive(Serialize, Deserialize, Debug)]
pub struct UserPage {
    /// The users.
    pub items: Vec<User>,
    /// `after` for the next page, when there is one.
    pub next: Option<String>,
}

fn user_of(r: &impl Columns) -> Result<User, sqlx::Error> {
    Ok(User {
        user_id: r.get("user_id")?,
        name: r.get("name")?,
        email: r.get("email")?,
    })
}

async fn get_user(
    State(db): State<Database>,
    ValidPath(id): ValidPath<String>,
) -> Result<Json<User>, ApiError> {
    valid_id(&id).map_err(ApiError::bad_request)?;
    let row = db
        .read_optional(
            "SELECT user_id, name, email FROM users WHERE user_id = ? AND deleted = 0",
            &[Param::from(&id)],
        )
        .await
        .map_err(ApiError::from)?;
    match row {
        Some(r) => Ok(Json(user_of(&r).map_err(ApiError::from)?)),
        None => Err(ApiError::not_found(format!("no user {id}"))),
    }
}

async fn list_users(
    State(db): State<Database>,
    ValidQuery(page): ValidQuery<Page>,
) -> Result<Json<UserPage>, ApiError> {
    let limit = page.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be 1 to 500, got {limit}"
        )));
    }
    let after = page.after.unwrap_or_default();
    let rows = db
        .read_all(
            "SELECT user_id, name, email FROM users WHERE deleted = 0 AND user_id > ? ORDER BY user_id LIMIT ?",
            &[Param::from(&after), Param::from(i64::from(limit) + 1)],
        )
        .await
        .map_err(ApiError::from)?;
    let mut items = rows
        .iter()
        .map(user_of)
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::from)?;
    let next = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|u| u.user_id.clone())
    } else {
        None
    };
    Ok(Json(UserPage { items, next }))
}

/// The query head's routes.
pub fn routes(db: Database) -> Router {
    Router::new()
        .route("/users/{id}", get(get_user))
        .route("/users", get(list_users))
        .with_state(db)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        for ok in ["ada@example.com", "a.b+c@mail.example.org"] {
            assert!(valid_email(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "ada",
            "@example.com",
            "ada@",
            "ada@example",
            "ada@@example.com",
            "a da@example.com",
            "ada@example..com",
        ] {
            assert!(valid_email(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_and_names() {
        assert!(valid_id("u-1").is_ok());
        assert!(
            valid_id("").is_err() && valid_id("a b").is_err() && valid_id(&"x".repeat(65)).is_err()
        );
        assert!(valid_name(" Ada ").is_ok());
        assert!(valid_name("   ").is_err());
    }
}
