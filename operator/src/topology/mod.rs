//! The topology manager: the RabbitMQ objects that carry a domain's commands and events.
//!
//! `plan` computes the desired topology (pure); `render` shows it; the declarer makes a broker
//! match it.

pub mod broker;
pub mod declare;
pub mod diff;
pub mod migrate;
pub mod pattern;
pub mod plan;
pub mod render;
