//! Shared set-up of the operator's integration tests: the CRD, a namespace, a running controller.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use chimera_core::api::ChimeraModule;
use chimera_core::api::crd::chimera_module_crd;
use chimera_core::topology::state::BrokerEndpoint;
use chimera_runtime::cluster::Scope;
use chimera_runtime::operator::{self, OperatorConfig};
use chimera_testenv::TestNamespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio::task::JoinHandle;

pub mod flow;
pub mod node;

/// Installs (or updates) the ChimeraModule CRD and waits until it is served.
pub async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = chimera_module_crd();
    crds.patch(
        "chimeramodules.chimera.dev",
        &PatchParams::apply("chimera-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("apply the ChimeraModule CRD");
    eventually(
        "the CRD is established",
        Duration::from_secs(30),
        || async {
            let crd = crds.get("chimeramodules.chimera.dev").await.ok()?;
            let established = crd
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            established.then_some(())
        },
    )
    .await;
}

/// Polls `probe` until it returns Some, or panics naming `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A namespace with the CRD installed and, optionally, an operator watching only it.
pub struct Harness {
    pub client: Client,
    pub ns: TestNamespace,
    operator: Option<JoinHandle<()>>,
}

impl Harness {
    /// A namespace and the CRD, without an operator.
    pub async fn new(prefix: &str) -> Self {
        let client = chimera_testenv::kube_client().await;
        install_crd(&client).await;
        let ns = TestNamespace::create(&client, prefix).await;
        Self {
            client,
            ns,
            operator: None,
        }
    }

    /// A namespace, the CRD and an operator (running as `operator_client`) watching it.
    pub async fn with_operator_as(prefix: &str, operator_client: Option<Client>) -> Self {
        Self::with_operator_config(prefix, operator_client, OperatorConfig::default()).await
    }

    /// A namespace, the CRD and an operator that declares topology on `broker`, checking for
    /// drift every second.
    pub async fn with_operator_on_broker(prefix: &str, broker: BrokerEndpoint) -> Self {
        let config = OperatorConfig {
            broker: Some(broker),
            topology_resync: Some(Duration::from_secs(1)),
            ..OperatorConfig::default()
        };
        Self::with_operator_config(prefix, None, config).await
    }

    /// A namespace, the CRD and an operator with a broker and the autoscaler on a 1 s tick,
    /// serving its /metrics on `metrics_addr`.
    pub async fn with_autoscaling_operator(
        prefix: &str,
        broker: BrokerEndpoint,
        metrics_addr: std::net::SocketAddr,
    ) -> Self {
        let config = OperatorConfig {
            broker: Some(broker),
            topology_resync: Some(Duration::from_secs(1)),
            autoscale: Some(chimera_runtime::scaler::ScalerSettings::default()),
            metrics_addr: Some(metrics_addr),
            ..OperatorConfig::default()
        };
        Self::with_operator_config(prefix, None, config).await
    }

    pub async fn with_operator_config(
        prefix: &str,
        operator_client: Option<Client>,
        config: OperatorConfig,
    ) -> Self {
        let mut h = Self::new(prefix).await;
        let client = operator_client.unwrap_or_else(|| h.client.clone());
        h.start_operator(client, config);
        h
    }

    /// Starts an operator (as `client`) watching this namespace with `config`.
    pub fn start_operator(&mut self, client: Client, config: OperatorConfig) {
        let config = OperatorConfig {
            scope: Scope::Namespace(self.ns.name.clone()),
            ..config
        };
        self.operator = Some(tokio::spawn(async move {
            if let Err(e) = operator::run(client, config).await {
                panic!("operator stopped: {e}");
            }
        }));
    }

    /// A namespace, the CRD and an operator with admin rights watching it.
    pub async fn with_operator(prefix: &str) -> Self {
        Self::with_operator_as(prefix, None).await
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.ns.name)
    }

    /// Server-side applies a module as a platform engineer's kubectl would.
    pub async fn apply_module(&self, module: &serde_json::Value) -> ChimeraModule {
        apply_module(&self.api(), module).await
    }
}

/// Server-side applies a module as a platform engineer's kubectl would.
pub async fn apply_module(api: &Api<ChimeraModule>, module: &serde_json::Value) -> ChimeraModule {
    let name = module["metadata"]["name"].as_str().expect("module name");
    api.patch(
        name,
        &PatchParams::apply("kubectl").force(),
        &Patch::Apply(module),
    )
    .await
    .unwrap_or_else(|e| panic!("apply module {name}: {e}"))
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(op) = self.operator.take() {
            op.abort();
        }
    }
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// An example module from examples/marketplace, as JSON.
pub fn example(name: &str) -> serde_json::Value {
    let path = repo_root()
        .join("examples/marketplace")
        .join(format!("{name}.yaml"));
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}
