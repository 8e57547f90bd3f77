//! Name grammars shared by the CRD schema, offline validation and the topology planner.

/// A DNS-1123 label: lowercase alphanumerics and `-`, starting and ending alphanumeric.
pub const DNS_LABEL_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// A command or event name: lowercase dotted segments (`order.placed`), no wildcards.
/// Segments hold lowercase letters, digits, `_` and `-`, and start with a letter or digit.
pub const EVENT_NAME_PATTERN: &str = "^[a-z0-9][a-z0-9_-]*(\\.[a-z0-9][a-z0-9_-]*)*$";

/// An event subscription pattern: like an event name, but a whole segment may be the AMQP
/// topic wildcard `*` (exactly one segment) or `#` (zero or more segments).
pub const EVENT_PATTERN_PATTERN: &str =
    "^([a-z0-9][a-z0-9_-]*|\\*|#)(\\.([a-z0-9][a-z0-9_-]*|\\*|#))*$";

#[cfg(test)]
mod tests {
    use super::*;
    use regex::Regex;

    fn matches(pattern: &str, s: &str) -> bool {
        Regex::new(pattern).map(|r| r.is_match(s)).unwrap_or(false)
    }

    #[test]
    fn dns_labels() {
        for ok in ["users", "a", "order-2", "9lives"] {
            assert!(matches(DNS_LABEL_PATTERN, ok), "{ok}");
        }
        for bad in ["", "Users", "-a", "a-", "a.b", "a_b"] {
            assert!(!matches(DNS_LABEL_PATTERN, bad), "{bad}");
        }
    }

    #[test]
    fn event_names() {
        for ok in [
            "order.placed",
            "user",
            "gig.price_changed",
            "v2.order-placed",
        ] {
            assert!(matches(EVENT_NAME_PATTERN, ok), "{ok}");
        }
        for bad in [
            "",
            "Order.placed",
            "order..placed",
            ".order",
            "order.",
            "order.*",
            "#",
            "a b",
        ] {
            assert!(!matches(EVENT_NAME_PATTERN, bad), "{bad}");
        }
    }

    #[test]
    fn event_patterns() {
        for ok in ["order.placed", "order.*", "#", "*.placed", "order.#", "*"] {
            assert!(matches(EVENT_PATTERN_PATTERN, ok), "{ok}");
        }
        for bad in [
            "", "order.*x", "order.**", "Order.*", "order..*", "order.#.",
        ] {
            assert!(!matches(EVENT_PATTERN_PATTERN, bad), "{bad}");
        }
    }
}
