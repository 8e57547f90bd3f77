//! The topology manager's pure half: the RabbitMQ objects that carry a domain's commands and
//! events, computed, compared and explained without touching a broker.
//!
//! `plan` computes the desired topology of a set of modules and its findings; `state` is what a
//! broker holds; `diff` compares the two; `render` shows a plan or a diff; `report` is what a
//! declaration did; `verdict` turns it into the `TopologyReady` condition. The declarer, the
//! management client and the migration (I/O) live in the runtime crate.

pub mod asyncapi;
pub mod diff;
pub mod neighbours;
/// Topic matching lives with the contract: heads match their subscriptions with it too.
pub use chimera_contract::pattern;
pub mod plan;
pub mod render;
pub mod report;
pub mod snapshot;
pub mod state;
pub mod verdict;
