//! `chimera crd` and `chimera validate`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use chimera_core::api::crd::chimera_module_crd_yaml;
use chimera_core::api::manifests::{read, yaml_files};
use chimera_core::api::schemas::{incompatibilities, strays};
use chimera_core::api::validation::{DocumentReport, modules_from_yaml, validate_yaml};

/// `chimera validate`
#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// Files or directories (every *.yaml / *.yml inside) to check.
    #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
    pub paths: Vec<PathBuf>,
}

/// Prints the CRD.
pub fn crd() -> anyhow::Result<ExitCode> {
    super::print_out(&chimera_module_crd_yaml().context("rendering the CRD")?)?;
    Ok(ExitCode::SUCCESS)
}

/// Checks every document of the paths; exit 1 on any problem or when there is no module.
pub fn validate(args: &ValidateArgs) -> anyhow::Result<ExitCode> {
    let mut problems = 0usize;
    let mut modules = 0usize;
    let mut valid = Vec::new();
    for file in yaml_files(&args.paths)? {
        let (source, _) = read(&file)?;
        for report in validate_yaml(&source) {
            modules += usize::from(report.checked);
            problems += report.errors.len();
            print_report(&file, &report);
        }
        for module in modules_from_yaml(&source).0 {
            let name = module.metadata.name.clone().unwrap_or_default();
            for warning in strays(&module) {
                println!(
                    "{}: ChimeraModule/{name}: warning: {warning}",
                    file.display()
                );
            }
            valid.push(module);
        }
    }
    // Across the modules given: a subscriber relying on what its publisher no longer
    // guarantees (docs/api.md, payload schemas).
    for broken in incompatibilities(&valid) {
        println!("breaking change: {broken}");
        problems += 1;
    }
    if problems > 0 {
        println!("{problems} problem(s) found");
        return Ok(ExitCode::FAILURE);
    }
    if modules == 0 {
        println!("no ChimeraModule found in the given paths");
        return Ok(ExitCode::FAILURE);
    }
    println!("{modules} ChimeraModule(s) valid");
    Ok(ExitCode::SUCCESS)
}

fn print_report(file: &Path, report: &DocumentReport) {
    let what = report
        .object
        .clone()
        .unwrap_or_else(|| format!("document {}", report.index));
    if !report.checked {
        return;
    }
    if report.errors.is_empty() {
        println!("{}: {what}: valid", file.display());
    }
    for error in &report.errors {
        println!("{}: {what}: {error}", file.display());
    }
}
