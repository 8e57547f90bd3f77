//! AMQP topic matching: does a subscription pattern match an event name?
//!
//! Words are separated by `.`; `*` matches exactly one word, `#` zero or more words. This is
//! what a topic exchange does with a binding key: the planner tells a subscriber that nobody
//! publishes what it listens for, and a worker tells an event it subscribed to (and may
//! ignore) from a message it cannot handle.

/// Whether the topic `pattern` matches the routing key `name`.
pub fn topic_matches(pattern: &str, name: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('.').collect();
    let words: Vec<&str> = name.split('.').collect();
    matches_from(&pattern, &words)
}

fn matches_from(pattern: &[&str], words: &[&str]) -> bool {
    match pattern.split_first() {
        None => words.is_empty(),
        Some((&"#", rest)) => (0..=words.len()).any(|skip| matches_from(rest, &words[skip..])),
        Some((&"*", rest)) => !words.is_empty() && matches_from(rest, &words[1..]),
        Some((word, rest)) => words.first() == Some(word) && matches_from(rest, &words[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn literal_star_and_hash() {
        assert!(topic_matches("user.registered", "user.registered"));
        assert!(!topic_matches("user.registered", "user.updated"));
        assert!(topic_matches("user.*", "user.updated"));
        assert!(!topic_matches("user.*", "user"));
        assert!(!topic_matches("user.*", "user.a.b"));
        assert!(topic_matches("user.#", "user"));
        assert!(topic_matches("user.#", "user.a.b"));
        assert!(topic_matches("#", "anything.at.all"));
        assert!(topic_matches("*.placed", "order.placed"));
        assert!(topic_matches("#.placed", "a.b.placed"));
        assert!(!topic_matches("#.placed", "a.b.paid"));
        assert!(topic_matches("a.#.z", "a.z"));
        assert!(topic_matches("a.#.z", "a.b.c.z"));
    }

    proptest! {
        #[test]
        fn a_name_matches_itself_and_the_hash(words in proptest::collection::vec("[a-z]{1,4}", 1..5)) {
            let name = words.join(".");
            prop_assert!(topic_matches(&name, &name));
            prop_assert!(topic_matches("#", &name));
        }

        #[test]
        fn star_per_word_matches_exactly_that_many_words(words in proptest::collection::vec("[a-z]{1,4}", 1..5), extra in 1usize..3) {
            let name = words.join(".");
            let stars = vec!["*"; words.len()].join(".");
            prop_assert!(topic_matches(&stars, &name));
            let more = vec!["*"; words.len() + extra].join(".");
            prop_assert!(!topic_matches(&more, &name));
        }
    }
}
