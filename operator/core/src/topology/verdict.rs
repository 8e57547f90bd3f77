//! `TopologyReady`: how the declaration of a module's topology went, as a condition verdict.

use super::plan::{Finding, Severity};
use super::report::ApplyReport;
use crate::status::Verdict;

/// What kind of broker failure stopped a declaration: each has its own condition reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerFailureKind {
    /// The vhost of the AMQP URL does not exist.
    VhostNotFound,
    /// The broker refused the credentials or the permissions.
    AccessRefused,
    /// The broker did not answer.
    Unreachable,
    /// A broker URL cannot be understood.
    UrlInvalid,
    /// The broker answered with another error.
    Other,
}

impl BrokerFailureKind {
    /// The `TopologyReady` reason.
    pub fn reason(self) -> &'static str {
        match self {
            Self::VhostNotFound => "VhostNotFound",
            Self::AccessRefused => "BrokerAccessRefused",
            Self::Unreachable => "BrokerUnreachable",
            Self::UrlInvalid => "BrokerUrlInvalid",
            Self::Other => "BrokerError",
        }
    }
}

/// A broker failure as the status reports it: its kind and what happened, in words (no
/// credentials).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerFailure {
    /// The kind.
    pub kind: BrokerFailureKind,
    /// The message.
    pub message: String,
}

/// `TopologyReady` from the findings of the plan and the outcome of declaring it. Pure.
pub fn topology_verdict(
    findings: &[Finding],
    outcome: Result<&ApplyReport, &BrokerFailure>,
) -> Verdict {
    let report = match outcome {
        Err(failure) => {
            return Verdict::new(false, failure.kind.reason(), failure.message.clone());
        }
        Ok(report) => report,
    };
    if !report.diff.migrating.is_empty() {
        return Verdict::new(
            false,
            "MigrationInProgress",
            format!(
                "{} being rebuilt by `chimera topology migrate` (a .migrating queue exists); run it again if it was interrupted",
                report.diff.migrating.join(", ")
            ),
        );
    }
    if let Some(c) = report.diff.exchange_conflicts.first() {
        return Verdict::new(
            false,
            "ExchangeTypeChanged",
            format!(
                "exchange {} is {} on the broker but the plan wants {}: exchange types never change in place",
                c.exchange, c.current, c.wanted
            ),
        );
    }
    if !report.diff.argument_conflicts.is_empty() {
        let conflicts = &report.diff.argument_conflicts;
        let mut details: Vec<String> = conflicts
            .iter()
            .take(3)
            .map(|c| {
                format!(
                    "{} {}: broker has {}, spec wants {}",
                    c.queue,
                    c.argument,
                    c.current.as_deref().unwrap_or("<unset>"),
                    c.wanted.as_deref().unwrap_or("<unset>")
                )
            })
            .collect();
        if conflicts.len() > 3 {
            details.push(format!(
                "{} more difference(s) (`chimera topology diff` lists them)",
                conflicts.len() - 3
            ));
        }
        return Verdict::new(
            false,
            "QueueArgumentsChanged",
            format!(
                "{}; RabbitMQ cannot change these in place, so the existing queue keeps serving: move it with `chimera topology migrate`",
                details.join("; ")
            ),
        );
    }
    let errors: Vec<&Finding> = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .collect();
    if let Some(first) = errors.first() {
        let messages: Vec<&str> = errors.iter().map(|f| f.message.as_str()).collect();
        return Verdict::new(false, first.code.reason(), messages.join("; "));
    }
    let warnings: Vec<&str> = findings.iter().map(|f| f.message.as_str()).collect();
    if warnings.is_empty() {
        Verdict::new(
            true,
            "Declared",
            "exchanges, queues and bindings match the spec".to_owned(),
        )
    } else {
        Verdict::new(true, "DeclaredWithWarnings", warnings.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::diff::{ArgumentConflict, TopologyDiff};
    use crate::topology::plan::FindingCode;

    fn finding(severity: Severity, code: FindingCode, message: &str) -> Finding {
        Finding {
            module: "shop/orders".into(),
            severity,
            code,
            message: message.into(),
        }
    }

    #[test]
    fn a_clean_apply_is_ready() {
        let v = topology_verdict(&[], Ok(&ApplyReport::default()));
        assert!(v.status);
        assert_eq!(v.reason, "Declared");
    }

    #[test]
    fn warnings_stay_ready_and_errors_do_not() {
        let warn = [finding(
            Severity::Warning,
            FindingCode::SubscriptionCycle,
            "a <- b <- a",
        )];
        let v = topology_verdict(&warn, Ok(&ApplyReport::default()));
        assert!(v.status);
        assert_eq!(v.reason, "DeclaredWithWarnings");
        let errors = [
            finding(
                Severity::Error,
                FindingCode::UnknownDomain,
                "no module owns domain \"payments\"",
            ),
            finding(
                Severity::Error,
                FindingCode::UnpublishedEvent,
                "\"x\" matches nothing",
            ),
        ];
        let v = topology_verdict(&errors, Ok(&ApplyReport::default()));
        assert!(!v.status);
        assert_eq!(v.reason, "UnknownDomain");
        assert!(v.message.contains("payments") && v.message.contains("matches nothing"));
    }

    #[test]
    fn argument_conflicts_say_what_differs_and_what_to_do() {
        let report = ApplyReport {
            diff: TopologyDiff {
                argument_conflicts: vec![ArgumentConflict {
                    queue: "chimera.orders.worker".into(),
                    argument: "x-queue-type".into(),
                    current: Some("classic".into()),
                    wanted: Some("quorum".into()),
                }],
                ..TopologyDiff::default()
            },
            ..ApplyReport::default()
        };
        let v = topology_verdict(&[], Ok(&report));
        assert!(!v.status);
        assert_eq!(v.reason, "QueueArgumentsChanged");
        assert!(
            v.message
                .contains("x-queue-type: broker has classic, spec wants quorum"),
            "{}",
            v.message
        );
        assert!(v.message.contains("chimera topology migrate"));
    }

    #[test]
    fn broker_failures_have_their_own_reasons() {
        let failure = |kind| BrokerFailure {
            kind,
            message: "what the broker said".into(),
        };
        let v = topology_verdict(&[], Err(&failure(BrokerFailureKind::VhostNotFound)));
        assert_eq!((v.status, v.reason.as_str()), (false, "VhostNotFound"));
        assert_eq!(v.message, "what the broker said");
        let v = topology_verdict(&[], Err(&failure(BrokerFailureKind::AccessRefused)));
        assert_eq!(v.reason, "BrokerAccessRefused");
        for (kind, reason) in [
            (BrokerFailureKind::Unreachable, "BrokerUnreachable"),
            (BrokerFailureKind::UrlInvalid, "BrokerUrlInvalid"),
            (BrokerFailureKind::Other, "BrokerError"),
        ] {
            let v = topology_verdict(&[], Err(&failure(kind)));
            assert_eq!((v.status, v.reason.as_str()), (false, reason));
        }
    }
}
