//! The head contract (docs/contract.md): what the control plane and every head agree on, in one
//! place, so that nothing encodes it twice. The operator, `chimera up` and the Rust SDK all read
//! these definitions; a head in another language follows docs/contract.md, which states them.
//!
//! - [`names`]: exchanges and queues of a domain, and the retry-queue rule;
//! - [`head`]: the two heads of a module;
//! - [`env`]: the environment variables a head receives;
//! - [`metrics`]: the endpoints every head serves and the metrics the autoscaler reads;
//! - [`envelope`]: the message envelope and the headers heads read and write;
//! - [`pattern`]: AMQP topic matching, for subscriptions.
#![forbid(unsafe_code)]

pub mod env;
pub mod envelope;
pub mod head;
pub mod metrics;
pub mod names;
pub mod pattern;

pub use head::Head;
