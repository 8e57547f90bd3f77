//! Leader election on a `coordination.k8s.io/v1` Lease (the decisions are
//! `chimera_core::leader`'s): every replica keeps its caches warm, only the leader writes.
//! [`Leadership`] is what the controller and the autoscaler ask before they write; it stops
//! answering yes at the renew deadline on its own, even if the elector is stuck, so a replica
//! that cannot renew has stopped writing before another may take the Lease.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tracing::{debug, info, warn};

use chimera_core::leader::{self, Observed, Record, Step, Timing};

/// Where and as whom to run for leader.
#[derive(Clone, Debug)]
pub struct LeaderSettings {
    /// Namespace of the Lease (the operator's own).
    pub namespace: String,
    /// Name of the Lease.
    pub lease: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// Lease duration, renew deadline, retry period.
    pub timing: Timing,
}

struct State {
    /// Leading until then; None: following.
    until: Option<Instant>,
}

/// Whether this replica may write now. Cheap to clone and to ask.
#[derive(Clone)]
pub struct Leadership {
    /// Without an election (a single replica), always leading.
    always: bool,
    state: Arc<Mutex<State>>,
    changes: tokio::sync::watch::Sender<bool>,
}

impl Leadership {
    /// A replica that runs alone: it always leads.
    pub fn always() -> Self {
        Self {
            always: true,
            state: Arc::new(Mutex::new(State { until: None })),
            changes: tokio::sync::watch::Sender::new(true),
        }
    }

    /// A replica that follows until an [`Elector`] makes it lead.
    pub fn elected() -> Self {
        Self {
            always: false,
            state: Arc::new(Mutex::new(State { until: None })),
            changes: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Whether this replica leads at this instant.
    pub fn is_leading(&self) -> bool {
        if self.always {
            return true;
        }
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.until.is_some_and(|until| Instant::now() < until)
    }

    /// How long this replica still leads without renewing (None: it does not lead now); a
    /// write that has not finished by then must be abandoned. Unbounded when alone.
    pub fn time_left(&self) -> Option<Duration> {
        if self.always {
            return Some(Duration::MAX);
        }
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state
            .until
            .and_then(|until| until.checked_duration_since(Instant::now()))
            .filter(|left| !left.is_zero())
    }

    /// Changes of leadership (true: leads), as the elector notices them.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<bool> {
        self.changes.subscribe()
    }

    pub(crate) fn lead_until(&self, until: Instant) {
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.until = Some(until);
        }
        self.publish();
    }

    fn follow(&self) {
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            state.until = None;
        }
        self.publish();
    }

    /// Sends the current leadership when it changed.
    fn publish(&self) {
        let leading = self.is_leading();
        self.changes.send_if_modified(|was| {
            let changed = *was != leading;
            *was = leading;
            changed
        });
    }

    /// The `chimera_operator_leader` gauge, in Prometheus text.
    pub fn render(&self) -> String {
        format!(
            "# HELP chimera_operator_leader 1 while this replica leads (writes and scales).\n# TYPE chimera_operator_leader gauge\nchimera_operator_leader {}\n",
            u8::from(self.is_leading())
        )
    }
}

/// Why the Lease could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The timing cannot fence a leader.
    #[error("leader election: {0}")]
    Timing(#[from] chimera_core::leader::TimingError),
}

/// Runs for leader on one Lease.
pub struct Elector {
    api: Api<Lease>,
    settings: LeaderSettings,
    leadership: Leadership,
    origin: Instant,
}

fn record_of(lease: &Lease) -> Record {
    let spec = lease.spec.as_ref();
    Record {
        holder: spec.and_then(|s| s.holder_identity.clone()),
        renew_time: spec
            .and_then(|s| s.renew_time.as_ref())
            .map(|t| t.0.to_string()),
        transitions: spec.and_then(|s| s.lease_transitions).unwrap_or(0),
    }
}

fn now_micro() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn seconds(d: f64) -> Duration {
    Duration::from_secs_f64(d.max(0.0))
}

impl Elector {
    /// An elector for `settings`, driving `leadership` (made with [`Leadership::elected`]).
    pub fn new(
        client: Client,
        settings: LeaderSettings,
        leadership: Leadership,
    ) -> Result<Self, LeaderError> {
        settings.timing.validate()?;
        Ok(Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            leadership,
            origin: Instant::now(),
        })
    }

    fn now(&self) -> f64 {
        self.origin.elapsed().as_secs_f64()
    }

    /// Reads and writes the Lease every retry period, forever.
    pub async fn run(self: Arc<Self>) {
        let mut observed: Option<Observed> = None;
        let mut tick = tokio::time::interval(seconds(self.settings.timing.retry_period));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.api.get_opt(&self.settings.lease).await {
                Ok(lease) => {
                    observed = lease
                        .as_ref()
                        .map(|l| leader::observe(observed.as_ref(), record_of(l), self.now()));
                    self.act(lease, observed.as_ref()).await;
                }
                Err(error) => warn!(%error, lease = %self.settings.lease, "cannot read the Lease"),
            }
            // (a leader that could not renew stops by itself at its deadline; this only tells
            // the subscribers)
            self.leadership.publish();
        }
    }

    async fn act(&self, lease: Option<Lease>, observed: Option<&Observed>) {
        let me = &self.settings.identity;
        let step = leader::step(observed, me, self.now(), &self.settings.timing);
        let sent = Instant::now();
        let written = match (step, lease) {
            (Step::Follow, _) => {
                if self.leadership.is_leading() {
                    warn!(identity = %me, "another replica holds the Lease: following");
                }
                self.leadership.follow();
                return;
            }
            (Step::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.settings.lease.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(0)),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (Step::Renew, Some(mut lease)) => {
                // (the resourceVersion read goes back: a write in between fails with 409)
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                spec.renew_time = Some(now_micro());
                spec.lease_duration_seconds = Some(self.duration_seconds());
                self.api
                    .replace(&self.settings.lease, &PostParams::default(), &lease)
                    .await
            }
            (Step::Acquire, Some(mut lease)) => {
                let transitions = lease
                    .spec
                    .as_ref()
                    .and_then(|s| s.lease_transitions)
                    .unwrap_or(0);
                lease.spec = Some(self.spec(transitions + 1));
                self.api
                    .replace(&self.settings.lease, &PostParams::default(), &lease)
                    .await
            }
            (Step::Renew | Step::Acquire, None) => return,
        };
        match written {
            Ok(_) => {
                let until = sent + seconds(self.settings.timing.renew_deadline);
                if !self.leadership.is_leading() {
                    info!(identity = %me, lease = %self.settings.lease, ?step, "leading");
                }
                self.leadership.lead_until(until);
            }
            // Someone else wrote first: the next read says who leads.
            Err(kube::Error::Api(e)) if e.code == 409 => {
                debug!(identity = %me, ?step, "the Lease changed meanwhile");
            }
            Err(error) => warn!(%error, identity = %me, ?step, "cannot write the Lease"),
        }
    }

    fn duration_seconds(&self) -> i32 {
        #[allow(clippy::cast_possible_truncation)]
        let d = self.settings.timing.lease_duration.ceil() as i32;
        d.max(1)
    }

    fn spec(&self, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.settings.identity.clone()),
            lease_duration_seconds: Some(self.duration_seconds()),
            acquire_time: Some(now_micro()),
            renew_time: Some(now_micro()),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Stops leading at once and, if this replica holds the Lease, releases it so that
    /// another takes over without waiting for it to expire (on a clean shutdown).
    pub async fn release(&self) {
        self.leadership.follow();
        let Ok(Some(mut lease)) = self.api.get_opt(&self.settings.lease).await else {
            return;
        };
        if record_of(&lease).holder.as_deref() != Some(self.settings.identity.as_str()) {
            return;
        }
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = None;
        spec.renew_time = Some(now_micro());
        match self
            .api
            .replace(&self.settings.lease, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!(identity = %self.settings.identity, "released the Lease"),
            Err(error) => warn!(%error, "could not release the Lease; it expires by itself"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_leader_stops_at_its_deadline_without_being_told() {
        let leadership = Leadership::elected();
        assert!(!leadership.is_leading());
        let mut changes = leadership.subscribe();
        leadership.lead_until(Instant::now() + Duration::from_millis(50));
        assert!(leadership.is_leading());
        assert!(changes.has_changed().unwrap() && *changes.borrow_and_update());
        assert!(leadership.render().contains("chimera_operator_leader 1"));
        std::thread::sleep(Duration::from_millis(60));
        // Nobody renewed or told it: the deadline alone ends it.
        assert!(!leadership.is_leading());
        leadership.publish();
        assert!(changes.has_changed().unwrap() && !*changes.borrow_and_update());
        assert!(leadership.render().contains("chimera_operator_leader 0"));
    }

    #[test]
    fn time_left_is_what_remains_until_the_deadline() {
        let leadership = Leadership::elected();
        assert_eq!(leadership.time_left(), None, "a follower has none");
        leadership.lead_until(Instant::now() + Duration::from_secs(10));
        let left = leadership.time_left().unwrap();
        assert!(
            left > Duration::from_secs(9) && left <= Duration::from_secs(10),
            "{left:?}"
        );
        leadership.lead_until(Instant::now());
        assert_eq!(leadership.time_left(), None, "at the deadline, none");
        assert_eq!(Leadership::always().time_left(), Some(Duration::MAX));
    }

    #[test]
    fn a_replica_alone_always_leads() {
        let alone = Leadership::always();
        assert!(alone.is_leading());
        alone.follow();
        assert!(
            alone.is_leading(),
            "no election: nothing can make it follow"
        );
    }
}
