//! The query head's PodDisruptionBudget: voluntary disruptions (node drains) take at most one
//! replica at a time, so a drain never empties the head.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Head, Owner, selector_labels};

pub(crate) fn pod_disruption_budget(owner: &Owner<'_>, head: Head) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: owner.object_meta(head),
        spec: Some(PodDisruptionBudgetSpec {
            // maxUnavailable (not minAvailable) so a single-replica head can still be drained.
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(owner.name, head)),
                match_expressions: None,
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use crate::workloads::fixtures::module;
    use crate::workloads::{WorkloadSettings, desired_workloads};
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    #[test]
    fn at_most_one_query_replica_is_disrupted() {
        let d = desired_workloads(&module("orders"), &WorkloadSettings::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let spec = d.pod_disruption_budgets[0].spec.clone().unwrap_or_default();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(spec.min_available, None);
    }
}
