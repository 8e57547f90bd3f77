//! A real Prometheus (Debian's `prometheus` package, installed by `scripts/install-tools`),
//! started by a test with a configuration of its own and stopped when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running Prometheus on a loopback port, its data in a directory of its own.
pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
}

/// The binary: `CHIMERA_PROMETHEUS`, or `prometheus` on PATH.
fn binary() -> String {
    std::env::var("CHIMERA_PROMETHEUS").unwrap_or_else(|_| "prometheus".to_owned())
}

impl Prometheus {
    /// Starts Prometheus with `config` (YAML) and waits until it is ready; panics, with its
    /// output, when it cannot start.
    pub fn start(config: &str) -> Self {
        let dir = std::env::temp_dir().join(crate::unique_name("prometheus"));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config)
            .unwrap_or_else(|e| panic!("write {}: {e}", config_file.display()));
        let port = crate::free_port();
        let log = std::fs::File::create(dir.join("log"))
            .unwrap_or_else(|e| panic!("create the log in {}: {e}", dir.display()));
        let child = Command::new(binary())
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {}: {e}; install Debian's prometheus package with \
                     `scripts/install-tools` (or set CHIMERA_PROMETHEUS)",
                    binary()
                )
            });
        let mut prometheus = Self {
            child,
            dir,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = crate::management_agent()
                .get(format!("{}/-/ready", prometheus.url))
                .call()
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return prometheus;
            }
            if let Ok(Some(status)) = prometheus.child.try_wait() {
                panic!("prometheus exited ({status}): {}", prometheus.log());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready after 30 s: {}",
                prometheus.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// What Prometheus logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// GET `path` of the HTTP API (e.g. `/api/v1/targets`), its `data`; panics on an error
    /// answer (a bad query names what is wrong).
    pub fn api(&self, path: &str, params: &[(&str, &str)]) -> serde_json::Value {
        // (10 s timeouts; a 4xx answer is read: it says what is wrong with the query)
        let mut request = crate::management_agent().get(format!("{}{path}", self.url));
        for (k, v) in params {
            request = request.query(*k, *v);
        }
        let mut answer = request
            .call()
            .unwrap_or_else(|e| panic!("prometheus {path}: {e}"));
        let body: serde_json::Value = answer
            .body_mut()
            .read_json()
            .unwrap_or_else(|e| panic!("prometheus {path}: not JSON: {e}"));
        assert_eq!(
            body["status"], "success",
            "prometheus {path} {params:?}: {body}"
        );
        body["data"].clone()
    }

    /// The series an instant query returns now.
    pub fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let data = self.api("/api/v1/query", &[("query", expr)]);
        data["result"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
