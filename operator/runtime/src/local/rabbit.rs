//! A private RabbitMQ node for `chimera up` when no broker is given: Debian's
//! `rabbitmq-server`, on its own ports, with its data under the state directory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use super::process::{alive, terminate};

/// A running private node.
pub struct PrivateBroker {
    child: Child,
    /// The node's own pid file (the child is a wrapper script; the node is its child).
    pid_file: PathBuf,
    /// Its AMQP URL.
    pub amqp_url: String,
    /// Its management API URL.
    pub management_url: String,
}

fn sbin() -> Result<PathBuf, String> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/rabbitmq/lib")
        .map_err(|_| missing())?
        .flatten()
        .map(|e| e.path().join("sbin"))
        .filter(|p| p.join("rabbitmq-server").exists())
        .collect();
    found.sort();
    found.pop().ok_or_else(missing)
}

/// Whether `pid` is a private node of `chimera up` (not a recycled pid).
fn is_our_node(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("chimera-up-"))
}

fn missing() -> String {
    "rabbitmq-server is not installed: install it (Debian: `apt-get install -y rabbitmq-server`, or run scripts/install-tools), or point chimera up at a broker with CHIMERA_AMQP_URL".to_owned()
}

impl PrivateBroker {
    /// Starts the node (after stopping one a crashed `chimera up` left behind) and waits for
    /// its management API.
    pub async fn start(state: &Path, amqp_port: u16, management_port: u16) -> Result<Self, String> {
        let sbin = sbin()?;
        let dir = state.join("rabbitmq");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let pid_file = dir.join("node.pid");
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            && alive(pid)
            && is_our_node(pid)
        {
            terminate(pid);
            let deadline = Instant::now() + Duration::from_secs(30);
            while alive(pid) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let conf = format!(
            "listeners.tcp.default = 127.0.0.1:{amqp_port}\nmanagement.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {management_port}\nloopback_users = none\nlog.console = false\nlog.file.level = warning\ncollect_statistics_interval = 1000\n"
        );
        let write = |name: &str, text: &str| {
            std::fs::write(dir.join(name), text).map_err(|e| format!("{}: {e}", dir.display()))
        };
        write("rabbitmq.conf", &conf)?;
        write("enabled_plugins", "[rabbitmq_management].\n")?;
        let log = std::fs::File::create(dir.join("server.log")).map_err(|e| e.to_string())?;
        let node = format!("chimera-up-{amqp_port}@localhost");
        let child = Command::new(sbin.join("rabbitmq-server"))
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", amqp_port.to_string())
            .env(
                "RABBITMQ_DIST_PORT",
                (u32::from(amqp_port) + 20000).to_string(),
            )
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", &pid_file)
            // A node that fails to boot writes erl_crash.dump into its working directory (the
            // user's project) unless told where: keep it with the broker's other state.
            .env("ERL_CRASH_DUMP", dir.join("erl_crash.dump"))
            // Erlang's port mapper and the distribution port on loopback only (by default both
            // listen on every interface).
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            // Out of the terminal's process group: a Ctrl-C must not stop the broker before
            // the heads have drained into it.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start rabbitmq-server: {e}"))?;
        let mut broker = Self {
            child,
            pid_file: pid_file.clone(),
            amqp_url: format!("amqp://guest:guest@127.0.0.1:{amqp_port}/%2f"),
            management_url: format!("http://guest:guest@127.0.0.1:{management_port}"),
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let up = http
                .get(format!("http://127.0.0.1:{management_port}/api/overview"))
                .basic_auth("guest", Some("guest"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if up {
                return Ok(broker);
            }
            if Instant::now() > deadline {
                broker.kill_node();
                let _ = broker.child.kill().await;
                return Err(format!(
                    "RabbitMQ did not start in 120 s; see {}",
                    dir.join("server.log").display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Stops the node: SIGTERM to the wrapper (which stops the node), SIGKILL to both after
    /// 30 s.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            terminate(pid);
        }
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            self.kill_node();
            let _ = self.child.kill().await;
        }
    }

    fn kill_node(&self) {
        if let Some(pid) = std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            .filter(|p| alive(*p) && is_our_node(*p))
        {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}
