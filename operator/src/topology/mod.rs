//! The topology manager: the RabbitMQ objects that carry a domain's commands and events.
//!
//! This issue only fixes the names (they are part of the head contract); the planner and the
//! declarer build on them.

pub mod names;
