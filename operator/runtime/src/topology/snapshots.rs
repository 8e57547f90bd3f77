//! One shared read of each vhost, refreshed at most every so often, from which every module's
//! drift check takes its part (see `chimera_core::topology::snapshot`): with a thousand modules,
//! three reads of the vhost per period instead of three per module.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::management::{BrokerError, ManagementClient};
use chimera_core::topology::diff::TopologyDiff;
use chimera_core::topology::plan::TopologyPlan;
use chimera_core::topology::snapshot::Snapshot;
use chimera_core::topology::state::{BrokerEndpoint, BrokerState};

type Cell = Arc<tokio::sync::Mutex<Option<(Instant, Snapshot)>>>;

/// Each vhost's last read, by management URL and vhost.
#[derive(Default)]
pub struct Snapshots {
    vhosts: Mutex<HashMap<String, Cell>>,
}

fn key(endpoint: &BrokerEndpoint) -> String {
    format!("{}|{}", endpoint.management_url, endpoint.vhost)
}

impl Snapshots {
    fn cell(&self, endpoint: &BrokerEndpoint) -> Cell {
        let mut vhosts = self.vhosts.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(vhosts.entry(key(endpoint)).or_default())
    }

    /// What of the vhost the diff against `plan` reads, from a read no older than `max_age`
    /// (one read at a time per vhost: concurrent checks wait for it and share it).
    pub async fn view(
        &self,
        endpoint: &BrokerEndpoint,
        plan: &TopologyPlan,
        max_age: Duration,
    ) -> Result<BrokerState, BrokerError> {
        let cell = self.cell(endpoint);
        let mut cached = cell.lock().await;
        if let Some((at, snapshot)) = cached.as_ref()
            && at.elapsed() < max_age
        {
            return Ok(snapshot.view(plan));
        }
        let state = ManagementClient::new(endpoint)?.state().await?;
        let snapshot = Snapshot::from(state);
        let view = snapshot.view(plan);
        *cached = Some((Instant::now(), snapshot));
        Ok(view)
    }

    /// Folds what applying `diff` changed into the vhost's snapshot.
    pub async fn record(&self, endpoint: &BrokerEndpoint, diff: &TopologyDiff) {
        if let Some((_, snapshot)) = self.cell(endpoint).lock().await.as_mut() {
            snapshot.record(diff);
        }
    }

    /// Folds a release in: `deleted` queues are gone, and the other `queues` keep only the
    /// bindings from `own` exchanges.
    pub async fn released(
        &self,
        endpoint: &BrokerEndpoint,
        queues: &[String],
        deleted: &[String],
        own: &[String],
    ) {
        if let Some((_, snapshot)) = self.cell(endpoint).lock().await.as_mut() {
            for queue in queues {
                if deleted.contains(queue) {
                    snapshot.forget_queue(queue);
                } else {
                    snapshot.unbind_into(queue, own);
                }
            }
        }
    }

    /// Drops the vhost's snapshot (after a change of unknown extent): the next check reads it.
    pub async fn invalidate(&self, endpoint: &BrokerEndpoint) {
        *self.cell(endpoint).lock().await = None;
    }
}
