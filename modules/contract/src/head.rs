//! The two heads of a module.

use std::fmt;
use std::str::FromStr;

/// Which head a process (or a Deployment, a queue, a law) is.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Head {
    /// REST reads over the domain's read model.
    Query,
    /// Consumes commands and events, writes the database, publishes events.
    Worker,
}

impl Head {
    /// Both heads, in a stable order.
    pub const ALL: [Head; 2] = [Head::Query, Head::Worker];

    /// `query` or `worker`: the value of `CHIMERA_HEAD`, the head label and the name suffix of
    /// the head's objects, and the program's argument.
    pub fn as_str(self) -> &'static str {
        match self {
            Head::Query => "query",
            Head::Worker => "worker",
        }
    }
}

impl fmt::Display for Head {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Not `query` or `worker`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown head {0:?}: expected `query` or `worker`")]
pub struct UnknownHead(pub String);

impl FromStr for Head {
    type Err = UnknownHead;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|h| h.as_str() == text)
            .ok_or_else(|| UnknownHead(text.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_read_back_what_they_write() {
        for head in Head::ALL {
            assert_eq!(head.as_str().parse::<Head>(), Ok(head));
            assert_eq!(head.to_string(), head.as_str());
            let json = serde_json::to_string(&head).unwrap_or_default();
            assert_eq!(json, format!("\"{head}\""));
        }
        assert_eq!(
            "reader".parse::<Head>(),
            Err(UnknownHead("reader".to_owned()))
        );
    }
}
