//! The operator under test as a child process: its start, its CPU time and peak memory from
//! `/proc`, and its `/metrics`.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

/// A running operator.
pub struct Operator {
    child: Child,
    pid: u32,
    metrics: String,
    http: reqwest::Client,
}

/// CPU seconds and peak resident memory of a process.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// User plus system CPU seconds since it started.
    pub cpu_seconds: f64,
    /// Peak resident set (VmHWM), MiB.
    pub peak_rss_mib: f64,
}

impl Operator {
    /// Starts `binary operator` watching `namespace`, with `amqp_url` (and its management API) as
    /// its broker if given;
    /// waits until it serves `/healthz`. Its log goes to `log`.
    pub async fn start(
        binary: &Path,
        namespace: &str,
        amqp_url: Option<&str>,
        management_url: Option<&str>,
        port: u16,
        log: &Path,
        rust_log: &str,
    ) -> anyhow::Result<Self> {
        let log_file = std::fs::File::create(log).with_context(|| format!("{}", log.display()))?;
        let mut command = Command::new(binary);
        command
            .arg("operator")
            .arg("--namespace")
            .arg(namespace)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{port}"))
            .env_remove("CHIMERA_AMQP_URL")
            .env_remove("CHIMERA_RABBITMQ_MANAGEMENT_URL")
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .kill_on_drop(true);
        if let Some(url) = amqp_url {
            command.arg("--amqp-url").arg(url);
        }
        if let Some(url) = management_url {
            command.arg("--management-url").arg(url);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let pid = child.id().context("the operator exited at once")?;
        let mut operator = Self {
            child,
            pid,
            metrics: format!("http://127.0.0.1:{port}/metrics"),
            http: reqwest::Client::new(),
        };
        for _ in 0..100 {
            if let Some(status) = operator.child.try_wait()? {
                bail!(
                    "the operator exited with {status}; its log: {}",
                    log.display()
                );
            }
            let health = format!("http://127.0.0.1:{port}/healthz");
            if operator.http.get(&health).send().await.is_ok() {
                return Ok(operator);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        operator.child.kill().await.ok();
        bail!(
            "the operator did not serve /healthz within 10 s; its log: {}",
            log.display()
        )
    }

    /// Its CPU time and peak memory so far.
    pub fn usage(&self) -> anyhow::Result<Usage> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))?;
        // Fields after the command name (which may hold spaces) start at the last ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
        let ticks = |i: usize| -> anyhow::Result<f64> {
            Ok(fields
                .get(i)
                .context("short /proc stat line")?
                .parse::<f64>()?)
        };
        let cpu_seconds = (ticks(11)? + ticks(12)?) / clock_ticks();
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        let peak_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .context("no VmHWM in /proc status")?
            .parse::<f64>()?;
        Ok(Usage {
            cpu_seconds,
            peak_rss_mib: peak_kib / 1024.0,
        })
    }

    /// Its `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self
            .http
            .get(&self.metrics)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    /// Stops it (SIGKILL: the bench does not measure shutdown).
    pub async fn stop(mut self) {
        self.child.kill().await.ok();
    }
}

/// Clock ticks per second of `/proc` CPU times.
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The cumulative buckets `(le, count)` of histogram `name` in exposition `text`, by `le`.
pub fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Some(le) = labels
            .split(',')
            .find_map(|p| p.strip_prefix("le=").map(|v| v.trim_matches('"')))
        else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            match le.parse() {
                Ok(le) => le,
                Err(_) => continue,
            }
        };
        let Ok(count) = value.trim().parse::<f64>() else {
            continue;
        };
        match buckets.iter_mut().find(|(b, _)| *b == le) {
            Some(b) => b.1 += count,
            None => buckets.push((le, count)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// What was observed between `earlier` and `later` (cumulative buckets of one histogram).
pub fn since(later: &[(f64, f64)], earlier: &[(f64, f64)]) -> Vec<(f64, f64)> {
    later
        .iter()
        .map(|(le, n)| {
            let before = earlier.iter().find(|(b, _)| b == le).map_or(0.0, |b| b.1);
            (*le, n - before)
        })
        .collect()
}

/// The p99 (upper bound of the bucket holding it) and the number of samples.
pub fn p99(buckets: &[(f64, f64)]) -> Option<(f64, f64)> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = total * 0.99;
    buckets
        .iter()
        .find(|(_, c)| *c >= rank)
        .map(|(le, _)| (*le, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_p99_is_the_bucket_that_holds_it() {
        let text = "x_bucket{le=\"0.01\"} 50\nx_bucket{le=\"0.1\"} 98\nx_bucket{le=\"0.5\"} 100\nx_bucket{le=\"+Inf\"} 100\n";
        assert_eq!(p99(&buckets(text, "x")), Some((0.5, 100.0)));
        assert_eq!(p99(&buckets("", "x")), None);
        let later = buckets(
            &text.replace("} 100", "} 300").replace("} 98", "} 296"),
            "x",
        );
        // In the window: 198 of 200 at most 0.1 s, the 99th percentile among them.
        let window = since(&later, &buckets(text, "x"));
        assert_eq!(window.last(), Some(&(f64::INFINITY, 200.0)));
        assert_eq!(p99(&window), Some((0.1, 200.0)));
    }
}
