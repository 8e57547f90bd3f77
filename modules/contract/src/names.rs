//! RabbitMQ object names, fixed so that every head in every language can rely on them.

/// The prefix of every exchange and queue the control plane declares.
pub const PREFIX: &str = "chimera.";

/// `chimera.<domain>.events`: topic exchange the domain publishes its events on.
pub fn events_exchange(domain: &str) -> String {
    format!("chimera.{domain}.events")
}

/// `chimera.<domain>.commands`: exchange carrying the domain's commands.
pub fn commands_exchange(domain: &str) -> String {
    format!("chimera.{domain}.commands")
}

/// `chimera.<domain>.worker`: the worker head's queue.
pub fn worker_queue(domain: &str) -> String {
    format!("chimera.{domain}.worker")
}

/// The retry rule: retry queue `n` (from 1) of a worker queue is `<worker queue>.retry.<n>`,
/// holds a message `CHIMERA_RETRY_DELAYS_SECONDS[n-1]` seconds and dead-letters it back to the
/// worker queue.
pub fn retry_queue_of(worker_queue: &str, n: usize) -> String {
    format!("{worker_queue}.retry.{n}")
}

/// `chimera.<domain>.worker.retry.<n>`: the n-th retry delay queue (n from 1).
pub fn retry_queue(domain: &str, n: usize) -> String {
    retry_queue_of(&worker_queue(domain), n)
}

/// `<worker queue>.dlq`: where messages are parked after their last attempt.
pub fn dead_letter_queue_of(worker_queue: &str) -> String {
    format!("{worker_queue}.dlq")
}

/// `chimera.<domain>.worker.dlq`.
pub fn dead_letter_queue(domain: &str) -> String {
    dead_letter_queue_of(&worker_queue(domain))
}

/// `<worker queue>.failures`: direct exchange the worker head publishes its failed messages to,
/// routed by the name of the queue they go to (a retry queue or the dead-letter queue). Going
/// through an exchange of the domain's own, not the default exchange, is what lets a module's
/// broker user write only its own queues: a grant on the default exchange reaches every queue.
pub fn failures_exchange_of(worker_queue: &str) -> String {
    format!("{worker_queue}.failures")
}

/// `chimera.<domain>.worker.failures`.
pub fn failures_exchange(domain: &str) -> String {
    failures_exchange_of(&worker_queue(domain))
}

/// Every exchange of the domain's own: bindings from these into its queues are its own too.
pub fn own_exchanges(domain: &str) -> [String; 3] {
    [
        events_exchange(domain),
        commands_exchange(domain),
        failures_exchange(domain),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        assert_eq!(events_exchange("orders"), "chimera.orders.events");
        assert_eq!(commands_exchange("orders"), "chimera.orders.commands");
        assert_eq!(worker_queue("orders"), "chimera.orders.worker");
        assert_eq!(retry_queue("orders", 2), "chimera.orders.worker.retry.2");
        assert_eq!(dead_letter_queue("orders"), "chimera.orders.worker.dlq");
        assert_eq!(
            failures_exchange("orders"),
            "chimera.orders.worker.failures"
        );
        for name in [events_exchange("a"), worker_queue("a"), retry_queue("a", 1)] {
            assert!(name.starts_with(PREFIX), "{name}");
        }
    }

    #[test]
    fn the_retry_rule_is_the_same_from_a_domain_or_a_queue() {
        for n in 1..5 {
            assert_eq!(
                retry_queue("gigs", n),
                retry_queue_of(&worker_queue("gigs"), n)
            );
        }
        assert_eq!(
            dead_letter_queue("gigs"),
            dead_letter_queue_of(&worker_queue("gigs"))
        );
        assert_eq!(
            failures_exchange("gigs"),
            failures_exchange_of(&worker_queue("gigs"))
        );
    }
}
