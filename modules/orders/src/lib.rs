//! Placeholder: the orders crate is built in issue 4 (the module SDK and marketplace domains).
