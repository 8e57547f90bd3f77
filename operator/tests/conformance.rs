//! `chimera conformance` on every module of the marketplace, the Rust ones and the Python one
//! (modules/notifications), on the test environment's RabbitMQ (a vhost of its own per run),
//! and a module run with a program that is not its own failing the clauses it breaks (the
//! check can fail).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

fn bin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_chimera"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs `chimera conformance --json` on the module `name` with `program_args`: its exit code,
/// the clauses' verdicts, and stderr.
fn conformance(name: &str, program_args: &[String]) -> (i32, Vec<(String, String)>, String) {
    for var in ["CHIMERA_AMQP_URL", "CHIMERA_RABBITMQ_MANAGEMENT_URL"] {
        assert!(
            std::env::var(var).is_ok_and(|v| !v.is_empty()),
            "{var} is not set: start the test environment (scripts/dev-env up) and source its exports"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_chimera"))
        .args(["conformance", "--json", "-f"])
        .arg(repo(&format!("examples/marketplace/{name}.yaml")))
        .args(program_args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not a JSON report ({e}): {stdout}\n{stderr}"));
    let verdicts = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["clause"].as_str().unwrap().to_owned(),
                format!("{} {}", f["verdict"].as_str().unwrap(), f["detail"]),
            )
        })
        .collect();
    (out.status.code().unwrap_or(-1), verdicts, stderr)
}

fn assert_passes(name: &str, program_args: &[String]) {
    let (code, verdicts, stderr) = conformance(name, program_args);
    let failed: Vec<&(String, String)> = verdicts
        .iter()
        .filter(|(_, v)| v.starts_with("fail"))
        .collect();
    assert!(
        code == 0 && failed.is_empty(),
        "{name}: exit {code}, failed: {failed:#?}\n{stderr}"
    );
    assert_eq!(
        verdicts.len(),
        11,
        "every clause has a verdict: {verdicts:?}"
    );
    // Every clause that applies to a module with both heads was checked, not skipped.
    for (clause, verdict) in &verdicts {
        if clause != "schemas" {
            assert!(verdict.starts_with("pass"), "{name}: {clause}: {verdict}");
        }
    }
}

fn rust_program() -> Vec<String> {
    vec!["--bin-dir".into(), bin_dir().display().to_string()]
}

#[test]
fn the_users_module_conforms() {
    assert_passes("users", &rust_program());
}

#[test]
fn the_gigs_module_conforms() {
    assert_passes("gigs", &rust_program());
}

#[test]
fn the_orders_module_conforms() {
    assert_passes("orders", &rust_program());
}

#[test]
fn the_python_notifications_module_conforms() {
    let program = repo("modules/notifications/notifications");
    assert!(
        repo("modules/notifications/.venv/bin/python").exists(),
        "the notifications module's virtualenv is missing: run modules/notifications/install"
    );
    assert_passes(
        "notifications",
        &["--program".into(), program.display().to_string()],
    );
}

/// The users module run with the gigs program: it starts and serves like any head, but takes
/// none of the users' commands, so the clauses that need a message handled fail, and so does
/// the run.
#[test]
fn a_program_that_is_not_the_modules_fails_the_clauses_it_breaks() {
    let gigs = bin_dir().join("gigs");
    let (code, verdicts, _) =
        conformance("users", &["--program".into(), gigs.display().to_string()]);
    assert_eq!(code, 1, "{verdicts:#?}");
    let verdict = |clause: &str| {
        verdicts
            .iter()
            .find(|(c, _)| c == clause)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert!(verdict("environment").starts_with("pass"), "{verdicts:#?}");
    assert!(verdict("duplicates").starts_with("fail"), "{verdicts:#?}");
    assert!(
        verdict("duplicates").contains("no message the worker takes was handled"),
        "{verdicts:#?}"
    );
}
