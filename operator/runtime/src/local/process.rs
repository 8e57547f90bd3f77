//! One replica of a head as a local process: started with its contract environment, its output
//! prefixed by `domain/head/n` on the terminal and kept in a log file, stopped gracefully
//! (SIGTERM, then SIGKILL after the grace period).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// How to start a replica.
#[derive(Clone, Debug)]
pub struct ReplicaSpec {
    /// `domain/head/n`, the prefix of its log lines.
    pub label: String,
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its environment (on top of a clean one: PATH, HOME, RUST_LOG are passed through).
    pub env: Vec<(String, String)>,
    /// Where its output is appended.
    pub log_file: PathBuf,
    /// Whether to echo its output on the terminal.
    pub echo: bool,
}

/// A running replica.
pub struct Replica {
    /// Its spec.
    pub spec: ReplicaSpec,
    /// Its process id.
    pub pid: u32,
    child: Child,
}

/// Passed through from `chimera up`'s environment to the heads (with every `OTEL_*`
/// variable: `OTEL_EXPORTER_OTLP_ENDPOINT=... chimera up` traces every head).
const INHERITED: [&str; 4] = ["PATH", "HOME", "RUST_LOG", "RUST_BACKTRACE"];

/// What of `vars` a head inherits.
fn inherited(vars: impl Iterator<Item = (String, String)>) -> Vec<(String, String)> {
    vars.filter(|(k, _)| INHERITED.contains(&k.as_str()) || k.starts_with("OTEL_"))
        .collect()
}

impl Replica {
    /// Starts it.
    pub async fn start(spec: ReplicaSpec) -> std::io::Result<Self> {
        if let Some(dir) = spec.log_file.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let mut command = Command::new(&spec.program);
        command
            .args(&spec.args)
            .env_clear()
            .envs(inherited(std::env::vars()))
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            // Plain log lines: they go to files and behind a prefix, not to a terminal.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A process group of its own: a terminal's Ctrl-C signals `chimera up`'s group,
            // and `chimera up` stops each head with SIGTERM, which is all the contract
            // promises (a head handling only SIGTERM would die on the SIGINT undrained).
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command.spawn()?;
        let pid = child.id().unwrap_or_default();
        let log = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log_file)
            .await?;
        let log = std::sync::Arc::new(tokio::sync::Mutex::new(log));
        if let Some(out) = child.stdout.take() {
            tokio::spawn(pump(out, spec.label.clone(), log.clone(), spec.echo));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(pump(err, spec.label.clone(), log, spec.echo));
        }
        Ok(Self { spec, pid, child })
    }

    /// Whether it has exited, and how.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// SIGTERM, then SIGKILL if it is still there after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        terminate(self.pid);
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Sends SIGTERM through `kill(1)` (the process has no unsafe code to call kill(2) itself).
pub fn terminate(pid: u32) {
    if pid == 0 {
        return;
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Whether a process with this id exists (and is not a zombie waiting to be reaped).
pub fn alive(pid: u32) -> bool {
    pid != 0
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            !stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
}

async fn pump(
    stream: impl tokio::io::AsyncRead + Unpin,
    label: String,
    log: std::sync::Arc<tokio::sync::Mutex<tokio::fs::File>>,
    echo: bool,
) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if echo {
            println!("{label:>18} | {line}");
        }
        let mut file = log.lock().await;
        let _ = file.write_all(line.as_bytes()).await;
        let _ = file.write_all(b"\n").await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_inherit_the_path_the_log_filter_and_the_otel_settings_only() {
        let vars = [
            ("PATH", "/bin"),
            ("RUST_LOG", "debug"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ("OTEL_SERVICE_NAME", "x"),
            ("AWS_SECRET_ACCESS_KEY", "no"),
            ("CHIMERA_AMQP_URL", "amqp://elsewhere"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let names: Vec<String> = inherited(vars.into_iter())
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            names,
            [
                "PATH",
                "RUST_LOG",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "OTEL_SERVICE_NAME"
            ]
        );
    }
}
