//! `chimera sim`: an autoscaling scenario in the reference model, scored for one policy.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use chimera_core::sim::policy::{self, PolicyName};
use chimera_core::sim::scenario::Scenario;
use chimera_core::sim::{run as simulate, signals_csv, timeline_csv};

/// `chimera sim`
#[derive(Debug, clap::Args)]
pub struct SimArgs {
    /// The scenario JSON (its trace CSV is read relative to it).
    #[arg(long)]
    scenario: PathBuf,
    /// The policy: chimera, keda or kpa.
    #[arg(long, default_value = "chimera")]
    policy: PolicyName,
    /// The policy's knob: KEDA's messages per replica (default 20), KPA's target
    /// utilisation in percent (default 70). Chimera has none.
    #[arg(long)]
    knob: Option<f64>,
    /// Write `t_s,existing,ready` per second here.
    #[arg(long)]
    timeline: Option<PathBuf>,
    /// Write the load and the head's backlog or latency per second here.
    #[arg(long)]
    signals: Option<PathBuf>,
    /// Print the metrics as JSON.
    #[arg(long)]
    json: bool,
    /// Print every scaling decision with its reason.
    #[arg(long)]
    decisions: bool,
}

/// Runs the scenario and prints its score.
pub fn run(args: &SimArgs) -> anyhow::Result<ExitCode> {
    let scenario = Scenario::load(&args.scenario)?;
    if args.knob.is_some() && args.policy == PolicyName::Chimera {
        anyhow::bail!("the chimera policy has no knob: it runs its one default configuration");
    }
    let knob = args.knob.or(args.policy.default_knob());
    let result = simulate(
        &scenario,
        policy::build(args.policy, &scenario, knob),
        args.policy.as_str(),
        knob,
    );
    let write = |path: &PathBuf, text: String| {
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
    };
    if let Some(path) = &args.timeline {
        write(path, timeline_csv(&result))?;
    }
    if let Some(path) = &args.signals {
        write(path, signals_csv(&result, scenario.head))?;
    }
    if args.decisions {
        for (t, replicas, reason) in &result.decisions {
            eprintln!("t={t:>5}s -> {replicas:>3}: {reason}");
        }
    }
    let m = &result.metrics;
    if args.json {
        super::print_out(&format!("{}\n", serde_json::to_string_pretty(m)?))?;
    } else {
        println!(
            "{} / {}{}: {} s over the SLO, {:.0} replica-seconds ({:.2} x the lower bound {:.0}), {} scale actions, peak {} replicas",
            m.scenario,
            m.policy,
            m.knob.map(|k| format!(" ({k})")).unwrap_or_default(),
            m.slo_violation_s,
            m.replica_seconds,
            m.cost_ratio,
            m.lower_bound,
            m.scale_actions,
            m.peak_replicas
        );
    }
    Ok(ExitCode::SUCCESS)
}
