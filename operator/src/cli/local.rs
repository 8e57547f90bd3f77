//! `chimera load` and `chimera status`: the tools around a running `chimera up` (`chimera up`
//! itself is `chimera_runtime::local::up`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use chimera_runtime::local::load::{LoadArgs, load as run_load, print};
use chimera_runtime::local::snapshot::{Snapshot, UpFile};

/// `chimera status`
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The state directory of that `chimera up`.
    #[arg(long, default_value = ".chimera")]
    pub state_dir: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs the load and prints its summary; exit 1 when a command was not confirmed or a read
/// failed (falling behind the rate is reported, not an error).
pub async fn load(args: &LoadArgs) -> anyhow::Result<ExitCode> {
    let summary = run_load(args).await?;
    print(&summary, args.json)?;
    Ok(super::exit(summary.errors == 0 && summary.read_errors == 0))
}

/// Prints what a running `chimera up` runs.
pub async fn status(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let up = UpFile::read(&args.state_dir)?;
    let url = format!("{}/api/status", up.dashboard);
    let snapshot: Snapshot = reqwest::get(&url)
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("chimera up (pid {}) does not answer at {url}", up.pid))?
        .json()
        .await
        .context("reading chimera up's status")?;
    if args.json {
        super::print_out(&format!("{}\n", serde_json::to_string_pretty(&snapshot)?))?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "chimera up: {} s, broker {}, dashboard {}",
        snapshot.uptime_s.round(),
        snapshot.broker,
        up.dashboard
    );
    for m in &snapshot.modules {
        for h in &m.heads {
            let detail = match (&h.url, &h.queue) {
                (Some(url), _) => {
                    let latency = h
                        .history
                        .last()
                        .and_then(|p| p.latency_ms)
                        .map(|l| {
                            format!(", p50 {:.1} ms p95 {:.1} ms p99 {:.1} ms", l[0], l[1], l[2])
                        })
                        .unwrap_or_default();
                    format!("{url}{latency}")
                }
                (None, Some(queue)) => format!(
                    "{queue}: {} messages",
                    h.queue_depth.map_or("?".to_owned(), |d| format!("{d:.0}"))
                ),
                (None, None) => String::new(),
            };
            let reason = h.current.as_ref().map(|d| d.reason.as_str()).unwrap_or("");
            println!(
                "{:<10} {:<6} {:>2}/{:<2} ready  [{}..{}]  {detail}\n{:>22}{reason}",
                m.domain, h.head, h.ready, h.replicas, h.min, h.max, ""
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
