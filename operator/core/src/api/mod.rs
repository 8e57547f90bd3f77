//! The ChimeraModule API: resource types, name grammars, CRD generation, offline
//! validation and the manifest loader.

pub mod crd;
pub mod manifests;
pub mod names;
pub mod schemas;
pub mod spec;
pub mod status;
pub mod validation;

pub use spec::*;
pub use status::{AutoscalingStatus, ChimeraModuleStatus, HeadStatus, ScalingDecision};
