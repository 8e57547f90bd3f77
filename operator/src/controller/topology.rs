//! The topology step of a reconcile: plan the module's namespace, declare this module's part on
//! its broker, and say how it went as the `TopologyReady` verdict. On deletion, release the
//! module's queues according to its deletion policy.

use k8s_openapi::api::core::v1::Secret;
use kube::api::ListParams;
use kube::{Api, ResourceExt};

use super::reconcile::Context;
use super::status::Verdict;
use crate::Error;
use crate::api::{ChimeraModule, DeletionPolicy};
use crate::topology::broker::{BrokerEndpoint, BrokerError};
use crate::topology::declare::{self, ApplyReport, ReleaseError};
use crate::topology::plan::{self, Finding, Severity, TopologyPlan, module_key};

/// Finalizer that holds a module until its topology is released.
pub const FINALIZER: &str = "chimera.dev/topology";
/// Annotation (`"true"`) that lets `deletionPolicy: Delete` remove queues that still hold
/// messages.
pub const FORCE_DELETE_ANNOTATION: &str = "chimera.dev/force-delete";

/// `TopologyReady` from the findings of the plan and the outcome of declaring it. Pure.
pub fn topology_verdict(
    findings: &[Finding],
    outcome: Result<&ApplyReport, &BrokerError>,
) -> Verdict {
    let report = match outcome {
        Err(error) => return Verdict::new(false, broker_reason(error), error.to_string()),
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
        return Verdict::new(false, &format!("{:?}", first.code), messages.join("; "));
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

fn broker_reason(error: &BrokerError) -> &'static str {
    match error {
        BrokerError::VhostNotFound { .. } => "VhostNotFound",
        BrokerError::ManagementUnauthorized { .. } => "BrokerAccessRefused",
        BrokerError::Amqp { cause, .. } if cause.to_string().contains("ACCESS_REFUSED") => {
            "BrokerAccessRefused"
        }
        BrokerError::ManagementUnreachable { .. } | BrokerError::Amqp { .. } => "BrokerUnreachable",
        BrokerError::BadUrl { .. } => "BrokerUrlInvalid",
        BrokerError::ManagementStatus { .. } => "BrokerError",
    }
}

/// The broker a module declares on: its own (`spec.broker.secretRef`, with an optional
/// `managementUrl` key in the same Secret) or the operator's.
pub(crate) async fn endpoint_for(
    module: &ChimeraModule,
    ctx: &Context,
) -> Result<BrokerEndpoint, Verdict> {
    let Some(broker) = &module.spec.broker else {
        return ctx.broker.clone().ok_or_else(|| {
            Verdict::new(
                false,
                "NoBroker",
                "the operator runs without a broker".to_owned(),
            )
        });
    };
    let namespace = module.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let unreadable = |why: String| {
        Verdict::new(
            false,
            "BrokerSecretUnreadable",
            format!(
                "Secret {}/{}: {why}",
                broker.secret_ref.name, broker.secret_ref.key
            ),
        )
    };
    let secret = secrets
        .get(&broker.secret_ref.name)
        .await
        .map_err(|e| unreadable(e.to_string()))?;
    let value = |key: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|v| String::from_utf8_lossy(&v.0).trim().to_owned())
    };
    let url = value(&broker.secret_ref.key).ok_or_else(|| unreadable("no such key".to_owned()))?;
    BrokerEndpoint::new(&url, value("managementUrl").as_deref())
        .map_err(|e| unreadable(e.to_string()))
}

/// The plan of every live module in the module's namespace, cut to what this module owns.
async fn owned_plan(module: &ChimeraModule, ctx: &Context) -> Result<TopologyPlan, Error> {
    let namespace = module.namespace().ok_or(Error::NotNamespaced)?;
    let modules: Api<ChimeraModule> = Api::namespaced(ctx.client.clone(), &namespace);
    let all = modules
        .list(&ListParams::default())
        .await
        .map_err(|cause| Error::Kube {
            action: "list the namespace's modules".into(),
            cause,
        })?;
    // A module being deleted no longer counts as a publisher for the others.
    let live: Vec<ChimeraModule> = all
        .items
        .into_iter()
        .filter(|m| m.metadata.deletion_timestamp.is_none() || m.uid() == module.uid())
        .collect();
    Ok(plan::plan(&live).for_domain(module.domain(), &module_key(module)))
}

/// Declares the module's topology. Returns the verdict, and the broker error (if any) so the
/// caller retries with backoff after writing the status.
pub async fn declare(
    module: &ChimeraModule,
    ctx: &Context,
) -> Result<(Verdict, Option<Error>), Error> {
    let owned = owned_plan(module, ctx).await?;
    let endpoint = match endpoint_for(module, ctx).await {
        Ok(e) => e,
        Err(verdict) => {
            let retry = Error::Topology(verdict.message.clone());
            return Ok((verdict, Some(retry)));
        }
    };
    match declare::apply(&endpoint, &owned).await {
        Ok(report) => Ok((topology_verdict(&owned.findings, Ok(&report)), None)),
        Err(error) => {
            let verdict = topology_verdict(&owned.findings, Err(&error));
            Ok((verdict, Some(Error::Broker(error))))
        }
    }
}

/// Releases a deleted module's topology per its deletion policy.
pub async fn release(
    module: &ChimeraModule,
    ctx: &Context,
) -> Result<declare::ReleaseReport, Error> {
    let owned = owned_plan(module, ctx).await?;
    let delete = module.spec.topology.deletion_policy == DeletionPolicy::Delete;
    let endpoint = match endpoint_for(module, ctx).await {
        Ok(e) => e,
        // Retain keeps everything anyway: a broker Secret already gone (a namespace being
        // deleted removes it alongside) must not hold the module, and its namespace, forever.
        Err(verdict) if !delete => {
            return Ok(declare::ReleaseReport {
                left_in_place: Some(verdict.message),
                ..declare::ReleaseReport::default()
            });
        }
        Err(verdict) => return Err(Error::Topology(verdict.message)),
    };
    let force = module
        .annotations()
        .get(FORCE_DELETE_ANNOTATION)
        .map(String::as_str)
        == Some("true");
    declare::release(&endpoint, &owned, module.domain(), delete, force)
        .await
        .map_err(|e| match e {
            ReleaseError::Broker(b) => Error::Broker(b),
            unread @ ReleaseError::Unread(_) => Error::DeletionBlocked(unread.to_string()),
        })
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
        let v = topology_verdict(
            &[],
            Err(&BrokerError::VhostNotFound {
                vhost: "shop".into(),
            }),
        );
        assert_eq!((v.status, v.reason.as_str()), (false, "VhostNotFound"));
        let v = topology_verdict(
            &[],
            Err(&BrokerError::ManagementUnauthorized { user: "u".into() }),
        );
        assert_eq!(v.reason, "BrokerAccessRefused");
    }
}
