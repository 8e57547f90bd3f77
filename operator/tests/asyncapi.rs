//! `chimera topology plan --format asyncapi` on the marketplace, validated by the official
//! AsyncAPI parser (`@asyncapi/parser` from npm, installed by scripts/install-tools), and a
//! broken document refused by it (the check can fail).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// The installed validator, the same lockfile as the repository's, or a failure saying what to
/// run.
fn validator() -> PathBuf {
    let tools = std::env::var_os("CHIMERA_TOOLS_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/chimera/tools")))
        .expect("CHIMERA_TOOLS_DIR or HOME");
    let installed = tools.join("asyncapi");
    let lock = |dir: PathBuf| std::fs::read(dir.join("package-lock.json")).ok();
    assert!(
        lock(installed.clone()).is_some()
            && lock(installed.clone()) == lock(repo("scripts/tools/asyncapi")),
        "the AsyncAPI parser is not installed in {} (or is older than scripts/tools/asyncapi): run scripts/install-tools",
        installed.display()
    );
    installed.join("validate.mjs")
}

/// Runs the official parser on `document`: its exit status and output.
fn validate(document: &str) -> (i32, String) {
    let file = std::env::temp_dir().join(format!(
        "chimera-asyncapi-{}-{:?}.yaml",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&file, document).unwrap();
    let out = Command::new("node")
        .arg(validator())
        .arg(&file)
        .output()
        .expect("node runs (Node.js is needed for this test: install nodejs)");
    std::fs::remove_file(&file).ok();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

fn marketplace_document() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_chimera"))
        .args(["topology", "plan", "--format", "asyncapi", "-f"])
        .arg(repo("examples/marketplace"))
        .output()
        .expect("run chimera");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_marketplace_is_a_valid_asyncapi_3_document() {
    let document = marketplace_document();
    let (code, out) = validate(&document);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("valid AsyncAPI 3.0.0"), "{out}");
    // What a module in another language looks for in it: the exchange, the payload schema,
    // the envelope, and who consumes what.
    let doc: serde_json::Value = serde_yaml::from_str(&document).unwrap();
    let register = &doc["channels"]["users.commands.user.register"];
    assert_eq!(
        register["bindings"]["amqp"]["exchange"]["name"],
        "chimera.users.commands"
    );
    let message = &doc["components"]["messages"]["users.user.register"];
    assert!(
        message["payload"]["properties"]["data"]["required"]
            .as_array()
            .is_some_and(|r| r.iter().any(|f| f == "user_id")),
        "{message}"
    );
    assert!(message["headers"]["properties"]["traceparent"].is_object());
    assert_eq!(
        doc["operations"]["orders.receive.gigs.events.gig.published"]["action"],
        "receive"
    );
}

#[test]
fn the_parser_refuses_a_broken_document() {
    let broken = marketplace_document().replace(
        "#/components/messages/users.user.register",
        "#/components/messages/nowhere",
    );
    let (code, out) = validate(&broken);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("invalid"), "{out}");
}
