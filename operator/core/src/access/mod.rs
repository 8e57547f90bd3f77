//! Each module's own broker user (ADR 0018): what it is called, the URL and Secret its heads
//! connect with, and what it may do on the vhost. The operator makes the user through the
//! management API and deletes it with the module; see `chimera_runtime::access`.

pub mod grants;
pub mod plan;
pub mod user;

pub use grants::{Grants, TopicGrant, grants};
pub use plan::{Step, steps};
