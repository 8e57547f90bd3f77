//! `chimera conformance`: a module's heads checked against docs/contract.md, clause by clause.

use std::process::ExitCode;

use chimera_runtime::conformance::{ConformanceArgs, run as run_conformance};

/// Runs the clauses and prints the report; exit 1 when any clause failed.
pub async fn run(args: &ConformanceArgs) -> anyhow::Result<ExitCode> {
    let (report, dir) = run_conformance(args).await?;
    if args.json {
        super::print_out(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
    } else {
        super::print_out(&report.render())?;
    }
    if !report.passed() {
        eprintln!("the heads' logs and database are in {}", dir.display());
    }
    Ok(super::exit(report.passed()))
}
