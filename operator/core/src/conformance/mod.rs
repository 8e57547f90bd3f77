//! `chimera conformance`, its pure part: the clauses of docs/contract.md a module's heads are
//! checked against, the verdict of each, the report, and the payloads and metric checks the
//! runner (`chimera_runtime::conformance`) uses.

pub mod metrics;
pub mod samples;

use serde::Serialize;

/// A clause of the contract, in the order they are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Clause {
    /// Section 2: started with the contract's environment (and a broker user that may not
    /// declare), each head becomes ready; one without a variable it needs refuses to start,
    /// naming it; no credential is printed.
    Environment,
    /// Section 4: `/healthz`, `/readyz`, `/metrics` answer as fixed.
    Endpoints,
    /// Section 5: the metric names, types, labels, outcomes and bucket bounds.
    Metrics,
    /// Section 4: every error is `{"error","message"}` JSON; 404 and 405 with `Allow`.
    JsonErrors,
    /// Section 6: a body that is not an envelope is parked as it came; the events the module
    /// publishes carry the envelope and its AMQP properties.
    Envelope,
    /// Sections 6 and 8: a message sent twice is handled once, and an event is published once.
    Duplicates,
    /// Section 8: a failure that may pass is retried through the retry queues with the
    /// attempt, reason and original routing key, handled once it passes, and dead-lettered
    /// after the last attempt.
    RetryLadder,
    /// Section 8: dead letters say why, and keep the trace and the sender's headers.
    DeadLetters,
    /// Payload schemas: a payload its schema refuses is dead-lettered with the schema's error.
    Schemas,
    /// Section 3: SIGTERM under load: the worker says it is stopping, settles what it holds and
    /// exits in time; nothing is lost; the query head stops in time too.
    Drain,
    /// Section 2: heads never declare exchanges, queues or bindings.
    NoDeclaring,
}

impl Clause {
    /// Every clause, in order.
    pub const ALL: [Self; 11] = [
        Self::Environment,
        Self::Endpoints,
        Self::Metrics,
        Self::JsonErrors,
        Self::Envelope,
        Self::Duplicates,
        Self::RetryLadder,
        Self::DeadLetters,
        Self::Schemas,
        Self::Drain,
        Self::NoDeclaring,
    ];

    /// Its name on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Self::Environment => "environment",
            Self::Endpoints => "endpoints",
            Self::Metrics => "metrics",
            Self::JsonErrors => "json-errors",
            Self::Envelope => "envelope",
            Self::Duplicates => "duplicates",
            Self::RetryLadder => "retry-ladder",
            Self::DeadLetters => "dead-letters",
            Self::Schemas => "schemas",
            Self::Drain => "drain",
            Self::NoDeclaring => "no-declaring",
        }
    }

    /// The section of docs/contract.md it checks.
    pub fn section(self) -> &'static str {
        match self {
            Self::Environment | Self::NoDeclaring => "2",
            Self::Endpoints | Self::JsonErrors => "4",
            Self::Metrics => "5",
            Self::Envelope => "6",
            Self::Duplicates | Self::RetryLadder | Self::DeadLetters => "8",
            Self::Schemas => "api.md, payload schemas",
            Self::Drain => "3",
        }
    }
}

/// What one clause came to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "verdict", content = "detail")]
pub enum Verdict {
    /// Checked and met; what was seen.
    Pass(String),
    /// Broken; what was wrong, each point.
    Fail(Vec<String>),
    /// Does not apply to this module (no worker, no schemas...), and why.
    NotApplicable(String),
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The clause.
    pub clause: Clause,
    /// Its verdict.
    #[serde(flatten)]
    pub verdict: Verdict,
}

/// Every clause's finding.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The module.
    pub module: String,
    /// In clause order.
    pub findings: Vec<Finding>,
}

impl Report {
    /// Records `clause`'s verdict: problems make a failure, none a pass saying `seen`.
    pub fn record(&mut self, clause: Clause, problems: Vec<String>, seen: impl Into<String>) {
        let verdict = if problems.is_empty() {
            Verdict::Pass(seen.into())
        } else {
            Verdict::Fail(problems)
        };
        self.findings.push(Finding { clause, verdict });
    }

    /// Records that `clause` does not apply, and why.
    pub fn not_applicable(&mut self, clause: Clause, why: impl Into<String>) {
        self.findings.push(Finding {
            clause,
            verdict: Verdict::NotApplicable(why.into()),
        });
    }

    /// True when no clause failed and every clause has a finding.
    pub fn passed(&self) -> bool {
        Clause::ALL
            .iter()
            .all(|c| self.findings.iter().any(|f| f.clause == *c))
            && !self
                .findings
                .iter()
                .any(|f| matches!(f.verdict, Verdict::Fail(_)))
    }

    /// The report for a person: one line per clause, failures' points below it.
    pub fn render(&self) -> String {
        let mut out = format!("conformance of module {}:\n", self.module);
        for f in &self.findings {
            let (word, detail) = match &f.verdict {
                Verdict::Pass(seen) => ("pass", seen.clone()),
                Verdict::NotApplicable(why) => ("n/a ", why.clone()),
                Verdict::Fail(points) => ("FAIL", format!("{} problem(s)", points.len())),
            };
            out.push_str(&format!(
                "  {word}  {:<13} (section {}) {detail}\n",
                f.clause.name(),
                f.clause.section()
            ));
            if let Verdict::Fail(points) = &f.verdict {
                for p in points {
                    out.push_str(&format!("          - {p}\n"));
                }
            }
        }
        for c in Clause::ALL {
            if !self.findings.iter().any(|f| f.clause == c) {
                out.push_str(&format!(
                    "  FAIL  {:<13} not checked: the run stopped before it\n",
                    c.name()
                ));
            }
        }
        let failed = self
            .findings
            .iter()
            .filter(|f| matches!(f.verdict, Verdict::Fail(_)))
            .count();
        out.push_str(&if self.passed() {
            "conformance: passed\n".to_owned()
        } else {
            format!("conformance: FAILED ({failed} clause(s) failed)\n")
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_passes_only_with_every_clause_and_no_failure() {
        let mut report = Report {
            module: "users".into(),
            findings: Vec::new(),
        };
        for c in Clause::ALL {
            report.record(c, Vec::new(), "ok");
        }
        assert!(report.passed());
        assert!(report.render().ends_with("conformance: passed\n"));
        report.findings.pop();
        assert!(!report.passed(), "a clause never checked is not a pass");
        assert!(report.render().contains("not checked"));
        report.not_applicable(Clause::NoDeclaring, "no worker");
        assert!(report.passed());
        report.record(Clause::Schemas, vec!["no reason".into()], "");
        assert!(!report.passed());
        let text = report.render();
        assert!(
            text.contains("FAIL  schemas") && text.contains("- no reason"),
            "{text}"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["findings"][10]["verdict"], "not_applicable");
        assert_eq!(json["findings"][0]["clause"], "environment");
    }
}
