//! Placeholder: the sdk crate is built in issue 4 (the module SDK and marketplace domains).
