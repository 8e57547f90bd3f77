//! Each module's own broker user (ADR 0018): the Secret its heads read, the user and its
//! permissions on the operator's broker, and their removal with the module.
//!
//! Incremental like the topology: a module whose user was checked recently, for the same
//! grants, costs nothing. The Secret is read again every few minutes (there is no watch on
//! Secrets: the operator may not list them), the broker at the topology's resync, from one
//! read of the vhost's permissions shared by every module.

pub(crate) mod broker;
mod secret;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::ResourceExt;

use crate::Error;
use crate::cluster::Context;
use crate::topology::management::{BrokerError, ManagementClient};
use chimera_core::access::user::module_user;
use chimera_core::access::{Grants, grants, steps};
use chimera_core::api::ChimeraModule;
use chimera_core::status::Verdict;
use chimera_core::topology::plan::module_key;
use chimera_core::topology::state::BrokerEndpoint;

/// How long a read of the module's Secret holds.
const SECRET_RESYNC: Duration = Duration::from_secs(300);

/// What one module's user was last made from.
#[derive(Clone)]
struct Record {
    fingerprint: u64,
    password: String,
    /// The user holds `password` (false after a new password until the broker took it).
    user_synced: bool,
    secret_checked: Instant,
    broker_checked: Option<Instant>,
}

type VhostCell = Arc<tokio::sync::Mutex<Option<(Instant, HashMap<String, Grants>)>>>;

/// The operator's memory of module users.
#[derive(Default)]
pub struct Access {
    records: Mutex<HashMap<String, Record>>,
    vhosts: Mutex<HashMap<String, VhostCell>>,
}

impl Access {
    fn record(&self, key: &str) -> Option<Record> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    fn store(&self, key: String, record: Record) {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, record);
    }

    fn forget(&self, key: &str) {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    fn vhost(&self, endpoint: &BrokerEndpoint) -> VhostCell {
        let key = format!("{}|{}", endpoint.management_url, endpoint.vhost);
        let mut vhosts = self.vhosts.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(vhosts.entry(key).or_default())
    }

    /// The user's grants on the vhost as last listed (a listing no older than `max_age`).
    async fn listed(
        &self,
        endpoint: &BrokerEndpoint,
        client: &ManagementClient,
        user: &str,
        max_age: Duration,
    ) -> Result<Option<Grants>, BrokerError> {
        let cell = self.vhost(endpoint);
        let mut cached = cell.lock().await;
        if let Some((at, grants)) = cached.as_ref()
            && at.elapsed() < max_age
        {
            return Ok(grants.get(user).cloned());
        }
        let grants = broker::vhost_grants(client).await?;
        let found = grants.get(user).cloned();
        *cached = Some((Instant::now(), grants));
        Ok(found)
    }

    /// Folds what was just set into the vhost's listing.
    async fn listed_now(&self, endpoint: &BrokerEndpoint, user: &str, grants: Option<&Grants>) {
        if let Some((_, listing)) = self.vhost(endpoint).lock().await.as_mut() {
            match grants {
                Some(g) => listing.insert(user.to_owned(), g.clone()),
                None => listing.remove(user),
            };
        }
    }
}

fn fingerprint(user: &str, grants: &Grants, endpoint: &BrokerEndpoint, uid: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (
        user,
        grants,
        &endpoint.amqp_url,
        &endpoint.management_url,
        uid,
    )
        .hash(&mut hasher);
    hasher.finish()
}

/// Whether `module` gets a user of its own from this operator.
pub fn applies_to(module: &ChimeraModule, ctx: &Context) -> bool {
    ctx.settings.module_broker_users && module.spec.broker.is_none() && ctx.broker.is_some()
}

/// Makes the module's Secret and its user with exactly its grants. A failure of the API
/// server is an error; one of the broker is returned as the `TopologyReady` verdict it makes,
/// with the error to retry on, so the heads are still applied.
pub async fn ensure(
    module: &ChimeraModule,
    ctx: &Context,
) -> Result<Option<(Verdict, Error)>, Error> {
    let Some(endpoint) = ctx.broker.as_ref().filter(|_| applies_to(module, ctx)) else {
        return Ok(None);
    };
    let user = module_user(module, &endpoint.vhost);
    let want = grants(module);
    let print = fingerprint(&user, &want, endpoint, &module.uid().unwrap_or_default());
    let key = module_key(module);
    let fresh_broker = ctx.topology_resync.mul_f64(0.7);
    let old = ctx.access.record(&key).filter(|r| r.fingerprint == print);
    if let Some(r) = &old
        && r.user_synced
        && r.secret_checked.elapsed() < SECRET_RESYNC
        && r.broker_checked
            .is_some_and(|at| at.elapsed() < fresh_broker)
    {
        return Ok(None);
    }
    let mut record = match old.filter(|r| r.secret_checked.elapsed() < SECRET_RESYNC) {
        Some(r) => r,
        None => {
            let (password, made) = secret::ensure(module, ctx, &user, &endpoint.amqp_url).await?;
            let previous = ctx.access.record(&key);
            // The user holds this password already unless it was just made or changed.
            let synced = !made && previous.is_some_and(|p| p.user_synced && p.password == password);
            Record {
                fingerprint: print,
                password,
                user_synced: synced,
                secret_checked: Instant::now(),
                broker_checked: None,
            }
        }
    };
    let outcome = sync_user(ctx, endpoint, &user, &record, &want).await;
    match outcome {
        Ok(()) => {
            record.user_synced = true;
            record.broker_checked = Some(Instant::now());
            ctx.access.store(key, record);
            Ok(None)
        }
        Err(error) => {
            record.broker_checked = None;
            ctx.access.store(key, record);
            let failure = error.failure();
            let verdict = Verdict::new(
                false,
                "BrokerUserFailed",
                format!("the module's broker user {user:?}: {}", failure.message),
            );
            Ok(Some((verdict, Error::Broker(error))))
        }
    }
}

async fn sync_user(
    ctx: &Context,
    endpoint: &BrokerEndpoint,
    user: &str,
    record: &Record,
    want: &Grants,
) -> Result<(), BrokerError> {
    let client = ManagementClient::new(endpoint)?;
    // A password not yet given to the user is a reason to read the vhost afresh.
    let max_age = if record.user_synced {
        ctx.topology_resync / 2
    } else {
        Duration::ZERO
    };
    let have = ctx.access.listed(endpoint, &client, user, max_age).await?;
    let todo = steps(want, have.as_ref(), !record.user_synced);
    if todo.is_empty() {
        return Ok(());
    }
    tracing::info!(user, steps = ?todo, "setting a module's broker user");
    let applied = broker::apply(&client, user, &record.password, want, &todo).await;
    // Whatever happened, the listing no longer says what the broker holds for this user.
    let now = applied.is_ok().then_some(want);
    ctx.access.listed_now(endpoint, user, now).await;
    applied
}

/// Deletes the module's user (if the operator made it) when the module goes.
pub async fn remove(module: &ChimeraModule, ctx: &Context) -> Result<(), Error> {
    let Some(endpoint) = &ctx.broker else {
        return Ok(());
    };
    // Tried even with per-module users off now: they may have been on when it was made.
    let user = module_user(module, &endpoint.vhost);
    let client = ManagementClient::new(endpoint)?;
    if broker::delete_user(&client, &user).await? {
        tracing::info!(user, "deleted the module's broker user");
    }
    ctx.access.forget(&module_key(module));
    ctx.access.listed_now(endpoint, &user, None).await;
    Ok(())
}
