//! RabbitMQ object names, fixed so that every head in every language can rely on them.

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

/// `chimera.<domain>.worker.retry.<n>`: the n-th retry delay queue (n from 1).
pub fn retry_queue(domain: &str, n: usize) -> String {
    format!("chimera.{domain}.worker.retry.{n}")
}

/// `chimera.<domain>.worker.dlq`: where messages are parked after their last attempt.
pub fn dead_letter_queue(domain: &str) -> String {
    format!("chimera.{domain}.worker.dlq")
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
    }
}
