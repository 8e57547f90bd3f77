//! What to change on the broker so a module's user has exactly its grants: nothing when the
//! vhost already says so, and never a step that would widen access on the way.

use super::grants::{Grants, TopicGrant};

/// One change on the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Create the user, or set its password and tag (it is missing, or its password is new).
    PutUser,
    /// Set its configure, write and read patterns on the vhost.
    PutPermissions,
    /// Drop all its topic permissions on the vhost (the API removes them per user and vhost).
    ClearTopics,
    /// Set its routing keys on one topic exchange.
    PutTopic(TopicGrant),
}

/// The steps that take the user from `have` (its permissions on the vhost as the management
/// API lists them, None when it has none: no such user, or not on this vhost) to `want`.
///
/// `new_password`: the password in the module's Secret was just made, so the user must be
/// (re)set to it even if its permissions are right.
pub fn steps(want: &Grants, have: Option<&Grants>, new_password: bool) -> Vec<Step> {
    let mut steps = Vec::new();
    if new_password || have.is_none() {
        steps.push(Step::PutUser);
    }
    let same_patterns = have.is_some_and(|h| {
        (h.configure.as_str(), h.write.as_str(), h.read.as_str())
            == (
                want.configure.as_str(),
                want.write.as_str(),
                want.read.as_str(),
            )
    });
    // Topic permissions first: until they are set, a user that may write the events exchange
    // may publish any routing key on it.
    let have_topics: &[TopicGrant] = have.map_or(&[], |h| h.topics.as_slice());
    let stale = have_topics.iter().any(|t| !want.topics.contains(t));
    if stale {
        steps.push(Step::ClearTopics);
    }
    for topic in &want.topics {
        if stale || !have_topics.contains(topic) {
            steps.push(Step::PutTopic(topic.clone()));
        }
    }
    if !same_patterns {
        steps.push(Step::PutPermissions);
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::grants::grants;
    use crate::workloads::fixtures::module;

    fn orders() -> Grants {
        grants(&module("orders"))
    }

    #[test]
    fn a_user_with_its_grants_needs_nothing() {
        let want = orders();
        assert_eq!(steps(&want, Some(&want), false), []);
    }

    #[test]
    fn a_missing_user_is_made_with_its_topics_before_its_patterns() {
        let want = orders();
        assert_eq!(
            steps(&want, None, false),
            [
                Step::PutUser,
                Step::PutTopic(want.topics[0].clone()),
                Step::PutPermissions
            ]
        );
    }

    #[test]
    fn a_new_password_resets_only_the_user() {
        let want = orders();
        assert_eq!(steps(&want, Some(&want), true), [Step::PutUser]);
    }

    #[test]
    fn widened_patterns_are_narrowed_again() {
        let want = orders();
        let mut have = want.clone();
        have.write = ".*".into();
        assert_eq!(steps(&want, Some(&have), false), [Step::PutPermissions]);
    }

    #[test]
    fn stale_topics_are_cleared_then_the_wanted_ones_set() {
        let want = orders();
        let mut have = want.clone();
        have.topics.push(TopicGrant {
            exchange: "chimera.users.events".into(),
            write: ".*".into(),
            read: ".*".into(),
        });
        assert_eq!(
            steps(&want, Some(&have), false),
            [Step::ClearTopics, Step::PutTopic(want.topics[0].clone())]
        );
        // A module that stops publishing loses its topic permission too.
        let mut silent = want.clone();
        silent.topics.clear();
        assert_eq!(steps(&silent, Some(&want), false), [Step::ClearTopics]);
    }
}
