//! The `chimera` binary as a user runs it (`crd`, `validate`, `sim`), and the module programs'
//! command lines (`--help`, `--version`).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

fn chimera(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_chimera"))
        .args(args)
        .output()
        .expect("run chimera");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

fn repo(path: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
        .display()
        .to_string()
}

#[test]
fn crd_prints_the_checked_in_crd() {
    let (code, out) = chimera(&["crd"]);
    assert_eq!(code, 0);
    assert_eq!(
        out,
        std::fs::read_to_string(repo("crds/chimeramodule.yaml")).unwrap()
    );
}

#[test]
fn crd_into_a_reader_that_leaves_early_exits_quietly() {
    use std::io::Read;
    use std::process::Stdio;
    // `chimera crd | head -c 10`: the pipe closes after a few bytes.
    let mut child = Command::new(env!("CARGO_BIN_EXE_chimera"))
        .arg("crd")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 10];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    // (the read end is dropped here)
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(&first, b"# Generate");
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(stderr.is_empty(), "nothing on stderr: {stderr}");
}

#[test]
fn validate_accepts_the_examples() {
    let (code, out) = chimera(&["validate", "-f", &repo("examples/marketplace")]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("4 ChimeraModule(s) valid"), "{out}");
}

#[test]
fn validate_lists_every_problem_with_its_field_and_fails() {
    let dir = std::env::temp_dir().join(chimera_testenv_free_name());
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.yaml");
    std::fs::write(
        &file,
        "apiVersion: chimera.dev/v1alpha1\nkind: ChimeraModule\nmetadata: {name: shop}\n\
         spec:\n  image: x\n  commands: [Order.Place]\n  worker: {prefetch: 0, queue: {type: lazy}}\n",
    )
    .unwrap();
    let (code, out) = chimera(&["validate", "-f", file.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(code, 1, "{out}");
    for field in [
        "spec.commands[0]",
        "spec.worker.prefetch",
        "spec.worker.queue.type",
    ] {
        assert!(
            out.contains(&format!("ChimeraModule/shop: {field}:")),
            "{field} missing in:\n{out}"
        );
    }
    assert!(out.contains("3 problem(s) found"), "{out}");
}

/// Two modules in two files: users stops guaranteeing a field of its event that orders relies
/// on. Each file is valid alone; together they are a breaking change naming both and the field.
#[test]
fn validate_reports_a_subscriber_relying_on_a_field_its_publisher_dropped() {
    let dir = std::env::temp_dir().join(format!("{}-compat", chimera_testenv_free_name()));
    std::fs::create_dir_all(&dir).unwrap();
    let users = |required: &str| {
        format!(
            "apiVersion: chimera.dev/v1alpha1\nkind: ChimeraModule\nmetadata: {{name: users}}\n\
             spec:\n  image: x\n  events: {{publishes: [user.registered]}}\n  query: {{}}\n\
             \x20 schemas:\n    user.registered: {{type: object, required: [{required}], properties: {{user_id: {{type: string}}, email: {{type: string}}}}}}\n"
        )
    };
    std::fs::write(
        dir.join("orders.yaml"),
        "apiVersion: chimera.dev/v1alpha1\nkind: ChimeraModule\nmetadata: {name: orders}\n\
         spec:\n  image: x\n  events: {subscribes: [{from: users, events: [user.registered]}]}\n  worker: {}\n\
         \x20 schemas:\n    user.registered: {type: object, required: [user_id, email]}\n",
    )
    .unwrap();
    std::fs::write(dir.join("users.yaml"), users("user_id, email")).unwrap();
    let (code, out) = chimera(&["validate", "-f", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "compatible:\n{out}");
    std::fs::write(dir.join("users.yaml"), users("email")).unwrap();
    let (code, out) = chimera(&["validate", "-f", dir.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("breaking change: orders relies on field `user_id` of user.registered from users, but users no longer guarantees it"),
        "{out}"
    );
    assert!(out.contains("1 problem(s) found"), "{out}");
}

#[test]
fn validate_fails_on_a_missing_file_and_on_no_module() {
    let (code, out) = chimera(&["validate", "-f", "/nonexistent/chimera.yaml"]);
    assert_eq!(code, 1);
    assert!(out.contains("/nonexistent/chimera.yaml"), "{out}");
    let (code, out) = chimera(&[
        "validate",
        "-f",
        &repo("charts/chimera-operator/Chart.yaml"),
    ]);
    assert_eq!(code, 1);
    assert!(out.contains("no ChimeraModule"), "{out}");
}

fn chimera_testenv_free_name() -> String {
    format!(
        "chimera-cli-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    )
    .replace(['(', ')'], "")
}

#[test]
fn sim_scores_a_scenario_and_writes_its_timeline() {
    let dir = std::env::temp_dir().join(chimera_testenv_free_name());
    std::fs::create_dir_all(&dir).unwrap();
    let timeline = dir.join("timeline.csv");
    let scenario = repo("bench/autoscale/scenarios/worker-step-x5.json");
    let (code, out) = chimera(&[
        "sim",
        "--scenario",
        &scenario,
        "--policy",
        "keda",
        "--knob",
        "50",
        "--json",
        "--timeline",
        timeline.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    let metrics: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for key in [
        "slo_violation_s",
        "replica_seconds",
        "lower_bound",
        "scale_actions",
    ] {
        assert!(metrics[key].is_number(), "{key} in {metrics}");
    }
    assert_eq!(metrics["policy"], "keda");
    assert_eq!(metrics["knob"], 50.0);
    let csv = std::fs::read_to_string(&timeline).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("t_s,existing,ready"));
    let seconds = lines.count();
    assert!(seconds > 1000, "one row per second: {seconds}");
    std::fs::remove_dir_all(&dir).ok();

    // Bad input says what is wrong.
    let (code, out) = chimera(&["sim", "--scenario", &scenario, "--knob", "5"]);
    assert_ne!(code, 0);
    assert!(out.contains("no knob"), "{out}");
    let (code, out) = chimera(&["sim", "--scenario", &repo("README.md")]);
    assert_ne!(code, 0);
    assert!(out.contains("is not a scenario"), "{out}");
}

/// Runs a module program of the workspace (scripts/test builds them beside `chimera`).
fn module_program(name: &str, args: &[&str]) -> (i32, String, String) {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_chimera"))
        .parent()
        .unwrap()
        .join(name);
    let out = Command::new(&path)
        .args(args)
        .env_remove("CHIMERA_HEAD")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; build the module programs first (`cargo build -p chimera-{name}`; scripts/test does)",
                path.display()
            )
        });
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn module_programs_answer_help_and_version_for_themselves_and_each_head() {
    for name in ["users", "gigs", "orders"] {
        let (code, out, err) = module_program(name, &["--help"]);
        assert_eq!(code, 0, "{name} --help: {err}");
        assert!(
            out.starts_with(&format!("{name}: the {name} domain")),
            "{out}"
        );
        for text in [
            "query",
            "worker",
            "CHIMERA_AMQP_URL",
            "CHIMERA_WORKER_QUEUE",
            "docs/contract.md",
        ] {
            assert!(out.contains(text), "{name} --help lacks {text}:\n{out}");
        }
        let (code, out, _) = module_program(name, &["worker", "--help"]);
        assert_eq!(code, 0);
        assert!(out.contains("CHIMERA_PREFETCH"), "{out}");
        let (code, out, _) = module_program(name, &["query", "-h"]);
        assert_eq!(code, 0);
        assert!(
            out.contains("CHIMERA_HTTP_ADDR") && !out.contains("CHIMERA_PREFETCH"),
            "{out}"
        );
        for args in [
            &["--version"][..],
            &["query", "--version"],
            &["worker", "-V"],
        ] {
            let (code, out, _) = module_program(name, args);
            assert_eq!(code, 0, "{name} {args:?}");
            assert!(
                out.starts_with(&format!("{name} {}", env!("CARGO_PKG_VERSION"))),
                "{out}"
            );
        }
        // A command line that means nothing is a usage error (2), not a start-up attempt.
        let (code, _, err) = module_program(name, &["reader"]);
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains("unknown head \"reader\"") && err.contains("usage:"),
            "{err}"
        );
        let (code, _, err) = module_program(name, &[]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("no head named"), "{err}");
    }
}
