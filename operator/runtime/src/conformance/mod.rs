//! `chimera conformance -f MODULE.yaml`: runs a module's heads on a vhost and a SQLite database
//! of their own, under a broker user that may not declare anything (the one the operator would
//! give the module), and checks each clause of docs/contract.md by acting on them from outside:
//! messages sent, copies of what they publish caught, endpoints read, the database locked, the
//! worker stopped under load. The verdicts are `chimera_core::conformance`'s.
//!
//! The broker is `--amqp-url`/`--management-url` (or `CHIMERA_AMQP_URL` and
//! `CHIMERA_RABBITMQ_MANAGEMENT_URL`) with an admin user, on which a vhost is made for the run
//! and removed after it; without them a private RabbitMQ node is started, as `chimera up` does.

mod clauses;
pub mod harness;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use reqwest::Method;
use serde_json::json;

use crate::access::broker as broker_access;
use crate::local::rabbit::PrivateBroker;
use crate::topology::declare;
use crate::topology::management::ManagementClient;
use chimera_core::access::{grants, plan as access_plan, user};
use chimera_core::api::ChimeraModule;
use chimera_core::conformance::Report;
use chimera_core::local::plan::{LocalContext, program_name};
use chimera_core::topology::plan as topology_plan;
use chimera_core::topology::state::{BrokerEndpoint, percent_encode};
use harness::Harness;

/// `chimera conformance` options.
#[derive(Clone, Debug, clap::Args)]
pub struct ConformanceArgs {
    /// The module's ChimeraModule YAML (one module).
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
    /// The module's program (default: found as `chimera up` finds it: --bin-dir, the
    /// workspace's target directories, PATH).
    #[arg(long)]
    pub program: Option<PathBuf>,
    /// Where to look for the program first.
    #[arg(long)]
    pub bin_dir: Vec<PathBuf>,
    /// An admin AMQP URL of a broker to run on (a vhost is made for the run).
    #[arg(long, env = "CHIMERA_AMQP_URL")]
    pub amqp_url: Option<String>,
    /// Its management API URL (with credentials).
    #[arg(long, env = "CHIMERA_RABBITMQ_MANAGEMENT_URL")]
    pub management_url: Option<String>,
    /// AMQP port of the private broker (when no broker is given).
    #[arg(long, default_value_t = 5692)]
    pub amqp_port: u16,
    /// Management port of the private broker.
    #[arg(long, default_value_t = 15692)]
    pub management_port: u16,
    /// Where the database, the heads' logs and a private broker live (default: a new
    /// temporary directory, removed after a passing run).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs every clause; the report (and where the logs are).
pub async fn run(args: &ConformanceArgs) -> anyhow::Result<(Report, PathBuf)> {
    let module = load_module(&args.file)?;
    let program = match &args.program {
        Some(p) => p
            .canonicalize()
            .with_context(|| format!("--program {}", p.display()))?,
        None => {
            let name = program_name(&module);
            crate::local::find_program(&name, &args.bin_dir).with_context(|| {
                format!(
                    "no program {name:?} (from the image {:?}): pass --program or --bin-dir",
                    module.spec.image
                )
            })?
        }
    };
    let dir = match &args.state_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("chimera-conformance-{}", random_hex(6)?)),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;

    let mut private = None;
    let (amqp, management) = match (&args.amqp_url, &args.management_url) {
        (Some(a), Some(m)) if !a.is_empty() && !m.is_empty() => (a.clone(), m.clone()),
        _ => {
            let broker = PrivateBroker::start(&dir, args.amqp_port, args.management_port)
                .await
                .map_err(anyhow::Error::msg)?;
            let urls = (broker.amqp_url.clone(), broker.management_url.clone());
            private = Some(broker);
            urls
        }
    };
    let result = on_broker(module, program, &dir, &amqp, &management).await;
    if let Some(broker) = private {
        broker.stop().await;
    }
    let report = result?;
    if report.passed() && args.state_dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok((report, dir))
}

fn load_module(file: &Path) -> anyhow::Result<ChimeraModule> {
    let loaded = chimera_core::api::manifests::load(&[file.to_path_buf()])?;
    if !loaded.problems.is_empty() {
        anyhow::bail!("invalid module:\n  {}", loaded.problems.join("\n  "));
    }
    let mut modules = loaded.modules;
    anyhow::ensure!(
        modules.len() == 1,
        "{} holds {} ChimeraModules; conformance checks one",
        file.display(),
        modules.len()
    );
    let mut module = modules.remove(0);
    // Short retries: the ladder is walked in seconds (the delays' values are not a clause).
    if let Some(worker) = module.spec.worker.as_mut() {
        worker.retry.delays_seconds = vec![1, 1];
    }
    Ok(module)
}

/// A vhost and a module user for the run, the module's topology, then the clauses; the vhost
/// is removed afterwards whatever happened.
async fn on_broker(
    module: ChimeraModule,
    program: PathBuf,
    dir: &Path,
    amqp: &str,
    management: &str,
) -> anyhow::Result<Report> {
    let vhost = format!("chimera-conformance-{}", random_hex(4)?);
    let admin_url = with_vhost(amqp, &vhost);
    let admin = BrokerEndpoint::new(&admin_url, Some(management))?;
    let client = ManagementClient::new(&admin)?;
    // Both the management user and the AMQP URL's user act on the run's vhost.
    let mut admins = vec![client.user().to_owned()];
    if let Some(amqp_user) = amqp_user(amqp)
        && !admins.contains(&amqp_user)
    {
        admins.push(amqp_user);
    }
    let name = format!("chimera-conformance-{}", random_hex(4)?);
    let password = random_hex(16)?;
    client
        .request(
            Method::PUT,
            &format!("/api/vhosts/{}", percent_encode(&vhost)),
            Some(&json!({})),
        )
        .await?
        .error_for_status()
        .context("creating the run's vhost")?;
    let outcome = async {
        for admin_user in &admins {
            client
                .request(
                    Method::PUT,
                    &format!(
                        "/api/permissions/{}/{}",
                        percent_encode(&vhost),
                        percent_encode(admin_user)
                    ),
                    Some(&json!({"configure": ".*", "write": ".*", "read": ".*"})),
                )
                .await?
                .error_for_status()
                .context("granting the admin the run's vhost")?;
        }
        let plan = topology_plan::plan(std::slice::from_ref(&module));
        declare::apply(&admin, &plan).await?;
        // The user the operator would give the module: it may not configure anything.
        let want = grants(&module);
        let steps = access_plan::steps(&want, None, true);
        broker_access::apply(&client, &name, &password, &want, &steps).await?;
        let head_url = user::with_credentials(&admin_url, &name, &password)?;
        let local = LocalContext {
            amqp_url: head_url,
            state_dir: dir.display().to_string(),
        };
        let before = client.state().await?;
        let mut harness =
            Harness::new(module, program, dir.to_path_buf(), &admin_url, local).await?;
        // A Ctrl-C ends the run early, and the same clean-up follows.
        let report = tokio::select! {
            report = clauses::run(&mut harness, &client, before, &password) => Ok(report),
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted (Ctrl-C); the heads, the vhost and the user were removed")),
        };
        harness.stop_all().await;
        let _ = harness.connection.close(200, "done".into()).await;
        report
    }
    .await;
    // The user belongs to the broker, not to the vhost: removed whatever happened.
    let _ = broker_access::delete_user(&client, &name).await;
    let _ = client
        .request(
            Method::DELETE,
            &format!("/api/vhosts/{}", percent_encode(&vhost)),
            None,
        )
        .await;
    outcome
}

/// `url` (amqp://user:pass@host:port[/vhost][?query]) on `vhost` instead.
fn with_vhost(url: &str, vhost: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("amqp", url));
    let authority_from = rest.rfind('@').map_or(0, |i| i + 1);
    let end = rest[authority_from..]
        .find(['/', '?'])
        .map_or(rest.len(), |i| authority_from + i);
    let query = rest[end..]
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    format!(
        "{scheme}://{}/{}{query}",
        &rest[..end],
        percent_encode(vhost)
    )
}

/// The user an AMQP URL authenticates as, if it names one.
fn amqp_user(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let (creds, _) = rest.rsplit_once('@')?;
    let user = creds.split_once(':').map_or(creds, |(u, _)| u);
    Some(chimera_core::topology::state::percent_decode(user))
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// How long a head gets to become ready.
pub(crate) const READY_WITHIN: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runs_vhost_replaces_any_in_the_url_and_keeps_its_query() {
        let v = "chimera-conformance-1";
        assert_eq!(
            with_vhost("amqp://u:p@h:5672/%2f", v),
            "amqp://u:p@h:5672/chimera-conformance-1"
        );
        assert_eq!(
            with_vhost("amqp://u:p@h:5672", v),
            "amqp://u:p@h:5672/chimera-conformance-1"
        );
        assert_eq!(
            with_vhost("amqps://u:p%2Fq@h/shop?heartbeat=5", v),
            "amqps://u:p%2Fq@h/chimera-conformance-1?heartbeat=5"
        );
        assert_eq!(amqp_user("amqp://ad%40min:p@h/"), Some("ad@min".to_owned()));
        assert_eq!(amqp_user("amqp://h:5672/"), None);
    }
}
