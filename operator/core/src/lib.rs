//! Chimera's pure core: everything the control plane decides, computed without I/O.
//!
//! - [`api`]: the ChimeraModule types, the CRD, offline validation and the manifest loader;
//! - [`access`]: each module's own broker user, its Secret and its permissions;
//! - [`workloads`]: the Deployments, Service and PDB that run a module's heads;
//! - [`status`]: a module's status from what the API server reports;
//! - [`topology`]: the RabbitMQ topology a set of modules needs, the diff with a broker's state,
//!   and the `TopologyReady` verdict;
//! - [`autoscale`]: the control laws of both heads and the signals they read;
//! - [`leader`]: the decisions of leader election on a Lease;
//! - [`sim`]: the reference model and the KEDA / KPA anchors the laws are judged against;
//! - [`local`]: what `chimera up` runs for a module.
//!
//! The runtime crate (`chimera-runtime`) does the I/O around these: it reads the API server and
//! the broker, calls into here, and writes what differs.
#![forbid(unsafe_code)]

pub mod access;
pub mod api;
pub mod autoscale;
pub mod conformance;
pub mod leader;
pub mod local;
pub mod sim;
pub mod status;
pub mod topology;
pub mod workloads;
