//! The ChimeraModule API: resource types, name grammars, CRD generation and offline validation.

pub mod crd;
pub mod names;
pub mod spec;
pub mod status;
pub mod validation;

pub use spec::*;
pub use status::{AutoscalingStatus, ChimeraModuleStatus, HeadStatus, ScalingDecision};
