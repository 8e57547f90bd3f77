//! The topology manager's I/O half: read a vhost through the management API, declare a plan
//! over AMQP, release a module's queues, and migrate a queue whose immutable arguments changed.
//! What to declare and how it went are computed in `chimera_core::topology`.

pub mod amqp;
pub mod declare;
pub mod management;
pub mod migrate;
pub mod snapshots;
