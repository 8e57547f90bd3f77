//! Real servers for integration tests, one isolated slice each.
//!
//! Tests reach the servers `scripts/dev-env up` starts (the test command starts it for them).
//! When one is missing the helpers panic with what is missing and how to start it: a test that
//! needs a server fails, it never skips.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test support: a failure here is a test failure

pub mod apiserver;
pub mod otelcol;
pub mod prometheus;

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::{Api, Client};

const HOW_TO_START: &str = "start the test environment with \
     `scripts/dev-env up && . ~/.cache/chimera/dev-env/env` \
     (or run the whole suite with `scripts/test`)";

fn required_env(name: &str) -> String {
    required(name, std::env::var(name).ok())
}

/// The value of a variable the tests cannot run without; panics (fails the test) when unset.
fn required(name: &str, value: Option<String>) -> String {
    match value {
        Some(v) if !v.is_empty() => v,
        _ => {
            panic!("{name} is not set: the integration tests need the real servers; {HOW_TO_START}")
        }
    }
}

/// A name unique across parallel tests and test processes.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{prefix}-{:x}{:x}-{n}",
        std::process::id() % 0xffff,
        nanos % 0xfffff
    )
}

/// A loopback TCP port that is free now, for a server the test starts itself. Ports come from a
/// spread-out range rather than the kernel's ephemeral allocator, which hands a just-released
/// port to the next caller (another test binary running at the same time).
pub fn free_port() -> u16 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mixed = u64::from(nanos)
            ^ (u64::from(std::process::id()) << 16)
            ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let port = 20_000 + (mixed % 30_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The dev node's bridge address (`CHIMERA_NODE_IP`): a non-loopback address of this machine
/// that only it and the node's pods reach, for a server a test starts itself.
pub fn node_ip() -> std::net::IpAddr {
    let value = required_env("CHIMERA_NODE_IP");
    value
        .parse()
        .unwrap_or_else(|e| panic!("CHIMERA_NODE_IP={value} is not an IP address: {e}"))
}

/// The helm the dev environment built (`CHIMERA_HELM`).
pub fn helm() -> std::path::PathBuf {
    std::path::PathBuf::from(required_env("CHIMERA_HELM"))
}

/// Runs containerd's client against the dev node's containerd (its Kubernetes namespace).
pub fn ctr(args: &[&str]) -> std::process::Output {
    let address = required_env("CHIMERA_CONTAINERD_ADDRESS");
    std::process::Command::new("ctr")
        .args(["--address", &address, "--namespace", "k8s.io"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ctr (containerd's client) cannot run: {e}; {HOW_TO_START}"))
}

/// Fails, saying how to build them, unless every image is in the dev node's containerd.
pub fn require_images(images: &[&str]) {
    let out = ctr(&["images", "ls", "-q"]);
    assert!(
        out.status.success(),
        "ctr images ls failed: {}; {HOW_TO_START}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8_lossy(&out.stdout);
    for image in images {
        let full = format!("docker.io/{image}");
        assert!(
            listed.lines().any(|l| l == full || l == *image),
            "image {image} is not in the dev node's containerd: build and import it with \
             `scripts/images --debug` (scripts/test does this before the tests)"
        );
    }
}

/// Whether `pod` is Ready (its Ready condition is True), as the Service and the autoscaler
/// count it.
pub fn pod_is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A client for the test kube-apiserver (from KUBECONFIG), checked to answer.
pub async fn kube_client() -> Client {
    let kubeconfig = required_env("KUBECONFIG");
    let client = Client::try_default().await.unwrap_or_else(|e| {
        panic!("cannot build a client from KUBECONFIG={kubeconfig}: {e}; {HOW_TO_START}")
    });
    client.apiserver_version().await.unwrap_or_else(|e| {
        panic!("kube-apiserver from KUBECONFIG={kubeconfig} does not answer: {e}; {HOW_TO_START}")
    });
    client
}

/// A namespace of its own for one test, deleted when dropped.
pub struct TestNamespace {
    /// The namespace's name.
    pub name: String,
}

/// The node label no node has: the PodNodeSelector admission plugin gives every pod of an
/// API-only test namespace this selector, so the dev node's kubelet never runs (or reports on)
/// the pods of a test that plays the kubelet itself.
const NO_NODE_SELECTOR: &str = "chimera.dev/api-only-test=true";

impl TestNamespace {
    /// A fresh namespace named after `prefix` for a test of the control plane alone: its pods
    /// are never scheduled (see [`NO_NODE_SELECTOR`]).
    pub async fn create(client: &Client, prefix: &str) -> Self {
        Self::create_with(
            client,
            prefix,
            serde_json::json!({
                "name": "",
                "labels": {"chimera.dev/test": "true"},
                "annotations": {"scheduler.alpha.kubernetes.io/node-selector": NO_NODE_SELECTOR}
            }),
        )
        .await
    }

    /// A fresh namespace whose pods run on the dev node, under the `restricted` Pod Security
    /// Standard (what a production namespace enforces).
    pub async fn on_node(client: &Client, prefix: &str) -> Self {
        Self::create_with(
            client,
            prefix,
            serde_json::json!({
                "name": "",
                "labels": {
                    "chimera.dev/test": "true",
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/warn": "restricted"
                }
            }),
        )
        .await
    }

    async fn create_with(client: &Client, prefix: &str, mut metadata: serde_json::Value) -> Self {
        let name = unique_name(prefix);
        metadata["name"] = serde_json::Value::String(name.clone());
        let api: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace = serde_json::from_value(serde_json::json!({ "metadata": metadata }))
            .expect("namespace literal");
        api.create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        Self { name }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop cannot await, and the test's client cannot be used from another runtime (its
        // connection task lives on the test's runtime, which this drop blocks). So the delete
        // runs on a thread with its own runtime and its own client, and also runs when the
        // test panicked.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                if let Ok(client) = Client::try_default().await {
                    release_finalizers(&client, &name).await;
                    let api: Api<Namespace> = Api::all(client);
                    let _ = api.delete(&name, &DeleteParams::background()).await;
                }
            });
            Ok::<_, std::io::Error>(())
        })
        .join();
    }
}

/// Drops the finalizers of the ChimeraModules in `namespace`: the test's operator is gone, and
/// nothing else would release them, leaving the namespace terminating forever.
async fn release_finalizers(client: &Client, namespace: &str) {
    let resource = ApiResource {
        group: "chimera.dev".into(),
        version: "v1alpha1".into(),
        api_version: "chimera.dev/v1alpha1".into(),
        kind: "ChimeraModule".into(),
        plural: "chimeramodules".into(),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    let Ok(list) = api.list(&ListParams::default()).await else {
        return;
    };
    let patch = serde_json::json!({"metadata": {"finalizers": null}});
    for module in list {
        if let Some(name) = module.metadata.name {
            let _ = api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
        }
    }
}

/// The RabbitMQ the dev environment runs, with a vhost of its own for one test.
pub struct TestVhost {
    /// The vhost's name.
    pub name: String,
    /// AMQP URL pointing at the vhost.
    pub amqp_url: String,
    management: String,
}

fn management_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into()
}

fn split_credentials(url: &str) -> (String, String, String) {
    // http://user:pass@host:port -> (http://host:port, user, pass)
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    match rest.split_once('@') {
        Some((creds, host)) => {
            let (user, pass) = creds.split_once(':').unwrap_or((creds, ""));
            (
                format!("{scheme}://{host}"),
                user.to_owned(),
                pass.to_owned(),
            )
        }
        None => (
            format!("{scheme}://{rest}"),
            "guest".to_owned(),
            "guest".to_owned(),
        ),
    }
}

fn basic_auth(user: &str, pass: &str) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let input = format!("{user}:{pass}").into_bytes();
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    format!("Basic {out}")
}

impl TestVhost {
    /// Creates a fresh vhost (and grants the management user on it).
    pub fn create(prefix: &str) -> Self {
        let amqp = required_env("CHIMERA_AMQP_URL");
        let management = required_env("CHIMERA_RABBITMQ_MANAGEMENT_URL");
        let name = unique_name(prefix);
        let (base, user, pass) = split_credentials(&management);
        let auth = basic_auth(&user, &pass);
        let agent = management_agent();
        let put = |path: String, body: serde_json::Value| {
            let resp = agent
                .put(&format!("{base}{path}"))
                .header("Authorization", &auth)
                .send_json(body)
                .unwrap_or_else(|e| {
                    panic!("RabbitMQ management API at {base} does not answer: {e}; {HOW_TO_START}")
                });
            assert!(
                resp.status().is_success(),
                "PUT {path} on RabbitMQ management API: {}",
                resp.status()
            );
        };
        put(format!("/api/vhosts/{name}"), serde_json::json!({}));
        put(
            format!("/api/permissions/{name}/{user}"),
            serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}),
        );
        let server = amqp
            .rsplit_once('/')
            .map(|(s, _)| s)
            .unwrap_or(&amqp)
            .to_owned();
        Self {
            amqp_url: format!("{server}/{name}"),
            name,
            management,
        }
    }

    /// GETs a management API path (e.g. `/api/consumers/<vhost>`) and returns the JSON.
    pub fn management_get(&self, path: &str) -> serde_json::Value {
        let (base, user, pass) = split_credentials(&self.management);
        let mut resp = management_agent()
            .get(&format!("{base}{path}"))
            .header("Authorization", &basic_auth(&user, &pass))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
        resp.body_mut()
            .read_json()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// Closes every connection to this vhost whose client named itself `connection_name`, as
    /// a broker restart or a network cut would; returns how many it closed.
    pub fn close_connections_named(&self, connection_name: &str) -> usize {
        let (base, user, pass) = split_credentials(&self.management);
        let connections = self.management_get(&format!("/api/vhosts/{}/connections", self.name));
        let mut closed = 0;
        for c in connections.as_array().into_iter().flatten() {
            if c.pointer("/client_properties/connection_name")
                .and_then(|n| n.as_str())
                != Some(connection_name)
            {
                continue;
            }
            let Some(name) = c["name"].as_str() else {
                continue;
            };
            let encoded: String = name
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                        (b as char).to_string()
                    }
                    other => format!("%{other:02X}"),
                })
                .collect();
            let resp = management_agent()
                .delete(&format!("{base}/api/connections/{encoded}"))
                .header("Authorization", &basic_auth(&user, &pass))
                .call()
                .unwrap_or_else(|e| panic!("closing connection {name}: {e}"));
            assert!(
                resp.status().is_success(),
                "closing connection {name}: {}",
                resp.status()
            );
            closed += 1;
        }
        closed
    }

    /// The management API URL (with credentials).
    pub fn management_url(&self) -> &str {
        &self.management
    }

    /// Runs `rabbitmqctl ARGS -p <this vhost>` against the test broker's node and returns its
    /// standard output (CHIMERA_RABBITMQCTL, printed by `scripts/dev-env up`, says how to reach
    /// it).
    pub fn rabbitmqctl(&self, args: &[&str]) -> String {
        let command = required_env("CHIMERA_RABBITMQCTL");
        let mut parts = command.split_whitespace();
        let program = parts.next().expect("CHIMERA_RABBITMQCTL names a program");
        let out = std::process::Command::new(program)
            .args(parts)
            .args(args)
            .args(["-p", &self.name])
            .output()
            .unwrap_or_else(|e| panic!("running {command}: {e}"));
        assert!(
            out.status.success(),
            "{command} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Opens a TCP connection to the broker and checks it speaks AMQP 0-9-1: it must answer
    /// the protocol header with a `connection.start` method frame.
    pub fn assert_amqp_answers(&self) {
        let hostport = self
            .amqp_url
            .split_once("://")
            .map(|(_, r)| r.rsplit_once('@').map(|(_, h)| h).unwrap_or(r))
            .and_then(|r| r.split('/').next())
            .expect("host:port in CHIMERA_AMQP_URL")
            .to_owned();
        let addr = hostport
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .unwrap_or_else(|| panic!("cannot resolve {hostport}; {HOW_TO_START}"));
        let mut stream =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap_or_else(|e| {
                panic!("RabbitMQ at {hostport} refuses connections: {e}; {HOW_TO_START}")
            });
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        stream
            .write_all(b"AMQP\x00\x00\x09\x01")
            .expect("send protocol header");
        let mut frame = [0u8; 11];
        stream
            .read_exact(&mut frame)
            .unwrap_or_else(|e| panic!("no AMQP answer from {hostport}: {e}"));
        // Method frame (type 1) on channel 0, class 10 (connection) method 10 (start).
        assert_eq!(frame[0], 1, "expected an AMQP method frame, got {frame:?}");
        assert_eq!(
            &frame[7..11],
            &[0, 10, 0, 10],
            "expected connection.start, got {frame:?}"
        );
    }
}

impl TestVhost {
    /// The vhost's AMQP URL as pods on the dev node reach the broker (through the Service in
    /// namespace chimera-dev).
    pub fn cluster_amqp_url(&self) -> String {
        let base = required_env("CHIMERA_CLUSTER_AMQP_URL");
        let server = base.rsplit_once('/').map_or(base.as_str(), |(s, _)| s);
        format!("{server}/{}", self.name)
    }

    /// The management API as pods on the dev node reach it.
    pub fn cluster_management_url(&self) -> String {
        required_env("CHIMERA_CLUSTER_RABBITMQ_MANAGEMENT_URL")
    }
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        let (base, user, pass) = split_credentials(&self.management);
        let _ = management_agent()
            .delete(&format!("{base}/api/vhosts/{}", self.name))
            .header("Authorization", &basic_auth(&user, &pass))
            .call();
    }
}

/// A database of its own for one test: a SQLite file in a temporary folder, or a fresh database
/// on the MariaDB of the dev environment (CHIMERA_MYSQL_URL). Removed when dropped.
pub struct TestDatabase {
    /// URL to hand to the code under test.
    pub url: String,
    cleanup: Cleanup,
}

enum Cleanup {
    Folder(std::path::PathBuf),
    /// The database and its user, both called `name`.
    MySql {
        server: String,
        name: String,
        password: String,
    },
}

impl TestDatabase {
    /// A SQLite database file.
    pub fn sqlite(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(unique_name(prefix));
        std::fs::create_dir_all(&dir).expect("temporary folder");
        let url = format!("sqlite://{}", dir.join("module.db").display());
        Self {
            url,
            cleanup: Cleanup::Folder(dir),
        }
    }

    /// A fresh MariaDB/MySQL database with a user of its own that may use only it (as each
    /// domain has in production): its URL carries that user, not the server's admin.
    pub async fn mysql(prefix: &str) -> Self {
        let server = required_env("CHIMERA_MYSQL_URL")
            .trim_end_matches('/')
            .to_owned();
        let name = unique_name(prefix).replace('-', "_");
        sqlx::any::install_default_drivers();
        let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&server)
            .await
            .unwrap_or_else(|e| {
                panic!("MariaDB at CHIMERA_MYSQL_URL does not answer: {e}; {HOW_TO_START}")
            });
        sqlx::Executor::execute(
            &mut conn,
            sqlx::AssertSqlSafe(format!("CREATE DATABASE `{name}`")),
        )
        .await
        .unwrap_or_else(|e| panic!("create database {name}: {e}"));
        // The user is named after the database (MariaDB allows 80 characters).
        let password = unique_name("pw").replace('-', "");
        for statement in [
            format!("CREATE USER '{name}'@'%' IDENTIFIED BY '{password}'"),
            format!("GRANT ALL PRIVILEGES ON `{name}`.* TO '{name}'@'%'"),
        ] {
            sqlx::Executor::execute(&mut conn, sqlx::AssertSqlSafe(statement))
                .await
                .unwrap_or_else(|e| panic!("create user {name}: {e}"));
        }
        Self {
            url: format!("{}/{name}", with_user(&server, &name, &password)),
            cleanup: Cleanup::MySql {
                server,
                name,
                password,
            },
        }
    }
}

impl TestDatabase {
    /// The database's URL as pods on the dev node reach MariaDB (through the Service in
    /// namespace chimera-dev); `None` for a SQLite file.
    pub fn cluster_url(&self) -> Option<String> {
        match &self.cleanup {
            Cleanup::MySql { name, password, .. } => Some(format!(
                "{}/{name}",
                with_user(
                    required_env("CHIMERA_CLUSTER_MYSQL_URL").trim_end_matches('/'),
                    name,
                    password
                )
            )),
            Cleanup::Folder(_) => None,
        }
    }
}

/// `url` (`scheme://user:password@host:port`) with another user and password.
fn with_user(url: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("mysql", url));
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}:{password}@{host}")
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        match &self.cleanup {
            Cleanup::Folder(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Cleanup::MySql { server, name, .. } => {
                let (server, name) = (server.clone(), name.clone());
                let _ = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(async move {
                        if let Ok(mut conn) =
                            <sqlx::AnyConnection as sqlx::Connection>::connect(&server).await
                        {
                            let _ = sqlx::Executor::execute(
                                &mut conn,
                                sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS `{name}`")),
                            )
                            .await;
                            let _ = sqlx::Executor::execute(
                                &mut conn,
                                sqlx::AssertSqlSafe(format!("DROP USER IF EXISTS '{name}'@'%'")),
                            )
                            .await;
                        }
                    });
                    Ok::<_, std::io::Error>(())
                })
                .join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "KUBECONFIG is not set: the integration tests need the real servers")]
    fn a_missing_server_fails_instead_of_skipping() {
        required("KUBECONFIG", None);
    }

    #[test]
    #[should_panic(expected = "CHIMERA_AMQP_URL is not set")]
    fn an_empty_variable_counts_as_missing() {
        required("CHIMERA_AMQP_URL", Some(String::new()));
    }

    #[test]
    fn basic_auth_encodes_like_rfc_7617() {
        assert_eq!(basic_auth("guest", "guest"), "Basic Z3Vlc3Q6Z3Vlc3Q=");
        assert_eq!(basic_auth("a", "b"), "Basic YTpi");
    }

    #[test]
    fn management_url_credentials_are_split() {
        assert_eq!(
            split_credentials("http://u:p@127.0.0.1:15673"),
            ("http://127.0.0.1:15673".into(), "u".into(), "p".into())
        );
    }
}
