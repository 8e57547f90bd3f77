//! The query head's Service: one stable address in front of all its replicas.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::deployment::HTTP_PORT_NAME;
use super::{Head, Owner, selector_labels};
use crate::api::QueryHeadSpec;

pub(crate) fn service(owner: &Owner<'_>, query: &QueryHeadSpec) -> Service {
    Service {
        metadata: owner.object_meta(Head::Query),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(selector_labels(owner.name, Head::Query)),
            ports: Some(vec![ServicePort {
                name: Some(HTTP_PORT_NAME.to_owned()),
                port: query.port,
                target_port: Some(IntOrString::String(HTTP_PORT_NAME.to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use crate::workloads::fixtures::{module, query};
    use crate::workloads::{Head, WorkloadSettings, desired_workloads, selector_labels};

    #[test]
    fn service_selects_query_pods_on_the_query_port() {
        let m = module("orders");
        let d =
            desired_workloads(&m, &WorkloadSettings::default()).unwrap_or_else(|e| panic!("{e}"));
        let spec = d.services[0].spec.clone().unwrap_or_default();
        assert_eq!(spec.selector, Some(selector_labels("orders", Head::Query)));
        let ports = spec.ports.unwrap_or_default();
        assert_eq!(ports[0].port, query(&m).port);
    }
}
