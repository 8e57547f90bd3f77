//! Chimera's control-plane runtime: the I/O around `chimera_core`.
//!
//! - [`operator`]: the operator assembled from the controller and the autoscaler, which share
//!   what [`cluster`] holds (context, field managers, Events, a module's broker);
//! - [`client`]: the operator's API client, rate-limited and counted;
//! - [`controller`]: the operator's reconcile loop against the API server, reading the
//!   [`caches`] it shares with the autoscaler;
//! - [`scaler`]: the operator's autoscaling loop and its metric sources;
//! - [`leader`]: leader election on a Lease, which both loops ask before they write;
//! - [`topology`]: the declarer, the management API client and queue migration;
//! - [`access`]: each module's own broker user and its Secret;
//! - [`local`]: `chimera up`, `chimera status` and `chimera load` on one machine.
#![forbid(unsafe_code)]

pub mod access;
pub mod caches;
pub mod client;
pub mod cluster;
pub mod conformance;
pub mod controller;
pub mod leader;
pub mod local;
pub mod operator;
pub mod scaler;
pub mod topology;

/// Errors of the operator, each with a stable label for logs and metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The ChimeraModule CRD is not served by the API server.
    #[error(
        "ChimeraModule CRD is not installed or not readable ({cause}); install it with `kubectl apply -f crds/` (or `chimera crd | kubectl apply -f -`)"
    )]
    CrdNotInstalled {
        /// What the API server said.
        cause: kube::Error,
    },
    /// Desired objects could not be built.
    #[error(transparent)]
    Build(#[from] chimera_core::workloads::BuildError),
    /// A server-side apply was refused.
    #[error("applying {kind} {name} failed: {cause}")]
    Apply {
        /// Kind of the object.
        kind: String,
        /// Name of the object.
        name: String,
        /// What the API server said.
        cause: kube::Error,
    },
    /// Another API call failed.
    #[error("could not {action}: {cause}")]
    Kube {
        /// What the operator was doing.
        action: String,
        /// What the API server said.
        cause: kube::Error,
    },
    /// An object the module needs exists already and is not controlled by the module.
    #[error(
        "{kind} {name} already exists and is controlled by {owner}, not by this module: rename the module or remove that {kind}"
    )]
    NameTaken {
        /// Kind of the object.
        kind: String,
        /// Name of the object.
        name: String,
        /// Its controller (`Kind name`), or `nobody`.
        owner: String,
    },
    /// The broker refused or could not be reached.
    #[error(transparent)]
    Broker(#[from] topology::management::BrokerError),
    /// The module's broker could not be resolved (the verdict is its TopologyReady).
    #[error("topology: {}", .0.message)]
    Topology(Box<chimera_core::status::Verdict>),
    /// Deleting the module's queues would lose messages.
    #[error("deletion blocked: {0}")]
    DeletionBlocked(#[source] topology::declare::ReleaseError),
    /// Adding, running or removing the topology finalizer failed.
    #[error(transparent)]
    Finalizer(Box<kube::runtime::finalizer::Error<Error>>),
    /// A ChimeraModule without a namespace (the CRD is namespaced, so the cache is corrupt).
    #[error("ChimeraModule has no namespace")]
    NotNamespaced,
    /// Leader election could not start.
    #[error(transparent)]
    Leader(#[from] leader::LeaderError),
    /// The autoscaler could not start.
    #[error("autoscaler: {0}")]
    Autoscaler(#[from] scaler::sources::SourceError),
    /// The metrics endpoint could not listen.
    #[error("cannot serve /metrics on {addr}: {source}")]
    MetricsListen {
        /// The address.
        addr: std::net::SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The operating system gave no randomness for a password.
    #[error("no randomness for a broker password: {0}")]
    Random(String),
    /// An object could not be turned into JSON to compare it.
    #[error("comparing objects: {0}")]
    Serialize(#[source] serde_json::Error),
    /// An applied object came back without the labels the builders put on it.
    #[error("object {0} does not carry the chimera.dev/head label of a declared head")]
    UnexpectedObject(String),
}

impl Error {
    /// A stable, low-cardinality name for logs and metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::CrdNotInstalled { .. } => "crd_not_installed",
            Error::Build(_) => "build",
            Error::Apply { .. } => "apply",
            Error::Kube { .. } => "kube_api",
            Error::NameTaken { .. } => "name_taken",
            Error::Broker(_) => "broker",
            Error::Topology(_) => "topology",
            Error::DeletionBlocked(_) => "deletion_blocked",
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => "finalizer",
            },
            Error::NotNamespaced => "not_namespaced",
            Error::UnexpectedObject(_) => "unexpected_object",
            Error::Serialize(_) => "serialize",
            Error::Random(_) => "random",
            Error::Leader(_) => "leader",
            Error::Autoscaler(_) => "autoscaler",
            Error::MetricsListen { .. } => "metrics_listen",
        }
    }

    /// Seconds before a failed reconcile is retried: conflicts and server errors are
    /// transient, a refused object needs a spec change (which triggers a reconcile anyway).
    pub fn retry_after_seconds(&self) -> u64 {
        match self {
            Error::Apply {
                cause: kube::Error::Api(e),
                ..
            } if e.code == 422 || e.code == 400 => 60,
            Error::NameTaken { .. } => 10,
            Error::DeletionBlocked(_) => 15,
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.retry_after_seconds(),
                _ => 5,
            },
            _ => 5,
        }
    }
}
