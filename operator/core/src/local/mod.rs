//! The pure part of the local runtime (`chimera up`): what to run for a module.

pub mod plan;
