//! What the declarer did, as plain data: the reports of apply, release and migrate, and the
//! name of a migration's temporary queue (the diff leaves such a queue's bindings alone).

use serde::Serialize;

use super::diff::TopologyDiff;

/// What an apply did.
#[derive(Serialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// The differences found before acting (what was done, and the conflicts left alone).
    pub diff: TopologyDiff,
    /// Exchanges declared.
    pub exchanges_declared: usize,
    /// Queues declared.
    pub queues_declared: usize,
    /// Bindings created.
    pub bindings_created: usize,
    /// Bindings removed.
    pub bindings_removed: usize,
}

/// What `release` did when a module went away.
#[derive(Serialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ReleaseReport {
    /// Bindings from other domains' exchanges removed (Retain).
    pub bindings_removed: usize,
    /// Queues deleted (Delete).
    pub queues_deleted: Vec<String>,
    /// Why the topology was left exactly as it was (Retain, broker not resolvable).
    pub left_in_place: Option<String>,
}

/// Suffix of the temporary queue a migration moves messages through.
pub const MIGRATING_SUFFIX: &str = ".migrating";

/// What a migration did to one queue.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct QueueMigration {
    /// The queue rebuilt.
    pub queue: String,
    /// Messages moved out of the old queue.
    pub moved_out: u64,
    /// Messages moved back into the rebuilt queue.
    pub moved_back: u64,
}
